"""The Redis router: a node registry with heartbeats, session ownership with TTLs, and least-loaded
placement claimed atomically by Lua scripts (each script runs as one atomic step in Redis).

Keys (``prefix`` defaults to ``af:``; all scripts address keys they compute, so this needs one
Redis, not a cluster):

- ``af:nodes``               SET   ids of registered nodes (dead members are pruned by the scripts)
- ``af:node:{id}``           HASH  addr, state (serving|draining|stalled), capacity, active, beat (ms of the
                                   last heartbeat); TTL node_ttl, refreshed by the node's heartbeat
- ``af:pending:{id}``        ZSET  sessions reserved on node id, score = reservation expiry (ms)
- ``af:live:{id}``           SET   sessions attached on node id (what its sweeper checks)
- ``af:session:{sid}``       HASH  node, addr, tenant, token (sha256), state, epoch, at (ms of the last
                                   attach or move); TTL: reservation_ttl (pending), session_ttl refreshed
                                   by the owner's heartbeat (live), resume_ttl (detached)
- ``af:tenant:{tenant}``     ZSET  the tenant's pending and live sessions, score = expiry (ms)
- ``af:tenants``             SET   tenants with sessions (the heartbeat reports their counts)
- ``af:avatar:{id}``         HASH  tenant, image, context; TTL avatar_ttl, refreshed on use
- ``af:avatars:{tenant}``    ZSET  the tenant's avatars, score = last use (ms): the per-tenant quota
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from .base import (
    DRAINING,
    LIVE,
    PENDING,
    SERVING,
    STALLED,
    Denied,
    Draining,
    Full,
    NodeInfo,
    NotFound,
    NotOwner,
    Placement,
    Router,
    RoutingLimits,
    SessionRecord,
    StoreDown,
    new_session_id,
    new_token,
    reachable,
    token_hash,
)

log = structlog.get_logger("avatarforcing.routing")

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Whether a node whose last heartbeat is `age` ms old counts as alive. Silent for stale_ms is dead, unless the
-- store itself came back less than stale_ms ago (it was paused, restarted or unreachable: every node's
-- heartbeat is late then, and none of them is frozen for that).
local function beating(p, age, stale)
  if age <= stale then return true end
  local now = now_ms()
  if now - tonumber(redis.call('GET', p .. 'lastbeat') or 0) > stale then return true end  -- nobody beats yet
  return now - tonumber(redis.call('GET', p .. 'back') or 0) <= stale
end
-- The serving node with the most free slots (capacity - active - live reservations), ties to
-- `prefer`; nil when every node is full, draining, stalled, silent for stale_ms, or gone. Prunes
-- nodes whose entry expired.
local function pick(p, prefer, only, stale)
  local best, best_free, best_addr = nil, 0, nil
  local now = now_ms()
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
    local h = redis.call('HMGET', p .. 'node:' .. id, 'addr', 'state', 'capacity', 'active', 'beat')
    if not h[1] then
      redis.call('SREM', p .. 'nodes', id)
      redis.call('DEL', p .. 'pending:' .. id)
    elseif h[2] == 'serving' and (only == '' or id == only) and beating(p, now - tonumber(h[5] or 0), stale) then
      redis.call('ZREMRANGEBYSCORE', p .. 'pending:' .. id, '-inf', now)
      local free = tonumber(h[3]) - tonumber(h[4]) - redis.call('ZCARD', p .. 'pending:' .. id)
      if free > best_free or (free == best_free and free > 0 and id == prefer) then
        best, best_free, best_addr = id, free, h[1]
      end
    end
  end
  return best, best_addr
end
-- Whether the tenant is at its limit (pending and live sessions; detached ones hold no quota).
local function at_limit(p, tenant, limit)
  local tkey = p .. 'tenant:' .. tenant
  redis.call('ZREMRANGEBYSCORE', tkey, '-inf', now_ms())
  return tonumber(limit) > 0 and redis.call('ZCARD', tkey) >= tonumber(limit)
end
-- The store lost its data (restarted empty, FLUSHALL) when its marker `store` is gone. For `window` ms after
-- that every replica writes its sessions back (its next heartbeat), and placements under a tenant limit wait:
-- they could not count the tenant's sessions yet.
local function recovering(p, window)
  local now = now_ms()
  local until_ms = redis.call('GET', p .. 'store')
  if not until_ms then
    redis.call('SET', p .. 'store', now + tonumber(window))
    return true
  end
  return now < tonumber(until_ms)
end
local function count_tenant(p, tenant, sid, ttl)
  redis.call('ZADD', p .. 'tenant:' .. tenant, now_ms() + ttl, sid)
  redis.call('SADD', p .. 'tenants', tenant)
end
"""

# ARGV: prefix, sid, tenant, token_hash, tenant_limit, ttl_ms, prefer, only, state, stale_ms, window_ms
_CLAIM = _COMMON + """
local p, sid, tenant, th, limit, ttl, prefer, only, state, stale, window = unpack(ARGV)
ttl = tonumber(ttl)
if recovering(p, window) and tonumber(limit) > 0 then return {'recovering'} end
if at_limit(p, tenant, limit) then return {'tenant_limit'} end
local node, addr = pick(p, prefer, only, tonumber(stale))
if not node then return {'full'} end
local now = now_ms()
local key = p .. 'session:' .. sid
local epoch = 0
if state == 'pending' then
  redis.call('ZADD', p .. 'pending:' .. node, now + ttl, sid)
else
  epoch = 1
  redis.call('HINCRBY', p .. 'node:' .. node, 'active', 1)
  redis.call('SADD', p .. 'live:' .. node, sid)
end
redis.call('HSET', key, 'node', node, 'addr', addr, 'tenant', tenant, 'token', th, 'state', state, 'epoch', epoch,
  'at', now)
redis.call('PEXPIRE', key, ttl)
count_tenant(p, tenant, sid, ttl)
return {'ok', node, addr}
"""

# ARGV: prefix, sid, token_hash, tenant, ttl_ms, prefer, dead_node, tenant_limit, stale_ms, window_ms
# {'owner', node, addr, beat_age_ms}: the owner is alive (its last heartbeat is younger than stale_ms);
# {'moved', node, addr}: the owner is gone (or the session was detached): reserved on `node`, epoch bumped.
_RESUME = _COMMON + """
local p, sid, th, tenant, ttl, prefer, dead, limit, stale, window = unpack(ARGV)
ttl, stale = tonumber(ttl), tonumber(stale)
local key = p .. 'session:' .. sid
local r = redis.call('HMGET', key, 'node', 'addr', 'tenant', 'token', 'state')
if not r[1] then return {'not_found'} end
if r[4] ~= th or r[3] ~= tenant then return {'denied'} end
local owner, oaddr, state = r[1], r[2], r[5]
if dead == owner then
  redis.call('DEL', p .. 'node:' .. owner)
  redis.call('SREM', p .. 'nodes', owner)
  redis.call('DEL', p .. 'pending:' .. owner)
end
local now = now_ms()
local h = redis.call('HMGET', p .. 'node:' .. owner, 'state', 'beat')
local age = now - tonumber(h[2] or 0)
local alive = h[1] == 'serving' and beating(p, age, stale)
if alive and state ~= 'detached' then return {'owner', owner, oaddr, tostring(age)} end
if state == 'detached' and tonumber(limit) > 0 and recovering(p, window) then return {'recovering'} end
if state == 'detached' and at_limit(p, tenant, limit) then return {'tenant_limit'} end
if alive then prefer = owner end
local node, addr = pick(p, prefer, '', stale)
if not node then return {'full'} end
redis.call('ZREM', p .. 'pending:' .. owner, sid)
redis.call('SREM', p .. 'live:' .. owner, sid)
redis.call('ZADD', p .. 'pending:' .. node, now + ttl, sid)
redis.call('HINCRBY', key, 'epoch', 1)
redis.call('HSET', key, 'node', node, 'addr', addr, 'state', 'pending', 'at', now)
redis.call('PEXPIRE', key, ttl)
count_tenant(p, tenant, sid, ttl)
return {'moved', node, addr}
"""

# ARGV: prefix, sid, token_hash, tenant, node, ttl_ms, tenant_limit, window_ms
_ATTACH = _COMMON + """
local p, sid, th, tenant, node, ttl, limit, window = unpack(ARGV)
ttl = tonumber(ttl)
local key = p .. 'session:' .. sid
local r = redis.call('HMGET', key, 'node', 'addr', 'tenant', 'token', 'state')
if not r[1] then return {'not_found'} end
if r[4] ~= th or r[3] ~= tenant then return {'denied'} end
if r[1] ~= node then return {'not_owner', r[2]} end
if r[5] == 'detached' and tonumber(limit) > 0 and recovering(p, window) then return {'recovering'} end
if r[5] == 'detached' and at_limit(p, tenant, limit) then return {'tenant_limit'} end
redis.call('ZREM', p .. 'pending:' .. node, sid)
if r[5] ~= 'live' and redis.call('EXISTS', p .. 'node:' .. node) == 1 then
  redis.call('HINCRBY', p .. 'node:' .. node, 'active', 1)
end
local epoch = redis.call('HINCRBY', key, 'epoch', 1)
redis.call('HSET', key, 'state', 'live', 'at', now_ms())
redis.call('PEXPIRE', key, ttl)
redis.call('SADD', p .. 'live:' .. node, sid)
count_tenant(p, tenant, sid, ttl)
return {'ok', tostring(epoch)}
"""

# ARGV: prefix, sid, node, epoch, resumable (0/1), resume_ttl_ms
_RELEASE = _COMMON + """
local p, sid, node, epoch, resumable, rttl = unpack(ARGV)
local key = p .. 'session:' .. sid
local r = redis.call('HMGET', key, 'node', 'tenant', 'state', 'epoch')
if not r[1] or r[1] ~= node or tonumber(r[4] or 0) ~= tonumber(epoch) then return 0 end
redis.call('ZREM', p .. 'pending:' .. node, sid)
redis.call('SREM', p .. 'live:' .. node, sid)
if r[3] == 'live' and redis.call('EXISTS', p .. 'node:' .. node) == 1 then
  redis.call('HINCRBY', p .. 'node:' .. node, 'active', -1)
end
redis.call('ZREM', p .. 'tenant:' .. r[2], sid)
if resumable == '1' then
  redis.call('HSET', key, 'state', 'detached')
  redis.call('PEXPIRE', key, tonumber(rttl))
else
  redis.call('DEL', key)
end
return 1
"""

# ARGV: prefix, sid, token_hash, tenant, node, resume_ttl_ms
# A stream refused before it attached gives its reservation back: only a pending record of `node` whose token and
# tenant match. Never attached (epoch 0): deleted; a resume's reservation: detached again, for the resume TTL.
_GIVE_BACK = """
local p, sid, th, tenant, node, rttl = unpack(ARGV)
local key = p .. 'session:' .. sid
local r = redis.call('HMGET', key, 'node', 'tenant', 'token', 'state', 'epoch')
if not r[1] or r[1] ~= node or r[2] ~= tenant or r[3] ~= th or r[4] ~= 'pending' then return 0 end
redis.call('ZREM', p .. 'pending:' .. node, sid)
redis.call('ZREM', p .. 'tenant:' .. tenant, sid)
if tonumber(r[5] or 0) == 0 then
  redis.call('DEL', key)
else
  redis.call('HSET', key, 'state', 'detached')
  redis.call('PEXPIRE', key, tonumber(rttl))
end
return 1
"""

# ARGV: prefix, node, addr, state, capacity, active, node_ttl_ms, session_ttl_ms, resume_ttl_ms, grace_ms,
#       window_ms, stale_ms, then sid, epoch pairs of the sessions this node streams.
# Returns {missing, moved, behind, swept, tenant counts (flat name, n), serving nodes}:
#   missing: records gone (Redis lost its data: the node writes them back);
#   moved:   records that name another node or a newer epoch (the node ends its stream);
#   behind:  records with an older epoch than the stream's (attached while Redis was unreachable: written back);
#   swept:   live records of this node that it no longer streams (a release that never ran), detached here.
_HEARTBEAT = _COMMON + """
local p, node, addr, state, cap, active = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local nttl, sttl, rttl, grace = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
recovering(p, ARGV[11])
local now = now_ms()
-- The store's continuity: when no node at all has beaten for stale_ms, the store was away (or every node was):
-- nodes are not judged by their silence until stale_ms after it is back (see beating()).
if now - tonumber(redis.call('GET', p .. 'lastbeat') or 0) > tonumber(ARGV[12]) then
  redis.call('SET', p .. 'back', now)
end
redis.call('SET', p .. 'lastbeat', now)
local nkey = p .. 'node:' .. node
redis.call('HSET', nkey, 'addr', addr, 'state', state, 'capacity', cap, 'active', active, 'beat', now)
redis.call('PEXPIRE', nkey, nttl)
redis.call('SADD', p .. 'nodes', node)
local missing, moved, behind, swept = {}, {}, {}, {}
local held = {}
for i = 13, #ARGV, 2 do
  local sid, ep = ARGV[i], tonumber(ARGV[i + 1])
  held[sid] = true
  local key = p .. 'session:' .. sid
  local r = redis.call('HMGET', key, 'node', 'tenant', 'epoch')
  local rep = tonumber(r[3] or 0)
  if not r[1] then
    table.insert(missing, sid)
  elseif r[1] ~= node or rep > ep then
    table.insert(moved, sid)
  elseif rep < ep then
    table.insert(behind, sid)
  else
    redis.call('PEXPIRE', key, sttl)
    redis.call('SADD', p .. 'live:' .. node, sid)
    count_tenant(p, r[2], sid, sttl)
  end
end
local lkey = p .. 'live:' .. node
for _, sid in ipairs(redis.call('SMEMBERS', lkey)) do
  if not held[sid] then
    local key = p .. 'session:' .. sid
    local r = redis.call('HMGET', key, 'node', 'tenant', 'state', 'at')
    if not r[1] or r[1] ~= node or r[3] ~= 'live' then
      redis.call('SREM', lkey, sid)
    elseif now - tonumber(r[4] or 0) > grace then
      redis.call('HSET', key, 'state', 'detached')
      redis.call('PEXPIRE', key, rttl)
      redis.call('ZREM', p .. 'tenant:' .. r[2], sid)
      redis.call('SREM', lkey, sid)
      table.insert(swept, sid)
    end
  end
end
local counts = {}
for _, t in ipairs(redis.call('SMEMBERS', p .. 'tenants')) do
  local tkey = p .. 'tenant:' .. t
  redis.call('ZREMRANGEBYSCORE', tkey, '-inf', now)
  local n = redis.call('ZCARD', tkey)
  if n == 0 then redis.call('SREM', p .. 'tenants', t) else table.insert(counts, t); table.insert(counts, n) end
end
local serving = 0
for _, id in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  if redis.call('HGET', p .. 'node:' .. id, 'state') == 'serving' then serving = serving + 1 end
end
return {missing, moved, behind, swept, counts, serving}
"""

# ARGV: prefix, avatar_id, tenant, ttl_ms, quota; KEYS none. The image and context are ARGV[6], ARGV[7].
# Keeps at most `quota` avatars per tenant: the tenant's least recently used ones are removed first.
_PUT_AVATAR = """
local p, id, tenant, ttl, quota, image, ctx = unpack(ARGV)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = p .. 'avatar:' .. id
redis.call('HSET', key, 'tenant', tenant, 'image', image, 'context', ctx)
redis.call('PEXPIRE', key, tonumber(ttl))
local zkey = p .. 'avatars:' .. tenant
redis.call('ZADD', zkey, now, id)
redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now - tonumber(ttl))
local evicted = {}
local extra = redis.call('ZCARD', zkey) - tonumber(quota)
if tonumber(quota) > 0 and extra > 0 then
  for _, old in ipairs(redis.call('ZRANGE', zkey, 0, extra - 1)) do
    redis.call('DEL', p .. 'avatar:' .. old)
    redis.call('ZREM', zkey, old)
    table.insert(evicted, old)
  end
end
return evicted
"""


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class RedisRouter(Router):
    kind = "redis"

    def __init__(self, node: NodeInfo, limits: RoutingLimits, free_slots: Callable[[], int], *, url: str,
                 prefix: str = "af:", avatar_ttl_s: float = 7 * 86400.0, op_timeout_s: float = 0.5,
                 avatar_quota: int = 0) -> None:
        super().__init__(node, limits, free_slots)
        self.url = url
        self.prefix = prefix
        self.avatar_ttl_s = avatar_ttl_s
        self.avatar_quota = avatar_quota
        self.r = Redis.from_url(url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._claim = self.r.register_script(_CLAIM)
        self._resume = self.r.register_script(_RESUME)
        self._attach = self.r.register_script(_ATTACH)
        self._release = self.r.register_script(_RELEASE)
        self._give_back = self.r.register_script(_GIVE_BACK)
        self._heartbeat = self.r.register_script(_HEARTBEAT)
        self._put_avatar = self.r.register_script(_PUT_AVATAR)
        self._task: asyncio.Task[None] | None = None
        self.heartbeats = 0
        # What the last heartbeat saw: every tenant's pending and live sessions over all replicas, and
        # the serving replicas. While Redis is unreachable, a tenant with a limit gets at most its share
        # of the room it had left: (limit - count) // serving new sessions on each replica.
        self.tenant_counts: dict[str, int] = {}
        self.serving_nodes = 1
        self.viewed = False  # whether a heartbeat ever returned those counts
        self.outage_admitted: dict[str, int] = {}
        # Releases that Redis did not take (it was unreachable), replayed once it answers.
        self._unreleased: dict[str, tuple[int, bool]] = {}
        self.swept = 0  # live records released by the sweeper (their stream's release never ran)
        self.on_store_lost: Callable[[], Awaitable[None]] | None = None  # Redis came back without our records
        self._stopping = False

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.beat()
        except RedisError as e:  # start anyway: the heartbeat loop keeps trying
            self._down(e)
        self._task = asyncio.create_task(self._loop(), name="routing-heartbeat")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            # A cancellation that lands while a Redis command is timing out can be absorbed by the client, which then
            # raises its own timeout instead: the loop would go on (and this wait with it) but for ``_stopping``.
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:  # leave the registry at once rather than after the TTL
            await self.r.delete(self._k("node", self.node.node_id))
            await self.r.srem(self.prefix + "nodes", self.node.node_id)
        except RedisError:
            pass
        await self.r.aclose()

    async def set_draining(self) -> None:
        await super().set_draining()
        try:
            await self.beat()
        except RedisError as e:
            self._down(e)

    def _k(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    def _down(self, e: Exception) -> None:
        if self.healthy:
            log.warning("routing store unreachable: live sessions go on, new ones are placed here while there is "
                        "room", url=self.url, error=str(e))
            self.outage_admitted.clear()
        self.healthy = False

    async def _loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.limits.heartbeat_s)
            try:
                await self.beat()
            except RedisError as e:
                self._down(e)
            except Exception:
                log.exception("routing heartbeat failed")

    def _state(self) -> str:
        if self.draining:
            return DRAINING
        return SERVING if self.progressing() else STALLED

    async def beat(self) -> None:
        """Refreshes this node's entry and the records of the sessions it streams; writes back what Redis
        lost; ends the streams of sessions that moved; releases what a skipped release left behind."""
        for leaked in self.unheld():  # local copies the App no longer streams: their release never ran
            log.warning("releasing a session record its stream never released", session_id=leaked.session_id)
            self.local.pop(leaked.session_id, None)
            self._unreleased[leaked.session_id] = (leaked.epoch, True)
        await self._replay_releases()
        held = {sid: ep for sid, ep in self.held().items()
                if (r := self.local.get(sid)) is not None and r.epoch == ep}
        cap = self.node.capacity
        res = await self._heartbeat(args=[
            self.prefix, self.node.node_id, self.node.address, self._state(), cap, cap - self.free_slots(),
            int(self.limits.node_ttl_s * 1000), int(self.limits.session_ttl_s * 1000),
            int(self.limits.resume_ttl_s * 1000), int(self.limits.sweep_grace_s * 1000), self._window_ms(),
            self._stale_ms(), *[x for sid, ep in held.items() for x in (sid, ep)]])
        self.heartbeats += 1
        missing, moved, behind, swept = ([_s(x) for x in res[i]] for i in range(4))
        flat = [_s(x) for x in res[4]]
        self.tenant_counts = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
        self.serving_nodes = max(1, int(res[5]))
        self.viewed = True
        if missing or behind:
            await self._restore([self.local[s] for s in (*missing, *behind) if s in self.local])
        for sid in moved:
            rec = self.local.pop(sid, None)
            if rec is not None:
                log.warning("session moved to another replica; ending it here", session_id=sid)
                self.on_lost(sid)
        if swept:
            self.swept += len(swept)
            log.warning("released session records that no stream of this replica held", session_ids=swept)
        if not self.healthy:
            log.info("routing store reachable again", url=self.url, restored=len(missing) + len(behind))
            self.healthy = True
            self.outage_admitted.clear()
            pending = [r for r in self.local.values() if r.state == PENDING]
            if pending:
                await self._restore(pending)
        if missing and self.on_store_lost is not None:
            await self.on_store_lost()

    async def confirm(self) -> bool:
        try:
            await self.beat()
            return True
        except RedisError as e:
            self._down(e)
            return False

    async def _replay_releases(self) -> None:
        for sid, (epoch, resumable) in list(self._unreleased.items()):
            await self._release(args=[self.prefix, sid, self.node.node_id, epoch, int(resumable),
                                      int(self.limits.resume_ttl_s * 1000)])
            self._unreleased.pop(sid, None)

    async def _restore(self, recs: list[SessionRecord]) -> None:
        now_ms = int(time.time() * 1000)
        async with self.r.pipeline(transaction=True) as pipe:
            for rec in recs:
                key = self._k("session", rec.session_id)
                ttl = self.limits.session_ttl_s if rec.state == LIVE else self.limits.reservation_ttl_s
                pipe.hset(key, mapping={**rec.fields(), "at": str(now_ms)})  # type: ignore[dict-item]
                pipe.pexpire(key, int(ttl * 1000))
                pipe.zadd(self._k("tenant", rec.tenant), {rec.session_id: now_ms + int(ttl * 1000)})
                pipe.sadd(self.prefix + "tenants", rec.tenant)
                if rec.state == PENDING:
                    pipe.zadd(self._k("pending", rec.node_id), {rec.session_id: now_ms + int(ttl * 1000)})
                else:
                    pipe.sadd(self._k("live", rec.node_id), rec.session_id)
            await pipe.execute()

    # ---- placement -------------------------------------------------------------------------------
    def _local_new(self, tenant: str, tenant_limit: int, state: str) -> tuple[SessionRecord, str]:
        """Placement on this node alone (the store is down): only with a free slot here, and for a tenant
        with a limit only within its share of the room it had left at the last heartbeat."""
        if self.draining:
            raise Draining.store_unreachable()
        if self.local_free() <= 0:
            raise StoreDown.no_free_slot()
        if tenant_limit:
            # A replica that has never reached the store (it started during the outage) knows nothing of the
            # tenant's sessions elsewhere: no share at all.
            share = (tenant_limit - self.tenant_counts.get(tenant, 0)) // self.serving_nodes if self.viewed else 0
            if self.outage_admitted.get(tenant, 0) >= share:
                raise StoreDown.tenant_limit_unchecked(tenant)
        self.outage_admitted[tenant] = self.outage_admitted.get(tenant, 0) + 1
        return self._record_here(tenant, state)

    def _stale_ms(self) -> int:
        return int(self.limits.stale_s * 1000)

    def _window_ms(self) -> int:
        """How long after the store lost its data placements under a tenant limit wait: every replica writes its
        sessions back with its next heartbeat."""
        return int((2 * self.limits.heartbeat_s + 0.5) * 1000)

    async def _eval(self, script: Any, args: list[Any]) -> list[Any]:
        """Runs a placement script; while the store is recovering from a data loss (the replicas are writing their
        sessions back, a second or so), waits and runs it again rather than refusing the caller."""
        t_end = time.monotonic() + self._window_ms() / 1000 + 0.5
        while True:
            res = list(await script(args=args))
            if _s(res[0]) != "recovering" or time.monotonic() > t_end:
                return res
            await asyncio.sleep(0.1)

    async def create(self, tenant: str, tenant_limit: int) -> Placement:
        sid, token = new_session_id(), new_token()
        th = token_hash(token)
        ttl = self.limits.reservation_ttl_s
        try:
            res = [_s(x) for x in await self._eval(self._claim, [
                self.prefix, sid, tenant, th, tenant_limit, int(ttl * 1000), self.node.node_id, "", PENDING,
                self._stale_ms(), self._window_ms()])]
        except RedisError as e:
            self._down(e)
            rec, token = self._local_new(tenant, tenant_limit, PENDING)
            return Placement(rec.session_id, token, rec.node_id, rec.address, ttl)
        if res[0] == "recovering":
            raise StoreDown.recovering()
        if res[0] == "tenant_limit":
            raise Full.tenant_limit(tenant, tenant_limit)
        if res[0] == "full":
            raise Full.every_replica()
        node, addr = res[1], res[2]
        if node == self.node.node_id:
            self.local[sid] = SessionRecord(sid, tenant, th, node, addr, PENDING, time.monotonic() + ttl)
        return Placement(sid, token, node, addr, ttl)

    async def create_local(self, tenant: str, tenant_limit: int) -> tuple[SessionRecord, str]:
        if self.draining:
            raise Draining.no_new_sessions()
        sid, token = new_session_id(), new_token()
        th = token_hash(token)
        if self.local_free() <= 0:
            raise Full.replica(self.node.capacity)
        try:
            for attempt in range(2):
                res = [_s(x) for x in await self._eval(self._claim, [
                    self.prefix, sid, tenant, th, tenant_limit, int(self.limits.session_ttl_s * 1000),
                    self.node.node_id, self.node.node_id, LIVE, 1 << 40, self._window_ms()])]
                if res[0] != "full" or attempt:
                    break
                await self.beat()  # this node has room (checked above): Redis lost its entry (restarted, FLUSHALL)
        except RedisError as e:
            self._down(e)
            return self._local_new(tenant, tenant_limit, LIVE)
        if res[0] == "recovering":
            raise StoreDown.recovering()
        if res[0] == "tenant_limit":
            raise Full.tenant_limit(tenant, tenant_limit)
        if res[0] == "full":
            raise Full.replica(self.node.capacity)
        rec = SessionRecord(sid, tenant, th, self.node.node_id, self.node.address, LIVE, epoch=1,
                            attached_at=time.monotonic())
        self.local[sid] = rec
        return rec, token

    async def resume(self, session_id: str, token: str, tenant: str, tenant_limit: int = 0) -> Placement:
        th = token_hash(token)
        ttl = self.limits.reservation_ttl_s
        dead = ""
        t_end = time.monotonic() + self.limits.stale_s + 1.0
        try:
            while True:
                res = [_s(x) for x in await self._eval(self._resume, [
                    self.prefix, session_id, th, tenant, int(ttl * 1000), self.node.node_id, dead, tenant_limit,
                    self._stale_ms(), self._window_ms()])]
                if res[0] != "owner":
                    break
                owner, addr, age = res[1], res[2], float(res[3]) / 1000
                if owner == self.node.node_id:
                    return Placement(session_id, "", owner, addr, ttl, resumed=True)
                if not await reachable(addr):  # killed: its port refuses at once
                    log.warning("replica unreachable: moving its session", node_id=owner, address=addr,
                                session_id=session_id)
                    dead = owner
                    continue
                if age <= self.limits.suspect_s or time.monotonic() > t_end:
                    return Placement(session_id, "", owner, addr, ttl, resumed=True)
                # Its last heartbeat is late: it may be frozen (SIGSTOP, a stalled loop) though its port
                # still accepts. Ask again until a fresh heartbeat shows it alive, or the script finds it stale.
                await asyncio.sleep(0.1)
        except RedisError as e:
            self._down(e)
            rec = self.local.get(session_id)
            if rec is None:
                raise StoreDown.cannot(f"check where session {session_id} runs") from None
            rec = self._check_local(session_id, token, tenant)
            return Placement(session_id, "", rec.node_id, rec.address, ttl, resumed=True)
        if res[0] == "not_found":
            raise NotFound.session(session_id)
        if res[0] == "denied":
            raise Denied.token(session_id)
        if res[0] == "recovering":
            raise StoreDown.recovering()
        if res[0] == "tenant_limit":
            raise Full.tenant_limit(tenant, tenant_limit, resuming=True)
        if res[0] == "full":
            raise Full.every_replica(resuming=True)
        node, addr = res[1], res[2]
        old = self.local.get(session_id)
        if old is not None and node != self.node.node_id:
            self.local.pop(session_id, None)  # moved away from here: the heartbeat ends the stream if one runs
        if node == self.node.node_id:
            self.local[session_id] = SessionRecord(session_id, tenant, th, node, addr, PENDING,
                                                   time.monotonic() + ttl)
        return Placement(session_id, "", node, addr, ttl, resumed=True)

    async def attach(self, session_id: str, token: str, tenant: str, tenant_limit: int = 0) -> SessionRecord:
        th = token_hash(token)
        try:
            res = [_s(x) for x in await self._eval(self._attach, [
                self.prefix, session_id, th, tenant, self.node.node_id, int(self.limits.session_ttl_s * 1000),
                tenant_limit, self._window_ms()])]
        except RedisError as e:
            self._down(e)
            if session_id not in self.local:
                raise StoreDown.cannot(f"check who owns session {session_id}") from None
            rec = self._check_local(session_id, token, tenant)
            return self._attached(rec)  # Redis learns the new epoch from the heartbeat once it answers
        if res[0] == "denied":
            raise Denied.token(session_id)
        if res[0] == "not_owner":
            self.local.pop(session_id, None)
            raise NotOwner(session_id, res[1])
        if res[0] == "recovering":
            raise StoreDown.recovering()
        if res[0] == "tenant_limit":
            raise Full.tenant_limit(tenant, tenant_limit, resuming=True)
        if res[0] == "not_found":
            # Reserved here while Redis was down, or Redis lost its data: this node's copy decides.
            rec = self._check_local(session_id, token, tenant)
            rec = self._attached(rec)
            try:
                await self._restore([rec])
            except RedisError as e:
                self._down(e)
            return rec
        rec = self.local.get(session_id) or SessionRecord(session_id, tenant, th, self.node.node_id,
                                                          self.node.address)
        rec.epoch = int(res[1]) - 1
        return self._attached(rec)

    def _attached(self, rec: SessionRecord) -> SessionRecord:
        rec.state = LIVE
        rec.epoch += 1
        rec.attached_at = time.monotonic()
        self.local[rec.session_id] = rec
        self._unreleased.pop(rec.session_id, None)
        return dataclasses.replace(rec)

    async def release(self, session_id: str, epoch: int, resumable: bool) -> bool:
        if not self._drop_local(session_id, epoch) and session_id in self.local:
            return False  # a newer stream of this session holds it
        try:
            done = await self._release(args=[self.prefix, session_id, self.node.node_id, epoch, int(resumable),
                                             int(self.limits.resume_ttl_s * 1000)])
        except RedisError as e:  # replayed by the heartbeat once Redis answers
            self._down(e)
            self._unreleased[session_id] = (epoch, resumable)
            return True
        return bool(done)

    async def give_back(self, session_id: str, token: str, tenant: str) -> bool:
        if not token:
            return False
        mine = self._pending_local(session_id, token, tenant) is not None
        if mine:
            del self.local[session_id]
        try:
            done = await self._give_back(args=[self.prefix, session_id, token_hash(token), tenant, self.node.node_id,
                                               int(self.limits.resume_ttl_s * 1000)])
        except RedisError as e:  # the store's record (if any) expires with its reservation TTL
            self._down(e)
            return mine
        return bool(done) or mine

    # ---- avatars ---------------------------------------------------------------------------------
    async def put_avatar(self, avatar_id: str, tenant: str, image: bytes, text_context: bytes = b"") -> None:
        try:
            evicted = await self._put_avatar(args=[self.prefix, avatar_id, tenant, int(self.avatar_ttl_s * 1000),
                                                   self.avatar_quota, image, text_context])
        except RedisError as e:
            self._down(e)
            return
        if evicted:
            log.info("tenant over its avatar quota: least recently used avatars removed", tenant=tenant,
                     quota=self.avatar_quota, evicted=[_s(x) for x in evicted])

    async def get_avatar(self, avatar_id: str, tenant: str) -> tuple[bytes, bytes] | None:
        key = self._k("avatar", avatar_id)
        try:
            t, img, ctx = await self.r.hmget(key, ["tenant", "image", "context"])
            if img is None or _s(t) != tenant:
                return None
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.pexpire(key, int(self.avatar_ttl_s * 1000))
                pipe.zadd(self._k("avatars", tenant), {avatar_id: int(time.time() * 1000)})
                await pipe.execute()
            return _b(img), _b(ctx or b"")
        except RedisError as e:
            self._down(e)
            return None


def _b(v: bytes | str) -> bytes:
    return v if isinstance(v, bytes) else v.encode()


__all__ = ["RedisRouter", "NotOwner"]
