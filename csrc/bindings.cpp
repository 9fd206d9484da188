// The one pybind11 bindings file: raw pointers arrive as integers (tensor.data_ptr()),
// and every non-OK status becomes a Python exception carrying the library's message.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "anygpt/c_api.h"

namespace py = pybind11;

namespace {

void* as_pointer(std::uintptr_t address) { return reinterpret_cast<void*>(address); }

void raise_on_error(anygpt_status status) {
  if (status == ANYGPT_OK) return;
  const std::string message = anygpt_last_error();
  switch (status) {
    case ANYGPT_ERROR_INVALID_ARGUMENT: throw py::value_error(message);
    case ANYGPT_ERROR_UNSUPPORTED_DTYPE: throw py::type_error(message);
    default: throw std::runtime_error(message);  // NO_CUDA and CUDA errors: RuntimeError
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "anygpt_engine C++/CUDA kernels (raw-pointer ABI; use anygpt_engine.ops instead)";
  m.attr("built_with_cuda") = py::bool_(anygpt_built_with_cuda() != 0);
  m.attr("FLOAT32") = static_cast<int>(ANYGPT_FLOAT32);
  m.attr("FLOAT16") = static_cast<int>(ANYGPT_FLOAT16);
  m.attr("BFLOAT16") = static_cast<int>(ANYGPT_BFLOAT16);

  m.def("cuda_device_count", [] {
    int count = 0;
    raise_on_error(anygpt_cuda_device_count(&count));
    return count;
  }, "Number of CUDA devices; RuntimeError when none can be used.");

  m.def("rms_norm_cpu",
        [](std::uintptr_t out, std::uintptr_t residual, std::uintptr_t x, std::uintptr_t weight, int64_t rows,
           int64_t hidden, int64_t x_row_stride, float eps, int dtype) {
          py::gil_scoped_release release;
          raise_on_error(anygpt_rms_norm_cpu(as_pointer(out), as_pointer(residual), as_pointer(x),
                                             as_pointer(weight), rows, hidden, x_row_stride, eps,
                                             static_cast<anygpt_dtype>(dtype)));
        },
        py::arg("out"), py::arg("residual"), py::arg("x"), py::arg("weight"), py::arg("rows"), py::arg("hidden"),
        py::arg("x_row_stride"), py::arg("eps"), py::arg("dtype"));

  m.def("rms_norm_cuda",
        [](std::uintptr_t out, std::uintptr_t residual, std::uintptr_t x, std::uintptr_t weight, int64_t rows,
           int64_t hidden, int64_t x_row_stride, float eps, int dtype, int threads_per_row, std::uintptr_t stream) {
          raise_on_error(anygpt_rms_norm_cuda(as_pointer(out), as_pointer(residual), as_pointer(x),
                                              as_pointer(weight), rows, hidden, x_row_stride, eps,
                                              static_cast<anygpt_dtype>(dtype), threads_per_row,
                                              as_pointer(stream)));
        },
        py::arg("out"), py::arg("residual"), py::arg("x"), py::arg("weight"), py::arg("rows"), py::arg("hidden"),
        py::arg("x_row_stride"), py::arg("eps"), py::arg("dtype"), py::arg("threads_per_row"), py::arg("stream"));

  m.def("gemv_cuda",
        [](std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t scales, std::uintptr_t zeros,
           std::uintptr_t norm_weight, int64_t m, int64_t n_out, int64_t k, int64_t x_row_stride,
           int64_t out_row_stride, float eps, int dtype, int weight_format, int epilogue, int threads,
           int row_warps, std::uintptr_t stream) {
          raise_on_error(anygpt_gemv_cuda(as_pointer(out), as_pointer(x), as_pointer(weight), as_pointer(scales),
                                          static_cast<const uint8_t*>(as_pointer(zeros)), as_pointer(norm_weight), m,
                                          n_out, k, x_row_stride, out_row_stride, eps, static_cast<anygpt_dtype>(dtype),
                                          static_cast<anygpt_weight_format>(weight_format),
                                          static_cast<anygpt_gemv_epilogue>(epilogue), threads, row_warps,
                                          as_pointer(stream)));
        },
        py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("scales"), py::arg("zeros"), py::arg("norm_weight"),
        py::arg("m"), py::arg("n_out"), py::arg("k"), py::arg("x_row_stride"), py::arg("out_row_stride"),
        py::arg("eps"), py::arg("dtype"), py::arg("weight_format"), py::arg("epilogue"), py::arg("threads"),
        py::arg("row_warps"), py::arg("stream"));

  m.def("maskgit_step_cuda",
        [](std::uintptr_t codes, std::uintptr_t open_mask, std::uintptr_t confidence, std::uintptr_t done,
           std::uintptr_t logits, int logits_dtype, std::uintptr_t uniform, std::uintptr_t lengths,
           std::uintptr_t prompt_lengths, std::uintptr_t counts, std::uintptr_t seeds, int64_t batch, int64_t frames,
           int64_t levels, int64_t codebook_size, int64_t keep, int64_t level, int64_t counter, float divisor,
           bool greedy, int threads, int rows_per_warp, std::uintptr_t stream) {
          raise_on_error(anygpt_maskgit_step_cuda(
              static_cast<int64_t*>(as_pointer(codes)), static_cast<uint8_t*>(as_pointer(open_mask)),
              static_cast<float*>(as_pointer(confidence)), static_cast<int32_t*>(as_pointer(done)),
              as_pointer(logits), static_cast<anygpt_dtype>(logits_dtype),
              static_cast<const float*>(as_pointer(uniform)), static_cast<const int64_t*>(as_pointer(lengths)),
              static_cast<const int64_t*>(as_pointer(prompt_lengths)), static_cast<const int64_t*>(as_pointer(counts)),
              static_cast<const int64_t*>(as_pointer(seeds)), batch, frames, levels, codebook_size, keep, level,
              counter, divisor, greedy ? 1 : 0, threads, rows_per_warp, as_pointer(stream)));
        },
        py::arg("codes"), py::arg("open_mask"), py::arg("confidence"), py::arg("done"), py::arg("logits"),
        py::arg("logits_dtype"), py::arg("uniform"), py::arg("lengths"), py::arg("prompt_lengths"), py::arg("counts"),
        py::arg("seeds"), py::arg("batch"), py::arg("frames"), py::arg("levels"), py::arg("codebook_size"),
        py::arg("keep"), py::arg("level"), py::arg("counter"), py::arg("divisor"), py::arg("greedy"),
        py::arg("threads"), py::arg("rows_per_warp"), py::arg("stream"));

  m.def("rvq_workspace_bytes",
        [](int64_t levels, int64_t size, int64_t dim) {
          int64_t bytes = 0;
          raise_on_error(anygpt_rvq_workspace_bytes(levels, size, dim, &bytes));
          return bytes;
        },
        py::arg("levels"), py::arg("size"), py::arg("dim"));

  m.def("rvq_prepare_cuda",
        [](std::uintptr_t workspace, int64_t workspace_bytes, std::uintptr_t codebooks, int64_t levels, int64_t size,
           int64_t dim, std::uintptr_t stream) {
          raise_on_error(anygpt_rvq_prepare_cuda(as_pointer(workspace), workspace_bytes,
                                                 static_cast<const float*>(as_pointer(codebooks)), levels, size, dim,
                                                 as_pointer(stream)));
        },
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("codebooks"), py::arg("levels"), py::arg("size"),
        py::arg("dim"), py::arg("stream"));

  m.def("rvq_encode_cuda",
        [](std::uintptr_t codes, std::uintptr_t residual, std::uintptr_t quantized, std::uintptr_t x,
           int64_t x_row_stride, int x_dtype, std::uintptr_t codebooks, std::uintptr_t workspace,
           int64_t workspace_bytes, int64_t rows, int64_t dim, int64_t levels, int64_t size, std::uintptr_t stream) {
          raise_on_error(anygpt_rvq_encode_cuda(
              static_cast<int64_t*>(as_pointer(codes)), static_cast<float*>(as_pointer(residual)),
              static_cast<float*>(as_pointer(quantized)), as_pointer(x), x_row_stride,
              static_cast<anygpt_dtype>(x_dtype), static_cast<const float*>(as_pointer(codebooks)),
              as_pointer(workspace), workspace_bytes, rows, dim, levels, size, as_pointer(stream)));
        },
        py::arg("codes"), py::arg("residual"), py::arg("quantized"), py::arg("x"), py::arg("x_row_stride"),
        py::arg("x_dtype"), py::arg("codebooks"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("rows"),
        py::arg("dim"), py::arg("levels"), py::arg("size"), py::arg("stream"));

  m.def("rvq_decode_cuda",
        [](std::uintptr_t out, std::uintptr_t codes, std::uintptr_t codebooks, int64_t rows, int64_t dim,
           int64_t levels, int64_t first_level, int64_t total_levels, int64_t size, std::uintptr_t stream) {
          raise_on_error(anygpt_rvq_decode_cuda(static_cast<float*>(as_pointer(out)),
                                                static_cast<const int64_t*>(as_pointer(codes)),
                                                static_cast<const float*>(as_pointer(codebooks)), rows, dim, levels,
                                                first_level, total_levels, size, as_pointer(stream)));
        },
        py::arg("out"), py::arg("codes"), py::arg("codebooks"), py::arg("rows"), py::arg("dim"), py::arg("levels"),
        py::arg("first_level"), py::arg("total_levels"), py::arg("size"), py::arg("stream"));

  m.def("paged_decode_attention_cuda",
        [](std::uintptr_t out, std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
           std::uintptr_t block_tables, std::uintptr_t seq_lens, std::uintptr_t workspace_out,
           std::uintptr_t workspace_lse, int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
           int64_t block_size, int64_t max_blocks, int64_t block_table_stride, int64_t num_splits, float scale,
           int dtype, int threads, std::uintptr_t stream) {
          raise_on_error(anygpt_paged_decode_attention_cuda(
              as_pointer(out), as_pointer(q), as_pointer(k_cache), as_pointer(v_cache),
              static_cast<const int64_t*>(as_pointer(block_tables)), static_cast<const int64_t*>(as_pointer(seq_lens)),
              static_cast<float*>(as_pointer(workspace_out)), static_cast<float*>(as_pointer(workspace_lse)), batch,
              num_q_heads, num_kv_heads, head_dim, block_size, max_blocks, block_table_stride, num_splits, scale,
              static_cast<anygpt_dtype>(dtype), threads, as_pointer(stream)));
        },
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("workspace_out"), py::arg("workspace_lse"), py::arg("batch"),
        py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
        py::arg("max_blocks"), py::arg("block_table_stride"), py::arg("num_splits"), py::arg("scale"),
        py::arg("dtype"), py::arg("threads"), py::arg("stream"));

  m.def("rope_kv_append_cuda",
        [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t positions, std::uintptr_t slot_mapping,
           std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t inv_freq, int64_t num_tokens,
           int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t q_token_stride,
           int64_t k_token_stride, int64_t v_token_stride, int64_t num_slots, int dtype, std::uintptr_t stream) {
          raise_on_error(anygpt_rope_kv_append_cuda(
              as_pointer(q), as_pointer(k), as_pointer(v), static_cast<const int64_t*>(as_pointer(positions)),
              static_cast<const int64_t*>(as_pointer(slot_mapping)), as_pointer(k_cache), as_pointer(v_cache),
              static_cast<const float*>(as_pointer(inv_freq)), num_tokens, num_q_heads, num_kv_heads, head_dim,
              q_token_stride, k_token_stride, v_token_stride, num_slots, static_cast<anygpt_dtype>(dtype),
              as_pointer(stream)));
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("positions"), py::arg("slot_mapping"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("inv_freq"), py::arg("num_tokens"), py::arg("num_q_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("q_token_stride"), py::arg("k_token_stride"),
        py::arg("v_token_stride"), py::arg("num_slots"), py::arg("dtype"), py::arg("stream"));

  m.def("sample_tokens_cuda",
        [](std::uintptr_t logits, int64_t logits_row_stride, std::uintptr_t slots, std::uintptr_t out,
           std::uintptr_t scratch, std::uintptr_t temperature, std::uintptr_t top_k, std::uintptr_t top_p,
           std::uintptr_t repetition_penalty, std::uintptr_t min_new_tokens, std::uintptr_t seeds,
           std::uintptr_t generated, std::uintptr_t open_modality, std::uintptr_t stop_mask, std::uintptr_t seen,
           std::uintptr_t allowed, std::uintptr_t opens, std::uintptr_t closes, int64_t batch, int64_t vocab,
           int64_t num_slots, int64_t num_states, bool random, bool use_top_k, bool use_top_p, bool use_penalty,
           int threads, std::uintptr_t stream) {
          raise_on_error(anygpt_sample_tokens_cuda(
              static_cast<const float*>(as_pointer(logits)), logits_row_stride,
              static_cast<const int64_t*>(as_pointer(slots)), static_cast<int64_t*>(as_pointer(out)),
              static_cast<float*>(as_pointer(scratch)), static_cast<const float*>(as_pointer(temperature)),
              static_cast<const int64_t*>(as_pointer(top_k)), static_cast<const float*>(as_pointer(top_p)),
              static_cast<const float*>(as_pointer(repetition_penalty)),
              static_cast<const int64_t*>(as_pointer(min_new_tokens)), static_cast<const int64_t*>(as_pointer(seeds)),
              static_cast<int64_t*>(as_pointer(generated)), static_cast<int64_t*>(as_pointer(open_modality)),
              static_cast<const uint8_t*>(as_pointer(stop_mask)), static_cast<uint8_t*>(as_pointer(seen)),
              static_cast<const uint8_t*>(as_pointer(allowed)), static_cast<const int64_t*>(as_pointer(opens)),
              static_cast<const int64_t*>(as_pointer(closes)), batch, vocab, num_slots, num_states, random ? 1 : 0,
              use_top_k ? 1 : 0, use_top_p ? 1 : 0, use_penalty ? 1 : 0, threads, as_pointer(stream)));
        },
        py::arg("logits"), py::arg("logits_row_stride"), py::arg("slots"), py::arg("out"), py::arg("scratch"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("repetition_penalty"),
        py::arg("min_new_tokens"), py::arg("seeds"), py::arg("generated"), py::arg("open_modality"),
        py::arg("stop_mask"), py::arg("seen"), py::arg("allowed"), py::arg("opens"), py::arg("closes"),
        py::arg("batch"), py::arg("vocab"), py::arg("num_slots"), py::arg("num_states"), py::arg("random"),
        py::arg("use_top_k"), py::arg("use_top_p"), py::arg("use_penalty"), py::arg("threads"), py::arg("stream"));
}
