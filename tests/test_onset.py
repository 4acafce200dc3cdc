"""Speech onset: audio that comes far ahead of a REALTIME session's timeline (a TTS burst after silence or an
interrupt) re-plans the frames not yet shown, so the utterance starts within about a block instead of after the
look-ahead; audio streamed in real time never re-plans. A real server on 127.0.0.1 and real clients; every
assertion is on frame and audio indices (which frame carries the utterance, continuity), none on wall time.

How a test knows where "now" is on the timeline without reading a clock: REALTIME frames are sent at their due
time, so when the client holds frame n, frame n is the one due; the burst goes out at that moment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import pytest

from avatarforcing_client import pb, pb_grpc
from avatarforcing_service.audio_in import AudioInput
from avatarforcing_service.codecs import EncodedFrame, make_encoder
from avatarforcing_service.server import App
from avatarforcing_service.session import Session, Timeline
from avatarforcing_service.spec import check_config

from .conftest import speechlike_pcm

AppFactory = Callable[..., Awaitable[App]]
FPB, L, RATE = 4, 4, 16000  # tiny config: 4 frames (160 ms) a block, a window of 4 blocks
SPF = RATE // 25  # audio samples per video frame
pytestmark = pytest.mark.timeout(120)
# A burst's first chunk holds the window's worth of audio (L blocks), so the server sees the whole look-ahead in
# one message: a step due while a burst of small chunks is still arriving would take part of it as real-time
# audio (and not re-plan), which these tests keep out of the way.
BURST_MS = 1000
LEAD = 0.2  # a warm-up's duration, as the scheduler estimates it (unit tests of the session)
# A server re-plans only when the frames it has queued cover the warm-up but for a block (Session.replan_due); an
# idle session's queue holds about half the processing budget. A roomy budget lets the re-plan happen on a slow or
# loaded test machine too, whose L steps may take longer than the default budget's 120 ms plus a block.
ROOMY_BUDGET_MS = 1000.0


def config(png: bytes, encoding: int = pb.VIDEO_ENCODING_JPEG) -> pb.StreamRequest:
    return pb.StreamRequest(config=pb.SessionConfig(
        reference_image=png, audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=RATE,
                                                         channels=1),
        video_encoding=encoding, pacing=pb.PACING_REALTIME))


def chunks(pcm: np.ndarray, ms: int) -> list[pb.StreamRequest]:
    n = RATE * ms // 1000
    return [pb.StreamRequest(audio=pb.AudioChunk(data=pcm[i : i + n].tobytes())) for i in range(0, len(pcm), n)]


INTERRUPT = pb.StreamRequest(interrupt=pb.Interrupt())


@dataclasses.dataclass
class Run:
    """One stream's responses as they come, and a way for its requests to wait for them."""

    resps: list[pb.StreamResponse] = dataclasses.field(default_factory=list)
    seen: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    marks: list[int] = dataclasses.field(default_factory=list)  # the frame held when each burst went out

    def last_frame(self) -> int:
        return max((r.frame.index for r in self.resps if r.HasField("frame")), default=-1)

    async def until_frame(self, index: int) -> int:
        while self.last_frame() < index:
            self.seen.clear()
            await self.seen.wait()
        self.marks.append(self.last_frame())
        return self.marks[-1]

    @property
    def frames(self) -> list[pb.VideoFrame]:
        return [r.frame for r in self.resps if r.HasField("frame")]

    @property
    def audio(self) -> list[pb.AudioOut]:
        return [r.audio for r in self.resps if r.HasField("audio")]

    @property
    def stats(self) -> list[pb.Stats]:
        return [r.stats for r in self.resps if r.HasField("stats")]

    def first_real_frames(self) -> list[int]:
        """The index of the first frame carrying client audio of each utterance (after silence)."""
        out, prev = [], False
        for a in self.audio:
            real = a.real_samples > 0
            if real and not prev:
                out.append(a.block_index * FPB + a.real_offset // SPF)
            prev = real
        return out


async def stream(app: App, png: bytes, script: Callable[[Run], AsyncIterator[pb.StreamRequest]],
                 encoding: int = pb.VIDEO_ENCODING_JPEG) -> Run:
    run = Run()

    async def reqs() -> AsyncIterator[pb.StreamRequest]:
        yield config(png, encoding)
        async for r in script(run):
            yield r

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        async for r in pb_grpc.AvatarForcingStub(ch).Stream(reqs()):
            run.resps.append(r)
            run.seen.set()
    return run


def assert_one_timeline(run: Run) -> None:
    """Frames and their audio form one continuous timeline: no jump, no duplicate, audio aligned."""
    idx = [f.index for f in run.frames]
    assert idx == list(range(len(idx)))
    assert [f.pts_us for f in run.frames] == [i * 40000 for i in idx]
    assert all(f.audio_start_sample == f.index * SPF for f in run.frames)
    blocks = [a.block_index for a in run.audio]
    assert blocks == list(range(len(blocks)))
    assert all(a.start_sample == a.block_index * FPB * SPF for a in run.audio)
    # Each block's AudioOut goes out before its frames (the utterance's audio starts with its first frame).
    order = [(r.audio.block_index, -1) if r.HasField("audio") else (r.frame.index // FPB, r.frame.index)
             for r in run.resps if r.HasField("audio") or r.HasField("frame")]
    assert order == sorted(order)


def onset_bound(app: App) -> int:
    """Frames from the one held when a burst went out to the burst's first: the warm-up (L steps and an encode, as
    the server measures them), then the block in progress and the next boundary. Without a re-plan it is more than
    the look-ahead, (L - 1) blocks, plus the part of the processing budget queued ahead (a roomy one here)."""
    return math.ceil(app.scheduler.onset_lead_s() * 25) + 2 * FPB


def real_audio(run: Run) -> np.ndarray:
    parts = [np.frombuffer(a.data, "<i2")[a.real_offset : a.real_offset + a.real_samples] for a in run.audio]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)


async def test_burst_after_idle_starts_within_a_block(make_app: AppFactory, png: bytes) -> None:
    app = await make_app(processing_budget_ms=ROOMY_BUDGET_MS)
    pcm = speechlike_pcm(2.0, seed=1)

    async def script(run: Run) -> AsyncIterator[pb.StreamRequest]:
        await run.until_frame(12)  # idle: a few blocks of silence are out, the window is full of it
        for r in chunks(pcm, BURST_MS):  # the whole utterance at once
            yield r

    run = await stream(app, png, script)
    started = run.resps[0].started
    assert started.onset_latency_ms < started.latency_ms
    (first,) = run.first_real_frames()
    # The frame held when the burst went out is the one due; the utterance starts at the first block boundary
    # after the warm-up (not after the look-ahead).
    assert first - run.marks[0] <= onset_bound(app)
    assert_one_timeline(run)
    assert np.array_equal(real_audio(run), pcm)  # the client's own samples, in order, none lost
    assert run.stats[-1].onsets == 1 and run.stats[-1].onset_latency_ms > 0
    assert app.metrics.registry.get_sample_value("avatarforcing_onset_latency_seconds_count") == 1


async def test_without_replan_the_burst_waits_for_the_lookahead(make_app: AppFactory, png: bytes) -> None:
    app = await make_app(onset_replan=False)
    pcm = speechlike_pcm(2.0, seed=1)

    async def script(run: Run) -> AsyncIterator[pb.StreamRequest]:
        await run.until_frame(12)
        for r in chunks(pcm, BURST_MS):
            yield r

    run = await stream(app, png, script)
    started = run.resps[0].started
    assert started.onset_latency_ms == started.latency_ms
    (first,) = run.first_real_frames()
    assert first - run.marks[0] >= (L - 1) * FPB  # the window's blocks planned on silence are shown first
    assert_one_timeline(run)
    assert np.array_equal(real_audio(run), pcm)
    assert run.stats[-1].onsets == 0 and run.stats[-1].onset_latency_ms == 0
    assert not app.metrics.registry.get_sample_value("avatarforcing_onset_latency_seconds_count")


async def test_audio_streamed_in_real_time_never_replans(make_app: AppFactory, png: bytes) -> None:
    """A live person: 40 ms of audio every 40 ms. The future is unknown, so the latency stays the look-ahead."""
    app = await make_app()
    pcm = speechlike_pcm(2.0, seed=2)

    async def script(run: Run) -> AsyncIterator[pb.StreamRequest]:
        await run.until_frame(12)
        for r in chunks(pcm, 40):
            yield r
            await asyncio.sleep(0.04)

    run = await stream(app, png, script)
    (first,) = run.first_real_frames()
    assert first - run.marks[0] >= (L - 1) * FPB
    assert_one_timeline(run)
    assert np.array_equal(real_audio(run), pcm)
    assert run.stats[-1].onsets == 0


@pytest.mark.parametrize("encoding", [pb.VIDEO_ENCODING_JPEG, pb.VIDEO_ENCODING_H264])
async def test_burst_after_an_interrupt_replans_too(make_app: AppFactory, png: bytes, encoding: int) -> None:
    app = await make_app(processing_budget_ms=ROOMY_BUDGET_MS)
    first_pcm, second_pcm = speechlike_pcm(3.0, seed=3), speechlike_pcm(1.5, seed=4)

    async def script(run: Run) -> AsyncIterator[pb.StreamRequest]:
        await run.until_frame(12)
        for r in chunks(first_pcm, BURST_MS):
            yield r
        start = run.first_real_frames()
        while not start:  # the first utterance is on screen
            await run.until_frame(run.last_frame() + 1)
            start = run.first_real_frames()
        await run.until_frame(start[0] + 2 * FPB)
        yield INTERRUPT  # barge-in: the rest of the first utterance is dropped, the next reply comes at once
        for r in chunks(second_pcm, BURST_MS):
            yield r

    run = await stream(app, png, script, encoding)
    # The reply's first block: the one whose client audio is the reply's start.
    n = FPB * SPF
    (reply,) = [a for a in run.audio if a.real_samples == n and
                np.array_equal(np.frombuffer(a.data, "<i2"), second_pcm[:n])]
    # The interrupted speech's queued blocks go out until the reply is ready, which takes the place of those not
    # yet sent; the window's blocks, silenced by the interrupt, are re-planned: the reply follows at once (a
    # silent block from a step that ran as the interrupt and the reply came in may lie between), not after the
    # window's L - 1 silent blocks.
    last_spoken = max(a.block_index for a in run.audio if a.real_samples and a.block_index < reply.block_index)
    assert reply.block_index - last_spoken - 1 < L - 1
    # H.264: the blocks given back may have been dropped unsent, so the reply starts with a keyframe.
    (first,) = [f for f in run.frames if f.index == reply.block_index * FPB]
    assert first.keyframe or encoding != pb.VIDEO_ENCODING_H264
    assert_one_timeline(run)
    assert np.array_equal(real_audio(run)[-len(second_pcm):], second_pcm)
    assert run.stats[-1].onsets == 2


async def test_a_burst_keeps_other_sessions_on_their_cadence(make_app: AppFactory, png: bytes) -> None:
    app = await make_app(processing_budget_ms=ROOMY_BUDGET_MS)
    pcm = speechlike_pcm(2.0, seed=5)
    done = asyncio.Event()

    async def bursting(run: Run) -> AsyncIterator[pb.StreamRequest]:
        await run.until_frame(12)
        for r in chunks(pcm, BURST_MS):
            yield r

    async def quiet(run: Run) -> AsyncIterator[pb.StreamRequest]:
        await done.wait()
        return
        yield  # an async generator that sends nothing

    async def burst_then_release() -> Run:
        try:
            return await stream(app, png, bursting)
        finally:
            done.set()

    other, burst = await asyncio.gather(stream(app, png, quiet), burst_then_release())
    assert burst.first_real_frames()[0] - burst.marks[0] <= onset_bound(app)
    assert_one_timeline(burst)
    # The quiet session: every frame of its timeline, in order, none dropped, and no re-plan of its own.
    assert_one_timeline(other)
    assert len(other.frames) >= len(burst.frames) - 2 * FPB
    assert other.stats[-1].frames_dropped == 0 and other.stats[-1].onsets == 0


# ---- the session's re-plan, step by step (no engine, no clock) -------------------------------------------------
def unit_session(replan: bool = True) -> Session:
    spec = check_config(pb.SessionConfig(video_encoding=pb.VIDEO_ENCODING_JPEG, pacing=pb.PACING_REALTIME,
                                         avatar_id="a"), model_rate=RATE, fps=25.0)
    return Session(id="s", spec=spec, slot=0, audio=AudioInput(RATE, RATE, FPB, 25.0, 1000, 60),
                   encoder=make_encoder(pb.VIDEO_ENCODING_JPEG, 64, 64, 25.0),
                   timeline=Timeline(25.0, FPB, L, 0.24, onset_replan=replan), queue_frames=50, max_blocks_ahead=2)


def push(s: Session, pcm: np.ndarray, now: float) -> None:
    """The client's audio in 100-ms chunks (what the server takes), all arriving at ``now``."""
    for i in range(0, len(pcm), RATE // 10):
        s.audio.push(pcm[i : i + RATE // 10].tobytes(), now)


def step(s: Session, emits: bool, engine_block: int) -> None:
    """What the scheduler does for one engine step of this session (the engine emits after L - 1 steps)."""
    s.start_step()
    blk = s.step_done(emits)
    if blk is not None:
        s.queue_block(engine_block, blk, [EncodedFrame(b"", True)] * FPB)


def run_idle(s: Session, steps: int) -> int:
    """``steps`` steps on silence; returns the engine's emitted-block count."""
    emitted = 0
    for k in range(steps):
        step(s, k >= L - 1, emitted)
        emitted += k >= L - 1
    return emitted


async def send_through(s: Session, block: int) -> None:
    """The writer sends every queued item of the blocks before ``block``."""
    while (it := s.out.peek()) is not None and it.block < block:
        await s.out.get()


async def test_replan_gives_the_silent_future_back_to_the_utterance() -> None:
    s = unit_session()
    emitted = run_idle(s, 8)  # blocks 0..4 emitted and queued (none sent), 5..7 in the window
    assert [it.block for it in s.out.queued_blocks()] == [0, 1, 2, 3, 4]
    pcm = speechlike_pcm(1.0, seed=7)
    push(s, pcm, now=s.t_start + 0.5)
    # Ready at once, long before its paced deadline: the burst need not wait for it.
    assert s.deadline() > s.t_start + 1.0 and s.ready(now=s.t_start + 0.5, horizon=0.0, lead_s=LEAD)
    assert s.maybe_replan(now=s.t_start + 0.5, lead_s=LEAD)
    assert s.take_replan_request() and not s.take_replan_request()
    assert s.warming()
    # The given-back blocks stay queued and go out while the window warms up: here blocks 0..2 do.
    assert [it.block for it in s.out.queued_blocks()] == [0, 1, 2, 3, 4]
    await send_through(s, 3)
    # The warm-up: L - 1 steps emit nothing, are due at once; the L-th emits the utterance's first block,
    # which takes the earliest position still unsent (3); block 4 is dropped.
    for _ in range(L - 1):
        assert s.ready(now=s.t_start, horizon=0.0)
        step(s, False, -1)
    step(s, True, emitted)
    assert not s.warming()
    audio = [it.msg.audio for it in s.out._q if it.msg.HasField("audio")]
    frames = [it for it in s.out._q if it.frames]
    assert [a.block_index for a in audio] == [3]
    assert audio[0].start_sample == 3 * FPB * SPF and audio[0].real_samples == FPB * SPF
    assert np.array_equal(np.frombuffer(audio[0].data, "<i2"), pcm[: FPB * SPF])
    assert [it.msg.frame.index for it in frames] == list(range(12, 16))
    assert frames[0].onset_from == s.t_start + 0.5 and frames[0].due == s.frame_due(12)
    assert s.audio.silence_inserted == 3 * FPB * SPF  # the silence of blocks 0..2 only
    # Back to paced: the next step is due when block 4's frames need it, as if the timeline had never moved.
    assert s.deadline() == pytest.approx(s.t_start + (4 + L) * 0.16 + 0.12)
    assert s.onsets == 1 and s.stats().stats.onsets == 1


async def test_a_block_being_encoded_at_the_replan_keeps_its_position_and_may_be_given_back() -> None:
    s = unit_session()
    emitted = run_idle(s, 8)  # blocks 0..4 queued
    s.start_step()
    encoding = s.step_done(True)  # block 5: emitted, being encoded
    assert encoding is not None
    push(s, speechlike_pcm(1.0, seed=11), now=s.t_start + 0.5)
    assert s.maybe_replan(now=s.t_start + 0.5, lead_s=LEAD)
    s.queue_block(emitted, encoding, [EncodedFrame(b"", True)] * FPB)  # the encoder is done: queued as block 5
    assert [it.block for it in s.out.queued_blocks()] == [0, 1, 2, 3, 4, 5]
    await send_through(s, 3)
    for _ in range(L - 1):
        step(s, False, -1)
    step(s, True, emitted + 1)
    audio = [it.msg.audio for it in s.out._q if it.msg.HasField("audio")]
    assert [a.block_index for a in audio] == [3] and audio[0].real_samples == FPB * SPF
    assert audio[0].start_sample == 3 * FPB * SPF


async def test_a_slow_warm_up_leaves_no_gap_and_a_burst_cut_mid_arrival_is_cut_again() -> None:
    s = unit_session()
    run_idle(s, 8)
    pcm = speechlike_pcm(1.0, seed=8)
    head = 60 * RATE // 1000
    push(s, pcm[:head], now=s.t_start + 1.0)
    step(s, True, 5)  # a step came due while the burst was arriving: 60 ms of it went into the window
    assert s.pending[-1].real_samples == head and s.pending[-1].real_offset > 0
    push(s, pcm[head:], now=s.t_start + 1.0)
    assert s.maybe_replan(now=s.t_start + 1.0, lead_s=LEAD)
    for _ in range(L - 1):
        step(s, False, -1)
    # The warm-up took so long that every given-back block went out meanwhile: the utterance follows them.
    await send_through(s, 6)
    step(s, True, 6)
    audio = [it.msg.audio for it in s.out._q if it.msg.HasField("audio")]
    frames = [it.msg.frame.index for it in s.out._q if it.frames]
    # Block 6 starts the utterance at its first sample, whole: the 60 ms cut before were buffered again.
    assert [a.block_index for a in audio] == [6] and frames == list(range(24, 28))
    assert (audio[0].real_offset, audio[0].real_samples) == (0, FPB * SPF)
    assert np.array_equal(np.frombuffer(audio[0].data, "<i2"), pcm[: FPB * SPF])
    assert audio[0].start_sample == 6 * FPB * SPF
    assert s.audio.silence_inserted == 6 * FPB * SPF  # the silence of blocks 0..5 only
    assert s.deadline() == pytest.approx(s.t_start + (7 + L) * 0.16 + 0.12)


async def test_a_burst_after_an_interrupt_takes_the_place_of_the_interrupted_speech_not_yet_sent() -> None:
    s = unit_session()
    emitted = run_idle(s, L)  # block 0 queued
    speech = speechlike_pcm(2.0, seed=9)
    n = FPB * SPF
    for k in range(6):  # a live person: a block's worth of speech per step, each stepped as it comes
        push(s, speech[k * n : (k + 1) * n], now=s.t_start + 0.16 * k)
        step(s, True, emitted)
        emitted += 1
    spoken = [it.block for it in s.out.queued_blocks() if not it.silent]
    assert spoken == [4, 5, 6]  # blocks 1..3 came out of the first warm-up on silence
    await send_through(s, 5)  # block 4 was shown: the speech is on screen
    s.interrupt()
    reply = speechlike_pcm(1.0, seed=10)
    push(s, reply, now=s.t_start + 1.2)
    assert s.maybe_replan(now=s.t_start + 1.2, lead_s=LEAD)
    await send_through(s, 6)  # block 5, rendered before the Interrupt, went out while the window warmed up
    for _ in range(L - 1):
        step(s, False, -1)
    step(s, True, emitted)
    audio = [it.msg.audio for it in s.out._q if it.msg.HasField("audio")]
    # The reply takes block 6's place: the interrupted speech's last block never goes out.
    assert [a.block_index for a in audio] == [6] and audio[0].real_samples == n
    assert np.array_equal(np.frombuffer(audio[0].data, "<i2"), reply[:n])
    assert audio[0].start_sample == 6 * n
    assert s.audio.silence_inserted == 4 * n  # blocks 0..3; 4 and 5 were speech, 6 was given back


def test_no_replan_for_real_time_audio_a_speaking_window_or_when_off() -> None:
    s = unit_session()
    run_idle(s, 8)
    push(s, speechlike_pcm(0.1), now=s.t_start + 1.0)  # a live person: less than a block
    assert not s.maybe_replan(now=s.t_start + 1.0, lead_s=LEAD)
    step(s, True, 5)
    push(s, speechlike_pcm(3.0), now=s.t_start + 2.0)
    # The window holds speech that arrived a while ago: the audio runs on, it is not a new burst.
    assert not s.maybe_replan(now=s.t_start + 2.0, lead_s=LEAD)
    off = unit_session(replan=False)
    run_idle(off, 8)
    push(off, speechlike_pcm(3.0), now=off.t_start)
    assert not off.maybe_replan(now=off.t_start, lead_s=LEAD)
    s2 = unit_session()
    run_idle(s2, L - 2)  # still in the first warm-up: nothing to re-plan
    push(s2, speechlike_pcm(3.0), now=s2.t_start)
    assert not s2.maybe_replan(now=s2.t_start, lead_s=LEAD)


def test_no_replan_when_the_queued_frames_would_run_out_during_the_warm_up() -> None:
    """A loaded server: the frames emitted run out more than a block before the warm-up could end. A re-plan would
    show nothing for most of L - 1 steps and gain nothing (the window's silent blocks come out in as many steps):
    the burst goes on as audio in time does. A hitch of up to a block is allowed."""
    s = unit_session()
    run_idle(s, 8)
    until = s.planned_until()
    assert until is not None and until == s.frame_due(5 * FPB - 1)  # blocks 0..4 emitted
    now = until - 0.05
    push(s, speechlike_pcm(1.0), now=now)
    assert not s.maybe_replan(now=now, lead_s=0.05 + 0.04 + 0.16 + 0.01)  # the last frame's 40 ms, a block
    assert s.maybe_replan(now=now, lead_s=0.05 + 0.04 + 0.16 - 0.01)


def test_a_short_utterance_closed_by_end_of_audio_replans() -> None:
    s = unit_session()
    run_idle(s, 8)
    push(s, speechlike_pcm(0.3), now=s.t_start)
    assert not s.maybe_replan(now=s.t_start, lead_s=LEAD)  # under a window's worth: it may go on
    s.end_of_audio()
    assert s.maybe_replan(now=s.t_start, lead_s=LEAD)
