// Paged decode attention (flash-decoding) as raw-pointer CUDA kernel templates.
// Contract: anygpt_paged_decode_attention_cuda in c_api.h.
//
// Paged KV layout (per layer): k_cache and v_cache are each contiguous
// [num_blocks, block_size, num_kv_heads, head_dim] (the two halves of one [2, num_blocks, block_size,
// Hkv, D] tensor). Token t of sequence b lives in block block_tables[b][t / block_size] at offset
// t % block_size; its K row for kv head h starts at ((block * block_size + offset) * Hkv + h) * D.
//
// Work decomposition, and why:
//  - Grid (split, kv_head * head_chunks, batch). One CTA owns one (sequence, kv head, context split)
//    and ALL the q heads of that kv head's GQA group (up to kHeads = 8 at a time), so every K/V row
//    is read from memory once per group: decode attention is bound by reading the cache, and the
//    group's extra multiply-adds are free next to that. Groups larger than 8 (or not a power of two
//    above 8) are cut into head_chunks of 8; groups 3, 5, 6, 7 run as 4 or 8 with the extra head
//    slots masked, which keeps a single read of K/V.
//  - Split-K (flash-decoding): the context is cut into num_splits runs of whole KV blocks, so that a
//    small batch still puts enough CTAs on the GPU (batch * Hkv CTAs alone leave most of an H100's
//    132 SMs idle at batch 1). Each split writes a normalised partial output and its log-sum-exp; a
//    second, tiny kernel (combine_kernel) merges them. With one split the first kernel writes `out`.
//  - Inside a CTA, warps take 8-token chunks of the split round-robin (a chunk never straddles a KV
//    block because block_size is a multiple of 8), so the warps split each block's tokens and every
//    warp streams independent memory. A token's D-element K (and V) row is read by a group of D/VEC
//    lanes, each with one 16-byte vector load (VEC = 8 bf16/fp16 or 4 fp32 elements): one warp load
//    instruction covers 512 contiguous-per-row bytes, fully coalesced within each row. A lane issues
//    all its K and V loads for the chunk (8 tokens / tokens-per-pass = 2..8 of each) before the first
//    use, so several 16-byte loads per thread are in flight; many resident warps do the rest.
//  - q . k: each lane holds its VEC-slice of the group's q heads in registers (pre-multiplied by
//    scale * log2(e) so the softmax uses exp2f), does VEC multiply-adds and a shuffle-xor reduction
//    over the row's lanes. Softmax is online per warp (running max m and sum l per head, rescaled once
//    per chunk), accumulation of p * v is in float32 registers (each lane keeps its VEC slice of D).
//  - End of the CTA: the warps' (m, l, acc) meet in shared memory and are merged with the usual
//    rescaling; the result is divided by l once and either rounded to the dtype (one split) or written
//    as float32 with its natural-log LSE to the workspace.
//
// Robustness: tokens past seq_len inside the last chunk are neither loaded nor counted (their cache
// slots may hold anything, NaN included). seq_lens outside [0, max_blocks * block_size] are clamped
// into that range so a bad length can never read past the block table: the Python op must reject
// them before launch (the kernel cannot report without a host sync). Block ids are trusted.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "anygpt/cuda_float.cuh"

namespace anygpt {
namespace decode {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kChunkTokens = 8;   // tokens a warp takes at a time; every block_size is a multiple
constexpr int kMaxThreads = 256;  // CTA size limit (threads in {32, 64, 128, 256})
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;

// 16 bytes of T widened to float: kElems = 4 (float) or 8 (half, bfloat16).
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void to_float(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
};
template <>
struct Vec16<__half> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const uint4& v, float* f) {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      *reinterpret_cast<uint32_t*>(&h) = words[i];
      const float2 p = __half22float2(h);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
};
template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const uint4& v, float* f) {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // bf16 -> f32 is exact: the bf16 bits are the top half of the float.
      f[2 * i] = __uint_as_float(words[i] << 16);
      f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

struct Params {
  void* out;                    // [batch, Hq, D] of T (written when num_splits == 1)
  const void* q;                // [batch, Hq, D] of T
  const void* k_cache;          // [num_blocks, block_size, Hkv, D] of T
  const void* v_cache;          // same
  const int64_t* block_tables;  // [batch, block_table_stride]
  const int64_t* seq_lens;      // [batch]
  float* ws_out;                // [batch, Hq, num_splits, D] (num_splits > 1)
  float* ws_lse;                // [batch, Hq, num_splits]   (num_splits > 1)
  int64_t block_table_stride;
  int num_q_heads;
  int num_kv_heads;
  int group;        // num_q_heads / num_kv_heads
  int head_chunks;  // ceil(group / kHeads)
  int block_size;   // power of two, multiple of kChunkTokens
  int log2_block_size;
  int max_blocks;
  int num_splits;
  float scale_log2;  // scale * log2(e)
};

// Shared memory of split_kernel, in floats: per warp, kHeads maxima, kHeads sums, kHeads x D partials.
template <int kHeadDim, int kHeads>
constexpr int shared_floats_per_warp() {
  return kHeads * (kHeadDim + 2);
}

// One CTA per (split, kv head x head chunk, sequence); see the file comment.
template <typename T, int kHeadDim, int kHeads>
__global__ void __launch_bounds__(kMaxThreads) split_kernel(const Params p) {
  using V = Vec16<T>;
  constexpr int kVec = V::kElems;
  constexpr int kLanesPerToken = kHeadDim / kVec;               // 8, 16 or 32 lanes read one row
  static_assert(kLanesPerToken >= 1 && kLanesPerToken <= 32 && 32 % kLanesPerToken == 0, "bad head_dim");
  constexpr int kTokensPerPass = 32 / kLanesPerToken;           // rows one warp load covers
  constexpr int kPasses = kChunkTokens / kTokensPerPass;        // loads per lane per chunk (of K, of V)
  static_assert(kPasses >= 1 && kChunkTokens % kTokensPerPass == 0, "bad chunk");

  extern __shared__ float4 shared_raw[];
  float* shared = reinterpret_cast<float*>(shared_raw);

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / p.head_chunks;
  const int head_chunk = blockIdx.y - kv_head * p.head_chunks;
  const int b = blockIdx.z;
  const int q_head0 = kv_head * p.group + head_chunk * kHeads;
  const int heads_here = min(kHeads, p.group - head_chunk * kHeads);
  const int num_warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int sub = lane / kLanesPerToken;  // which row of a pass this lane reads
  const int vi = lane % kLanesPerToken;   // which 16-byte slice of the row

  // Clamped length (see the file comment), this split's whole blocks and tokens.
  const int max_tokens = p.max_blocks << p.log2_block_size;
  const int64_t raw_len = p.seq_lens[b];
  const int seq_len = raw_len < 0 ? 0 : (raw_len > max_tokens ? max_tokens : static_cast<int>(raw_len));
  const int seq_blocks = (seq_len + p.block_size - 1) >> p.log2_block_size;
  const int per_split = static_cast<int>((static_cast<int64_t>(seq_blocks) + p.num_splits - 1) / p.num_splits);
  // In 64 bits: an empty split's begin may lie far past seq_len.
  const int64_t blk_begin = static_cast<int64_t>(split) * per_split;
  const int64_t tok_begin64 = blk_begin << p.log2_block_size;
  const int64_t tok_end64 = min((blk_begin + per_split) << p.log2_block_size, static_cast<int64_t>(seq_len));

  const int64_t row0 = static_cast<int64_t>(b) * p.num_q_heads + q_head0;  // (b, q_head0) row of q / out
  if (tok_begin64 >= tok_end64) {
    // Empty split (or empty sequence): zeros and an LSE of -inf, which the combine weighs by 0.
    for (int e = threadIdx.x; e < heads_here * kHeadDim; e += blockDim.x) {
      const int g = e / kHeadDim;
      const int d = e - g * kHeadDim;
      if (p.num_splits == 1) {
        static_cast<T*>(p.out)[(row0 + g) * kHeadDim + d] = from_float<T>(0.0f);
      } else {
        const int64_t ws_row = (row0 + g) * p.num_splits + split;
        p.ws_out[ws_row * kHeadDim + d] = 0.0f;
        if (d == 0) p.ws_lse[ws_row] = -INFINITY;
      }
    }
    return;
  }
  // Both now lie in [0, seq_len], and seq_len + kChunkTokens fits an int (checked on the host).
  const int tok_begin = static_cast<int>(tok_begin64);
  const int tok_end = static_cast<int>(tok_end64);

  // q slices of the group's heads, scaled into log2 units; padded head slots stay zero.
  float q[kHeads][kVec];
  const T* q_ptr = static_cast<const T*>(p.q) + row0 * kHeadDim + vi * kVec;
#pragma unroll
  for (int g = 0; g < kHeads; ++g) {
    if (g < heads_here) {
      V::to_float(load16(q_ptr + g * kHeadDim), q[g]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) q[g][i] *= p.scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) q[g][i] = 0.0f;
    }
  }

  float m[kHeads];         // running max (log2 units), uniform across the warp
  float l[kHeads];         // running sum of this lane's rows (same in the lanes of a row group)
  float acc[kHeads][kVec]; // running sum of p * v over this lane's rows, its VEC slice of D
#pragma unroll
  for (int g = 0; g < kHeads; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[g][i] = 0.0f;
  }

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int64_t* table = p.block_tables + static_cast<int64_t>(b) * p.block_table_stride;
  const int64_t row_stride = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;  // elements between slots
  const int64_t head_offset = static_cast<int64_t>(kv_head) * kHeadDim + vi * kVec;
  const int num_chunks = (tok_end - tok_begin + kChunkTokens - 1) / kChunkTokens;

  int chunk = warp;
  int64_t block = chunk < num_chunks ? table[(tok_begin + chunk * kChunkTokens) >> p.log2_block_size] : 0;
  for (; chunk < num_chunks; chunk += num_warps) {
    const int t0 = tok_begin + chunk * kChunkTokens;
    const int64_t slot0 = (block << p.log2_block_size) + (t0 & (p.block_size - 1));
    const int64_t base = slot0 * row_stride + head_offset;

    // All of this lane's K and V loads for the chunk first, then the math.
    uint4 kr[kPasses];
    uint4 vr[kPasses];
#pragma unroll
    for (int u = 0; u < kPasses; ++u) {
      const int t = u * kTokensPerPass + sub;
      if (t0 + t < tok_end) {
        kr[u] = load16(k_cache + base + t * row_stride);
        vr[u] = load16(v_cache + base + t * row_stride);
      } else {
        kr[u] = make_uint4(0u, 0u, 0u, 0u);
        vr[u] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    // The next chunk's block id, loaded while this chunk's K/V are in flight.
    const int next = chunk + num_warps;
    const int64_t next_block = next < num_chunks ? table[(tok_begin + next * kChunkTokens) >> p.log2_block_size] : 0;

    // Scores s = (scale * log2 e) q . k of this lane's rows, -inf for rows past the end.
    float s[kPasses][kHeads];
#pragma unroll
    for (int u = 0; u < kPasses; ++u) {
      float kf[kVec];
      V::to_float(kr[u], kf);
      const bool valid = t0 + u * kTokensPerPass + sub < tok_end;
#pragma unroll
      for (int g = 0; g < kHeads; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) dot = fmaf(q[g][i], kf[i], dot);
#pragma unroll
        for (int offset = kLanesPerToken / 2; offset > 0; offset >>= 1)
          dot += __shfl_xor_sync(kFullMask, dot, offset);
        s[u][g] = valid ? dot : -INFINITY;
      }
    }

    // Online softmax: one rescale per chunk with the chunk's warp-wide max per head.
#pragma unroll
    for (int g = 0; g < kHeads; ++g) {
      float chunk_max = s[0][g];
#pragma unroll
      for (int u = 1; u < kPasses; ++u) chunk_max = fmaxf(chunk_max, s[u][g]);
#pragma unroll
      for (int offset = 16; offset >= kLanesPerToken; offset >>= 1)
        chunk_max = fmaxf(chunk_max, __shfl_xor_sync(kFullMask, chunk_max, offset));
      // The chunk's first row is valid, so chunk_max and m_new are finite (for finite inputs).
      const float m_new = fmaxf(m[g], chunk_max);
      const float alpha = exp2f(m[g] - m_new);  // 0 on the first chunk (m = -inf)
      m[g] = m_new;
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[g][i] *= alpha;
    }
#pragma unroll
    for (int u = 0; u < kPasses; ++u) {
      float vf[kVec];
      V::to_float(vr[u], vf);
#pragma unroll
      for (int g = 0; g < kHeads; ++g) {
        const float pr = exp2f(s[u][g] - m[g]);  // 0 for rows past the end
        l[g] += pr;
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[g][i] = fmaf(pr, vf[i], acc[g][i]);
      }
    }
    block = next_block;
  }

  // Sum the row groups of the warp: afterwards every lane has l, lanes with sub == 0 have acc.
#pragma unroll
  for (int g = 0; g < kHeads; ++g) {
#pragma unroll
    for (int offset = 16; offset >= kLanesPerToken; offset >>= 1) {
      l[g] += __shfl_xor_sync(kFullMask, l[g], offset);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[g][i] += __shfl_xor_sync(kFullMask, acc[g][i], offset);
    }
  }

  // Merge the warps through shared memory: [warp][m: kHeads | l: kHeads | acc: kHeads x D].
  constexpr int kPerWarp = shared_floats_per_warp<kHeadDim, kHeads>();
  float* mine = shared + warp * kPerWarp;
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kHeads; ++g) {
      mine[g] = m[g];
      mine[kHeads + g] = l[g];
    }
  }
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < kHeads; ++g) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) mine[2 * kHeads + g * kHeadDim + vi * kVec + i] = acc[g][i];
    }
  }
  __syncthreads();

  for (int e = threadIdx.x; e < heads_here * kHeadDim; e += blockDim.x) {
    const int g = e / kHeadDim;
    const int d = e - g * kHeadDim;
    float m_all = -INFINITY;
    for (int w = 0; w < num_warps; ++w) m_all = fmaxf(m_all, shared[w * kPerWarp + g]);
    float l_all = 0.0f;
    float a_all = 0.0f;
    for (int w = 0; w < num_warps; ++w) {
      const float* theirs = shared + w * kPerWarp;
      const float weight = exp2f(theirs[g] - m_all);  // 0 for a warp that had no chunk (m = -inf)
      l_all = fmaf(theirs[kHeads + g], weight, l_all);
      a_all = fmaf(theirs[2 * kHeads + g * kHeadDim + d], weight, a_all);
    }
    const float o = a_all / l_all;  // l_all >= 1: the row that set m_all contributes exp2(0)
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[(row0 + g) * kHeadDim + d] = from_float<T>(o);
    } else {
      const int64_t ws_row = (row0 + g) * p.num_splits + split;
      p.ws_out[ws_row * kHeadDim + d] = o;
      if (d == 0) p.ws_lse[ws_row] = m_all * kLn2 + logf(l_all);  // natural log of sum exp(scale q.k)
    }
  }
}

// Merges the splits of each (sequence, q head) row: one warp per row, lanes along D.
// out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M); rows whose splits are all empty get zeros.
constexpr int kCombineWarps = 4;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kCombineWarps * 32)
    combine_kernel(T* __restrict__ out, const float* __restrict__ ws_out, const float* __restrict__ ws_lse,
                   int64_t rows, int num_splits) {
  constexpr int kPerLane = kHeadDim / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* lse = ws_lse + row * num_splits;
  const float* parts = ws_out + row * num_splits * kHeadDim;
  T* out_row = out + row * kHeadDim;

  float m = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) m = fmaxf(m, lse[s]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, offset));
  if (m == -INFINITY) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) out_row[lane + 32 * i] = from_float<T>(0.0f);
    return;
  }
  float total = 0.0f;
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  for (int s = 0; s < num_splits; ++s) {
    const float lse_s = lse[s];
    if (lse_s == -INFINITY) continue;  // empty split: its zeros would add nothing
    const float w = expf(lse_s - m);
    total += w;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] = fmaf(w, parts[s * kHeadDim + lane + 32 * i], acc[i]);
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) out_row[lane + 32 * i] = from_float<T>(acc[i] / total);
}

}  // namespace decode
}  // namespace anygpt
