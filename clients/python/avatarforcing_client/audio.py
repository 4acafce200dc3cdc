"""WAV and PCM helpers for feeding audio to an AvatarForcing session.

The service takes signed 16-bit little-endian mono PCM (``AUDIO_ENCODING_PCM16LE``). These
helpers read and write such WAV files with the standard library's :mod:`wave` module and cut
sample arrays into fixed-duration chunks of PCM bytes, ready for
:meth:`avatarforcing_client.Session.send_audio`. A WAV file with several channels (stereo) is
mixed down to mono (the mean of its channels); no resampling is done (the server takes any rate
from 8 to 48 kHz with a whole number of samples per video frame, 22,050 and 44,100 Hz included).
A file that is not 16-bit PCM is rejected with a :class:`ValueError` that says what it holds.
"""

from __future__ import annotations

import os
import wave
from collections.abc import Iterator

import numpy as np

__all__ = ["read_wav", "write_wav", "pcm_chunks", "pcm_to_samples", "samples_to_pcm"]

_PCM_DTYPE = np.dtype("<i2")


def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV file, mono or with several channels (mixed down to mono).

    Returns ``(samples, sample_rate)`` where ``samples`` is a 1-D ``int16`` array: the file's
    samples, or for a stereo (multi-channel) file the mean of its channels, rounded half away
    from zero.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a PCM WAV file, or is not 16-bit.
    """
    try:
        with wave.open(os.fspath(path), "rb") as w:
            channels = w.getnchannels()
            width = w.getsampwidth()
            rate = w.getframerate()
            n = w.getnframes()
            if channels < 1:
                raise ValueError(f"{os.fspath(path)}: WAV file with {channels} channels")
            if width != 2:
                raise ValueError(
                    f"{os.fspath(path)}: expected 16-bit PCM samples, got {8 * width}-bit "
                    "(convert it to signed 16-bit PCM first)"
                )
            data = w.readframes(n)
    except wave.Error as e:
        raise ValueError(f"{os.fspath(path)}: not a PCM WAV file ({e})") from e
    except EOFError as e:
        raise ValueError(f"{os.fspath(path)}: truncated or empty WAV file") from e
    frame = 2 * channels
    usable = len(data) - (len(data) % frame)
    samples = np.frombuffer(data[:usable], dtype=_PCM_DTYPE).astype(np.int16)
    if channels > 1:  # mix down: the mean of the channels, rounded half away from zero (as the Go SDK)
        total = samples.reshape(-1, channels).astype(np.int64).sum(axis=1)
        mean = (2 * np.abs(total) + channels) // (2 * channels)
        samples = (np.sign(total) * mean).astype(np.int16)
    return samples, rate


def _as_int16(samples: np.ndarray) -> np.ndarray:
    arr = np.asarray(samples)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D array of mono samples, got shape {arr.shape}")
    if arr.dtype == np.int16:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < -32768 or arr.max() > 32767):
            raise ValueError("integer samples out of the int16 range")
        return arr.astype(np.int16)
    raise ValueError(
        f"expected int16 samples, got dtype {arr.dtype} "
        "(scale float audio with np.clip(x, -1, 1) * 32767 and cast to int16)"
    )


def write_wav(path: str | os.PathLike[str], samples: np.ndarray, sample_rate: int) -> None:
    """Write a 1-D array of ``int16`` samples as a mono 16-bit PCM WAV file.

    Other integer dtypes are accepted when the values fit in int16; float arrays are rejected.
    """
    arr = _as_int16(samples)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(arr.astype(_PCM_DTYPE, copy=False).tobytes())


def samples_to_pcm(samples: np.ndarray) -> bytes:
    """Encode a 1-D ``int16`` array as PCM16LE bytes."""
    return _as_int16(samples).astype(_PCM_DTYPE, copy=False).tobytes()


def pcm_to_samples(pcm: bytes) -> np.ndarray:
    """Decode PCM16LE bytes (an even number of them) into a 1-D ``int16`` array."""
    if len(pcm) % 2:
        raise ValueError(f"PCM16 data must have an even number of bytes, got {len(pcm)}")
    return np.frombuffer(pcm, dtype=_PCM_DTYPE).astype(np.int16)


def pcm_chunks(samples: np.ndarray, sample_rate: int, chunk_ms: int = 20) -> Iterator[bytes]:
    """Cut mono ``int16`` samples into PCM16LE chunks of ``chunk_ms`` milliseconds each.

    Every chunk holds ``sample_rate * chunk_ms // 1000`` samples except possibly the last,
    which holds the remainder. An empty array yields nothing.
    """
    arr = _as_int16(samples)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if chunk_ms <= 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms}")
    step = max(1, sample_rate * chunk_ms // 1000)
    pcm = arr.astype(_PCM_DTYPE, copy=False)
    for start in range(0, len(pcm), step):
        yield pcm[start : start + step].tobytes()
