"""A parametric 2D face renderer (numpy only), driven by per-frame articulation.

``sample_identity(seed)`` draws an :class:`Identity` (face shape, skin / hair / eye / lip /
shirt / background colours, hair style, eye spacing, mouth size). ``render(identity, art)`` draws
one frame per articulation frame, uint8 ``[T, 128, 128, 3]``:

* the static parts (background gradient, shoulders, neck, ears, hair, face, nose, eyebrows) are
  drawn once per identity into a padded "head" layer with an alpha channel;
* per frame the eyes (with an upper eyelid for blinks) and the mouth are drawn into small windows
  of that layer, and the layer is composited over the background at an integer offset (head sway);
* idle motion comes from ``motion_seed``: blinks every 2-6 s (a 6-frame close/open profile), and a
  slow head sway of 1-3 px (sum of two slow sinusoids, 0.05-0.3 Hz);
* the mouth: the upper lip stays at the identity's mouth line, the opening is
  ``jaw * mouth_open_px`` pixels tall (dark interior), its half width is
  ``mouth_w * (1 + 0.3 spread - 0.35 round)``, and rounding thickens the lips (pout).

``render_reference(identity)`` is the neutral frame: mouth closed, eyes open, no sway.
``mouth_box(identity)`` is the box (y0, y1, x0, x1) that contains the mouth for any sway.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .articulation import Articulation

SIZE = 128
PAD = 6  # head layer margin (>= max sway)
FPS = 25
MAX_SWAY_X = 3
MAX_SWAY_Y = 2

_SKIN_LIGHT = np.array([245, 212, 188], np.float32)
_SKIN_DARK = np.array([92, 60, 42], np.float32)
_HAIR = np.array([[20, 16, 14], [60, 40, 28], [110, 72, 40], [200, 165, 100], [150, 60, 30],
                  [150, 150, 150], [35, 30, 45]], np.float32)
_EYES = np.array([[70, 110, 170], [80, 130, 80], [90, 60, 35], [110, 120, 130], [120, 100, 50]], np.float32)


@dataclass(frozen=True)
class Identity:
    seed: int
    cx: float  # face centre, px
    cy: float
    face_w: float  # half width, px
    face_h: float  # half height, px
    face_p: float  # superellipse exponent (2 = ellipse, larger = squarer jaw)
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: int  # 0 short, 1 long, 2 bun, 3 receding with sideburns
    eye_color: tuple[float, float, float]
    eye_spacing: float  # half distance between eye centres, px
    eye_y: float  # offset of the eyes from cy (negative = up), px
    eye_w: float
    eye_h: float
    mouth_y: float  # offset of the mouth line from cy, px
    mouth_w: float  # neutral half width, px
    mouth_open_px: float  # opening at jaw = 1, px
    lip: tuple[float, float, float]
    shirt: tuple[float, float, float]
    background: tuple[float, float, float]
    bg_gradient: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Identity:
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


def _col(x: np.ndarray) -> tuple[float, float, float]:
    c = np.clip(x, 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


def sample_identity(seed: int) -> Identity:
    rng = np.random.default_rng([0xFACE, int(seed)])
    t = rng.uniform(0, 1)
    skin = _SKIN_LIGHT + t * (_SKIN_DARK - _SKIN_LIGHT) + rng.normal(0, 6, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 8, 3)
    eye = _EYES[rng.integers(len(_EYES))] + rng.normal(0, 8, 3)
    lip = skin * np.array([0.92, 0.62, 0.62]) * rng.uniform(0.8, 0.95) + np.array([15, 0, 5])
    bg = rng.uniform(30, 230, 3)
    shirt = rng.uniform(20, 230, 3)
    face_h = rng.uniform(40, 46)
    return Identity(
        seed=int(seed), cx=64 + rng.uniform(-3, 3), cy=58 + rng.uniform(-3, 3),
        face_w=rng.uniform(31, 37), face_h=face_h, face_p=rng.uniform(2.2, 3.0),
        skin=_col(skin), hair=_col(hair), hair_style=int(rng.integers(4)), eye_color=_col(eye),
        eye_spacing=rng.uniform(11, 15), eye_y=-face_h * rng.uniform(0.08, 0.18),
        eye_w=rng.uniform(4.5, 6.0), eye_h=rng.uniform(2.6, 3.4),
        mouth_y=face_h * rng.uniform(0.4, 0.46), mouth_w=rng.uniform(7.5, 10.5),
        mouth_open_px=rng.uniform(8.0, 11.0), lip=_col(lip), shirt=_col(shirt), background=_col(bg),
        bg_gradient=rng.uniform(-0.3, 0.3),
    )


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
             p: float = 2.0) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a (super)ellipse; thin shapes fade with their size."""
    ry_, rx_ = max(ry, 0.25), max(rx, 0.25)
    d = (np.abs((xx - cx) / rx_) ** p + np.abs((yy - cy) / ry_) ** p) ** (1.0 / p)
    cov = np.clip(0.5 - (d - 1.0) * min(rx_, ry_), 0.0, 1.0)
    return cov * min(1.0, 2.0 * min(ry, rx))


def _blend(img: np.ndarray, cov: np.ndarray, color: np.ndarray | tuple[float, float, float]) -> None:
    c = np.asarray(color, np.float32)
    img += cov[..., None] * (c - img)


@dataclass
class _Layer:
    bg: np.ndarray  # [S, S, 3] float32
    rgb: np.ndarray  # [S+2P, S+2P, 3] float32, head layer colour
    alpha: np.ndarray  # [S+2P, S+2P] float32


_LAYER_CACHE: dict[Identity, _Layer] = {}


def _static_layer(idt: Identity) -> _Layer:
    hit = _LAYER_CACHE.get(idt)
    if hit is not None:
        return hit
    n = SIZE + 2 * PAD
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    cx, cy = idt.cx + PAD, idt.cy + PAD
    fw, fh = idt.face_w, idt.face_h
    skin = np.asarray(idt.skin, np.float32)
    hair = np.asarray(idt.hair, np.float32)
    rgb = np.zeros((n, n, 3), np.float32)
    alpha = np.zeros((n, n), np.float32)

    def put(cov: np.ndarray, color: np.ndarray | tuple[float, float, float]) -> None:
        _blend(rgb, cov, color)
        alpha[...] = alpha + cov * (1.0 - alpha)

    # Behind the face: shoulders, neck, long hair, ears.
    put(_ellipse(yy, xx, n + 18, cx, 42, 62), idt.shirt)
    neck = np.clip(fw * 0.55 - np.abs(xx - cx) + 0.5, 0, 1) * np.clip(yy - cy, 0, 1) * np.clip(n - yy, 0, 1)
    put(neck, skin * 0.82)
    if idt.hair_style == 1:
        put(_ellipse(yy, xx, cy + 0.15 * fh, cx, fh + 6, fw + 7) * np.clip(cy + fh + 12 - yy, 0, 1), hair)
    for s in (-1, 1):
        put(_ellipse(yy, xx, cy + idt.eye_y + 3, cx + s * fw, 6.5, 4.0), skin * 0.93)
    # Face.
    put(_ellipse(yy, xx, cy, cx, fh, fw, idt.face_p), skin)
    # Nose shading and nostrils (light: stays well above the mouth metric's darkness threshold).
    ny = cy + idt.mouth_y * 0.55
    _blend(rgb, _ellipse(yy, xx, ny, cx, 3.0, 3.5) * 0.5, skin * 0.86)
    for s in (-1, 1):
        _blend(rgb, _ellipse(yy, xx, ny + 1.0, cx + s * 2.0, 0.9, 1.2) * 0.6, skin * 0.7)
    # Hair on top.
    hairline = cy - fh * (0.62 if idt.hair_style == 3 else 0.45) + 1.5 * np.sin(xx / 5.0)
    cap = _ellipse(yy, xx, cy - 0.15 * fh, cx, fh * 0.93, fw + 2.5) * np.clip(hairline - yy + 0.5, 0, 1)
    put(cap, hair)
    if idt.hair_style == 2:
        put(_ellipse(yy, xx, cy - fh - 4, cx, 8, 9), hair)
    if idt.hair_style == 3:
        for s in (-1, 1):
            put(_ellipse(yy, xx, cy + idt.eye_y, cx + s * (fw - 1.5), 8, 2.2), hair)
    # Eyebrows.
    for s in (-1, 1):
        ex = cx + s * idt.eye_spacing
        _blend(rgb, _ellipse(yy, xx, cy + idt.eye_y - idt.eye_h - 3.5, ex, 1.2, idt.eye_w + 1.0), hair * 0.9)
    by = np.arange(SIZE, dtype=np.float32)[:, None, None] / SIZE - 0.5
    bg = np.asarray(idt.background, np.float32) * (1.0 + idt.bg_gradient * by) * np.ones((1, SIZE, 1), np.float32)
    layer = _Layer(bg=np.clip(bg, 0, 255).astype(np.float32), rgb=rgb, alpha=alpha)
    if len(_LAYER_CACHE) > 64:
        _LAYER_CACHE.clear()
    _LAYER_CACHE[idt] = layer
    return layer


def _draw_eyes(rgb: np.ndarray, idt: Identity, closure: float) -> None:
    cx, cy = idt.cx + PAD, idt.cy + PAD + idt.eye_y
    w, h = idt.eye_w, idt.eye_h
    skin = np.asarray(idt.skin, np.float32)
    for s in (-1, 1):
        ex = cx + s * idt.eye_spacing
        x0, y0 = int(ex - w - 2), int(cy - h - 2)
        win = rgb[y0:y0 + int(2 * h + 5), x0:x0 + int(2 * w + 5)]
        yy, xx = np.mgrid[y0:y0 + win.shape[0], x0:x0 + win.shape[1]].astype(np.float32)
        white = _ellipse(yy, xx, cy, ex, h, w)
        _blend(win, white, (240, 238, 232))
        _blend(win, _ellipse(yy, xx, cy, ex, h * 0.95, h * 0.95) * white, idt.eye_color)
        _blend(win, _ellipse(yy, xx, cy, ex, h * 0.45, h * 0.45) * white, (15, 12, 12))
        if closure > 0:
            lid_edge = cy - h - 0.5 + (2 * h + 1.5) * closure
            lid = _ellipse(yy, xx, cy, ex, h + 1.0, w + 1.0) * np.clip(lid_edge - yy + 0.5, 0, 1)
            _blend(win, lid, skin * 0.9)
        # Upper lash line at the lid edge.
        edge = cy - h + (2 * h) * closure
        _blend(win, _ellipse(yy, xx, edge, ex, 0.6, w * (1.0 - 0.2 * closure)) * 0.8, (30, 22, 20))


def _draw_mouth(rgb: np.ndarray, idt: Identity, jaw: float, spread: float, rnd: float) -> None:
    mx, my = idt.cx + PAD, idt.cy + PAD + idt.mouth_y
    skin = np.asarray(idt.skin, np.float32)
    a = idt.mouth_w * (1.0 + 0.3 * spread - 0.35 * rnd)
    opening = max(0.0, float(jaw)) * idt.mouth_open_px
    lip_t = 2.0 + 1.2 * rnd
    x0, y0 = int(mx - a - lip_t - 3), int(my - lip_t - 3)
    win = rgb[y0:y0 + int(opening + 2 * lip_t + 7), x0:x0 + int(2 * (a + lip_t) + 7)]
    yy, xx = np.mgrid[y0:y0 + win.shape[0], x0:x0 + win.shape[1]].astype(np.float32)
    ccy = my + opening / 2.0
    _blend(win, _ellipse(yy, xx, ccy, mx, opening / 2.0 + lip_t, a + 1.5), idt.lip)
    seam = np.asarray(idt.lip, np.float32) * 0.62
    interior = skin * np.array([0.2, 0.1, 0.1], np.float32) + np.array([10, 0, 0], np.float32)
    k = min(1.0, opening / 2.0)
    _blend(win, _ellipse(yy, xx, ccy, mx, max(opening / 2.0, 0.45), a), (1 - k) * seam + k * interior)


def blink_schedule(n_frames: int, rng: np.random.Generator, fps: int = FPS) -> np.ndarray:
    """Eyelid closure per frame in [0, 1]: a blink every 2-6 s."""
    closure = np.zeros(n_frames, np.float32)
    profile = np.array([0.35, 0.8, 1.0, 0.75, 0.4, 0.15], np.float32)
    t = rng.uniform(0.3, 3.0)
    while True:
        k = int(round(t * fps))
        if k >= n_frames:
            break
        seg = closure[k:k + len(profile)]
        seg[:] = np.maximum(seg, profile[: seg.size])
        t += rng.uniform(2.0, 6.0)
    return closure


def sway_schedule(n_frames: int, rng: np.random.Generator, fps: int = FPS) -> tuple[np.ndarray, np.ndarray]:
    """Integer head offsets (dx, dy) per frame, |dx| <= 3, |dy| <= 2."""
    t = np.arange(n_frames) / fps
    out = []
    for amp in (rng.uniform(1.0, MAX_SWAY_X), rng.uniform(0.5, MAX_SWAY_Y)):
        f1, f2 = rng.uniform(0.05, 0.15), rng.uniform(0.15, 0.3)
        p1, p2 = rng.uniform(0, 2 * np.pi, 2)
        v = amp * (0.7 * np.sin(2 * np.pi * f1 * t + p1) + 0.3 * np.sin(2 * np.pi * f2 * t + p2))
        out.append(np.clip(np.round(v), -amp - 0.5, amp + 0.5).astype(np.int64))
    return out[0], out[1]


def _as_arrays(art: Articulation | dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(art, Articulation):
        return art.jaw, art.spread, art.round
    return np.asarray(art["jaw"]), np.asarray(art["spread"]), np.asarray(art["round"])


def render(identity: Identity, articulation: Articulation | dict[str, np.ndarray], motion_seed: int = 0,
           idle: bool = True) -> np.ndarray:
    """Frames uint8 [T, 128, 128, 3] for T = len(articulation)."""
    jaw, spread, rnd = _as_arrays(articulation)
    n = int(jaw.shape[0])
    layer = _static_layer(identity)
    rng = np.random.default_rng([0xB11C, int(identity.seed), int(motion_seed)])
    if idle:
        closure = blink_schedule(n, rng)
        dx, dy = sway_schedule(n, rng)
    else:
        closure = np.zeros(n, np.float32)
        dx = dy = np.zeros(n, np.int64)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    rgb = np.empty_like(layer.rgb)
    for k in range(n):
        np.copyto(rgb, layer.rgb)
        _draw_eyes(rgb, identity, float(closure[k]))
        _draw_mouth(rgb, identity, float(jaw[k]), float(spread[k]), float(rnd[k]))
        ys, xs = PAD - int(dy[k]), PAD - int(dx[k])
        head = rgb[ys:ys + SIZE, xs:xs + SIZE]
        a = layer.alpha[ys:ys + SIZE, xs:xs + SIZE, None]
        frame = layer.bg + a * (head - layer.bg)
        np.clip(frame + 0.5, 0, 255, out=frame)
        out[k] = frame
    return out


def render_reference(identity: Identity) -> np.ndarray:
    """The neutral closed-mouth frame, uint8 [128, 128, 3]."""
    return render(identity, Articulation.neutral(1), idle=False)[0]


def mouth_box(identity: Identity, margin: int = 2) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), half-open, containing the mouth at any opening, spread and sway."""
    mx, my = identity.cx, identity.cy + identity.mouth_y
    half_w = identity.mouth_w * 1.3 + 1.5 + MAX_SWAY_X + margin
    y0 = my - 3.2 - MAX_SWAY_Y - margin
    y1 = my + identity.mouth_open_px + 3.2 + MAX_SWAY_Y + margin
    return (max(0, int(np.floor(y0))), min(SIZE, int(np.ceil(y1)) + 1),
            max(0, int(np.floor(mx - half_w))), min(SIZE, int(np.ceil(mx + half_w)) + 1))
