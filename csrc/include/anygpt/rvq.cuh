// Residual vector quantization: host launchers (plain C++ declarations, usable from .cpp files)
// and, for nvcc, the raw-pointer kernels. The contract (exact score, fixed summation order,
// candidate margin) is documented in anygpt_engine/ops/rvq.py; this file implements it.
//
// Encode: one CTA owns kBlockM rows for all levels. Their residual lives in global memory
// (float32, written and re-read by the same CTA, so it stays in L2) and as a bf16 copy in
// shared memory, the A operand of a bf16 WMMA distance tile against kBlockN codewords at a
// time (bf16 codebook copy streamed with cp.async, double buffered). Four threads per row keep
// the kCandidates smallest approximate distances of their columns in registers; afterwards a
// warp per row rescores the candidates within the margin exactly (float64, fixed order) or,
// if a thread dropped a value within the margin, all K codewords. Then it updates the residual,
// its bf16 copy, the quantized sum and the row's norms for the next level's margin.
#pragma once
#include <cstddef>
#include <cstdint>

#include "anygpt/c_api.h"

namespace anygpt {
namespace rvq {

constexpr int kMaxDim = 1024;  // the bf16 residual rows must fit in shared memory
constexpr int kBlockM = 64;    // rows per CTA
constexpr int kBlockN = 64;    // codewords per distance tile
constexpr int kBlockK = 64;    // dimensions per streamed codebook tile
constexpr int kThreads = 256;  // 8 warps
constexpr int kThreadsPerRow = kThreads / kBlockM;
constexpr int kCandidates = 8;  // per thread, so up to 32 per row
constexpr int kSkew = 8;        // bf16 padding per shared-memory row against bank conflicts

inline int64_t padded_dim(int64_t dim) { return (dim + kBlockK - 1) / kBlockK * kBlockK; }

// Workspace written by prepare and read by encode: bf16 codebooks [L][K][Dp] (Dp = padded_dim,
// zero padded), float norms [L][K] (float64 sums), and per level the largest codeword norm and
// the largest norm of a codeword's bf16 rounding error, both rounded up (as float bits).
struct WorkspaceLayout {
  size_t low, norms, emax, demax, bytes;
};
WorkspaceLayout workspace_layout(int64_t levels, int64_t size, int64_t dim);

// Argument checks shared by the entry points (defined in rvq_cpu.cpp).
anygpt_status check_codebook_args(const char* op, const void* codebooks, int64_t levels, int64_t size, int64_t dim);
anygpt_status check_workspace_args(const char* op, const void* workspace, size_t workspace_bytes, int64_t levels,
                                   int64_t size, int64_t dim);

// Host launchers (defined in rvq.cu); arguments are checked by the C ABI before they run.
anygpt_status launch_prepare(void* workspace, const float* codebooks, int64_t levels, int64_t size, int64_t dim,
                             void* stream);
anygpt_status launch_encode(int64_t* codes, float* residual, float* quantized, const void* x, int64_t x_row_stride,
                            anygpt_dtype x_dtype, const float* codebooks, const void* workspace, int64_t rows,
                            int64_t dim, int64_t levels, int64_t size, void* stream);
anygpt_status launch_decode(float* out, const int64_t* codes, const float* codebooks, int64_t rows, int64_t dim,
                            int64_t levels, int64_t first_level, int64_t size, void* stream);

}  // namespace rvq
}  // namespace anygpt

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cfloat>

#include "anygpt/cuda_float.cuh"

namespace anygpt {
namespace rvq {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ double warp_sum_butterfly(double v) {
  // The contract's order: t + (t ^ 16), then ^8, ^4, ^2, ^1; every lane ends with the same sum.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = __dadd_rn(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Candidate margin per row: ops.rvq.margin, term for term (derivation there).
__device__ __forceinline__ float row_margin(float r, float dr, float emax, float demax, int dim) {
  const float u23 = 1.1920928955078125e-07f;  // 2^-23
  const float eps_score = u23 + static_cast<float>(dim) * 2.220446049250313e-16f;
  const float span = r + emax;
  const float e_dot = dr * emax + r * demax + dr * demax + static_cast<float>(dim) * u23 * (r + dr) * (emax + demax) +
                      u23 * r * emax;
  return 1.25f * (4.0f * e_dot + 4.76837158203125e-07f * emax * emax + 2.0f * eps_score * span * span) +
         static_cast<float>(dim) * 4.70197740328915e-38f * (1.0f + span);
}

// Keeps v[0..kCandidates) ascending; whatever falls out (or never gets in) lowers `dropped`.
__device__ __forceinline__ void insert_candidate(float a, int j, float (&v)[kCandidates], int (&ix)[kCandidates],
                                                 float& dropped) {
  if (!(a < v[kCandidates - 1])) {
    dropped = fminf(dropped, a);
    return;
  }
  dropped = fminf(dropped, v[kCandidates - 1]);
  v[kCandidates - 1] = a;
  ix[kCandidates - 1] = j;
#pragma unroll
  for (int i = kCandidates - 1; i > 0; --i) {
    if (v[i] < v[i - 1]) {
      const float tv = v[i];
      v[i] = v[i - 1];
      v[i - 1] = tv;
      const int ti = ix[i];
      ix[i] = ix[i - 1];
      ix[i - 1] = ti;
    }
  }
}

// Exact score of codeword `e` against the row held as r[k] = residual[lane + 32 k] (fixed order).
__device__ __forceinline__ double exact_score(const float (&r)[kMaxDim / 32], const float* __restrict__ e, int dim,
                                              int lane) {
  double acc = 0.0;
#pragma unroll
  for (int k = 0; k < kMaxDim / 32; ++k) {
    const int i = lane + 32 * k;
    if (i < dim) {
      const double d = static_cast<double>(__fsub_rn(r[k], __ldg(e + i)));
      acc = __dadd_rn(acc, __dmul_rn(d, d));  // d*d is exact: no rounding to reorder
    }
  }
  return warp_sum_butterfly(acc);
}

// Prepare: one warp per codeword writes its bf16 copy (zero padded to Dp), its norm, and raises
// the level's max norm and max rounding-error norm (non-negative float bits order as unsigned).
__global__ void __launch_bounds__(kThreads)
    prepare_kernel(__nv_bfloat16* __restrict__ low, float* __restrict__ norms, unsigned* __restrict__ emax_bits,
                   unsigned* __restrict__ demax_bits, const float* __restrict__ codebooks, int64_t levels,
                   int64_t size, int dim, int dim_pad) {
  const int lane = threadIdx.x % 32;
  const int64_t word = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (word >= levels * size) return;
  const float* e = codebooks + word * dim;
  __nv_bfloat16* out = low + word * dim_pad;
  double norm2 = 0.0, err2 = 0.0;
  for (int i = lane; i < dim_pad; i += 32) {
    const float v = i < dim ? e[i] : 0.0f;
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    out[i] = b;
    const double d = static_cast<double>(__bfloat162float(b)) - static_cast<double>(v);
    norm2 += static_cast<double>(v) * v;
    err2 += d * d;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    norm2 += __shfl_xor_sync(kFullMask, norm2, offset);
    err2 += __shfl_xor_sync(kFullMask, err2, offset);
  }
  if (lane == 0) {
    const int64_t level = word / size;
    norms[word] = static_cast<float>(norm2);
    // sqrt in float64, nudged up by more than float32's rounding: upper bounds.
    atomicMax(emax_bits + level, __float_as_uint(static_cast<float>(sqrt(norm2) * (1.0 + 0x1p-20))));
    atomicMax(demax_bits + level, __float_as_uint(static_cast<float>(sqrt(err2) * (1.0 + 0x1p-20))));
  }
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* global, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

struct EncodeArgs {
  int64_t* codes;
  float* residual;
  float* quantized;  // may be null
  const void* x;
  int64_t x_row_stride;
  const float* codebooks;
  const __nv_bfloat16* low;
  const float* norms;
  const float* emax;
  const float* demax;
  int64_t rows;
  int dim, dim_pad, levels, size;
};

// Shared memory: bf16 residual rows [kBlockM][Dp + kSkew], two codebook tiles
// [kBlockN][kBlockK + kSkew], the distance tile [kBlockM][kBlockN + 4] (float), then per row
// the norms and the candidate list.
constexpr int kTileLd = kBlockK + kSkew;
constexpr int kDistLd = kBlockN + 4;
constexpr int kRowCandidates = kThreadsPerRow * kCandidates;

inline size_t encode_smem_bytes(int dim_pad) {
  return static_cast<size_t>(kBlockM) * (dim_pad + kSkew) * 2 + 2ull * kBlockN * kTileLd * 2 +
         static_cast<size_t>(kBlockM) * kDistLd * 4 + static_cast<size_t>(kBlockM) * (3 * 4 + kRowCandidates * 4);
}

template <typename TX>
__global__ void __launch_bounds__(kThreads) encode_kernel(EncodeArgs p) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  const int a_ld = p.dim_pad + kSkew;
  __nv_bfloat16* a_tile = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* b_tile = a_tile + kBlockM * a_ld;  // [2][kBlockN][kTileLd]
  float* dist = reinterpret_cast<float*>(b_tile + 2 * kBlockN * kTileLd);
  float* row_norm = dist + kBlockM * kDistLd;
  float* row_err = row_norm + kBlockM;
  int* row_over = reinterpret_cast<int*>(row_err + kBlockM);
  int* cand = row_over + kBlockM;  // [kBlockM][kRowCandidates]

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int dim = p.dim;

  // Rows past the end and the padded columns must be zero in the A operand; rows past the end
  // keep zero norms (their thresholds are computed, never used).
  for (int i = tid; i < kBlockM * a_ld; i += kThreads) a_tile[i] = __float2bfloat16_rn(0.0f);
  for (int i = tid; i < kBlockM; i += kThreads) row_norm[i] = row_err[i] = 0.0f;
  __syncthreads();

  // r_0 = float(x): a warp per row writes the float32 residual, its bf16 copy and the norms.
  const TX* x = static_cast<const TX*>(p.x);
  for (int rr = warp; rr < kBlockM; rr += kThreads / 32) {
    const int64_t n = row0 + rr;
    if (n >= p.rows) continue;
    float norm2 = 0.0f, err2 = 0.0f;
    for (int i = lane; i < dim; i += 32) {
      const float v = to_float(x[n * p.x_row_stride + i]);
      p.residual[n * dim + i] = v;
      const __nv_bfloat16 b = __float2bfloat16_rn(v);
      a_tile[rr * a_ld + i] = b;
      const float d = __bfloat162float(b) - v;
      norm2 += v * v;
      err2 += d * d;
    }
    norm2 = warp_sum(norm2);
    err2 = warp_sum(err2);
    if (lane == 0) {
      row_norm[rr] = norm2;
      row_err[rr] = err2;
    }
  }
  __syncthreads();

  const int my_row = tid / kThreadsPerRow;  // the 4 threads of a row are adjacent lanes
  const int my_sub = tid % kThreadsPerRow;
  const int warp_m = warp % (kBlockM / 16);  // WMMA: 4 row blocks x 2 column halves of 32
  const int warp_n = warp / (kBlockM / 16);
  const int k_tiles = p.dim_pad / kBlockK;

  for (int level = 0; level < p.levels; ++level) {
    const int64_t level_words = static_cast<int64_t>(level) * p.size;
    const __nv_bfloat16* low_l = p.low + level_words * p.dim_pad;
    const float* cb_l = p.codebooks + level_words * dim;
    const float* norms_l = p.norms + level_words;

    float v[kCandidates];
    int ix[kCandidates];
#pragma unroll
    for (int i = 0; i < kCandidates; ++i) {
      v[i] = INFINITY;
      ix[i] = p.size;
    }
    float dropped = INFINITY;

    for (int n0 = 0; n0 < p.size; n0 += kBlockN) {
      // Codebook tile (kBlockN words x kBlockK dims of bf16 = 8 chunks of 16 bytes per word).
      auto load_tile = [&](int stage, int k0) {
        __nv_bfloat16* dst = b_tile + stage * kBlockN * kTileLd;
        for (int c = tid; c < kBlockN * (kBlockK / 8); c += kThreads) {
          const int w = c / (kBlockK / 8);
          const int part = c % (kBlockK / 8);
          const bool valid = n0 + w < p.size;
          const __nv_bfloat16* src = valid ? low_l + static_cast<int64_t>(n0 + w) * p.dim_pad + k0 + part * 8 : p.low;
          cp_async_16(dst + w * kTileLd + part * 8, src, valid);
        }
        cp_async_commit();
      };
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
      wmma::fill_fragment(acc[0], 0.0f);
      wmma::fill_fragment(acc[1], 0.0f);
      load_tile(0, 0);
      for (int kt = 0; kt < k_tiles; ++kt) {
        if (kt + 1 < k_tiles) {
          load_tile((kt + 1) & 1, (kt + 1) * kBlockK);
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
        const __nv_bfloat16* bt = b_tile + (kt & 1) * kBlockN * kTileLd;
#pragma unroll
        for (int kk = 0; kk < kBlockK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, a_tile + warp_m * 16 * a_ld + kt * kBlockK + kk, a_ld);
#pragma unroll
          for (int f = 0; f < 2; ++f) {
            // B = tile^T: element (k, n) sits at bt[n * kTileLd + k], i.e. column major.
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, bt + (warp_n * 32 + f * 16) * kTileLd + kk, kTileLd);
            wmma::mma_sync(acc[f], fa, fb, acc[f]);
          }
        }
        __syncthreads();  // this stage is refilled two iterations later
      }
#pragma unroll
      for (int f = 0; f < 2; ++f)
        wmma::store_matrix_sync(dist + warp_m * 16 * kDistLd + warp_n * 32 + f * 16, acc[f], kDistLd,
                                wmma::mem_row_major);
      __syncthreads();
      // Approximate distance A_j = ||E_j||^2 - 2 r.E_j, folded into this thread's candidates.
#pragma unroll 4
      for (int c = my_sub; c < kBlockN; c += kThreadsPerRow) {
        const int j = n0 + c;
        if (j < p.size) insert_candidate(__ldg(norms_l + j) - 2.0f * dist[my_row * kDistLd + c], j, v, ix, dropped);
      }
      __syncthreads();  // the distance tile is rewritten by the next chunk
    }

    // Threshold = row minimum + margin; publish the candidates within it.
    float best_a = v[0];
    best_a = fminf(best_a, __shfl_xor_sync(kFullMask, best_a, 1));
    best_a = fminf(best_a, __shfl_xor_sync(kFullMask, best_a, 2));
    const float thr = best_a + row_margin(sqrtf(row_norm[my_row]), sqrtf(row_err[my_row]), __ldg(p.emax + level),
                                          __ldg(p.demax + level), dim);
    int over = dropped <= thr;
    over |= __shfl_xor_sync(kFullMask, over, 1);
    over |= __shfl_xor_sync(kFullMask, over, 2);
#pragma unroll
    for (int i = 0; i < kCandidates; ++i)
      cand[my_row * kRowCandidates + my_sub * kCandidates + i] = (v[i] <= thr && ix[i] < p.size) ? ix[i] : -1;
    if (my_sub == 0) row_over[my_row] = over;
    __syncthreads();

    // A warp per row: exact rescoring, then the residual update.
    for (int rr = warp; rr < kBlockM; rr += kThreads / 32) {
      const int64_t n = row0 + rr;
      if (n >= p.rows) continue;
      float* res = p.residual + n * dim;
      float r[kMaxDim / 32];
#pragma unroll
      for (int k = 0; k < kMaxDim / 32; ++k) {
        const int i = lane + 32 * k;
        r[k] = i < dim ? res[i] : 0.0f;
      }
      double best_s = INFINITY;
      int best_j = p.size;
      const bool scan_all = row_over[rr] != 0;
      const int count = scan_all ? p.size : kRowCandidates;
      for (int c = 0; c < count; ++c) {
        const int j = scan_all ? c : cand[rr * kRowCandidates + c];
        if (j < 0) continue;
        const double s = exact_score(r, cb_l + static_cast<int64_t>(j) * dim, dim, lane);
        if (s < best_s || (s == best_s && j < best_j)) {
          best_s = s;
          best_j = j;
        }
      }
      const int code = best_j < p.size ? best_j : 0;  // no finite score: non-finite input
      const float* e = cb_l + static_cast<int64_t>(code) * dim;
      float* q = p.quantized ? p.quantized + n * dim : nullptr;
      float norm2 = 0.0f, err2 = 0.0f;
#pragma unroll
      for (int k = 0; k < kMaxDim / 32; ++k) {
        const int i = lane + 32 * k;
        if (i < dim) {
          const float ev = __ldg(e + i);
          const float rn = __fsub_rn(r[k], ev);
          res[i] = rn;
          const __nv_bfloat16 b = __float2bfloat16_rn(rn);
          a_tile[rr * a_ld + i] = b;
          const float d = __bfloat162float(b) - rn;
          norm2 += rn * rn;
          err2 += d * d;
          if (q) q[i] = __fadd_rn(level == 0 ? 0.0f : q[i], ev);  // 0.0 + E_0 + E_1 + ..., in order
        }
      }
      norm2 = warp_sum(norm2);
      err2 = warp_sum(err2);
      if (lane == 0) {
        row_norm[rr] = norm2;
        row_err[rr] = err2;
        p.codes[static_cast<int64_t>(level) * p.rows + n] = code;
      }
    }
    __syncthreads();
  }
}

// Decode: a warp per row; every lane sums the codewords of its columns in level order from 0.0.
// Codes outside [0, K) give a NaN row, never an out-of-bounds read. The row's codeword offsets
// are read once (lane l holds level l's, broadcast by shuffles) and levels are taken eight at a
// time, unrolled, so a lane has up to eight independent codeword loads in flight: the codebooks
// sit in L2 and the kernel is bound by how many gathers are outstanding. The output is stored
// streaming (evict-first) so it does not push the codebooks out of L2.
// vec4: dim % 4 == 0 and 16-byte aligned out/codebooks.
constexpr int kDecodeUnroll = 8;

__device__ __forceinline__ int64_t decode_word(const int64_t* __restrict__ codes, int64_t rows, int64_t n,
                                               int64_t size, int64_t lane_word, int l) {
  // Levels past the 32 held by the lanes (never the case for AnyGPT's codecs) read their code.
  return l < 32 ? __shfl_sync(kFullMask, lane_word, l)
                : static_cast<int64_t>(l) * size + codes[static_cast<int64_t>(l) * rows + n];
}

template <bool kVec4>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(float* __restrict__ out, const int64_t* __restrict__ codes, const float* __restrict__ codebooks,
                  int64_t rows, int dim, int levels, int first_level, int size) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (n >= rows) return;  // warp-uniform
  float* dst = out + n * dim;
  int bad = 0;
  int64_t lane_word = 0;
  for (int l = lane; l < levels; l += 32) {
    const int64_t code = codes[static_cast<int64_t>(l) * rows + n];
    bad |= code < 0 || code >= size;
    if (l == lane) lane_word = static_cast<int64_t>(l) * size + code;
  }
  if (__any_sync(kFullMask, bad)) {
    for (int i = lane; i < dim; i += 32) dst[i] = __int_as_float(0x7fc00000);
    return;
  }
  const float* level0 = codebooks + static_cast<int64_t>(first_level) * size * dim;
  constexpr int kWidth = kVec4 ? 4 : 1;
  // Every lane runs every pass (the shuffles need the whole warp); lanes past dim load nothing.
  for (int i0 = 0; i0 < dim; i0 += 32 * kWidth) {
    const int i = i0 + lane * kWidth;
    const bool active = i < dim;
    float acc[kWidth];
#pragma unroll
    for (int c = 0; c < kWidth; ++c) acc[c] = 0.0f;
    for (int l0 = 0; l0 < levels; l0 += kDecodeUnroll) {
      float e[kDecodeUnroll][kWidth];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        if (l0 + u < levels) {
          const float* src = level0 + decode_word(codes, rows, n, size, lane_word, l0 + u) * dim + i;
          if (!active) {
#pragma unroll
            for (int c = 0; c < kWidth; ++c) e[u][c] = 0.0f;
          } else if constexpr (kVec4) {
            const float4 v = __ldg(reinterpret_cast<const float4*>(src));
            e[u][0] = v.x, e[u][1] = v.y, e[u][2] = v.z, e[u][3] = v.w;
          } else {
            e[u][0] = __ldg(src);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        if (l0 + u < levels) {
#pragma unroll
          for (int c = 0; c < kWidth; ++c) acc[c] = __fadd_rn(acc[c], e[u][c]);
        }
      }
    }
    if (!active) continue;
    if constexpr (kVec4) {
      __stcs(reinterpret_cast<float4*>(dst + i), make_float4(acc[0], acc[1], acc[2], acc[3]));
    } else {
      __stcs(dst + i, acc[0]);
    }
  }
}

}  // namespace rvq
}  // namespace anygpt
#endif  // __CUDACC__
