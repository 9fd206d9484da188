"""SEED (Ge et al. 2023), AnyGPT's image tokenizer, as readable torch modules: an EVA ViT-g image
encoder, a causal Q-Former with 32 learned queries, a projection to the 32-d codebook space
(the quantizer's argmin runs on ops.rvq_encode in codecs/seed.py), and the decoder from
codewords to the 1024-d unCLIP image embedding that Stable Diffusion 2.1 unCLIP draws from.

Facts used (AnyGPT's seed2/ = AILab-CVC/SEED's models/seed_qformer/, files identical:
qformer_quantizer.py, blip2.py, eva_vit.py, qformer_causual.py, vit.py; seed_llama_tokenizer.py):
- ViT (eva_vit.py create_eva_vit_g): patch 14, width 1408, depth 39, 16 heads (1408 // 88), MLP
  int(1408 * 4.3637) = 6144 with exact GELU, pre-norm blocks with LayerNorm eps 1e-6, absolute
  position embeddings over [cls] + 16 x 16 patches (no relative position bias, no layer scale, no
  final norm). Attention: qkv Linear without bias plus separate q_bias / v_bias (k bias is zero),
  q scaled by head_dim^-0.5. LAVIS's eva_vit_g.pth holds 40 blocks; SEED builds 39 and loads
  non-strictly, so block 39 is never used. AnyGPT runs it in fp16.
- ln_vision: LayerNorm(1408), eps 1e-5, computed in float32 whatever the activations' dtype.
- Q-Former (BertModel of qformer_causual.py, bert-base-uncased sizes): query tokens [1, 32, 768]
  -> LayerNorm (eps 1e-12) -> 12 layers of: self-attention (query/key/value Linear, scores /
  sqrt(64), causal: + (1 - tril) * -10000 -- SEED applies that mask exactly when there are 32
  queries, which the published model has; here the queries are always causal), then
  dense + residual + LayerNorm; every cross_attention_freq-th layer (0, 2, ...) cross-attention
  to the 257 image tokens (key/value Linear from 1408), dense + residual + LayerNorm; then the
  query FFN intermediate_query (Linear 768->3072, exact GELU), output_query (Linear back,
  + residual, LayerNorm). The text branch (layer.intermediate/output, word/position embeddings)
  is deleted by Blip2QformerQuantizer and never loaded.
- encode_task_layer: Linear(768, 768), Tanh, Linear(768, 32) -> the quantizer's input.
- VectorQuantizer2: codebook quantize.embedding.weight [8192, 32]; argmin of the expanded form
  ||z||^2 + ||e||^2 - 2 z.e, no l2 normalisation (SEED leaves l2norm commented out).
- get_codebook_entry (the image path; use_qformer_image=False, blocks_for_image=True):
  codewords -> decode_task_layer (Linear(32, 32), Tanh, Linear(32, 768)) -> + pos_embed_image
  -> blocks_image: 4 timm-style ViT blocks (dim 768, 12 heads, MLP 4x = 3072, qkv with bias, LN
  eps 1e-6) -> image_down (Linear 768->256, ReLU, 256->128, ReLU, 128->32, no biases) ->
  flatten [B, 32 * 32] -> distill_image_proj Linear(1024, 1024). The `blocks` / `pos_embed`
  tensors (recon_s: reconstruction of the causal embeddings, training only) and any
  Reverse_Qformer are not read.

Engine names and the published tensors they load from (Q = Qformer.bert.encoder.layer.{i}):
  vit.*                         eva_vit_g.pth as is (or visual_encoder.* in seed_quantizer.pt)
  ln_vision.*                   ln_vision.*
  qformer.query_tokens          query_tokens
  qformer.norm                  Qformer.bert.embeddings.LayerNorm
  qformer.layers.{i}.self_attn  Q.attention.self.{query,key,value}; .out, .norm: Q.attention.output.{dense,LayerNorm}
  qformer.layers.{i}.cross_attn Q.crossattention.* (same layout)
  qformer.layers.{i}.ffn        .fc1: Q.intermediate_query.dense; .fc2, .norm: Q.output_query.{dense,LayerNorm}
  encode_head.{0,2}             encode_task_layer.{0,2}
  decoder.decode_head.{0,2}     decode_task_layer.{0,2}
  decoder.pos_embed             pos_embed_image
  decoder.blocks.{i}.*          blocks_image.{i}.*
  decoder.down.{0,2,4}          image_down.{0,2,4}
  decoder.proj                  distill_image_proj

Two attention paths compute the same network: the default uses F.scaled_dot_product_attention
(flash attention on a GPU); reference=True spells out AnyGPT's arithmetic (explicit scores,
-10000 causal bias, softmax, weighted sum): the plain-torch baseline of benchmarks/bench_image.py
and, in float64, the tests' second reading of the weights.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

VIT_EPS = 1e-6  # EVA blocks (partial(nn.LayerNorm, eps=1e-6))
LN_VISION_EPS = 1e-5  # blip2.LayerNorm, torch's default eps
QFORMER_EPS = 1e-12  # bert-base-uncased layer_norm_eps
DECODER_EPS = 1e-6  # blocks_image
CAUSAL_BIAS = -10000.0  # qformer_causual.get_extended_attention_mask


@dataclass(frozen=True)
class SeedConfig:
    """Sizes of the SEED tokenizer; the defaults are the published model's. Every size is read
    from here, none is derived from another (decoder blocks are qformer_hidden wide, as in SEED)."""

    image_size: int = 224
    patch_size: int = 14
    vit_width: int = 1408
    vit_depth: int = 39
    vit_heads: int = 16
    vit_mlp_dim: int = 6144
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    codebook_size: int = 8192
    codebook_dim: int = 32
    decoder_depth: int = 4
    decoder_heads: int = 12
    decoder_mlp_dim: int = 3072  # Block(mlp_ratio=4.0) over 768
    image_down_dims: tuple[int, ...] = (256, 128, 32)  # image_down's three Linear outputs
    image_embed_dim: int = 1024

    def __post_init__(self):
        object.__setattr__(self, "image_down_dims", tuple(self.image_down_dims))
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if f.name == "image_down_dims" else (value,)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"SeedConfig.{f.name}={value!r}, expected "
                                 f"{'positive ints' if f.name == 'image_down_dims' else 'a positive int'}")
        for width, heads in (("vit_width", "vit_heads"), ("qformer_hidden", "qformer_heads"),
                             ("qformer_hidden", "decoder_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"SeedConfig.{width}={getattr(self, width)} is not a multiple of "
                                 f"{heads}={getattr(self, heads)}")
        if len(self.image_down_dims) != 3:
            raise ValueError(f"SeedConfig.image_down_dims={self.image_down_dims}, expected three widths (image_down "
                             "has three Linear layers)")
        if self.image_size % self.patch_size:
            raise ValueError(f"SeedConfig.image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return {**asdict(self), "image_down_dims": list(self.image_down_dims)}

    @classmethod
    def from_any(cls, config) -> "SeedConfig":
        """None (the published sizes), a SeedConfig, a dict of fields or a JSON file of one."""
        if config is None:
            return cls()
        if isinstance(config, SeedConfig):
            return config
        if isinstance(config, (str, os.PathLike)):
            path = Path(config)
            if not path.is_file():
                raise FileNotFoundError(f"no SEED config at {path}")
            config = json.loads(path.read_text())
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be None, a SeedConfig, a dict or a JSON path, got {type(config).__name__}")
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**config)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, reference: bool) -> torch.Tensor:
    """Softmax attention with scale head_dim^-0.5. q [B, H, Nq, d], k, v [B, H, Nk, d] -> [B, Nq, H*d]."""
    if reference:
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            n = scores.shape[-1]
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores + torch.where(future, CAUSAL_BIAS, 0.0).to(scores.dtype)
        out = scores.softmax(-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).flatten(2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


# -- EVA ViT-g ------------------------------------------------------------------------------------
class EvaAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, reference: bool = False):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = (split_heads(t, self.heads) for t in F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1))
        return self.proj(attend(q, k, v, causal=False, reference=reference))


class EvaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_EPS)
        self.attn = EvaAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_EPS)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x, reference: bool = False):
        x = x + self.attn(self.norm1(x), reference)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, patches, dim], row-major patches


class EvaViT(nn.Module):
    """images [B, 3, S, S] -> tokens [B, 1 + (S / patch)^2, width] ([cls] first)."""

    def __init__(self, c: SeedConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(c.patch_size, c.vit_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.vit_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.num_patches, c.vit_width))
        self.blocks = nn.ModuleList(EvaBlock(c.vit_width, c.vit_heads, c.vit_mlp_dim) for _ in range(c.vit_depth))

    def forward(self, images, reference: bool = False):
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x, reference)
        return x


# -- causal Q-Former ------------------------------------------------------------------------------
class BertAttention(nn.Module):
    """LayerNorm(x + out(attention(query(x), key(context), value(context))))."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(context_dim, dim)
        self.value = nn.Linear(context_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=QFORMER_EPS)

    def forward(self, x, context, causal: bool, reference: bool = False):
        q, k, v = (split_heads(t, self.heads) for t in (self.query(x), self.key(context), self.value(context)))
        return self.norm(x + self.out(attend(q, k, v, causal, reference)))


class QueryFFN(nn.Module):
    """The query branch's feed-forward (intermediate_query / output_query)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=QFORMER_EPS)

    def forward(self, x):
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class QFormerLayer(nn.Module):
    def __init__(self, c: SeedConfig, cross: bool):
        super().__init__()
        self.self_attn = BertAttention(c.qformer_hidden, c.qformer_hidden, c.qformer_heads)
        self.cross_attn = BertAttention(c.qformer_hidden, c.vit_width, c.qformer_heads) if cross else None
        self.ffn = QueryFFN(c.qformer_hidden, c.qformer_intermediate)

    def forward(self, h, image_tokens, reference: bool = False):
        h = self.self_attn(h, h, causal=True, reference=reference)
        if self.cross_attn is not None:
            h = self.cross_attn(h, image_tokens, causal=False, reference=reference)
        return self.ffn(h)


class QFormer(nn.Module):
    """image tokens [B, N, vit_width] -> query outputs [B, num_query_tokens, qformer_hidden]."""

    def __init__(self, c: SeedConfig):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_query_tokens, c.qformer_hidden))
        self.norm = nn.LayerNorm(c.qformer_hidden, eps=QFORMER_EPS)
        self.layers = nn.ModuleList(QFormerLayer(c, cross=i % c.cross_attention_freq == 0)
                                    for i in range(c.qformer_layers))

    def forward(self, image_tokens, reference: bool = False):
        h = self.norm(self.query_tokens.expand(image_tokens.shape[0], -1, -1))
        for layer in self.layers:
            h = layer(h, image_tokens, reference)
        return h


# -- codewords -> unCLIP image embedding ----------------------------------------------------------
class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, reference: bool = False):
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(attend(q, k, v, causal=False, reference=reference))


class ViTBlock(nn.Module):
    """timm's pre-norm block (qkv Linear with bias), as blocks_image uses it."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=DECODER_EPS)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=DECODER_EPS)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x, reference: bool = False):
        x = x + self.attn(self.norm1(x), reference)
        return x + self.mlp(self.norm2(x))


class SeedDecoder(nn.Module):
    """codewords [B, num_query_tokens, codebook_dim] -> image embedding [B, image_embed_dim]."""

    def __init__(self, c: SeedConfig):
        super().__init__()
        self.decode_head = nn.Sequential(nn.Linear(c.codebook_dim, c.codebook_dim), nn.Tanh(),
                                         nn.Linear(c.codebook_dim, c.qformer_hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_query_tokens, c.qformer_hidden))
        self.blocks = nn.ModuleList(ViTBlock(c.qformer_hidden, c.decoder_heads, c.decoder_mlp_dim)
                                    for _ in range(c.decoder_depth))
        d1, d2, d3 = c.image_down_dims
        self.down = nn.Sequential(nn.Linear(c.qformer_hidden, d1, bias=False), nn.ReLU(),
                                  nn.Linear(d1, d2, bias=False), nn.ReLU(), nn.Linear(d2, d3, bias=False))
        self.proj = nn.Linear(c.num_query_tokens * d3, c.image_embed_dim)

    def forward(self, codewords, reference: bool = False):
        x = self.decode_head(codewords) + self.pos_embed
        for block in self.blocks:
            x = block(x, reference)
        return self.proj(self.down(x).flatten(1))


class SeedNet(nn.Module):
    """The networks around the quantizer; the codebook and its argmin live with the facade."""

    def __init__(self, config: SeedConfig):
        super().__init__()
        self.config = config
        self.vit = EvaViT(config)
        self.ln_vision = nn.LayerNorm(config.vit_width, eps=LN_VISION_EPS)
        self.qformer = QFormer(config)
        self.encode_head = nn.Sequential(nn.Linear(config.qformer_hidden, config.qformer_hidden), nn.Tanh(),
                                         nn.Linear(config.qformer_hidden, config.codebook_dim))
        self.decoder = SeedDecoder(config)

    def features(self, images: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """Preprocessed images [B, 3, S, S] -> the quantizer's input [B, num_query_tokens, codebook_dim]."""
        tokens = self.vit(images, reference)
        wide = torch.promote_types(tokens.dtype, torch.float32)  # SEED's ln_vision runs in (at least) float32
        tokens = F.layer_norm(tokens.to(wide), tokens.shape[-1:], self.ln_vision.weight.to(wide),
                              self.ln_vision.bias.to(wide), LN_VISION_EPS).to(tokens.dtype)
        return self.encode_head(self.qformer(tokens, reference))

    def embed(self, codewords: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """Codewords [B, num_query_tokens, codebook_dim] -> unCLIP image embedding [B, image_embed_dim]."""
        return self.decoder(codewords, reference)

    def init_random(self, seed: int = 0) -> None:
        """Deterministic random weights (drawn on the CPU) for benchmarks: N(0, 1/fan_in) matrices,
        small random biases, unit LayerNorm weights, N(0, 0.02) embeddings and query tokens."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() >= 2 and not name.endswith(("pos_embed", "cls_token", "query_tokens")):
                    p.copy_(torch.randn(p.shape, generator=generator) * (p[0].numel() ** -0.5))
                elif re.search(r"norm\d?\.weight$|ln_vision\.weight$", name):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


# -- checkpoint names ----------------------------------------------------------------------------------
_QUANTIZER_NAMES = [  # engine name pattern -> published seed_quantizer.pt key
    (r"^qformer\.query_tokens$", "query_tokens"),
    (r"^qformer\.norm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^qformer\.layers\.(\d+)\.self_attn\.(query|key|value)\.", r"Qformer.bert.encoder.layer.\1.attention.self.\2."),
    (r"^qformer\.layers\.(\d+)\.self_attn\.out\.", r"Qformer.bert.encoder.layer.\1.attention.output.dense."),
    (r"^qformer\.layers\.(\d+)\.self_attn\.norm\.", r"Qformer.bert.encoder.layer.\1.attention.output.LayerNorm."),
    (r"^qformer\.layers\.(\d+)\.cross_attn\.(query|key|value)\.",
     r"Qformer.bert.encoder.layer.\1.crossattention.self.\2."),
    (r"^qformer\.layers\.(\d+)\.cross_attn\.out\.", r"Qformer.bert.encoder.layer.\1.crossattention.output.dense."),
    (r"^qformer\.layers\.(\d+)\.cross_attn\.norm\.",
     r"Qformer.bert.encoder.layer.\1.crossattention.output.LayerNorm."),
    (r"^qformer\.layers\.(\d+)\.ffn\.fc1\.", r"Qformer.bert.encoder.layer.\1.intermediate_query.dense."),
    (r"^qformer\.layers\.(\d+)\.ffn\.fc2\.", r"Qformer.bert.encoder.layer.\1.output_query.dense."),
    (r"^qformer\.layers\.(\d+)\.ffn\.norm\.", r"Qformer.bert.encoder.layer.\1.output_query.LayerNorm."),
    (r"^ln_vision\.", "ln_vision."),
    (r"^encode_head\.", "encode_task_layer."),
    (r"^decoder\.decode_head\.", "decode_task_layer."),
    (r"^decoder\.pos_embed$", "pos_embed_image"),
    (r"^decoder\.blocks\.", "blocks_image."),
    (r"^decoder\.down\.", "image_down."),
    (r"^decoder\.proj\.", "distill_image_proj."),
]


def checkpoint_key(name: str) -> tuple[str, str]:
    """(source, key) a parameter of SeedNet loads from: ("vit", key in eva_vit_g.pth) or
    ("quantizer", key in seed_quantizer.pt)."""
    if name.startswith("vit."):
        return "vit", name[len("vit."):]
    for pattern, replacement in _QUANTIZER_NAMES:
        if re.match(pattern, name):
            return "quantizer", re.sub(pattern, replacement, name)
    raise KeyError(f"no checkpoint name for SeedNet parameter {name}")


def load_network(net: SeedNet, quantizer_state: Mapping[str, torch.Tensor],
                 vit_state: Mapping[str, torch.Tensor] | None) -> None:
    """Copies the published tensors into `net`. The ViT reads vit_state (eva_vit_g.pth), overridden
    by any visual_encoder.* tensors of seed_quantizer.pt (SEED's non-strict load does the same).
    Tensors the network does not read (ViT blocks past vit_depth, the recon_s `blocks`, position_ids,
    ...) are ignored. Raises ValueError listing missing and mis-shaped tensors."""
    vit = dict(vit_state or {})
    vit.update({k[len("visual_encoder."):]: v for k, v in quantizer_state.items() if k.startswith("visual_encoder.")})
    sources = {"vit": vit, "quantizer": quantizer_state}
    files = {"vit": "the ViT file (eva_vit_g.pth)", "quantizer": "seed_quantizer.pt"}
    missing, misshaped = [], []
    with torch.no_grad():
        for name, param in net.named_parameters():
            source, key = checkpoint_key(name)
            tensor = sources[source].get(key)
            if tensor is None:
                missing.append(f"{key} ({files[source]})")
            elif tuple(tensor.shape) != tuple(param.shape):
                misshaped.append(f"{key} {tuple(tensor.shape)} (expected {tuple(param.shape)})")
            elif not tensor.dtype.is_floating_point:
                misshaped.append(f"{key} dtype {tensor.dtype} (expected floating point)")
            else:
                param.copy_(tensor)
    if missing or misshaped:
        def listing(names):
            return f"{len(names)} ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else "none"

        raise ValueError(f"SEED checkpoint does not match its config: missing {listing(missing)}; "
                         f"wrong shape {listing(misshaped)}")
