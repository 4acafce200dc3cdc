"""The published model's text context (avatarforcing/text_context.py, `avatarforcing encode-prompt`).

A tiny umT5 encoder (transformers' UMT5EncoderModel, random weights) and a tiny word-level tokenizer
stand in for google/umt5-xxl: encode_prompt must equal the encoder run directly on the tokenised prompt,
with the rows past the prompt's tokens exactly zero, and context files must round-trip and be refused
with one actionable line when they are wrong.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from avatarforcing.text_context import (
    CONTEXT_FORMAT,
    UPLOADED,
    ContextError,
    PromptEncoder,
    clean_prompt,
    encode_prompt,
    load_context,
    read_context,
    save_context,
    wan_umt5_to_transformers,
)
from avatarforcing_tools.cli import main as cli_main

TEXT_LEN = 24
D_MODEL = 32
WORDS = ("a woman with short dark hair talks to the camera in bright room man smiling glasses red shirt "
         "office green background calm voice").split()
PROMPT = "A woman with short dark hair talks to the camera in a bright room"


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import UMT5Config, UMT5EncoderModel

    folder = tmp_path_factory.mktemp("umt5-tiny")
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=100, d_model=D_MODEL, num_layers=2, num_heads=4, d_kv=8, d_ff=64,
                     feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and position biases, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            if "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(folder)
    _tokenizer(folder)
    return folder


def _direct(folder: Path, prompt: str) -> tuple[torch.Tensor, int]:
    """The encoder run directly on the prompt tokenised as Wan does (no avatarforcing code)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = UMT5EncoderModel.from_pretrained(folder, local_files_only=True).eval()
    enc = tok([prompt], return_tensors="pt", padding="max_length", truncation=True, max_length=TEXT_LEN,
              add_special_tokens=True)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[0]
    return out, int(enc["attention_mask"].sum())


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


def test_encode_prompt_is_the_encoder_on_the_prompt_tokens_zero_after(umt5_dir: Path) -> None:
    ctx = encode_prompt(umt5_dir, PROMPT, text_len=TEXT_LEN)
    ref, n = _direct(umt5_dir, PROMPT)
    assert n == len(PROMPT.split()) + 1  # the words and </s>
    assert ctx.shape == (TEXT_LEN, D_MODEL) and ctx.dtype == torch.float32
    torch.testing.assert_close(ctx[:n], ref[:n], rtol=1e-5, atol=1e-5)
    assert ctx[:n].abs().sum(-1).gt(0).all()
    assert torch.equal(ctx[n:], torch.zeros(TEXT_LEN - n, D_MODEL))
    # padding rows are masked out of attention: the prompt rows do not depend on text_len
    longer = encode_prompt(umt5_dir, PROMPT, text_len=TEXT_LEN + 16)
    assert longer.shape == (TEXT_LEN + 16, D_MODEL)
    torch.testing.assert_close(longer[:n], ctx[:n], rtol=1e-5, atol=1e-5)


def test_prompt_encoder_cleans_truncates_and_casts(umt5_dir: Path) -> None:
    enc = PromptEncoder(umt5_dir, text_len=TEXT_LEN)
    assert enc.text_dim == D_MODEL
    a = enc.encode(PROMPT)
    b = enc.encode("  " + PROMPT.replace(" ", " \n\t ") + " ")  # Wan's whitespace cleaning
    assert torch.equal(a.context, b.context) and a.tokens == b.tokens and not a.truncated
    long = enc.encode(" ".join(WORDS * 3))
    assert long.truncated and long.tokens == TEXT_LEN and long.context.abs().sum(-1).gt(0).all()
    bf = PromptEncoder(umt5_dir, text_len=TEXT_LEN, dtype=torch.bfloat16).encode(PROMPT)
    assert bf.context.dtype == torch.bfloat16 and bf.tokens == a.tokens
    assert torch.equal(bf.context[a.tokens:], torch.zeros(TEXT_LEN - a.tokens, D_MODEL, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="empty"):
        enc.encode("   ")
    assert clean_prompt("  Tom &amp;amp; Jerry \n said “hi”  ") == 'Tom & Jerry said "hi"'


def test_wan_encoder_file_maps_onto_the_same_model(umt5_dir: Path, tmp_path: Path) -> None:
    """Wan's models_t5_umt5-xxl-enc-bf16.pth layout (its T5Encoder's keys) loads into the same function."""
    from transformers import UMT5EncoderModel

    hf = UMT5EncoderModel.from_pretrained(umt5_dir, local_files_only=True).state_dict()
    wan = {"token_embedding.weight": hf["shared.weight"], "norm.weight": hf["encoder.final_layer_norm.weight"]}
    names = {"norm1": "layer.0.layer_norm", "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
             "attn.v": "layer.0.SelfAttention.v", "attn.o": "layer.0.SelfAttention.o",
             "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
             "norm2": "layer.1.layer_norm", "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
             "ffn.fc1": "layer.1.DenseReluDense.wi_1", "ffn.fc2": "layer.1.DenseReluDense.wo"}
    for i in range(2):
        for w, h in names.items():
            wan[f"blocks.{i}.{w}.weight"] = hf[f"encoder.block.{i}.{h}.weight"]
    cfg, mapped = wan_umt5_to_transformers(wan)
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size) == (32, 2, 4, 8, 64, 100)
    wan_dir = tmp_path / "Wan2.1-T2V-1.3B"
    wan_dir.mkdir()
    torch.save(wan, wan_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    ref = encode_prompt(umt5_dir, PROMPT, text_len=TEXT_LEN)
    for source in (wan_dir, wan_dir / "models_t5_umt5-xxl-enc-bf16.pth"):
        got = encode_prompt(source, PROMPT, text_len=TEXT_LEN, tokenizer_dir=umt5_dir)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # Wan2.1-T2V-1.3B's layout: the tokenizer in google/umt5-xxl beside the encoder file is found
    _tokenizer(wan_dir / "google" / "umt5-xxl")
    got = encode_prompt(wan_dir / "models_t5_umt5-xxl-enc-bf16.pth", PROMPT, text_len=TEXT_LEN)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    del wan["blocks.1.ffn.fc2.weight"]
    torch.save(wan, wan_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(ValueError) as e:
        encode_prompt(wan_dir, PROMPT, text_len=TEXT_LEN, tokenizer_dir=umt5_dir)
    assert "blocks.1.ffn.fc2.weight" in _one_line(e) and "models_t5_umt5-xxl-enc-bf16.pth" in str(e.value)


def test_encoder_folder_errors_are_one_line_naming_the_folder(umt5_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as e:
        encode_prompt(missing, PROMPT)
    assert str(missing) in _one_line(e) and "no such" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as e:
        encode_prompt(empty, PROMPT, tokenizer_dir=umt5_dir)
    assert str(empty) in _one_line(e) and "not a umT5 folder" in str(e.value)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError) as e:
        encode_prompt(bert, PROMPT, tokenizer_dir=umt5_dir)
    assert "'bert'" in _one_line(e) and str(bert) in str(e.value)
    with pytest.raises(ValueError) as e:
        encode_prompt(umt5_dir, PROMPT, tokenizer_dir=empty)
    assert str(empty) in _one_line(e) and "tokenizer" in str(e.value)


def _context(tokens: int = 5, rows: int = TEXT_LEN, dim: int = D_MODEL) -> torch.Tensor:
    ctx = torch.randn(rows, dim)
    ctx[tokens:] = 0
    return ctx


def test_save_load_round_trip_from_path_and_bytes(tmp_path: Path) -> None:
    ctx = _context()
    path = save_context(tmp_path / "sub" / "ctx.safetensors", ctx, "a prompt — with “quotes”", 5)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert torch.equal(load_context(path, text_len=TEXT_LEN, text_dim=D_MODEL), ctx)
    tc = read_context(path.read_bytes(), text_len=TEXT_LEN, text_dim=D_MODEL)
    assert torch.equal(tc.context, ctx) and tc.tokens == 5 and tc.prompt == "a prompt — with “quotes”"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": CONTEXT_FORMAT, "prompt": "a prompt — with “quotes”", "tokens": "5"}
        assert list(f.keys()) == ["context"]
    bf = save_context(tmp_path / "bf.safetensors", ctx.bfloat16(), "p", 5)
    got = load_context(bf.read_bytes(), text_len=TEXT_LEN, text_dim=D_MODEL)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ctx.bfloat16())


def test_load_errors_are_one_line_naming_the_source(tmp_path: Path) -> None:
    good = save_context(tmp_path / "ctx.safetensors", _context(), "p", 5)

    def err(source: Path | bytes, **kw: int) -> str:
        with pytest.raises(ValueError) as e:
            load_context(source, text_len=kw.get("text_len", TEXT_LEN), text_dim=kw.get("text_dim", D_MODEL))
        assert isinstance(e.value, ContextError)
        return _one_line(e)

    msg = err(good, text_dim=64)
    assert msg.startswith(f"{good}: context has shape [{TEXT_LEN}, {D_MODEL}], the model needs [{TEXT_LEN}, 64]")
    assert "avatarforcing encode-prompt" in msg
    assert err(good.read_bytes(), text_len=512).startswith(f"{UPLOADED}: context has shape")

    other = tmp_path / "other.safetensors"
    save_file({"context": _context()}, str(other), metadata={"format": "something-else", "tokens": "5"})
    assert "not an AvatarForcing text context (format 'something-else'" in err(other)
    bare = save({"context": _context()})
    assert err(bare) == err(bare) and "no format metadata" in err(bare) and err(bare).startswith(UPLOADED)

    meta = {"format": CONTEXT_FORMAT, "prompt": "p", "tokens": "5"}
    nan = _context()
    nan[0, 0] = float("nan")
    nan[1, 1] = float("inf")
    assert "2 non-finite value(s)" in err(save(({"context": nan}), metadata=meta))
    assert "rows 5 and after are not zero" in err(save({"context": torch.randn(TEXT_LEN, D_MODEL)}, metadata=meta))
    assert "holds tensors ['context', 'x']" in err(save({"context": _context(), "x": torch.zeros(1)}, metadata=meta))
    assert "dtype F16" in err(save({"context": _context().half()}, metadata=meta))
    assert "metadata 'tokens'" in err(save({"context": _context()}, metadata={**meta, "tokens": "many"}))
    assert "tokens is 0" in err(save({"context": _context()}, metadata={**meta, "tokens": "0"}))

    for garbage in (b"", b"hello", b"\xff" * 64, struct.pack("<Q", 10) + b"not json!!",
                    good.read_bytes()[:100]):
        assert err(garbage).startswith(f"{UPLOADED}: ")
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(good.read_bytes()[:-100])
    assert err(trunc).startswith(f"{trunc}: corrupt safetensors file")
    assert err(tmp_path / "absent.safetensors").endswith(
        "no such context file; encode the prompt with the model's umT5: "
        "avatarforcing encode-prompt --umt5 DIR --prompt TEXT --out FILE")
    with pytest.raises(ValueError, match="non-finite"):
        save_context(tmp_path / "nan.safetensors", nan, "p", 5)
    assert not (tmp_path / "nan.safetensors").exists()


def test_cli_encode_prompt_writes_a_loadable_file(umt5_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ctx.safetensors"
    rc = cli_main(["encode-prompt", "--umt5", str(umt5_dir), "--prompt", PROMPT, "--out", str(out),
                   "--device", "cpu", "--text-len", str(TEXT_LEN)])
    stdout = capsys.readouterr().out
    assert rc == 0
    n = len(PROMPT.split()) + 1
    assert stdout.strip() == f"{out}: {n} tokens of {TEXT_LEN}, context [{TEXT_LEN}, {D_MODEL}] float32"
    tc = read_context(out, text_len=TEXT_LEN, text_dim=D_MODEL)
    assert tc.prompt == PROMPT and tc.tokens == n
    torch.testing.assert_close(tc.context, encode_prompt(umt5_dir, PROMPT, text_len=TEXT_LEN))

    pf = tmp_path / "prompt.txt"
    pf.write_text(PROMPT + "\n")
    out2 = tmp_path / "ctx-bf16.safetensors"
    rc = cli_main(["encode-prompt", "--umt5", str(umt5_dir), "--tokenizer", str(umt5_dir), "--prompt-file", str(pf),
                   "--out", str(out2), "--dtype", "bfloat16", "--text-len", str(TEXT_LEN)])
    assert rc == 0 and "bfloat16" in capsys.readouterr().out
    assert load_context(out2, text_len=TEXT_LEN, text_dim=D_MODEL).dtype == torch.bfloat16


def test_cli_errors_exit_2_with_one_line(umt5_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "umt5-xxl"
    rc = cli_main(["encode-prompt", "--umt5", str(missing), "--prompt", PROMPT, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(missing) in err and "Traceback" not in err
    assert err.startswith("avatarforcing encode-prompt: error: ")
    rc = cli_main(["encode-prompt", "--umt5", str(umt5_dir), "--prompt-file", str(tmp_path / "none.txt"),
                   "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "none.txt" in err
    assert not (tmp_path / "x").exists()
