"""Ops of anygpt_engine: each module has a torch reference and picks its face in one place
(ops.backend.choose). Callers use these functions, never the kernels directly."""

from anygpt_engine.ops.attention import paged_decode_attention, rope_kv_append, varlen_attention
from anygpt_engine.ops.gemv import linear, linear_reference, linear_rope_kv_append
from anygpt_engine.ops.launches import count_launches
from anygpt_engine.ops.lm_head import lm_head
from anygpt_engine.ops.maskgit import keep_count, maskgit_step, maskgit_step_reference, maskgit_uniform
from anygpt_engine.ops.rms_norm import rms_norm, rms_norm_reference
from anygpt_engine.ops.rvq import (RVQCodebooks, RVQEncoding, rvq_decode, rvq_decode_reference, rvq_encode,
                                   rvq_encode_reference)
from anygpt_engine.ops.sampling import sample_tokens, sample_tokens_reference
from anygpt_engine.ops.soundstorm import add_layer_norm, code_embedding, conformer_conv, grouped_linear

__all__ = [
    "RVQCodebooks", "RVQEncoding", "add_layer_norm", "code_embedding", "conformer_conv", "count_launches",
    "grouped_linear", "keep_count", "linear", "linear_reference", "linear_rope_kv_append", "lm_head", "maskgit_step", "maskgit_step_reference", "maskgit_uniform", "paged_decode_attention",
    "rms_norm", "rms_norm_reference", "rope_kv_append", "rvq_decode", "rvq_decode_reference", "rvq_encode",
    "rvq_encode_reference", "sample_tokens", "sample_tokens_reference", "varlen_attention",
]
