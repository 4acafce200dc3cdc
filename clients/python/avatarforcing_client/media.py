"""Decoding returned video frames and recording a session to an MP4 file.

PyAV (``pip install avatarforcing-client[mp4]``) is imported lazily, only by the functions
that need it: raw RGB frames decode with NumPy alone, JPEG decodes with PyAV's ``mjpeg``
decoder (or Pillow when PyAV is missing), H.264 and fragmented MP4 need PyAV, and so does
:class:`Mp4Writer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

if TYPE_CHECKING:
    from .client import Event, Session

__all__ = ["VideoDecoder", "decode_video_frames", "Mp4Writer", "RecordingStats", "record_session", "ensure_parent_dir"]


def _import_av() -> Any:
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "PyAV is needed for this (pip install 'avatarforcing-client[mp4]' or pip install av)"
        ) from e
    return av


# Sample rates the AAC encoder takes; audio at any other rate is resampled to the next one up when written.
_AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


def ensure_parent_dir(path: str | os.PathLike[str]) -> None:
    """Create the folder ``path`` goes into; an :class:`OSError` that cannot names ``path`` and the folder."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the folder for {os.fspath(path)}: {e.strerror}",
                      e.filename or parent) from None


def _encoding_name(encoding: int) -> str:
    try:
        return pb.VideoEncoding.Name(encoding)  # type: ignore[arg-type]
    except ValueError:
        return str(encoding)


class VideoDecoder:
    """Incremental decoder for the ``VideoFrame.data`` of one session.

    :meth:`decode` takes one frame's data and returns the RGB frames (``uint8`` arrays of
    shape ``[height, width, 3]``) that became available; :meth:`flush` returns the rest.
    Frames whose decoded size differs from ``width`` x ``height`` are rescaled.

    For ``VIDEO_ENCODING_FMP4`` the fragments are buffered and decoded by :meth:`flush`
    (the fragments are compressed, so this stays small).
    """

    def __init__(self, encoding: int, width: int, height: int, init_segment: bytes = b"") -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        self.encoding = int(encoding)
        self.width = int(width)
        self.height = int(height)
        self.init_segment = bytes(init_segment)
        self._ctx: Any = None
        self._pil: Any = None
        self._fragments: list[bytes] = []
        if self.encoding == pb.VIDEO_ENCODING_RAW_RGB24:
            pass
        elif self.encoding == pb.VIDEO_ENCODING_JPEG:
            try:
                av = _import_av()
            except ImportError:
                try:
                    from PIL import Image
                except ImportError as e:
                    raise ImportError("decoding JPEG frames needs PyAV or Pillow") from e
                self._pil = Image
            else:
                self._ctx = av.CodecContext.create("mjpeg", "r")
        elif self.encoding == pb.VIDEO_ENCODING_H264:
            av = _import_av()
            self._ctx = av.CodecContext.create("h264", "r")
        elif self.encoding == pb.VIDEO_ENCODING_FMP4:
            _import_av()
            if not self.init_segment:
                raise ValueError("VIDEO_ENCODING_FMP4 needs the init_segment from SessionStarted")
        else:
            raise ValueError(f"unsupported video encoding {_encoding_name(self.encoding)}")

    def _to_rgb(self, frame: Any) -> np.ndarray:
        if frame.width == self.width and frame.height == self.height:
            arr = frame.to_ndarray(format="rgb24")
        else:
            arr = frame.to_ndarray(format="rgb24", width=self.width, height=self.height)
        return np.ascontiguousarray(arr, dtype=np.uint8)

    def decode(self, data: bytes) -> list[np.ndarray]:
        """Decode one ``VideoFrame.data``; returns the frames now available (usually one)."""
        if self.encoding == pb.VIDEO_ENCODING_RAW_RGB24:
            expected = self.width * self.height * 3
            if len(data) != expected:
                raise ValueError(
                    f"raw RGB frame has {len(data)} bytes, expected {expected} for "
                    f"{self.width}x{self.height} (is the encoding right?)"
                )
            return [np.frombuffer(data, dtype=np.uint8).reshape(self.height, self.width, 3).copy()]
        if self.encoding == pb.VIDEO_ENCODING_FMP4:
            self._fragments.append(bytes(data))
            return []
        if self._pil is not None:
            img = self._pil.open(io.BytesIO(data)).convert("RGB")
            if img.size != (self.width, self.height):
                img = img.resize((self.width, self.height))
            return [np.asarray(img, dtype=np.uint8).copy()]
        av = _import_av()
        return [self._to_rgb(f) for f in self._ctx.decode(av.Packet(bytes(data)))]

    def flush(self) -> list[np.ndarray]:
        """Return the frames still held by the decoder (end of stream)."""
        if self.encoding == pb.VIDEO_ENCODING_FMP4:
            fragments, self._fragments = self._fragments, []
            if not fragments:
                return []
            av = _import_av()
            out: list[np.ndarray] = []
            with av.open(io.BytesIO(self.init_segment + b"".join(fragments)), "r", format="mp4") as c:
                for frame in c.decode(video=0):
                    out.append(self._to_rgb(frame))
            return out
        if self._ctx is None:
            return []
        return [self._to_rgb(f) for f in self._ctx.decode(None)]


def decode_video_frames(
    encoding: int,
    datas: Sequence[bytes],
    width: int,
    height: int,
    init_segment: bytes = b"",
) -> np.ndarray:
    """Decode a session's ``VideoFrame.data`` payloads into RGB frames.

    Args:
        encoding: the session's ``pb.VideoEncoding`` (``SessionStarted.video_encoding``).
        datas: the ``data`` of the frames, in order.
        width, height: the session's frame size (``SessionStarted.width/height``).
        init_segment: ``SessionStarted.init_segment`` (``VIDEO_ENCODING_FMP4`` only).

    Returns:
        A ``uint8`` array of shape ``[N, height, width, 3]``.
    """
    if encoding == pb.VIDEO_ENCODING_RAW_RGB24:
        expected = width * height * 3
        for i, d in enumerate(datas):
            if len(d) != expected:
                raise ValueError(
                    f"raw RGB frame {i} has {len(d)} bytes, expected {expected} for {width}x{height}"
                )
        buf = b"".join(datas)
        return np.frombuffer(buf, dtype=np.uint8).reshape(len(datas), height, width, 3).copy()
    dec = VideoDecoder(encoding, width, height, init_segment)
    frames: list[np.ndarray] = []
    for d in datas:
        frames.extend(dec.decode(d))
    frames.extend(dec.flush())
    if not frames:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack(frames)


class Mp4Writer:
    """Write a session's frames and audio into an MP4 file (H.264 yuv420p + AAC).

    Feed it the session's events with :meth:`add_event` (``pb.VideoFrame`` and ``pb.AudioOut``;
    anything else is ignored) and call :meth:`close` (or use it as a context manager). Video
    frames are decoded (per ``encoding``) and re-encoded with libx264 as they arrive, placed by
    their ``index`` on a ``1/fps`` timeline. ``AudioOut`` PCM is placed at its ``start_sample``
    on the audio timeline, silence fills the gaps, and the audio is padded to the video's
    length and encoded to AAC when the file is closed.

    Args:
        path: output file.
        fps, width, height: from ``SessionStarted``.
        sample_rate: ``SessionStarted.audio_sample_rate_hz``.
        encoding: the session's video encoding (``SessionStarted.video_encoding``).
        init_segment: ``SessionStarted.init_segment`` for ``VIDEO_ENCODING_FMP4``.
        crf, preset: libx264 quality settings.
        audio_bitrate: AAC bitrate in bits per second.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float,
        width: int,
        height: int,
        sample_rate: int,
        *,
        encoding: int = pb.VIDEO_ENCODING_RAW_RGB24,
        init_segment: bytes = b"",
        crf: int = 20,
        preset: str = "veryfast",
        audio_bitrate: int = 64000,
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        av = _import_av()
        self._av = av
        self.path = os.fspath(path)
        self.fps = float(fps)
        self.width = int(width)
        self.height = int(height)
        self.sample_rate = int(sample_rate)
        # AAC takes only some rates: any other is resampled to the next one up (at close).
        self._aac_rate = next((r for r in _AAC_RATES if r >= self.sample_rate), _AAC_RATES[-1])
        self._decoder = VideoDecoder(encoding, width, height, init_segment)
        self._rate = Fraction(self.fps).limit_denominator(1001)
        self._frame_tb = 1 / self._rate
        self._pending: deque[int] = deque()
        self._next_index = 0
        self._last_pts = -1
        self._audio: list[tuple[int, np.ndarray]] = []
        self._audio_end = 0
        self._video_audio_end = 0
        self.frames_written = 0
        self.audio_samples = 0
        self._closed = False

        ensure_parent_dir(self.path)  # the folder is created; when it cannot be, the error names the path
        try:
            self._container = av.open(self.path, "w", format="mp4")
        except OSError as e:
            raise OSError(e.errno, f"cannot write {self.path}: {e.strerror or e}", self.path) from None
        try:
            v = self._container.add_stream("libx264", rate=self._rate)
            # yuv420p needs even dimensions; PyAV rescales frames to the stream's size.
            v.width = self.width + (self.width % 2)
            v.height = self.height + (self.height % 2)
            v.pix_fmt = "yuv420p"
            v.codec_context.time_base = self._frame_tb
            v.options = {"crf": str(crf), "preset": preset}
            a = self._container.add_stream("aac", rate=self._aac_rate, layout="mono")
            a.bit_rate = int(audio_bitrate)
        except BaseException:
            self._container.close()
            raise
        self._vstream = v
        self._astream = a

    @classmethod
    def for_session(
        cls, session: Session | pb.SessionStarted, path: str | os.PathLike[str], **kwargs: Any
    ) -> Mp4Writer:
        """A writer set up from a started :class:`Session` or its ``SessionStarted``."""
        started = session if isinstance(session, pb.SessionStarted) else session.started
        sample_rate = started.audio_sample_rate_hz
        if not sample_rate and not isinstance(session, pb.SessionStarted):
            sample_rate = session.sample_rate
        encoding: int = started.video_encoding
        if not encoding and not isinstance(session, pb.SessionStarted):
            encoding = session.video_encoding
        return cls(
            path,
            started.fps,
            started.width,
            started.height,
            sample_rate or 16000,
            encoding=encoding or pb.VIDEO_ENCODING_RAW_RGB24,
            init_segment=started.init_segment,
            **kwargs,
        )

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- input -------------------------------------------------------------------------------

    def add_event(self, ev: Event | Any) -> None:
        """Add a ``pb.VideoFrame`` or ``pb.AudioOut``; other messages are ignored."""
        if isinstance(ev, pb.VideoFrame):
            self.add_video_frame(ev)
        elif isinstance(ev, pb.AudioOut):
            self.add_audio(ev.data, ev.start_sample)

    def add_video_frame(self, frame: pb.VideoFrame) -> None:
        """Decode one ``VideoFrame`` and encode it at its index."""
        self._check_open()
        self._pending.append(int(frame.index))
        if frame.audio_end_sample:
            self._video_audio_end = max(self._video_audio_end, int(frame.audio_end_sample))
        for rgb in self._decoder.decode(frame.data):
            self._encode_rgb(rgb)

    def add_rgb(self, rgb: np.ndarray, index: int | None = None) -> None:
        """Encode one already decoded ``[height, width, 3]`` uint8 frame (default: next index)."""
        self._check_open()
        self._pending.append(self._next_index if index is None else int(index))
        self._encode_rgb(np.asarray(rgb, dtype=np.uint8))

    def add_audio(self, pcm: bytes | np.ndarray, start_sample: int) -> None:
        """Place PCM16LE bytes (or an int16 array) at ``start_sample`` on the audio timeline."""
        self._check_open()
        if isinstance(pcm, np.ndarray):
            samples = np.asarray(pcm, dtype=np.int16).reshape(-1)
        else:
            if len(pcm) % 2:
                raise ValueError("PCM16 audio must have an even number of bytes")
            samples = np.frombuffer(bytes(pcm), dtype="<i2").astype(np.int16)
        if start_sample < 0:
            raise ValueError("start_sample must be >= 0")
        if samples.size == 0:
            return
        self._audio.append((int(start_sample), samples))
        self.audio_samples += int(samples.size)
        self._audio_end = max(self._audio_end, int(start_sample) + int(samples.size))

    # -- encoding ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Mp4Writer is closed")

    def _mux(self, packets: Any, duration: int) -> None:
        for p in packets:
            if not p.duration:
                p.duration = duration
            self._container.mux(p)

    def _encode_rgb(self, rgb: np.ndarray) -> None:
        index = self._pending.popleft() if self._pending else self._next_index
        pts = max(index, self._last_pts + 1)  # keep pts strictly increasing
        self._last_pts = pts
        self._next_index = pts + 1
        vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        vf.pts = pts
        vf.time_base = self._frame_tb
        self._mux(self._vstream.encode(vf), 1)
        self.frames_written += 1

    def _audio_timeline(self) -> np.ndarray:
        video_end = self._video_audio_end
        if self._next_index:
            video_end = max(video_end, round(self._next_index * self.sample_rate / self.fps))
        total = max(self._audio_end, video_end)
        out = np.zeros(total, dtype=np.int16)
        for start, samples in self._audio:
            out[start : start + samples.size] = samples
        return out

    def _resample(self, audio: np.ndarray) -> np.ndarray:
        """The whole timeline at the AAC rate, of the same duration."""
        r = self._av.AudioResampler(format="s16", layout="mono", rate=self._aac_rate)
        af = self._av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="s16", layout="mono")
        af.sample_rate = self.sample_rate
        parts = [f.to_ndarray().reshape(-1) for f in (*r.resample(af), *r.resample(None))]
        out = np.concatenate(parts) if parts else np.zeros(0, np.int16)
        want = round(audio.size * self._aac_rate / self.sample_rate)
        return np.concatenate([out, np.zeros(max(0, want - out.size), np.int16)])[:want].astype(np.int16)

    def close(self) -> None:
        """Flush the decoder and encoders, write the audio track and finish the file."""
        if self._closed:
            return
        try:
            for rgb in self._decoder.flush():
                self._encode_rgb(rgb)
            self._mux(self._vstream.encode(None), 1)
            audio = self._audio_timeline()
            if self._aac_rate != self.sample_rate and audio.size:
                audio = self._resample(audio)
            step = self._aac_rate  # one second per frame; the encoder re-chunks
            for start in range(0, audio.size, step):
                chunk = audio[start : start + step]
                af = self._av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
                af.sample_rate = self._aac_rate
                af.pts = start
                af.time_base = Fraction(1, self._aac_rate)
                self._mux(self._astream.encode(af), 0)
            self._mux(self._astream.encode(None), 0)
        finally:
            self._closed = True
            self._container.close()
            self._audio.clear()


@dataclass
class RecordingStats:
    """What :func:`record_session` wrote."""

    path: str
    #: Video frames written to the file.
    frames: int
    #: Audio samples received in ``AudioOut`` messages.
    audio_samples: int
    #: ``pb.EndReason`` of the ``End`` message; ``END_REASON_UNSPECIFIED`` if none came.
    end_reason: int = pb.END_REASON_UNSPECIFIED
    end_message: str = ""
    #: The last ``Stats`` message received, if any.
    last_stats: pb.Stats | None = None

    @property
    def end_reason_name(self) -> str:
        return pb.EndReason.Name(self.end_reason)  # type: ignore[arg-type]


async def record_session(
    session: Session,
    path: str | os.PathLike[str],
    *,
    max_frames: int | None = None,
    stop: Callable[[Event], bool] | None = None,
    **writer_kwargs: Any,
) -> RecordingStats:
    """Consume ``session.events()`` into an MP4 file and return what was written.

    Recording ends at ``End``, when the server closes the stream or the session is closed,
    after ``max_frames`` frames, or after the first event for which ``stop(event)`` is true
    (that event is still recorded). With ``PACING_REALTIME`` the stream does not end by itself:
    use ``max_frames``/``stop`` or close the session from another task. Decoding and encoding
    run in a worker thread so the event loop stays free for sending audio.
    """
    writer = await asyncio.to_thread(Mp4Writer.for_session, session, path, **writer_kwargs)
    stats = RecordingStats(path=writer.path, frames=0, audio_samples=0)
    received = 0
    try:
        async with contextlib.aclosing(session.events()) as events:
            async for ev in events:
                if isinstance(ev, pb.VideoFrame):
                    received += 1
                    await asyncio.to_thread(writer.add_event, ev)
                elif isinstance(ev, pb.AudioOut):
                    writer.add_event(ev)
                elif isinstance(ev, pb.Stats):
                    stats.last_stats = ev
                elif isinstance(ev, pb.End):
                    stats.end_reason = ev.reason
                    stats.end_message = ev.message
                if max_frames is not None and received >= max_frames:
                    break
                if stop is not None and stop(ev):
                    break
    finally:
        await asyncio.to_thread(writer.close)
    stats.frames = writer.frames_written
    stats.audio_samples = writer.audio_samples
    return stats
