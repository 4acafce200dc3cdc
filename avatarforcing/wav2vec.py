"""wav2vec2 audio features per video frame, as the published AvatarForcing model computes them.

The reference (wan/models/wav2vec.py and utils/dataset.py of the published code) turns a clip of 16 kHz
mono audio into one feature vector per 25 fps video frame:

1. the whole clip is normalised to zero mean and unit variance (Wav2Vec2FeatureExtractor, do_normalize,
   eps 1e-7 under the square root);
2. the CNN ``feature_extractor`` makes 50 Hz frames (hop 320 samples);
3. ``F.interpolate(mode="linear", align_corners=True)`` resamples them to the video frame count; with
   exactly 640 * T samples the CNN gives 2T - 1 frames and this is an exact pick of every second one;
4. ``feature_projection``, then the encoder, so the transformer runs at 25 Hz;
5. per frame ``cat([last_hidden_state] + hidden_states)``: 1 + (num_hidden_layers + 1) vectors of
   hidden_size, 14 x 768 = 10752 for wav2vec2-base.

A server sees a stream. Three parts of that composition look at the whole input: the clip normalisation,
the GroupNorm of the first CNN layer (base uses ``feat_extract_norm="group"``: each of its channels is
normalised over time), and the encoder (global attention plus a positional convolution of 128 frames,
+-2.56 s at 25 Hz). So a stream is featurised on a sliding window, past context plus the new block, and
only the block's rows are kept (:meth:`Wav2VecFeatures.block_features`). That is an approximation; its
size is :data:`DEFAULT_CONTEXT_S`.

Hidden states are collected here by running the encoder's layers one by one: in transformers 5 the
encoder module called alone no longer returns ``hidden_states`` (they are captured by hooks installed by
``Wav2Vec2Model.forward``), and the interpolation has to sit between the CNN and the projection, so the
model's own forward cannot be used either. The tests check this against transformers' own forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm

# Past audio kept in front of each streamed block, in seconds (a whole number of frames).
# From scripts/wav2vec_context_report.py (bench/results/wav2vec-context-cpu-2026-11-29.json): wav2vec2-base
# sizes with RANDOM weights, 0.64 s blocks of a 20.48 s speech clip, relative L2 error against whole-clip
# features over blocks with the full context behind them, and the compute of one window per block per session:
#     context  0.64 s: 0.488 (12 GFLOP)   1.28 s: 0.409 (18)   2.56 s: 0.316 (30)
#              5.12 s: 0.285 (55)        10.24 s: 0.261 (105)
# A floor remains whatever the past (the window has no future, and the attention and normalisations are global).
# 5.12 s gets ~90% of the improvement that 10.24 s gets over 0.64 s for about half its compute, and is twice the
# positional conv's reach (+-2.56 s at 25 Hz). Random weights show only the mechanics: re-measure with the real
# model (on a GPU even 10.24 s is cheap next to a diffusion step, should the real error keep falling there).
DEFAULT_CONTEXT_S = 5.12

_WEIGHT_NORM_RENAMES = ((".weight_g", ".parametrizations.weight.original0"),
                        (".weight_v", ".parametrizations.weight.original1"))


def _rename_legacy_weight_norm(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Old checkpoints (facebook/wav2vec2-base-960h) store the positional conv's weight norm as
    ``weight_g`` / ``weight_v``; torch's parametrized weight norm names them ``original0`` / ``original1``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            for old, new in _WEIGHT_NORM_RENAMES:
                if key.endswith(old):
                    key = key[: -len(old)] + new
                    break
        out[key] = value
    return out


def _bare_model_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a Wav2Vec2Model from: a Wav2Vec2Model state dict, a Wav2VecFeatures state dict ("model."),
    or a head model's (Wav2Vec2ForCTC: "wav2vec2.", whose head weights are dropped)."""
    keys = list(state)
    if keys and all(k.startswith("model.") for k in keys):
        return {k[len("model."):]: v for k, v in state.items()}
    if any(k.startswith("wav2vec2.") for k in keys):
        return {k[len("wav2vec2."):]: v for k, v in state.items() if k.startswith("wav2vec2.")}
    return dict(state)


class Wav2VecFeatures(nn.Module):
    """Frozen wav2vec2 (always in eval mode) -> one feature vector per 25 fps video frame."""

    def __init__(self, model: Wav2Vec2Model) -> None:
        super().__init__()
        cfg = model.config
        if cfg.do_stable_layer_norm:
            # Its hidden_states differ between transformers 4 and 5 (last entry before/after the final LN);
            # the published model uses wav2vec2-base, which has the post-LN encoder.
            raise ValueError("wav2vec2 with do_stable_layer_norm=True is not supported (the published model uses "
                             "wav2vec2-base)")
        if cfg.add_adapter:
            raise ValueError("wav2vec2 with an adapter (add_adapter=True) is not supported")
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.register_load_state_dict_pre_hook(self._legacy_names_hook)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Wav2VecFeatures:
        """A transformers-format folder (config.json + weights), e.g. facebook/wav2vec2-base-960h."""
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"wav2vec2 folder {p}: no such directory")
        try:
            loaded = Wav2Vec2Model.from_pretrained(p, local_files_only=True, output_loading_info=True)
        except Exception as e:  # transformers raises OSError/ValueError/... with multi-line messages
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"wav2vec2 folder {p}: cannot load a Wav2Vec2Model ({type(e).__name__}: {first})") from e
        model, info = cast(tuple[Wav2Vec2Model, dict[str, Any]], loaded)
        # from_pretrained initialises missing weights at random with only a warning: refuse instead.
        # (masked_spec_embed is only used for SpecAugment in training.)
        missing = sorted(k for k in info["missing_keys"] if k != "masked_spec_embed")
        if missing:
            raise ValueError(f"wav2vec2 folder {p}: {len(missing)} weights missing, e.g. {', '.join(missing[:3])}")
        return cls(model).to(device=device, dtype=dtype)

    @classmethod
    def from_config_and_state(cls, config_dict: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                              ) -> Wav2VecFeatures:
        """Rebuilds from :meth:`config_dict` and :meth:`state_dict` (as a converted checkpoint stores them).
        Also takes a bare Wav2Vec2Model or a Wav2Vec2ForCTC state dict, and the old weight_g/weight_v names."""
        config = Wav2Vec2Config.from_dict(dict(config_dict))
        state = _rename_legacy_weight_norm(_bare_model_keys(state_dict))
        model = Wav2Vec2Model(config)
        if "masked_spec_embed" not in state and hasattr(model, "masked_spec_embed"):
            state["masked_spec_embed"] = model.masked_spec_embed.detach()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ValueError("wav2vec2 state dict does not fit its config: "
                             + " ".join(s.strip() for s in first[:3])) from e
        return cls(model).to(device=device, dtype=dtype)

    def config_dict(self) -> dict[str, Any]:
        """The wav2vec2 config as a JSON-serialisable dict (for :meth:`from_config_and_state`)."""
        return self.model.config.to_dict()

    @staticmethod
    def _legacy_names_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        renamed = _rename_legacy_weight_norm(state_dict, prefix + "model.")
        if renamed.keys() != state_dict.keys():
            state_dict.clear()
            state_dict.update(renamed)

    def train(self, mode: bool = True) -> Wav2VecFeatures:
        """The wav2vec2 stays in eval mode (no dropout, LayerDrop or SpecAugment) whatever the parent does."""
        super().train(mode)
        self.model.eval()
        return self

    # ---- properties ---------------------------------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        """hidden_size * (1 + num_hidden_layers + 1): last_hidden_state plus every hidden state."""
        cfg = self.model.config
        return int(cfg.hidden_size * (cfg.num_hidden_layers + 2))

    @property
    def device(self) -> torch.device:
        return self.model.feature_projection.projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.feature_projection.projection.weight.dtype

    @property
    def min_samples(self) -> int:
        """The CNN's receptive field: fewer samples give no CNN frame."""
        cfg = self.model.config
        rf = 1
        for k, s in zip(reversed(cfg.conv_kernel), reversed(cfg.conv_stride), strict=True):
            rf = (rf - 1) * s + k
        return rf

    # ---- features -----------------------------------------------------------------------------------------

    def _encode(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Wav2Vec2Encoder (post-LN, no mask) with output_hidden_states: [input of layer 0, output of each layer]."""
        enc = self.model.encoder
        h = enc.layer_norm(hidden + enc.pos_conv_embed(hidden))
        h = enc.dropout(h)
        states = [h]
        for layer in enc.layers:
            out = layer(h, attention_mask=None)
            h = out[0] if isinstance(out, tuple) else out  # transformers 4 returned (hidden, attn)
            states.append(h)
        return states

    @torch.inference_mode()
    def frame_features(self, pcm: torch.Tensor, frames: int) -> torch.Tensor:
        """pcm [n, S] float in [-1, 1] at 16 kHz -> [n, frames, feature_dim], each row normalised over its
        own S samples (the reference normalises the whole clip). In the module's dtype, on its device."""
        if not isinstance(pcm, torch.Tensor) or pcm.ndim != 2 or not pcm.is_floating_point():
            raise ValueError(f"pcm must be a float tensor [n, samples], got "
                             f"{tuple(pcm.shape) if isinstance(pcm, torch.Tensor) else type(pcm).__name__}"
                             f"{'' if not isinstance(pcm, torch.Tensor) else ' ' + str(pcm.dtype)}")
        if pcm.shape[0] < 1:
            raise ValueError("pcm has no rows")
        if pcm.shape[1] < self.min_samples:
            raise ValueError(f"pcm has {pcm.shape[1]} samples, fewer than the CNN's receptive field "
                             f"{self.min_samples}")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive int, got {frames!r}")
        x = pcm.to(device=self.device, dtype=torch.float64)
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + NORM_EPS)
        cnn = self.model.feature_extractor(x.to(self.dtype))  # [n, C, L] at 50 Hz
        cnn = F.interpolate(cnn, size=frames, mode="linear", align_corners=True)  # [n, C, frames]
        hidden, _ = self.model.feature_projection(cnn.transpose(1, 2))
        states = self._encode(hidden)
        return torch.cat([states[-1], *states], dim=-1)

    def block_features(self, window: torch.Tensor, block_frames: int) -> torch.Tensor:
        """Streaming: window [n, context_samples + block_samples] (a whole number of 640-sample frames) ->
        the features of the last block_frames frames, [n, block_frames, feature_dim], computed over the window
        (frames = window_samples // 640) and so only approximately those of the whole clip."""
        if not isinstance(window, torch.Tensor) or window.ndim != 2:
            raise ValueError(f"window must be a tensor [n, samples], got "
                             f"{tuple(window.shape) if isinstance(window, torch.Tensor) else type(window).__name__}")
        samples = window.shape[1]
        if samples == 0 or samples % SAMPLES_PER_FRAME:
            raise ValueError(f"window has {samples} samples, not a positive multiple of {SAMPLES_PER_FRAME} "
                             f"(one video frame at {SAMPLE_RATE} Hz / {FPS} fps)")
        frames = samples // SAMPLES_PER_FRAME
        if isinstance(block_frames, bool) or not isinstance(block_frames, int) or not 1 <= block_frames <= frames:
            raise ValueError(f"block_frames must be an int in 1..{frames} (the window's frames), got {block_frames!r}")
        return self.frame_features(window, frames)[:, frames - block_frames:]


def context_samples(context_s: float = DEFAULT_CONTEXT_S) -> int:
    """Context length in samples, rounded to whole video frames."""
    if context_s < 0:
        raise ValueError(f"context must be >= 0 s, got {context_s}")
    return round(context_s * FPS) * SAMPLES_PER_FRAME
