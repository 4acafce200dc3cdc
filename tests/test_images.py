"""Reference images: EXIF orientation, every mode a PNG/JPEG decodes to, decoding off the event loop; the audio
sample rate a session must name."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

import avatarforcing_service.avatar_source as avatar_source_mod
from avatarforcing_client import pb, pb_grpc
from avatarforcing_service.images import BACKGROUND, ImageError, load_reference_image, to_rgb8
from avatarforcing_service.server import App

AppFactory = Callable[..., "asyncio.Future[App]"]
BIG = 1 << 30


def load(data: bytes, width: int, height: int) -> np.ndarray:
    return load_reference_image(data, width, height, max_bytes=BIG, max_pixels=BIG)


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def over_bg(rgb: tuple[int, int, int], alpha: int) -> np.ndarray:
    """What a person sees: the colour at this opacity over the documented neutral background."""
    a = alpha / 255
    return np.array([round(c * a + g * (1 - a)) for c, g in zip(rgb, BACKGROUND, strict=True)])


# ---- EXIF orientation -------------------------------------------------------------------------------------------

QUADRANTS = ((230, 20, 20), (20, 200, 20), (20, 20, 230), (230, 230, 20))  # TL, TR, BL, BR


def quadrant_image(w: int = 64, h: int = 32) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :] = QUADRANTS[0], QUADRANTS[1]
    a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = QUADRANTS[2], QUADRANTS[3]
    return a


# How each EXIF orientation is displayed, written out in numpy (independently of PIL's transpose table).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed (main diagonal)
    6: lambda a: np.rot90(a, k=-1),  # stored rotated: turn 90 degrees clockwise (a phone held upright)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed (anti-diagonal)
    8: lambda a: np.rot90(a, k=1),  # turn 90 degrees counter-clockwise
}


def with_orientation(a: np.ndarray, orientation: int | None, fmt: str = "JPEG", exif: bytes | None = None) -> bytes:
    img = Image.fromarray(a)
    kw: dict[str, Any] = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    if orientation is not None:
        e = Image.Exif()
        e[0x0112] = orientation
        e[0x010F] = "Phone"
        kw["exif"] = e.tobytes()
    if exif is not None:
        kw["exif"] = exif
    return encode(img, fmt, **kw)


def assert_close(out: np.ndarray, expected: np.ndarray, tol: float = 4.0) -> None:
    assert out.shape == expected.shape
    err = np.abs(out.astype(int) - expected.astype(int))
    assert err.mean() < tol, f"mean error {err.mean():.1f}"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_cropping(orientation: int) -> None:
    src = quadrant_image()
    expected = np.ascontiguousarray(UPRIGHT[orientation](src))
    h, w = expected.shape[:2]
    out = load(with_orientation(src, orientation), w, h)  # the upright size: no crop, no resize
    assert_close(out, expected)


def test_phone_photo_on_its_side_comes_out_upright_and_cropped_as_a_portrait() -> None:
    src = quadrant_image(128, 64)  # stored landscape, Orientation 6: a portrait photo
    out = load(with_orientation(src, 6), 32, 64)  # a portrait model: the whole upright photo fits
    upright = np.rot90(src, k=-1)
    assert_close(out, np.asarray(Image.fromarray(np.ascontiguousarray(upright)).resize((32, 64))), tol=6)
    # Ignoring the tag would have cropped the middle of the landscape pixels: left/right halves, not top/bottom.
    assert np.abs(out[:16, :16].astype(int).mean(axis=(0, 1)) - QUADRANTS[2]).max() < 20  # TL is stored BL
    assert np.abs(out[-16:, :16].astype(int).mean(axis=(0, 1)) - QUADRANTS[3]).max() < 20  # BL is stored BR


def test_png_exif_orientation_is_applied_too() -> None:
    src = quadrant_image()
    out = load(with_orientation(src, 8, fmt="PNG"), 32, 64)
    assert np.array_equal(out, np.rot90(src, k=1))


@pytest.mark.parametrize("exif", [
    b"Exif\x00\x00garbage",  # not TIFF at all
    b"Exif\x00\x00MM\x00*\xff\xff\xff\xff",  # the first IFD points past the end
    b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff",  # an IFD that claims 65535 entries
])
def test_corrupt_exif_falls_back_to_the_image_as_stored(exif: bytes) -> None:
    src = quadrant_image()
    assert_close(load(with_orientation(src, None, exif=exif), 64, 32), src)


def test_corrupt_tag_beside_a_valid_orientation_still_turns_the_image() -> None:
    """A tag that PIL's exif_transpose chokes on when rewriting the EXIF block (ASCII in a RATIONAL tag)."""
    exif = (b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02\x01>\x00\x02\x00\x00\x00\x06\x00\x00\x00&\x01\x12\x00\x03"
            b"\x00\x00\x00\x01\x00\x06\x00\x00\x00[\x00\x00Phone\x00")
    src = quadrant_image()
    assert_close(load(with_orientation(src, None, exif=exif), 32, 64), np.rot90(src, k=-1))


def test_unreadable_exif_or_bad_orientation_value_does_not_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    src = quadrant_image()
    assert_close(load(with_orientation(src, 9), 64, 32), src)  # 9 is not an orientation
    data = with_orientation(src, 6)

    def broken(self: Image.Image) -> Image.Exif:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    assert_close(load(data, 64, 32), src)


# ---- modes ------------------------------------------------------------------------------------------------------

def test_16_bit_gray_png_becomes_the_matching_8_bit_ramp() -> None:
    x = np.arange(256, dtype=np.uint16)
    low = (np.arange(16, dtype=np.uint16) * 37 % 256)[:, None]  # low bytes vary by row; they must not matter
    ramp = x[None, :] * 256 + low  # [16, 256], 0 .. 65535
    data = encode(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    out = load(data, 256, 16)
    for c in range(3):
        assert np.array_equal(out[..., c], np.broadcast_to(x.astype(np.uint8), (16, 256)))


def test_32_bit_gray_from_older_pillow_is_read_as_16_bit() -> None:
    a = np.array([[0, 255, 256, 32768, 65535, 70000, -5, 4000]], dtype=np.int32).repeat(4, axis=0)
    out = np.asarray(to_rgb8(Image.fromarray(a)))  # mode "I"
    assert out.shape == (4, 8, 3)
    assert out[0, :, 0].tolist() == [0, 0, 1, 128, 255, 255, 0, 15]
    assert (out == out[..., :1]).all()


def test_16_bit_gray_with_a_transparent_value() -> None:
    a = np.full((16, 16), 40000, np.uint16)
    a[:8] = 1234
    out = load(encode(Image.fromarray(a), transparency=1234), 16, 16)
    assert (out[:8] == BACKGROUND).all() and (out[8:] == 40000 >> 8).all()


def test_palette_with_transparency() -> None:
    p = Image.new("P", (24, 24))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    p.paste(1, (0, 8, 24, 16))
    p.paste(2, (0, 16, 24, 24))  # rows 0-7: index 0, 8-15: index 1, 16-23: index 2
    data = encode(p, transparency=bytes([0, 255, 128]))  # red invisible, green opaque, blue half
    out = load(data, 24, 24).astype(int)
    assert (out[:8] == BACKGROUND).all()  # not red: a transparent pixel's colour is not what a person sees
    assert (out[8:16] == (0, 255, 0)).all()
    assert (np.abs(out[16:] - over_bg((0, 0, 255), 128)) <= 1).all()


def test_palette_without_transparency_keeps_its_colours() -> None:
    p = Image.new("P", (16, 16))
    p.putpalette([10, 20, 30, 200, 100, 50])
    p.paste(1, (8, 0, 16, 16))
    out = load(encode(p), 16, 16)
    assert (out[:, :8] == (10, 20, 30)).all() and (out[:, 8:] == (200, 100, 50)).all()


@pytest.mark.parametrize("mode,color", [("LA", (200,)), ("RGBA", (250, 10, 60))])
def test_alpha_is_composited_over_the_neutral_background(mode: str, color: tuple[int, ...]) -> None:
    img = Image.new(mode, (16, 24))
    junk = (17,) * len(color) + (0,)  # what an editor leaves in fully transparent pixels
    img.paste(junk, (0, 0, 16, 8))
    img.paste(color + (255,), (0, 8, 16, 16))
    img.paste(color + (64,), (0, 16, 16, 24))
    out = load(encode(img), 16, 24).astype(int)
    rgb = (color * 3)[:3]
    assert (out[:8] == BACKGROUND).all()
    assert (out[8:16] == rgb).all()
    assert (np.abs(out[16:] - over_bg(rgb, 64)) <= 1).all()  # type: ignore[arg-type]


@pytest.mark.parametrize("mode,fill,transparent", [("RGB", (1, 2, 3), (1, 2, 3)), ("L", 7, 7)])
def test_trns_transparent_colour(mode: str, fill: Any, transparent: Any) -> None:
    img = Image.new(mode, (16, 16), fill)
    img.paste(Image.new(mode, (16, 8), 250 if mode == "L" else (250, 250, 250)), (0, 8))
    out = load(encode(img, transparency=transparent), 16, 16)
    assert (out[:8] == BACKGROUND).all() and (out[8:] == 250).all()


def test_cmyk_jpeg() -> None:
    inks = {(0, 0, 0, 0): (255, 255, 255), (0, 255, 255, 0): (255, 0, 0), (255, 0, 255, 0): (0, 255, 0),
            (255, 255, 0, 0): (0, 0, 255), (0, 0, 0, 255): (0, 0, 0), (0, 0, 0, 128): (127, 127, 127)}
    img = Image.new("CMYK", (16 * len(inks), 16))
    for i, ink in enumerate(inks):
        img.paste(ink, (16 * i, 0, 16 * i + 16, 16))
    data = encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load(data, 16 * len(inks), 16).astype(int)
    for i, rgb in enumerate(inks.values()):
        got = out[4:12, 16 * i + 4 : 16 * i + 12].mean(axis=(0, 1))
        assert np.abs(got - rgb).max() < 8, (i, got, rgb)


def test_one_bit_png_is_black_and_white() -> None:
    bits = (np.indices((32, 32)).sum(axis=0) % 2).astype(bool)
    out = load(encode(Image.fromarray(bits)), 32, 32)
    assert Image.open(io.BytesIO(encode(Image.fromarray(bits)))).mode == "1"
    for c in range(3):
        assert np.array_equal(out[..., c], np.where(bits, 255, 0))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_8_bit_images_are_unchanged(mode: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 40) if mode == "L" else (24, 40, 3), dtype=np.uint8)
    out = load(encode(Image.fromarray(a)), 40, 24)
    assert np.array_equal(out, a if mode == "RGB" else np.repeat(a[..., None], 3, axis=2))


# ---- decoding off the event loop --------------------------------------------------------------------------------

def noise_png(side: int = 4096) -> bytes:
    a = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    return encode(Image.fromarray(a), compress_level=1)


async def test_decoding_a_large_image_does_not_stall_the_event_loop(make_app: AppFactory,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = noise_png()
    app = await make_app(max_image_bytes=len(data) + 1024)
    spans: list[tuple[float, float, int]] = []
    real = avatar_source_mod.load_reference_image

    def timed(*args: Any, **kw: Any) -> np.ndarray:
        t0 = time.monotonic()
        try:
            return real(*args, **kw)
        finally:
            spans.append((t0, time.monotonic(), threading.get_ident()))

    monkeypatch.setattr(avatar_source_mod, "load_reference_image", timed)
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.010)

    task = asyncio.create_task(ticker())
    try:
        avatar = await app.avatar_from_image(data, "noise")
    finally:
        stop.set()
        await task
    assert avatar.id and len(spans) == 1
    start, end, thread = spans[0]
    assert thread != threading.get_ident(), "decoded on the event loop's thread"
    decode_s = end - start
    if decode_s < 0.1:
        pytest.skip(f"the decode took {decode_s * 1000:.0f} ms: too quick to measure the loop against")
    during = [t for t in ticks if start < t < end]
    # On the loop, no tick could run while it decodes (0). Off it, the ticker keeps going; on a loaded machine
    # each tick can take well over its 10 ms, so ask for a fifth of the ticks an idle machine would give.
    wanted = max(2, int(0.2 * decode_s / 0.010))
    assert len(during) >= wanted, f"{len(during)} ticks during a {decode_s * 1000:.0f} ms decode; wanted {wanted}"
    gaps = np.diff([t for t in ticks if start - 0.5 < t < end + 0.5])
    assert gaps.max() < decode_s, f"the loop stalled {gaps.max() * 1000:.0f} ms of a {decode_s * 1000:.0f} ms decode"


async def test_sessions_sending_the_same_new_face_at_once_share_one_registration(
        make_app: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions that open at once with the same new face (a bench, a fleet of agents with one avatar) cost one decode
    and one charge against the tenant's image rate: none is refused for the image the first is registering."""
    app = await make_app(image_rate_per_s=0.01, image_burst=1)
    real = avatar_source_mod.load_reference_image
    decodes: list[int] = []
    gate = threading.Event()

    def held(*args: Any, **kw: Any) -> np.ndarray:
        decodes.append(1)
        gate.wait(30)  # the first decode holds: every other caller arrives while it is under way
        return real(*args, **kw)

    monkeypatch.setattr(avatar_source_mod, "load_reference_image", held)
    face = encode(Image.fromarray(quadrant_image()))
    calls = [asyncio.create_task(app.avatar_from_image(face)) for _ in range(6)]
    t_end = time.monotonic() + 30
    while not decodes:
        assert time.monotonic() < t_end, "no decode started"
        await asyncio.sleep(0.01)
    calls[0].cancel()  # the caller that started it going away does not cancel it for the others
    gate.set()
    done = await asyncio.gather(*calls[1:])
    assert len({a.id for a in done}) == 1 and len(decodes) == 1
    assert calls[0].cancelled()
    # The one charge used the burst of 1: another new face is over the rate.
    other = encode(Image.fromarray(quadrant_image()[::-1].copy()))
    with pytest.raises(avatar_source_mod.RateLimited):
        await app.avatar_from_image(other)


async def test_bad_image_errors_are_unchanged_off_the_loop(make_app: AppFactory) -> None:
    app = await make_app()
    with pytest.raises(ImageError, match="could not be decoded"):
        await app.avatar_from_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(ImageError, match="send PNG or JPEG"):
        await app.avatar_from_image(encode(Image.new("RGB", (32, 32)), "GIF"))


# ---- the audio sample rate ----------------------------------------------------------------------------------------

async def _requests(config: pb.SessionConfig, hold: asyncio.Event) -> AsyncIterator[pb.StreamRequest]:
    yield pb.StreamRequest(config=config)
    await hold.wait()


async def _first_response(app: App, config: pb.SessionConfig) -> pb.StreamResponse:
    hold = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        call = pb_grpc.AvatarForcingStub(ch).Stream(_requests(config, hold))
        try:
            return await call.read()
        finally:
            hold.set()
            call.cancel()


def _png() -> bytes:
    return encode(Image.new("RGB", (64, 64), (180, 140, 120)))


async def test_an_audio_format_with_sample_rate_0_is_refused(make_app: AppFactory) -> None:
    app = await make_app()
    config = pb.SessionConfig(reference_image=_png(), video_encoding=pb.VIDEO_ENCODING_JPEG,
                              audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16LE, channels=1))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _first_response(app, config)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = ei.value.details() or ""
    assert "sample_rate_hz is 0" in details and "16000" in details, details


async def test_no_audio_format_at_all_means_pcm16_mono_at_the_models_rate(make_app: AppFactory) -> None:
    app = await make_app()
    config = pb.SessionConfig(reference_image=_png(), video_encoding=pb.VIDEO_ENCODING_JPEG)
    resp = await _first_response(app, config)
    assert resp.started.audio_sample_rate_hz == app.engine.cfg.audio_sample_rate == 16000


def test_a_large_jpeg_is_decoded_at_reduced_scale_with_the_same_result() -> None:
    """libjpeg's DCT scaling (PIL's draft) decodes a 4096x3072 photo at 1/8 for a 128x128 model: the fitted image
    matches a full decode's closely, and the decoder never builds the full-size bitmap."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:3072, 0:4096].astype(np.float32)
    photo = np.stack([x / 16 % 256, y / 12 % 256, (x + y) / 28 % 256], -1)
    photo = np.clip(photo + rng.normal(0, 6, photo.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    fast = load_reference_image(data, 128, 128, max_bytes=1 << 26, max_pixels=1 << 25)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    full = full.crop((512, 0, 3584, 3072)).resize((128, 128), Image.Resampling.LANCZOS)
    assert fast.shape == (128, 128, 3)
    assert np.abs(fast.astype(np.float32) - np.asarray(full, np.float32)).mean() < 3.0
    opened = Image.open(io.BytesIO(data))
    opened.draft(None, (256, 256))
    assert opened.size == (512, 384)  # what the loader decodes: 1/8 of the pixels on each side
