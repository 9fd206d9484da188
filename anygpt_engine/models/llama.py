"""The LLaMA-2 backbone of AnyGPT, readable in one sitting.

The engine's own weight layout (what checkpoints are loaded into):
  tok_embeddings            [V, H]
  layers.{i}.attention_norm [H]
  layers.{i}.wqkv           [(Hq + 2*Hkv) * D, H]   q, k, v projections stacked (HF q,k,v_proj)
  layers.{i}.wo             [H, Hq * D]
  layers.{i}.ffn_norm       [H]
  layers.{i}.w13            [2 * F, H]              gate and up projections stacked
  layers.{i}.w2             [H, F]
  norm                      [H]
  output                    [V, H]                  (the embedding itself when tied)

With Llama.quantize(mode) the four matrices of each layer become QuantizedWeight (int8, fp8 or
int4; anygpt_engine/quantization.py); the embedding and the output head stay 16-bit.

Rotary embedding is HF's rotate-half form (computed in float32, rounded once), so HF
checkpoints load without permuting q/k.
Every matrix goes through ops.linear, which fuses the work around it (one launch each in a
decode step): the RMSNorm into the qkv and gate/up projections, SiLU(gate) * up into the
gate/up epilogue, the residual add into the wo and w2 epilogues, and in a decode step RoPE and
the KV append into the qkv epilogue (ops.linear_rope_kv_append). The residual stream is one
tensor updated in place; accumulation is float32 and the rounding points are HF's.
Attention reads and writes the paged KV cache (layout in runtime/kv_cache.py); prefill chunks
and decode steps are the same code with different shapes. A prefill may pack chunks of several
sequences into one row of tokens (PrefillRuns): every matmul then sees all of them at once, and
attention keeps each run to its own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anygpt_engine import ops
from anygpt_engine.config import ModelConfig
from anygpt_engine.ops import attention
from anygpt_engine.ops.lm_head import lm_head
from anygpt_engine.profiling import nvtx_range
from anygpt_engine.quantization import INT4_GROUP, check_mode, quantize


@dataclass
class PrefillRuns:
    """A packed prefill: tokens [1, T] hold runs of consecutive positions, one per sequence.
    cu_seqlens_q [R + 1] (int64) delimits the runs; kv_lens [R] is each sequence's context
    after its run (cached prefix + run); block_tables [R, nb] their blocks (padding entries are
    never read); max_q_len the longest run. fresh: every run starts at position 0, so its keys
    are exactly its own k/v, which attention reads packed rather than through the cache."""
    cu_seqlens_q: torch.Tensor
    kv_lens: torch.Tensor
    block_tables: torch.Tensor
    max_q_len: int
    fresh: bool = False


class Block(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        kw = dict(device=device, dtype=dtype)
        self.attention_norm = nn.Parameter(torch.ones(h, **kw))
        self.wqkv = nn.Parameter(torch.empty(config.q_size + 2 * config.kv_size, h, **kw))
        self.wo = nn.Parameter(torch.empty(h, config.q_size, **kw))
        self.ffn_norm = nn.Parameter(torch.ones(h, **kw))
        self.w13 = nn.Parameter(torch.empty(2 * f, h, **kw))
        self.w2 = nn.Parameter(torch.empty(h, f, **kw))


class Llama(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.tok_embeddings = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, **kw))
        self.layers = nn.ModuleList(Block(config, device, dtype) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size, **kw))
        self.output = None if config.tie_word_embeddings else nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, **kw))
        half = config.head_dim // 2
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float32, device=device) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights, deterministic per seed and device (HF's init: N(0, std) matrices, unit
        norms). Drawn where the parameters live: 7B of them on a CPU would take a minute."""
        device = self.tok_embeddings.device
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)

    @property
    def lm_head(self) -> torch.Tensor:
        return self.tok_embeddings if self.output is None else self.output

    def quantize(self, mode: str) -> None:
        """Replaces each layer's wqkv, wo, w13 and w2 by its quantized form, one matrix at a time
        (the embedding and the output head stay 16-bit). Shapes are checked first, so a bad mode
        or shape leaves the model as it was."""
        if check_mode(mode) is None:
            raise ValueError("quantization=None: nothing to quantize")
        names = ("wqkv", "wo", "w13", "w2")
        if mode == "int4":
            for name in names:
                k = getattr(self.layers[0], name).shape[1]
                if k % INT4_GROUP:
                    raise ValueError(f"quantization='int4': {name} has K={k} input features, not a multiple of the "
                                     f"group size {INT4_GROUP}")
        for block in self.layers:
            for name in names:
                quantized = quantize(getattr(block, name).detach(), mode)
                delattr(block, name)  # frees the 16-bit matrix before the next one is quantized
                setattr(block, name, quantized)

    # -- pieces --------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.tok_embeddings)

    def add_projection(self, x: torch.Tensor, weight, residual: torch.Tensor) -> None:
        """residual += x @ weight^T, the add fused into the projection's epilogue: the output
        projections (wo, w2) of both sub-blocks. Tensor parallelism all-reduces here instead."""
        ops.linear(x, weight, residual=residual)

    def attention(self, block: Block, residual: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                  slot_mapping: torch.Tensor, block_tables: torch.Tensor, kv_lens: torch.Tensor,
                  runs: PrefillRuns | None) -> None:
        """Adds the attention sub-block's output into the residual stream [B, S, H] in place.
        q, k and v come from the normed residual at `positions` [B, S]; q and k are rotated,
        each token's k/v written to its cache slot (`slot_mapping` [B, S]) in `kv`
        [2, blocks, block_size, Hkv, D], then attention runs causally. Without runs it is a decode
        step: one token per row over the row's first kv_lens[b] cached tokens (`block_tables`
        [B, nb]); with runs, a packed prefill (B == 1) whose runs attend to their own sequences."""
        c = self.config
        b, s, _ = residual.shape
        if runs is None:  # decode: projection, RoPE and KV append in one op
            q = ops.linear_rope_kv_append(residual.view(b * s, -1), block.wqkv, positions.reshape(-1),
                                          slot_mapping.reshape(-1), kv[0], kv[1], self.inv_freq, c.num_heads,
                                          norm_weight=block.attention_norm, eps=c.rms_norm_eps)
            out = attention.paged_decode_attention(q, kv[0], kv[1], block_tables, kv_lens)
        else:
            qkv = ops.linear(residual, block.wqkv, norm_weight=block.attention_norm,
                             eps=c.rms_norm_eps).view(b * s, -1)
            q = qkv[:, :c.q_size].view(b * s, c.num_heads, c.head_dim)
            k = qkv[:, c.q_size:c.q_size + c.kv_size].view(b * s, c.num_kv_heads, c.head_dim)
            v = qkv[:, c.q_size + c.kv_size:].view(b * s, c.num_kv_heads, c.head_dim)
            attention.rope_kv_append(q, k, v, positions.reshape(-1), slot_mapping.reshape(-1), kv[0], kv[1],
                                     self.inv_freq)
            if runs.fresh:  # k was rotated in place: the same values the cache now holds
                out = attention.varlen_attention(q, k, v, runs.cu_seqlens_q, runs.max_q_len, causal=True,
                                                 cu_seqlens_k=runs.cu_seqlens_q)
            else:
                out = attention.varlen_attention(q, kv[0], kv[1], runs.cu_seqlens_q, runs.max_q_len, causal=True,
                                                 kv_lens=runs.kv_lens, block_tables=runs.block_tables)
        self.add_projection(out.view(b, s, c.q_size), block.wo, residual)

    def feed_forward(self, block: Block, residual: torch.Tensor) -> None:
        """Adds the MLP sub-block's output, w2(silu(gate) * up) of the normed residual, into it."""
        act = ops.linear(residual, block.w13, norm_weight=block.ffn_norm, eps=self.config.rms_norm_eps,
                         activation="silu_mul")
        self.add_projection(act, block.w2, residual)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_layers: list[torch.Tensor],
                slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                runs: PrefillRuns | None = None) -> torch.Tensor:
        """Hidden states [B, S, H] of `tokens` [B, S] at `positions` [B, S], with the paged cache
        `kv_layers` (one tensor per layer) read and written in place. S == 1 is a decode step;
        S > 1 a prefill chunk of one sequence (B == 1), or of several packed as `runs` (then
        block_tables is unused). The states are those before the final RMSNorm: `head` fuses it."""
        b, s = tokens.shape
        kv_lens = positions[:, -1] + 1  # each row's context after this step (shared by every layer)
        if runs is None and s > 1:
            if b != 1:
                raise ValueError(f"a prefill chunk is one sequence, got a batch of {b} (pack them as runs)")
            runs = PrefillRuns(torch.tensor([0, s], device=tokens.device), kv_lens, block_tables, s)
        elif runs is not None and b != 1:
            raise ValueError(f"a packed prefill is one row of tokens [1, T], got a batch of {b}")
        with nvtx_range("anygpt/op/embedding"):
            residual = self.embed(tokens)
        for i, block in enumerate(self.layers):
            with nvtx_range("anygpt/op/attention"):
                self.attention(block, residual, positions, kv_layers[i], slot_mapping, block_tables, kv_lens, runs)
            with nvtx_range("anygpt/op/mlp"):
                self.feed_forward(block, residual)
        return residual

    def head(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, V] of hidden states x [B, H] from forward (the final RMSNorm fused),
        reading only the vocabulary rows (first, count) in `rows`; the others are -inf. Prefill,
        decode and scoring all take this one head, so a position's logits never depend on the path."""
        with nvtx_range("anygpt/op/lm_head"):
            return lm_head(x, self.norm, self.config.rms_norm_eps, self.lm_head, rows=rows)
