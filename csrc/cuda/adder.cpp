// CUDA implementations of the shiftadd adder operators (schemas: shiftadd/_ops.py): the
// torch glue around the kernels of csrc/cuda/adder_kernels.cu.  Compiled only in CUDA
// builds (setup.py adds csrc/cuda/*.cpp with SHIFTADD_WITH_CUDA).
//
// Same functions as csrc/cpu/adder.cpp: argument checks (shared, csrc/shiftadd.h),
// output memory formats (channels-last exactly when x is channels-last and not also
// contiguous), zeros for empty reductions, and the AdderNet-mode weight gradient through
// ATen (one GEMM / convolution weight-gradient plus a rank-1 correction).  dtypes:
// float32, float16 and bfloat16, accumulated in float32; float64 is not computed on the
// GPU (the dispatcher sends it to another backend).
//
// Index limits: the kernels count rows, positions and weight elements in 32 bits;
// adder_check_sizes names the quantity when a tensor is too large, and the op raises.

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

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

// Kernel choice, for tests: SHIFTADD_CUDA_ALGO = auto (default) | tiled | direct.
k::Algo algo_from_env() {
  const char* v = std::getenv("SHIFTADD_CUDA_ALGO");
  if (v == nullptr) return k::Algo::Auto;
  const std::string s(v);
  if (s == "tiled") return k::Algo::Tiled;
  if (s == "direct") return k::Algo::Direct;
  return k::Algo::Auto;
}

// Kernel choices (kernels.h, Tuning; unset: split-K off, fit, sat):
//   SHIFTADD_CUDA_SPLIT_K = auto (the occupancy rule) | off | N (at most N splits, for tests)
//   SHIFTADD_CUDA_TILES   = fit (forward tiles fitted to the channels) | classic
//   SHIFTADD_CUDA_GIN     = sat (AdderNet-mode grad input in the saturate form) | clamp
k::Tuning tuning_from_env() {
  k::Tuning t;
  const char* v = std::getenv("SHIFTADD_CUDA_SPLIT_K");
  if (v != nullptr && *v != '\0') {
    const std::string s(v);
    if (s == "off") {
      t.split_k = 0;
    } else if (s != "auto") {
      char* end = nullptr;
      const long n = std::strtol(v, &end, 10);
      TORCH_CHECK(end != v && *end == '\0' && n >= 0 && n <= 65535,
                  "SHIFTADD_CUDA_SPLIT_K must be auto, off or a number of splits in [0, 65535], got '", s, "'");
      t.split_k = static_cast<int>(n);
    }
  }
  const char* tv = std::getenv("SHIFTADD_CUDA_TILES");
  if (tv != nullptr && *tv != '\0') {
    const std::string s(tv);
    TORCH_CHECK(s == "fit" || s == "classic", "SHIFTADD_CUDA_TILES must be fit or classic, got '", s, "'");
    t.fit_tiles = s == "fit";
  }
  const char* gv = std::getenv("SHIFTADD_CUDA_GIN");
  if (gv != nullptr && *gv != '\0') {
    const std::string s(gv);
    TORCH_CHECK(s == "sat" || s == "clamp", "SHIFTADD_CUDA_GIN must be sat or clamp, got '", s, "'");
    t.sat_gin = s == "sat";
  }
  return t;
}

k::ConvGeom to_kernel_geom(const Geom& g) {
  k::ConvGeom c;
  c.N = g.N; c.C = g.C; c.H = g.H; c.W = g.W;
  c.xsN = g.xsN; c.xsC = g.xsC; c.xsH = g.xsH; c.xsW = g.xsW;
  c.O = g.O; c.kh = g.kh; c.kw = g.kw;
  c.sh = g.sh; c.sw = g.sw; c.ph = g.ph; c.pw = g.pw; c.dh = g.dh; c.dw = g.dw; c.G = g.G;
  c.Ho = g.Ho; c.Wo = g.Wo; c.Cg = g.Cg; c.Og = g.Og; c.K = g.K;
  return c;
}

void check_sizes(const char* op, const k::ConvGeom& c) {
  const char* msg = k::adder_check_sizes(c);
  TORCH_CHECK(msg == nullptr, op, ": ", (msg ? msg : ""),
              "; this is too large for the CUDA kernels' 32-bit indexing (split the batch, or use another backend)");
}

at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

at::Tensor empty_output(const at::Tensor& like_x, at::IntArrayRef sizes) {
  auto opts = like_x.options();
  if (sizes.size() == 4 && wants_channels_last(like_x))
    return at::empty(sizes, opts.memory_format(at::MemoryFormat::ChannelsLast));
  return at::empty(sizes, opts);
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x, const Geom& g) {
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad_out dtype ", grad.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  check_device(op, grad, "grad_out");
  TORCH_CHECK(grad.device() == x.device(), op, ": grad_out is on ", grad.device(), " but x is on ", x.device());
  if (x.dim() == 4) {
    TORCH_CHECK(grad.dim() == 4 && grad.size(0) == g.N && grad.size(1) == g.O && grad.size(2) == g.Ho &&
                    grad.size(3) == g.Wo,
                op, ": grad_out must have shape (", g.N, ", ", g.O, ", ", g.Ho, ", ", g.Wo, "), got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == g.N && grad.size(1) == g.O, op, ": grad_out must have shape (",
                g.N, ", ", g.O, "), got ", grad.sizes());
  }
}

// grad_out (N, O, Ho, Wo) or (N, O) -> float32 (O, R), contiguous: the layout both
// gradient kernels read (consecutive rows r of one channel are adjacent).
at::Tensor grad_columns(const at::Tensor& grad, const Geom& g) {
  at::Tensor gt = at::empty({g.O, g.R()}, grad.options().dtype(at::kFloat));
  if (grad.dim() == 4)
    gt.view({g.O, g.N, g.Ho, g.Wo}).copy_(grad.permute({1, 0, 2, 3}));
  else
    gt.copy_(grad.t());
  return gt;
}

at::Tensor forward_impl(const char* op, const at::Tensor& x, const at::Tensor& w_in, const Geom& g, bool conv,
                        bool fp16x2 = false) {
  check_float_pair(op, x, w_in);
  check_device(op, x, "x");
  const k::DType dt = compute_dtype(op, x.scalar_type());
  TORCH_CHECK(!fp16x2 || dt == k::DType::Float16, op, ": x and weight must be float16 (fp16x2 arithmetic), got ",
              x.scalar_type());
  const k::ConvGeom cg = to_kernel_geom(g);
  check_sizes(op, cg);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = w_in.contiguous();
  std::vector<int64_t> sizes = conv ? std::vector<int64_t>{g.N, g.O, g.Ho, g.Wo} : std::vector<int64_t>{g.N, g.O};
  at::Tensor y = empty_output(x, sizes);
  if (y.numel() == 0) return y;
  if (g.K == 0) return y.zero_();
  const int64_t ys[4] = {y.stride(0), y.stride(1), conv ? y.stride(2) : 0, conv ? y.stride(3) : 0};
  const k::Algo algo = fp16x2 ? k::Algo::Fp16x2 : algo_from_env();
  const k::Tuning tune = tuning_from_env();
  const size_t bytes = k::adder_forward_workspace(cg, algo, tune);
  at::Tensor ws = workspace(x, bytes);
  check_launch(op, k::adder_forward(cg, dt, x.const_data_ptr(), w.const_data_ptr(), y.mutable_data_ptr(), ys,
                                    ws.mutable_data_ptr(), bytes, algo, tune,
                                    c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

at::Tensor grad_input_impl(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w_in,
                           const Geom& g, c10::string_view grad_mode) {
  const GradMode mode = parse_grad_mode(grad_mode);
  check_float_pair(op, x, w_in);
  check_device(op, x, "x");
  check_grad(op, grad, x, g);
  const k::DType dt = compute_dtype(op, x.scalar_type());
  const k::ConvGeom cg = to_kernel_geom(g);
  check_sizes(op, cg);
  c10::cuda::CUDAGuard guard(x.device());
  const bool conv = x.dim() == 4;
  at::Tensor dx = empty_output(x, x.sizes());
  if (dx.numel() == 0) return dx;
  if (g.R() == 0 || g.O == 0) return dx.zero_();
  const at::Tensor w = w_in.contiguous();
  const at::Tensor gt = grad_columns(grad, g);
  const int64_t dxs[4] = {dx.stride(0), dx.stride(1), conv ? dx.stride(2) : 0, conv ? dx.stride(3) : 0};
  const k::Algo algo = algo_from_env();
  const k::Tuning tune = tuning_from_env();
  const size_t bytes = k::adder_grad_input_workspace(cg, algo, tune);
  at::Tensor ws = workspace(x, bytes);
  check_launch(op, k::adder_grad_input(cg, dt, mode == GradMode::Exact, gt.const_data_ptr<float>(),
                                       x.const_data_ptr(), w.const_data_ptr(), dx.mutable_data_ptr(), dxs,
                                       ws.mutable_data_ptr(), bytes, algo, tune,
                                       c10::cuda::getCurrentCUDAStream().stream()));
  return dx;
}

// Exact (sign) weight gradient, (O, Cg, kh, kw) or (O, K), contiguous, dtype of w.
at::Tensor grad_weight_exact(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w_in,
                             const Geom& g) {
  const k::DType dt = compute_dtype(op, x.scalar_type());
  const k::ConvGeom cg = to_kernel_geom(g);
  check_sizes(op, cg);
  const at::Tensor w = w_in.contiguous();
  if (w.numel() == 0 || g.R() == 0) return at::zeros(w.sizes(), w.options());
  at::Tensor dw = at::empty(w.sizes(), w.options());
  const at::Tensor gt = grad_columns(grad, g);
  const k::Algo algo = algo_from_env();
  const size_t bytes = k::adder_grad_weight_workspace(cg, algo);
  at::Tensor ws = workspace(x, bytes);
  check_launch(op, k::adder_grad_weight_exact(cg, dt, gt.const_data_ptr<float>(), x.const_data_ptr(),
                                              w.const_data_ptr(), dw.mutable_data_ptr(), ws.mutable_data_ptr(),
                                              bytes, algo, c10::cuda::getCurrentCUDAStream().stream()));
  return dw;
}

// float16 / bfloat16 AdderNet weight gradients are computed in float32 (as on the CPU):
// the GEMM term and the rank-1 correction nearly cancel.
at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
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

// float16 only: the forward in half2 arithmetic (kernels.h, Algo::Fp16x2); its gradients are
// those of adder_linear (shiftadd/_ops.py registers the autograd).
at::Tensor adder_linear_fp16x2(const at::Tensor& x, const at::Tensor& weight, c10::string_view grad_mode) {
  parse_grad_mode(grad_mode);
  const Geom g = make_linear_geom("shiftadd::adder_linear_fp16x2", x, weight);
  return forward_impl("shiftadd::adder_linear_fp16x2", x, weight, g, false, true);
}

at::Tensor adder_linear_grad_input(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                   c10::string_view grad_mode) {
  const Geom g = make_linear_geom("shiftadd::adder_linear_grad_input", x, weight);
  return grad_input_impl("shiftadd::adder_linear_grad_input", grad, x, weight, g, grad_mode);
}

at::Tensor adder_linear_grad_weight(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
                                    c10::string_view grad_mode) {
  const char* op = "shiftadd::adder_linear_grad_weight";
  const GradMode mode = parse_grad_mode(grad_mode);
  const Geom g = make_linear_geom(op, x, w);
  check_float_pair(op, x, w);
  check_device(op, x, "x");
  check_grad(op, grad, x, g);
  compute_dtype(op, x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  if (mode == GradMode::Exact) return grad_weight_exact(op, grad, x, w, g);
  // sum_n g[n,o] (x[n,k] - w[o,k]) = (g^T x)[o,k] - w[o,k] * sum_n g[n,o]
  const at::Tensor gf = as_float(grad), wf = as_float(w);
  const at::Tensor dw = at::mm(gf.t(), as_float(x)) - wf * gf.sum(0).unsqueeze(1);
  return dw.scalar_type() == w.scalar_type() ? dw.contiguous() : dw.to(w.scalar_type()).contiguous();
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

at::Tensor adder_conv2d_fp16x2(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               c10::string_view grad_mode) {
  parse_grad_mode(grad_mode);
  const Geom g = make_conv_geom("shiftadd::adder_conv2d_fp16x2", x, weight, stride, padding, dilation, groups);
  return forward_impl("shiftadd::adder_conv2d_fp16x2", x, weight, g, true, true);
}

at::Tensor adder_conv2d_grad_input(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, c10::string_view grad_mode) {
  const char* op = "shiftadd::adder_conv2d_grad_input";
  const Geom g = make_conv_geom(op, x, weight, stride, padding, dilation, groups);
  return grad_input_impl(op, grad, x, weight, g, grad_mode);
}

at::Tensor adder_conv2d_grad_weight(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, c10::string_view grad_mode) {
  const char* op = "shiftadd::adder_conv2d_grad_weight";
  const GradMode mode = parse_grad_mode(grad_mode);
  const Geom g = make_conv_geom(op, x, w, stride, padding, dilation, groups);
  check_float_pair(op, x, w);
  check_device(op, x, "x");
  check_grad(op, grad, x, g);
  compute_dtype(op, x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  if (mode == GradMode::Exact) return grad_weight_exact(op, grad, x, w, g);
  // sum_r g[r,o] (X[r,k] - W[o,k]): the first term is the convolution weight-gradient
  // (padded X are zeros there too), the second a rank-1 correction.
  if (g.R() == 0 || w.numel() == 0) return at::zeros_like(w, at::MemoryFormat::Contiguous);
  const at::Tensor gf = as_float(grad), xf = as_float(x), wf = as_float(w);
  auto grads = at::convolution_backward(gf, xf, wf, c10::nullopt, stride, padding, dilation, false, {0, 0}, groups,
                                        {false, true, false});
  const at::Tensor dw = std::get<1>(grads).contiguous() - wf.contiguous() * gf.sum({0, 2, 3}).view({g.O, 1, 1, 1});
  return dw.scalar_type() == w.scalar_type() ? dw.contiguous() : dw.to(w.scalar_type()).contiguous();
}

TORCH_LIBRARY_IMPL(shiftadd, CUDA, m) {
  m.impl("adder_linear", &adder_linear);
  m.impl("adder_linear_grad_input", &adder_linear_grad_input);
  m.impl("adder_linear_grad_weight", &adder_linear_grad_weight);
  m.impl("adder_conv2d", &adder_conv2d);
  m.impl("adder_conv2d_grad_input", &adder_conv2d_grad_input);
  m.impl("adder_conv2d_grad_weight", &adder_conv2d_grad_weight);
  m.impl("adder_linear_fp16x2", &adder_linear_fp16x2);
  m.impl("adder_conv2d_fp16x2", &adder_conv2d_fp16x2);
}

}  // namespace cuda_glue
}  // namespace shiftadd
