"""avatarforcing.wan_vae against diffusers' AutoencoderKLWan (an independent implementation of Wan's VAE).

A small replica (dim 8, Wan's depth and z_dim 16) with random, non-trivial weights goes through a
Wan-format ``.pth`` file: our loader reads it, and diffusers' own Wan->diffusers key conversion feeds
the same weights to AutoencoderKLWan with a strict load. Tolerance everywhere: max-abs difference over
max-abs reference <= 1e-4, in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from avatarforcing.wan_vae import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WanVAE,
    WanVAEConfig,
    load_wan_vae,
    wan_vae_state_dict_problems,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

RTOL = 1e-4
CFG = WanVAEConfig(dim=8)  # Wan2.1's structure (4 levels, 2 res blocks, temporal x4), narrow
H, W = 24, 32
h, w = H // 8, W // 8
MEAN = torch.tensor(WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
STD = torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours - ref).abs().max() / ref.abs().max())


def random_wan_state_dict(cfg: WanVAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Default init plus gains != 1 and biases != 0, so that a misplaced norm or bias shows."""
    torch.manual_seed(seed)
    model = WanVAE(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("proj.weight"):
                p.mul_(3.0)  # attention output visible against the residual
    return {k: v.clone() for k, v in model.state_dict().items()}


def diffusers_wan(cfg: WanVAEConfig, sd: dict[str, torch.Tensor]) -> Any:
    ref = diffusers.AutoencoderKLWan(
        base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        attn_scales=list(cfg.attn_scales), temperal_downsample=list(cfg.temperal_downsample),
        latents_mean=list(WAN21_LATENTS_MEAN), latents_std=list(WAN21_LATENTS_STD))
    ref.load_state_dict(convert_wan_vae_to_diffusers(sd), strict=True)
    return ref.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Our model (loaded from a Wan-format file), diffusers' model, inputs and diffusers' outputs."""
    torch.set_num_threads(2)
    sd = random_wan_state_dict(CFG)
    path = tmp_path_factory.mktemp("wan") / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    ours = load_wan_vae(path)
    ref = diffusers_wan(CFG, sd)
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 9, H, W, generator=g) * 2 - 1
    z = torch.randn(2, 16, 3, h, w, generator=g)  # normalised latents, two unrelated streams
    with torch.no_grad():
        enc_ref = (ref.encode(video).latent_dist.mean - MEAN) / STD
        dec_ref = ref.decode(z * STD + MEAN).sample
    return {"sd": sd, "path": path, "ours": ours, "video": video, "z": z, "enc_ref": enc_ref, "dec_ref": dec_ref}


# --- numbers against diffusers -------------------------------------------------------------------------


@torch.no_grad()
def test_encode_matches_diffusers(world: dict[str, Any]) -> None:
    mu = world["ours"].encode(world["video"])
    assert mu.shape == (2, 16, 3, h, w)
    assert rel_err(mu, world["enc_ref"]) <= RTOL
    img = world["ours"].encode_image(world["video"][:, :, 0])  # the first frame is encoded on its own
    assert img.shape == (2, 16, h, w)
    assert rel_err(img, world["enc_ref"][:, :, 0]) <= RTOL


@torch.no_grad()
def test_decode_matches_diffusers(world: dict[str, Any]) -> None:
    ref = world["dec_ref"]
    assert ref.shape == (2, 3, 9, H, W)
    assert ref.abs().lt(1).float().mean() > 0.5  # mostly unclamped, or the comparison would prove little
    assert rel_err(world["ours"].decode(world["z"]), ref) <= RTOL


@torch.no_grad()
@pytest.mark.parametrize("chunks", [(1, 1, 1), (1, 2), (3,)])
def test_streamed_decode_matches_whole_decode(world: dict[str, Any], chunks: tuple[int, ...]) -> None:
    vae, z = world["ours"], world["z"]
    cache = vae.init_decoder_cache(2, h, w, device="cpu", dtype=torch.float32)
    outs, start = [], 0
    for i, k in enumerate(chunks):
        frames, cache = vae.decode_step(z[:, :, start:start + k], cache, first=i == 0)
        assert frames.shape[2] == (1 + 4 * (k - 1) if i == 0 else 4 * k)
        assert [tuple(c.shape) for c in cache] == [(2, *s) for s in vae.decoder_cache_shapes(h, w)]
        outs.append(frames)
        start += k
    assert rel_err(torch.cat(outs, dim=2), world["dec_ref"]) <= RTOL


@torch.no_grad()
def test_the_cache_carries_the_past(world: dict[str, Any]) -> None:
    """The second latent decoded without its history must NOT reproduce the whole decode (else the
    streaming test above proves nothing about the cache)."""
    vae, z, ref = world["ours"], world["z"], world["dec_ref"]
    frames, cache = vae.decode_step(z[:, :, :1], None, first=True)
    carried, _ = vae.decode_step(z[:, :, 1:2], cache, first=False)
    cold, _ = vae.decode_step(z[:, :, 1:2], vae.init_decoder_cache(2, h, w), first=False)
    assert rel_err(carried, ref[:, :, 1:5]) <= RTOL
    assert rel_err(cold, ref[:, :, 1:5]) > 100 * RTOL
    # first=True ignores whatever an old session left in a recycled slot.
    junk = [torch.randn_like(c) for c in cache]
    again, _ = vae.decode_step(z[:, :, :1], junk, first=True)
    assert torch.equal(again, frames)


@torch.no_grad()
def test_batched_streams_equal_each_alone(world: dict[str, Any]) -> None:
    vae, z = world["ours"], world["z"]
    both, cache = vae.decode_step(z[:, :, :2], None, first=True)
    both2, _ = vae.decode_step(z[:, :, 2:], cache, first=False)
    for row in range(2):
        alone, c1 = vae.decode_step(z[row:row + 1, :, :2], None, first=True)
        # The slot's cache, gathered by index from the batched one, continues the stream alone.
        alone2, _ = vae.decode_step(z[row:row + 1, :, 2:], [c[row:row + 1] for c in cache], first=False)
        assert rel_err(alone, both[row:row + 1]) <= RTOL
        assert rel_err(alone2, both2[row:row + 1]) <= RTOL
        assert all(rel_err(a, b[row:row + 1]) <= RTOL for a, b in zip(c1, cache, strict=True) if b.abs().max() > 0)
    assert rel_err(both[:1], both[1:]) > 0.01  # the two streams do differ


@torch.no_grad()
def test_channels_last_layouts_keep_the_function(world: dict[str, Any]) -> None:
    """The engine's layout change on a CUDA device (``engine.channels_last``): Wan's 3D convolutions go
    channels_last_3d and its 2D ones channels_last (``Module.to(memory_format=channels_last)`` raises on the
    5-D weights), and the streamed decode and the encode give the same numbers in the new layout."""
    import copy

    from avatarforcing.engine import channels_last

    with pytest.raises(RuntimeError):
        copy.deepcopy(world["ours"]).to(memory_format=torch.channels_last)
    vae = channels_last(copy.deepcopy(world["ours"]))
    ranks = {p.dim() for p in vae.parameters()}
    assert {4, 5} <= ranks
    five = [p for p in vae.parameters() if p.dim() == 5]
    four = [p for n, p in vae.named_parameters() if p.dim() == 4 and not n.endswith("gamma")]
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in five)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in four)
    # (a 1x1 kernel's weight is contiguous in both layouts; the 3x3 ones have moved)
    assert any(not p.is_contiguous() for p in five) and any(not p.is_contiguous() for p in four)
    z = world["z"]
    frames, cache = vae.decode_step(z[:, :, :2], None, first=True)
    more, _ = vae.decode_step(z[:, :, 2:], cache, first=False)
    assert rel_err(torch.cat([frames, more], dim=2), world["dec_ref"]) <= RTOL
    assert rel_err(vae.encode(world["video"]), world["enc_ref"]) <= RTOL
    assert vae.latents_std.dtype == torch.float32  # (WanVAE._apply rebuilt its statistics)


# --- structure -----------------------------------------------------------------------------------------


def test_real_config_has_wans_keys_and_cache_layout() -> None:
    """Wan2.1's full-size VAE (on the meta device): our keys, through diffusers' Wan->diffusers conversion,
    are exactly diffusers' keys and shapes, and the decoder carries 32 histories at 480x832."""
    with torch.device("meta"):
        ours = WanVAE(WanVAEConfig())
        ref = diffusers.AutoencoderKLWan()
    sd = ours.state_dict()
    assert not any("latents" in k for k in sd)
    converted = {k: tuple(v.shape) for k, v in convert_wan_vae_to_diffusers(dict(sd)).items()}
    assert converted == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert WanVAEConfig.from_state_dict(sd) == WanVAEConfig()
    shapes = ours.decoder_cache_shapes(60, 104)
    assert len(shapes) == 32  # conv1, 2 per residual block (2 middle + 12 up), 2 time convs, head
    assert shapes[0] == (16, 2, 60, 104) and shapes[-1] == (96, 2, 480, 832)
    assert sum(torch.Size(s).numel() for s in shapes) == 944_286_720


def test_config_round_trips_and_is_read_off_the_weights(world: dict[str, Any]) -> None:
    assert WanVAEConfig.from_dict(CFG.to_dict()) == CFG
    assert WanVAEConfig.from_state_dict(world["sd"]) == CFG
    odd = WanVAEConfig(dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, False),
                       attn_scales=(0.5,))
    with torch.device("meta"):
        sd = WanVAE(odd).state_dict()
    assert WanVAEConfig.from_state_dict(sd) == odd
    assert wan_vae_state_dict_problems(sd, odd) == []


def test_latent_stats_stay_float32_in_bf16() -> None:
    vae = WanVAE(WanVAEConfig(dim=4)).to(torch.bfloat16)
    assert vae.latents_std.dtype == torch.float32
    assert vae.latents_std[0].item() == pytest.approx(2.8184, abs=1e-6)
    assert "latents_std" not in vae.state_dict()


# --- loading -------------------------------------------------------------------------------------------


def test_load_variants(world: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = world["sd"]
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": sd}, wrapped)
    st = tmp_path / "vae.safetensors"
    save_file(sd, str(st))
    for path in (wrapped, st):
        vae = load_wan_vae(path)
        assert vae.config == CFG and not vae.training
        assert all(torch.equal(vae.state_dict()[k], v) for k, v in sd.items())
        assert vae.latents_mean.device.type == "cpu"


def _load_error(tmp_path: Path, sd: dict[str, Any]) -> str:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_wan_vae(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_load_errors_name_the_file_and_key(world: dict[str, Any], tmp_path: Path) -> None:
    sd = dict(world["sd"])
    bad = dict(sd, **{"decoder.head.2.weight": torch.zeros(3, 8, 3, 3, 1)})
    msg = _load_error(tmp_path, bad)
    assert msg.endswith("decoder.head.2.weight has shape [3, 8, 3, 3, 1], expected [3, 8, 3, 3, 3]"), msg

    missing = {k: v for k, v in sd.items() if k != "decoder.upsamples.3.time_conv.bias"}
    assert "missing key decoder.upsamples.3.time_conv.bias" in _load_error(tmp_path, missing)

    extra = dict(sd, **{"decoder.head.3.weight": torch.zeros(1)})
    assert _load_error(tmp_path, extra).endswith("unexpected key decoder.head.3.weight")

    no_encoder = {k: v for k, v in sd.items() if k != "encoder.conv1.weight"}
    assert "missing key encoder.conv1.weight" in _load_error(tmp_path, no_encoder)

    good = tmp_path / "good.pth"
    torch.save(sd, good)
    for name, data in (("truncated.pth", good.read_bytes()[: good.stat().st_size // 2]),
                       ("notes.pth", b"these are not weights\n")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError) as e:
            load_wan_vae(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value), str(e.value)


def test_several_problems_are_all_listed(world: dict[str, Any], tmp_path: Path) -> None:
    sd = {k: v for k, v in world["sd"].items() if not k.startswith("decoder.head.")}
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_wan_vae(path)
    lines = str(e.value).splitlines()
    assert sorted(lines) == sorted(f"{path}: missing key {k} (expected shape {list(v.shape)})"
                                   for k, v in world["sd"].items() if k.startswith("decoder.head."))
