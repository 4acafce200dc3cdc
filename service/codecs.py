"""Video frame encoders for the streaming API (decoding is the client's: ``avatarforcing_client.media``).

Each session streams generated RGB frames to the client in one of the
``avatarforcing.v1.VideoEncoding`` formats:

* ``VIDEO_ENCODING_RAW_RGB24`` -- raw ``height * width * 3`` bytes per frame, row-major RGB.
* ``VIDEO_ENCODING_JPEG``      -- one baseline JPEG per frame (Pillow).
* ``VIDEO_ENCODING_H264``      -- one H.264 Annex-B access unit per frame (libx264 via PyAV),
  no B-frames, zero latency, SPS/PPS repeated in-band on every keyframe.
* ``VIDEO_ENCODING_FMP4``      -- fragmented MP4 (H.264 inside): an init segment
  (``ftyp`` + ``moov``) followed by one ``moof`` + ``mdat`` fragment per frame.

All encoders are low-latency: :meth:`FrameEncoder.encode` returns exactly one
:class:`EncodedFrame` per input frame, immediately.  Encoders are *not*
thread-safe; use one per session (each runs single-threaded, since many sessions
run in parallel).

FMP4 implementation note: FFmpeg's mp4 muxer only writes a fragment when the
*next* packet arrives (``frag_every_frame`` / ``frag_duration``) or when
``av_write_frame(ctx, NULL)`` is called (``frag_custom``), which PyAV does not
expose.  Either way the newest frame would be held back by one frame.  So the
init segment is produced by FFmpeg's mp4 muxer
(``movflags=frag_custom+empty_moov+default_base_moof``), and the per-frame
``moof`` + ``mdat`` fragments are written here (ISO/IEC 14496-12 boxes, the same
layout FFmpeg writes with ``default_base_moof``), so each fragment is available as
soon as its frame is encoded.
"""

from __future__ import annotations

import abc
import io
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from PIL import Image

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

__all__ = [
    "SUPPORTED_ENCODINGS",
    "EncodedFrame",
    "FrameEncoder",
    "UnsupportedEncodingError",
    "encoding_name",
    "make_encoder",
]

SUPPORTED_ENCODINGS: tuple[int, ...] = (
    pb.VIDEO_ENCODING_RAW_RGB24,
    pb.VIDEO_ENCODING_JPEG,
    pb.VIDEO_ENCODING_H264,
    pb.VIDEO_ENCODING_FMP4,
)

DEFAULT_JPEG_QUALITY = 85
_ANNEXB_START_CODE = b"\x00\x00\x00\x01"


class UnsupportedEncodingError(ValueError):
    """The requested ``VideoEncoding`` value is unknown, unspecified or not supported."""


@dataclass(frozen=True)
class EncodedFrame:
    """One encoded video frame as sent on the wire."""

    data: bytes
    keyframe: bool


def encoding_name(encoding: int) -> str:
    """The proto name of a ``VideoEncoding`` value (or ``"<n>"`` if unknown)."""
    try:
        return pb.VideoEncoding.Name(encoding)
    except ValueError:
        return f"<{encoding}>"


def _supported_names() -> str:
    return ", ".join(f"{encoding_name(e)} ({e})" for e in SUPPORTED_ENCODINGS)


def _check_encoding(encoding: int) -> None:
    if isinstance(encoding, bool) or encoding not in SUPPORTED_ENCODINGS:
        raise UnsupportedEncodingError(
            f"unsupported video encoding {encoding_name(encoding)}; supported: {_supported_names()}"
        )


class FrameEncoder(abc.ABC):
    """Encodes batches of RGB frames; one instance per stream.

    Subclasses set :attr:`encoding` and implement :meth:`_encode_checked`.
    """

    #: The ``avatarforcing.v1.VideoEncoding`` value produced.
    encoding: int

    def __init__(self, width: int, height: int, fps: float) -> None:
        self.width = width
        self.height = height
        self.fps = fps
        self._closed = False

    @property
    def init_segment(self) -> bytes:
        """Bytes a client needs before the first frame (``b""`` except for FMP4)."""
        return b""

    @property
    def closed(self) -> bool:
        return self._closed

    def encode(self, frames: np.ndarray) -> list[EncodedFrame]:
        """Encode ``frames`` (uint8 ``[N, H, W, 3]`` RGB) into ``N`` :class:`EncodedFrame` in order.

        Raises ``ValueError`` for a wrong dtype/shape and ``RuntimeError`` once closed.
        """
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if not isinstance(frames, np.ndarray):
            raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must have dtype uint8, got {frames.dtype}")
        expected = (self.height, self.width, 3)
        if frames.ndim != 4 or tuple(frames.shape[1:]) != expected:
            raise ValueError(
                f"frames must have shape [N, {self.height}, {self.width}, 3] (RGB), got {list(frames.shape)}"
            )
        if frames.shape[0] == 0:
            return []
        return self._encode_checked(np.ascontiguousarray(frames))

    @abc.abstractmethod
    def _encode_checked(self, frames: np.ndarray) -> list[EncodedFrame]:
        """Encode validated, C-contiguous ``[N, H, W, 3]`` uint8 frames (N >= 1)."""

    def force_keyframe(self) -> None:  # noqa: B027 - intentionally a no-op by default
        """Make the next encoded frame a keyframe (IDR). No-op for intra-only encodings."""

    def force_keyframes(self, n: int) -> None:  # noqa: B027 - intentionally a no-op by default
        """Make each of the next ``n`` encoded frames a keyframe (IDR). No-op for intra-only encodings."""

    def close(self) -> None:
        """Free the encoder. Idempotent; :meth:`encode` raises ``RuntimeError`` afterwards."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Free codec resources (called once by :meth:`close`)."""

    def __enter__(self) -> FrameEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawRGB24Encoder(FrameEncoder):
    """Raw row-major RGB bytes; every frame is a keyframe."""

    encoding = pb.VIDEO_ENCODING_RAW_RGB24

    def _encode_checked(self, frames: np.ndarray) -> list[EncodedFrame]:
        return [EncodedFrame(data=f.tobytes(), keyframe=True) for f in frames]


class JpegEncoder(FrameEncoder):
    """One baseline JPEG per frame (Pillow); every frame is a keyframe."""

    encoding = pb.VIDEO_ENCODING_JPEG

    def __init__(self, width: int, height: int, fps: float, quality: int = DEFAULT_JPEG_QUALITY) -> None:
        super().__init__(width, height, fps)
        self.quality = quality

    def _encode_checked(self, frames: np.ndarray) -> list[EncodedFrame]:
        out = []
        for f in frames:
            buf = io.BytesIO()
            Image.fromarray(f, mode="RGB").save(buf, format="JPEG", quality=self.quality, progressive=False)
            out.append(EncodedFrame(data=buf.getvalue(), keyframe=True))
        return out


def _frame_rate(fps: float) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return rate


def _configure_x264(
    ctx: Any, width: int, height: int, rate: Fraction, gop: int, bitrate_bps: int, repeat_headers: bool
) -> None:
    """Low-latency libx264 settings: one packet out per frame in, no B-frames, fixed GOP."""
    ctx.width = width
    ctx.height = height
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = 1 / rate
    ctx.framerate = rate
    ctx.gop_size = gop
    ctx.max_b_frames = 0
    ctx.thread_count = 1  # many sessions encode in parallel; one thread each
    x264_params = ["scenecut=0"]  # keyframes only every `gop` frames or when forced
    if repeat_headers:
        x264_params.append("repeat-headers=1")  # SPS/PPS before every IDR (Annex-B)
    options = {
        "preset": "ultrafast",
        "tune": "zerolatency",  # no lookahead / frame threading: packet out immediately
        "bframes": "0",
        "forced-idr": "1",  # a forced keyframe is an IDR, not just an I-frame
        "x264-params": ":".join(x264_params),
    }
    if bitrate_bps > 0:
        ctx.bit_rate = bitrate_bps
        options["maxrate"] = str(bitrate_bps)
        options["bufsize"] = str(bitrate_bps)  # ~1 s VBV buffer
    ctx.options = options


class _X264EncoderBase(FrameEncoder):
    """Shared frame submission for the libx264-based encoders."""

    def __init__(self, width: int, height: int, fps: float) -> None:
        super().__init__(width, height, fps)
        self._rate = _frame_rate(fps)
        self._pts = 0
        self._force_next = False
        self._keyframes_left = 0

    def force_keyframe(self) -> None:
        self._force_next = True

    def force_keyframes(self, n: int) -> None:
        self._keyframes_left = max(int(n), 0)

    def _encode_one(self, ctx: Any, rgb: np.ndarray) -> av.Packet:
        """Encode one frame and return its single packet (zero-latency contract)."""
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self._pts
        frame.time_base = ctx.time_base
        if self._force_next or self._keyframes_left > 0:
            frame.pict_type = av.video.frame.PictureType.I
            self._force_next = False
            self._keyframes_left = max(self._keyframes_left - 1, 0)
        packets = ctx.encode(frame)
        if len(packets) != 1:
            raise RuntimeError(
                f"libx264 returned {len(packets)} packets for frame {self._pts} "
                "(expected exactly 1: encoder must run with tune=zerolatency, bframes=0)"
            )
        self._pts += 1
        return packets[0]


class H264Encoder(_X264EncoderBase):
    """H.264 Annex-B access units, one per frame, no B-frames, SPS/PPS on every keyframe."""

    encoding = pb.VIDEO_ENCODING_H264

    def __init__(self, width: int, height: int, fps: float, *, bitrate_bps: int = 0, gop: int) -> None:
        super().__init__(width, height, fps)
        self.gop = gop
        ctx = av.CodecContext.create("libx264", "w")
        _configure_x264(ctx, width, height, self._rate, gop, bitrate_bps, repeat_headers=True)
        ctx.open()
        self._ctx: Any = ctx

    def _encode_checked(self, frames: np.ndarray) -> list[EncodedFrame]:
        out = []
        for f in frames:
            pkt = self._encode_one(self._ctx, f)
            out.append(EncodedFrame(data=bytes(pkt), keyframe=bool(pkt.is_keyframe)))
        return out

    def _release(self) -> None:
        self._ctx = None  # PyAV frees the AVCodecContext on dealloc


# --- ISO BMFF helpers --------------------------------------------------------------------


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def iter_boxes(data: bytes, start: int = 0, end: int | None = None):
    """Yield ``(type, offset, size)`` for the boxes in ``data[start:end]``."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"truncated or invalid MP4 box {kind!r} at offset {pos}")
        yield kind, pos, size
        pos += size


def find_box(data: bytes, path: list[bytes], start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Offset and size of the first box along ``path`` (e.g. ``[b"moov", b"trak", b"tkhd"]``)."""
    for kind, off, size in iter_boxes(data, start, end):
        if kind == path[0]:
            if len(path) == 1:
                return off, size
            return find_box(data, path[1:], off + 8, off + size)
    raise ValueError(f"MP4 box {b'/'.join(path)!r} not found")


def _annexb_to_length_prefixed(data: bytes) -> bytes:
    """Convert an Annex-B access unit into 4-byte length-prefixed NAL units (ISO 14496-15)."""
    if not (data.startswith(b"\x00\x00\x01") or data.startswith(_ANNEXB_START_CODE)):
        return data  # already length-prefixed
    nals = []
    pos = data.find(b"\x00\x00\x01")
    while pos >= 0:
        start = pos + 3
        nxt = data.find(b"\x00\x00\x01", start)
        end = len(data) if nxt < 0 else nxt
        nal = data[start:end]
        if nxt >= 0:
            nal = nal.rstrip(b"\x00")  # zero_byte / trailing_zero_8bits before the next start code
        if nal:
            nals.append(struct.pack(">I", len(nal)) + nal)
        pos = nxt
    return b"".join(nals)


_SAMPLE_FLAGS_SYNC = 0x02000000  # sample_depends_on = 2 (I-frame)
_SAMPLE_FLAGS_NON_SYNC = 0x01010000  # sample_depends_on = 1, sample_is_non_sync_sample = 1


class FMP4Encoder(_X264EncoderBase):
    """Fragmented MP4 (H.264): ``init_segment`` then one ``moof`` + ``mdat`` per frame."""

    encoding = pb.VIDEO_ENCODING_FMP4

    def __init__(self, width: int, height: int, fps: float, *, bitrate_bps: int = 0, gop: int) -> None:
        super().__init__(width, height, fps)
        self.gop = gop
        self._buf = io.BytesIO()
        # The mp4 muxer writes ftyp + an empty moov (with mvex) at start_encoding(); the codec's
        # global header (SPS/PPS) goes into avcC.  Samples are never muxed through it.
        container = av.open(
            self._buf,
            "w",
            format="mp4",
            options={"movflags": "frag_custom+empty_moov+default_base_moof", "flush_packets": "1"},
        )
        try:
            stream = container.add_stream("libx264", rate=self._rate)
            _configure_x264(
                stream.codec_context, width, height, self._rate, gop, bitrate_bps, repeat_headers=False
            )
            stream.time_base = 1 / self._rate
            container.start_encoding()
            self._init = self._extract_init(self._buf.getvalue())
            tkhd_off, _ = find_box(self._init, [b"moov", b"trak", b"tkhd"])
            tkhd_version = self._init[tkhd_off + 8]
            # tkhd: version/flags, creation & modification time (4 or 8 bytes each), track_ID
            id_off = tkhd_off + 12 + (16 if tkhd_version else 8)
            self._track_id = struct.unpack_from(">I", self._init, id_off)[0]
            mdhd_off, _ = find_box(self._init, [b"moov", b"trak", b"mdia", b"mdhd"])
            mdhd_version = self._init[mdhd_off + 8]
            ts_off = mdhd_off + 12 + (16 if mdhd_version else 8)
            self._timescale = struct.unpack_from(">I", self._init, ts_off)[0]
        except Exception:
            container.close()
            raise
        self._container: Any = container
        self._ctx: Any = stream.codec_context
        self._seq = 0

    @staticmethod
    def _extract_init(data: bytes) -> bytes:
        boxes = {kind: (off, size) for kind, off, size in iter_boxes(data)}
        if b"ftyp" not in boxes or b"moov" not in boxes:
            raise RuntimeError("mp4 muxer did not write ftyp + moov at start (empty_moov unsupported?)")
        return data[: boxes[b"moov"][0] + boxes[b"moov"][1]]

    @property
    def init_segment(self) -> bytes:
        return self._init

    def _decode_time(self, index: int) -> int:
        """Decode time of frame ``index`` in the track timescale (no drift for fractional rates)."""
        return round(index * self._timescale / self._rate)

    def _fragment(self, sample: bytes, keyframe: bool, index: int) -> bytes:
        self._seq += 1
        base = self._decode_time(index)
        duration = self._decode_time(index + 1) - base
        mfhd = _full_box(b"mfhd", 0, 0, struct.pack(">I", self._seq))
        tfhd = _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", self._track_id))  # default-base-is-moof
        tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", base))
        flags = _SAMPLE_FLAGS_SYNC if keyframe else _SAMPLE_FLAGS_NON_SYNC

        def moof(data_offset: int) -> bytes:
            # trun flags: data-offset | sample-duration | sample-size | sample-flags
            trun = _full_box(
                b"trun", 0, 0x000701, struct.pack(">IiIII", 1, data_offset, duration, len(sample), flags)
            )
            return _box(b"moof", mfhd, _box(b"traf", tfhd, tfdt, trun))

        moof_size = len(moof(0))
        return moof(moof_size + 8) + _box(b"mdat", sample)

    def _encode_checked(self, frames: np.ndarray) -> list[EncodedFrame]:
        out = []
        for f in frames:
            index = self._pts
            pkt = self._encode_one(self._ctx, f)
            keyframe = bool(pkt.is_keyframe)
            sample = _annexb_to_length_prefixed(bytes(pkt))
            out.append(EncodedFrame(data=self._fragment(sample, keyframe, index), keyframe=keyframe))
        return out

    def _release(self) -> None:
        container, self._container, self._ctx = self._container, None, None
        try:
            container.close()  # writes a trailer into the scratch buffer, which is discarded
        finally:
            self._buf = io.BytesIO()


def make_encoder(
    encoding: int,
    width: int,
    height: int,
    fps: float,
    *,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    bitrate_bps: int = 0,
    gop: int | None = None,
) -> FrameEncoder:
    """Create an encoder for ``encoding`` (an ``avatarforcing.v1.VideoEncoding`` value).

    Args:
        width, height: frame size in pixels (must be even for H264/FMP4).
        fps: frame rate (timestamps, rate control, default GOP).
        jpeg_quality: JPEG quality 1..100; 0 means the default (85).
        bitrate_bps: target bitrate for H264/FMP4; 0 means constant quality (x264 CRF 23).
        gop: keyframe interval in frames for H264/FMP4; default 2 seconds of frames.

    Raises:
        UnsupportedEncodingError: unknown or unspecified ``encoding``.
        ValueError: invalid size, fps, quality, bitrate or gop.
    """
    _check_encoding(encoding)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 0 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an integer in 1..100 (0 = default), got {jpeg_quality!r}")
    if bitrate_bps < 0:
        raise ValueError(f"bitrate_bps must be >= 0, got {bitrate_bps!r}")
    if gop is None:
        gop = max(1, round(2 * fps))
    elif gop < 1:
        raise ValueError(f"gop must be >= 1, got {gop!r}")

    if encoding == pb.VIDEO_ENCODING_RAW_RGB24:
        return RawRGB24Encoder(width, height, fps)
    if encoding == pb.VIDEO_ENCODING_JPEG:
        return JpegEncoder(width, height, fps, quality=jpeg_quality or DEFAULT_JPEG_QUALITY)
    if width % 2 or height % 2:
        raise ValueError(
            f"{encoding_name(encoding)} needs even width and height (yuv420p), got {width}x{height}"
        )
    if encoding == pb.VIDEO_ENCODING_H264:
        return H264Encoder(width, height, fps, bitrate_bps=bitrate_bps, gop=gop)
    return FMP4Encoder(width, height, fps, bitrate_bps=bitrate_bps, gop=gop)
