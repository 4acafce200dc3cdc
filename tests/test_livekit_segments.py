"""The LiveKit adapter's segment and mute accounting (avatarforcing_client.segments.SegmentLedger) driven directly:
no event loop, no livekit, no server. The ledger is told what the agent pushed and, block by block, what the
server returned (``AudioOut.block_index``, ``real_samples``, ``real_offset``, the samples of its data)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from avatarforcing_client import segments
from avatarforcing_client.segments import BlockPlayout, SegmentLedger

BLOCK = 2560  # samples per 160 ms block at 16 kHz (4 frames at 25 fps)


def pushed(ledger: SegmentLedger, samples: int) -> None:
    """The agent pushes ``samples`` (one frame, as AvatarForcingVideoGenerator.push_audio does)."""
    ledger.open_segment()
    ledger.samples_pushed(samples)


def speech(ledger: SegmentLedger, k: int, real: int, offset: int = 0) -> BlockPlayout:
    """Block ``k`` carrying ``real`` of the client's samples from ``offset`` (the rest inserted silence)."""
    return ledger.block(k, real, offset, BLOCK)


def silence(ledger: SegmentLedger, k: int) -> BlockPlayout:
    return ledger.block(k, 0, 0, BLOCK)


def test_the_module_needs_neither_asyncio_nor_livekit() -> None:
    """The ledger is plain bookkeeping: it imports nothing but the standard library's data structures."""
    tree = ast.parse(Path(segments.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "collections", "dataclasses"}, imported


def test_a_segment_ends_with_the_block_that_returns_its_last_real_sample() -> None:
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, 2 * BLOCK)
    ledger.end_segment()
    assert ledger.segments_pending == 1
    # Silence before speech that starts mid-block, a stall, and padding after: only real samples count.
    assert speech(ledger, 0, 1560, 1000) == BlockPlayout(play=True, segment_ends=0)
    assert silence(ledger, 1) == BlockPlayout(play=True, segment_ends=0), "a stall inside the segment plays"
    assert speech(ledger, 2, 2560) == BlockPlayout(play=True, segment_ends=0)
    assert speech(ledger, 3, 1000) == BlockPlayout(play=True, segment_ends=1)
    assert silence(ledger, 4) == BlockPlayout(play=False, segment_ends=0), "idle again: video only"
    assert ledger.segments_ended == 1 and ledger.segments_pending == 0
    assert ledger.samples_sent == ledger.samples_returned == 2 * BLOCK


def test_silent_blocks_before_the_first_real_sample_yield_video_only() -> None:
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, BLOCK)
    ledger.end_segment()
    assert silence(ledger, 0).play is False, "the service's latency: nothing of the segment yet"
    assert silence(ledger, 1).play is False
    assert speech(ledger, 2, BLOCK) == BlockPlayout(play=True, segment_ends=1)


def test_a_segment_still_open_is_not_ended_by_its_audio_coming_back() -> None:
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, BLOCK)
    assert speech(ledger, 0, BLOCK) == BlockPlayout(play=True, segment_ends=0)
    assert silence(ledger, 1) == BlockPlayout(play=True, segment_ends=0), "the agent's audio stalled: still its turn"
    pushed(ledger, 500)
    ledger.end_segment()
    assert speech(ledger, 2, 500) == BlockPlayout(play=True, segment_ends=1)


def test_back_to_back_segments_each_end_after_their_own_audio() -> None:
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, 1000)
    ledger.end_segment()
    pushed(ledger, 3000)
    ledger.end_segment()
    assert ledger.segments_pending == 2
    assert speech(ledger, 0, 2000) == BlockPlayout(play=True, segment_ends=1)
    assert speech(ledger, 1, 1999) == BlockPlayout(play=True, segment_ends=0)
    assert speech(ledger, 2, 1) == BlockPlayout(play=True, segment_ends=1)
    # Two short segments returned in one block both end with it.
    pushed(ledger, 100)
    ledger.end_segment()
    pushed(ledger, 100)
    ledger.end_segment()
    assert speech(ledger, 3, 200) == BlockPlayout(play=True, segment_ends=2)
    assert ledger.segments_ended == 4


def test_a_segment_end_without_audio_is_not_a_segment() -> None:
    ledger = SegmentLedger(BLOCK)
    ledger.end_segment()
    assert ledger.segments_pending == 0
    # A frame that resampled to nothing still opens a segment: with no audio it ends with the next block.
    ledger.open_segment()
    ledger.end_segment()
    assert silence(ledger, 0) == BlockPlayout(play=False, segment_ends=1)


def test_counting_starts_afresh_at_an_idle_block() -> None:
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, 1000)
    ledger.end_segment()
    assert speech(ledger, 0, 1000).segment_ends == 1
    silence(ledger, 1)  # idle: every pushed sample is accounted for
    pushed(ledger, 700)
    ledger.end_segment()
    assert speech(ledger, 2, 699).segment_ends == 0
    assert speech(ledger, 3, 1).segment_ends == 1


def test_dropped_blocks_end_the_segment_at_the_next_block_without_real_samples() -> None:
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, 3 * BLOCK)
    ledger.end_segment()
    assert speech(ledger, 5, BLOCK).segment_ends == 0
    assert speech(ledger, 7, BLOCK).segment_ends == 0, "block 6 was dropped: its samples are unknown"
    assert silence(ledger, 8) == BlockPlayout(play=False, segment_ends=1)
    assert ledger.segments_ended == 1
    # A gap while idle counts for nothing.
    pushed(ledger, BLOCK)
    ledger.end_segment()
    silence(ledger, 12)
    assert speech(ledger, 13, BLOCK - 1).segment_ends == 0
    assert silence(ledger, 14).segment_ends == 0, "no block was dropped inside this segment"


def test_real_samples_are_bounded_by_the_data_the_block_carries() -> None:
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, BLOCK)
    ledger.end_segment()
    assert ledger.block(0, 5000, 2000, BLOCK).segment_ends == 0  # at most BLOCK - 2000 of them are real
    assert ledger.samples_returned == BLOCK - 2000
    assert ledger.block(1, 10, BLOCK + 5, BLOCK).segment_ends == 0, "an offset past the data: no real sample"
    assert ledger.samples_returned == BLOCK - 2000
    assert speech(ledger, 2, 2000).segment_ends == 1


def test_an_interruption_mutes_up_to_the_first_block_without_real_samples() -> None:
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, 6 * BLOCK)
    ledger.end_segment()
    assert speech(ledger, 0, BLOCK).play
    ledger.interrupt()
    assert ledger.muting and ledger.interrupts == 1 and ledger.segments_pending == 0
    for k in (1, 2):  # rendered before the Interrupt reached the server
        assert speech(ledger, k, BLOCK) == BlockPlayout(play=False, segment_ends=0) and ledger.muting
    assert silence(ledger, 3).play is False and not ledger.muting
    assert ledger.muted_blocks == 2
    # A new segment is counted from scratch: its 1500 samples end it, whatever came before.
    pushed(ledger, 1500)
    ledger.end_segment()
    assert speech(ledger, 4, 1500, 1060) == BlockPlayout(play=True, segment_ends=1)
    assert ledger.segments_ended == 1

    # Without a block free of real samples, muting stops after 16 blocks.
    pushed(ledger, 6 * BLOCK)
    ledger.interrupt()
    for k in range(5, 5 + 16):
        assert not speech(ledger, k, BLOCK).play
    assert not ledger.muting and ledger.muted_blocks == 2 + 16
    assert ledger.interrupts == 2 and ledger.segments_ended == 1


def test_a_reply_straight_after_the_interrupted_speech_is_not_muted() -> None:
    """A burst sent right after an interruption is re-planned by the server into the positions after the
    interrupted speech's queued blocks: no silent block lies between. The reply's first block consumed audio past
    what was sent before the Interrupt (its source_end_sample), so muting ends there and the reply plays."""
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, 6 * BLOCK)
    ledger.end_segment()
    assert ledger.block(0, BLOCK, 0, BLOCK, source_end=BLOCK).play
    ledger.interrupt()
    pushed(ledger, 2 * BLOCK)  # the reply, pushed before the writer has sent the Interrupt
    ledger.end_segment()
    ledger.interrupt_sent(6 * BLOCK, stream=0)
    for k in (1, 2):  # rendered before the Interrupt reached the server
        assert ledger.block(k, BLOCK, 0, BLOCK, source_end=(k + 1) * BLOCK) == BlockPlayout(False, 0)
    assert ledger.block(3, BLOCK, 0, BLOCK, source_end=7 * BLOCK) == BlockPlayout(play=True, segment_ends=0)
    assert not ledger.muting and ledger.muted_blocks == 2
    assert ledger.block(4, BLOCK, 0, BLOCK, source_end=8 * BLOCK) == BlockPlayout(play=True, segment_ends=1)

    # On a stream resumed since the Interrupt, nothing voided by it comes again: muting ends at the first block.
    pushed(ledger, 6 * BLOCK)
    ledger.interrupt()
    ledger.interrupt_sent(14 * BLOCK, stream=0)
    assert ledger.muting
    assert ledger.block(9, BLOCK, 0, BLOCK, source_end=BLOCK, stream=1).play
    assert not ledger.muting


def test_muting_stops_after_max_drain_blocks_without_a_silent_block() -> None:
    ledger = SegmentLedger(BLOCK, max_drain_blocks=16)
    pushed(ledger, BLOCK)
    ledger.interrupt()
    for k in range(16):
        assert ledger.muting
        assert not speech(ledger, k, BLOCK).play
    assert not ledger.muting and ledger.muted_blocks == 16
    assert speech(ledger, 16, BLOCK).play, "audio pushed after the interruption plays"


def test_an_interruption_with_nothing_on_its_way_mutes_nothing() -> None:
    ledger = SegmentLedger(BLOCK)
    ledger.interrupt()
    assert not ledger.muting and ledger.interrupts == 1
    pushed(ledger, BLOCK)
    ledger.end_segment()
    assert speech(ledger, 0, BLOCK) == BlockPlayout(play=True, segment_ends=1)
    # All of it came back and the stream went idle: a later interruption mutes nothing either.
    silence(ledger, 1)
    ledger.interrupt()
    assert not ledger.muting and ledger.muted_blocks == 0


def test_audio_not_yet_returned_makes_an_interruption_mute() -> None:
    """After the segment's end was yielded, samples still unreturned (counted since the last idle point) mean
    the server may still render them: an interruption mutes."""
    ledger = SegmentLedger(BLOCK)
    pushed(ledger, BLOCK)
    ledger.end_segment()
    assert speech(ledger, 0, BLOCK).segment_ends == 1
    pushed(ledger, 10)  # pushed and never ended: the interruption comes first
    ledger.interrupt()
    assert ledger.muting


def test_a_second_interruption_while_muting_does_not_extend_it() -> None:
    ledger = SegmentLedger(BLOCK, max_drain_blocks=3)
    pushed(ledger, BLOCK)
    ledger.interrupt()
    speech(ledger, 0, BLOCK)
    pushed(ledger, BLOCK)
    ledger.interrupt()
    assert ledger.interrupts == 2
    speech(ledger, 1, BLOCK)
    speech(ledger, 2, BLOCK)
    assert not ledger.muting and ledger.muted_blocks == 3


@pytest.mark.parametrize("scenario", ["burst", "stall", "digital_silence_edges", "late_start"])
def test_segment_end_rule_on_blocks_cut_by_the_servers_audio_input(scenario: str) -> None:
    """On blocks cut by the server's own AudioInput (avatarforcing_service.audio_in), with the exact
    real_samples / real_offset the server sends: the end comes with the block holding the segment's last
    sample, whatever the audio holds (digital silence included)."""
    np = pytest.importorskip("numpy")
    from avatarforcing_service.audio_in import AudioInput

    from .conftest import speechlike_pcm

    def voice(seconds: float, seed: int) -> np.ndarray:
        x = speechlike_pcm(seconds, seed=seed)
        x[x == 0] = 1  # no exact zeros: only the digital silence a scenario adds
        return x

    z = np.zeros
    arrivals: dict[int, np.ndarray] = {  # block number -> samples that reach the server before its cut
        "burst": {0: voice(1.0, 1)},
        "stall": {0: voice(0.5, 2), 6: voice(0.5, 3)},  # speech, 0.5 s gap, speech
        "digital_silence_edges": {0: np.concatenate([z(4800, np.int16), voice(1.0, 4), z(4000, np.int16)])},
        "late_start": {0: voice(0.03, 5), 1: voice(1.0, 6)},  # first block mostly inserted silence
    }[scenario]
    ledger = SegmentLedger(BLOCK)
    for a in arrivals.values():
        pushed(ledger, len(a))
    ledger.end_segment()
    audio_in = AudioInput(16000, 16000, frames_per_block=4, fps=25.0, max_chunk_ms=100, max_buffered_s=60)
    last_real = end_at = None
    for k in range(40):
        for i in range(0, len(arrivals.get(k, ())), 320):
            audio_in.push(arrivals[k][i : i + 320].tobytes(), 0.0)
        b = audio_in.take_block()
        if b.real_samples:
            last_real = k
        if ledger.block(k, b.real_samples, b.real_offset, len(b.pcm_in)).segment_ends:
            end_at = k
            break
    assert last_real is not None and end_at == last_real, (scenario, last_real, end_at)
    assert ledger.segments_ended == 1
