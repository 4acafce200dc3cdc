"""Device memory of the published model's configuration, from the engine itself (no GPU needed).

Builds the full-size avatarforcing-1.3b engine (480x832, bf16) on the CPU with uninitialised weights (memory
does not depend on their values) and prints what one session slot holds, part by part, and the weights.
Usage: .venv/bin/python scripts/published_footprint.py [--sessions 1] [--audio-context 5.12] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from avatarforcing.config import model_preset
from avatarforcing.engine import StreamEngine
from avatarforcing.model import AvatarDiT
from avatarforcing.published import published_stream
from avatarforcing.report import print_table
from avatarforcing.vae import TinyAutoencoder
from avatarforcing.wan_vae import WanVAE
from avatarforcing.wav2vec import Wav2VecFeatures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--audio-context", type=float, default=None, help="seconds (default: the engine's)")
    ap.add_argument("--resolution", default="480x832")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    h, w = (int(x) for x in a.resolution.split("x"))
    cfg = model_preset("avatarforcing-1.3b", height=h, width=w)
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    with torch.device("meta"):
        model, wan = AvatarDiT(cfg), WanVAE()
    model.to_empty(device="cpu")
    wan.to_empty(device="cpu")
    w2v = Wav2VecFeatures(Wav2Vec2Model(Wav2Vec2Config()))  # wav2vec2-base's sizes
    with torch.no_grad():
        for p in [*model.parameters(), *wan.parameters()]:
            p.zero_()  # uninitialised memory may hold NaN; values do not matter here
    context = torch.zeros(cfg.text_len, cfg.text_dim)
    stream = published_stream()
    rows, out = [], {}
    for name, decoder in (("Wan VAE", None), ("small decoder", TinyAutoencoder(cfg))):
        eng = StreamEngine(model, wan, stream, max_sessions=a.sessions, dtype="bfloat16", audio=w2v, context=context,
                           audio_context_s=a.audio_context, decoder=decoder)
        parts = {
            "window latents + audio": sum(t[0].numel() * t.element_size() for t in (eng.win_lat, eng.win_audio)),
            "anchor + history K/V": 2 * eng.prefix_k[0].numel() * eng.prefix_k.element_size(),
            "text cross-attention K/V": 2 * eng.cross_k[0].numel() * eng.cross_k.element_size()
            if eng.per_slot_text else 0,
            "audio context": eng.audio_tail[0].numel() * eng.audio_tail.element_size(),
            "decoder cache": eng.decoder_cache_bytes(),
        }
        total = eng.slot_bytes()
        out[name] = {"slot_bytes": total, "parts": parts, "audio_context_s": eng.context_samples / 16000}
        rows += [[name, k, v / 2**20] for k, v in parts.items()] + [[name, "slot total", total / 2**20]]
        del eng
    weights = {"transformer": sum(p.numel() for p in model.parameters()) * 2,
               "Wan VAE": sum(p.numel() for p in wan.parameters()) * 2,
               "wav2vec2-base": sum(p.numel() for p in w2v.parameters()) * 2,
               "small decoder": sum(p.numel() for p in TinyAutoencoder(cfg).parameters()) * 2}
    rows += [["weights (bf16)", k, v / 2**20] for k, v in weights.items()]
    # The Wan decoder's compute per latent frame (4 video frames), counted on the meta device.
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta_vae = WanVAE()
        lh, lw = cfg.latent_hw
        cache = meta_vae.init_decoder_cache(1, lh, lw, "meta", torch.float32)
        with FlopCounterMode(display=False) as fc:
            meta_vae.decode_step(torch.zeros(1, 16, 1, lh, lw), cache, first=False)
    decode_flops = fc.get_total_flops()
    print(f"  Wan VAE decode: {decode_flops / 1e12:.2f} TFLOP per latent frame (4 video frames) per session")
    print_table(f"avatarforcing-1.3b at {h}x{w}, bfloat16: device memory per session slot and of the weights",
                ["decoder", "part", "MiB"], rows)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        rec = {"resolution": [h, w], "dtype": "bfloat16", "slots": out, "weights_bytes": weights,
               "wan_decode_flops_per_latent_frame": decode_flops}
        a.json.write_text(json.dumps(rec, indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
