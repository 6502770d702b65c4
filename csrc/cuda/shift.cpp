// CUDA implementations of the shiftadd power-of-two quantizers (schemas: shiftadd/_ops.py):
// the torch glue around csrc/cuda/shift_kernels.cu.  Compiled only in CUDA builds.
//
// Same functions, checks and results (bit for bit) as csrc/cpu/shift.cpp:
//   quantize_pot_q(w, b, noise)      sign(w) * 2^round(log2 clamp(|w|, 2^-(2^(b-1)-1), 1))
//   quantize_pot_ps(P, S, b, noise)  sign(round(S)) * 2^round(clamp(P, -(2^(b-1)-2), 0))
//   round_to_fixed(x, i, f)          clamp(floor(x 2^f) 2^-f, -2^(i-1), 2^(i-1) - 1)
// All four floating dtypes; outputs are contiguous, of the input's shape and dtype (the
// quantizers: out_dtype, default the input's).

#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
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

k::DType float_dtype(const char* op, at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return k::DType::Float32;
    case at::kDouble: return k::DType::Float64;
    case at::kHalf: return k::DType::Float16;
    case at::kBFloat16: return k::DType::BFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", t);
}

}  // namespace

at::Tensor quantize_pot_q(const at::Tensor& weight, int64_t weight_bits, const c10::optional<at::Tensor>& noise,
                          c10::optional<at::ScalarType> out_dtype) {
  const char* op = "shiftadd::quantize_pot_q";
  check_quantize_q(op, weight, weight_bits, noise, out_dtype);
  check_device(op, weight, "weight");
  const k::DType dt = float_dtype(op, weight.scalar_type(), "weight");
  const at::ScalarType ot = out_dtype.value_or(weight.scalar_type());
  const k::DType odt = float_dtype(op, ot, "out_dtype");
  c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor u = noise.has_value() ? noise->contiguous() : at::Tensor();
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(ot).memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  check_launch(op, k::quantize_pot_q(dt, odt, w.const_data_ptr(), u.defined() ? u.const_data_ptr() : nullptr,
                                     out.mutable_data_ptr(), out.numel(), static_cast<int>(weight_bits),
                                     c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor quantize_pot_ps(const at::Tensor& shift, const at::Tensor& sign, int64_t weight_bits,
                           const c10::optional<at::Tensor>& noise, c10::optional<at::ScalarType> out_dtype) {
  const char* op = "shiftadd::quantize_pot_ps";
  check_quantize_ps(op, shift, sign, weight_bits, noise, out_dtype);
  check_device(op, shift, "shift");
  const k::DType dt = float_dtype(op, shift.scalar_type(), "shift");
  const at::ScalarType ot = out_dtype.value_or(shift.scalar_type());
  const k::DType odt = float_dtype(op, ot, "out_dtype");
  c10::cuda::CUDAGuard guard(shift.device());
  const at::Tensor P = shift.contiguous(), S = sign.contiguous();
  const at::Tensor u = noise.has_value() ? noise->contiguous() : at::Tensor();
  at::Tensor out = at::empty(shift.sizes(), shift.options().dtype(ot).memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  check_launch(op, k::quantize_pot_ps(dt, odt, P.const_data_ptr(), S.const_data_ptr(),
                                      u.defined() ? u.const_data_ptr() : nullptr, out.mutable_data_ptr(), out.numel(),
                                      static_cast<int>(weight_bits), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor round_to_fixed(const at::Tensor& x, int64_t int_bits, int64_t frac_bits) {
  const char* op = "shiftadd::round_to_fixed";
  check_round_to_fixed(op, x, int_bits, frac_bits);
  check_device(op, x, "x");
  const k::DType dt = float_dtype(op, x.scalar_type(), "x");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  check_launch(op, k::round_to_fixed(dt, xc.const_data_ptr(), out.mutable_data_ptr(), out.numel(),
                                     static_cast<int>(int_bits), static_cast<int>(frac_bits),
                                     c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

TORCH_LIBRARY_IMPL(shiftadd, CUDA, m) {
  m.impl("quantize_pot_q", &quantize_pot_q);
  m.impl("quantize_pot_ps", &quantize_pot_ps);
  m.impl("round_to_fixed", &round_to_fixed);
}

}  // namespace cuda_glue
}  // namespace shiftadd
