// Host launcher of the fused sampling kernel: checks arguments, picks the block size, launches
// one block per row (no host sync; the launch shape depends only on the batch size).
#include "anygpt/c_api.h"
#include "anygpt/cuda_check.cuh"
#include "anygpt/sampling.cuh"

namespace anygpt {
namespace {

template <int kThreads>
void launch(const sampling::Args& args, int64_t batch, cudaStream_t stream) {
  sampling::sample_kernel<kThreads><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(args);
}

}  // namespace
}  // namespace anygpt

extern "C" anygpt_status anygpt_sample_tokens_cuda(
    const float* logits, int64_t logits_row_stride, const int64_t* slots, int64_t* out, float* scratch,
    const float* temperature, const int64_t* top_k, const float* top_p, const float* repetition_penalty,
    const int64_t* min_new_tokens, const int64_t* seeds, int64_t* generated, int64_t* open_modality,
    const uint8_t* stop_mask, uint8_t* seen, const uint8_t* allowed, const int64_t* opens, const int64_t* closes,
    int64_t batch, int64_t vocab, int64_t num_slots, int64_t num_states, int random, int use_top_k, int use_top_p,
    int use_penalty, int threads, void* stream) {
  using namespace anygpt;
  if (batch < 0 || batch > 0x7fffffff)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "sample_tokens: batch=%lld, expected 0..2^31-1", (long long)batch);
  if (vocab < 1 || vocab > 0x7ffffffe)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "sample_tokens: vocab=%lld, expected 1..2^31-2", (long long)vocab);
  if (num_slots < 1 || num_states < 1)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "sample_tokens: num_slots=%lld, num_states=%lld, expected >= 1",
                (long long)num_slots, (long long)num_states);
  if (batch > 1 && logits_row_stride < vocab)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "sample_tokens: logits_row_stride=%lld, expected >= vocab=%lld",
                (long long)logits_row_stride, (long long)vocab);
  if (threads != 256 && threads != 512 && threads != 1024)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "sample_tokens: threads=%d, expected 256, 512 or 1024", threads);
  if (batch == 0) return ok();
  if (!logits || !slots || !out || !temperature || !top_k || !top_p || !repetition_penalty || !min_new_tokens ||
      !seeds || !generated || !open_modality || !stop_mask || !seen || !allowed || !opens || !closes)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "sample_tokens: every pointer but scratch must be non-null");
  if (random && !scratch)
    return fail(ANYGPT_ERROR_INVALID_ARGUMENT, "sample_tokens: scratch [batch, vocab] float32 is needed when random");
  anygpt_status status = require_cuda_device("sample_tokens");
  if (status != ANYGPT_OK) return status;

  const sampling::Args args{logits, logits_row_stride, slots, out, scratch, temperature, top_k, top_p,
                            repetition_penalty, min_new_tokens, seeds, generated, open_modality, stop_mask, seen,
                            allowed, opens, closes, num_slots, num_states, vocab, random != 0, use_top_k != 0,
                            use_top_p != 0, use_penalty != 0};
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (threads) {
    case 256: launch<256>(args, batch, cuda_stream); break;
    case 512: launch<512>(args, batch, cuda_stream); break;
    default: launch<1024>(args, batch, cuda_stream); break;
  }
  return check_launch("sample_tokens");
}
