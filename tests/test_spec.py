"""check_config: a SessionConfig becomes a frozen SessionSpec, or is refused with the status the client sees."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from avatarforcing_client import pb
from avatarforcing_service.failure import SessionFailure
from avatarforcing_service.spec import SessionSpec, check_config

FPS = 25.0
MODEL_RATE = 16000
PCM = pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=48000, channels=1)


def check(**kw: object) -> SessionSpec:
    kw.setdefault("video_encoding", pb.VIDEO_ENCODING_JPEG)
    return check_config(pb.SessionConfig(**kw), model_rate=MODEL_RATE, fps=FPS)  # type: ignore[arg-type]


def test_a_valid_config_becomes_a_frozen_spec_with_the_defaults_resolved() -> None:
    spec = check(reference_image=b"png", audio_format=PCM, video_encoding=pb.VIDEO_ENCODING_H264,
                 pacing=pb.PACING_ASAP, jpeg_quality=80, video_bitrate_bps=500_000, utterance_id="u1", seed=7,
                 session_id="sid", session_token="tok", resume_block=3)
    assert spec == SessionSpec(sample_rate=48000, video_encoding=pb.VIDEO_ENCODING_H264, pacing=pb.PACING_ASAP,
                               realtime=False, inter_coded=True, jpeg_quality=80, video_bitrate_bps=500_000,
                               utterance_id="u1", seed=7, reference="reference_image", reference_image=b"png",
                               session_id="sid", session_token="tok", resume_block=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.pacing = pb.PACING_REALTIME  # type: ignore[misc]
    # No audio_format: the model's rate; no pacing: real time.
    plain = check(avatar_id="av")
    assert (plain.sample_rate, plain.realtime, plain.inter_coded, plain.reference, plain.avatar_id) == \
        (MODEL_RATE, True, False, "avatar_id", "av")
    assert plain.pacing_name == "PACING_REALTIME" and plain.encoding_name == "VIDEO_ENCODING_JPEG"
    assert check(avatar_id="av", video_encoding=pb.VIDEO_ENCODING_FMP4).inter_coded


@pytest.mark.parametrize("kw,match", [
    ({"session_token": "t"}, "session_token and resume_block need session_id"),
    ({"resume_block": 2}, "session_token and resume_block need session_id"),
    ({"audio_format": pb.AudioFormat(encoding=7, sample_rate_hz=16000)}, "audio encoding 7 is not supported"),
    ({"audio_format": pb.AudioFormat(sample_rate_hz=16000, channels=2)}, "audio has 2 channels; send mono"),
    ({"audio_format": pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16LE)}, "sample_rate_hz is 0 (unset)"),
    ({"audio_format": pb.AudioFormat(sample_rate_hz=16001)}, "16001"),
    ({"audio_format": pb.AudioFormat(sample_rate_hz=1000)}, "1000"),
    ({"video_encoding": 99}, "video encoding 99 is not supported; use one of"),
    ({"video_encoding": pb.VIDEO_ENCODING_UNSPECIFIED}, "video encoding 0 is not supported; use one of"),
    ({"pacing": 9}, "pacing 9 is unknown"),
    ({"jpeg_quality": 101}, "jpeg_quality must be 1..100"),
], ids=["token-without-id", "resume-without-id", "audio-encoding", "stereo", "rate-unset", "rate-uneven",
        "rate-too-low", "video-encoding", "no-video-encoding", "pacing", "jpeg-quality"])
def test_each_invalid_field_is_refused_as_invalid_argument(kw: dict[str, object], match: str) -> None:
    with pytest.raises(SessionFailure) as ei:
        check(reference_image=b"png", **kw)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and match in ei.value.message, ei.value.message


def test_a_config_without_a_reference_is_refused_after_every_other_check() -> None:
    with pytest.raises(SessionFailure) as ei:
        check()
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "needs a reference" in ei.value.message
    with pytest.raises(SessionFailure) as ei:  # the first problem found is the one reported
        check(pacing=9)
    assert "pacing 9 is unknown" in ei.value.message
