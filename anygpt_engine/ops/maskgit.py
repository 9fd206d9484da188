"""One MaskGIT step of SoundStorm's parallel decoding (AnyGPT's speech de-tokenizer), as one op.

Layout: codes and open_mask [B, N, Q] (frame n, level q), logits [B, N*Q, V] with position
p = n*Q + q, as upstream's ConformerWrapper emits them. Per item b, positions p < lengths[b]*Q
are valid; frames >= prompt_lengths[b] may be re-masked (the prompt is protected).

For every valid position (x = float32 logits row, T = temperature):
  sampled   = counts[b] > 0 or not greedy
  kept      = the `keep` largest x_v, ties to the lowest v   (upstream: top_k, thres 0.7)
  g_v       = float32(-log(-log(u_v + 1e-10) + 1e-10)), computed in float64;
              u from `uniform` or maskgit_uniform(seeds, counter) (the counter-based hash below)
  id        = first argmax of (x_v / max(T, 1e-10) + g_v over kept, -inf elsewhere) if sampled,
              else first argmax of x
  codes     = id where open_mask
When counts[b] = c > 0 (upstream's re-masking, with its rank over all N*Q positions):
  conf      = float32(1 - softmax(kept x)[id]), computed in float64
  chosen    = the c valid positions of highest conf, ties to the lowest p
  open_mask = (chosen or level(p) > `level`) and frame(p) >= prompt_lengths[b]
  codes     = mask id (= V) where open_mask
Positions past lengths[b]*Q are never read or written.

Why float64 for the transcendental parts: exp and log differ by an ulp between libraries, and a
float32 ulp moves argmax and ranking ties. Evaluated in float64 and rounded once, every face
(torch on CPU or GPU, Triton, CUDA) gets the same float32 bits except with probability ~2^-28
per value, so ids and re-mask sets agree exactly; the rest (hash, keep set, division, ties) is
exact by construction. Faces: torch reference (CPU path and oracle), Triton and CUDA C++.
"""

from __future__ import annotations

import math

import torch

from anygpt_engine import tuning
from anygpt_engine.ops import backend as _backend
from anygpt_engine.ops._extension import cuda_stream_handle, dtype_code, extension, on_tensor_device
from anygpt_engine.ops.launches import record
from anygpt_engine.sampling import MASK32, hash32, unit_interval

_SUPPORTED = ("torch", "triton", "cuda")
_PREFERRED_ON_GPU = ("cuda", "triton")
CUDA_MAX_CODEBOOK = 1024  # the CUDA kernel keeps a row in one warp's registers (32 per lane)


def keep_count(codebook_size: int, threshold: float = 0.7) -> int:
    """Logits kept by upstream's top_k filter: ceil((1 - thres) * V), 308 for V = 1024."""
    return math.ceil((1 - threshold) * codebook_size)


# -- the counter-based noise ------------------------------------------------------------------
def maskgit_uniform(seeds: torch.Tensor, counter: int, positions: int, codebook_size: int) -> torch.Tensor:
    """U(0, 1) noise [B, positions, V] (float32) keyed by (item seed, pass counter, position in
    the item, code): an item draws the same noise alone or in any batch, at any padding."""
    seeds = seeds.to(torch.int64)
    item = hash32(hash32((seeds >> 32) ^ 0x9E3779B9) ^ (seeds & MASK32))
    pass_key = hash32(item + counter * 0x632BE5AB + 0x85EBCA6B)
    p = torch.arange(positions, device=seeds.device, dtype=torch.int64)
    row = hash32(pass_key.view(-1, 1) ^ hash32(p + 0x27D4EB2F).view(1, -1))
    v = torch.arange(codebook_size, device=seeds.device, dtype=torch.int64)
    bits = hash32(row.unsqueeze(-1) + v * 0x165667B1)
    return unit_interval(bits)  # 23 bits: never 0 or 1 in float32 (see sampling.unit_interval)


# -- the reference ----------------------------------------------------------------------------
def keep_top(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the `keep` largest values of each row, ties to the lowest index (torch.topk
    leaves tie order unspecified, so the threshold and the tie count are taken explicitly)."""
    kth = x.topk(keep, dim=-1).values[..., -1:]
    greater = x > kth
    equal = x == kth
    need = keep - greater.sum(-1, keepdim=True)
    return greater | (equal & (equal.cumsum(-1) <= need))


def maskgit_step_reference(logits, codes, open_mask, lengths, prompt_lengths, counts, seeds, *, counter: int,
                           temperature: float, greedy: bool, keep: int, level: int,
                           uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable torch version; returns the new (codes, open_mask) without touching its inputs."""
    b, n, q = codes.shape
    v = logits.shape[-1]
    x = logits.float()
    x = x.masked_fill(x.isnan(), -math.inf)  # NaN logits lose, in every face
    kept = keep_top(x, keep)
    if uniform is None:
        uniform = maskgit_uniform(seeds, counter, n * q, v)
    gumbel = (-torch.log(-torch.log(uniform.double() + 1e-10) + 1e-10)).float()
    # A device tensor, not a Python float: CUDA divides by a host scalar via its reciprocal.
    divisor = torch.full((), max(temperature, 1e-10), dtype=torch.float32, device=x.device)
    noisy = torch.where(kept, x / divisor + gumbel, -math.inf)
    sampled = (counts > 0) | (not greedy)
    ids = torch.where(sampled.view(b, 1), noisy.argmax(-1), x.argmax(-1))

    p = torch.arange(n * q, device=x.device)
    valid = p < (lengths * q).view(b, 1)
    new_codes = torch.where(valid & open_mask.view(b, -1), ids, codes.reshape(b, -1))

    x64 = x.double()
    e = torch.where(kept, torch.exp(x64 - x64.amax(-1, keepdim=True)), 0.0)
    prob = e.gather(-1, ids.unsqueeze(-1)).squeeze(-1) / e.sum(-1)
    conf = (1 - prob).float().masked_fill(~valid, -torch.finfo(torch.float32).max)
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    chosen = rank < counts.view(b, 1)
    reopen = (chosen | (p % q > level)) & (p // q >= prompt_lengths.view(b, 1))
    remask = valid & (counts > 0).view(b, 1)
    new_open = torch.where(remask, reopen, open_mask.reshape(b, -1))
    new_codes = torch.where(remask & reopen, v, new_codes)
    return new_codes.view(b, n, q), new_open.view(b, n, q)


# -- checks and dispatch ----------------------------------------------------------------------
def _check(logits, codes, open_mask, lengths, prompt_lengths, counts, seeds, counter, temperature, keep, level,
           uniform):
    for name, t in (("logits", logits), ("codes", codes), ("open_mask", open_mask), ("lengths", lengths),
                    ("prompt_lengths", prompt_lengths), ("counts", counts), ("seeds", seeds)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, expected {logits.device} like logits")
    dtype_code("logits", logits)
    if codes.dim() != 3 or codes.dtype != torch.int64 or not codes.is_contiguous():
        raise ValueError(f"codes: shape {tuple(codes.shape)}, dtype {codes.dtype}: expected a contiguous "
                         "int64 [B, N, Q] tensor")
    b, n, q = codes.shape
    if open_mask.shape != codes.shape or open_mask.dtype != torch.bool or not open_mask.is_contiguous():
        raise ValueError(f"open_mask: shape {tuple(open_mask.shape)}, dtype {open_mask.dtype}: expected a "
                         f"contiguous bool tensor of shape {tuple(codes.shape)} like codes")
    if logits.dim() != 3 or logits.shape[:2] != (b, n * q) or logits.shape[2] < 1 or not logits.is_contiguous():
        raise ValueError(f"logits.shape={tuple(logits.shape)}, expected contiguous [B, N*Q, V] = [{b}, {n * q}, V]")
    for name, t in (("lengths", lengths), ("prompt_lengths", prompt_lengths), ("counts", counts), ("seeds", seeds)):
        if t.shape != (b,) or t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"{name}: shape {tuple(t.shape)}, dtype {t.dtype}: expected a contiguous int64 [{b}]")
    v = logits.shape[2]
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= v:
        raise ValueError(f"keep={keep!r}, expected an int in [1, {v}] (the codebook size)")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < q:
        raise ValueError(f"level={level!r}, expected an int in [0, {q}) (the number of levels)")
    if isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter < 2**31:
        raise ValueError(f"counter={counter!r}, expected an int in [0, 2^31)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature={temperature!r}, expected a finite number >= 0")
    if uniform is not None:
        if not isinstance(uniform, torch.Tensor) or uniform.shape != logits.shape or uniform.dtype != torch.float32:
            got = (f"{uniform.dtype} {tuple(uniform.shape)}" if isinstance(uniform, torch.Tensor)
                   else type(uniform).__name__)
            raise ValueError(f"uniform: expected a float32 tensor of shape {tuple(logits.shape)} like logits, "
                             f"got {got}")
        if uniform.device != logits.device or not uniform.is_contiguous():
            raise ValueError(f"uniform must be contiguous on {logits.device} like logits")


def maskgit_step(logits: torch.Tensor, codes: torch.Tensor, open_mask: torch.Tensor, lengths: torch.Tensor,
                 prompt_lengths: torch.Tensor, counts: torch.Tensor, seeds: torch.Tensor, *, counter: int,
                 temperature: float, greedy: bool, keep: int, level: int = 0, uniform: torch.Tensor | None = None,
                 backend: str | None = None) -> None:
    """One MaskGIT step (see the module docstring), updating codes and open_mask in place.

    A pure function of device tensors and host constants: no host sync, so a generate loop that
    calls it can be captured in a CUDA graph.
    """
    _check(logits, codes, open_mask, lengths, prompt_lengths, counts, seeds, counter, temperature, keep, level,
           uniform)
    face = _backend.choose("maskgit_step", logits.device, backend, _PREFERRED_ON_GPU, _SUPPORTED)
    if face == "cuda" and logits.shape[-1] > CUDA_MAX_CODEBOOK:
        if backend == "cuda":
            raise ValueError(f"logits.shape[-1]={logits.shape[-1]}: the CUDA maskgit_step holds a row in one warp, "
                             f"expected <= {CUDA_MAX_CODEBOOK}")
        face = "triton" if _backend.triton_available() else "torch"
    if face == "torch":
        new_codes, new_open = maskgit_step_reference(logits, codes, open_mask, lengths, prompt_lengths, counts, seeds,
                                                     counter=counter, temperature=temperature, greedy=greedy,
                                                     keep=keep, level=level, uniform=uniform)
        codes.copy_(new_codes)
        open_mask.copy_(new_open)
        return
    _maskgit_step_kernel(logits, codes, open_mask, lengths, prompt_lengths, counts, seeds, uniform, counter,
                         float(temperature), bool(greedy), keep, level, face)


@torch.library.custom_op("anygpt_engine::maskgit_step_kernel", mutates_args=("codes", "open_mask"))
@on_tensor_device
def _maskgit_step_kernel(logits: torch.Tensor, codes: torch.Tensor, open_mask: torch.Tensor, lengths: torch.Tensor,
                         prompt_lengths: torch.Tensor, counts: torch.Tensor, seeds: torch.Tensor,
                         uniform: torch.Tensor | None, counter: int, temperature: float, greedy: bool, keep: int,
                         level: int, face: str) -> None:
    """Launches one kernel face on checked arguments (registered so torch.compile sees it)."""
    record("maskgit_step")
    b, n, q = codes.shape
    # Per-position confidence and per-item arrival counters of the fused selection.
    confidence = torch.empty(b, n * q, dtype=torch.float32, device=logits.device)
    done = torch.zeros(b, dtype=torch.int32, device=logits.device)
    params = tuning.params("maskgit", logits.device)
    divisor = max(temperature, 1e-10)
    if face == "triton":
        from anygpt_engine.kernels import maskgit as triton_maskgit

        triton_maskgit.maskgit_step(logits, codes, open_mask, lengths, prompt_lengths, counts, seeds, uniform,
                                    confidence, done, counter=counter, divisor=divisor, greedy=greedy, keep=keep,
                                    level=level, rows=params["triton_rows"], num_warps=params["triton_num_warps"],
                                    select_block=params["triton_select_block"])
        return
    extension().maskgit_step_cuda(
        codes.data_ptr(), open_mask.data_ptr(), confidence.data_ptr(), done.data_ptr(), logits.data_ptr(),
        dtype_code("logits", logits), uniform.data_ptr() if uniform is not None else 0, lengths.data_ptr(),
        prompt_lengths.data_ptr(), counts.data_ptr(), seeds.data_ptr(), b, n, q, logits.shape[-1], keep, level,
        counter, divisor, greedy, params["cuda_threads"], params["cuda_rows_per_warp"],
        cuda_stream_handle(logits.device))


@_maskgit_step_kernel.register_fake
def _(logits, codes, open_mask, lengths, prompt_lengths, counts, seeds, uniform, counter, temperature, greedy, keep,
      level, face):
    return None
