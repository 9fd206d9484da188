// Host launcher of the fused MaskGIT step: checks arguments, picks the instantiation for the
// logits' dtype and the codebook size (values per lane), launches one kernel.
#include <cmath>

#include "anygpt/c_api.h"
#include "anygpt/cuda_check.cuh"
#include "anygpt/maskgit.cuh"

namespace anygpt {
namespace {

template <typename T, int kPerLane>
void launch(const void* logits, const maskgit::Args& args, dim3 grid, int threads, cudaStream_t stream) {
  maskgit::step_kernel<T, kPerLane><<<grid, threads, 0, stream>>>(static_cast<const T*>(logits), args);
}

template <typename T>
void launch_for_codebook(const void* logits, const maskgit::Args& args, dim3 grid, int threads,
                         cudaStream_t stream) {
  const int per_lane = (args.codebook + 31) / 32;
  if (per_lane <= 1) launch<T, 1>(logits, args, grid, threads, stream);
  else if (per_lane <= 2) launch<T, 2>(logits, args, grid, threads, stream);
  else if (per_lane <= 4) launch<T, 4>(logits, args, grid, threads, stream);
  else if (per_lane <= 8) launch<T, 8>(logits, args, grid, threads, stream);
  else if (per_lane <= 16) launch<T, 16>(logits, args, grid, threads, stream);
  else launch<T, 32>(logits, args, grid, threads, stream);
}

}  // namespace
}  // namespace anygpt

extern "C" anygpt_status anygpt_maskgit_step_cuda(
    int64_t* codes, uint8_t* open_mask, float* confidence, int32_t* done, const void* logits,
    anygpt_dtype logits_dtype, const float* uniform, const int64_t* lengths, const int64_t* prompt_lengths,
    const int64_t* counts, const int64_t* seeds, int64_t batch, int64_t frames, int64_t levels,
    int64_t codebook_size, int64_t keep, int64_t level, int64_t counter, float divisor, int greedy, int threads,
    int rows_per_warp, void* stream) {
  using namespace anygpt;
  if (batch < 0 || frames < 0)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "maskgit_step: batch=%lld, frames=%lld, expected >= 0",
                (long long)batch, (long long)frames);
  if (batch > 65535)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "maskgit_step: batch=%lld exceeds the grid limit 65535",
                (long long)batch);
  if (levels < 1 || level < 0 || level >= levels)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "maskgit_step: levels=%lld, level=%lld, expected 0 <= level < levels",
                (long long)levels, (long long)level);
  if (codebook_size < 1 || codebook_size > 1024)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "maskgit_step: codebook_size=%lld, expected 1..1024 (one warp per row)",
                (long long)codebook_size);
  if (keep < 1 || keep > codebook_size)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "maskgit_step: keep=%lld, expected 1..codebook_size=%lld",
                (long long)keep, (long long)codebook_size);
  if (counter < 0 || counter > 0x7fffffff)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "maskgit_step: counter=%lld, expected 0..2^31-1", (long long)counter);
  if (!(divisor > 0.0f) || !std::isfinite(divisor))
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "maskgit_step: divisor=%g, expected a finite value > 0", divisor);
  if (threads < 32 || threads > maskgit::kMaxThreads || threads % 32 != 0 || rows_per_warp < 1)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT,
                "maskgit_step: threads=%d, rows_per_warp=%d, expected a multiple of 32 in 32..256 and >= 1", threads,
                rows_per_warp);
  if (logits_dtype != ANYGPT_FLOAT32 && logits_dtype != ANYGPT_FLOAT16 && logits_dtype != ANYGPT_BFLOAT16)
    return fail(ANYGPT_ERROR_UNSUPPORTED_DTYPE, "maskgit_step: dtype code %d, expected float32, float16 or bfloat16",
                logits_dtype);
  const int64_t positions = frames * levels;
  if (batch == 0 || positions == 0) return ok();
  if (!codes || !open_mask || !confidence || !done || !logits || !lengths || !prompt_lengths || !counts || !seeds)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "maskgit_step: every pointer but uniform must be non-null");
  const int64_t rows_per_block = static_cast<int64_t>(threads / 32) * rows_per_warp;
  const int64_t blocks = (positions + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffff)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "maskgit_step: %lld positions exceed the grid limit",
                (long long)positions);
  anygpt_status status = require_cuda_device("maskgit_step");
  if (status != ANYGPT_OK) return status;

  maskgit::Args args{codes, open_mask, confidence, done, uniform, lengths, prompt_lengths, counts, seeds, positions,
                     static_cast<int>(levels), static_cast<int>(codebook_size), static_cast<int>(keep),
                     static_cast<int>(level), rows_per_warp, static_cast<uint32_t>(counter), divisor, greedy != 0};
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(batch));
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (logits_dtype) {
    case ANYGPT_FLOAT32: launch_for_codebook<float>(logits, args, grid, threads, cuda_stream); break;
    case ANYGPT_FLOAT16: launch_for_codebook<__half>(logits, args, grid, threads, cuda_stream); break;
    case ANYGPT_BFLOAT16: launch_for_codebook<__nv_bfloat16>(logits, args, grid, threads, cuda_stream); break;
  }
  return check_launch("maskgit_step");
}
