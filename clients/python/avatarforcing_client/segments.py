"""Segment and mute accounting of the LiveKit adapter, as a plain object (no asyncio, no livekit, no numpy).

:class:`~avatarforcing_client.livekit.AvatarForcingVideoGenerator` tells a :class:`SegmentLedger` what the agent
pushed (audio, segment ends, interruptions) and asks it, for each block the server returns, whether to yield
the block's audio and how many segments end with it. The rule (see the livekit module's docstring): with ``C``
the samples pushed up to a segment's end, counted from the last point where the stream was idle, the segment
has played out once the blocks' ``real_samples`` over the same span reach ``C``; blocks the server dropped
(gaps in ``block_index``) count as full blocks toward a bound that ends a segment at the next block without
real samples. After an interruption the blocks rendered before it are muted up to the first block without real
samples, or up to the first block past the audio sent before the Interrupt went out (its ``source_end_sample``
says so, see :meth:`SegmentLedger.interrupt_sent`: a reply re-planned straight after the interrupted speech has
no silent block before it), at most ``max_drain_blocks`` of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["SegmentLedger", "BlockPlayout"]


@dataclass(frozen=True)
class BlockPlayout:
    """What to do with one block's audio."""

    play: bool  #: yield it (False: idle silence, or muted after an interruption)
    segment_ends: int  #: segments that end with this block (``AudioSegmentEnd`` after its audio)


class SegmentLedger:
    """The accounting of one generator: samples pushed and returned, segments awaiting their end, muting.

    ``block_samples``: samples (session rate) of one block, what a dropped block counts for.
    """

    def __init__(self, block_samples: int, max_drain_blocks: int = 16) -> None:
        self.block_samples = block_samples
        self.max_drain_blocks = max_drain_blocks
        self._segment_open = False  # audio pushed since the last segment end
        self._pushed = 0  # samples pushed since the last idle point
        self._ends: deque[int] = deque()  # cumulative end of each segment awaiting playout
        self._returned = 0  # real samples returned since the last idle point
        self._lost = 0  # at most this many more were in blocks the server dropped (block_index gaps)
        self._playing = False  # a segment's audio is being yielded
        self._draining = False  # after an interruption: muting audio rendered before it
        self._drain_left = 0
        self._mute_upto: int | None = None  # blocks whose source_end_sample is past this carry newer audio...
        self._mute_stream = 0  # ...on this stream (a resumed stream never re-sends audio voided by an Interrupt)
        self._last_block = -1
        #: Counters, for logs and tests.
        self.segments_ended = 0
        self.interrupts = 0
        self.muted_blocks = 0  # blocks with real samples muted after an interruption
        self.samples_sent = 0  # samples pushed over the whole session
        #: ``real_samples`` summed over every block received: the pushed samples the server played back.
        self.samples_returned = 0

    @property
    def muting(self) -> bool:
        """True after an interruption until the audio rendered before it has gone by."""
        return self._draining

    @property
    def segments_pending(self) -> int:
        """Segments ended by the agent whose audio has not all come back."""
        return len(self._ends)

    # -- the agent's side ----------------------------------------------------------------------

    def open_segment(self) -> None:
        """The agent pushed audio: a segment is open until :meth:`end_segment`."""
        self._segment_open = True

    def samples_pushed(self, n: int) -> None:
        """``n`` samples (session rate) went out for the open segment."""
        self._pushed += n
        self.samples_sent += n

    def end_segment(self) -> None:
        """The agent ended its segment; one with no audio since the last end is not counted."""
        if self._segment_open:
            self._segment_open = False
            self._ends.append(self._pushed)

    def interrupt(self) -> None:
        """The agent cleared its audio: pending segments are forgotten (the runner reports the interruption
        itself) and, if audio was on its way, what the server rendered before the interruption is muted."""
        had_audio = self._segment_open or bool(self._ends) or self._playing or self._returned < self._pushed
        self._segment_open = False
        self._ends.clear()
        self._pushed = self._returned = self._lost = 0
        self._playing = False
        if had_audio and not self._draining:
            self._draining = True
            self._drain_left = self.max_drain_blocks
        self._mute_upto = None
        self.interrupts += 1

    def interrupt_sent(self, stream_audio_sent: int, stream: int) -> None:
        """The ``Interrupt`` went out on stream ``stream`` (the session's resume count) after ``stream_audio_sent``
        samples of it: a block whose ``source_end_sample`` passes that holds audio pushed after the interruption,
        so muting ends there (with nothing silent between the interrupted speech and a re-planned reply)."""
        if self._draining:
            self._mute_upto, self._mute_stream = stream_audio_sent, stream

    # -- the server's side ---------------------------------------------------------------------

    def block(self, block_index: int, real_samples: int, real_offset: int, samples: int,
              source_end: int | None = None, stream: int = 0) -> BlockPlayout:
        """One ``AudioOut``: its ``block_index``, ``real_samples``, ``real_offset`` and the samples its data holds;
        its ``source_end_sample`` and the stream it came on (the session's resume count), where known."""
        gap = block_index - self._last_block - 1 if self._last_block >= 0 else 0
        self._last_block = max(self._last_block, block_index)
        real = max(0, min(real_samples, samples - real_offset))
        self.samples_returned += real
        silent = real == 0  # only silence the server inserted
        ends = 0
        if self._draining and self._mute_upto is not None and (
                stream != self._mute_stream or (source_end is not None and source_end > self._mute_upto)):
            self._draining = False  # audio pushed after the interruption: everything rendered before it has come
            self._mute_upto = None
        if self._draining:
            # Rendered before the Interrupt reached the server: muted. The blocks that were in the
            # server's window come back with real_samples == 0: the first one ends the old audio.
            self._drain_left -= 1
            if silent or self._drain_left <= 0:
                self._draining = False
                self._mute_upto = None
            if not silent:
                self.muted_blocks += 1
            play = False
        else:
            if gap > 0 and (self._segment_open or self._ends):
                self._lost += gap * self.block_samples
            self._returned += real
            while self._ends and (self._returned >= self._ends[0]
                                  or (silent and self._returned + self._lost >= self._ends[0])):
                self._ends.popleft()
                ends += 1
            outstanding = self._segment_open or bool(self._ends)
            if silent:
                # Inside a segment (the agent's audio stalled) the silence is part of its playback;
                # a silent block that ends the last segment, or an idle one, yields video only.
                play = self._playing and outstanding
                if not outstanding:  # idle: every pushed sample is accounted for; count afresh
                    self._pushed = self._returned = self._lost = 0
            else:
                play = True
            self._playing = outstanding and (self._playing or not silent)
        self.segments_ended += ends
        return BlockPlayout(play, ends)
