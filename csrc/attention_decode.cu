// Host launcher of paged decode attention: checks every argument, picks the instantiation for the
// dtype, head_dim and group width, launches the split kernel and, with several splits, the combine.
#include <cmath>
#include <cstdint>

#include "anygpt/attention_decode.cuh"
#include "anygpt/c_api.h"
#include "anygpt/cuda_check.cuh"

namespace anygpt {
namespace {

constexpr const char* kOp = "paged_decode_attention";

// q heads one CTA carries: the group rounded up to a power of two, at most 8 (see the .cuh).
int64_t heads_per_cta(int64_t group) {
  int64_t heads = 1;
  while (heads < group && heads < 8) heads *= 2;
  return heads;
}

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

anygpt_status check_args(void* out, const void* q, const void* k_cache, const void* v_cache,
                         const int64_t* block_tables, const int64_t* seq_lens, const float* workspace_out,
                         const float* workspace_lse, int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t block_table_stride,
                         int64_t num_splits, float scale, int dtype, int threads) {
  using ll = long long;
  if (batch < 0 || batch > 65535)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: batch=%lld, expected 0..65535 (grid limit)", kOp, (ll)batch);
  if (num_q_heads < 1)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: num_q_heads=%lld, expected >= 1", kOp, (ll)num_q_heads);
  if (num_kv_heads < 1)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: num_kv_heads=%lld, expected >= 1", kOp, (ll)num_kv_heads);
  if (num_q_heads % num_kv_heads != 0)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: num_q_heads=%lld, expected a multiple of num_kv_heads=%lld", kOp,
                (ll)num_q_heads, (ll)num_kv_heads);
  if (head_dim != 64 && head_dim != 128)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: head_dim=%lld, expected 64 or 128", kOp, (ll)head_dim);
  if (block_size != 8 && block_size != 16 && block_size != 32 && block_size != 64)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: block_size=%lld, expected 8, 16, 32 or 64", kOp, (ll)block_size);
  if (max_blocks < 1 || max_blocks > (int64_t{1} << 30) / block_size)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT,
                "%s: max_blocks=%lld, expected 1..%lld (at most 2^30 tokens per sequence with block_size=%lld)", kOp,
                (ll)max_blocks, (ll)((int64_t{1} << 30) / block_size), (ll)block_size);
  if (block_table_stride < max_blocks)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: block_table_stride=%lld, expected >= max_blocks=%lld", kOp,
                (ll)block_table_stride, (ll)max_blocks);
  if (num_splits < 1 || num_splits > 0x7fffffff)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: num_splits=%lld, expected 1..2147483647", kOp, (ll)num_splits);
  if (!std::isfinite(scale))
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: scale=%g, expected a finite value", kOp, scale);
  if (threads != 32 && threads != 64 && threads != 128 && threads != 256)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: threads=%d, expected 32, 64, 128 or 256", kOp, threads);
  if (dtype != ANYGPT_FLOAT32 && dtype != ANYGPT_FLOAT16 && dtype != ANYGPT_BFLOAT16)
    return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "%s: dtype code %d, expected float32, float16 or bfloat16", kOp,
                dtype);
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t chunks = (group + heads_per_cta(group) - 1) / heads_per_cta(group);
  if (num_kv_heads * chunks > 65535)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT,
                "%s: num_kv_heads=%lld x %lld head chunks of the group exceeds the grid limit 65535", kOp,
                (ll)num_kv_heads, (ll)chunks);
  if (batch == 0) return ANYGPT_OK;  // nothing is dereferenced; empty tensors may have null pointers
  const struct {
    const char* name;
    const void* ptr;
  } required[] = {{"out", out}, {"q", q}, {"k_cache", k_cache}, {"v_cache", v_cache},
                  {"block_tables", block_tables}, {"seq_lens", seq_lens}};
  for (const auto& arg : required)
    if (arg.ptr == nullptr)
      return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: %s is a null pointer, expected device memory (batch=%lld)", kOp,
                  arg.name, (ll)batch);
  if (num_splits > 1 && (workspace_out == nullptr || workspace_lse == nullptr))
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT,
                "%s: workspace_out and workspace_lse must be non-null pointers when num_splits=%lld > 1", kOp,
                (ll)num_splits);
  const struct {
    const char* name;
    const void* ptr;
  } vectors[] = {{"q", q}, {"k_cache", k_cache}, {"v_cache", v_cache}};
  for (const auto& arg : vectors)
    if (!aligned16(arg.ptr))
      return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: %s=%p is not 16-byte aligned (rows are read as 16-byte vectors)",
                  kOp, arg.name, arg.ptr);
  return ANYGPT_OK;
}

template <typename T, int kHeadDim, int kHeads>
void launch_split(const decode::Params& params, dim3 grid, int threads, cudaStream_t stream) {
  const size_t shared = sizeof(float) * static_cast<size_t>(threads / 32) *
                        decode::shared_floats_per_warp<kHeadDim, kHeads>();  // <= 33 KB: no opt-in needed
  decode::split_kernel<T, kHeadDim, kHeads><<<grid, threads, shared, stream>>>(params);
}

template <typename T, int kHeadDim>
void launch_heads(int64_t heads, const decode::Params& params, dim3 grid, int threads, cudaStream_t stream) {
  switch (heads) {
    case 1: launch_split<T, kHeadDim, 1>(params, grid, threads, stream); break;
    case 2: launch_split<T, kHeadDim, 2>(params, grid, threads, stream); break;
    case 4: launch_split<T, kHeadDim, 4>(params, grid, threads, stream); break;
    default: launch_split<T, kHeadDim, 8>(params, grid, threads, stream); break;
  }
}

template <typename T>
anygpt_status launch(const decode::Params& params, int64_t batch, int64_t heads, int64_t head_dim, int threads,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(params.num_splits),
                  static_cast<unsigned>(params.num_kv_heads * params.head_chunks), static_cast<unsigned>(batch));
  if (head_dim == 64) launch_heads<T, 64>(heads, params, grid, threads, stream);
  else launch_heads<T, 128>(heads, params, grid, threads, stream);
  anygpt_status status = check_launch(kOp);
  if (status != ANYGPT_OK || params.num_splits == 1) return status;

  const int64_t rows = batch * params.num_q_heads;
  const unsigned blocks = static_cast<unsigned>((rows + decode::kCombineWarps - 1) / decode::kCombineWarps);
  T* out = static_cast<T*>(params.out);
  if (head_dim == 64)
    decode::combine_kernel<T, 64><<<blocks, decode::kCombineWarps * 32, 0, stream>>>(
        out, params.ws_out, params.ws_lse, rows, params.num_splits);
  else
    decode::combine_kernel<T, 128><<<blocks, decode::kCombineWarps * 32, 0, stream>>>(
        out, params.ws_out, params.ws_lse, rows, params.num_splits);
  return check_launch(kOp);
}

}  // namespace
}  // namespace anygpt

extern "C" anygpt_status anygpt_paged_decode_attention_cuda(
    void* out, const void* q, const void* k_cache, const void* v_cache, const int64_t* block_tables,
    const int64_t* seq_lens, float* workspace_out, float* workspace_lse, int64_t batch, int64_t num_q_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t block_table_stride,
    int64_t num_splits, float scale, anygpt_dtype dtype, int threads, void* stream) {
  using namespace anygpt;
  anygpt_status status = check_args(out, q, k_cache, v_cache, block_tables, seq_lens, workspace_out, workspace_lse,
                                    batch, num_q_heads, num_kv_heads, head_dim, block_size, max_blocks,
                                    block_table_stride, num_splits, scale, dtype, threads);
  if (status != ANYGPT_OK) return status;
  status = require_cuda_device(kOp);
  if (status != ANYGPT_OK) return status;
  if (batch == 0) return ok();

  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t heads = heads_per_cta(group);
  int log2_block_size = 0;
  while ((int64_t{1} << log2_block_size) < block_size) ++log2_block_size;
  decode::Params params{};
  params.out = out;
  params.q = q;
  params.k_cache = k_cache;
  params.v_cache = v_cache;
  params.block_tables = block_tables;
  params.seq_lens = seq_lens;
  params.ws_out = workspace_out;
  params.ws_lse = workspace_lse;
  params.block_table_stride = block_table_stride;
  params.num_q_heads = static_cast<int>(num_q_heads);
  params.num_kv_heads = static_cast<int>(num_kv_heads);
  params.group = static_cast<int>(group);
  params.head_chunks = static_cast<int>((group + heads - 1) / heads);
  params.block_size = static_cast<int>(block_size);
  params.log2_block_size = log2_block_size;
  params.max_blocks = static_cast<int>(max_blocks);
  params.num_splits = static_cast<int>(num_splits);
  params.scale_log2 = scale * decode::kLog2e;

  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case ANYGPT_FLOAT32: return launch<float>(params, batch, heads, head_dim, threads, cuda_stream);
    case ANYGPT_FLOAT16: return launch<__half>(params, batch, heads, head_dim, threads, cuda_stream);
    case ANYGPT_BFLOAT16: return launch<__nv_bfloat16>(params, batch, heads, head_dim, threads, cuda_stream);
  }
  return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "%s: unsupported dtype %d", kOp, dtype);
}
