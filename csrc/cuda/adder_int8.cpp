// CUDA implementation of shiftadd::adder_linear_int8 (schema: shiftadd/_ops.py): the torch
// glue around csrc/cuda/adder_int8_kernels.cu.  Compiled only in CUDA builds.  Same checks
// (csrc/shiftadd.h) and result, exactly, as csrc/cpu/adder_int8.cpp.

#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/glue.h"
#include "cuda/kernels.h"
#include "shiftadd.h"

namespace shiftadd {
namespace cuda_glue {
namespace {

at::Tensor adder_linear_int8(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "shiftadd::adder_linear_int8";
  check_adder_int8(op, x, weight);
  check_device(op, x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), K = x.size(1), O = weight.size(0);
  at::Tensor y = at::empty({N, O}, x.options().dtype(at::kInt));
  if (N == 0 || O == 0) return y;
  if (K == 0) return y.zero_();
  // unit column stride: rows are read as byte runs
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor wc = weight.stride(1) == 1 ? weight : weight.contiguous();
  check_launch(op, ::shiftadd::cuda::adder_linear_int8(xc.const_data_ptr<int8_t>(), xc.stride(0),
                                                      wc.const_data_ptr<int8_t>(), wc.stride(0),
                                                      y.mutable_data_ptr<int32_t>(), N, O, K,
                                                      c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(shiftadd, CUDA, m) { m.impl("adder_linear_int8", &adder_linear_int8); }

}  // namespace cuda_glue
}  // namespace shiftadd
