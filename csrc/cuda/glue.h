// Helpers shared by the torch glue of the CUDA kernels (csrc/cuda/*.cpp, built only in
// CUDA builds; the kernels themselves are in the .cu files).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace shiftadd {
namespace cuda_glue {

inline void check_device(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the cuda backend, got ", t.device());
}

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The kernels' dtype tag for the dtypes the adder and packed kernels compute in.
inline ::shiftadd::cuda::DType compute_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ::shiftadd::cuda::DType::Float32;
    case at::kHalf: return ::shiftadd::cuda::DType::Float16;
    case at::kBFloat16: return ::shiftadd::cuda::DType::BFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": the cuda backend computes in float32, float16 and bfloat16, got ", t);
}

}  // namespace cuda_glue
}  // namespace shiftadd
