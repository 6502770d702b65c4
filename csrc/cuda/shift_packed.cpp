// CUDA implementation of shiftadd::shift_linear_packed (schema: shiftadd/_ops.py; layout:
// shiftadd/packed.py): the torch glue around csrc/cuda/shift_packed_kernels.cu.  Compiled
// only in CUDA builds.
//
// 4-bit codes, K % 8 == 0, batch <= 16: the packed GEMV kernel (codes read once, decoded in
// registers).  Everything else (8/16-bit codes, odd K, larger batches): the weight is
// decoded once per call into float32 (every weight exact, as the reference decodes) and
// multiplied by cuBLAS in float32.

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

namespace k = ::shiftadd::cuda;

at::Tensor shift_linear_packed(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                               const at::Tensor& zero_codes, int64_t bits, int64_t out_features, int64_t in_features,
                               const c10::optional<at::Tensor>& bias) {
  const char* op = "shiftadd::shift_linear_packed";
  const int64_t rb = check_packed(op, codes, scales, zero_codes, bits, out_features, in_features);
  check_packed_input(op, x, bias, out_features, in_features);
  check_device(op, x, "x");
  for (const at::Tensor* t : {&codes, &scales, &zero_codes})
    TORCH_CHECK(t->device() == x.device(), op, ": the packed weight is on ", t->device(), ", x on ", x.device());
  const k::DType dt = compute_dtype(op, x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), O = out_features, K = in_features;
  at::Tensor y = at::empty({N, O}, x.options());
  if (N == 0 || O == 0) return y;
  if (K == 0) {
    if (bias.has_value()) y.copy_(bias->expand({N, O}));
    else y.zero_();
    return y;
  }
  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous(), zc = zero_codes.contiguous();
  const c10::optional<at::Tensor> bc = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (k::packed_gemv_supported((int)bits, N, O, K, cc.const_data_ptr(), rb)) {
    const at::Tensor xc = x.stride(1) == 1 && x.stride(0) >= K ? x : x.contiguous();
    check_launch(op, k::packed_gemv(dt, xc.const_data_ptr(), xc.stride(0), cc.const_data_ptr<uint8_t>(), rb,
                                    sc.const_data_ptr<int32_t>(), zc.const_data_ptr<int32_t>(),
                                    bc.has_value() ? bc->const_data_ptr() : nullptr, y.mutable_data_ptr(), y.stride(0),
                                    N, O, K, stream));
    return y;
  }
  const at::ScalarType wt = at::kFloat;  // every decoded weight exactly, as the reference
  at::Tensor w = at::empty({O, K}, x.options().dtype(wt));
  check_launch(op, k::packed_decode(compute_dtype(op, wt), cc.const_data_ptr<uint8_t>(), rb,
                                    sc.const_data_ptr<int32_t>(), zc.const_data_ptr<int32_t>(), (int)bits,
                                    w.mutable_data_ptr(), O, K, stream));
  const at::Tensor xa = x.to(wt);
  const at::Tensor out = bc.has_value() ? at::addmm(bc->to(wt), xa, w.t()) : at::mm(xa, w.t());
  y.copy_(out);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(shiftadd, CUDA, m) {
  m.impl("shift_linear_packed", &shift_linear_packed);
}

}  // namespace cuda_glue
}  // namespace shiftadd
