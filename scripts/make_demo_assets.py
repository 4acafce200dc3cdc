"""Regenerate the bundled demo assets in ``avatarforcing/assets/``.

Usage (from the repository root)::

    .venv/bin/python scripts/make_demo_assets.py            # writes avatarforcing/assets/
    .venv/bin/python scripts/make_demo_assets.py --out-dir /tmp/assets

Writes:

- ``speech_16k.wav``: three English sentences spoken by espeak-ng (voice ``en-us``, 165 words
  per minute), each trimmed of its leading/trailing silence and joined with 350 ms pauses,
  with 200 ms of silence at both ends; resampled from espeak-ng's 22050 Hz to 16 kHz with
  PyAV's ``AudioResampler``; mono, signed 16-bit PCM, about 9 seconds.
- ``reference_face.png``: a 128x128 RGB cartoon face drawn with Pillow (flat background, hair,
  face oval, ears, eyebrows, two eyes, nose, closed mouth in the lower third, neck and
  shoulders), drawn at 4x and downscaled for smooth edges.

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
from PIL import Image, ImageDraw

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


def make_face(path: Path) -> None:
    """Draw the cartoon reference face and save it as an RGB PNG."""
    s = SUPERSAMPLE
    n = FACE_SIZE * s

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        return (round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s))

    background = (118, 165, 196)
    skin = (241, 196, 160)
    skin_shade = (222, 170, 134)
    hair = (84, 52, 33)
    shirt = (58, 92, 140)
    eye_white = (250, 250, 246)
    iris = (70, 104, 60)
    pupil = (20, 20, 24)
    lips = (184, 84, 84)
    line = (120, 70, 52)

    img = Image.new("RGB", (n, n), background)
    d = ImageDraw.Draw(img)
    # Shoulders and neck.
    d.ellipse(box(14, 108, 114, 160), fill=shirt)
    d.rectangle(box(54, 92, 74, 114), fill=skin_shade)
    d.ellipse(box(54, 106, 74, 118), fill=skin_shade)
    # Hair behind the head.
    d.ellipse(box(28, 10, 100, 84), fill=hair)
    d.rectangle(box(30, 44, 98, 80), fill=hair)
    # Ears.
    d.ellipse(box(30, 50, 42, 68), fill=skin_shade)
    d.ellipse(box(86, 50, 98, 68), fill=skin_shade)
    # Face oval.
    d.ellipse(box(36, 22, 92, 102), fill=skin)
    # Fringe over the forehead.
    d.chord(box(34, 14, 94, 58), start=180, end=360, fill=hair)
    d.pieslice(box(30, 20, 58, 56), start=180, end=270, fill=hair)
    # Eyebrows.
    d.line([box(46, 47, 56, 45)[:2], box(46, 47, 56, 45)[2:]], fill=hair, width=2 * s)
    d.line([box(72, 45, 82, 47)[:2], box(72, 45, 82, 47)[2:]], fill=hair, width=2 * s)
    # Eyes: white, iris, pupil, highlight.
    for cx in (51.0, 77.0):
        d.ellipse(box(cx - 6, 51, cx + 6, 59), fill=eye_white, outline=line, width=s)
        d.ellipse(box(cx - 3, 52, cx + 3, 58), fill=iris)
        d.ellipse(box(cx - 1.5, 53.5, cx + 1.5, 56.5), fill=pupil)
        d.ellipse(box(cx + 0.5, 53, cx + 1.8, 54.3), fill=eye_white)
    # Nose.
    d.line(
        [box(64, 60, 0, 0)[:2], box(61, 72, 0, 0)[:2], box(65, 74, 0, 0)[:2]],
        fill=skin_shade,
        width=2 * s,
        joint="curve",
    )
    # Closed mouth in the lower third: lips with a line between them.
    d.chord(box(56, 84, 72, 90), start=180, end=360, fill=lips)
    d.chord(box(56, 83, 72, 92), start=0, end=180, fill=lips)
    d.line([box(55, 87.5, 73, 87.5)[:2], box(55, 87.5, 73, 87.5)[2:]], fill=(132, 52, 52), width=s)
    # Cheeks.
    d.ellipse(box(42, 70, 50, 76), fill=(238, 170, 150))
    d.ellipse(box(78, 70, 86, 76), fill=(238, 170, 150))

    face = img.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.LANCZOS)
    face.save(path, format="PNG", optimize=True)


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
