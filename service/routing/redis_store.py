"""The Redis router: a node registry with heartbeats, session ownership with TTLs, and least-loaded
placement claimed atomically by Lua scripts (each script runs as one atomic step in Redis).

Keys (``prefix`` defaults to ``af:``; all scripts address keys they compute, so this needs one
Redis, not a cluster):

- ``af:nodes``               SET   ids of registered nodes (dead members are pruned by the scripts)
- ``af:node:{id}``           HASH  addr, state (serving|draining), capacity, active; TTL node_ttl,
                                   refreshed by the node's heartbeat
- ``af:pending:{id}``        ZSET  sessions reserved on node id, score = reservation expiry (ms)
- ``af:session:{sid}``       HASH  node, addr, tenant, token (sha256), state; TTL: reservation_ttl
                                   (pending), session_ttl refreshed by the owner's heartbeat (live),
                                   resume_ttl (detached)
- ``af:tenant:{tenant}``     ZSET  the tenant's sessions, score = expiry (ms): per-tenant limits
- ``af:avatar:{id}``         HASH  tenant, image; TTL avatar_ttl, refreshed on use
"""

from __future__ import annotations

import asyncio
import time
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
    Denied,
    Draining,
    Full,
    NotFound,
    NotOwner,
    Placement,
    Router,
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
-- The serving node with the most free slots (capacity - active - live reservations), ties to
-- `prefer`; nil when every node is full, draining or gone. Prunes nodes whose entry expired.
local function pick(p, prefer, only)
  local best, best_free, best_addr = nil, 0, nil
  local now = now_ms()
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
    local h = redis.call('HMGET', p .. 'node:' .. id, 'addr', 'state', 'capacity', 'active')
    if not h[1] then
      redis.call('SREM', p .. 'nodes', id)
      redis.call('DEL', p .. 'pending:' .. id)
    elseif h[2] == 'serving' and (only == '' or id == only) then
      redis.call('ZREMRANGEBYSCORE', p .. 'pending:' .. id, '-inf', now)
      local free = tonumber(h[3]) - tonumber(h[4]) - redis.call('ZCARD', p .. 'pending:' .. id)
      if free > best_free or (free == best_free and free > 0 and id == prefer) then
        best, best_free, best_addr = id, free, h[1]
      end
    end
  end
  return best, best_addr
end
"""

# ARGV: prefix, sid, tenant, token_hash, tenant_limit, ttl_ms, prefer, only, state
_CLAIM = _COMMON + """
local p, sid, tenant, th, limit, ttl, prefer, only, state = unpack(ARGV)
ttl = tonumber(ttl)
local now = now_ms()
local tkey = p .. 'tenant:' .. tenant
redis.call('ZREMRANGEBYSCORE', tkey, '-inf', now)
if tonumber(limit) > 0 and redis.call('ZCARD', tkey) >= tonumber(limit) then return {'tenant_limit'} end
local node, addr = pick(p, prefer, only)
if not node then return {'full'} end
if state == 'pending' then
  redis.call('ZADD', p .. 'pending:' .. node, now + ttl, sid)
else
  redis.call('HINCRBY', p .. 'node:' .. node, 'active', 1)
end
local key = p .. 'session:' .. sid
redis.call('HSET', key, 'node', node, 'addr', addr, 'tenant', tenant, 'token', th, 'state', state)
redis.call('PEXPIRE', key, ttl)
redis.call('ZADD', tkey, now + ttl, sid)
return {'ok', node, addr}
"""

# ARGV: prefix, sid, token_hash, tenant, ttl_ms, prefer, dead_node
_RESUME = _COMMON + """
local p, sid, th, tenant, ttl, prefer, dead = unpack(ARGV)
ttl = tonumber(ttl)
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
local ostate = redis.call('HGET', p .. 'node:' .. owner, 'state')
if ostate == 'serving' and state ~= 'detached' then return {'owner', owner, oaddr} end
if ostate ~= 'serving' then prefer = prefer else prefer = owner end
local node, addr = pick(p, prefer, '')
if not node then return {'full'} end
local now = now_ms()
redis.call('ZREM', p .. 'pending:' .. owner, sid)
redis.call('ZADD', p .. 'pending:' .. node, now + ttl, sid)
redis.call('HSET', key, 'node', node, 'addr', addr, 'state', 'pending')
redis.call('PEXPIRE', key, ttl)
redis.call('ZADD', p .. 'tenant:' .. tenant, now + ttl, sid)
return {'moved', node, addr}
"""

# ARGV: prefix, sid, token_hash, tenant, node, ttl_ms
_ATTACH = _COMMON + """
local p, sid, th, tenant, node, ttl = unpack(ARGV)
ttl = tonumber(ttl)
local key = p .. 'session:' .. sid
local r = redis.call('HMGET', key, 'node', 'addr', 'tenant', 'token', 'state')
if not r[1] then return {'not_found'} end
if r[4] ~= th or r[3] ~= tenant then return {'denied'} end
if r[1] ~= node then return {'not_owner', r[2]} end
if r[5] == 'detached' then return {'detached'} end
redis.call('ZREM', p .. 'pending:' .. node, sid)
if r[5] ~= 'live' and redis.call('EXISTS', p .. 'node:' .. node) == 1 then
  redis.call('HINCRBY', p .. 'node:' .. node, 'active', 1)
end
redis.call('HSET', key, 'state', 'live')
redis.call('PEXPIRE', key, ttl)
redis.call('ZADD', p .. 'tenant:' .. tenant, now_ms() + ttl, sid)
return {'ok'}
"""

# ARGV: prefix, sid, node, resumable (0/1), resume_ttl_ms
_RELEASE = _COMMON + """
local p, sid, node, resumable, rttl = unpack(ARGV)
local key = p .. 'session:' .. sid
local r = redis.call('HMGET', key, 'node', 'tenant', 'state')
if not r[1] or r[1] ~= node then return 0 end
redis.call('ZREM', p .. 'pending:' .. node, sid)
if r[3] == 'live' and redis.call('EXISTS', p .. 'node:' .. node) == 1 then
  redis.call('HINCRBY', p .. 'node:' .. node, 'active', -1)
end
if resumable == '1' then
  redis.call('HSET', key, 'state', 'detached')
  redis.call('PEXPIRE', key, tonumber(rttl))
  redis.call('ZADD', p .. 'tenant:' .. r[2], now_ms() + tonumber(rttl), sid)
else
  redis.call('DEL', key)
  redis.call('ZREM', p .. 'tenant:' .. r[2], sid)
end
return 1
"""

# ARGV: prefix, node, addr, state, capacity, active, node_ttl_ms, session_ttl_ms, sid...
# Returns {missing, moved}: live sessions of this node whose record is gone (Redis lost its data:
# the node writes them back) or now names another node (the session moved: the node ends it).
_HEARTBEAT = _COMMON + """
local p, node, addr, state, cap, active, nttl, sttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
  tonumber(ARGV[7]), tonumber(ARGV[8])
local nkey = p .. 'node:' .. node
redis.call('HSET', nkey, 'addr', addr, 'state', state, 'capacity', cap, 'active', active)
redis.call('PEXPIRE', nkey, nttl)
redis.call('SADD', p .. 'nodes', node)
local now = now_ms()
local missing, moved = {}, {}
for i = 9, #ARGV do
  local sid = ARGV[i]
  local key = p .. 'session:' .. sid
  local r = redis.call('HMGET', key, 'node', 'tenant')
  if not r[1] then
    table.insert(missing, sid)
  elseif r[1] ~= node then
    table.insert(moved, sid)
  else
    redis.call('PEXPIRE', key, sttl)
    redis.call('ZADD', p .. 'tenant:' .. r[2], now + sttl, sid)
  end
end
return {missing, moved}
"""


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class RedisRouter(Router):
    kind = "redis"

    def __init__(self, node, limits, free_slots, *, url: str, prefix: str = "af:",  # type: ignore[no-untyped-def]
                 avatar_ttl_s: float = 7 * 86400.0, op_timeout_s: float = 0.5) -> None:
        super().__init__(node, limits, free_slots)
        self.url = url
        self.prefix = prefix
        self.avatar_ttl_s = avatar_ttl_s
        self.r = Redis.from_url(url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._claim = self.r.register_script(_CLAIM)
        self._resume = self.r.register_script(_RESUME)
        self._attach = self.r.register_script(_ATTACH)
        self._release = self.r.register_script(_RELEASE)
        self._heartbeat = self.r.register_script(_HEARTBEAT)
        self._task: asyncio.Task[None] | None = None
        self.heartbeats = 0

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.beat()
        except RedisError as e:  # start anyway: the heartbeat loop keeps trying
            self._down(e)
        self._task = asyncio.create_task(self._loop(), name="routing-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
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
        self.healthy = False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.heartbeat_s)
            try:
                await self.beat()
            except RedisError as e:
                self._down(e)
            except Exception:
                log.exception("routing heartbeat failed")

    async def beat(self) -> None:
        """Refreshes this node's entry and its live sessions' records; writes back what Redis lost."""
        live = [r for r in self.local.values() if r.state == LIVE]
        cap = self.node.capacity
        res = await self._heartbeat(args=[
            self.prefix, self.node.node_id, self.node.address, DRAINING if self.draining else SERVING, cap,
            cap - self.free_slots(), int(self.limits.node_ttl_s * 1000), int(self.limits.session_ttl_s * 1000),
            *[r.session_id for r in live]])
        self.heartbeats += 1
        missing, moved = [_s(x) for x in res[0]], [_s(x) for x in res[1]]
        if missing:
            await self._restore([self.local[s] for s in missing if s in self.local])
        for sid in moved:
            rec = self.local.pop(sid, None)
            if rec is not None:
                log.warning("session moved to another replica; ending it here", session_id=sid)
                self.on_lost(sid)
        if not self.healthy:
            log.info("routing store reachable again", url=self.url, restored=len(missing))
            self.healthy = True
            pending = [r for r in self.local.values() if r.state == PENDING]
            if pending:
                await self._restore(pending)

    async def _restore(self, recs: list[SessionRecord]) -> None:
        now_ms = int(time.time() * 1000)
        async with self.r.pipeline(transaction=True) as pipe:
            for rec in recs:
                key = self._k("session", rec.session_id)
                ttl = self.limits.session_ttl_s if rec.state == LIVE else self.limits.reservation_ttl_s
                pipe.hset(key, mapping=dict(rec.fields()))  # type: ignore[arg-type]
                pipe.pexpire(key, int(ttl * 1000))
                pipe.zadd(self._k("tenant", rec.tenant), {rec.session_id: now_ms + int(ttl * 1000)})
                if rec.state == PENDING:
                    pipe.zadd(self._k("pending", rec.node_id), {rec.session_id: now_ms + int(ttl * 1000)})
            await pipe.execute()

    # ---- placement -------------------------------------------------------------------------------
    def _local_new(self, tenant: str, tenant_limit: int, state: str) -> tuple[SessionRecord, str]:
        """Placement on this node alone (the store is down): only with a free slot here."""
        if self.draining:
            raise Draining("this replica is draining and the routing store (Redis) is unreachable; retry shortly")
        if self.local_free() <= 0:
            raise StoreDown("the routing store (Redis) is unreachable and this replica has no free slot; retry "
                            "shortly")
        if tenant_limit and sum(1 for r in self.local.values() if r.tenant == tenant) >= tenant_limit:
            raise Full(f"tenant {tenant!r} already has {tenant_limit} sessions, its limit; end one first")
        return self._record_here(tenant, state)

    async def create(self, tenant: str, tenant_limit: int) -> Placement:
        sid, token = new_session_id(), new_token()
        th = token_hash(token)
        ttl = self.limits.reservation_ttl_s
        try:
            res = [_s(x) for x in await self._claim(args=[
                self.prefix, sid, tenant, th, tenant_limit, int(ttl * 1000), self.node.node_id, "", PENDING])]
        except RedisError as e:
            self._down(e)
            rec, token = self._local_new(tenant, tenant_limit, PENDING)
            return Placement(rec.session_id, token, rec.node_id, rec.address, ttl)
        if res[0] == "tenant_limit":
            raise Full(f"tenant {tenant!r} already has {tenant_limit} sessions, its limit; end one first")
        if res[0] == "full":
            raise Full("every replica is full or draining; retry later")
        node, addr = res[1], res[2]
        if node == self.node.node_id:
            self.local[sid] = SessionRecord(sid, tenant, th, node, addr, PENDING, time.monotonic() + ttl)
        return Placement(sid, token, node, addr, ttl)

    async def create_local(self, tenant: str, tenant_limit: int) -> tuple[SessionRecord, str]:
        if self.draining:
            raise Draining("this replica is draining and takes no new sessions; connect to another")
        sid, token = new_session_id(), new_token()
        th = token_hash(token)
        if self.local_free() <= 0:
            raise Full(f"all {self.node.capacity} session slots of this replica are in use or reserved; retry later "
                       "or on another replica")
        try:
            res = [_s(x) for x in await self._claim(args=[
                self.prefix, sid, tenant, th, tenant_limit, int(self.limits.session_ttl_s * 1000), self.node.node_id,
                self.node.node_id, LIVE])]
        except RedisError as e:
            self._down(e)
            return self._local_new(tenant, tenant_limit, LIVE)
        if res[0] == "tenant_limit":
            raise Full(f"tenant {tenant!r} already has {tenant_limit} sessions, its limit; end one first")
        if res[0] == "full":
            raise Full(f"all {self.node.capacity} session slots of this replica are in use or reserved; retry later "
                       "or on another replica")
        rec = SessionRecord(sid, tenant, th, self.node.node_id, self.node.address, LIVE)
        self.local[sid] = rec
        return rec, token

    async def resume(self, session_id: str, token: str, tenant: str) -> Placement:
        th = token_hash(token)
        ttl = self.limits.reservation_ttl_s
        dead = ""
        try:
            for _ in range(3):
                res = [_s(x) for x in await self._resume(args=[
                    self.prefix, session_id, th, tenant, int(ttl * 1000), self.node.node_id, dead])]
                if res[0] == "owner":
                    owner, addr = res[1], res[2]
                    if owner == self.node.node_id or await reachable(addr):
                        return Placement(session_id, "", owner, addr, ttl, resumed=True)
                    log.warning("replica unreachable: moving its session", node_id=owner, address=addr,
                                session_id=session_id)
                    dead = owner
                    continue
                break
        except RedisError as e:
            self._down(e)
            rec = self._check_local(session_id, token, tenant)
            return Placement(session_id, "", rec.node_id, rec.address, ttl, resumed=True)
        if res[0] == "not_found":
            raise NotFound(f"session {session_id} is unknown or expired; create a new one")
        if res[0] == "denied":
            raise Denied(f"the session token does not match session {session_id}")
        if res[0] == "full":
            raise Full("every replica is full or draining; cannot resume the session now, retry shortly")
        node, addr = res[1], res[2]
        if node == self.node.node_id:
            self.local[session_id] = SessionRecord(session_id, tenant, th, node, addr, PENDING,
                                                   time.monotonic() + ttl)
        return Placement(session_id, "", node, addr, ttl, resumed=True)

    async def attach(self, session_id: str, token: str, tenant: str) -> SessionRecord:
        th = token_hash(token)
        try:
            res = [_s(x) for x in await self._attach(args=[
                self.prefix, session_id, th, tenant, self.node.node_id, int(self.limits.session_ttl_s * 1000)])]
        except RedisError as e:
            self._down(e)
            if session_id not in self.local:
                raise StoreDown("cannot check who owns this session: the routing store (Redis) is unreachable; "
                                "retry shortly") from None
            rec = self._check_local(session_id, token, tenant)
            rec.state = LIVE
            return rec
        if res[0] == "denied":
            raise Denied(f"the session token does not match session {session_id}")
        if res[0] == "not_owner":
            self.local.pop(session_id, None)
            raise NotOwner(session_id, res[1])
        if res[0] == "detached":
            raise NotFound(f"session {session_id} is detached; resume it with CreateSession first")
        if res[0] == "not_found":
            # Reserved here while Redis was down, or Redis lost its data: this node's copy decides.
            rec = self._check_local(session_id, token, tenant)
            rec.state = LIVE
            try:
                await self._restore([rec])
            except RedisError as e:
                self._down(e)
            return rec
        rec = self.local.get(session_id) or SessionRecord(session_id, tenant, th, self.node.node_id,
                                                          self.node.address)
        rec.state = LIVE
        self.local[session_id] = rec
        return rec

    async def release(self, session_id: str, resumable: bool) -> None:
        self.local.pop(session_id, None)
        try:
            await self._release(args=[self.prefix, session_id, self.node.node_id, int(resumable),
                                      int(self.limits.resume_ttl_s * 1000)])
        except RedisError as e:  # the record expires on its own
            self._down(e)

    # ---- avatars ---------------------------------------------------------------------------------
    async def put_avatar(self, avatar_id: str, tenant: str, image: bytes, text_context: bytes = b"") -> None:
        key = self._k("avatar", avatar_id)
        try:
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"tenant": tenant, "image": image, "context": text_context})
                pipe.pexpire(key, int(self.avatar_ttl_s * 1000))
                await pipe.execute()
        except RedisError as e:
            self._down(e)

    async def get_avatar(self, avatar_id: str, tenant: str) -> tuple[bytes, bytes] | None:
        key = self._k("avatar", avatar_id)
        try:
            t, img, ctx = await self.r.hmget(key, ["tenant", "image", "context"])
            if img is None or _s(t) != tenant:
                return None
            await self.r.pexpire(key, int(self.avatar_ttl_s * 1000))
            return _b(img), _b(ctx or b"")
        except RedisError as e:
            self._down(e)
            return None


def _b(v: bytes | str) -> bytes:
    return v if isinstance(v, bytes) else v.encode()


__all__ = ["RedisRouter", "NotOwner"]
