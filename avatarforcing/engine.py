"""The batched streaming engine: many sessions' sliding windows in preallocated slots.

Each slot holds one stream's whole state in device memory: the window latents at their noise
levels, the window's audio tokens, the reference latent, the style anchor's per-layer keys and
values (un-rotated), the temporal-anchor history keys and values (un-rotated), and the tail of
the audio for the front end's left context. ``step`` runs ONE forward pass for any subset of
slots (the denoising step of ../shared/ALGORITHM.md), then a short clean pass for the slots that
emitted a block (temporal anchor), slides their windows, and decodes the emitted blocks.

Positions are relative to the window on every step: anchor at latent-frame position 0, history
at 1..H, window at H+1..H+L*B, so RoPE tables are fixed and a stream can run for hours at
constant cost. Noise for a slot's step comes from a generator seeded by (session seed, step), so
a slot's output does not depend on which other slots share its batch.

Which window blocks and history frames hold data follows from a slot's step count (since its window
started filling: ``replan`` restarts it) and its emitted-block count alone, so the host knows it without
asking the device: a batch whose slots are all past their warm-up runs with
no attention mask (the fused attention kernels), at static shapes.

On CUDA the engine runs on a stream of its own, and ``step`` waits for its step: denoising, decoding,
then the frames' copy into a pinned host buffer. With ``overlap_decode`` the decoding runs on a second
stream instead: ``step(..., deferred=True)`` returns as soon as the denoising is done, with results whose
frames ``SlotResult.wait`` collects, so the next step's denoising runs while this one's blocks decode
(Wan's VAE decoder is a sizeable share of a step; the tiny one is not, and an earlier two-stream pipeline
measured no gain with it, see docs/gpu.md). With
``cuda_graphs`` the steady-state denoising of each batch size is captured once as a CUDA graph and
replayed; with ``compile`` the blocks' elementwise stages run fused (``model.compiled_ops``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import attention as attention_kernels
from .config import ModelConfig, StreamConfig
from .model import AvatarDiT, Prefix
from .rope import RopeTable
from .vae import TinyAutoencoder, to_pixels, to_unit
from .wan_vae import WanVAE

if TYPE_CHECKING:  # transformers is imported only where wav2vec2 runs
    from .wav2vec import Wav2VecFeatures

Autoencoder = TinyAutoencoder | WanVAE

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NoFreeSlotError(RuntimeError):
    """Every slot is taken."""


class SlotError(RuntimeError):
    """A slot was used that is not allocated (or freed twice)."""


@dataclass
class AnchorState:
    """What a reference image gives a session, computed once per avatar."""

    ref_latent: torch.Tensor  # [C, h, w]
    k: torch.Tensor  # [layers, P, heads, head_dim], un-rotated
    v: torch.Tensor
    # The avatar's own text context (a model with an external context): its cross-attention keys and
    # values [layers, text_len, heads, head_dim]; None: the checkpoint's default context.
    cross_k: torch.Tensor | None = None
    cross_v: torch.Tensor | None = None

    def nbytes(self) -> int:
        ts = [self.ref_latent, self.k, self.v] + [t for t in (self.cross_k, self.cross_v) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


class _Decoded:
    """The decoded blocks of one step's emitting slots, on their way to the host: the frames [m, F, H, W, 3]
    and anchor similarities [m], in (pinned) host tensors that the copy fills once ``done`` has fired (None:
    already there). The first ``row`` waits for them and copies them out once, for every slot of the step (the
    pinned buffers then go back to PyTorch's host allocator); it may be called from any thread."""

    def __init__(self, done: torch.cuda.Event | None = None,
                 tensors: tuple[torch.Tensor, torch.Tensor] | None = None,
                 host: tuple[np.ndarray, list[float]] | None = None) -> None:
        """Either the (pinned) host ``tensors`` that the copy fills once ``done`` has fired, or ``host``: blocks
        already copied out (of any buffer the engine reuses)."""
        self._done = done
        self._tensors = tensors
        self._host = host
        self._lock = threading.Lock()

    def row(self, e: int) -> tuple[np.ndarray, float]:
        with self._lock:
            if self._host is None:
                if self._done is not None:
                    self._done.synchronize()
                assert self._tensors is not None
                frames, sims = self._tensors
                # Copied out: the caller keeps these frames, and the pinned buffers are reused.
                self._host = (frames.numpy().copy(), sims.tolist())
                self._tensors = None
        return self._host[0][e], self._host[1][e]


@dataclass
class SlotResult:
    slot: int
    step: int  # this slot's step counter before the step
    emitted_block: int | None  # index of the emitted block in the stream, None during warm-up
    frames: np.ndarray | None  # uint8 [frames_per_block, H, W, 3]
    anchor_similarity: float | None  # cosine similarity of the emitted latents to the reference
    # ``step(..., deferred=True)``: the emitted block still on its way (frames and similarity None until ``wait``)
    decoded: _Decoded | None = field(default=None, repr=False, compare=False)
    row: int = field(default=0, repr=False, compare=False)

    def wait(self) -> SlotResult:
        """This result with its frames and similarity: waits for a deferred block's decoding and copy (blocks the
        calling thread; any thread may call it). A result that is complete already is returned as it is."""
        if self.decoded is None:
            return self
        frames, sim = self.decoded.row(self.row)
        return dataclasses.replace(self, frames=frames, anchor_similarity=sim, decoded=None, row=0)


def _mix_seed(seed: int, step: int) -> int:
    return (seed * 6364136223846793005 + step * 1442695040888963407 + 1) % (2**63 - 1)


def channels_last(module: nn.Module) -> nn.Module:
    """Puts a module's convolution weights in the channels-last layouts, in place: 4-D ones in
    ``channels_last``, 5-D ones (Wan's 3D convolutions) in ``channels_last_3d``. The convolutions then run
    cuDNN's NHWC/NDHWC kernels on CUDA (their outputs follow the weights' layout); the function is the same.
    (``Module.to(memory_format=channels_last)`` refuses a module with 5-D weights.)"""
    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t

    return module._apply(convert)


class StreamEngine:
    def __init__(self, model: AvatarDiT, vae: Autoencoder, stream: StreamConfig, *, max_sessions: int,
                 device: str | torch.device = "cpu", dtype: str = "float32", compile: bool = False,
                 cuda_graphs: bool = False, attention: str = "auto", audio: Wav2VecFeatures | None = None,
                 context: torch.Tensor | None = None, audio_context_s: float | None = None,
                 decoder: TinyAutoencoder | None = None, half_split_rope: bool = True,
                 fp8: bool = False, overlap_decode: bool = False, token_first_queries: bool = False,
                 fp8_attention: bool = False) -> None:
        """``audio``: the wav2vec2 features of a model whose ``audio_source`` is wav2vec2, run on a sliding
        window of ``audio_context_s`` seconds before each block (default ``wav2vec.DEFAULT_CONTEXT_S``);
        ``context``: the default umT5 text context [text_len, text_dim] of a model with an external one;
        ``decoder``: a small autoencoder that decodes instead of ``vae`` (which then only encodes references);
        ``half_split_rope``: the model's q/k rows permuted into the half-split RoPE layout (exact: the same
        function, cheaper rotation; ``AvatarDiT.set_half_split_rope``). The engine takes the model over: it
        moves it, and the layout is the model's, shared with any other engine built on it;
        ``fp8``: the blocks' per-token linears run as FP8 products (``fp8.quantize_blocks``, which changes the model;
        with ``compile`` their activations are quantized by fused kernels);
        ``overlap_decode`` (CUDA): emitted blocks decode on a second stream, overlapped with the next step's
        denoising when the caller takes deferred results (``step(..., deferred=True)``);
        ``token_first_queries``: with ``compile``, the self-attention queries are written token-first
        (``model.compiled_ops``; the model's setting, like the RoPE layout);
        ``fp8_attention`` (CUDA, Hopper, the ``fa3-fwd`` wheel): the unmasked attention passes run FlashAttention-3's
        FP8 kernel (``attention.fp8_attention``; the warm-up's masked passes keep their kernel)."""
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if attention not in attention_kernels.BACKENDS:
            raise ValueError(f"unknown attention kernel {attention!r}; "
                             f"choose one of {list(attention_kernels.BACKENDS)}")
        self.cfg: ModelConfig = model.cfg
        self.stream = stream
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.cuda = self.device.type == "cuda"
        if cuda_graphs and not self.cuda:
            raise ValueError("cuda_graphs needs a CUDA device")
        if overlap_decode and not self.cuda:
            raise ValueError("overlap_decode needs a CUDA device (it decodes on a second CUDA stream)")
        from . import fa3

        if fp8_attention or attention == "fa3":
            why = fa3.unavailable(self.device)
            if why is not None:
                raise ValueError(f"{'fp8_attention' if fp8_attention else 'attention fa3'} cannot run: {why}")
            if model.cfg.head_dim not in fa3.HEAD_DIMS:
                raise ValueError(f"FlashAttention-3's kernels take head dims {fa3.HEAD_DIMS}, not {model.cfg.head_dim}")
            if self.dtype != torch.bfloat16:
                raise ValueError(f"FlashAttention-3's kernels run a bfloat16 model (the fa3-fwd wheel has no float16 "
                                 f"or float32 ones), not {dtype}: use dtype bfloat16")
        self.fp8_attention = fp8_attention
        self.model = model.to(self.device, self.dtype).eval()
        self.model.set_half_split_rope(half_split_rope)
        self.model.token_first_queries = token_first_queries
        from .fp8 import FP8Linear, quantize_blocks

        quantized = any(isinstance(m, FP8Linear) for m in self.model.blocks.modules())
        if fp8 and not quantized:  # (quantized already: by an earlier engine built on this model, which it shares)
            quantize_blocks(self.model, compiled=compile)
        elif quantized and not fp8:
            raise ValueError("this model's linears are FP8 already (an engine built on it with fp8 quantized them "
                             "in place): build this engine with fp8=True too, or load the model again")
        self.vae = vae.to(self.device, self.dtype).eval()
        if (model.cfg.audio_source == "wav2vec2") != (audio is not None):
            raise ValueError(f"a model with audio_source {model.cfg.audio_source!r} "
                             + ("needs" if audio is None else "takes no") + " wav2vec2 features")
        self.w2v = audio.to(self.device, self.dtype).eval() if audio is not None else None
        self.decoder = decoder.to(self.device, self.dtype).eval() if decoder is not None else None
        if self.decoder is not None and self.cuda:
            channels_last(self.decoder)
        self.streamed_decode = isinstance(vae, WanVAE) and decoder is None
        if self.cuda:
            channels_last(self.vae)
        self.compiled = compile
        self.use_graphs = cuda_graphs
        self.attention = attention
        self.capacity = max_sessions
        c = self.cfg
        B, L, H = stream.block_frames, stream.window_blocks, stream.history_frames
        P = c.tokens_per_frame
        lh, lw = c.latent_hw
        self.B, self.L, self.H, self.P = B, L, H, P
        self.frames_per_block = B * c.frames_per_latent
        self.block_samples = self.frames_per_block * c.samples_per_frame
        if self.w2v is None:
            assert self.model.audio_frontend is not None
            self.context_samples = self.model.audio_frontend.context
        else:
            from .wav2vec import DEFAULT_CONTEXT_S
            ctx_s = DEFAULT_CONTEXT_S if audio_context_s is None else audio_context_s
            if ctx_s < 0:
                raise ValueError("audio_context_s must be >= 0")
            self.context_samples = round(ctx_s * c.fps) * c.samples_per_frame  # whole video frames
        # Steps after which every window block and history frame of a slot holds data.
        self.warmup_steps = (L - 1) + -(-H // B)
        dev, dt = self.device, self.dtype
        S, nl = max_sessions, c.layers
        # ---- the slots (preallocated once) -----------------------------------------------
        self.win_lat = torch.zeros(S, L * B, c.latent_channels, lh, lw, device=dev, dtype=dt)
        self.win_audio = torch.zeros(S, L * B, c.audio_token_dim, device=dev, dtype=dt)
        self.ref_lat = torch.zeros(S, c.latent_channels, lh, lw, device=dev, dtype=dt)
        # The attention prefix of each layer: the style anchor's P keys/values, then the H*P of the
        # temporal-anchor history, un-rotated, in one buffer (gathered once per step).
        pre_shape = (S, nl, (1 + H) * P, c.heads, c.head_dim)
        self.prefix_k = torch.zeros(pre_shape, device=dev, dtype=dt)
        self.prefix_v = torch.zeros(pre_shape, device=dev, dtype=dt)
        self.anchor_k, self.anchor_v = self.prefix_k[:, :, :P], self.prefix_v[:, :, :P]
        self.hist_k, self.hist_v = self.prefix_k[:, :, P:], self.prefix_v[:, :, P:]
        self.audio_tail = torch.zeros(S, self.context_samples, device=dev, dtype=torch.float32)
        # A model with an external text context keeps each slot's cross-attention keys/values (its avatar's
        # prompt, or the default) next to its state.
        self.per_slot_text = c.text_context == "external"
        cross_shape = (S, nl, c.text_len, c.heads, c.head_dim) if self.per_slot_text else (0,)
        self.cross_k = torch.zeros(cross_shape, device=dev, dtype=dt)
        self.cross_v = torch.zeros(cross_shape, device=dev, dtype=dt)
        # Wan's causal decoder carries the last two frames of each causal convolution's input per stream.
        self.dec_cache: list[torch.Tensor] = []
        if self.streamed_decode:
            assert isinstance(vae, WanVAE)
            self.dec_cache = vae.init_decoder_cache(S, lh, lw, dev, dt)
        self._allocated = [False] * S
        self._steps = [0] * S
        self._seeds = [0] * S
        # The step at which each slot's window started filling (0; a replan restarts it) and the blocks it has
        # emitted: which window blocks hold data follows from steps - start, which history frames from emitted.
        self._start = [0] * S
        self._emitted = [0] * S
        # ---- fixed tables ------------------------------------------------------------------
        self.rope_anchor = RopeTable(c, [0], dev, dt)
        self.rope_prefix = RopeTable(c, list(range(0, H + 1)), dev, dt)
        self.rope_history = RopeTable(c, list(range(1, H + 1)), dev, dt)
        self._anchor_ropes: dict[int, RopeTable] = {}  # positions="reference": the anchor at each offset
        if stream.positions == "reference" and cuda_graphs:
            raise ValueError("positions='reference' moves the anchor every step: it runs without CUDA graphs")
        self.rope_window = RopeTable(c, list(range(H + 1, H + 1 + L * B)), dev, dt)
        self.rope_clean = RopeTable(c, list(range(H + 1, H + 1 + B)), dev, dt)
        lv = torch.tensor(stream.levels, dtype=torch.float32, device=dev)
        self.sigma_window = lv.repeat_interleave(B)[None]  # [1, L*B]
        self.sigma_renoise = lv[:-1].repeat_interleave(B)[None, :, None, None, None].to(dt)
        self._gen = torch.Generator(device=dev)
        # ---- the stream, pinned output buffers, graphs (CUDA) -------------------------------------
        self._compute = torch.cuda.Stream(dev) if self.cuda else None
        # overlap_decode: the decoding's own stream, and the completion events of the decodes still queued on it
        # (at most ``_MAX_DECODES``: a decoder slower than the denoising makes ``step`` wait, not the queue grow).
        self._decode_stream = torch.cuda.Stream(dev) if overlap_decode else None
        self._decodes: deque[torch.cuda.Event] = deque()
        self._graphs: dict[int, _Graph] = {}
        self.graph_errors: dict[int, str] = {}
        with self._on_compute(), torch.inference_mode():
            if c.text_context == "external" and context is None:
                raise ValueError("this model needs a default text context (the checkpoint's, or encode-prompt's)")
            self._cross = self.model.cross_kv_of(context)
            if self.per_slot_text:
                self._default_cross_k, self._default_cross_v = self._stack_cross(self._cross)
            silence = torch.zeros(1, self.context_samples + self.block_samples, device=dev, dtype=torch.float32)
            self.silence_tokens = self._audio_tokens(silence)[0]  # [B, a]
            self.anchor_token = self.model.anchor_audio_token()
        # A step's frames and similarities come to the host through page-locked buffers: a copy from pageable
        # memory would be staged through one by the driver anyway, a block at a time.
        self._host_frames: torch.Tensor | None = None
        self._host_sims: torch.Tensor | None = None
        if self.cuda:
            hw = (self.frames_per_block, c.height, c.width, 3)
            self._host_frames = torch.zeros((S, *hw), dtype=torch.uint8).pin_memory()
            self._host_sims = torch.zeros(S, dtype=torch.float32).pin_memory()

    # ---- the stream ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_compute(self) -> Iterator[None]:
        """Runs the enclosed work on the engine's stream (on a CPU: as is), with the chosen attention kernels."""
        with contextlib.ExitStack() as st:
            if self._compute is not None:
                st.enter_context(torch.cuda.stream(self._compute))
            st.enter_context(attention_kernels.prefer(self.attention))
            st.enter_context(attention_kernels.fp8_attention(self.fp8_attention))
            yield

    def synchronize(self) -> None:
        """Waits for all device work enqueued so far (``denoise_step`` does not wait for its own)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- slots ------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self._allocated.count(False)

    def slot_bytes(self) -> int:
        """Device memory one slot's state takes."""
        per = 0
        for t in (self.win_lat, self.win_audio, self.ref_lat, self.prefix_k, self.prefix_v, self.audio_tail,
                  *self.dec_cache):
            per += t[0].numel() * t.element_size()
        if self.per_slot_text:
            per += 2 * self.cross_k[0].numel() * self.cross_k.element_size()
        return per

    def decoder_cache_bytes(self) -> int:
        """Device memory of one slot's decoder cache (Wan's VAE; 0 for the tiny autoencoder)."""
        return sum(t[0].numel() * t.element_size() for t in self.dec_cache)

    def allocate(self, anchor: AnchorState, seed: int) -> int:
        try:
            s = self._allocated.index(False)
        except ValueError:
            raise NoFreeSlotError(f"all {self.capacity} session slots are in use") from None
        self._allocated[s] = True
        self._steps[s] = 0
        self._start[s] = 0
        self._emitted[s] = 0
        self._seeds[s] = int(seed)
        with self._on_compute(), torch.inference_mode():
            if self._decode_stream is not None:
                # The slot's previous session may still be decoding its last blocks from this slot's decoder
                # cache, which priming the new one overwrites: everything queued there goes first.
                assert self._compute is not None
                self._compute.wait_stream(self._decode_stream)
            self.win_lat[s].zero_()
            self.win_audio[s].zero_()
            self.ref_lat[s] = anchor.ref_latent.to(self.device, self.dtype)
            self.anchor_k[s] = anchor.k.to(self.device, self.dtype)
            self.anchor_v[s] = anchor.v.to(self.device, self.dtype)
            self.hist_k[s].zero_()
            self.hist_v[s].zero_()
            self.audio_tail[s].zero_()
            if self.per_slot_text:
                self.cross_k[s] = anchor.cross_k if anchor.cross_k is not None else self._default_cross_k
                self.cross_v[s] = anchor.cross_v if anchor.cross_v is not None else self._default_cross_v
        if self.streamed_decode:
            self._prime_decoder(s, self.ref_lat[s])
        return s

    def _prime_decoder(self, slot: int, ref: torch.Tensor) -> None:
        """Starts a slot's decoder stream with the reference latent (the reference's output frame 0, not
        emitted), so that every emitted latent decodes to 4 frames that continue it."""
        assert isinstance(self.vae, WanVAE)
        with self._on_compute(), torch.inference_mode():
            zeros = [torch.zeros_like(t[:1]) for t in self.dec_cache]
            _, cache = self.vae.decode_step(ref[None, :, None], zeros, first=True)
            for buf, new in zip(self.dec_cache, cache, strict=True):
                buf[slot] = new[0]

    def free(self, slot: int) -> None:
        if not (0 <= slot < self.capacity) or not self._allocated[slot]:
            raise SlotError(f"slot {slot} is not allocated")
        self._allocated[slot] = False

    def is_allocated(self, slot: int) -> bool:
        return 0 <= slot < self.capacity and self._allocated[slot]

    def steps_done(self, slot: int) -> int:
        return self._steps[slot]

    def clear_audio(self, slot: int) -> None:
        """Interrupt: the blocks still in the window finish as silence (the mouth closes)."""
        if not self.is_allocated(slot):
            raise SlotError(f"slot {slot} is not allocated")
        with self._on_compute(), torch.inference_mode():
            self.win_audio[slot] = self.silence_tokens.repeat(self.L, 1)
            self.audio_tail[slot].zero_()

    def replan(self, slot: int) -> None:
        """Discards the slot's window (the blocks planned but not emitted) so that newer audio can take their
        place: the next L - 1 steps fill the window again and emit nothing, the L-th emits the first block with
        the audio they brought. The style anchor and the clean history stay (the first new block continues the
        last emitted one); the discarded blocks' audio leaves the front end's left context as if it never came.
        The step counter keeps counting, so no step's noise repeats, and emitted blocks keep their numbering
        (``SlotResult.emitted_block`` counts blocks emitted, whatever was discarded)."""
        if not self.is_allocated(slot):
            raise SlotError(f"slot {slot} is not allocated")
        held = min(self._steps[slot] - self._start[slot], self.L - 1)  # blocks in the window now
        drop = held * self.block_samples
        with self._on_compute(), torch.inference_mode():
            self.win_lat[slot].zero_()
            self.win_audio[slot].zero_()
            if self.context_samples and drop:
                tail = self.audio_tail[slot]
                keep = max(self.context_samples - drop, 0)
                kept = tail[:keep].clone()
                tail.zero_()
                if keep:
                    tail[-keep:] = kept
        self._start[slot] = self._steps[slot]

    # ---- the anchor ---------------------------------------------------------------------------
    @staticmethod
    def _stack_cross(cross: list[tuple[torch.Tensor, torch.Tensor]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer cross-attention keys/values [1, Lc, h, hd] -> [layers, Lc, h, hd] each."""
        assert cross is not None
        return torch.stack([k[0] for k, _ in cross]), torch.stack([v[0] for _, v in cross])

    @torch.inference_mode()
    def prepare_anchor(self, image: np.ndarray, context: torch.Tensor | None = None) -> AnchorState:
        """uint8 [H, W, 3] at the model's resolution -> the style anchor (computed once per avatar).

        ``context``: the avatar's own umT5 context [text_len, text_dim] (a model with an external text
        context; None: the default), which both the anchor and every window of its sessions attend to.
        """
        c = self.cfg
        if image.shape != (c.height, c.width, 3) or image.dtype != np.uint8:
            raise ValueError(f"reference image must be uint8 [{c.height}, {c.width}, 3], got "
                             f"{image.dtype} {list(image.shape)}")
        if context is not None and not self.per_slot_text:
            raise ValueError("this model has no external text context: it takes no prompt")
        with self._on_compute():
            img = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            img = to_unit(img)[None].to(self.dtype)
            ref = self.vae.encode_image(img)  # [1, C, h, w]
            cross = self._cross if context is None else self.model.cross_kv_of(context)
            sigma = torch.zeros(1, 1, device=self.device)
            _, kvs = self.model(ref[:, None], sigma, ref, self.anchor_token, self.rope_anchor, mask_value=0.0,
                                cross_kv=cross)
            k = torch.stack([kv[0][0] for kv in kvs])
            v = torch.stack([kv[1][0] for kv in kvs])
            out = AnchorState(ref_latent=ref[0].clone(), k=k.clone(), v=v.clone())
            if context is not None:
                out.cross_k, out.cross_v = (t.clone() for t in self._stack_cross(cross))
        if self._compute is not None:
            self._compute.synchronize()  # the caller keeps the anchor and may read it on any stream
        return out

    # ---- which keys hold data (known on the host) ----------------------------------------------
    def _key_masks(self, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix mask [n, (1+H)*P], window mask [n, L*B*P]) of this step, True where a key holds data.

        At step k a slot's window holds blocks for its last min(k+1, L) steps since it started filling (the
        newest slot is filled this step; k counts from the start or the last replan), and its history the
        newest min(H, B * emitted) clean frames.
        """
        B, L, H, P = self.B, self.L, self.H, self.P
        ks = np.array([self._steps[s] - self._start[s] for s in slots])[:, None]
        win = np.arange(L)[None, :] >= (L - 1 - ks)  # block j valid once k >= L-1-j
        emitted = np.array([self._emitted[s] for s in slots])[:, None]
        hist = np.arange(H)[None, :] >= H - np.minimum(H, B * emitted)
        pre = np.concatenate([np.ones_like(ks, dtype=bool), hist], axis=1)
        to = torch.from_numpy
        return (to(np.repeat(pre, P, axis=1)).to(self.device), to(np.repeat(win, B * P, axis=1)).to(self.device))

    def _steady(self, slots: Sequence[int]) -> bool:
        """Every window block and history frame of these slots holds data (no mask needed)."""
        full_history = -(-self.H // self.B)
        return all(self._steps[s] - self._start[s] >= self.L - 1 and self._emitted[s] >= full_history
                   for s in slots)

    # ---- the step -------------------------------------------------------------------------------
    def _noise(self, slots: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        shape = self.win_lat.shape[1:]
        noise = torch.empty((len(slots), *shape), device=self.device, dtype=torch.float32)
        for i, s in enumerate(slots):
            self._gen.manual_seed(_mix_seed(self._seeds[s], self._steps[s]))
            noise[i] = torch.randn(shape, generator=self._gen, device=self.device)
        if out is None:
            return noise.to(self.dtype)
        return out.copy_(noise)

    _MAX_DECODES = 2

    @torch.inference_mode()
    def step(self, slots: Sequence[int], pcm: np.ndarray | torch.Tensor, *,
             deferred: bool = False) -> list[SlotResult]:
        """One denoising step for each slot in ``slots`` (one batched pass): the results in the order of
        ``slots``, with the decoded frames of those past their warm-up.

        pcm: float32 [n, block_samples] in [-1, 1], the newest block's audio at 16 kHz per slot.
        ``deferred``: the emitted results' frames and similarities are collected by ``SlotResult.wait`` (from any
        thread). With ``overlap_decode`` the step then returns once its denoising is done, its blocks decoding on
        the second stream; otherwise it returns when everything is done, as without ``deferred``.
        """
        if not slots:
            return []
        pcm_t = self._check(slots, pcm)
        with self._on_compute():
            steps, rows, clean, numbers = self._advance(slots, pcm_t)
            if not rows:
                return [SlotResult(s, k, None, None, None) for s, k in zip(slots, steps, strict=True)]
            emit_idx = torch.tensor([slots[i] for i in rows], device=self.device)
            ref = self.ref_lat[emit_idx]
            sims = F.cosine_similarity(clean.float().flatten(2), ref.float().flatten(1)[:, None], dim=-1).mean(1)
            if self._decode_stream is None:
                decoded = self._decode_here(emit_idx, clean, sims)
            else:
                decoded = self._decode_beside(emit_idx, clean, sims)
        emitted = {r: e for e, r in enumerate(rows)}
        out: list[SlotResult] = []
        for i, (s, k) in enumerate(zip(slots, steps, strict=True)):
            e = emitted.get(i)
            if e is None:
                out.append(SlotResult(s, k, None, None, None))
            else:
                out.append(SlotResult(s, k, numbers[e], None, None, decoded=decoded, row=e))
        return out if deferred else [r.wait() for r in out]

    def _decode_here(self, idx: torch.Tensor, clean: torch.Tensor, sims: torch.Tensor) -> _Decoded:
        """Decodes on the engine's stream and waits: the frames are on the host when this returns, and copied
        out of the pinned buffers (the next step's) at once."""
        frames = to_pixels(self._decode(idx, clean))
        m = idx.shape[0]
        if self._host_frames is not None and self._host_sims is not None and self._compute is not None:
            frames = self._host_frames[:m].copy_(frames, non_blocking=True)
            sims = self._host_sims[:m].copy_(sims, non_blocking=True)
            self._compute.synchronize()
        return _Decoded(host=(frames.cpu().numpy().copy(), sims.cpu().tolist()))

    def _decode_beside(self, idx: torch.Tensor, clean: torch.Tensor, sims: torch.Tensor) -> _Decoded:
        """Queues the decoding and the copy to the host on the decode stream, behind this step's denoising, and
        returns when the denoising is done (the next step's may start; this one's blocks are still decoding)."""
        compute, ds = self._compute, self._decode_stream
        assert compute is not None and ds is not None
        clean = clean.clone()  # a CUDA graph's output buffer: the next replay overwrites it
        denoised = torch.cuda.Event()
        denoised.record(compute)
        while len(self._decodes) >= self._MAX_DECODES:
            self._decodes.popleft().synchronize()
        with torch.cuda.stream(ds):
            ds.wait_event(denoised)
            for t in (idx, clean, sims):  # made on the engine's stream, read on this one
                t.record_stream(ds)
            frames = to_pixels(self._decode(idx, clean))
            # Fresh page-locked buffers (PyTorch's host allocator caches them), as the copies of several steps
            # may be outstanding; each goes back to it when its results have been collected and dropped.
            host_frames = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host_sims = torch.empty(sims.shape, dtype=sims.dtype, pin_memory=True)
            host_frames.copy_(frames, non_blocking=True)
            host_sims.copy_(sims, non_blocking=True)
            done = torch.cuda.Event()
            done.record(ds)
        self._decodes.append(done)
        denoised.synchronize()
        return _Decoded(done, (host_frames, host_sims))

    @torch.inference_mode()
    def denoise_step(self, slots: Sequence[int], pcm: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The denoising part of a step alone (no decoding): advances the slots one step and returns
        the emitted clean latents [m, B, C, h, w] of the slots past their warm-up, on the device and
        not waited for. For benchmarks and tests; ``step`` is this plus decoding.
        """
        pcm_t = self._check(slots, pcm)
        with self._on_compute():
            return self._advance(list(slots), pcm_t)[2]

    def _check(self, slots: Sequence[int], pcm: np.ndarray | torch.Tensor) -> torch.Tensor:
        n = len(slots)
        if len(set(slots)) != n:
            raise ValueError("a slot appears twice in one step")
        for s in slots:
            if not self.is_allocated(s):
                raise SlotError(f"slot {s} is not allocated")
        pcm_t = torch.as_tensor(pcm, dtype=torch.float32)
        if pcm_t.shape != (n, self.block_samples):
            raise ValueError(f"pcm must be [{n}, {self.block_samples}], got {list(pcm_t.shape)}")
        return pcm_t

    def _advance(self, slots: Sequence[int],
                 pcm: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor, list[int]]:
        """Enqueues the denoising of one step (on the current stream) and counts the step.

        Returns the slots' step numbers before it, the positions in ``slots`` that emit a block, their
        clean latents, and the emitted blocks' numbers in their streams. A steady-state batch replays its
        size's CUDA graph (with ``cuda_graphs``); a size seen the first time runs eagerly, which warms its
        kernels up, and is then captured (capture only records: no slot's state moves).
        """
        n = len(slots)
        steps = [self._steps[s] for s in slots]
        rows = [i for i in range(n) if steps[i] - self._start[slots[i]] >= self.L - 1]
        pcm = pcm.pin_memory().to(self.device, non_blocking=True) if self.cuda else pcm.to(self.device)
        steady = self._steady(slots)
        g = self._graphs.get(n) if steady and self.use_graphs else None
        if g is not None:
            g.idx.copy_(torch.tensor(list(slots)))
            g.pcm.copy_(pcm)
            self._noise(slots, out=g.noise)
            g.graph.replay()
            clean = g.clean
        else:
            idx = torch.tensor(list(slots), device=self.device)
            ropes = self._reference_ropes(slots, rows) if self.stream.positions == "reference" else None
            clean = self._denoise(idx, pcm, self._noise(slots), None if len(rows) == n else rows,
                                  None if steady else self._key_masks(slots), ropes)
            if steady and self.use_graphs and n not in self.graph_errors:
                self._capture(n)
        numbers = [self._emitted[slots[i]] for i in rows]
        for s in slots:
            self._steps[s] += 1
        for i in rows:
            self._emitted[slots[i]] += 1
        return steps, rows, clean, numbers

    def _reference_ropes(self, slots: Sequence[int], rows: list[int]) -> tuple[RopeTable, RopeTable]:
        """Per-row prefix tables of the reference's positions (``StreamConfig.positions``): (window pass, clean
        pass of the emitting ``rows``). Relative to this engine's layout (history at 1..H, window after it):
        in the window pass the anchor sits just before the first history frame that holds data (position
        H - valid frames: 0 in steady state, as ours); in the clean pass it stays at the stream's absolute
        position 0, which is H - B * (blocks emitted before) here."""
        B, H = self.B, self.H

        def table(anchor_pos: int) -> RopeTable:
            # Only the window pass's H + 1 offsets are kept: the clean pass's offset moves back every step, and
            # caching those would grow with the stream.
            t = self._anchor_ropes.get(anchor_pos)
            if t is None:
                t = RopeTable.cat([RopeTable(self.cfg, [anchor_pos], self.device, self.dtype), self.rope_history])
                if 0 <= anchor_pos <= H:
                    self._anchor_ropes[anchor_pos] = t
            return t

        emitted = [self._emitted[s] for s in slots]
        window = RopeTable.rows([table(H - min(H, B * e)) for e in emitted])
        clean = RopeTable.rows([table(H - B * emitted[i]) for i in rows]) if rows else window  # (unused)
        return window, clean

    def _denoise(self, idx: torch.Tensor, pcm: torch.Tensor, noise: torch.Tensor, rows: list[int] | None,
                 masks: tuple[torch.Tensor, torch.Tensor] | None,
                 ropes: tuple[RopeTable, RopeTable] | None = None) -> torch.Tensor:
        """The device part of a step: one pass over the windows of ``idx``, the temporal anchor for the
        emitting ``rows`` (None: all), the slide. Returns the emitted clean latents [m, B, C, h, w].

        ``masks``: the key masks of a warm-up batch, or None (every key holds data: no mask).
        ``ropes``: per-row prefix tables (window pass, clean pass), or None: the relative positions.
        """
        win_rope, clean_rope = ropes if ropes is not None else (self.rope_prefix, self.rope_prefix)
        n = idx.shape[0]
        B, L = self.B, self.L
        # Audio: the new block's tokens, from its samples plus the stored left context.
        full = torch.cat([self.audio_tail[idx], pcm], dim=1)
        tok = self._audio_tokens(full)
        if self.context_samples:
            self.audio_tail[idx] = full[:, -self.context_samples:]
        aud = self.win_audio[idx]
        aud[:, -B:] = tok
        lat = self.win_lat[idx]
        lat[:, -B:] = noise[:, -B:]  # the fresh block enters at the newest slot as pure noise
        sigma = self.sigma_window.expand(n, -1)
        pk, pv = self.prefix_k[idx], self.prefix_v[idx]
        prefix = [Prefix(pk[:, i], pv[:, i]) for i in range(self.cfg.layers)]
        key_mask = None if masks is None else torch.cat(masks, dim=1)
        cross = self._cross_of(idx)
        flow, _ = self.model(lat, sigma, self.ref_lat[idx], aud, self.rope_window, prefix=prefix,
                             prefix_rope=win_rope, key_mask=key_mask, cross_kv=cross, kv_keep=0,
                             compiled=self.compiled)
        x0 = lat - sigma[:, :, None, None, None].to(self.dtype) * flow
        if rows is None:
            clean, e_idx, e_aud, e_prefix, e_cross = x0[:, :B], idx, aud[:, :B], prefix, cross
            e_mask = None if masks is None else masks[0]
        else:
            r = torch.tensor(rows, device=self.device, dtype=torch.long)
            clean, e_idx, e_aud = x0[r, :B], idx[r], aud[r, :B]
            e_prefix = [Prefix(p.k[r], p.v[r]) for p in prefix]
            e_cross = self._cross_of(e_idx)
            e_mask = None if masks is None else masks[0][r]
        if clean.shape[0] > 0 and self.H > 0:
            self._temporal_anchor(e_idx, clean, e_aud, e_prefix, e_mask, e_cross, clean_rope)
        # Slide: block i's x0 is re-noised (fresh noise) to level i-1 and kept for the next step.
        new_lat = torch.zeros_like(lat)
        new_lat[:, : (L - 1) * B] = (1 - self.sigma_renoise) * x0[:, B:] + self.sigma_renoise * noise[:, : (L - 1) * B]
        self.win_lat[idx] = new_lat
        self.win_audio[idx] = torch.cat([aud[:, B:], torch.zeros_like(aud[:, :B])], dim=1)
        return clean

    def _decode(self, idx: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Emitted latents [m, B, C, h, w] of slots ``idx`` -> frames [m, 4B, 3, H, W]; Wan's causal decoder
        continues each slot's own stream (its cache gathered, advanced and written back)."""
        if self.decoder is not None:
            return self.decoder.decode(clean)
        if not isinstance(self.vae, WanVAE):
            return self.vae.decode(clean)
        cache = [t[idx] for t in self.dec_cache]
        frames, cache = self.vae.decode_step(clean.transpose(1, 2), cache, first=False)
        for buf, new in zip(self.dec_cache, cache, strict=True):
            buf[idx] = new
        return frames.transpose(1, 2)

    def _audio_tokens(self, pcm: torch.Tensor) -> torch.Tensor:
        """Audio tokens [n, B, a] of the newest block, from its samples with the left context before them."""
        if self.w2v is None:
            return self.model.audio_tokens(pcm.to(self.dtype))
        return self.model.pack_audio(self.w2v.block_features(pcm, self.frames_per_block))

    def _cross_of(self, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The cross-attention keys/values of these slots: their own (external context), else the shared ones."""
        if not self.per_slot_text:
            return self._cross
        ck, cv = self.cross_k[idx], self.cross_v[idx]
        return [(ck[:, i], cv[:, i]) for i in range(self.cfg.layers)]

    def _temporal_anchor(self, idx: torch.Tensor, clean: torch.Tensor, audio: torch.Tensor, prefix: list[Prefix],
                         pmask: torch.Tensor | None, cross: list[tuple[torch.Tensor, torch.Tensor]] | None,
                         prefix_rope: RopeTable) -> None:
        """Run the emitted clean block at t = 0 and keep its last H frames' keys/values as history."""
        m = idx.shape[0]
        key_mask = None
        if pmask is not None:
            key_mask = torch.cat([pmask, torch.ones(m, self.B * self.P, dtype=torch.bool, device=self.device)], 1)
        sigma = torch.zeros(m, self.B, device=self.device)
        keep = self.H * self.P
        _, kvs = self.model(clean, sigma, self.ref_lat[idx], audio, self.rope_clean, prefix=prefix,
                            prefix_rope=prefix_rope, key_mask=key_mask, cross_kv=cross,
                            kv_keep=min(self.B * self.P, keep), compiled=self.compiled)
        hk = torch.stack([kv[0] for kv in kvs], dim=1)  # [m, layers, min(B, H)*P, heads, hd]
        hv = torch.stack([kv[1] for kv in kvs], dim=1)
        if hk.shape[2] < keep:  # a block shorter than the history: keep the older frames' tail too
            hk = torch.cat([self.hist_k[idx], hk], dim=2)[:, :, -keep:]
            hv = torch.cat([self.hist_v[idx], hv], dim=2)[:, :, -keep:]
        self.hist_k[idx] = hk
        self.hist_v[idx] = hv

    # ---- CUDA graphs ------------------------------------------------------------------------------
    def _capture(self, n: int) -> None:
        """Captures the steady-state denoising of a batch of n slots, whose indices, audio and noise are
        copied into the graph's static inputs before each replay; a failure leaves that size eager."""
        dev = self.device
        idx = torch.zeros(n, dtype=torch.long, device=dev)
        pcm = torch.zeros(n, self.block_samples, device=dev)
        noise = torch.zeros(n, *self.win_lat.shape[1:], device=dev, dtype=self.dtype)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self._graphs.values())).graph.pool() if self._graphs else None
        try:
            with torch.cuda.graph(graph, pool=pool, stream=self._compute, capture_error_mode="thread_local"):
                clean = self._denoise(idx, pcm, noise, None, None)
        except Exception as e:  # a kernel that cannot be captured: this size stays eager
            self.graph_errors[n] = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed for batch %d, running it eagerly: %s", n, e)
            return
        self._graphs[n] = _Graph(graph, idx, pcm, noise, clean)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    idx: torch.Tensor
    pcm: torch.Tensor
    noise: torch.Tensor
    clean: torch.Tensor
