"""Per-session audio input: validation, block cutting and silence insertion, resampling."""

from __future__ import annotations

import numpy as np
import pytest

from avatarforcing_service.audio_in import AudioError, AudioInput, AudioOverflowError, rate_problem, rates_for


def make(rate: int = 16000, **kw: float) -> AudioInput:
    return AudioInput(rate, 16000, 4, 25.0, kw.get("max_chunk_ms", 1000.0), kw.get("max_buffered_s", 60.0))


def test_rejects_bad_chunks_and_rates() -> None:
    for bad in (7999, 96000):
        with pytest.raises(AudioError, match=f"{bad} Hz is not supported; use a rate from 8000 to 48000 Hz"):
            make(bad)
    with pytest.raises(AudioError, match="22051 Hz gives 882.04 samples per video frame at 25 fps"):
        make(22051)
    a = make()
    with pytest.raises(AudioError, match="whole number"):
        a.push(b"\0\0\0", 0.0)
    with pytest.raises(AudioError, match="exceeds the limit"):
        a.push(b"\0" * 2 * 16001, 0.0)
    b = make(max_buffered_s=0.1)
    b.push(b"\0" * 2 * 1600, 0.0)
    with pytest.raises(AudioOverflowError, match="faster than real time"):
        b.push(b"\0\0", 0.0)
    assert a.received == 0 and a.buffered == 0


def test_full_blocks_are_the_clients_samples() -> None:
    a = make()
    x = np.arange(1, 2 * 2560 + 1, dtype=np.int16)
    a.push(x.tobytes(), 1.0)
    b0, b1 = a.take_block(), a.take_block()
    assert np.array_equal(np.concatenate([b0.pcm_in, b1.pcm_in]), x)
    assert (b0.start_sample, b1.start_sample) == (0, 2560) and b0.real_samples == 2560
    assert np.allclose(b0.pcm_model * 32768, x[:2560])
    assert b0.newest_arrival == 1.0


def test_silence_goes_before_speech_that_starts_and_after_speech_that_stops() -> None:
    a = make()
    assert a.take_block().real_samples == 0  # idle: all silence
    a.push(np.full(1000, 7, np.int16).tobytes(), 0.0)
    start = a.take_block()  # speech starts inside the block: silence first, speech at the end
    assert start.real_samples == 1000 and not start.pcm_in[:1560].any() and (start.pcm_in[1560:] == 7).all()
    assert start.real_offset == 1560
    a.push(np.full(2560 + 500, 9, np.int16).tobytes(), 0.0)
    assert (a.take_block().pcm_in == 9).all()  # flowing speech: full block
    stop = a.take_block()  # speech stalls: what there is first, then silence
    assert (stop.pcm_in[:500] == 9).all() and not stop.pcm_in[500:].any()
    assert (stop.real_samples, stop.real_offset) == (500, 0)
    assert a.silence_inserted == 2560 + 1560 + 2060


def test_clear_drops_buffered_audio() -> None:
    a = make()
    a.push(np.ones(4000, np.int16).tobytes(), 0.0)
    assert a.clear() == 4000 and a.buffered == 0
    assert a.take_block().real_samples == 0


def test_any_rate_with_whole_samples_per_frame_is_taken() -> None:
    # espeak-ng's 22,050 Hz and CD audio's 44,100 Hz included: every multiple of 25 Hz from 8 to 48 kHz at 25 fps.
    assert all(rate_problem(r, 25.0) is None for r in range(8000, 48001, 25))
    assert [r for r in range(8000, 48001) if rate_problem(r, 25.0) is None] == list(range(8000, 48001, 25))
    assert rates_for(25.0) == [8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000]
    assert rates_for(30.0) == [12000, 22050, 24000, 44100, 48000]  # 16,000 / 30 is no whole number
    assert make(22050).in_block == 4 * 882 and make(44100).in_block == 4 * 1764


@pytest.mark.parametrize("rate", [8000, 8025, 11025, 22050, 24000, 32000, 44100, 48000])
def test_resampled_stream_is_continuous(rate: int) -> None:
    a = make(rate)
    t = np.arange(rate) / rate
    x = (np.sin(2 * np.pi * 300 * t) * 10000).astype(np.int16)
    for i in range(0, rate, rate // 50):
        a.push(x[i : i + rate // 50].tobytes(), 0.0)
    blocks = [a.take_block() for _ in range(rate // a.in_block)]
    assert all(b.pcm_in.shape == (a.in_block,) and b.pcm_model.shape == (2560,) for b in blocks)
    y = np.concatenate([b.pcm_model for b in blocks])[400:]
    # A 300 Hz tone at 16 kHz: its samples match a sine fitted at that frequency (no clicks at block joins).
    tt = np.arange(y.shape[0]) / 16000
    basis = np.stack([np.sin(2 * np.pi * 300 * tt), np.cos(2 * np.pi * 300 * tt)], 1)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    assert np.abs(basis @ coef - y).max() < 0.02 and np.hypot(*coef) == pytest.approx(10000 / 32768, rel=0.05)
