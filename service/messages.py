"""Every message a Stream sends, built in one place: SessionStarted, AudioOut, VideoFrame, Stats and End.

The scheduler and the session hand over plain values (blocks, encoded frames, counters); only this module (and
the servicer that writes them) knows the protobuf types, so the scheduler does not import protobuf at all.
"""

from __future__ import annotations

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .audio_in import Block
from .codecs import EncodedFrame

# The End reasons the service itself decides (the client's half-close and end of audio included).
END_OF_AUDIO = pb.END_REASON_END_OF_AUDIO
CLIENT_CLOSED = pb.END_REASON_CLIENT_CLOSED
IDLE_TIMEOUT = pb.END_REASON_IDLE_TIMEOUT
MAX_DURATION = pb.END_REASON_MAX_DURATION
SERVER_SHUTDOWN = pb.END_REASON_SERVER_SHUTDOWN


def session_started(*, session_id: str, fps: float, width: int, height: int, frames_per_block: int,
                    lookahead_ms: float, latency_ms: float, video_encoding: int, init_segment: bytes,
                    audio_sample_rate_hz: int, avatar_id: str, idle_timeout_ms: float, session_token: str,
                    node_id: str, first_frame_index: int, onset_latency_ms: float) -> pb.SessionStarted:
    return pb.SessionStarted(
        session_id=session_id, fps=fps, width=width, height=height, frames_per_block=frames_per_block,
        lookahead_ms=lookahead_ms, latency_ms=latency_ms, init_segment=init_segment,
        video_encoding=video_encoding,  # type: ignore[arg-type]  # a SessionSpec's checked VideoEncoding value
        audio_sample_rate_hz=audio_sample_rate_hz, avatar_id=avatar_id, idle_timeout_ms=idle_timeout_ms,
        session_token=session_token, node_id=node_id, first_frame_index=first_frame_index,
        onset_latency_ms=onset_latency_ms)


def audio_out(block_index: int, blk: Block, start_sample: int) -> pb.StreamResponse:
    """The block's audio as the client hears it (inserted silence included), at the client's rate."""
    return pb.StreamResponse(audio=pb.AudioOut(
        block_index=block_index, start_sample=start_sample, data=blk.pcm_in.astype("<i2").tobytes(),
        silent=blk.real_samples == 0, real_samples=blk.real_samples, real_offset=blk.real_offset,
        source_end_sample=blk.source_end))


def video_frame(index: int, fps: float, audio_start: int, samples_per_frame: int, ef: EncodedFrame,
                block_index: int) -> pb.StreamResponse:
    return pb.StreamResponse(frame=pb.VideoFrame(
        index=index, pts_us=round(index * 1e6 / fps), audio_start_sample=audio_start,
        audio_end_sample=audio_start + samples_per_frame, data=ef.data, keyframe=ef.keyframe, block_index=block_index))


def stats(*, frames_sent: int, frames_dropped: int, audio_samples_received: int, silence_samples_inserted: int,
          queue_depth: int, anchor_similarity: float, utterance_id: str, onset_latency_ms: float = 0.0,
          onsets: int = 0) -> pb.StreamResponse:
    return pb.StreamResponse(stats=pb.Stats(
        frames_sent=frames_sent, frames_dropped=frames_dropped, audio_samples_received=audio_samples_received,
        silence_samples_inserted=silence_samples_inserted, queue_depth=queue_depth,
        anchor_similarity=anchor_similarity, utterance_id=utterance_id, onset_latency_ms=onset_latency_ms,
        onsets=onsets))


def stats_slot() -> pb.StreamResponse:
    """Where a Stats goes in a session's output queue: it is built when it goes out (``Session.message``)."""
    return pb.StreamResponse()


def end(reason: int, message: str = "") -> pb.StreamResponse:
    return pb.StreamResponse(end=pb.End(reason=reason, message=message))  # type: ignore[arg-type]


def failed() -> pb.StreamResponse:
    """The marker queued behind a failure: no message of its own; the servicer aborts with the failure's status."""
    return pb.StreamResponse()


def end_reason_label(msg: pb.StreamResponse) -> str:
    """The End's reason as the ``sessions_ended`` metric labels it (``end_of_audio``, ...)."""
    return pb.EndReason.Name(msg.end.reason).lower()
