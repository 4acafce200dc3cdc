"""Tests for avatarforcing_service.codecs: round trips, low-latency contract, container layout."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from avatarforcing_client.media import decode_video_frames
from avatarforcing_proto.v1 import avatarforcing_pb2 as pb
from avatarforcing_service.codecs import (
    SUPPORTED_ENCODINGS,
    EncodedFrame,
    FrameEncoder,
    UnsupportedEncodingError,
    make_encoder,
)

W = H = 128
FPS = 25.0
N = 30
RAW, JPEG, H264, FMP4 = (
    pb.VIDEO_ENCODING_RAW_RGB24,
    pb.VIDEO_ENCODING_JPEG,
    pb.VIDEO_ENCODING_H264,
    pb.VIDEO_ENCODING_FMP4,
)


def moving_pattern(n: int = N, h: int = H, w: int = W) -> np.ndarray:
    """Smooth, moving RGB sinusoids (uint8 [n, h, w, 3])."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.arange(n, dtype=np.float32)[:, None, None]
    r = 128 + 100 * np.sin((x + 3 * t) / 17)
    g = 128 + 100 * np.cos((y - 2 * t) / 23)
    b = 128 + 80 * np.sin((x + y + 4 * t) / 29)
    return np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def box_type(data: bytes, offset: int = 0) -> bytes:
    return data[offset + 4 : offset + 8]


def top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    boxes, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        assert size >= 8 and pos + size <= len(data), f"bad box at {pos}"
        boxes.append((box_type(data, pos), pos, size))
        pos += size
    return boxes


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return moving_pattern()


def encode_one_by_one(
    enc: FrameEncoder, frames: np.ndarray, force_at: int | None = None
) -> list[EncodedFrame]:
    out: list[EncodedFrame] = []
    for i in range(len(frames)):
        if i == force_at:
            enc.force_keyframe()
        got = enc.encode(frames[i : i + 1])
        assert len(got) == 1, f"frame {i}: expected 1 encoded frame immediately, got {len(got)}"
        out.extend(got)
    return out


def test_supported_encodings() -> None:
    assert SUPPORTED_ENCODINGS == (1, 2, 3, 4)


@pytest.mark.parametrize(
    ("encoding", "min_psnr"), [(RAW, float("inf")), (JPEG, 25.0), (H264, 25.0), (FMP4, 25.0)]
)
def test_round_trip(frames: np.ndarray, encoding: int, min_psnr: float) -> None:
    with make_encoder(encoding, W, H, FPS) as enc:
        assert enc.encoding == encoding
        out = enc.encode(frames[:10]) + encode_one_by_one(enc, frames[10:])
        assert len(out) == N and all(isinstance(f, EncodedFrame) for f in out)
        assert out[0].keyframe
        decoded = decode_video_frames(encoding, [f.data for f in out], W, H, enc.init_segment)
    assert decoded.shape == (N, H, W, 3) and decoded.dtype == np.uint8
    if min_psnr == float("inf"):
        np.testing.assert_array_equal(decoded, frames)
    else:
        for i in range(N):
            assert psnr(decoded[i], frames[i]) > min_psnr, f"frame {i}"


def test_raw_and_jpeg_are_intra(frames: np.ndarray) -> None:
    with make_encoder(RAW, W, H, FPS) as raw, make_encoder(JPEG, W, H, FPS, jpeg_quality=50) as jpg:
        assert raw.init_segment == b"" and jpg.init_segment == b""
        raw.force_keyframe()  # no-op
        r = raw.encode(frames[:3])
        j = jpg.encode(frames[:3])
    assert all(f.keyframe and len(f.data) == H * W * 3 for f in r)
    assert r[1].data == frames[1].tobytes()
    assert all(f.keyframe and f.data.startswith(b"\xff\xd8") and f.data.endswith(b"\xff\xd9") for f in j)


def test_jpeg_quality_changes_size(frames: np.ndarray) -> None:
    sizes = []
    for q in (10, 95):
        with make_encoder(JPEG, W, H, FPS, jpeg_quality=q) as enc:
            sizes.append(len(enc.encode(frames[:1])[0].data))
    assert sizes[0] < sizes[1]


def test_h264_access_units_and_forced_keyframe(frames: np.ndarray) -> None:
    with make_encoder(H264, W, H, FPS, gop=100) as enc:
        assert enc.init_segment == b""
        out = encode_one_by_one(enc, frames, force_at=17)
    assert all(f.data.startswith(b"\x00\x00\x00\x01") or f.data.startswith(b"\x00\x00\x01") for f in out)
    assert [i for i, f in enumerate(out) if f.keyframe] == [0, 17]
    # Decoding can start at the forced keyframe: SPS/PPS are repeated in-band.
    tail = decode_video_frames(H264, [f.data for f in out[17:]], W, H)
    assert tail.shape == (N - 17, H, W, 3)
    assert min(psnr(tail[i], frames[17 + i]) for i in range(len(tail))) > 25.0


@pytest.mark.parametrize("encoding", [H264, FMP4])
def test_forced_keyframes_let_decoding_start_at_any_of_them(frames: np.ndarray, encoding: int) -> None:
    """A resumed stream's first block (service/opening.py): each of its frames a keyframe, so a client that already
    had the first of them starts decoding at whichever it keeps; then the encoder's own GOP goes on."""
    with make_encoder(encoding, W, H, FPS, gop=100) as enc:
        enc.force_keyframes(4)
        out = enc.encode(frames[:10])
        init = enc.init_segment
    assert [i for i, f in enumerate(out) if f.keyframe] == [0, 1, 2, 3]
    for start in (1, 2, 3):
        tail = decode_video_frames(encoding, [f.data for f in out[start:]], W, H, init)
        assert tail.shape == (10 - start, H, W, 3)
        assert min(psnr(tail[i], frames[start + i]) for i in range(len(tail))) > 25.0


def test_h264_gop() -> None:
    with make_encoder(H264, 64, 48, FPS, gop=5) as enc:
        out = enc.encode(moving_pattern(12, 48, 64))
    assert [i for i, f in enumerate(out) if f.keyframe] == [0, 5, 10]


def test_fmp4_layout(frames: np.ndarray) -> None:
    with make_encoder(FMP4, W, H, FPS) as enc:
        init = enc.init_segment
        assert [b for b, _, _ in top_level_boxes(init)] == [b"ftyp", b"moov"]  # before any frame
        out = encode_one_by_one(enc, frames[:8], force_at=5)
    assert [i for i, f in enumerate(out) if f.keyframe] == [0, 5]
    for f in out:
        assert [b for b, _, _ in top_level_boxes(f.data)] == [b"moof", b"mdat"]
        trun = f.data.index(b"trun")
        (sample_count,) = struct.unpack_from(">I", f.data, trun + 8)
        assert sample_count == 1
    decoded = decode_video_frames(FMP4, [f.data for f in out], W, H, init)
    assert decoded.shape == (8, H, W, 3)


def test_empty_batch() -> None:
    for encoding in SUPPORTED_ENCODINGS:
        with make_encoder(encoding, W, H, FPS) as enc:
            assert enc.encode(np.zeros((0, H, W, 3), np.uint8)) == []


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_close_idempotent_and_encode_after_close(encoding: int) -> None:
    enc = make_encoder(encoding, W, H, FPS)
    enc.encode(np.zeros((1, H, W, 3), np.uint8))
    enc.close()
    enc.close()
    with pytest.raises(RuntimeError):
        enc.encode(np.zeros((1, H, W, 3), np.uint8))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((1, H, W, 3), np.float32),  # dtype
        np.zeros((H, W, 3), np.uint8),  # missing batch dim
        np.zeros((1, H, W + 2, 3), np.uint8),  # size
        np.zeros((1, H, W, 4), np.uint8),  # channels
    ],
)
def test_encode_validation(bad: np.ndarray) -> None:
    with make_encoder(H264, W, H, FPS) as enc, pytest.raises(ValueError):
        enc.encode(bad)


def test_make_encoder_errors() -> None:
    for encoding in (0, 5, 99):
        with pytest.raises(UnsupportedEncodingError, match="VIDEO_ENCODING_H264"):
            make_encoder(encoding, W, H, FPS)
    for q in (-1, 101):
        with pytest.raises(ValueError, match="jpeg_quality"):
            make_encoder(JPEG, W, H, FPS, jpeg_quality=q)
    make_encoder(JPEG, W, H, FPS, jpeg_quality=0).close()  # 0 = default
    for encoding in (H264, FMP4):
        with pytest.raises(ValueError, match="even"):
            make_encoder(encoding, 127, 128, FPS)
        with pytest.raises(ValueError, match="even"):
            make_encoder(encoding, 128, 99, FPS)
    make_encoder(JPEG, 127, 99, FPS).close()  # odd sizes are fine for intra-only encodings
    assert issubclass(UnsupportedEncodingError, ValueError)
