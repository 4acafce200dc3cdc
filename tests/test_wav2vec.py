"""avatarforcing.wav2vec against transformers' own wav2vec2 modules, composed as the published reference
composes them (wan/models/wav2vec.py + utils/dataset.py), on a tiny random wav2vec2 with the real CNN stack."""

from __future__ import annotations

import json
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from avatarforcing.wav2vec import (
    DEFAULT_CONTEXT_S,
    SAMPLES_PER_FRAME,
    Wav2VecFeatures,
    context_samples,
)

SPEECH = Path(__file__).resolve().parent.parent / "avatarforcing" / "assets" / "speech_16k.wav"

# Tolerance for "equals the reference": |ours - reference| <= REL_TOL * max|reference|, fp32 on CPU.
REL_TOL = 1e-4


def tiny_config() -> Wav2Vec2Config:
    # The real conv stack (hop 320 samples, receptive field 400) and feat_extract_norm "group" like base;
    # small widths. Dropouts, LayerDrop and SpecAugment keep their (non-zero) defaults: eval mode must hold.
    return Wav2Vec2Config(
        conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        feat_extract_norm="group", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    )


def speech(seconds: float, offset_s: float = 0.0) -> np.ndarray:
    """float32 in [-1, 1] from the bundled 16 kHz speech, looped."""
    with wave.open(str(SPEECH)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
    start, n = int(offset_s * 16000), int(round(seconds * 16000))
    return np.resize(np.roll(pcm, -start), n).astype(np.float32)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def l2_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("w2v-tiny")
    Wav2Vec2Model(tiny_config()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf(folder: Path) -> Wav2Vec2Model:
    return Wav2Vec2Model.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture(scope="module")
def feats(folder: Path) -> Wav2VecFeatures:
    return Wav2VecFeatures.from_folder(folder)


def reference_features(model: Wav2Vec2Model, audio: np.ndarray, frames: int) -> torch.Tensor:
    """The reference's composition of transformers' modules, written out: [1, frames, feature_dim]."""
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=False)
    input_values = torch.from_numpy(np.asarray(fe(audio, sampling_rate=16000).input_values)).float()
    with torch.no_grad():
        extract = model.feature_extractor(input_values).transpose(1, 2)
        extract = F.interpolate(extract.transpose(1, 2), size=frames, align_corners=True,
                                mode="linear").transpose(1, 2)
        hidden, _ = model.feature_projection(extract)
        # transformers 5: the encoder module alone returns hidden_states=None (Wav2Vec2Model.forward captures
        # them with hooks), so they are recorded here as transformers 4 returned them: the input of the
        # first layer, then the output of every layer.
        recorded: list[torch.Tensor] = []

        def first_input(m: Any, args: tuple[Any, ...]) -> None:
            recorded.append(args[0])

        def output(m: Any, args: Any, out: Any) -> None:
            recorded.append(out[0] if isinstance(out, tuple) else out)

        handles = [model.encoder.layers[0].register_forward_pre_hook(first_input)]
        handles += [layer.register_forward_hook(output) for layer in model.encoder.layers]
        try:
            enc = model.encoder(hidden, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        hidden_states = enc.hidden_states if getattr(enc, "hidden_states", None) is not None else tuple(recorded)
        assert len(hidden_states) == model.config.num_hidden_layers + 1
        emb = enc.last_hidden_state
        for h in hidden_states:
            emb = torch.cat((emb, h), -1)
    return emb


def model_forward_features(model: Wav2Vec2Model, audio: np.ndarray, frames: int) -> torch.Tensor:
    """Same, through Wav2Vec2Model.forward itself (its own hidden-state capture), the interpolation injected
    after the CNN with a forward hook (the reference subclass puts it there)."""
    fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)
    input_values = torch.from_numpy(np.asarray(fe(audio, sampling_rate=16000).input_values)).float()

    def interp(m: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        return F.interpolate(out, size=frames, align_corners=True, mode="linear")

    handle = model.feature_extractor.register_forward_hook(interp)
    try:
        with torch.no_grad():
            out = model(input_values, output_hidden_states=True)
    finally:
        handle.remove()
    return torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)


# ---- the reference composition ------------------------------------------------------------------------------


def test_feature_dim(feats: Wav2VecFeatures) -> None:
    cfg = tiny_config()
    assert feats.feature_dim == cfg.hidden_size * (cfg.num_hidden_layers + 2) == 128
    with torch.device("meta"):  # wav2vec2-base sizes: 14 x 768
        base = Wav2VecFeatures(Wav2Vec2Model(Wav2Vec2Config()))
    assert base.feature_dim == 10752
    with torch.device("meta"), pytest.raises(ValueError, match="do_stable_layer_norm"):
        Wav2VecFeatures(Wav2Vec2Model(Wav2Vec2Config(do_stable_layer_norm=True, feat_extract_norm="layer")))


@pytest.mark.parametrize("frames, extra", [(80, 0), (50, 123), (37, -200)])
def test_frame_features_equal_reference(feats: Wav2VecFeatures, hf: Wav2Vec2Model, frames: int, extra: int) -> None:
    audio = speech((frames * SAMPLES_PER_FRAME + extra) / 16000, offset_s=1.3)
    ref = reference_features(hf, audio, frames)
    ours = feats.frame_features(torch.from_numpy(audio)[None], frames)
    assert ours.shape == (1, frames, feats.feature_dim) and ours.dtype == torch.float32
    assert max_rel(ours, ref) <= REL_TOL
    # transformers' own forward (its hidden-state capture) agrees with the written-out composition
    assert max_rel(model_forward_features(hf, audio, frames), ref) <= REL_TOL


def test_interpolation_of_640T_samples_picks_every_second_cnn_frame(hf: Wav2Vec2Model) -> None:
    for t in (1, 2, 7, 50):
        x = torch.from_numpy(speech(t * SAMPLES_PER_FRAME / 16000))[None]
        with torch.no_grad():
            cnn = hf.feature_extractor(x)  # [1, C, L] at 50 Hz
        assert cnn.shape[-1] == 2 * t - 1
        picked = F.interpolate(cnn, size=t, mode="linear", align_corners=True)
        torch.testing.assert_close(picked, cnn[..., ::2], rtol=0, atol=0)
    # Not so with half a frame more: 2T CNN frames, the grid falls between them.
    x = torch.from_numpy(speech((7 * SAMPLES_PER_FRAME + 320) / 16000))[None]
    with torch.no_grad():
        cnn = hf.feature_extractor(x)
    assert cnn.shape[-1] == 14
    assert not torch.allclose(F.interpolate(cnn, size=7, mode="linear", align_corners=True), cnn[..., ::2])


def test_group_norm_cnn_does_not_stream(hf: Wav2Vec2Model) -> None:
    """Why even the CNN needs the context: base's first conv layer has a GroupNorm with one group per channel,
    i.e. each channel normalised over the whole input's time axis. Without it the CNN is shift-equivariant
    (hop 320 samples), so a window cut at a multiple of 320 would give the same frames as the whole clip."""
    x = torch.from_numpy(speech(64 * SAMPLES_PER_FRAME / 16000, offset_s=0.7))[None]
    cut = 40 * SAMPLES_PER_FRAME  # = 80 CNN hops
    with torch.no_grad():
        whole, part = hf.feature_extractor(x), hf.feature_extractor(x[:, cut:])
        assert l2_rel(part, whole[..., 80 : 80 + part.shape[-1]]) > 1e-3
        norm = hf.feature_extractor.conv_layers[0].layer_norm
        hf.feature_extractor.conv_layers[0].layer_norm = torch.nn.Identity()
        try:
            whole, part = hf.feature_extractor(x), hf.feature_extractor(x[:, cut:])
        finally:
            hf.feature_extractor.conv_layers[0].layer_norm = norm
    assert part.shape[-1] == whole.shape[-1] - 80
    assert max_rel(part, whole[..., 80:]) <= 1e-5


def test_batched_rows_equal_each_row_alone(feats: Wav2VecFeatures) -> None:
    frames = 40
    n = frames * SAMPLES_PER_FRAME
    rows = torch.stack([torch.from_numpy(speech(n / 16000, offset_s=o)) for o in (0.0, 2.1, 4.7)])
    rows[2] = 0.25 * rows[0] + 0.01  # each row is normalised over its own samples
    batched = feats.frame_features(rows, frames)
    for i in range(3):
        assert max_rel(batched[i : i + 1], feats.frame_features(rows[i : i + 1], frames)) <= 1e-5
    assert max_rel(batched[2], batched[0]) <= 1e-4
    assert l2_rel(batched[1], batched[0]) > 0.1


def test_eval_mode_holds(folder: Path) -> None:
    f = Wav2VecFeatures.from_folder(folder)
    assert f.model.config.mask_time_prob > 0 and f.model.config.hidden_dropout > 0  # would change results
    f.train()
    assert not f.model.training and all(not m.training for m in f.model.modules())
    x = torch.from_numpy(speech(1.28))[None]
    a, b = f.frame_features(x, 32), f.frame_features(x, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not any(p.requires_grad for p in f.parameters())


# ---- streaming ----------------------------------------------------------------------------------------------


def test_block_features_whole_window_equals_frame_features(feats: Wav2VecFeatures) -> None:
    frames, block = 96, 16
    clip = torch.from_numpy(speech(frames * SAMPLES_PER_FRAME / 16000, offset_s=0.5))[None]
    whole = feats.frame_features(clip, frames)
    got = feats.block_features(clip, block)
    assert got.shape == (1, block, feats.feature_dim)
    assert max_rel(got, whole[:, -block:]) <= 1e-5

    # A shorter context is an approximation: close-ish, but not the same (so the context is really used).
    ctx = 32 * SAMPLES_PER_FRAME
    short = feats.block_features(clip[:, -(ctx + block * SAMPLES_PER_FRAME):], block)
    assert short.shape == got.shape and torch.isfinite(short).all()
    err = l2_rel(short, whole[:, -block:])
    assert 1e-4 < err < 1.0
    # and the block alone (no context) is further off than with context
    alone = feats.block_features(clip[:, -block * SAMPLES_PER_FRAME:], block)
    assert l2_rel(alone, whole[:, -block:]) > err


def test_shape_errors(feats: Wav2VecFeatures) -> None:
    x = torch.zeros(1, 16 * SAMPLES_PER_FRAME)
    bad: list[tuple[Callable[[], object], str]] = [
        (lambda: feats.frame_features(x[0], 16), r"\[n, samples\]"),
        (lambda: feats.frame_features(x.to(torch.int16), 16), "float"),
        (lambda: feats.frame_features(x[:, :399], 1), "receptive field 400"),
        (lambda: feats.frame_features(x, 0), "positive int"),
        (lambda: feats.block_features(x[0], 16), r"\[n, samples\]"),
        (lambda: feats.block_features(x[:, :-1], 16), "multiple of 640"),
        (lambda: feats.block_features(x, 17), r"1\.\.16"),
        (lambda: feats.block_features(x, 0), r"1\.\.16"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_context_samples() -> None:
    assert context_samples(0.64) == 16 * SAMPLES_PER_FRAME
    assert context_samples() % SAMPLES_PER_FRAME == 0 and context_samples() == round(DEFAULT_CONTEXT_S * 16000)
    with pytest.raises(ValueError):
        context_samples(-1)


# ---- loading ------------------------------------------------------------------------------------------------


def rename_weight_norm_to_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                "weight_v")
        out[k] = v
    return out


def test_legacy_weight_norm_names_load(folder: Path, feats: Wav2VecFeatures, tmp_path: Path) -> None:
    state = load_file(folder / "model.safetensors")
    assert any(k.endswith("parametrizations.weight.original0") for k in state)  # how transformers 5 saves
    legacy = rename_weight_norm_to_legacy(state)
    assert {"encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_v"} <= set(legacy)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})

    x = torch.from_numpy(speech(1.28, offset_s=3.0))[None]
    want = feats.frame_features(x, 32)
    got = Wav2VecFeatures.from_folder(tmp_path).frame_features(x, 32)  # transformers renames on load
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    cfg = json.loads((folder / "config.json").read_text())
    for sd in (legacy, {"wav2vec2." + k: v for k, v in legacy.items()} | {"lm_head.weight": torch.zeros(3, 32)}):
        f = Wav2VecFeatures.from_config_and_state(cfg, sd)
        torch.testing.assert_close(f.frame_features(x, 32), want, rtol=0, atol=0)
    # nn.Module.load_state_dict too (e.g. inside a bigger module), through a pre-hook
    f = Wav2VecFeatures.from_config_and_state(cfg, state)
    f.load_state_dict(rename_weight_norm_to_legacy(feats.state_dict()))
    torch.testing.assert_close(f.frame_features(x, 32), want, rtol=0, atol=0)


def test_config_and_state_round_trip(feats: Wav2VecFeatures) -> None:
    cfg = feats.config_dict()
    json.dumps(cfg)  # storable as JSON
    sd = feats.state_dict()
    assert all(k.startswith("model.") for k in sd)
    f = Wav2VecFeatures.from_config_and_state(json.loads(json.dumps(cfg)), sd)
    x = torch.from_numpy(speech(0.64, offset_s=5.0))[None]
    torch.testing.assert_close(f.frame_features(x, 16), feats.frame_features(x, 16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        Wav2VecFeatures.from_config_and_state(cfg, {k: v for k, v in sd.items() if "layers.1." not in k})


def test_bad_folders(folder: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        Wav2VecFeatures.from_folder(missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as e2:
        Wav2VecFeatures.from_folder(empty)
    assert str(empty) in str(e2.value) and "\n" not in str(e2.value)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weights missing") as e3:
        Wav2VecFeatures.from_folder(partial)
    assert str(partial) in str(e3.value) and "\n" not in str(e3.value)


# ---- dtype / device -----------------------------------------------------------------------------------------


def test_bf16_follows_module_dtype(folder: Path, feats: Wav2VecFeatures) -> None:
    f = Wav2VecFeatures.from_folder(folder, dtype=torch.bfloat16)
    x = torch.from_numpy(speech(1.28, offset_s=2.0))[None]
    got = f.frame_features(x, 32)
    assert got.dtype == torch.bfloat16
    assert l2_rel(got, feats.frame_features(x, 32)) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16(folder: Path, feats: Wav2VecFeatures) -> None:
    f = Wav2VecFeatures.from_folder(folder, device="cuda", dtype=torch.bfloat16)
    x = torch.from_numpy(speech(1.28, offset_s=2.0))[None]
    got = f.block_features(x, 16)  # a CPU window goes to the module's device
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    assert l2_rel(got.cpu(), feats.block_features(x, 16)) < 0.05
