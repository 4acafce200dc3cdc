"""Real speech for the synthetic benchmark, synthesised with the ``espeak-ng`` binary.

A clip's soundtrack is a sequence of utterances from a fixed sentence pool, each read by one
voice (an espeak-ng language voice plus a variant, e.g. ``en-us+f3``) at a per-utterance speed
(``-s``, words/minute) and pitch (``-p``, 0-99) jittered around the speaker's own values, with
silences of random length before, between and after the utterances. espeak-ng writes 22.05 kHz
16-bit mono WAV to stdout; it is resampled to 16 kHz with PyAV's ``av.AudioResampler`` and
returned as float32 in [-1, 1].

espeak-ng is deterministic for a fixed text/voice/speed/pitch, and every random choice here is
drawn from a ``numpy.random.Generator`` seeded by the caller, so the same seed gives the same
samples (on the same espeak-ng build).
"""

from __future__ import annotations

import functools
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import av
import numpy as np

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050

# Base voices (espeak-ng language voices that ship with the Debian package; mbrola voices are not
# used since they need extra packages). Other-language voices read the English sentences with
# their own phonology, which is fine for lip sync: what matters is real, varied speech.
BASE_VOICES: tuple[str, ...] = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd", "de", "fr-fr", "es", "it", "nl", "pt", "sv", "pl", "da", "es-419",
)
# Voice variants (``+name``): timbre / pitch range / gender.
VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
)

SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Please open the window before you leave.",
    "We will meet at noon by the old bridge.",
    "My favourite colour has always been blue.",
    "The weather today is cold and windy.",
    "She sells sea shells by the sea shore.",
    "Could you pass me the salt, please?",
    "The train to the city leaves at nine.",
    "I think we should start the meeting now.",
    "Bright red apples grow on that tree.",
    "He opened the door and looked outside.",
    "Our team won the game last Sunday.",
    "The museum is closed on Mondays.",
    "Do you remember where we parked the car?",
    "A cup of tea would be lovely right now.",
    "The children played in the park all day.",
    "Turn left at the second traffic light.",
    "Music fills the room with a warm glow.",
    "Every morning I walk along the river.",
    "The package should arrive by Friday.",
    "Why is the sky so blue in summer?",
    "Books are scattered all over the floor.",
    "Keep your voice down, the baby is asleep.",
    "The moon rose slowly above the hills.",
    "We need more paper for the printer.",
    "Her smile could light up the whole room.",
    "Fresh bread smells wonderful in the morning.",
    "How much does this blue jacket cost?",
    "The river flows gently toward the sea.",
    "I would like to book a table for two.",
    "Snow covered the roofs of the small town.",
    "Who left the lights on in the kitchen?",
    "The old clock struck twelve at midnight.",
    "Let us go for a walk after dinner.",
    "Good ideas often come at strange times.",
    "The cat sat quietly on the warm mat.",
    "You can find the keys in the top drawer.",
    "A gentle breeze moved through the trees.",
    "The pilot announced a short delay.",
    "We watched the sunset from the beach.",
    "Please write your name at the top of the page.",
    "Nobody knew the answer to the riddle.",
    "The shop on the corner sells fresh fruit.",
    "Thank you very much for your kind help.",
    "Rain is expected later this evening.",
    "The garden is full of yellow flowers.",
    "Could you speak a little more slowly?",
    "The doctor will see you in a moment.",
    "Two boats floated calmly on the lake.",
    "I forgot to bring my umbrella again.",
    "Open your books to chapter seven.",
    "The soup is too hot to eat right now.",
    "Wolves howled loudly in the distance.",
    "Our neighbours moved here from Oslo.",
    "What time does the movie begin tonight?",
    "A small boy found a shiny silver coin.",
    "Move the chairs closer to the fire.",
    "Oh, you really should hear this story!",
    "Zebras and giraffes live on the open plain.",
    "Each evening the owls return to the barn.",
    "Few people ever visit that quiet island.",
    "Follow the path until you reach the gate.",
)


@dataclass(frozen=True)
class Voice:
    """A speaker: espeak-ng voice name plus the speaker's mean speed and pitch."""

    base: str
    variant: str
    speed: int  # words per minute (espeak-ng -s)
    pitch: int  # 0..99 (espeak-ng -p)

    @property
    def name(self) -> str:
        return f"{self.base}+{self.variant}"


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM mono from a RIFF stream (espeak-ng's --stdout sizes are bogus: read to EOF)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("espeak-ng did not return a WAV stream")
    pos, rate = 12, ESPEAK_RATE
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt ":
            channels, rate = struct.unpack("<HI", data[pos + 10:pos + 16])
            if channels != 1:
                raise ValueError(f"expected mono speech, got {channels} channels")
        elif cid == b"data":
            raw = data[pos + 8:]
            raw = raw[: len(raw) // 2 * 2]
            return np.frombuffer(raw, dtype="<i2").copy(), int(rate)
        pos += 8 + size
    raise ValueError("no data chunk in espeak-ng output")


def resample(pcm: np.ndarray, rate: int, out_rate: int = SAMPLE_RATE) -> np.ndarray:
    """int16 mono at ``rate`` -> float32 mono at ``out_rate`` with av.AudioResampler."""
    if pcm.size == 0:
        return np.zeros(0, np.float32)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16)[None, :],
                                       format="s16", layout="mono")
    frame.sample_rate = rate
    res = av.AudioResampler(format="flt", layout="mono", rate=out_rate)
    chunks = [f.to_ndarray().reshape(-1) for f in res.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in res.resample(None)]
    out = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return np.clip(out.astype(np.float32), -1.0, 1.0)


@functools.lru_cache(maxsize=512)
def _synth_cached(text: str, voice: str, speed: int, pitch: int) -> bytes:
    proc = subprocess.run(
        ["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text],
        check=True, capture_output=True, timeout=60,
    )
    pcm, rate = _parse_wav(proc.stdout)
    return resample(pcm, rate).tobytes()


def synthesize(text: str, voice: str, speed: int = 160, pitch: int = 50) -> np.ndarray:
    """One utterance: float32 [S] at 16 kHz, in [-1, 1] (leading/trailing espeak silence trimmed)."""
    audio = np.frombuffer(_synth_cached(text, voice, int(speed), int(pitch)), dtype=np.float32).copy()
    loud = np.flatnonzero(np.abs(audio) > 1e-3)
    if loud.size:
        audio = audio[loud[0]:loud[-1] + 1]
    return audio


def sample_voice(rng: np.random.Generator, bases: Sequence[str] = BASE_VOICES,
                 variants: Sequence[str] = VARIANTS) -> Voice:
    return Voice(base=str(rng.choice(list(bases))), variant=str(rng.choice(list(variants))),
                 speed=int(rng.integers(130, 191)), pitch=int(rng.integers(25, 76)))


def make_speech(rng: np.random.Generator, n_samples: int, voice: Voice,
                sentences: Sequence[str] = SENTENCES, sample_rate: int = SAMPLE_RATE,
                ) -> tuple[np.ndarray, list[str]]:
    """``n_samples`` of speech: utterances separated by random silences; returns (audio, texts).

    Silences: 0.1-0.8 s before the first utterance, 0.15-1.2 s between utterances. Per utterance
    the speed varies by +-15 wpm and the pitch by +-8 around the voice's own. Each utterance is
    scaled to a peak of 0.5-0.95. The last utterance is cut at ``n_samples``.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"speech is produced at {SAMPLE_RATE} Hz")
    parts: list[np.ndarray] = []
    texts: list[str] = []
    total = int(rng.uniform(0.1, 0.8) * sample_rate)
    parts.append(np.zeros(total, np.float32))
    pool = list(sentences)
    while total < n_samples:
        text = str(pool[int(rng.integers(len(pool)))])
        speed = int(np.clip(voice.speed + rng.integers(-15, 16), 80, 400))
        pitch = int(np.clip(voice.pitch + rng.integers(-8, 9), 0, 99))
        utt = synthesize(text, voice.name, speed, pitch)
        peak = float(np.max(np.abs(utt))) if utt.size else 0.0
        if peak > 0:
            utt = utt * np.float32(rng.uniform(0.5, 0.95) / peak)
        gap = np.zeros(int(rng.uniform(0.15, 1.2) * sample_rate), np.float32)
        parts += [utt.astype(np.float32), gap]
        texts.append(text)
        total += utt.size + gap.size
    audio = np.concatenate(parts)[:n_samples]
    return np.clip(audio, -1.0, 1.0).astype(np.float32), texts
