"""Residual vector quantization (RVQ): encode frames to codes level by level, decode codes to
the sum of their codewords. SpeechTokenizer (8 x 1024 x 1024), EnCodec 32 kHz (4 x 2048 x 128)
and SEED (1 x 8192 x 32) all use it.

The contract (what "the float32 reference" means here)
-------------------------------------------------------
For each level l the residual r (float32; r_0 = float(x), r_{l+1} = r_l - E_l[code], an
elementwise float32 subtraction exactly as speechtokenizer/encodec do it) picks

    code = argmin_j s_j,   ties to the lowest j,
    s_j  = sum_i fl32(r_i - E_lji)^2   accumulated in float64 in ONE fixed order:
           lane t in 0..31 sums i = t, t+32, t+64, ... in increasing i; then the 32 lane sums
           are combined as a butterfly (t + t^16, then ^8, ^4, ^2, ^1).

Each square is exact in float64 (a float32 squared has 48 bits), so fused multiply-adds cannot
change s_j, and the fixed order makes s_j bit-identical in torch, Triton and CUDA. s_j is the
squared norm of the next float32 residual, accurate to ~1e-7 relative: it is ||r||^2 - 2 r.E_j +
||E_j||^2 without the cancellation that the expanded float32 form suffers, so on random and
near-codeword data it picks what speechtokenizer/encodec pick (tests check), and where their
float32 rounding cannot tell two codewords apart it still gives one defined answer.

How the faces find it fast: a candidate search computes approximate distances
A_j = ||E_j||^2 - 2 r.E_j (float32 / tf32 / bf16 dot products), keeps every j with
A_j <= min A + M, and rescores those exactly. M (`margin`, below) bounds the error of the
approximate path, so the exact winner is always among the candidates; a row whose candidates do
not fit the kernel's buffer is rescored against all K codewords. Codes are therefore identical
for every face and every search precision.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from anygpt_engine import tuning
from anygpt_engine.ops import backend as _backend
from anygpt_engine.ops._extension import cuda_stream_handle, dtype_code, extension, on_tensor_device
from anygpt_engine.ops.launches import record

_SUPPORTED = ("torch", "triton", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")
LANES = 32  # lanes of the fixed summation order of the exact score
CUDA_MAX_DIM = 1024  # the CUDA encoder keeps a bf16 copy of its rows' residual in shared memory

# ---- the candidate margin ------------------------------------------------------------------
# The search multiplies r~ = r + dr and E~_j = E_j + dE_j, the operands rounded to the search
# precision (tf32 or bf16, round to nearest, by the engine itself; both zero for fp32), so
#   r~.E~_j - r.E_j = dr.E_j + r.dE_j + dr.dE_j,
# bounded by Cauchy-Schwarz with the *measured* rounding errors: ||dr|| per row (computed where
# the low-precision copy of r is written) and dEmax = max_j ||dE_j|| per level. That is ~6x
# tighter than the textbook 2u * sum|r_i E_ji| and still rigorous. The float32 accumulation of
# D terms adds at most D * 2^-23 * ||r~|| ||E~_j|| (one ulp per term: also covers tensor cores
# that truncate), and rounding A_j = n_j - 2 dot to float32 adds 2^-23 R Emax. So
#   |dot~ - r.E_j| <= e_dot = dR Emax + R dEmax + dR dEmax + D 2^-23 (R + dR)(Emax + dEmax) + 2^-23 R Emax
#   |n_j - ||E_j||^2| <= 2^-22 Emax^2           (float64 sum stored as float32, plus A's rounding)
#   |s_j - ||r - E_j||^2| <= eps_score (R + Emax)^2,  eps_score = 2^-23 + D 2^-52
#                        (each difference rounded to float32, then the float64 sum)
# with R = ||r||, Emax = max_j ||E_j|| rounded up. If j* is the exact winner and m the
# approximate one: A_j* <= A_m + 2 (2 e_dot + 2^-22 Emax^2) + 2 eps_score (R + Emax)^2 = M.
# SAFETY (25%) covers the float32 rounding of R, dR and of M and A_min + M themselves; the last
# term covers underflow (denormal operands or products flushed to zero): 4 D 2^-126 (1 + R + Emax).
SAFETY = 1.25
_U_TORCH = {"fp32": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-8}  # worst case when torch rounds for us


def margin(r_norm, dr_norm, emax, demax, dim: int):
    """Candidate margin M per row; every face evaluates this formula in float32."""
    eps_score = 2.0**-23 + dim * 2.0**-52
    span = r_norm + emax
    e_dot = (dr_norm * emax + r_norm * demax + dr_norm * demax
             + dim * 2.0**-23 * (r_norm + dr_norm) * (emax + demax) + 2.0**-23 * r_norm * emax)
    return (SAFETY * (4.0 * e_dot + 2.0**-21 * emax * emax + 2.0 * eps_score * span * span)
            + dim * 2.0**-124 * (1.0 + span))


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest tf32 value (10 mantissa bits, ties to even), kept in float32. Operands
    that are already tf32 pass through any tensor-core conversion unchanged, so dr and dE are known."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)


# ---- prepared codebooks --------------------------------------------------------------------
class RVQCodebooks:
    """Codebooks [L, K, D] (float32) with what every face needs computed once: squared norms
    (summed in float64, stored float32), the largest norm of each level (rounded up), and
    low-precision copies / the CUDA workspace made on first use. Pass it instead of a raw
    tensor to rvq_encode/rvq_decode to skip that work per call."""

    def __init__(self, codebooks: torch.Tensor):
        if isinstance(codebooks, RVQCodebooks):
            codebooks = codebooks.embed
        if not isinstance(codebooks, torch.Tensor):
            raise TypeError(f"codebooks must be a torch.Tensor [L, K, D], got {type(codebooks).__name__}")
        if codebooks.dim() != 3:
            raise ValueError(f"codebooks.shape={tuple(codebooks.shape)}, expected [levels, codebook_size, dim]")
        if 0 in codebooks.shape:
            raise ValueError(f"codebooks.shape={tuple(codebooks.shape)}, expected every size > 0")
        if codebooks.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"codebooks.dtype={codebooks.dtype}, expected float32 (float16/bfloat16 are widened)")
        if codebooks.numel() >= 2**31:
            raise ValueError(f"codebooks.shape={tuple(codebooks.shape)} has {codebooks.numel()} values, expected "
                             "fewer than 2^31 (the kernels index codebooks with 32-bit offsets)")
        embed = codebooks.detach().to(torch.float32).contiguous()
        if not bool(torch.isfinite(embed).all()):
            raise ValueError("codebooks contain NaN or inf values, expected finite codewords")
        norms64 = embed.double().pow(2).sum(-1)
        self.embed = embed
        self.norms = norms64.float()
        # sqrt in float64, then a relative nudge larger than float32's rounding: an upper bound.
        self.emax = (norms64.max(-1).values.sqrt() * (1.0 + 2.0**-20)).float()
        self._low: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cuda_workspace: torch.Tensor | None = None

    levels = property(lambda self: self.embed.shape[0])
    codebook_size = property(lambda self: self.embed.shape[1])
    dim = property(lambda self: self.embed.shape[2])
    device = property(lambda self: self.embed.device)

    def __repr__(self) -> str:
        return (f"RVQCodebooks(levels={self.levels}, codebook_size={self.codebook_size}, dim={self.dim}, "
                f"device={self.device})")

    def to(self, device: torch.device | str) -> "RVQCodebooks":
        return self if torch.device(device) == self.device else RVQCodebooks(self.embed.to(device))

    def low_precision(self, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(codebooks rounded to nearest for the search precision, dEmax [L] rounded up), cached.
        fp32 searches use the codebooks themselves (dEmax = 0)."""
        if precision not in self._low:
            if precision == "fp32":
                low, wide = self.embed, self.embed
            elif precision == "tf32":
                low = wide = round_tf32(self.embed)
            else:
                low = self.embed.to(torch.bfloat16)
                wide = low.float()
            err = (wide.double() - self.embed.double()).pow(2).sum(-1).max(-1).values.sqrt()
            self._low[precision] = (low, (err * (1.0 + 2.0**-20)).float())
        return self._low[precision]

    def cuda_workspace(self) -> torch.Tensor:
        """bf16 copy, norms and per-level max norm in the layout the CUDA kernel reads, cached.
        Prepared on the codebooks' GPU whichever is current, and never during graph capture, where
        the preparation would only be recorded and every later eager encode would read garbage."""
        if self._cuda_workspace is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("rvq_encode's first CUDA call on these codebooks came during CUDA graph capture: "
                                   "run one encode before capturing (it prepares the codebooks' workspace)")
            ext = extension()
            size = ext.rvq_workspace_bytes(self.levels, self.codebook_size, self.dim)
            with torch.cuda.device(self.device):
                ws = torch.empty(size, dtype=torch.uint8, device=self.device)
                ext.rvq_prepare_cuda(ws.data_ptr(), size, self.embed.data_ptr(), self.levels, self.codebook_size,
                                     self.dim, cuda_stream_handle(self.device))
            self._cuda_workspace = ws
        return self._cuda_workspace

    def encode(self, x: torch.Tensor, **kwargs):
        return rvq_encode(x, self, **kwargs)

    def decode(self, codes: torch.Tensor, **kwargs) -> torch.Tensor:
        return rvq_decode(codes, self, **kwargs)


def as_codebooks(codebooks) -> RVQCodebooks:
    return codebooks if isinstance(codebooks, RVQCodebooks) else RVQCodebooks(codebooks)


class RVQEncoding(NamedTuple):
    codes: torch.Tensor  # [L, N] or [L, B, T], int64
    quantized: torch.Tensor | None  # sum of the chosen codewords, shaped like x, float32
    residual: torch.Tensor | None  # x - quantized as the level-by-level float32 residual


# ---- torch reference ----------------------------------------------------------------------
def exact_scores(r: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """s = sum_i fl32(r_i - e_i)^2 in float64, in the fixed lane/butterfly order (see module doc).
    r, e: [P, D] float32 -> [P] float64."""
    dim = r.shape[-1]
    diff = r - e  # float32 subtraction, as the residual update does it
    pad = (-dim) % LANES
    if pad:
        diff = torch.nn.functional.pad(diff, (0, pad))
    sq = diff.double().square().view(diff.shape[0], -1, LANES)
    acc = torch.zeros(diff.shape[0], LANES, dtype=torch.float64, device=r.device)
    for k in range(sq.shape[1]):  # lane t sums its elements in increasing order
        acc = acc + sq[:, k]
    width = LANES // 2
    while width:  # butterfly: t + (t ^ width)
        acc = acc[:, :width] + acc[:, width: 2 * width]
        width //= 2
    return acc[:, 0]


def _pick(rows: torch.Tensor, js: torch.Tensor, scores: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Per row, the candidate j of smallest score, ties to the lowest j; 0 for rows without one."""
    device = scores.device
    best_s = torch.full((n,), math.inf, dtype=torch.float64, device=device)
    best_s.scatter_reduce_(0, rows, scores, "amin")
    winners = scores == best_s[rows]
    best = torch.full((n,), k, dtype=torch.int64, device=device)
    best.scatter_reduce_(0, rows[winners], js[winners], "amin")
    return torch.where(best == k, 0, best)


def _search_precision_of_torch_matmul() -> str:
    # A float32 matmul may run on tf32/bf16 units when torch is told it may.
    return {"highest": "fp32", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]


def rvq_encode_reference(x: torch.Tensor, codebooks, *, precision: str | None = None) -> RVQEncoding:
    """Readable torch version of the contract: x [N, D] -> (codes [L, N], quantized, residual)."""
    cb = as_codebooks(codebooks)
    precision = precision or _search_precision_of_torch_matmul()
    n, dim = x.shape
    r = x.to(torch.float32).clone()
    quantized = torch.zeros_like(r)
    codes = torch.empty(cb.levels, n, dtype=torch.int64, device=x.device)
    pairs_per_chunk = max(1, (1 << 22) // dim)
    for level in range(cb.levels):
        embed = cb.embed[level]
        approx = cb.norms[level] - 2.0 * (r @ embed.t())
        r_norm = torch.linalg.vector_norm(r, dim=1)
        emax = float(cb.emax[level])
        u = _U_TORCH[precision]  # torch's rounding errors are not visible: charge the worst case
        thr = approx.min(dim=1).values + margin(r_norm, u * r_norm, emax, u * emax, dim)
        rows, js = (approx <= thr[:, None]).nonzero(as_tuple=True)
        scores = torch.cat([exact_scores(r[rows[i:i + pairs_per_chunk]], embed[js[i:i + pairs_per_chunk]])
                            for i in range(0, rows.numel(), pairs_per_chunk)] or
                           [torch.empty(0, dtype=torch.float64, device=x.device)])
        best = _pick(rows, js, scores, n, cb.codebook_size)
        codes[level] = best
        chosen = embed[best]
        r = r - chosen
        quantized = quantized + chosen
    return RVQEncoding(codes, quantized, r)


def rvq_decode_reference(codes: torch.Tensor, codebooks, first_level: int = 0) -> torch.Tensor:
    """sum over i of codebooks[first_level + i][codes[i]], added in level order from 0.0
    (speechtokenizer/encodec's order, so results are bit-identical). codes [L', N] -> [N, D]."""
    cb = as_codebooks(codebooks)
    out = torch.zeros(codes.shape[1], cb.dim, dtype=torch.float32, device=codes.device)
    for i in range(codes.shape[0]):
        out = out + cb.embed[first_level + i][codes[i]]
    return out


# ---- argument checks ------------------------------------------------------------------------
def _check_x(x: torch.Tensor, cb: RVQCodebooks) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x.shape={tuple(x.shape)}, expected [N, D] or [B, T, D]")
    dtype_code("x", x)
    if x.shape[-1] != cb.dim:
        raise ValueError(f"x.shape={tuple(x.shape)}: last dimension {x.shape[-1]}, expected D={cb.dim} "
                         f"like codebooks {tuple(cb.embed.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x.shape={tuple(x.shape)} is empty, expected at least one frame")
    if x.device != cb.device:
        raise ValueError(f"x is on {x.device}, expected {cb.device} like codebooks")


def _check_codes(codes: torch.Tensor, cb: RVQCodebooks, first_level: int, check_range: bool) -> None:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"codes.dtype={codes.dtype}, expected an integer dtype (int64)")
    if codes.dim() not in (2, 3):
        raise ValueError(f"codes.shape={tuple(codes.shape)}, expected [levels, N] or [levels, B, T]")
    if codes.numel() == 0:
        raise ValueError(f"codes.shape={tuple(codes.shape)} is empty, expected at least one level and frame")
    if isinstance(first_level, bool) or not isinstance(first_level, int) or first_level < 0:
        raise ValueError(f"first_level={first_level!r}, expected an int >= 0")
    if first_level + codes.shape[0] > cb.levels:
        raise ValueError(f"codes.shape[0]={codes.shape[0]} levels from first_level={first_level} exceed the "
                         f"{cb.levels} levels of codebooks")
    if codes.device != cb.device:
        raise ValueError(f"codes is on {codes.device}, expected {cb.device} like codebooks")
    if check_range:
        bad = (codes < 0) | (codes >= cb.codebook_size)
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            raise ValueError(f"codes{where}={codes[tuple(where)].item()} is out of range, expected "
                             f"0 <= code < {cb.codebook_size}")


def _check_precision(precision: str | None) -> None:
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}, expected one of {PRECISIONS}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- encode ---------------------------------------------------------------------------------
def rvq_encode(x: torch.Tensor, codebooks, *, return_quantized: bool = False, return_residual: bool = False,
               precision: str | None = None, backend: str | None = None):
    """RVQ codes of x [N, D] (or [B, T, D]) against codebooks [L, K, D] (tensor or RVQCodebooks).

    Returns codes [L, N] (or [L, B, T]) int64; with return_quantized / return_residual an
    RVQEncoding (codes, quantized, residual), the float32 sum of chosen codewords and the final
    residual shaped like x (the unrequested one is None). `precision` picks the candidate search
    ("fp32", "tf32", "bf16"; default from the tuning table): codes do not depend on it.
    x may be float32, float16 or bfloat16 and strided; the arithmetic is float32 (see module doc).
    """
    cb = as_codebooks(codebooks)
    _check_x(x, cb)
    _check_precision(precision)
    params = tuning.params("rvq", x.device)
    face = _backend.choose("rvq_encode", x.device, backend, tuple(params["encode_faces"]), _SUPPORTED)
    if face == "cuda" and cb.dim > CUDA_MAX_DIM:
        if backend == "cuda":
            raise ValueError(f"codebooks dim={cb.dim}: the CUDA rvq_encode holds rows of at most "
                             f"{CUDA_MAX_DIM} values in shared memory")
        face = "triton" if _backend.triton_available() else "torch"
    x2 = x.reshape(-1, cb.dim)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < cb.dim):  # e.g. broadcast rows
        x2 = x2.contiguous()
    if face == "torch":
        codes, quantized, residual = rvq_encode_reference(x2, cb, precision=precision)
    else:
        n = x2.shape[0]
        codes = torch.empty(cb.levels, n, dtype=torch.int64, device=x.device)
        residual = torch.empty(n, cb.dim, dtype=torch.float32, device=x.device)
        # Zero-filled: level 0 adds its codeword to 0.0 exactly like the reference.
        quantized = torch.zeros_like(residual) if return_quantized else None
        if face == "triton":
            prec = precision or params["triton_precision"]
            low, demax = cb.low_precision(prec)
            # Searches on float32 operands (fp32, tf32) take narrower tiles to stay in registers.
            block_n = params["triton_block_n" if prec == "bf16" else "triton_fp32_block_n"]
            from anygpt_engine.kernels.rvq import tma_compatible

            _rvq_encode_triton(codes, residual, quantized, x2, cb.embed, low, cb.norms, cb.emax, demax, prec,
                               params["triton_block_m"], block_n, params["triton_block_k"],
                               params["triton_candidates"], params["triton_num_warps"], params["triton_num_stages"],
                               params["triton_tma"] and tma_compatible(low))
        else:
            _rvq_encode_cuda(codes, residual, quantized, x2, cb.embed, cb.cuda_workspace())
    lead = x.shape[:-1]
    codes = codes.view(cb.levels, *lead)
    if not (return_quantized or return_residual):
        return codes
    return RVQEncoding(codes, quantized.view(x.shape) if return_quantized else None,
                       residual.view(x.shape) if return_residual else None)


@torch.library.custom_op("anygpt_engine::rvq_encode_triton", mutates_args=("codes", "residual", "quantized"))
@on_tensor_device
def _rvq_encode_triton(codes: torch.Tensor, residual: torch.Tensor, quantized: torch.Tensor | None, x: torch.Tensor,
                       embed: torch.Tensor, low: torch.Tensor, norms: torch.Tensor, emax: torch.Tensor,
                       demax: torch.Tensor, precision: str, block_m: int, block_n: int, block_k: int, candidates: int,
                       num_warps: int, num_stages: int, tma: bool) -> None:
    from anygpt_engine.kernels import rvq as triton_rvq

    record("rvq_encode")
    triton_rvq.rvq_encode(codes, residual, quantized, x, embed, low, norms, emax, demax, precision=precision,
                          dot_in_fp32=_interpreting(), block_m=block_m, block_n=block_n, block_k=block_k,
                          candidates=candidates, num_warps=num_warps, num_stages=num_stages, tma=tma)


@_rvq_encode_triton.register_fake
def _(codes, residual, quantized, x, embed, low, norms, emax, demax, precision, block_m, block_n, block_k, candidates,
      num_warps, num_stages, tma):
    return None


@torch.library.custom_op("anygpt_engine::rvq_encode_cuda", mutates_args=("codes", "residual", "quantized"))
@on_tensor_device
def _rvq_encode_cuda(codes: torch.Tensor, residual: torch.Tensor, quantized: torch.Tensor | None, x: torch.Tensor,
                     embed: torch.Tensor, workspace: torch.Tensor) -> None:
    record("rvq_encode")
    levels, size, dim = embed.shape
    extension().rvq_encode_cuda(codes.data_ptr(), residual.data_ptr(), quantized.data_ptr() if quantized is not None
                                else 0, x.data_ptr(), x.stride(0), dtype_code("x", x), embed.data_ptr(),
                                workspace.data_ptr(), workspace.numel(), x.shape[0], dim, levels, size,
                                cuda_stream_handle(x.device))


@_rvq_encode_cuda.register_fake
def _(codes, residual, quantized, x, embed, workspace):
    return None


# ---- decode ---------------------------------------------------------------------------------
def rvq_decode(codes: torch.Tensor, codebooks, *, first_level: int = 0, out: torch.Tensor | None = None,
               check_codes: bool = True, backend: str | None = None) -> torch.Tensor:
    """Sum of the selected codewords: codes [L', N] (or [L', B, T]) -> [N, D] (or [B, T, D]) float32,
    level i of codes indexing codebooks[first_level + i] (SoundStorm decodes levels 0..7, the LLM
    sees level 0 alone). The sum runs in level order from 0.0, bit-identical to the reference.

    check_codes=True raises on a code outside [0, K) (one device sync); with False (e.g. inside
    a CUDA graph) the kernels write NaN rows for such codes instead of reading out of bounds."""
    cb = as_codebooks(codebooks)
    _check_codes(codes, cb, first_level, check_codes)
    lead = codes.shape[1:]
    if out is not None:
        expected = (*lead, cb.dim)
        if tuple(out.shape) != expected:
            raise ValueError(f"out.shape={tuple(out.shape)}, expected {expected}")
        if out.dtype != torch.float32:
            raise TypeError(f"out.dtype={out.dtype}, expected torch.float32")
        if out.device != cb.device:
            raise ValueError(f"out is on {out.device}, expected {cb.device} like codebooks")
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous (it is written in place), got strides {out.stride()}")
    faces = tuple(tuning.params("rvq", cb.device)["decode_faces"])
    face = _backend.choose("rvq_decode", cb.device, backend, faces, _SUPPORTED)
    codes2 = codes.reshape(codes.shape[0], -1)
    if codes2.dtype != torch.int64 or not codes2.is_contiguous():
        codes2 = codes2.to(torch.int64).contiguous()
    result = out if out is not None else torch.empty(*lead, cb.dim, dtype=torch.float32, device=cb.device)
    flat = result.view(-1, cb.dim)
    if face == "torch" and check_codes:
        flat.copy_(rvq_decode_reference(codes2, cb, first_level))
    elif face == "torch":
        valid = (codes2 >= 0) & (codes2 < cb.codebook_size)
        decoded = rvq_decode_reference(torch.where(valid, codes2, 0), cb, first_level)
        flat.copy_(torch.where(valid.all(0)[:, None], decoded, math.nan))
    elif face == "triton":
        _rvq_decode_triton(flat, codes2, cb.embed, first_level, tuning.params("rvq", cb.device)["decode_block_d"])
    else:
        _rvq_decode_cuda(flat, codes2, cb.embed, first_level)
    return result


@torch.library.custom_op("anygpt_engine::rvq_decode_triton", mutates_args=("out",))
@on_tensor_device
def _rvq_decode_triton(out: torch.Tensor, codes: torch.Tensor, embed: torch.Tensor, first_level: int,
                       block_d: int) -> None:
    from anygpt_engine.kernels import rvq as triton_rvq

    record("rvq_decode")
    triton_rvq.rvq_decode(out, codes, embed, first_level, block_d=block_d)


@_rvq_decode_triton.register_fake
def _(out, codes, embed, first_level, block_d):
    return None


@torch.library.custom_op("anygpt_engine::rvq_decode_cuda", mutates_args=("out",))
@on_tensor_device
def _rvq_decode_cuda(out: torch.Tensor, codes: torch.Tensor, embed: torch.Tensor, first_level: int) -> None:
    record("rvq_decode")
    levels, size, dim = embed.shape
    extension().rvq_decode_cuda(out.data_ptr(), codes.data_ptr(), embed.data_ptr(), codes.shape[1], dim,
                                codes.shape[0], first_level, levels, size, cuda_stream_handle(out.device))


@_rvq_decode_cuda.register_fake
def _(out, codes, embed, first_level):
    return None
