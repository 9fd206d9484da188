// Host side of the RVQ C ABI: workspace layout and argument checks, compiled in every build.
// The CUDA launchers (rvq.cu) run only after these checks; without CUDA the entry points still
// check their arguments, then report ANYGPT_ERROR_NO_CUDA.
#include <climits>
#include <cstdint>

#include "anygpt/c_api.h"
#include "anygpt/rvq.cuh"
#include "anygpt/status.hpp"

namespace anygpt {
namespace rvq {
namespace {

constexpr int64_t kMaxValues = INT64_C(1) << 31;  // kernels index codebooks with 32-bit offsets

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

anygpt_status check_sizes(const char* op, int64_t levels, int64_t size, int64_t dim) {
  if (levels < 1) return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: levels=%lld, expected >= 1", op, (long long)levels);
  if (size < 1) return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: size=%lld, expected >= 1", op, (long long)size);
  if (dim < 1) return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: dim=%lld, expected >= 1", op, (long long)dim);
  if (levels > kMaxValues / size || levels * size > kMaxValues / dim)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: levels=%lld x size=%lld x dim=%lld, expected fewer than 2^31 values",
                op, (long long)levels, (long long)size, (long long)dim);
  return ANYGPT_OK;
}

// Rows per grid: CTAs of `per_block` rows must fit the 2^31 - 1 grid limit.
anygpt_status check_rows(const char* op, int64_t rows, int64_t per_block) {
  if (rows < 1)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: rows=%lld, expected >= 1 (empty input)", op, (long long)rows);
  if ((rows + per_block - 1) / per_block > INT_MAX)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: rows=%lld exceeds the grid limit", op, (long long)rows);
  return ANYGPT_OK;
}

}  // namespace

WorkspaceLayout workspace_layout(int64_t levels, int64_t size, int64_t dim) {
  WorkspaceLayout layout;
  const size_t words = static_cast<size_t>(levels) * static_cast<size_t>(size);
  layout.low = 0;
  layout.norms = align256(words * static_cast<size_t>(padded_dim(dim)) * 2);
  layout.emax = layout.norms + align256(words * 4);
  layout.demax = layout.emax + align256(static_cast<size_t>(levels) * 4);
  layout.bytes = layout.demax + align256(static_cast<size_t>(levels) * 4);
  return layout;
}

anygpt_status check_codebook_args(const char* op, const void* codebooks, int64_t levels, int64_t size, int64_t dim) {
  if (codebooks == nullptr) return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: codebooks is a null pointer", op);
  return check_sizes(op, levels, size, dim);
}

anygpt_status check_workspace_args(const char* op, const void* workspace, size_t workspace_bytes, int64_t levels,
                                   int64_t size, int64_t dim) {
  if (workspace == nullptr) return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: workspace is a null pointer", op);
  if (reinterpret_cast<std::uintptr_t>(workspace) % 256 != 0)  // its sections are read by 16-byte async copies
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: workspace=%p, expected a 256-byte aligned address", op, workspace);
  const size_t needed = workspace_layout(levels, size, dim).bytes;
  if (workspace_bytes < needed)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "%s: workspace_bytes=%zu, expected >= %zu (anygpt_rvq_workspace_bytes)",
                op, workspace_bytes, needed);
  return ANYGPT_OK;
}

}  // namespace rvq
}  // namespace anygpt

using anygpt::fail;
using anygpt::rvq::check_codebook_args;
using anygpt::rvq::check_workspace_args;

extern "C" anygpt_status anygpt_rvq_workspace_bytes(int64_t levels, int64_t size, int64_t dim, int64_t* bytes) {
  if (bytes == nullptr) return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rvq_workspace_bytes: bytes is a null pointer");
  const anygpt_status status = anygpt::rvq::check_sizes("rvq_workspace_bytes", levels, size, dim);
  if (status != ANYGPT_OK) return status;
  *bytes = static_cast<int64_t>(anygpt::rvq::workspace_layout(levels, size, dim).bytes);
  return anygpt::ok();
}

extern "C" anygpt_status anygpt_rvq_prepare_cuda(void* workspace, int64_t workspace_bytes, const float* codebooks,
                                                 int64_t levels, int64_t size, int64_t dim, void* stream) {
  anygpt_status status = check_codebook_args("rvq_prepare", codebooks, levels, size, dim);
  if (status == ANYGPT_OK)
    status = check_workspace_args("rvq_prepare", workspace, workspace_bytes < 0 ? 0 : static_cast<size_t>(workspace_bytes),
                                  levels, size, dim);
  if (status != ANYGPT_OK) return status;
#ifdef ANYGPT_WITH_CUDA
  return anygpt::rvq::launch_prepare(workspace, codebooks, levels, size, dim, stream);
#else
  (void)stream;
  return fail(ANYGPT_ERROR_NO_CUDA, "rvq_prepare: anygpt_engine was built without CUDA kernels (no nvcc at build time)");
#endif
}

extern "C" anygpt_status anygpt_rvq_encode_cuda(int64_t* codes, float* residual, float* quantized, const void* x,
                                                int64_t x_row_stride, anygpt_dtype x_dtype, const float* codebooks,
                                                const void* workspace, int64_t workspace_bytes, int64_t rows,
                                                int64_t dim, int64_t levels, int64_t size, void* stream) {
  anygpt_status status = check_codebook_args("rvq_encode", codebooks, levels, size, dim);
  if (status != ANYGPT_OK) return status;
  status = anygpt::rvq::check_rows("rvq_encode", rows, anygpt::rvq::kBlockM);
  if (status != ANYGPT_OK) return status;
  if (codes == nullptr || residual == nullptr || x == nullptr)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rvq_encode: codes, residual and x must be non-null pointers");
  if (dim > anygpt::rvq::kMaxDim)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rvq_encode: dim=%lld, expected <= %d (rows are kept in shared memory)",
                (long long)dim, anygpt::rvq::kMaxDim);
  if (x_row_stride < dim)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rvq_encode: x_row_stride=%lld, expected >= dim=%lld",
                (long long)x_row_stride, (long long)dim);
  if (x_dtype != ANYGPT_FLOAT32 && x_dtype != ANYGPT_FLOAT16 && x_dtype != ANYGPT_BFLOAT16)
    return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "rvq_encode: x dtype code %d, expected float32, float16 or bfloat16",
                static_cast<int>(x_dtype));
  status = check_workspace_args("rvq_encode", workspace, workspace_bytes < 0 ? 0 : static_cast<size_t>(workspace_bytes),
                                levels, size, dim);
  if (status != ANYGPT_OK) return status;
#ifdef ANYGPT_WITH_CUDA
  return anygpt::rvq::launch_encode(codes, residual, quantized, x, x_row_stride, x_dtype, codebooks, workspace, rows,
                                    dim, levels, size, stream);
#else
  (void)quantized;
  (void)stream;
  return fail(ANYGPT_ERROR_NO_CUDA, "rvq_encode: anygpt_engine was built without CUDA kernels (no nvcc at build time)");
#endif
}

extern "C" anygpt_status anygpt_rvq_decode_cuda(float* out, const int64_t* codes, const float* codebooks, int64_t rows,
                                                int64_t dim, int64_t levels, int64_t first_level, int64_t total_levels,
                                                int64_t size, void* stream) {
  anygpt_status status = check_codebook_args("rvq_decode", codebooks, total_levels, size, dim);
  if (status != ANYGPT_OK) return status;
  status = anygpt::rvq::check_rows("rvq_decode", rows, anygpt::rvq::kThreads / 32);
  if (status != ANYGPT_OK) return status;
  if (out == nullptr || codes == nullptr)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "rvq_decode: out and codes must be non-null pointers");
  if (levels < 1 || first_level < 0 || first_level > total_levels - levels)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT,
                "rvq_decode: levels=%lld from first_level=%lld, expected levels >= 1 within total_levels=%lld",
                (long long)levels, (long long)first_level, (long long)total_levels);
#ifdef ANYGPT_WITH_CUDA
  return anygpt::rvq::launch_decode(out, codes, codebooks, rows, dim, levels, first_level, size, stream);
#else
  (void)stream;
  return fail(ANYGPT_ERROR_NO_CUDA, "rvq_decode: anygpt_engine was built without CUDA kernels (no nvcc at build time)");
#endif
}
