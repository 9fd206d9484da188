// Host launchers of the RVQ kernels (anygpt/rvq.cuh). The C ABI in rvq_cpu.cpp checks the
// arguments first; these only need a device, pick instantiations and report launch errors.
#include <cstdint>

#include "anygpt/cuda_check.cuh"
#include "anygpt/rvq.cuh"

namespace anygpt {
namespace rvq {
namespace {

template <typename TX>
anygpt_status encode_with(const EncodeArgs& args, cudaStream_t stream) {
  const size_t smem = encode_smem_bytes(args.dim_pad);
  const cudaError_t err =
      cudaFuncSetAttribute(encode_kernel<TX>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess)
    return fail(ANYGPT_ERROR_CUDA, "rvq_encode: dim=%d needs %zu bytes of shared memory per block: %s", args.dim,
                smem, cudaGetErrorString(err));
  const int64_t blocks = (args.rows + kBlockM - 1) / kBlockM;
  encode_kernel<TX><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(args);
  return check_launch("rvq_encode");
}

}  // namespace

anygpt_status launch_prepare(void* workspace, const float* codebooks, int64_t levels, int64_t size, int64_t dim,
                             void* stream) {
  anygpt_status status = require_cuda_device("rvq_prepare");
  if (status != ANYGPT_OK) return status;
  const WorkspaceLayout layout = workspace_layout(levels, size, dim);
  auto* base = static_cast<unsigned char*>(workspace);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  // The per-level maxima are raised with atomicMax from zero.
  const cudaError_t err = cudaMemsetAsync(base + layout.emax, 0, layout.bytes - layout.emax, cuda_stream);
  if (err != cudaSuccess) return fail(ANYGPT_ERROR_CUDA, "rvq_prepare: cudaMemsetAsync failed: %s", cudaGetErrorString(err));
  const int64_t words = levels * size;
  const int64_t blocks = (words + kThreads / 32 - 1) / (kThreads / 32);
  prepare_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, cuda_stream>>>(
      reinterpret_cast<__nv_bfloat16*>(base + layout.low), reinterpret_cast<float*>(base + layout.norms),
      reinterpret_cast<unsigned*>(base + layout.emax), reinterpret_cast<unsigned*>(base + layout.demax), codebooks,
      levels, size, static_cast<int>(dim), static_cast<int>(padded_dim(dim)));
  return check_launch("rvq_prepare");
}

anygpt_status launch_encode(int64_t* codes, float* residual, float* quantized, const void* x, int64_t x_row_stride,
                            anygpt_dtype x_dtype, const float* codebooks, const void* workspace, int64_t rows,
                            int64_t dim, int64_t levels, int64_t size, void* stream) {
  anygpt_status status = require_cuda_device("rvq_encode");
  if (status != ANYGPT_OK) return status;
  const WorkspaceLayout layout = workspace_layout(levels, size, dim);
  const auto* base = static_cast<const unsigned char*>(workspace);
  EncodeArgs args;
  args.codes = codes;
  args.residual = residual;
  args.quantized = quantized;
  args.x = x;
  args.x_row_stride = x_row_stride;
  args.codebooks = codebooks;
  args.low = reinterpret_cast<const __nv_bfloat16*>(base + layout.low);
  args.norms = reinterpret_cast<const float*>(base + layout.norms);
  args.emax = reinterpret_cast<const float*>(base + layout.emax);
  args.demax = reinterpret_cast<const float*>(base + layout.demax);
  args.rows = rows;
  args.dim = static_cast<int>(dim);
  args.dim_pad = static_cast<int>(padded_dim(dim));
  args.levels = static_cast<int>(levels);
  args.size = static_cast<int>(size);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case ANYGPT_FLOAT32: return encode_with<float>(args, cuda_stream);
    case ANYGPT_FLOAT16: return encode_with<__half>(args, cuda_stream);
    case ANYGPT_BFLOAT16: return encode_with<__nv_bfloat16>(args, cuda_stream);
  }
  return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "rvq_encode: x dtype code %d, expected float32, float16 or bfloat16",
              static_cast<int>(x_dtype));
}

anygpt_status launch_decode(float* out, const int64_t* codes, const float* codebooks, int64_t rows, int64_t dim,
                            int64_t levels, int64_t first_level, int64_t size, void* stream) {
  anygpt_status status = require_cuda_device("rvq_decode");
  if (status != ANYGPT_OK) return status;
  const bool vec4 = dim % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(codebooks) % 16 == 0;
  const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  auto kernel = vec4 ? decode_kernel<true> : decode_kernel<false>;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, codes, codebooks, rows, static_cast<int>(dim), static_cast<int>(levels), static_cast<int>(first_level),
      static_cast<int>(size));
  return check_launch("rvq_decode");
}

}  // namespace rvq
}  // namespace anygpt
