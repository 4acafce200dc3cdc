"""The Python SDK's resume bookkeeping (avatarforcing_client.resume.ResumeState, no server, no event loop) on the
cases of clients/testdata/resume_cases.json, which the Go SDK's resume_state_test.go runs too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from avatarforcing_client.resume import ResumeState

CASES = json.loads((Path(__file__).resolve().parents[1] / "clients" / "testdata" / "resume_cases.json").read_text())


def _pcm(start: int, n: int) -> bytes:
    """The audio the cases send: sample p has the value p % 30000."""
    return b"".join(((start + i) % 30000).to_bytes(2, "little") for i in range(n))


def _run(case: dict[str, Any]) -> None:
    st = ResumeState(case["sample_rate"], case["buffer_s"])
    fpb = case["frames_per_block"]
    for k, step in enumerate(case["steps"]):
        where = f"step {k}: {step}"
        delivered = not step.get("duplicate", False)
        if "send_audio" in step:
            st.on_audio_sent(_pcm(st.sent, step["send_audio"]))
        elif "end_of_audio" in step:
            st.on_end_of_audio_sent()
        elif "interrupt" in step:
            st.on_interrupt_sent()
        elif "audio_out" in step:
            block, end = step["audio_out"]
            assert st.on_audio_out(block, end) is delivered, where
        elif "frames" in step:
            first, last = step["frames"]
            for index in range(first, last + 1):
                assert st.on_frame(index, fpb) is delivered, f"{where}, frame {index}"
        elif "resume" in step:
            want = step["resume"]
            assert st.resume_block(fpb) == want["resume_block"], where
            replay = st.begin_stream()
            assert [[start, len(pcm) // 2] for start, pcm in replay.audio] == want["replay"], where
            assert all(pcm == _pcm(start, len(pcm) // 2) for start, pcm in replay.audio), where
            assert replay.end_of_audio is want["end_of_audio"], where
        elif "expect" in step:
            want = step["expect"]
            got = {"sent": st.sent, "consumed": st.consumed, "stream_base": st.stream_base,
                   "buffered": [list(c) for c in st.buffered]}
            assert got == want, where
            assert st.stream_audio_sent == st.sent - st.stream_base
        else:
            raise AssertionError(f"unknown step {step}")


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def test_resume_case(case: dict[str, Any]) -> None:
    _run(case)


def test_the_cases_cover_every_kind_of_step() -> None:
    """A step kind no case uses would be an untested branch of both SDKs."""
    kinds = {key for case in CASES["cases"] for step in case["steps"] for key in step if key != "duplicate"}
    assert kinds == {"send_audio", "end_of_audio", "interrupt", "audio_out", "frames", "resume", "expect"}
    assert any(s.get("duplicate") for case in CASES["cases"] for s in case["steps"])
