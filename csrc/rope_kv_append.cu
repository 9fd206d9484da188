// Host launcher of the fused RoPE + KV-cache append: checks every argument, picks the vector width
// (16-byte accesses when pointers, strides and half the head_dim allow it) and launches one kernel.
#include <cstdint>

#include "anygpt/c_api.h"
#include "anygpt/cuda_check.cuh"
#include "anygpt/rope_kv_append.cuh"

namespace anygpt {
namespace {

constexpr const char* kOp = "rope_kv_append";

anygpt_status check_args(const void* q, const void* k, const void* v, const int64_t* positions,
                         const int64_t* slot_mapping, const void* k_cache, const void* v_cache,
                         const float* inv_freq, int64_t num_tokens, int64_t num_q_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t q_token_stride, int64_t k_token_stride, int64_t v_token_stride,
                         int dtype) {
  using ll = long long;
  if (num_tokens < 0 || num_tokens > 0x7fffffff)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: num_tokens=%lld, expected 0..2147483647", kOp, (ll)num_tokens);
  if (num_q_heads < 1)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: num_q_heads=%lld, expected >= 1", kOp, (ll)num_q_heads);
  if (num_kv_heads < 1)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: num_kv_heads=%lld, expected >= 1", kOp, (ll)num_kv_heads);
  if (num_q_heads + 2 * num_kv_heads > 65535)  // worst case one head row per CTA along grid y
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT,
                "%s: num_q_heads=%lld + 2 * num_kv_heads=%lld, expected at most 65535 head rows (grid limit)", kOp,
                (ll)num_q_heads, (ll)num_kv_heads);
  if (head_dim < 2 || head_dim > 256 || head_dim % 2 != 0)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: head_dim=%lld, expected an even value in 2..256", kOp,
                (ll)head_dim);
  const struct {
    const char* name;
    int64_t stride;
    int64_t heads;
    const char* heads_name;
  } strides[] = {{"q_token_stride", q_token_stride, num_q_heads, "num_q_heads"},
                 {"k_token_stride", k_token_stride, num_kv_heads, "num_kv_heads"},
                 {"v_token_stride", v_token_stride, num_kv_heads, "num_kv_heads"}};
  for (const auto& s : strides)
    if (s.stride < s.heads * head_dim)
      return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: %s=%lld, expected >= %s * head_dim = %lld", kOp, s.name,
                  (ll)s.stride, s.heads_name, (ll)(s.heads * head_dim));
  if (dtype != ANYGPT_FLOAT32 && dtype != ANYGPT_FLOAT16 && dtype != ANYGPT_BFLOAT16)
    return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "%s: dtype code %d, expected float32, float16 or bfloat16", kOp,
                dtype);
  if (num_tokens == 0) return ANYGPT_OK;  // nothing is dereferenced; empty tensors may have null pointers
  const struct {
    const char* name;
    const void* ptr;
  } required[] = {{"q", q}, {"k", k}, {"v", v}, {"positions", positions}, {"slot_mapping", slot_mapping},
                  {"k_cache", k_cache}, {"v_cache", v_cache}, {"inv_freq", inv_freq}};
  for (const auto& arg : required)
    if (arg.ptr == nullptr)
      return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: %s is a null pointer, expected device memory (num_tokens=%lld)",
                  kOp, arg.name, (ll)num_tokens);
  return ANYGPT_OK;
}

// 16-byte accesses need every row start 16-byte aligned: base pointers, token strides and both halves.
bool can_vectorize(const rope::Params& p, int64_t elem_size) {
  const int64_t vec = 16 / elem_size;
  const void* ptrs[] = {p.q, p.k, p.v, p.k_cache, p.v_cache};
  for (const void* ptr : ptrs)
    if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return false;
  return (p.head_dim / 2) % vec == 0 && p.q_token_stride % vec == 0 && p.k_token_stride % vec == 0 &&
         p.v_token_stride % vec == 0;
}

template <typename T, int kVec>
anygpt_status launch(const rope::Params& base, int64_t num_tokens, cudaStream_t stream) {
  rope::Params p = base;
  const int items = p.head_dim / 2 / kVec;  // threads per head row, 1..128
  p.rows_per_cta = rope::kThreads / items > 0 ? rope::kThreads / items : 1;
  const int64_t total_rows = static_cast<int64_t>(p.num_q_heads) + 2 * static_cast<int64_t>(p.num_kv_heads);
  const int64_t row_groups = (total_rows + p.rows_per_cta - 1) / p.rows_per_cta;  // <= 65535 (checked)
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(row_groups));
  const size_t shared = sizeof(float) * static_cast<size_t>(p.head_dim);
  rope::rope_kv_append_kernel<T, kVec><<<grid, p.rows_per_cta * items, shared, stream>>>(p);
  return check_launch(kOp);
}

template <typename T>
anygpt_status launch_dtype(const rope::Params& p, int64_t num_tokens, cudaStream_t stream) {
  if (can_vectorize(p, sizeof(T))) return launch<T, 16 / sizeof(T)>(p, num_tokens, stream);
  return launch<T, 1>(p, num_tokens, stream);
}

}  // namespace
}  // namespace anygpt

extern "C" anygpt_status anygpt_rope_kv_append_cuda(void* q, void* k, const void* v, const int64_t* positions,
                                                    const int64_t* slot_mapping, void* k_cache, void* v_cache,
                                                    const float* inv_freq, int64_t num_tokens, int64_t num_q_heads,
                                                    int64_t num_kv_heads, int64_t head_dim, int64_t q_token_stride,
                                                    int64_t k_token_stride, int64_t v_token_stride, int64_t num_slots,
                                                    anygpt_dtype dtype, void* stream) {
  using namespace anygpt;
  anygpt_status status = check_args(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq, num_tokens,
                                    num_q_heads, num_kv_heads, head_dim, q_token_stride, k_token_stride,
                                    v_token_stride, dtype);
  if (status != ANYGPT_OK) return status;
  if (num_slots < 0)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: num_slots=%lld, expected >= 0", kOp, (long long)num_slots);
  status = require_cuda_device(kOp);
  if (status != ANYGPT_OK) return status;
  if (num_tokens == 0) return ok();

  rope::Params p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.positions = positions;
  p.slot_mapping = slot_mapping;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.inv_freq = inv_freq;
  p.q_token_stride = q_token_stride;
  p.k_token_stride = k_token_stride;
  p.v_token_stride = v_token_stride;
  p.num_slots = num_slots;
  p.num_q_heads = static_cast<int>(num_q_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_dim = static_cast<int>(head_dim);

  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case ANYGPT_FLOAT32: return launch_dtype<float>(p, num_tokens, cuda_stream);
    case ANYGPT_FLOAT16: return launch_dtype<__half>(p, num_tokens, cuda_stream);
    case ANYGPT_BFLOAT16: return launch_dtype<__nv_bfloat16>(p, num_tokens, cuda_stream);
  }
  return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "%s: unsupported dtype %d", kOp, dtype);
}
