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
}
