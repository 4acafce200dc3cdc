"""Reference images: decode, validate, orient, convert to 8-bit RGB, crop and resize to the model's resolution.

Runs off the event loop (``App.avatar_from_image`` calls it in a worker thread): it holds no shared state and
touches no global warning filters (``warnings.catch_warnings`` is not thread-safe).
"""

from __future__ import annotations

import io

import numpy as np
import structlog
from PIL import ExifTags, Image

log = structlog.get_logger("avatarforcing.images")

ALLOWED_FORMATS = ("PNG", "JPEG")

# What transparent pixels are composited over. The colour channels of a transparent pixel are undefined (editors
# leave black, white or old paint there), so dropping alpha would show whatever happened to be left behind: a cut-out
# portrait could come out on black with fringes round the hair. Compositing gives the face a plain, even backdrop;
# mid-grey is the neutral choice: it neither darkens nor blows out the edges blended against it, and it is what an
# unlit studio backdrop looks like.
BACKGROUND = (128, 128, 128)

# EXIF Orientation -> the transpose that shows the image upright (the same table as PIL's ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_DEPTH_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale PNG (older Pillow: "I")


class ImageError(ValueError):
    """An image that cannot be used; the message is for a person."""


def load_reference_image(data: bytes, width: int, height: int, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [height, width, 3], upright, center-cropped to the model's aspect ratio."""
    if not data:
        raise ImageError("the reference image is empty")
    if len(data) > max_bytes:
        raise ImageError(f"the reference image is {len(data)} bytes; the limit is {max_bytes} bytes")
    # Pillow's own decompression-bomb guard only warns below 2x its limit; ours refuses, so take the lower one.
    pil_limit = Image.MAX_IMAGE_PIXELS
    limit = max_pixels if pil_limit is None else min(max_pixels, pil_limit)
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        fmt = img.format
        w, h = img.size
        if fmt not in ALLOWED_FORMATS:
            raise ImageError(f"the reference image is {fmt or 'not a recognised format'}; send PNG or JPEG")
        if w * h > limit:
            raise ImageError(f"the reference image is {w}x{h} pixels; the limit is {limit} pixels")
        if w < 16 or h < 16:
            raise ImageError(f"the reference image is {w}x{h} pixels; it must be at least 16x16")
        if fmt == "JPEG":
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly: a phone photo needs a fraction of a full decode's
            # CPU. At least twice the model's resolution on both sides is kept, for the crop and the resize.
            side = 2 * max(width, height)
            img.draft(None, (side, side))
        img.load()
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageError(f"the reference image could not be decoded as PNG or JPEG ({type(e).__name__}: {e})") from None
    source = f"{w}x{h}"
    img = _upright(img)
    w, h = img.size
    img = to_rgb8(img)
    target = width / height
    if w / h > target:  # too wide: crop the sides
        cw = round(h * target)
        box = ((w - cw) // 2, 0, (w - cw) // 2 + cw, h)
    else:
        ch = round(w / target)
        box = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
    if (box[2] - box[0], box[3] - box[1]) != (w, h) or (w, h) != (width, height):
        log.info("reference image fitted to the model", source=source,
                 cropped_to=f"{box[2] - box[0]}x{box[3] - box[1]} (centre, the model's aspect)",
                 resized_to=f"{width}x{height}")
    img = img.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def _upright(img: Image.Image) -> Image.Image:
    """Applies the EXIF Orientation tag (phone photos are stored sideways with Orientation 6 or 8).

    Not ``ImageOps.exif_transpose`` itself: after transposing it rewrites the EXIF block without the tag, and that
    rewrite raises on a corrupt unrelated tag (in place, after the pixels were already turned). Only the tag is read
    here; an EXIF block that cannot be read, or an Orientation that is not 1..8, leaves the image as stored.
    """
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as e:  # corrupt EXIF: the image as stored
        log.warning("reference image EXIF unreadable; orientation not applied", error=f"{type(e).__name__}: {e}")
        return img
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        if orientation not in (0, 1):  # 0: "undefined", which some cameras write
            log.warning("reference image EXIF orientation invalid; ignored", orientation=repr(orientation)[:40])
        return img
    return img.transpose(method)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any mode a PNG or JPEG decodes to -> 8-bit RGB, as a person would see the image.

    - 16-bit grayscale ("I;16", or "I" on older Pillow): the top 8 bits (value >> 8) on all three channels;
      ``convert("RGB")`` would clip every value above 255 to white.
    - Alpha (RGBA, LA, PA, a palette or a gray/RGB image with a tRNS transparent colour): composited over
      ``BACKGROUND``.
    - CMYK JPEG (Adobe's inverted CMYK included; Pillow undoes the inversion when decoding), 1-bit, L, P: Pillow's
      conversion (1-bit: black and white; palette: its colours).
    """
    mode = img.mode
    if mode in _HIGH_DEPTH_GRAY:
        a = np.asarray(img)
        gray = (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        trns = img.info.get("transparency")
        if isinstance(trns, int):  # tRNS: one 16-bit gray value is transparent
            alpha = np.where(a == trns, 0, 255).astype(np.uint8)
            return Image.fromarray(_over_background(rgb, alpha), "RGB")
        return Image.fromarray(rgb, "RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        return Image.fromarray(_over_background(rgba[..., :3], rgba[..., 3]), "RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _over_background(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] over BACKGROUND with uint8 [h, w] alpha, rounded; integer math (no float copy of a big image)."""
    a = alpha.astype(np.uint16)[..., None]
    bg = np.array(BACKGROUND, dtype=np.uint16)
    out = rgb.astype(np.uint16) * a + bg * (255 - a) + 127  # <= 255 * 255 + 127: fits uint16
    return (out // 255).astype(np.uint8)
