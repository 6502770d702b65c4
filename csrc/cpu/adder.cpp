// CPU implementations of the shiftadd adder operators (schemas: shiftadd/_ops.py).
//
// The kernels in adder_kernels.inc are compiled three times, for AVX-512, AVX2+FMA and a
// generic baseline, and the widest one the CPU supports is chosen at run time
// (shiftadd._C.set_cpu_isa() overrides, for tests).  float and double run natively;
// float16 and bfloat16 inputs are computed in float and cast back.
//
// In AdderNet mode the weight gradient is one GEMM plus a rank-1 correction,
//   dW = g^T X - W * sum_r g[r, :],
// so it uses ATen's matmul / convolution weight-gradient; the exact (sign) mode has its
// own kernel.

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "shiftadd.h"

#if SHIFTADD_X86
#include <immintrin.h>
#endif

namespace shiftadd {
namespace cpu {

namespace generic {
#define SA_VB 16
#define SA_MR 6
#include "cpu/adder_kernels.inc"
#undef SA_VB
#undef SA_MR
}  // namespace generic

#if SHIFTADD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define SA_VB 32
#define SA_MR 6
#include "cpu/adder_kernels.inc"
#undef SA_VB
#undef SA_MR
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
namespace avx512 {
#define SA_VB 64
#define SA_MR 12
#include "cpu/adder_kernels.inc"
#undef SA_VB
#undef SA_MR
}  // namespace avx512
#pragma GCC pop_options
#endif

// The kernels of one dtype for the instruction set in use.
template <typename T>
struct Kernels {
  void (*forward)(const Geom&, const T*, const T*, T*, const int64_t*);
  void (*grad_input_hardtanh)(const Geom&, const T*, const T*, const T*, int64_t, T*, const int64_t*);
  void (*grad_input_sign)(const Geom&, const T*, const T*, const T*, int64_t, T*, const int64_t*);
  void (*grad_weight_sign)(const Geom&, const T*, const T*, const T*, int64_t, T*, bool);
  void (*grad_input_direct_hardtanh)(const Geom&, const T*, const T*, const T*, const int64_t*, T*, const int64_t*);
  void (*grad_input_direct_sign)(const Geom&, const T*, const T*, const T*, const int64_t*, T*, const int64_t*);
  void (*grad_weight_direct_sign)(const Geom&, const T*, const T*, const T*, const int64_t*, T*);
};

#define SA_KERNELS(NS) \
  Kernels<T>{&NS::adder_forward<T>, &NS::adder_grad_input<T, false>, &NS::adder_grad_input<T, true>, \
             &NS::adder_grad_weight_exact<T>, &NS::adder_grad_input_direct<T, false>,          \
             &NS::adder_grad_input_direct<T, true>, &NS::adder_grad_weight_exact_direct<T>}

template <typename T>
Kernels<T> kernels() {
#if SHIFTADD_X86
  switch (current_isa()) {
    case Isa::Avx512: return SA_KERNELS(avx512);
    case Isa::Avx2: return SA_KERNELS(avx2);
    default: break;
  }
#endif
  return SA_KERNELS(generic);
}
#undef SA_KERNELS

namespace {

// float16 / bfloat16 are computed in float.
at::Tensor compute_copy(const at::Tensor& t) {
  return (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) ? t : t.to(at::kFloat);
}

void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the cpu backend, got ", t.device());
}

at::Tensor empty_output(const at::Tensor& like_x, at::IntArrayRef sizes, at::ScalarType dtype) {
  auto opts = like_x.options().dtype(dtype);
  if (sizes.size() == 4 && wants_channels_last(like_x))
    return at::empty(sizes, opts.memory_format(at::MemoryFormat::ChannelsLast));
  return at::empty(sizes, opts);
}

// grad_out (N, O, Ho, Wo) or (N, O) -> rows [R][O + pad], pad zero-filled.
at::Tensor grad_rows(const at::Tensor& grad, const Geom& g, int64_t pad) {
  at::Tensor rows = at::zeros({g.R(), g.O + pad}, grad.options());
  at::Tensor view = rows.narrow(1, 0, g.O);
  if (grad.dim() == 4)
    view.view({g.N, g.Ho, g.Wo, g.O}).copy_(grad.permute({0, 2, 3, 1}));
  else
    view.copy_(grad);
  return rows;
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x, const Geom& g) {
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad_out dtype ", grad.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  check_cpu(op, grad, "grad_out");
  if (x.dim() == 4) {
    TORCH_CHECK(grad.dim() == 4 && grad.size(0) == g.N && grad.size(1) == g.O && grad.size(2) == g.Ho &&
                    grad.size(3) == g.Wo,
                op, ": grad_out must have shape (", g.N, ", ", g.O, ", ", g.Ho, ", ", g.Wo, "), got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == g.N && grad.size(1) == g.O, op, ": grad_out must have shape (",
                g.N, ", ", g.O, "), got ", grad.sizes());
  }
}

at::Tensor forward_impl(const char* op, const at::Tensor& x_in, const at::Tensor& w_in, Geom g, bool conv) {
  check_float_pair(op, x_in, w_in);
  check_cpu(op, x_in, "x");
  const at::Tensor x = compute_copy(x_in), w = compute_copy(w_in).contiguous();
  // strides may change when float16 input is cast
  if (conv) {
    g.xsN = x.stride(0); g.xsC = x.stride(1); g.xsH = x.stride(2); g.xsW = x.stride(3);
  } else {
    g.xsN = x.stride(0); g.xsC = x.stride(1);
  }
  std::vector<int64_t> sizes = conv ? std::vector<int64_t>{g.N, g.O, g.Ho, g.Wo} : std::vector<int64_t>{g.N, g.O};
  // the memory format follows the caller's x (a float copy of a non-dense half tensor may differ)
  at::Tensor y = empty_output(x_in, sizes, x.scalar_type());
  if (y.numel() > 0) {
    if (g.K == 0) {
      y.zero_();
    } else {
      int64_t ys[4] = {y.stride(0), y.stride(1), conv ? y.stride(2) : 0, conv ? y.stride(3) : 0};
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adder_forward_cpu", [&] {
        kernels<scalar_t>().forward(g, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                    y.mutable_data_ptr<scalar_t>(), ys);
      });
    }
  }
  return y.scalar_type() == x_in.scalar_type() ? y : y.to(x_in.scalar_type());
}

// An algorithm forced through an environment variable: "gemm", "direct" or "auto" (unset).
std::string algo_override(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr ? "auto" : env;
}

// Grad-input algorithm: "direct" (a gather over taps, adder_grad_input_direct) for
// stride-1 convolutions with a kernel larger than 1x1 and at most 128 output channels per
// group (measured on AVX-512: 1.7-2.4x the GEMM path for 16-64 channels, on par at 256;
// a 1x1 kernel has no taps to share), else "gemm" (im2col panels, then col2im).  The
// environment variable SHIFTADD_CPU_GRAD_INPUT=gemm|direct|auto overrides the rule (for
// tests and benchmarks; direct still needs stride 1).
bool use_direct_grad_input(const Geom& g, bool conv) {
  if (!conv || g.sh != 1 || g.sw != 1) return false;
  const std::string algo = algo_override("SHIFTADD_CPU_GRAD_INPUT");
  return algo == "direct" || (algo != "gemm" && g.khw() > 1 && g.Og <= 128);
}

at::Tensor grad_input_impl(const char* op, const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
                           Geom g, c10::string_view grad_mode) {
  const GradMode mode = parse_grad_mode(grad_mode);
  check_float_pair(op, x_in, w_in);
  check_cpu(op, x_in, "x");
  check_grad(op, grad_in, x_in, g);
  const at::Tensor x = compute_copy(x_in), w = compute_copy(w_in).contiguous(), grad = compute_copy(grad_in);
  const bool conv = x.dim() == 4;
  g.xsN = x.stride(0); g.xsC = x.stride(1);
  if (conv) { g.xsH = x.stride(2); g.xsW = x.stride(3); }
  at::Tensor dx = empty_output(x_in, x.sizes(), x.scalar_type());
  const bool direct = use_direct_grad_input(g, conv);
  if (!direct || g.R() == 0 || g.O == 0) dx.zero_();  // the direct kernel assigns every element
  if (dx.numel() > 0 && g.R() > 0 && g.O > 0) {
    int64_t dxs[4] = {dx.stride(0), dx.stride(1), conv ? dx.stride(2) : 0, conv ? dx.stride(3) : 0};
    if (direct) {
      const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adder_grad_input_cpu", [&] {
        const auto k = kernels<scalar_t>();
        (mode == GradMode::Exact ? k.grad_input_direct_sign : k.grad_input_direct_hardtanh)(
            g, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), gs,
            dx.mutable_data_ptr<scalar_t>(), dxs);
      });
    } else {
      const at::Tensor rows = grad_rows(grad, g, 0);
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adder_grad_input_cpu", [&] {
        const auto k = kernels<scalar_t>();
        (mode == GradMode::Exact ? k.grad_input_sign : k.grad_input_hardtanh)(
            g, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), rows.const_data_ptr<scalar_t>(),
            rows.stride(0), dx.mutable_data_ptr<scalar_t>(), dxs);
      });
    }
  }
  return dx.scalar_type() == x_in.scalar_type() ? dx : dx.to(x_in.scalar_type());
}

// Every element of a (possibly strided) 2-D or 4-D CPU tensor is finite.
template <typename T>
bool all_finite(const at::Tensor& t) {
  const bool conv = t.dim() == 4;
  const int64_t sizes[4] = {t.size(0), t.size(1), conv ? t.size(2) : 1, conv ? t.size(3) : 1};
  const int64_t strides[4] = {t.stride(0), t.stride(1), conv ? t.stride(2) : 0, conv ? t.stride(3) : 0};
  const T* p = t.const_data_ptr<T>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, sizes[0] * sizes[1], 1, [&](int64_t a, int64_t b) {
    bool fin = true;
    for (int64_t i = a; i < b && fin; i++) {
      const T* q = p + (i / sizes[1]) * strides[0] + (i % sizes[1]) * strides[1];
      for (int64_t y = 0; y < sizes[2]; y++)
        for (int64_t x = 0; x < sizes[3]; x++) fin &= std::isfinite(q[y * strides[2] + x * strides[3]]);
    }
    if (!fin) ok = false;
  });
  return ok;
}

// Exact weight-gradient algorithm: "direct" (lanes over output columns, no im2col panel;
// adder_grad_weight_exact_direct) for stride-1 convolutions with a kernel larger than 1x1,
// at most 32 output channels per group and a finite grad_out, else "gemm" (im2col panels,
// lanes over output channels).  Measured on AVX-512, 2 cores: 32x16x32x32 -> 16 direct
// 19.5 G/s vs gemm 7.5; 32x32x16x16 -> 32 18.1 vs 16.0; 32x64x8x8 -> 64 9.9 vs 21.3 (8
// output columns fill half a vector).  SHIFTADD_CPU_GRAD_WEIGHT=gemm|direct|auto overrides the
// rule (direct still needs stride 1 and a finite grad_out).
bool use_direct_grad_weight(const Geom& g, bool conv) {
  if (!conv || g.sh != 1 || g.sw != 1) return false;
  const std::string algo = algo_override("SHIFTADD_CPU_GRAD_WEIGHT");
  return algo == "direct" || (algo != "gemm" && g.khw() > 1 && g.Og <= 32);
}

at::Tensor grad_weight_exact(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const Geom& g) {
  at::Tensor dw = at::zeros(w.sizes(), w.options());
  if (dw.numel() == 0 || g.R() == 0) return dw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adder_grad_weight_cpu", [&] {
    const auto k = kernels<scalar_t>();
    // a finite grad_out (the usual case) allows the cheaper sign-accumulate and the direct kernel
    const bool finite_g = all_finite<scalar_t>(grad);
    if (finite_g && use_direct_grad_weight(g, x.dim() == 4)) {
      const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
      k.grad_weight_direct_sign(g, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                grad.const_data_ptr<scalar_t>(), gs, dw.mutable_data_ptr<scalar_t>());
      return;
    }
    // zero tail: the widest kernel loads two 64-byte vectors of outputs from the last block
    const at::Tensor rows = grad_rows(grad, g, 2 * 64 / (int64_t)x.element_size());
    k.grad_weight_sign(g, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), rows.const_data_ptr<scalar_t>(),
                       rows.stride(0), dw.mutable_data_ptr<scalar_t>(), finite_g);
  });
  return dw;
}

}  // namespace

// ---------------------------------------------------------------------------------
// Linear: x (N, K), weight (O, K) -> (N, O)
// ---------------------------------------------------------------------------------

at::Tensor adder_linear(const at::Tensor& x, const at::Tensor& weight, c10::string_view grad_mode) {
  parse_grad_mode(grad_mode);
  const Geom g = make_linear_geom("shiftadd::adder_linear", x, weight);
  return forward_impl("shiftadd::adder_linear", x, weight, g, false);
}

at::Tensor adder_linear_grad_input(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                   c10::string_view grad_mode) {
  const Geom g = make_linear_geom("shiftadd::adder_linear_grad_input", x, weight);
  return grad_input_impl("shiftadd::adder_linear_grad_input", grad, x, weight, g, grad_mode);
}

at::Tensor adder_linear_grad_weight(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
                                    c10::string_view grad_mode) {
  const char* op = "shiftadd::adder_linear_grad_weight";
  const GradMode mode = parse_grad_mode(grad_mode);
  Geom g = make_linear_geom(op, x_in, w_in);
  check_float_pair(op, x_in, w_in);
  check_cpu(op, x_in, "x");
  check_grad(op, grad_in, x_in, g);
  const at::Tensor x = compute_copy(x_in), w = compute_copy(w_in).contiguous(), grad = compute_copy(grad_in);
  at::Tensor dw;
  if (mode == GradMode::AdderNet) {
    // sum_n g[n,o] (x[n,k] - w[o,k]) = (g^T x)[o,k] - w[o,k] * sum_n g[n,o]
    dw = at::mm(grad.t(), x) - w * grad.sum(0).unsqueeze(1);
  } else {
    g.xsN = x.stride(0); g.xsC = x.stride(1);
    dw = grad_weight_exact(grad, x, w, g);
  }
  return dw.scalar_type() == w_in.scalar_type() ? dw : dw.to(w_in.scalar_type());
}

// ---------------------------------------------------------------------------------
// Conv2d: x (N, C, H, W), weight (O, C/groups, kh, kw) -> (N, O, Ho, Wo)
// ---------------------------------------------------------------------------------

at::Tensor adder_conv2d(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, c10::string_view grad_mode) {
  parse_grad_mode(grad_mode);
  const Geom g = make_conv_geom("shiftadd::adder_conv2d", x, weight, stride, padding, dilation, groups);
  return forward_impl("shiftadd::adder_conv2d", x, weight, g, true);
}

at::Tensor adder_conv2d_grad_input(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, c10::string_view grad_mode) {
  const char* op = "shiftadd::adder_conv2d_grad_input";
  const Geom g = make_conv_geom(op, x, weight, stride, padding, dilation, groups);
  return grad_input_impl(op, grad, x, weight, g, grad_mode);
}

at::Tensor adder_conv2d_grad_weight(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, c10::string_view grad_mode) {
  const char* op = "shiftadd::adder_conv2d_grad_weight";
  const GradMode mode = parse_grad_mode(grad_mode);
  Geom g = make_conv_geom(op, x_in, w_in, stride, padding, dilation, groups);
  check_float_pair(op, x_in, w_in);
  check_cpu(op, x_in, "x");
  check_grad(op, grad_in, x_in, g);
  const at::Tensor x = compute_copy(x_in), w = compute_copy(w_in).contiguous(), grad = compute_copy(grad_in);
  at::Tensor dw;
  if (mode == GradMode::AdderNet) {
    // sum_r g[r,o] (X[r,k] - W[o,k]): the first term is the convolution weight-gradient
    // (padded X are zeros there too), the second a rank-1 correction.
    if (g.R() == 0) return at::zeros_like(w_in, at::MemoryFormat::Contiguous);
    auto grads = at::convolution_backward(grad, x, w, c10::nullopt, stride, padding, dilation, false, {0, 0}, groups,
                                          {false, true, false});
    dw = std::get<1>(grads).contiguous() - w * grad.sum({0, 2, 3}).view({g.O, 1, 1, 1});
  } else {
    g.xsN = x.stride(0); g.xsC = x.stride(1); g.xsH = x.stride(2); g.xsW = x.stride(3);
    dw = grad_weight_exact(grad, x, w, g);
  }
  return dw.scalar_type() == w_in.scalar_type() ? dw : dw.to(w_in.scalar_type());
}

TORCH_LIBRARY_IMPL(shiftadd, CPU, m) {
  m.impl("adder_linear", &adder_linear);
  m.impl("adder_linear_grad_input", &adder_linear_grad_input);
  m.impl("adder_linear_grad_weight", &adder_linear_grad_weight);
  m.impl("adder_conv2d", &adder_conv2d);
  m.impl("adder_conv2d_grad_input", &adder_conv2d_grad_input);
  m.impl("adder_conv2d_grad_weight", &adder_conv2d_grad_weight);
}

}  // namespace cpu
}  // namespace shiftadd
