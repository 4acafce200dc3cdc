"""The published model's text context: umT5 over a prompt, computed once offline, stored in a file.

The published AvatarForcing model (Wan2.1-1.3B based) cross-attends to a ``[512, 4096]`` text context:
umT5-xxl's encoder outputs for the tokens of a prompt describing the person, zero past the prompt's
token count, padded to 512 rows (Wan's ``T5EncoderModel``: the tokenizer pads to ``text_len`` with
truncation and special tokens, the encoder runs under the attention mask, the context is cut to the
prompt's length and zero-padded). The 5.7 B-parameter encoder never has to be resident in the server: a
context is computed once per prompt (``avatarforcing encode-prompt``) and stored in a *context file*:

    safetensors, one tensor ``context`` [text_len, text_dim] (float32 or bfloat16), metadata
    {"format": "avatarforcing-text-context-v1", "prompt": <the prompt>, "tokens": "<N>"}

Rows ``tokens`` and after are exactly zero. ``load_context`` validates a file (or the bytes of one,
as uploaded with RegisterAvatar) against the model's ``text_len`` and ``text_dim`` and explains in one
line what is wrong.

The encoder is read with transformers' ``UMT5EncoderModel``, from either
  - a transformers folder (``config.json`` of model_type umt5 + weights, e.g. google/umt5-xxl), or
  - Wan's own encoder file ``models_t5_umt5-xxl-enc-bf16.pth`` (in Wan2.1-T2V-1.3B), given as the file
    or as a folder that holds it; its keys are mapped onto ``UMT5EncoderModel`` and the sizes read from
    the weights (``wan_umt5_to_transformers``).
The tokenizer (google/umt5-xxl's) is read with ``AutoTokenizer`` from ``tokenizer_dir``, else from the
encoder's folder, else from ``google/umt5-xxl/`` beside Wan's encoder file (Wan2.1-T2V-1.3B's layout).
"""

from __future__ import annotations

import html
import json
import os
import re
import struct
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import UMT5EncoderModel

CONTEXT_FORMAT = "avatarforcing-text-context-v1"
TEXT_LEN = 512  # Wan's text_len
TEXT_DIM = 4096  # umT5-xxl's d_model
WAN_UMT5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
UPLOADED = "the uploaded context"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}
_MAX_HEADER = 1 << 20  # a context file's safetensors header is a few hundred bytes
_ENCODE_HINT = ("encode the prompt with the model's umT5: "
                "avatarforcing encode-prompt --umt5 DIR --prompt TEXT --out FILE")


class ContextError(ValueError):
    """A one-line, actionable error about a context file or the umT5 encoder it is made with."""


@dataclass(frozen=True)
class TextContext:
    """A text context and what it was made from."""

    context: torch.Tensor  # [text_len, text_dim], zero from row ``tokens`` on
    prompt: str
    tokens: int  # prompt tokens (special tokens included) before the zero rows
    truncated: bool = False  # the prompt had more tokens than text_len (encode only)


# ----------------------------------------------------------------------------------------------------------
# Prompt cleaning and tokenisation (as Wan's HuggingfaceTokenizer with clean="whitespace")


def clean_prompt(text: str) -> str:
    """Wan's "whitespace" cleaning: ftfy's fix_text, HTML entities unescaped twice, whitespace runs
    collapsed to one space, stripped. Without ftfy installed, a subset of what it does to ordinary text
    is applied instead (NFC normalisation, curly quotes to straight ones)."""
    try:
        import ftfy  # type: ignore[import-not-found]

        text = ftfy.fix_text(text)
    except ImportError:
        text = unicodedata.normalize("NFC", text)
        text = re.sub("[\u2018\u2019\u201a\u201b]", "'", text)
        text = re.sub("[\u201c\u201d\u201e\u201f]", '"', text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize_prompt(tokenizer: Any, prompt: str, text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(input_ids [1, text_len], attention_mask [1, text_len], truncated) of a cleaned prompt, padded on
    the right to text_len with the end-of-sequence token appended, as Wan tokenises."""
    text = clean_prompt(prompt)
    tokenizer.padding_side = "right"
    enc = tokenizer([text], return_tensors="pt", padding="max_length", truncation=True, max_length=text_len,
                    add_special_tokens=True)
    full = len(tokenizer(text, add_special_tokens=True)["input_ids"])
    return enc["input_ids"], enc["attention_mask"], full > text_len


# ----------------------------------------------------------------------------------------------------------
# The encoder: a transformers folder or Wan's .pth


def wan_umt5_to_transformers(sd: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    """Maps the state dict of Wan's umT5 encoder (``wan.modules.t5.T5Encoder`` with shared_pos=False,
    e.g. models_t5_umt5-xxl-enc-bf16.pth) onto transformers' ``UMT5EncoderModel``.

    Returns (UMT5Config, state dict). Sizes are read from the weights. Wan's layers and HF's compute the
    same function: RMS norm (eps 1e-6), unscaled attention with a per-layer bidirectional relative
    position bias (32 buckets, max distance 128), a gated-GELU (tanh) feed-forward whose gated input is
    ``gate.0`` (HF ``wi_0``) and linear input ``fc1`` (HF ``wi_1``)."""
    from transformers import UMT5Config

    if "token_embedding.weight" not in sd or "norm.weight" not in sd:
        raise ContextError("not Wan's umT5 encoder state dict (no token_embedding.weight / norm.weight)")
    if "pos_embedding.embedding.weight" in sd:
        raise ContextError("a T5 encoder with a shared position embedding, not umT5 (per-layer position bias)")
    layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if layers == 0:
        raise ContextError("Wan's umT5 encoder state dict has no blocks")
    vocab, dim = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
    d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
    cfg = UMT5Config(vocab_size=int(vocab), d_model=int(dim), d_kv=int(dim_attn) // int(heads), d_ff=int(d_ff),
                     num_layers=int(layers), num_heads=int(heads), relative_attention_num_buckets=int(buckets),
                     relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                     is_encoder_decoder=False, use_cache=False)
    out = {"shared.weight": sd["token_embedding.weight"], "encoder.embed_tokens.weight": sd["token_embedding.weight"],
           "encoder.final_layer_norm.weight": sd["norm.weight"]}
    names = {"norm1.weight": "layer.0.layer_norm.weight", "attn.q.weight": "layer.0.SelfAttention.q.weight",
             "attn.k.weight": "layer.0.SelfAttention.k.weight", "attn.v.weight": "layer.0.SelfAttention.v.weight",
             "attn.o.weight": "layer.0.SelfAttention.o.weight",
             "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
             "norm2.weight": "layer.1.layer_norm.weight",
             "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU(wi_0 x) * wi_1 x
             "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
             "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    used = {"token_embedding.weight", "norm.weight"}
    for i in range(layers):
        for wan, hf in names.items():
            key = f"blocks.{i}.{wan}"
            if key not in sd:
                raise ContextError(f"Wan's umT5 encoder state dict lacks {key}")
            out[f"encoder.block.{i}.{hf}"] = sd[key]
            used.add(key)
    extra = sorted(set(sd) - used)
    if extra:
        raise ContextError(f"unexpected keys in Wan's umT5 encoder state dict: {', '.join(extra[:3])}"
                           + (" ..." if len(extra) > 3 else ""))
    return cfg, out


def _wan_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
        return path
    if path.is_dir() and not (path / "config.json").is_file() and (path / WAN_UMT5_FILE).is_file():
        return path / WAN_UMT5_FILE
    return None


def _load_wan_encoder(pth: Path, dtype: torch.dtype) -> UMT5EncoderModel:
    from transformers import UMT5EncoderModel

    try:
        sd = torch.load(pth, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: read it whole
        try:
            sd = torch.load(pth, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ContextError(f"{pth}: not a readable PyTorch state dict ({_first_line(e)})") from None
    if not isinstance(sd, dict):
        raise ContextError(f"{pth}: not a state dict (a {type(sd).__name__})")
    try:
        cfg, hf = wan_umt5_to_transformers(sd)
    except ContextError as e:
        raise ContextError(f"{pth}: {e}") from None
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    hf = {k: v.to(dtype) for k, v in hf.items()}
    model.load_state_dict(hf, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared  # one embedding, as in transformers' own loading
    return model


def _load_hf_encoder(folder: Path) -> UMT5EncoderModel:
    from transformers import UMT5EncoderModel

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ContextError(f"{folder}: not a umT5 folder (no config.json; give a transformers folder of "
                           f"google/umt5-xxl, or Wan's {WAN_UMT5_FILE} or the folder that holds it)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ContextError(f"{cfg_file}: unreadable config.json ({_first_line(e)})") from None
    if model_type != "umt5":
        raise ContextError(f"{folder}: not a umT5 folder (config.json has model_type {model_type!r}, "
                           "expected 'umt5', e.g. google/umt5-xxl)")
    try:
        return UMT5EncoderModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/EnvironmentError variants
        raise ContextError(f"{folder}: could not load the umT5 encoder weights ({_first_line(e)})") from None


def load_umt5_encoder(umt5: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    """transformers' ``UMT5EncoderModel`` (eval mode) from a transformers folder or Wan's encoder file."""
    path = Path(umt5)
    if not path.exists():
        raise ContextError(f"{path}: no such file or folder (the umT5 encoder: a transformers folder of "
                           f"google/umt5-xxl, or Wan's {WAN_UMT5_FILE})")
    wan = _wan_file(path)
    if wan is not None:
        model = _load_wan_encoder(wan, dtype)
    elif path.is_dir():
        model = _load_hf_encoder(path)
    else:
        raise ContextError(f"{path}: not a umT5 encoder (expected a transformers folder or Wan's {WAN_UMT5_FILE})")
    # (transformers' typing of PreTrainedModel.to confuses mypy)
    model.to(device=device, dtype=dtype)  # type: ignore[call-arg]
    return model.eval().requires_grad_(False)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def _find_tokenizer(folder: Path) -> Path:
    """The encoder's folder, or Wan2.1-T2V-1.3B's google/umt5-xxl beside its encoder file."""
    for cand in (folder, folder / "google" / "umt5-xxl"):
        if any((cand / f).is_file() for f in _TOKENIZER_FILES):
            return cand
    return folder


def load_umt5_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer`` of google/umt5-xxl (or any tokenizer with a pad token) from a local folder."""
    from transformers import AutoTokenizer

    path = Path(folder)
    if not path.is_dir():
        raise ContextError(f"{path}: no such tokenizer folder (google/umt5-xxl's tokenizer files; "
                           "in Wan2.1-T2V-1.3B: google/umt5-xxl)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ContextError(f"{path}: no usable tokenizer there ({_first_line(e)}; give the folder of "
                           "google/umt5-xxl's tokenizer with --tokenizer)") from None
    if tok.pad_token_id is None:
        raise ContextError(f"{path}: the tokenizer has no pad token (google/umt5-xxl's has <pad>)")
    return tok


class PromptEncoder:
    """umT5 loaded once; ``encode(prompt)`` gives a TextContext. Use it for several prompts in a row."""

    def __init__(self, umt5: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str] | None = None, *,
                 text_len: int = TEXT_LEN, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if text_len < 1:
            raise ContextError(f"text_len must be at least 1, got {text_len}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ContextError(f"dtype must be float32 or bfloat16, got {dtype}")
        path = Path(umt5)
        if not path.exists():
            raise ContextError(f"{path}: no such file or folder (the umT5 encoder: a transformers folder of "
                               f"google/umt5-xxl, or Wan's {WAN_UMT5_FILE})")
        if tokenizer_dir is None:
            tokenizer_dir = _find_tokenizer(path if path.is_dir() else path.parent)
        self.tokenizer = load_umt5_tokenizer(tokenizer_dir)
        self.model = load_umt5_encoder(path, device=device, dtype=dtype)
        self.text_len = text_len
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def text_dim(self) -> int:
        return int(self.model.config.d_model)

    def encode(self, prompt: str) -> TextContext:
        if not prompt.strip():
            raise ContextError("the prompt is empty (describe the person, e.g. 'A woman talking to the camera')")
        ids, mask, truncated = tokenize_prompt(self.tokenizer, prompt, self.text_len)
        tokens = int(mask[0].gt(0).sum())
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            ctx = out[0].to(self.dtype).clone()
            ctx[tokens:] = 0  # Wan: u[v:] = 0, the context cut to the prompt's length and zero-padded
            ctx = ctx.cpu()
        if not bool(torch.isfinite(ctx).all()):
            raise ContextError("the umT5 encoder produced non-finite values (try --dtype float32)")
        return TextContext(ctx, prompt, tokens, truncated)


def encode_prompt(umt5_dir: str | os.PathLike[str], prompt: str, *, text_len: int = TEXT_LEN,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  tokenizer_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """The text context [text_len, d_model] of ``prompt``: umT5's outputs for its tokens, zero after.

    ``umt5_dir``: a transformers umT5 folder (with the tokenizer, unless ``tokenizer_dir``) or Wan's
    models_t5_umt5-xxl-enc-bf16.pth (or its folder). Loads the encoder for this one call; for several
    prompts use ``PromptEncoder``."""
    enc = PromptEncoder(umt5_dir, tokenizer_dir, text_len=text_len, device=device, dtype=dtype)
    return enc.encode(prompt).context


# ----------------------------------------------------------------------------------------------------------
# The context file


def _first_line(e: BaseException | str) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__ if isinstance(e, BaseException) else ""


def _check_context(ctx: torch.Tensor, tokens: int, name: str) -> None:
    if ctx.ndim != 2:
        raise ContextError(f"{name}: context has shape {list(ctx.shape)}, expected [text_len, text_dim]")
    if not 1 <= tokens <= ctx.shape[0]:
        raise ContextError(f"{name}: tokens is {tokens}, expected 1..{ctx.shape[0]} (the rows of the context)")
    bad = int((~torch.isfinite(ctx)).sum())
    if bad:
        raise ContextError(f"{name}: context has {bad} non-finite value(s) (NaN/Inf); {_ENCODE_HINT} "
                           "(with --dtype float32)")
    if bool(ctx[tokens:].ne(0).any()):
        raise ContextError(f"{name}: context rows {tokens} and after are not zero (umT5's output must be cut "
                           f"to the prompt's {tokens} tokens); {_ENCODE_HINT}")


def save_context(path: str | os.PathLike[str], context: torch.Tensor, prompt: str, tokens: int) -> Path:
    """Writes a context file (atomically). ``context`` [text_len, text_dim], float32 or bfloat16 (other float
    dtypes are stored as float32), zero from row ``tokens`` on."""
    from safetensors.torch import save_file

    out = Path(path)
    if not context.is_floating_point():
        raise ContextError(f"{out}: context must be floating point, got {context.dtype}")
    ctx = context.detach().to("cpu")
    if ctx.dtype not in (torch.float32, torch.bfloat16):
        ctx = ctx.float()
    _check_context(ctx, int(tokens), str(out))
    meta = {"format": CONTEXT_FORMAT, "prompt": prompt, "tokens": str(int(tokens))}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file({"context": ctx.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _header(data: bytes, name: str) -> dict[str, Any]:
    if len(data) < 8:
        raise ContextError(f"{name}: not a safetensors file ({len(data)} bytes); {_ENCODE_HINT}")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ContextError(f"{name}: not a safetensors file (bad header length); {_ENCODE_HINT}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ContextError(f"{name}: not a safetensors file (unreadable header); {_ENCODE_HINT}") from None
    if not isinstance(header, dict):
        raise ContextError(f"{name}: not a safetensors file (unreadable header); {_ENCODE_HINT}")
    return header


def read_context(source: str | os.PathLike[str] | bytes, *, text_len: int, text_dim: int,
                 name: str | None = None) -> TextContext:
    """A validated context file (a path, or the bytes of one). Raises ContextError (a ValueError) with one
    line naming the file (or ``name``; bytes: "the uploaded context") and what is wrong."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        name = name or UPLOADED
    else:
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise ContextError(f"{name}: no such context file; {_ENCODE_HINT}") from None
        except OSError as e:
            raise ContextError(f"{name}: cannot read the context file ({e.strerror or _first_line(e)})") from None
    header = _header(data, name)
    meta = header.get("__metadata__") or {}
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != CONTEXT_FORMAT:
        got = "no format metadata" if fmt is None else f"format {fmt!r}"
        raise ContextError(f"{name}: not an AvatarForcing text context ({got}, expected {CONTEXT_FORMAT!r}); "
                           f"{_ENCODE_HINT}")
    tensors = sorted(k for k in header if k != "__metadata__")
    if tensors != ["context"]:
        raise ContextError(f"{name}: holds tensors {tensors}, expected one named 'context'; {_ENCODE_HINT}")
    info = header["context"] if isinstance(header["context"], dict) else {}
    stored = str(info.get("dtype"))
    if stored not in _DTYPES:
        raise ContextError(f"{name}: context has dtype {stored}, expected F32 or BF16; {_ENCODE_HINT}")
    shape = list(info.get("shape", []))
    if shape != [text_len, text_dim]:
        raise ContextError(f"{name}: context has shape {shape}, the model needs [{text_len}, {text_dim}] "
                           f"({_ENCODE_HINT})")
    try:
        tokens = int(meta.get("tokens", ""))
    except ValueError:
        raise ContextError(f"{name}: metadata 'tokens' is {meta.get('tokens')!r}, expected the prompt's token "
                           f"count; {_ENCODE_HINT}") from None
    prompt = meta.get("prompt", "")
    try:
        from safetensors.torch import load

        ctx = load(data)["context"]
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise ContextError(f"{name}: corrupt safetensors file ({_first_line(e)}); {_ENCODE_HINT}") from None
    _check_context(ctx, tokens, name)
    return TextContext(ctx, str(prompt), tokens)


def load_context(source: str | os.PathLike[str] | bytes, *, text_len: int, text_dim: int,
                 name: str | None = None) -> torch.Tensor:
    """The context tensor [text_len, text_dim] (float32 or bfloat16, as stored) of a validated context file
    or its bytes; see ``read_context``."""
    return read_context(source, text_len=text_len, text_dim=text_dim, name=name).context


def context_nbytes(text_len: int = TEXT_LEN, text_dim: int = TEXT_DIM, dtype: torch.dtype = torch.float32) -> int:
    """Size of a context file's tensor data (a float32 [512, 4096] context: 8 MiB; bfloat16: 4 MiB)."""
    return text_len * text_dim * (2 if dtype == torch.bfloat16 else 4)


__all__ = ["CONTEXT_FORMAT", "TEXT_DIM", "TEXT_LEN", "WAN_UMT5_FILE", "ContextError", "PromptEncoder", "TextContext",
           "clean_prompt", "context_nbytes", "encode_prompt", "load_context", "load_umt5_encoder",
           "load_umt5_tokenizer", "read_context", "save_context", "tokenize_prompt", "wan_umt5_to_transformers"]
