"""Regenerate the bundled demo assets in ``avatarforcing/assets/``.

Usage (from the repository root)::

    .venv/bin/python scripts/make_demo_assets.py            # writes avatarforcing/assets/
    .venv/bin/python scripts/make_demo_assets.py --out-dir /tmp/assets

Writes:

- ``speech_16k.wav``: three English sentences spoken by espeak-ng (voice ``en-us``, 165 words
  per minute), each trimmed of its leading/trailing silence and joined with 350 ms pauses,
  with 200 ms of silence at both ends; resampled from espeak-ng's 22050 Hz to 16 kHz with
  PyAV's ``AudioResampler``; mono, signed 16-bit PCM, about 9 seconds.
- ``reference_face.png``: a 128x128 RGB cartoon face from the project's parametric face
  renderer (``avatarforcing.data.render_reference``), identity seed ``DEMO_IDENTITY_SEED`` of the
  held-out test split (the shipped model has never seen it).

Both are deterministic: the same espeak-ng, PyAV and Pillow versions give the same bytes.
Needs the ``espeak-ng`` command, PyAV and Pillow.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "avatarforcing" / "assets"

SENTENCES = (
    "Hello! I am a digital avatar, and my lips move as I speak.",
    "Audio streams in, and video streams out in real time.",
    "Thanks for watching.",
)
VOICE = "en-us"
WORDS_PER_MINUTE = 165
SAMPLE_RATE = 16000
PAUSE_S = 0.35
EDGE_S = 0.2
FACE_SIZE = 128
SUPERSAMPLE = 4


# -- speech --------------------------------------------------------------------------------------


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise RuntimeError(f"{path}: expected mono 16-bit output from espeak-ng")
        rate = w.getframerate()
        data = w.readframes(w.getnframes())
    return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.int16), rate


def _speak(text: str, tmp: Path) -> tuple[np.ndarray, int]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng not found (apt-get install espeak-ng)")
    out = tmp / "sentence.wav"
    subprocess.run(
        [exe, "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "-w", str(out), text],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return _read_wav(out)


def _trim(samples: np.ndarray, rate: int, threshold: int = 200, margin_s: float = 0.03) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > threshold)
    if loud.size == 0:
        return samples[:0]
    margin = int(margin_s * rate)
    return samples[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return samples
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate_out)
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate_in
    frame.pts = 0
    frame.time_base = Fraction(1, rate_in)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.int16)


def make_speech(path: Path) -> float:
    """Write the demo speech WAV; returns its duration in seconds."""
    parts: list[np.ndarray] = []
    rate = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(SENTENCES):
            samples, rate = _speak(text, Path(tmp))
            if i:
                parts.append(np.zeros(int(PAUSE_S * rate), dtype=np.int16))
            parts.append(_trim(samples, rate))
    edge = np.zeros(int(EDGE_S * rate), dtype=np.int16)
    speech = np.concatenate([edge, *parts, edge])
    speech = _resample(speech, rate, SAMPLE_RATE)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(speech.astype("<i2").tobytes())
    return speech.size / SAMPLE_RATE


# -- face ----------------------------------------------------------------------------------------
DEMO_IDENTITY_SEED = 2_000_777  # from the TEST split's identity range: never seen in training


def make_face(path: Path) -> None:
    """Render the reference face with the project's own face renderer (a held-out test identity).

    The shipped model was trained on faces of this renderer only, so the demo's face is one the
    model can animate; its identity seed lies in the test split's range, so it was never trained on.
    """
    sys.path.insert(0, str(ROOT))
    from avatarforcing.data import render_reference, sample_identity

    Image.fromarray(render_reference(sample_identity(DEMO_IDENTITY_SEED))).save(path, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    wav = out / "speech_16k.wav"
    png = out / "reference_face.png"
    seconds = make_speech(wav)
    make_face(png)
    print(f"{wav}: {seconds:.2f} s, {SAMPLE_RATE} Hz mono 16-bit, {wav.stat().st_size} bytes")
    print(f"{png}: {FACE_SIZE}x{FACE_SIZE} RGB, {png.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
