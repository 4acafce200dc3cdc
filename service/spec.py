"""A stream's SessionConfig, checked once: :func:`check_config` turns the protobuf message into a frozen
:class:`SessionSpec`, or refuses it with the status and message the client sees.

The session reads the spec, never the raw message, so the per-block path pays for no protobuf field access,
and the rules for a valid configuration live in one pure function that tests call directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import grpc

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .audio_in import MAX_RATE, MIN_RATE, rate_problem
from .codecs import SUPPORTED_ENCODINGS
from .failure import SessionFailure

_INTER_CODED = (pb.VIDEO_ENCODING_H264, pb.VIDEO_ENCODING_FMP4)


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """What a stream asked for, validated. Defaults resolved: ``sample_rate`` is never 0, ``realtime`` is the
    pacing the server applies (PACING_UNSPECIFIED is real time)."""

    sample_rate: int
    video_encoding: int
    pacing: int  # as sent (PACING_UNSPECIFIED stays 0); ``realtime`` says what it means
    realtime: bool
    inter_coded: bool  # H.264 or fMP4: a dropped frame needs a keyframe after it
    jpeg_quality: int = 0
    video_bitrate_bps: int = 0
    utterance_id: str = ""
    seed: int = 0  # 0: a random seed per session
    reference: Literal["avatar_id", "reference_image"] = "reference_image"
    avatar_id: str = ""
    reference_image: bytes = b""
    session_id: str = ""  # from CreateSession; empty: the session is placed by this stream
    session_token: str = ""
    resume_block: int = 0

    @property
    def pacing_name(self) -> str:
        return pb.Pacing.Name(self.pacing or pb.PACING_REALTIME)

    @property
    def encoding_name(self) -> str:
        return pb.VideoEncoding.Name(self.video_encoding)


def _invalid(message: str) -> SessionFailure:
    return SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_config(sc: pb.SessionConfig, *, model_rate: int, fps: float) -> SessionSpec:
    """The spec of ``sc``, or :class:`SessionFailure` (INVALID_ARGUMENT) naming the first problem found.

    ``model_rate`` is the audio rate assumed when the config sends no ``audio_format``; ``fps`` decides which
    sample rates fit a whole number of samples per frame. Pure: reads nothing but its arguments.
    """
    if not sc.session_id and (sc.session_token or sc.resume_block):
        raise _invalid("session_token and resume_block need session_id (from CreateSession)")
    af = sc.audio_format
    if af.encoding not in (pb.AUDIO_ENCODING_PCM16LE, pb.AUDIO_ENCODING_UNSPECIFIED):
        raise _invalid(f"audio encoding {af.encoding} is not supported; use AUDIO_ENCODING_PCM16LE")
    if af.channels not in (0, 1):
        raise _invalid(f"audio has {af.channels} channels; send mono (channels = 1)")
    # No audio_format at all: PCM16LE mono at the model's rate (as encoding 0 and channels 0 mean the defaults).
    # An AudioFormat that is sent but names no rate is refused: proto3 cannot tell 0 from unset, and guessing the
    # model's rate for a client that forgot the field would play its 48 kHz audio as 16 kHz, silently.
    if sc.HasField("audio_format") and af.sample_rate_hz == 0:
        raise _invalid("audio_format.sample_rate_hz is 0 (unset): set it to the sample rate of the audio "
                       f"you will send ({MIN_RATE} to {MAX_RATE} Hz, e.g. 16000, 22050 or 48000)")
    rate = af.sample_rate_hz or model_rate
    problem = rate_problem(rate, fps)
    if problem is not None:
        raise _invalid(problem)
    if sc.video_encoding not in SUPPORTED_ENCODINGS:
        names = ", ".join(pb.VideoEncoding.Name(v) for v in SUPPORTED_ENCODINGS)
        raise _invalid(f"video encoding {sc.video_encoding} is not supported; use one of {names}")
    if sc.pacing not in (pb.PACING_UNSPECIFIED, pb.PACING_REALTIME, pb.PACING_ASAP):
        raise _invalid(f"pacing {sc.pacing} is unknown; use PACING_REALTIME or PACING_ASAP")
    if sc.jpeg_quality > 100:
        raise _invalid("jpeg_quality must be 1..100 (0: default)")
    ref = sc.WhichOneof("reference")
    if ref not in ("avatar_id", "reference_image"):
        raise _invalid("SessionConfig needs a reference: reference_image (PNG/JPEG bytes) or avatar_id")
    return SessionSpec(
        sample_rate=rate, video_encoding=sc.video_encoding, pacing=sc.pacing, realtime=sc.pacing != pb.PACING_ASAP,
        inter_coded=sc.video_encoding in _INTER_CODED, jpeg_quality=sc.jpeg_quality,
        video_bitrate_bps=sc.video_bitrate_bps, utterance_id=sc.utterance_id, seed=sc.seed, reference=ref,
        avatar_id=sc.avatar_id, reference_image=sc.reference_image, session_id=sc.session_id,
        session_token=sc.session_token, resume_block=int(sc.resume_block))
