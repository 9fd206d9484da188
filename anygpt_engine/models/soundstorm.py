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
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anygpt_engine import ops
from anygpt_engine.ops import attention as attention_ops

KEEP_THRESHOLD = 0.7  # upstream's topk_pres: the filter keeps ceil((1 - 0.7) * V) logits


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

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, semantic_ids, prompt=None, steps: int = 3, greedy: bool = True,
                 generator: torch.Generator | None = None, *, lengths=None, prompt_lengths=None, seeds=None,
                 noise: Callable[[int], torch.Tensor] | None = None, backend: str | None = None):
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

        n_len = [p + t for p, t in zip(p_len, t_len)]
        n_max, q = max(n_len), c.num_quantizers
        semantic = torch.zeros(batch, n_max, dtype=torch.int64)
        codes = torch.full((batch, n_max, q), c.mask_id, dtype=torch.int64)
        for i in range(batch):
            if p_len[i]:
                semantic[i, :p_len[i]] = prompt_sem[i]
                codes[i, :p_len[i]] = prompt_ac[i]
            semantic[i, p_len[i]:n_len[i]] = target[i]
        semantic, codes = semantic.to(device), codes.to(device)
        lengths_t = torch.tensor(n_len, device=device)
        prompt_t = torch.tensor(p_len, device=device)
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=device)
        frames = torch.arange(n_max, device=device).view(1, n_max, 1)
        valid = frames < lengths_t.view(-1, 1, 1)
        open_mask = (valid & (frames >= prompt_t.view(-1, 1, 1))).expand(batch, n_max, q).contiguous()
        # Computed on the host in float32, as upstream does on its device.
        times = torch.linspace(0.0, 1.0, steps + 1)
        counts = (torch.cos(times * math.pi / 2).view(-1, 1) * torch.tensor(n_len).view(1, -1)).long().to(device)
        keep = ops.keep_count(c.codebook_size, KEEP_THRESHOLD)
        zeros = torch.zeros(batch, dtype=torch.int64, device=device)

        def step(counter, count, temperature, level):
            logits = self(codes, semantic, lengths_t)
            ops.maskgit_step(logits, codes, open_mask, lengths_t, prompt_t, count, seeds_t, counter=counter,
                             temperature=temperature, greedy=greedy, keep=keep, level=level,
                             uniform=None if noise is None else noise(counter), backend=backend)

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
