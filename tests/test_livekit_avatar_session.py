"""``avatarforcing_client.livekit.AvatarSession`` (the README's three lines) in a real LiveKit room.

Runs a real livekit-server (built into .tools/bin by scripts/install_livekit_server.sh; the tests skip,
saying so, without one), a real AvatarForcing server (the tiny model) and a real ``AgentSession`` of
livekit-agents whose speech comes from ``session.say(..., audio=...)`` (no TTS or LLM). A separate
participant, the viewer, subscribes with the rtc SDK and records what reaches it. Both modes: the
avatar inside the agent's process, and the avatar as its own participant publishing on the agent's
behalf; and ``examples/livekit_agent.py`` run as a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="livekit-agents is not installed (pip install '.[dev]')")

from livekit import api, rtc  # noqa: E402
from livekit.agents import Agent, AgentSession  # noqa: E402
from livekit.agents.voice.io import PlaybackFinishedEvent  # noqa: E402

from avatarforcing_client.livekit import DEFAULT_AVATAR_IDENTITY, AvatarSession  # noqa: E402
from avatarforcing_service.server import App  # noqa: E402

from .conftest import png_bytes, speechlike_pcm  # noqa: E402
from .test_livekit_adapter import (  # noqa: E402
    API_KEY,
    API_SECRET,
    README,
    ROOT,
    livekit_url,  # noqa: F401 (a fixture)
    readme_livekit_blocks,
)

AppFactory = Callable[..., "asyncio.Future[App]"]
RATE = 24000  # the agent's audio and AvatarSession's default session rate
LOUD = 300  # mean |sample| of a 10 ms frame that carries speech (speechlike_pcm peaks at 12000)


def room_token(identity: str, room: str, kind: str | None = None) -> str:
    t = api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_grants(
        api.VideoGrants(room_join=True, room=room))
    if kind:
        t = t.with_kind(kind)  # type: ignore[arg-type]
    return t.to_jwt()


async def frames(pcm: np.ndarray, rate: int = RATE) -> AsyncIterator[rtc.AudioFrame]:
    """What a TTS gives the agent session: 20 ms frames, as fast as they are asked for."""
    step = rate // 50
    for i in range(0, len(pcm), step):
        chunk = pcm[i : i + step]
        yield rtc.AudioFrame(chunk.tobytes(), rate, 1, len(chunk))


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Viewer:
    """A participant that subscribes to every track and records what reaches it, by publisher."""

    def __init__(self) -> None:
        self.room = rtc.Room()
        self.video: dict[str, list[tuple[float, int, int]]] = defaultdict(list)  # (arrival, width, height)
        self.audio: dict[str, list[tuple[float, float, float]]] = defaultdict(list)  # (arrival, seconds, mean |x|)
        self.tracks: dict[str, set[str]] = defaultdict(set)
        self._tasks: list[asyncio.Task[None]] = []
        self.room.on("track_subscribed", self._on_track)

    async def connect(self, url: str, room: str) -> None:
        await self.room.connect(url, room_token("viewer", room))

    def _on_track(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                  participant: rtc.RemoteParticipant) -> None:
        self.tracks[participant.identity].add(publication.name)
        self._tasks.append(asyncio.create_task(self._watch(track, participant.identity)))

    async def _watch(self, track: rtc.Track, who: str) -> None:
        if track.kind == rtc.TrackKind.KIND_VIDEO:
            async for ev in rtc.VideoStream(track):
                self.video[who].append((time.monotonic(), ev.frame.width, ev.frame.height))
        else:
            async for aev in rtc.AudioStream(track, sample_rate=RATE, num_channels=1):
                x = np.frombuffer(aev.frame.data, np.int16)
                self.audio[who].append((time.monotonic(), aev.frame.duration, float(np.abs(x).mean())))

    def loud_seconds(self, who: str, since: float) -> float:
        return sum(d for t, d, m in self.audio[who] if t >= since and m > LOUD)

    def video_since(self, who: str, since: float) -> int:
        return sum(1 for t, _, _ in self.video[who] if t >= since)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.room.disconnect()


# ---- the README's lines ----------------------------------------------------------------------------------
def readme_avatar_blocks() -> list[str]:
    """The LiveKit section's AvatarSession blocks: [in-process, separate participant]."""
    return [b for b in readme_livekit_blocks() if "AvatarSession(" in b]


def code_lines(block: str) -> list[str]:
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_livekit_is_three_lines() -> None:
    first, second = readme_avatar_blocks()
    assert code_lines(first) == [
        "from avatarforcing_client.livekit import AvatarSession",
        'avatar = AvatarSession(target="localhost:50051", image=open("face.png", "rb").read())',
        "await avatar.start(session, room=ctx.room)",
    ]
    assert len(code_lines(second)) == 2 and 'mode="participant"' in second
    # The project README shows the same lines.
    top = (ROOT / "README.md").read_text()
    item = re.search(r"\*\*LiveKit Agents\*\*.*?```python\n(.*?)```", top, re.S)
    assert item and textwrap.dedent(item.group(1)) == first


async def run_readme_lines(mode: str, session: AgentSession, room: rtc.Room, target: str) -> AvatarSession:
    """Run the README's block for ``mode`` as an agent's entrypoint would (``ctx.room`` is ``room``;
    ``face.png`` is in the working directory), with the test server's address."""
    first, second = readme_avatar_blocks()
    lines = code_lines(first)[:1] + code_lines(first if mode == "in_process" else second)[-2:]
    body = "\n".join(lines).replace('"localhost:50051"', repr(target))
    code = "async def entrypoint(session, ctx):\n" + textwrap.indent(body, "    ") + "\n    return avatar\n"
    ns: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), ns)
    avatar = await ns["entrypoint"](session, SimpleNamespace(room=room))
    assert isinstance(avatar, AvatarSession) and avatar.mode == mode
    return avatar


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["in_process", "participant"])
async def test_readme_avatar_session_in_a_real_room(mode: str, livekit_url: str, make_app: AppFactory,  # noqa: F811
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = await make_app()
    target = f"127.0.0.1:{app.port}"
    room_name = f"avatar-{mode}"
    (tmp_path / "face.png").write_bytes(png_bytes())
    monkeypatch.chdir(tmp_path)
    # What an agent worker's environment holds; the participant mode mints its token from them.
    monkeypatch.setenv("LIVEKIT_URL", livekit_url)
    monkeypatch.setenv("LIVEKIT_API_KEY", API_KEY)
    monkeypatch.setenv("LIVEKIT_API_SECRET", API_SECRET)

    viewer = Viewer()
    await viewer.connect(livekit_url, room_name)
    agent_room = rtc.Room()
    await agent_room.connect(livekit_url, room_token("agent", room_name, kind="agent"))
    session: AgentSession = AgentSession()
    avatar: AvatarSession | None = None
    try:
        avatar = await run_readme_lines(mode, session, agent_room, target)
        await session.start(agent=Agent(instructions="You are a test."), room=agent_room)
        publisher = "agent" if mode == "in_process" else DEFAULT_AVATAR_IDENTITY
        assert avatar.avatar_identity == publisher
        await avatar.wait_for_join(timeout=20)
        await wait_for(lambda: len(viewer.video[publisher]) >= 10, 20, "the avatar's video at the viewer")
        assert viewer.tracks[publisher] == {"avatar_video", "avatar_audio"}
        if mode == "participant":
            p = viewer.room.remote_participants[DEFAULT_AVATAR_IDENTITY]
            assert p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
            assert p.attributes.get("lk.publish_on_behalf") == "agent"
            assert not viewer.tracks["agent"], "the agent publishes no audio of its own: it goes to the avatar"
        gen = avatar.generator
        assert gen is not None and avatar.audio_output is not None
        finished: list[PlaybackFinishedEvent] = []
        avatar.audio_output.on("playback_finished", finished.append)

        # One utterance plays out: the agent hears its exact length back, the viewer sees and hears it.
        t0 = time.monotonic()
        frame0 = gen.last_frame_index
        handle = session.say("hello", audio=frames(speechlike_pcm(2.0, rate=RATE)))
        await asyncio.wait_for(handle.wait_for_playout(), 20)
        assert not handle.interrupted
        assert len(finished) == 1 and not finished[0].interrupted
        assert 2.0 <= finished[0].playback_position <= 2.0 + 0.32, finished[0]
        await wait_for(lambda: viewer.loud_seconds(publisher, t0) >= 1.0, 3, "the re-timed audio at the viewer")
        assert {(w, h) for _, w, h in viewer.video[publisher]} == {(gen.width, gen.height)} == {(128, 128)}
        # The generator yielded a video frame for every 40 ms of the speech; how many of them reach the viewer
        # depends on the machine's load (LiveKit's synchronizer drops frames that fall behind schedule).
        assert gen.last_frame_index - frame0 >= 2.0 * gen.fps, "a video frame for every 40 ms of speech"
        assert viewer.video_since(publisher, t0) >= 10, "the viewer sees the avatar while it speaks"

        # An interruption mid-utterance clears the avatar.
        sid = gen.session.session_id

        def server_session() -> Any:  # looked up each time: on a loaded machine the SDK may resume the stream
            return app.scheduler.sessions[sid]

        # Long enough that, on a loaded machine where playout callbacks lag the server by a second or more, the
        # server still holds speech it has not rendered when the interruption comes.
        long = speechlike_pcm(8.0, rate=RATE, seed=3)
        sent0, returned0 = gen.samples_sent, gen.samples_returned
        handle = session.say("a long answer", audio=frames(long))
        await wait_for(lambda: gen.samples_returned - returned0 >= RATE, 10, "1 s of the second utterance played")
        # The agent pushed it all (faster than real time): the server holds what it has not rendered.
        await wait_for(lambda: gen.samples_sent - sent0 == len(long)
                       and server_session().audio.received == gen.session.stream_audio_sent, 5, "the server has it all")
        assert server_session().audio.buffered > RATE
        await asyncio.wait_for(session.interrupt(), 10)
        await asyncio.wait_for(handle.wait_for_playout(), 10)
        assert handle.interrupted
        assert len(finished) == 2 and finished[1].interrupted, finished
        assert 0.9 <= finished[1].playback_position < 3.0, finished[1]
        assert gen.interrupts == 1
        # The server dropped the speech it had not rendered (played out, it would take several seconds more).
        await wait_for(lambda: server_session().audio.buffered == 0, 1.0, "the server to drop the buffered speech")
        await wait_for(lambda: not gen.muting, 5, "the audio rendered before the interruption to go by")
        t_quiet = time.monotonic() + 0.3  # what was on the wire before that
        await asyncio.sleep(1.5)
        assert gen.samples_sent - sent0 == len(long)
        assert len(long) - (gen.samples_returned - returned0) >= RATE, "the server played none of the dropped speech"
        assert viewer.loud_seconds(publisher, t_quiet) == 0, "the viewer hears silence after the interruption"
        await wait_for(lambda: viewer.video_since(publisher, t_quiet) >= 10, 10, "the viewer to see the idle avatar")
    finally:
        if avatar is not None:
            await avatar.aclose()
        with contextlib.suppress(Exception):
            await session.aclose()
        await agent_room.disconnect()
        await viewer.close()
    # avatar.aclose() (the job's shutdown) ends the server's session.
    await wait_for(lambda: gen.session.session_id not in app.scheduler.sessions, 5, "the server session to close")


# ---- examples/livekit_agent.py as a worker ------------------------------------------------------------
@pytest.mark.timeout(90)
async def test_example_worker_in_a_real_room(livekit_url: str, make_app: AppFactory,  # noqa: F811
                                             tmp_path: Path) -> None:
    app = await make_app()
    viewer = Viewer()
    await viewer.connect(livekit_url, "example")
    env = {**os.environ, "AVATARFORCING_TARGET": f"127.0.0.1:{app.port}", "LIVEKIT_URL": livekit_url,
           "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET}
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "livekit_agent.py"), "connect", "--room", "example",
            "--participant-identity", "example-agent", "--log-level", "info",
            cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        t0 = time.monotonic()

        def spoke() -> bool:
            assert proc.returncode is None, log_path.read_text()[-4000:]
            return viewer.loud_seconds("example-agent", t0) >= 3.0

        await wait_for(spoke, 60, "the example's avatar to speak")
        assert viewer.tracks["example-agent"] == {"avatar_video", "avatar_audio"}
        assert len(viewer.video["example-agent"]) >= 25
        assert {(w, h) for _, w, h in viewer.video["example-agent"]} == {(128, 128)}
        assert len(app.scheduler.sessions) == 1
        # The room goes away: the job shuts down, and the avatar's shutdown callback ends its session.
        async with api.LiveKitAPI(livekit_url, API_KEY, API_SECRET) as lk:
            await lk.room.delete_room(api.DeleteRoomRequest(room="example"))
        await wait_for(lambda: not app.scheduler.sessions, 15, "the job's shutdown to close the avatar's session")
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await viewer.close()
