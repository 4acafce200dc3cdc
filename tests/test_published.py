"""The published model's transformer: the converter against peft and diffusers, on replicas in its layout.

Tolerances are fp32 and relative to the reference's largest magnitude: at most 1e-4 (measured about 1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avatarforcing.model import AvatarDiT
from avatarforcing.published import (
    ConversionError,
    convert_dit,
    infer_config,
    source_key_table,
    strip_wrappers,
)
from avatarforcing.rope import RopeTable
from tests.published_replica import TINY, TINY_ALPHA, ReferenceLayout, student_state, tiny_student, with_lora

TOL = 1e-4


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def test_full_size_key_table_is_consumed_exactly_once() -> None:
    """The published student's 1,457 keys (built by peft on the meta device) load, each used once."""
    with torch.device("meta"):
        ref = with_lora(ReferenceLayout(dim=1536, layers=30, ffn=8960, text_dim=4096, feature_dim=14 * 768),
                        rank=128, alpha=64)
    sd = strip_wrappers(student_state(ref))
    assert len(sd) == 1457
    cfg = infer_config(sd)
    assert (cfg.dim, cfg.layers, cfg.heads, cfg.ffn_dim, cfg.audio_layers) == (1536, 30, 12, 8960, (1, 15))
    assert {k: tuple(v.shape) for k, v in sd.items()} == source_key_table(cfg)
    ours = convert_dit(sd, cfg)
    with torch.device("meta"):
        model = AvatarDiT(cfg)
    missing, unexpected = model.load_state_dict(ours, strict=True, assign=True)
    assert not missing and not unexpected
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in ours.values())


def test_lora_merge_equals_peft_layers() -> None:
    m = tiny_student(seed=1)
    sd = strip_wrappers(student_state(m))
    ours = convert_dit(sd, infer_config(sd, heads=2), lora_alpha=TINY_ALPHA)
    x = torch.randn(3, 5, TINY["dim"])
    pairs = {"self_attn.q": "q", "self_attn.o": "o", "cross_attn.k": "ck", "cross_attn.v": "cv", "ffn.0": "ffn.0"}
    for i in (0, TINY["layers"] - 1):
        for src, dst in pairs.items():
            layer = m.get_submodule(f"blocks.{i}.{src}")
            assert type(layer).__module__.startswith("peft")
            with torch.no_grad():
                want = layer(x)
            got = F.linear(x, ours[f"blocks.{i}.{dst}.weight"], ours[f"blocks.{i}.{dst}.bias"])
            assert rel_err(got, want) < TOL, (i, src)
    h = torch.randn(2, TINY["ffn"])
    with torch.no_grad():
        want = m.get_submodule("blocks.2.ffn.2")(h)
    assert rel_err(F.linear(h, ours["blocks.2.ffn.2.weight"], ours["blocks.2.ffn.2.bias"]), want) < TOL
    # Without the LoRA the layers differ: the merge is what makes them equal.
    base = sd["blocks.0.self_attn.q.base_layer.weight"]
    assert rel_err(F.linear(x, base), F.linear(x, ours["blocks.0.q.weight"])) > 1e-2


def _diffusers_model(m: torch.nn.Module, heads: int) -> torch.nn.Module:
    """The replica merged by peft, audio dropped, through diffusers' own conversion, loaded strictly."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from peft.tuners.lora import LoraLayer

    for mod in m.modules():
        if isinstance(mod, LoraLayer):
            mod.merge()
    wan: dict[str, torch.Tensor] = {}
    for k, v in m.state_dict().items():
        if "lora_" in k or k.startswith("audio_"):
            continue
        wan[k.replace(".base_layer.", ".")] = v
    conv = convert_wan_transformer_to_diffusers(wan)
    d = TINY["dim"]
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=d // heads,
                                  in_channels=33, out_channels=16, text_dim=TINY["text_dim"], freq_dim=256,
                                  ffn_dim=TINY["ffn"], num_layers=TINY["layers"], cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads", eps=1e-6)
    model.load_state_dict(conv, strict=True)
    return model.eval()


def test_bidirectional_pass_equals_diffusers_wan() -> None:
    """One pass over F latent frames at per-frame noise levels, audio injected, text cross-attention: ours
    (converted from the published layout) against diffusers' WanTransformer3DModel (converted by diffusers)."""
    torch.manual_seed(0)
    m = tiny_student(seed=2)
    sd = strip_wrappers(student_state(m))
    heads = 2
    cfg = infer_config(sd, heads=heads, height=64, width=96)
    ours = AvatarDiT(cfg)
    ours.load_state_dict(convert_dit(sd, cfg, lora_alpha=TINY_ALPHA), strict=True)
    ours.eval()
    n, f = 2, 4
    lh, lw = cfg.latent_hw
    lat = torch.randn(n, f, 16, lh, lw)
    ref = torch.randn(n, 16, lh, lw)
    sigma = torch.tensor([[0.3, 0.55, 0.8, 1.0], [0.1, 0.5, 0.9, 0.95]])
    feats = torch.randn(n, 4 * f, TINY["feature_dim"])
    raw_ctx = torch.randn(7, TINY["text_dim"])
    ctx = torch.cat([raw_ctx, torch.zeros(cfg.text_len - 7, TINY["text_dim"])])  # zero past the prompt
    with torch.no_grad():
        tok = ours.pack_audio(feats)
        flow, _ = ours(lat, sigma, ref, tok, RopeTable(cfg, list(range(f)), "cpu", torch.float32),
                       context=ours.context(ctx))

    dm = _diffusers_model(m, heads)
    src = {k: v for k, v in sd.items() if k.startswith("audio_")}
    # The reference's audio path, written here from its facts: 4 frames packed (frame-major), Linear,
    # LayerNorm, then projection j added to the residual before block j + 2, broadcast over the frame's tokens.
    packed = F.layer_norm(F.linear(feats.reshape(n, f, -1), src["audio_proj.proj.weight"], src["audio_proj.proj.bias"]),
                          (32,), src["audio_proj.norm_out.weight"], src["audio_proj.norm_out.bias"])
    p = cfg.tokens_per_frame

    def add_audio(j: int):  # noqa: ANN202
        def hook(_mod, args):  # noqa: ANN001, ANN202
            a = F.linear(packed, src[f"audio_cond_projs.{j}.weight"], src[f"audio_cond_projs.{j}.bias"])
            return (args[0] + a.repeat_interleave(p, dim=1),) + tuple(args[1:])
        return hook

    for j in range(TINY["layers"] // 2 - 1):
        dm.blocks[j + 2].register_forward_pre_hook(add_audio(j))
    x = torch.cat([lat.transpose(1, 2), ref[:, :, None].expand(n, 16, f, lh, lw),
                   torch.ones(n, 1, f, lh, lw)], dim=1)
    t = (sigma * 1000).repeat_interleave(p, dim=1)  # per-token timesteps
    with torch.no_grad():
        want = dm(hidden_states=x, timestep=t, encoder_hidden_states=ctx[None].expand(n, -1, -1),
                  return_dict=False)[0]
    err = rel_err(flow.transpose(1, 2), want)
    assert err < TOL, err
    # The audio matters: without it the outputs differ (the hooks are not a no-op).
    with torch.no_grad():
        silent, _ = ours(lat, sigma, ref, torch.zeros_like(tok), RopeTable(cfg, list(range(f)), "cpu", torch.float32),
                         context=ours.context(ctx))
    assert rel_err(silent.transpose(1, 2), want) > 1e-3


def test_anchor_token_is_the_token_of_zero_features() -> None:
    m = tiny_student(seed=3)
    sd = strip_wrappers(student_state(m))
    cfg = infer_config(sd, heads=2)
    ours = AvatarDiT(cfg)
    ours.load_state_dict(convert_dit(sd, cfg, lora_alpha=TINY_ALPHA))
    tok = ours.anchor_audio_token()
    want = F.layer_norm(sd["audio_proj.proj.bias"], (32,), sd["audio_proj.norm_out.weight"],
                        sd["audio_proj.norm_out.bias"])
    assert tok.shape == (1, 1, 32)
    assert rel_err(tok[0, 0].detach(), want) < TOL
    assert tok.abs().max() > 0.1  # not a zero token


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_converter_names_the_key(damage: str) -> None:
    sd = strip_wrappers(student_state(tiny_student(seed=4)))
    cfg = infer_config(sd, heads=2)
    if damage == "missing":
        del sd["blocks.3.cross_attn.norm_k.weight"]
        expect = "missing key model.blocks.3.cross_attn.norm_k.weight"
    elif damage == "extra":
        sd["blocks.0.self_attn.q.lora_A.other.weight"] = torch.zeros(16, 256)
        expect = "unexpected key model.blocks.0.self_attn.q.lora_A.other.weight with shape [16, 256]"
    else:
        sd["head.head.weight"] = torch.zeros(60, 256)
        expect = "model.head.head.weight has shape [60, 256], expected [64, 256]"
    with pytest.raises(ConversionError) as e:
        convert_dit(sd, cfg, file="model.pt", lora_alpha=TINY_ALPHA)
    msg = str(e.value)
    assert msg.startswith("model.pt: ") and expect in msg and "\n" not in msg
