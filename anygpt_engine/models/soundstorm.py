"""SoundStorm, AnyGPT's speech de-tokenizer: semantic ids (SpeechTokenizer RVQ level 1) in, the
7 acoustic levels out, by MaskGIT-style parallel decoding with a conformer. Readable in one sitting.

The network follows soundstorm-speechtokenizer as AnyGPT vendors it (float32 reference):
  x = sum_q code_embed[codes[:, :, q] + q*(V+1)] + semantic_embed[semantic]      (id V = mask)
  12 conformer blocks:  x += 0.5*FF1(LN(x));  x += Attn(LN(x));  x += Conv(x);
                        x += 0.5*FF2(LN(x));  x = LN(x)
    FF:   Linear D->4D, Swish, Linear 4D->D
    Attn: q, k, v without bias, rotary (rotate-half, theta 1e4) on all head dims, softmax over
          keys with key padding, output projection with bias
    Conv: LN, 1x1 conv D->4D, GLU -> 2D channels, depthwise conv (k=31, 'same' padding; padded
          frames zeroed before and after), Swish, channel LayerNorm (no bias, var clamped at
          eps), 1x1 conv 2D->D
  heads: Linear D -> Q*D viewed as Q vectors per frame, LN, per level [D x V] + bias
  -> logits [B, N*Q, V], position n*Q + q.

The engine's weight layout, with the upstream names it is loaded from (prefix
P = net.conformer.layers.{i}; conv names of the unpatched upstream tree in brackets):
  semantic_embed.weight                 semantic_token_emb.weight
  code_embed.weight      [Q*(V+1), D]   net.code_embeds.weight
  layers.{i}.ff1.norm / .up / .down     P.ff1.fn.norm, P.ff1.fn.fn.net.0, P.ff1.fn.fn.net.3 (same for ff2)
  layers.{i}.attn_norm                  P.attn.norm
  layers.{i}.wqkv        [3*H*Dh, D]    P.attn.fn.to_q.weight stacked over P.attn.fn.to_kv.weight
  layers.{i}.attn_out                   P.attn.fn.to_out
  layers.{i}.conv_norm                  P.conv.net1.0         [P.conv.net.0]
  layers.{i}.conv_in     [4D, D]        P.conv.net1.2         [P.conv.net.2]     (1x1 conv, [4D, D, 1])
  layers.{i}.depthwise   [2D, 1, K]     P.conv.ds_conv.conv   [P.conv.net.4.conv]
  layers.{i}.chan_norm   [2D]           P.conv.net2.1.gamma   [P.conv.net.6.gamma] ([1, 2D, 1])
  layers.{i}.conv_out    [D, 2D]        P.conv.net2.2         [P.conv.net.7]     ([D, 2D, 1])
  layers.{i}.post_norm                  P.post_norm
  heads                  [Q*D, D]       net.heads.0
  out_norm                              net.to_logits.0
  out_weight [Q, D, V], out_bias [Q, V] net.to_logits.2.weight, .bias (einops may store [1, 1, Q, V])

Generation is AnyGPT's (see generate); each MaskGIT step is one fused op, ops.maskgit_step.

Two forwards compute the same network:
  forward       the float32 reference (the oracle; any device, any parameter dtype)
  forward_fast  the GPU path: weights cast once to `fast_dtype` (bf16 by default), activations in
                that dtype, LayerNorm/softmax statistics and the logits in float32. Per block:
                cuBLAS GEMMs (biases in their epilogue), fused residual-add + LayerNorm(s)
                (ops.add_layer_norm), RoPE on the engine's rope kernel, the engine's flash
                attention (bidirectional, keys cut at lengths), the conv module's GLU /
                depthwise conv / Swish / channel LayerNorm in two kernels (ops.conformer_conv);
                the code-embedding sum and the per-level output projection are one kernel each.
                On a CPU it runs the ops' torch faces (that is how it is tested without a GPU).
On a GPU generate replays each forward as a CUDA graph per (batch, frame bucket): frames are
padded to a multiple of `frame_bucket` and masked by lengths, so one graph serves every shorter
length exactly; the MaskGIT step runs between replays on the device, no host sync in the loop.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anygpt_engine import ops
from anygpt_engine.ops import attention as attention_ops
from anygpt_engine.ops import soundstorm as soundstorm_ops

KEEP_THRESHOLD = 0.7  # upstream's topk_pres: the filter keeps ceil((1 - 0.7) * V) logits
FRAME_BUCKET = 128  # the fast path pads frames to a multiple of this (one CUDA graph per bucket)
LN_EPS = 1e-5  # nn.LayerNorm's default, upstream's everywhere
CHAN_NORM_EPS = 1e-6  # the channel LayerNorm's clamp in float32 (upstream: 1e-6 for fp32, 1e-4 else)
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SoundStormConfig:
    dim: int = 1024
    depth: int = 12
    heads: int = 8
    dim_head: int = 128
    conv_kernel_size: int = 31
    num_quantizers: int = 7  # acoustic levels (SpeechTokenizer RVQ 2..8)
    codebook_size: int = 1024  # codes per level; the semantic level has as many
    ff_mult: int = 4
    conv_expansion_factor: int = 2

    def __post_init__(self):
        for name in ("dim", "depth", "heads", "dim_head", "conv_kernel_size", "num_quantizers", "codebook_size",
                     "ff_mult", "conv_expansion_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SoundStormConfig.{name}={value!r}, expected a positive int")
        if self.dim_head % 2:
            raise ValueError(f"SoundStormConfig.dim_head={self.dim_head}, expected an even number (rotary halves)")

    @classmethod
    def anygpt(cls) -> "SoundStormConfig":
        """AnyGPT's SoundStorm (speechtokenizer_soundstorm_mls.pt): 351M parameters."""
        return cls()

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def conv_dim(self) -> int:
        return self.dim * self.conv_expansion_factor

    @property
    def mask_id(self) -> int:
        return self.codebook_size


class FeedForward(nn.Module):
    def __init__(self, c: SoundStormConfig, **kw):
        super().__init__()
        self.norm = nn.LayerNorm(c.dim, **kw)
        self.up = nn.Linear(c.dim, c.dim * c.ff_mult, **kw)
        self.down = nn.Linear(c.dim * c.ff_mult, c.dim, **kw)

    def forward(self, x):
        h = self.up(self.norm(x))
        return self.down(h * h.sigmoid())


class Block(nn.Module):
    def __init__(self, c: SoundStormConfig, **kw):
        super().__init__()
        self.ff1 = FeedForward(c, **kw)
        self.attn_norm = nn.LayerNorm(c.dim, **kw)
        self.wqkv = nn.Parameter(torch.empty(3 * c.inner_dim, c.dim, **kw))
        self.attn_out = nn.Linear(c.inner_dim, c.dim, **kw)
        self.conv_norm = nn.LayerNorm(c.dim, **kw)
        self.conv_in = nn.Linear(c.dim, 2 * c.conv_dim, **kw)
        self.depthwise = nn.Conv1d(c.conv_dim, c.conv_dim, c.conv_kernel_size, groups=c.conv_dim, **kw)
        self.chan_norm = nn.Parameter(torch.ones(c.conv_dim, **kw))
        self.conv_out = nn.Linear(c.conv_dim, c.dim, **kw)
        self.ff2 = FeedForward(c, **kw)
        self.post_norm = nn.LayerNorm(c.dim, **kw)


class SoundStorm(nn.Module):
    def __init__(self, config: SoundStormConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, SoundStormConfig):
            raise TypeError(f"config must be a SoundStormConfig, got {type(config).__name__}")
        self.config = c = config
        kw = dict(device=device, dtype=dtype)
        self.semantic_embed = nn.Embedding(c.codebook_size, c.dim, **kw)
        self.code_embed = nn.Embedding(c.num_quantizers * (c.codebook_size + 1), c.dim, **kw)
        self.layers = nn.ModuleList(Block(c, **kw) for _ in range(c.depth))
        self.heads = nn.Linear(c.dim, c.num_quantizers * c.dim, **kw)
        self.out_norm = nn.LayerNorm(c.dim, **kw)
        self.out_weight = nn.Parameter(torch.empty(c.num_quantizers, c.dim, c.codebook_size, **kw))
        self.out_bias = nn.Parameter(torch.empty(c.num_quantizers, c.codebook_size, **kw))
        self.init_random()
        # The fast path (forward_fast, CUDA graphs); see the module docstring.
        self.fast_dtype = torch.bfloat16
        self.frame_bucket = FRAME_BUCKET
        self.graph_capture_seconds = 0.0  # total time spent capturing graphs so far
        self._fast: _FastWeights | None = None
        self._graphs: dict[tuple[int, int], _GraphPass] = {}
        self._graph_pool = None

    def init_random(self, seed: int = 0) -> None:
        """Deterministic random weights: N(0, 1/fan_in) matrices, N(0, 1) embeddings, zero biases,
        unit norms (values drawn on the CPU, so every device gets the same model)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.is_meta:
                    continue
                leaf = name.rsplit(".", 1)[-1]
                if leaf == "bias" or name == "out_bias":
                    value = torch.zeros(p.shape)
                elif "norm" in name:
                    value = torch.ones(p.shape)
                elif "embed" in name:
                    value = torch.randn(p.shape, generator=generator)
                else:  # Linear [out, in], wqkv [3I, D], out_weight [Q, D, V], depthwise [C, 1, K]
                    fan_in = p.shape[-1] if "depthwise" in name else p.shape[1]
                    value = torch.randn(p.shape, generator=generator) * fan_in ** -0.5
                p.copy_(value)

    # -- the network ---------------------------------------------------------------------------
    def rotary(self, n: int, device) -> torch.Tensor:
        """Rotary angles [N, dim_head] (upstream's RotaryEmbedding, float32)."""
        d = self.config.dim_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
        freqs = torch.arange(n, device=device).float().unsqueeze(1) * inv_freq
        return torch.cat((freqs, freqs), dim=-1)

    @staticmethod
    def apply_rotary(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        x1, x2 = t.float().chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (t.float() * angles.cos() + rotated * angles.sin()).to(t.dtype)

    def attention(self, block: Block, h: torch.Tensor, angles: torch.Tensor, key_mask, lengths) -> torch.Tensor:
        c = self.config
        b, n, _ = h.shape
        q, k, v = (t.view(b, n, c.heads, c.dim_head).transpose(1, 2)
                   for t in F.linear(h, block.wqkv).split(c.inner_dim, dim=-1))
        q, k = self.apply_rotary(q, angles), self.apply_rotary(k, angles)
        if h.is_cuda:
            # The engine's flash kernel: bidirectional, each item's keys cut at its length.
            def packed(t):
                return t.transpose(1, 2).reshape(b * n, c.heads, c.dim_head)

            starts = torch.arange(0, (b + 1) * n, n, device=h.device)
            kv_lens = lengths if lengths is not None else torch.full((b,), n, device=h.device)
            out = attention_ops.varlen_attention(packed(q), packed(k), packed(v), starts, n, causal=False,
                                                 cu_seqlens_k=starts, kv_lens=kv_lens.long(), scale=c.dim_head ** -0.5)
            return block.attn_out(out.view(b, n, c.inner_dim))
        sim = (q @ k.transpose(-1, -2)) * c.dim_head ** -0.5
        if key_mask is not None:
            sim = sim.masked_fill(~key_mask.view(b, 1, 1, n), -torch.finfo(sim.dtype).max)
        out = sim.softmax(dim=-1) @ v
        return block.attn_out(out.transpose(1, 2).reshape(b, n, c.inner_dim))

    def conv(self, block: Block, x: torch.Tensor, key_mask) -> torch.Tensor:
        c = self.config
        out, gate = block.conv_in(block.conv_norm(x)).chunk(2, dim=-1)
        h = (out * gate.sigmoid()).transpose(1, 2)  # [B, C, N]
        keep = None if key_mask is None else key_mask.unsqueeze(1)
        if keep is not None:
            h = h.masked_fill(~keep, 0.0)
        k = c.conv_kernel_size
        h = block.depthwise(F.pad(h, (k // 2, k // 2 - (k + 1) % 2)))  # upstream's 'same' padding
        if keep is not None:
            h = h.masked_fill(~keep, 0.0)
        h = h * h.sigmoid()
        eps = 1e-6 if h.dtype == torch.float32 else 1e-4
        var = torch.var(h, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(h, dim=1, keepdim=True)
        h = (h - mean) * var.clamp(min=eps).rsqrt() * block.chan_norm.view(1, -1, 1)
        return block.conv_out(h.transpose(1, 2))

    def forward(self, codes: torch.Tensor, semantic: torch.Tensor,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N*Q, V] of acoustic codes [B, N, Q] (V = mask) given semantic ids [B, N];
        frames >= lengths[b] are padding that no valid frame sees."""
        c = self.config
        b, n, q = codes.shape
        key_mask = None if lengths is None else torch.arange(n, device=codes.device) < lengths.view(b, 1)
        offsets = torch.arange(q, device=codes.device) * (c.codebook_size + 1)
        x = self.code_embed(codes + offsets).sum(dim=2) + self.semantic_embed(semantic)
        angles = self.rotary(n, codes.device)
        for block in self.layers:
            x = block.ff1(x) * 0.5 + x
            x = self.attention(block, block.attn_norm(x), angles, key_mask, lengths) + x
            x = self.conv(block, x, key_mask) + x
            x = block.ff2(x) * 0.5 + x
            x = block.post_norm(x)
        h = self.out_norm(self.heads(x).view(b, n, q, c.dim))
        logits = torch.einsum("bnqd,qdl->bnql", h, self.out_weight) + self.out_bias
        return logits.reshape(b, n * q, c.codebook_size)

    # -- the fast path ---------------------------------------------------------------------------
    def _fast_weights(self) -> "_FastWeights":
        """The weights cast once to fast_dtype (rebuilt, and the graphs dropped, when a parameter
        changes: its data pointer or version counter moves)."""
        if self.fast_dtype not in _FAST_DTYPES:
            raise ValueError(f"fast_dtype={self.fast_dtype!r}, expected one of {_FAST_DTYPES}")
        key = (self.fast_dtype, tuple((p.data_ptr(), p._version) for p in self.parameters()))
        if self._fast is None or self._fast.key != key:
            self._graphs.clear()
            self._fast = None
            self._fast = _FastWeights(self, self.fast_dtype, key)
        return self._fast

    @torch.no_grad()
    def forward_fast(self, codes: torch.Tensor, semantic: torch.Tensor, lengths: torch.Tensor | None = None, *,
                     out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
        """forward's logits [B, N*Q, V] (float32) on the fast path: fast_dtype weights and
        activations, float32 statistics (module docstring). `out` takes a preallocated float32
        [B, N*Q, V] tensor; `backend` forces the face of the fused ops (e.g. "torch", "triton").
        Device work only, so it can be captured in a CUDA graph. Accuracy against forward in bf16:
        the rules in tests/test_soundstorm_fast.py (rms error <= 3% of the logits' rms)."""
        c = self.config
        w = self._fast_weights()
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[2] != c.num_quantizers:
            raise ValueError(f"codes: expected an int64 [B, N, {c.num_quantizers}] tensor, got "
                             f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.device != w.device:
            raise ValueError(f"codes are on {codes.device}, the model on {w.device}")
        b, n, q = codes.shape
        t, dim, heads, dh = b * n, c.dim, c.heads, c.dim_head
        if lengths is None:
            lengths = torch.full((b,), n, dtype=torch.int64, device=codes.device)
        aux = w.aux(b, n)
        x = soundstorm_ops.code_embedding(codes, semantic, w.code_embed, w.semantic_embed, backend=backend).view(t, dim)
        h = soundstorm_ops.add_layer_norm(x, norm=w.blocks[0].ff1_norm, eps=LN_EPS, backend=backend)
        for i, blk in enumerate(w.blocks):
            h = soundstorm_ops.add_layer_norm(x, self._ff_fast(h, blk.ff1), alpha=0.5, norm=blk.attn_norm, eps=LN_EPS,
                                              backend=backend)
            qkv = F.linear(h, blk.wqkv).view(t, 3, heads, dh)
            # q and k rotate in place; every slot is -1, so nothing goes to the (one-row) cache and
            # attention reads k and v where the projection wrote them.
            ops.rope_kv_append(qkv[:, 0], qkv[:, 1], qkv[:, 2], aux.positions, aux.no_slots, w.no_cache, w.no_cache,
                               w.inv_freq, backend=backend)
            att = ops.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], aux.starts, n, causal=False,
                                       cu_seqlens_k=aux.starts, kv_lens=lengths, scale=dh ** -0.5, backend=backend)
            y = F.linear(att.view(t, heads * dh), *blk.attn_out)
            h = soundstorm_ops.add_layer_norm(x, y, norm=blk.conv_norm, eps=LN_EPS, backend=backend)
            u = F.linear(h, *blk.conv_in).view(b, n, 2 * c.conv_dim)
            g = soundstorm_ops.conformer_conv(u, lengths, blk.depthwise, blk.depthwise_bias, blk.chan_norm,
                                              eps=CHAN_NORM_EPS, backend=backend)
            y = F.linear(g.view(t, c.conv_dim), *blk.conv_out)
            h = soundstorm_ops.add_layer_norm(x, y, norm=blk.ff2_norm, eps=LN_EPS, backend=backend)
            following = w.blocks[i + 1].ff1_norm if i + 1 < len(w.blocks) else None
            h = soundstorm_ops.add_layer_norm(x, self._ff_fast(h, blk.ff2), alpha=0.5, post_norm=blk.post_norm,
                                              norm=following, eps=LN_EPS, backend=backend)
        heads_out = F.linear(x, *w.heads).view(t * q, dim)
        normed = soundstorm_ops.add_layer_norm(heads_out, norm=w.out_norm, eps=LN_EPS, backend=backend)
        if out is not None and (out.shape != (b, n * q, c.codebook_size) or out.dtype != torch.float32):
            raise ValueError(f"out: expected a float32 {(b, n * q, c.codebook_size)} tensor, got {out.dtype} "
                             f"{tuple(out.shape)}")
        logits = soundstorm_ops.grouped_linear(normed.view(t, q, dim), w.out_weight, w.out_bias,
                                               out=None if out is None else out.view(t, q, c.codebook_size),
                                               out_dtype=torch.float32, backend=backend)
        return logits.view(b, n * q, c.codebook_size)

    @staticmethod
    def _ff_fast(h: torch.Tensor, ff: tuple) -> torch.Tensor:
        up = F.linear(h, ff[0], ff[1])
        return F.linear(F.silu(up, inplace=True), ff[2], ff[3])

    @torch.no_grad()
    def capture_graphs(self, batch_sizes: Sequence[int] = (1,), frames: Sequence[int] = (500,)) -> float:
        """Captures forward_fast as CUDA graphs for every (batch size, bucket of each frame count)
        up front, largest first (generate otherwise captures each on first use). Returns the
        seconds spent; graph_capture_seconds keeps the total."""
        device = self.code_embed.weight.device
        if not self.graphs_by_default:
            raise RuntimeError(f"capture_graphs needs the model on a CUDA device and varlen attention on a kernel "
                               f"(the model is on {device})")
        for name, values in (("batch_sizes", batch_sizes), ("frames", frames)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}={values!r}, expected positive ints")
        keys = {(b, self._bucket(n, self.frame_bucket)) for b in batch_sizes for n in frames}
        start = time.perf_counter()
        for key in sorted(keys, key=lambda k: (k[0] * k[1], k), reverse=True):
            self._graph_pass(*key).capture(self)
        return time.perf_counter() - start

    @property
    def graphs_by_default(self) -> bool:
        """Whether generate replays CUDA graphs unless told otherwise (the fast path on CUDA with
        varlen attention on a kernel)."""
        return self._paths(self.code_embed.weight.device, None, None, None)[1]

    def release_graphs(self) -> None:
        """Drops every captured graph, its static buffers and the fast path's weight copies."""
        self._graphs.clear()
        self._fast = None
        self._graph_pool = None

    @property
    def captured_graphs(self) -> list[tuple[int, int]]:
        """(batch, frames) of every graph captured (and still valid)."""
        return sorted(k for k, g in self._graphs.items() if g.graph is not None)

    @staticmethod
    def _bucket(n: int, bucket: int) -> int:
        return -(-n // bucket) * bucket

    def _graph_pass(self, batch: int, frames: int) -> "_GraphPass":
        self._fast_weights()  # drops stale graphs first
        key = (batch, frames)
        if key not in self._graphs:
            self._graphs[key] = _GraphPass(self, batch, frames, self.code_embed.weight.device)
        return self._graphs[key]

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, semantic_ids, prompt=None, steps: int = 3, greedy: bool = True,
                 generator: torch.Generator | None = None, *, lengths=None, prompt_lengths=None, seeds=None,
                 noise: Callable[[int], torch.Tensor] | None = None, backend: str | None = None,
                 fast: bool | None = None, cuda_graphs: bool | None = None, frame_bucket: int | None = None):
        """Codes [B, T, 1 + Q] (level 0 = the semantic input) for semantic ids [B, T], AnyGPT's way.

        semantic_ids: a [B, T] tensor (with optional `lengths` [B]) or a list of 1-D sequences.
        prompt: None or (semantic, acoustic) for voice cloning: [B, P] and [B, P, Q] tensors (with
          optional `prompt_lengths`) or lists of [P_b] and [P_b, Q].
        Returns a list of [T_b, 1 + Q] for a list input, else [B, T, 1 + Q] with -1 past lengths.

        The algorithm (steps S, N = P + T frames per item, all decisions per item):
          state A = prompt acoustic ++ mask ids; open set M = target frames, all levels.
          c_i = int(float32(cos(pi/2 * i/S)) * N) for i = 0..S (float32 as upstream computes it).
          Level 0, i = 0..S: logits = net(A); one ops.maskgit_step with c_i, temperature i/S
            (c_i > 0: keep-top 0.3, Gumbel noise, re-mask the c_i least confident positions of
            all N*Q plus levels 1.., the prompt protected; c_i = 0 and greedy: argmax, no re-mask).
          Levels q = 1..Q-1: one pass each; A[:, :, q:] = argmax ids (every frame, the prompt's
          too, as upstream does); non-greedy samples at temperature 0 instead.
        Noise: each item's Gumbel draws come from its seed (`seeds`, else drawn from `generator`)
        through ops.maskgit_uniform, so an item gives the same codes alone or in any batch.
        `noise(counter)` may return the U(0, 1) draws [B, N_max*Q, V] of pass `counter` instead
        (counter = i for level-0 steps, S + q for level q), for tests.

        Paths: fast (default on a CUDA model) runs forward_fast (fast_dtype weights, float32
        logits), else the float32 reference forward. cuda_graphs (default: fast on CUDA) replays
        one captured graph per (batch, frame bucket) (captured on first use, or up front by
        capture_graphs); False runs the same forward eagerly. Frames are padded to a multiple of
        frame_bucket (default: self.frame_bucket on the fast path, 1 on the reference path);
        padding is masked by lengths and never read by the step, so it does not change codes.
        `backend` picks the MaskGIT step's face. A model's graphs serve one generate at a time.
        """
        c = self.config
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r}, expected an int >= 1")
        device = self.code_embed.weight.device
        as_list, target, t_len = _ragged("semantic_ids", semantic_ids, lengths, 2, c.codebook_size,
                                             min_length=1)
        batch = len(target)
        prompt_sem, prompt_ac, p_len = [None] * batch, [None] * batch, [0] * batch
        if prompt is not None:
            if not isinstance(prompt, (tuple, list)) or len(prompt) != 2:
                raise TypeError("prompt must be None or a pair (semantic, acoustic)")
            _, prompt_sem, p_len = _ragged("prompt semantic", prompt[0], prompt_lengths, 2, c.codebook_size)
            if len(prompt_sem) != batch:
                raise ValueError(f"prompt semantic has {len(prompt_sem)} items, expected {batch} like semantic_ids")
            _, prompt_ac, _ = _ragged("prompt acoustic", prompt[1], p_len, 3, c.codebook_size,
                                      levels=c.num_quantizers)
            if [len(a) for a in prompt_ac] != p_len:
                raise ValueError(f"prompt acoustic lengths {[len(a) for a in prompt_ac]}, expected {p_len} like the "
                                 "prompt semantic ids")
        seeds = _seeds(seeds, batch, generator)

        fast, cuda_graphs, bucket = self._paths(device, fast, cuda_graphs, frame_bucket)

        n_len = [p + t for p, t in zip(p_len, t_len)]
        n_max, q = max(n_len), c.num_quantizers
        n_pad = self._bucket(n_max, bucket)
        semantic = torch.zeros(batch, n_pad, dtype=torch.int64)
        codes = torch.full((batch, n_pad, q), c.mask_id, dtype=torch.int64)
        for i in range(batch):
            if p_len[i]:
                semantic[i, :p_len[i]] = prompt_sem[i]
                codes[i, :p_len[i]] = prompt_ac[i]
            semantic[i, p_len[i]:n_len[i]] = target[i]
        if cuda_graphs:  # the state lives in the graph's static inputs
            graph = self._graph_pass(batch, n_pad)
            semantic, codes = graph.semantic.copy_(semantic), graph.codes.copy_(codes)
            lengths_t = graph.lengths.copy_(torch.tensor(n_len))

            def forward():
                return graph.run(self)
        else:
            semantic, codes = semantic.to(device), codes.to(device)
            lengths_t = torch.tensor(n_len, device=device)
            net = self.forward_fast if fast else self

            def forward():
                return net(codes, semantic, lengths_t)
        prompt_t = torch.tensor(p_len, device=device)
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=device)
        frames = torch.arange(n_pad, device=device).view(1, n_pad, 1)
        valid = frames < lengths_t.view(-1, 1, 1)
        open_mask = (valid & (frames >= prompt_t.view(-1, 1, 1))).expand(batch, n_pad, q).contiguous()
        # Computed on the host in float32, as upstream does on its device.
        times = torch.linspace(0.0, 1.0, steps + 1)
        counts = (torch.cos(times * math.pi / 2).view(-1, 1) * torch.tensor(n_len).view(1, -1)).long().to(device)
        keep = ops.keep_count(c.codebook_size, KEEP_THRESHOLD)
        zeros = torch.zeros(batch, dtype=torch.int64, device=device)

        def step(counter, count, temperature, level):
            logits = forward()
            uniform = None if noise is None else _padded_noise(noise(counter), n_pad * q)
            ops.maskgit_step(logits, codes, open_mask, lengths_t, prompt_t, count, seeds_t, counter=counter,
                             temperature=temperature, greedy=greedy, keep=keep, level=level, uniform=uniform,
                             backend=backend)

        for i in range(steps + 1):
            step(i, counts[i], i / steps, 0)
        levels = torch.arange(q, device=device).view(1, 1, q)
        for level in range(1, q):
            open_mask.copy_(valid & (levels >= level))
            step(steps + level, zeros, 0.0, level)

        out = torch.cat((semantic.unsqueeze(-1), codes), dim=-1)
        rows = [out[i, p_len[i]:n_len[i]] for i in range(batch)]
        if as_list:
            return rows
        result = torch.full((batch, max(t_len), q + 1), -1, dtype=torch.int64, device=device)
        for i, row in enumerate(rows):
            result[i, :len(row)] = row
        return result

    def _paths(self, device: torch.device, fast, cuda_graphs, frame_bucket) -> tuple[bool, bool, int]:
        """generate's (fast, cuda_graphs, frame bucket) from its arguments and the device."""
        on_cuda = device.type == "cuda"
        for name, value in (("fast", fast), ("cuda_graphs", cuda_graphs)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name}={value!r}, expected None, True or False")
        fast = on_cuda if fast is None else fast
        graph_safe = fast and on_cuda and attention_ops.varlen_attention_face(device) != "torch"
        if cuda_graphs is None:
            cuda_graphs = graph_safe
        elif cuda_graphs and not graph_safe:
            raise ValueError(f"cuda_graphs=True needs fast=True, the model on a CUDA device and varlen attention on a "
                             f"kernel (fast={fast}, device={device}; ANYGPT_BACKEND forcing the torch reference "
                             "leaves it eager)")
        bucket = frame_bucket if frame_bucket is not None else (self.frame_bucket if fast else 1)
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"frame_bucket={bucket!r}, expected a positive int")
        return fast, cuda_graphs, bucket

    # -- weights -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_state_dict, config: SoundStormConfig | None = None, device=None,
                        dtype=None) -> "SoundStorm":
        """Loads the upstream checkpoint format (speechtokenizer_soundstorm_mls.pt: a state dict of
        soundstorm-speechtokenizer's SoundStorm, as a file or an already loaded dict). config
        None means AnyGPT's. A file that does not match raises ValueError naming the missing,
        unexpected or mis-shaped tensors."""
        config = config or SoundStormConfig.anygpt()
        state = _read_state_dict(path_or_state_dict)
        model = cls(config, device="meta", dtype=dtype).to_empty(device=device or "cpu")
        layout = _upstream_layout(config)
        params = dict(model.named_parameters())
        filled, unexpected, misshaped = set(), [], []
        with torch.no_grad():
            for name, tensor in state.items():
                if name not in layout:
                    unexpected.append(name)
                    continue
                target_name, rows = layout[name]
                target = params[target_name] if rows is None else params[target_name][rows[0]:rows[1]]
                if _squeezed(tensor.shape) != _squeezed(target.shape):
                    misshaped.append(f"{name} {tuple(tensor.shape)} (expected {tuple(target.shape)} up to unit dims)")
                    continue
                target.copy_(tensor.reshape(target.shape))
                filled.add((target_name, rows))
        missing = [name for name, slot in _canonical_names(config).items() if slot not in filled]
        if missing or unexpected or misshaped:
            raise ValueError("SoundStorm checkpoint does not match SoundStormConfig"
                             f"({config}): missing {_listing(missing)}; unexpected {_listing(unexpected)}; "
                             f"wrong shape {_listing(misshaped)}")
        return model.eval()


# -- the fast path's state ---------------------------------------------------------------------------
class _FastWeights:
    """forward_fast's weights, cast once: matrices, embeddings and linear biases in `dtype` (no
    copy when a parameter already has it), the norms, the conv's taps, bias and gamma and the
    output bias in float32. Also caches the per-shape index tensors of the rope and attention ops."""

    def __init__(self, model: SoundStorm, dtype: torch.dtype, key):
        self.key = key
        self.device = model.code_embed.weight.device

        def cast(t):
            return t.detach().to(dtype).contiguous()

        def f32(t):
            return t.detach().float().contiguous()

        def norm(m):
            return f32(m.weight), f32(m.bias)

        def linear(m):
            return cast(m.weight), cast(m.bias)

        def ff(m):
            return cast(m.up.weight), cast(m.up.bias), cast(m.down.weight), cast(m.down.bias)

        self.code_embed = cast(model.code_embed.weight)
        self.semantic_embed = cast(model.semantic_embed.weight)
        self.blocks = []
        for blk in model.layers:
            self.blocks.append(_Namespace(
                ff1=ff(blk.ff1), ff1_norm=norm(blk.ff1.norm), attn_norm=norm(blk.attn_norm), wqkv=cast(blk.wqkv),
                attn_out=linear(blk.attn_out), conv_norm=norm(blk.conv_norm), conv_in=linear(blk.conv_in),
                # [C, K] taps stored [K, C]: the conv kernel reads a tap of every channel at once.
                depthwise=f32(blk.depthwise.weight[:, 0, :].t()).t(), depthwise_bias=f32(blk.depthwise.bias),
                chan_norm=f32(blk.chan_norm), conv_out=linear(blk.conv_out), ff2=ff(blk.ff2),
                ff2_norm=norm(blk.ff2.norm), post_norm=norm(blk.post_norm)))
        self.heads = linear(model.heads)
        self.out_norm = norm(model.out_norm)
        self.out_weight = cast(model.out_weight)
        self.out_bias = f32(model.out_bias)
        d = model.config.dim_head
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=self.device).float() / d))
        # rope_kv_append's cache operand: never written (every slot is -1), one row to be well formed.
        self.no_cache = torch.zeros((1, 1, model.config.heads, d), dtype=dtype, device=self.device)
        self._aux: dict[tuple[int, int], _Namespace] = {}

    def aux(self, batch: int, frames: int) -> "_Namespace":
        """Frame positions of every token, cache slots that skip the cache (-1), and the items'
        token offsets."""
        key = (batch, frames)
        if key not in self._aux:
            dev = self.device
            self._aux[key] = _Namespace(positions=torch.arange(frames, device=dev).repeat(batch),
                                        no_slots=torch.full((batch * frames,), -1, device=dev),
                                        starts=torch.arange(0, (batch + 1) * frames, frames, device=dev))
        return self._aux[key]


class _Namespace:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _GraphPass:
    """One (batch, frames) bucket of the fast path: static inputs (codes, semantic ids, lengths),
    static float32 logits and, once captured, the CUDA graph of forward_fast between them.
    generate keeps its MaskGIT state in `codes` itself, so a pass needs no copies."""

    def __init__(self, model: SoundStorm, batch: int, frames: int, device: torch.device):
        c = model.config
        self.codes = torch.full((batch, frames, c.num_quantizers), c.mask_id, dtype=torch.int64, device=device)
        self.semantic = torch.zeros((batch, frames), dtype=torch.int64, device=device)
        self.lengths = torch.full((batch,), frames, dtype=torch.int64, device=device)
        self.logits = torch.zeros((batch, frames * c.num_quantizers, c.codebook_size), dtype=torch.float32,
                                  device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0

    def capture(self, model: SoundStorm) -> None:
        """Warm-up on a side stream (kernel compilation, library handles), then capture into the
        model's shared pool. The inputs are read, never written, so live generate state is safe."""
        if self.graph is not None:
            return
        start = time.perf_counter()
        device = self.codes.device
        model._fast_weights().aux(*self.semantic.shape)  # index tensors made outside the graph
        if model._graph_pool is None:
            model._graph_pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                model.forward_fast(self.codes, self.semantic, self.lengths, out=self.logits)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # On a stream of the model's device (torch's default capture stream belongs to the device
        # current at the process's first capture), and thread_local: a server captures while its
        # engine thread keeps decoding, whose allocations a global capture would turn into errors.
        capture = torch.cuda.Stream(device)
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=model._graph_pool, stream=capture,
                                                         capture_error_mode="thread_local"):
            model.forward_fast(self.codes, self.semantic, self.lengths, out=self.logits)
        torch.cuda.synchronize(device)
        self.graph = graph
        self.capture_seconds = time.perf_counter() - start
        model.graph_capture_seconds += self.capture_seconds

    def run(self, model: SoundStorm) -> torch.Tensor:
        if self.graph is None:
            self.capture(model)
        self.graph.replay()
        return self.logits


# -- input handling ------------------------------------------------------------------------------
def _ragged(name, value, lengths, ndim, limit, levels=None, min_length=0):
    """(was a list, per-item int64 CPU tensors, their lengths) of a padded tensor or a list."""
    if isinstance(value, torch.Tensor):
        if value.dim() != ndim or (levels is not None and value.shape[-1] != levels):
            raise ValueError(f"{name}.shape={tuple(value.shape)}, expected {ndim} dims"
                             + (f" with {levels} levels last" if levels else ""))
        if lengths is None:
            lengths = [value.shape[1]] * value.shape[0]
        lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if len(lengths) != value.shape[0] or any(not 0 <= n <= value.shape[1] for n in lengths):
            raise ValueError(f"lengths of {name}={lengths}, expected {value.shape[0]} values in [0, {value.shape[1]}]")
        items, as_list = [value[i, :n] for i, n in enumerate(lengths)], False
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items, as_list = [torch.as_tensor(v) for v in value], True
        if not items:
            raise ValueError(f"{name} is an empty list, expected at least one item")
    else:
        raise TypeError(f"{name} must be a tensor or a list of sequences, got {type(value).__name__}")
    items = [t.detach().to("cpu", torch.int64) for t in items]
    for i, t in enumerate(items):
        if t.dim() != ndim - 1 or (levels is not None and t.shape[-1] != levels):
            raise ValueError(f"{name}[{i}].shape={tuple(t.shape)}, expected {ndim - 1} dims"
                             + (f" with {levels} levels last" if levels else ""))
        if t.numel() and not (0 <= int(t.min()) and int(t.max()) < limit):
            raise ValueError(f"{name}[{i}] has values in [{int(t.min())}, {int(t.max())}], expected [0, {limit})")
        if len(t) < min_length:
            raise ValueError(f"{name}[{i}] has {len(t)} frames, expected at least {min_length}")
    return as_list, items, [len(t) for t in items]


def _padded_noise(uniform: torch.Tensor, positions: int) -> torch.Tensor:
    """Injected draws [B, N_max*Q, V] widened to the padded frames (never read: they are padding)."""
    if isinstance(uniform, torch.Tensor) and uniform.dim() == 3 and uniform.shape[1] < positions:
        pad = uniform.new_full((uniform.shape[0], positions - uniform.shape[1], uniform.shape[2]), 0.5)
        return torch.cat((uniform, pad), dim=1)
    return uniform


def _seeds(seeds, batch, generator):
    if seeds is None:
        return torch.randint(0, 2**62, (batch,), generator=generator).tolist()
    seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
    if len(seeds) != batch or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds={seeds!r}, expected {batch} ints (one per item)")
    return [(s + 2**63) % 2**64 - 2**63 for s in seeds]  # as int64


# -- checkpoint mapping ----------------------------------------------------------------------------
_LAYER_PARTS = {  # upstream suffix under net.conformer.layers.{i} -> engine suffix under layers.{i}
    **{f"{ff}.fn.{src}.{leaf}": f"{ff}.{dst}.{leaf}" for ff in ("ff1", "ff2") for leaf in ("weight", "bias")
       for src, dst in (("norm", "norm"), ("fn.net.0", "up"), ("fn.net.3", "down"))},
    **{f"attn.norm.{leaf}": f"attn_norm.{leaf}" for leaf in ("weight", "bias")},
    **{f"attn.fn.to_out.{leaf}": f"attn_out.{leaf}" for leaf in ("weight", "bias")},
    **{f"post_norm.{leaf}": f"post_norm.{leaf}" for leaf in ("weight", "bias")},
    **{f"conv.{src}.{leaf}": f"{dst}.{leaf}" for leaf in ("weight", "bias")
       for src, dst in (("net1.0", "conv_norm"), ("net.0", "conv_norm"), ("net1.2", "conv_in"), ("net.2", "conv_in"),
                        ("ds_conv.conv", "depthwise"), ("net.4.conv", "depthwise"),
                        ("net2.2", "conv_out"), ("net.7", "conv_out"))},
    "conv.net2.1.gamma": "chan_norm",
    "conv.net.6.gamma": "chan_norm",
}
_TOP = {"semantic_token_emb.weight": "semantic_embed.weight", "net.code_embeds.weight": "code_embed.weight",
        "net.heads.0.weight": "heads.weight", "net.heads.0.bias": "heads.bias",
        "net.to_logits.0.weight": "out_norm.weight", "net.to_logits.0.bias": "out_norm.bias",
        "net.to_logits.2.weight": "out_weight", "net.to_logits.2.bias": "out_bias"}
_UNPATCHED = re.compile(r"conv\.net\.\d")  # the conv names of the tree AnyGPT did not patch


def _upstream_layout(c: SoundStormConfig) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Every accepted upstream name -> (engine parameter, rows it fills or None for all)."""
    layout = {name: (engine, None) for name, engine in _TOP.items()}
    for i in range(c.depth):
        prefix = f"net.conformer.layers.{i}."
        for suffix, engine in _LAYER_PARTS.items():
            layout[prefix + suffix] = (f"layers.{i}.{engine}", None)
        layout[prefix + "attn.fn.to_q.weight"] = (f"layers.{i}.wqkv", (0, c.inner_dim))
        layout[prefix + "attn.fn.to_kv.weight"] = (f"layers.{i}.wqkv", (c.inner_dim, 3 * c.inner_dim))
    return layout


def _canonical_names(c: SoundStormConfig) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """The names AnyGPT's checkpoint has (one per engine slot), for 'missing' messages."""
    return {name: slot for name, slot in _upstream_layout(c).items() if not _UNPATCHED.search(name)}


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _listing(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:8])
    return f"{len(names)} [{shown}{', ...' if len(names) > 8 else ''}]"


def _read_state_dict(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"SoundStorm checkpoint {source} does not exist")
        try:
            source = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a truncated or foreign file
            raise ValueError(f"SoundStorm checkpoint {source} could not be read as a torch state dict: {err}") from err
    if isinstance(source, Mapping) and "model" in source and isinstance(source["model"], Mapping):
        source = source["model"]  # a trainer package {'model': state_dict, ...}
    if not isinstance(source, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in source.items()):
        raise ValueError(f"SoundStorm checkpoint is a {type(source).__name__}, expected a state dict "
                         "(parameter name -> tensor)")
    return source
