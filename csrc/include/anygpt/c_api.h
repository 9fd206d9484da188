// Plain C ABI of the anygpt_engine kernels: raw pointers, sizes and a stream, no torch.
// Any serving stack can link libanygpt_kernels and call these without Python.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  ANYGPT_OK = 0,
  ANYGPT_ERROR_INVALID_ARGUMENT = 1,  // a size, stride or pointer is wrong; see anygpt_last_error()
  ANYGPT_ERROR_UNSUPPORTED_DTYPE = 2,
  ANYGPT_ERROR_NO_CUDA = 3,           // built without CUDA, or no usable device/driver
  ANYGPT_ERROR_CUDA = 4,              // a CUDA runtime call failed
} anygpt_status;

typedef enum {
  ANYGPT_FLOAT32 = 0,
  ANYGPT_FLOAT16 = 1,
  ANYGPT_BFLOAT16 = 2,
} anygpt_dtype;

// Message of the last failed call on this thread ("" after a success).
const char* anygpt_last_error(void);

// 1 when the library was compiled with its CUDA kernels.
int anygpt_built_with_cuda(void);

// Number of visible CUDA devices; ANYGPT_ERROR_NO_CUDA with a message when none can be used.
anygpt_status anygpt_cuda_device_count(int* count);

// RMSNorm over rows of `hidden` elements, with HF LlamaRMSNorm rounding:
//   out = weight * round_dtype(h * rsqrt(mean(h^2) + eps)),  h = float(x)
// With a non-null `residual` (fused add, as between transformer sub-blocks):
//   residual <- round_dtype(x + residual);  h = float(residual)   (in place)
// x rows are `x_row_stride` elements apart; out and residual are contiguous [rows, hidden].
// All tensors share `dtype`; accumulation is float32.
anygpt_status anygpt_rms_norm_cpu(void* out, void* residual, const void* x, const void* weight,
                                  int64_t rows, int64_t hidden, int64_t x_row_stride, float eps,
                                  anygpt_dtype dtype);

// Same contract on a CUDA stream (`stream` is a cudaStream_t, 0 for the default stream).
// `threads_per_row` is the CUDA block size (a multiple of 32, at most 1024), from the tuning table.
anygpt_status anygpt_rms_norm_cuda(void* out, void* residual, const void* x, const void* weight,
                                   int64_t rows, int64_t hidden, int64_t x_row_stride, float eps,
                                   anygpt_dtype dtype, int threads_per_row, void* stream);

// ---- Decode GEMV (contract: anygpt_engine/ops/gemv.py; formats: anygpt_engine/quantization.py) ----
typedef enum {
  ANYGPT_WEIGHT_DTYPE = 0,     // the activations' dtype: [rows, k]
  ANYGPT_WEIGHT_INT8 = 1,      // int8 [rows, k], float32 scales [rows]: w = q * scale
  ANYGPT_WEIGHT_FP8_E4M3 = 2,  // e4m3 bytes [rows, k], float32 scales [rows]: w = q * scale
  ANYGPT_WEIGHT_INT4 = 3,      // uint8 [rows, k / 2] (element 2j low nibble, 2j + 1 high), float16 scales and
                               // uint8 zeros [rows, k / 128]: w = (q - zero) * scale per group of 128 along k
} anygpt_weight_format;

typedef enum {
  ANYGPT_EPILOGUE_NONE = 0,      // out = y
  ANYGPT_EPILOGUE_RESIDUAL = 1,  // out += y in place (out is the residual stream), rounded once
  ANYGPT_EPILOGUE_SILU_MUL = 2,  // the weight has 2 * n_out rows [gate; up]: out = silu(gate) * up
} anygpt_gemv_epilogue;

#define ANYGPT_GEMV_MAX_ROWS 16

// y [m, n] = h @ dequant(W)^T for m <= ANYGPT_GEMV_MAX_ROWS rows, float32 accumulation, rounded to
// `dtype` (of x, out and norm_weight); h = x, or with a non-null norm_weight [k] the RMSNorm of x with
// HF's rounding points (as anygpt_rms_norm_cuda). Epilogues as above, with torch's rounding points
// (silu(gate) rounded, then the product). x rows are `x_row_stride` elements apart, out rows
// `out_row_stride`. k must be a multiple of one 16-byte weight vector (8 half, 4 float32, 16 int8/e4m3
// values; int4: of 128), the weight 16-byte aligned. `threads` (64, 128, 256 or 512) and `row_warps`
// (warps that share an output row's k, a power of two up to threads / 32; fewer are used when k, or
// the x chunk the block stages, has too few 16-byte vectors for them) come from the tuning table.
// The sum over k is in a fixed order for given arguments: the same numbers on every call.
anygpt_status anygpt_gemv_cuda(void* out, const void* x, const void* weight, const void* scales, const uint8_t* zeros,
                               const void* norm_weight, int64_t m, int64_t n_out, int64_t k, int64_t x_row_stride,
                               int64_t out_row_stride, float eps, anygpt_dtype dtype,
                               anygpt_weight_format weight_format, anygpt_gemv_epilogue epilogue, int threads,
                               int row_warps, void* stream);

// One MaskGIT step of SoundStorm's parallel decoding (contract: anygpt_engine/ops/maskgit.py), on a
// CUDA stream, in one launch with no host sync. codes [B, frames, levels] int64 and open_mask (bool
// bytes, same shape) are updated in place; logits [B, frames*levels, codebook_size] of
// `logits_dtype`; lengths, prompt_lengths, counts, seeds [B] int64; uniform [B, frames*levels,
// codebook_size] float32 or null for the counter-based hash. confidence [B, frames*levels] float32
// is scratch; done [B] int32 must be zero on entry. divisor = max(temperature, 1e-10);
// codebook_size <= 1024; `threads` (a multiple of 32) and `rows_per_warp` come from the tuning table.
anygpt_status anygpt_maskgit_step_cuda(int64_t* codes, uint8_t* open_mask, float* confidence, int32_t* done,
                                       const void* logits, anygpt_dtype logits_dtype, const float* uniform,
                                       const int64_t* lengths, const int64_t* prompt_lengths, const int64_t* counts,
                                       const int64_t* seeds, int64_t batch, int64_t frames, int64_t levels,
                                       int64_t codebook_size, int64_t keep, int64_t level, int64_t counter,
                                       float divisor, int greedy, int threads, int rows_per_warp, void* stream);

// ---- Residual vector quantization (contract and margin: anygpt_engine/ops/rvq.py) ----
// Codebooks are float32 [levels, size, dim], contiguous, levels * size * dim < 2^31.

// Bytes of the workspace that anygpt_rvq_prepare_cuda fills for those codebooks.
anygpt_status anygpt_rvq_workspace_bytes(int64_t levels, int64_t size, int64_t dim, int64_t* bytes);

// Fills `workspace` (device memory, 256-byte aligned) from the codebooks: their bf16 copy, norms
// and per-level bounds for the candidate margin. Redo it after the codebooks change.
anygpt_status anygpt_rvq_prepare_cuda(void* workspace, int64_t workspace_bytes, const float* codebooks,
                                      int64_t levels, int64_t size, int64_t dim, void* stream);

// Encodes `rows` frames: codes [levels, rows] int64 (argmin of the exact score, ties to the
// lowest index), residual [rows, dim] float32 (the final residual), quantized [rows, dim] float32
// (sum of the chosen codewords in level order from 0.0) or null. x rows are `x_row_stride`
// elements apart, float32/float16/bfloat16; dim <= 1024; rows >= 1. Workspace from prepare.
anygpt_status anygpt_rvq_encode_cuda(int64_t* codes, float* residual, float* quantized, const void* x,
                                     int64_t x_row_stride, anygpt_dtype x_dtype, const float* codebooks,
                                     const void* workspace, int64_t workspace_bytes, int64_t rows, int64_t dim,
                                     int64_t levels, int64_t size, void* stream);

// out [rows, dim] float32 = sum over l < levels of codebooks[first_level + l][codes[l][row]], added
// in level order from 0.0. codes [levels, rows] int64; total_levels is the codebooks' level count.
// A code outside [0, size) makes its row NaN (the kernel never reads out of bounds).
anygpt_status anygpt_rvq_decode_cuda(float* out, const int64_t* codes, const float* codebooks, int64_t rows,
                                     int64_t dim, int64_t levels, int64_t first_level, int64_t total_levels,
                                     int64_t size, void* stream);

// ---- Attention: paged decode and fused RoPE + KV append (kernel notes: attention_decode.cuh, rope_kv_append.cuh) ----
// Paged KV layout (per layer): k_cache and v_cache each contiguous [num_blocks, block_size, num_kv_heads, head_dim]
// (the halves of one [2, num_blocks, block_size, Hkv, D] tensor); token t of sequence b lives in block
// block_tables[b][t / block_size] at offset t % block_size; flat cache slot = block * block_size + offset.

// One query token per sequence attending over its first seq_lens[b] cached tokens (flash-decoding).
// q, out contiguous [batch, num_q_heads, head_dim] of `dtype` (float32/float16/bfloat16, shared with the caches);
// block_tables [batch, block_table_stride] and seq_lens [batch] int64; num_q_heads % num_kv_heads == 0.
// Split s of a sequence covers blocks [s*c, (s+1)*c), c = ceil(ceil(seq_len / block_size) / num_splits);
// with num_splits > 1 the partials go to workspace_out [batch, num_q_heads, num_splits, head_dim] float32 and
// workspace_lse [batch, num_q_heads, num_splits] float32 (natural-log sum-exp of the scaled scores, -inf for an
// empty split), then a second kernel combines them into out; with num_splits == 1 both may be null.
// Scores = scale * q.k, softmax and accumulation in float32; out rounded once; seq_lens[b] == 0 gives zeros.
// head_dim 64 or 128; block_size 8, 16, 32 or 64; threads (CTA size) 32, 64, 128 or 256; q and the caches
// 16-byte aligned. seq_lens are clamped to [0, max_blocks * block_size] on the device: callers check them.
anygpt_status anygpt_paged_decode_attention_cuda(void* out, const void* q, const void* k_cache, const void* v_cache,
                                                 const int64_t* block_tables, const int64_t* seq_lens,
                                                 float* workspace_out, float* workspace_lse, int64_t batch,
                                                 int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                                 int64_t block_size, int64_t max_blocks, int64_t block_table_stride,
                                                 int64_t num_splits, float scale, anygpt_dtype dtype, int threads,
                                                 void* stream);

// For each token i < num_tokens at position positions[i] (int64): rotate q[i] (all q heads) and k[i] (all kv
// heads), both in place, with rotate-half RoPE, f = (float)positions[i] * inv_freq[j], c = cosf(f), s = sinf(f),
// y[j] = x1*c - x2*s, y[j+half] = x2*c + x1*s in float32 rounded once to dtype; then write the rotated k[i] and
// the unrotated v[i] to slot slot_mapping[i] (int64; < 0 skips the writes) of k_cache / v_cache
// ([slots, num_kv_heads, head_dim]). Element (i, h, d) of q is at q + i*q_token_stride + h*head_dim + d; same
// for k and v with their strides (column slices of a fused qkv projection work; q, k and v must not overlap,
// as q and k are written). inv_freq float32
// [head_dim / 2]; head_dim even, <= 256.
anygpt_status anygpt_rope_kv_append_cuda(void* q, void* k, const void* v, const int64_t* positions,
                                         const int64_t* slot_mapping, void* k_cache, void* v_cache,
                                         const float* inv_freq, int64_t num_tokens, int64_t num_q_heads,
                                         int64_t num_kv_heads, int64_t head_dim, int64_t q_token_stride,
                                         int64_t k_token_stride, int64_t v_token_stride, int64_t num_slots,
                                         anygpt_dtype dtype, void* stream);

// Fused sampling (contract: anygpt_engine/ops/sampling.py) on a CUDA stream, one launch, no host
// sync: for each of `batch` rows, logits [batch, vocab] float32 (rows `logits_row_stride` apart)
// -> repetition penalty, allowed-id mask, stop ids suppressed before min_new_tokens, temperature
// (0 = greedy first argmax), top-k, top-p, Gumbel-max with the counter-based noise -> out[row];
// then seen[slot, token] = 1, open_modality advanced, generated += 1. Per-slot parameters and
// state ([num_slots] arrays, stop_mask/seen [num_slots, vocab] bool bytes) are indexed by
// slots[row]; an out-of-range slot writes -1 and no state. allowed [num_states, vocab] bool bytes,
// opens [vocab], closes [num_states] int64. scratch [batch, vocab] float32 (needed when `random`).
// random/use_top_k/use_top_p/use_penalty switch stages off for the whole batch; `threads`
// (256, 512 or 1024) comes from the tuning table.
anygpt_status anygpt_sample_tokens_cuda(const float* logits, int64_t logits_row_stride, const int64_t* slots,
                                        int64_t* out, float* scratch, const float* temperature, const int64_t* top_k,
                                        const float* top_p, const float* repetition_penalty,
                                        const int64_t* min_new_tokens, const int64_t* seeds, int64_t* generated,
                                        int64_t* open_modality, const uint8_t* stop_mask, uint8_t* seen,
                                        const uint8_t* allowed, const int64_t* opens, const int64_t* closes,
                                        int64_t batch, int64_t vocab, int64_t num_slots, int64_t num_states,
                                        int random, int use_top_k, int use_top_p, int use_penalty, int threads,
                                        void* stream);

#ifdef __cplusplus
}
#endif
