// Shared declarations of the shiftadd compiled extension: argument checks and the conv
// geometry that every adder kernel (CPU and CUDA) works from.  Schemas are defined in
// Python (shiftadd/_ops.py); the C++ files only register implementations.
#pragma once

#include <cstdint>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace shiftadd {

// Geometry of an adder conv2d seen as an implicit GEMM: rows r = (n, oy, ox), columns
// o (output channel inside a group), reduction k = (c, i, j) inside a group.  A linear
// layer is the special case H = W = kh = kw = 1.  All indices are 64-bit.
struct Geom {
  int64_t N = 0, C = 0, H = 1, W = 1;          // input
  int64_t xsN = 0, xsC = 0, xsH = 0, xsW = 0;  // input strides, elements (any layout)
  int64_t O = 0, kh = 1, kw = 1;               // weight O x (C/G) x kh x kw
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, G = 1;
  int64_t Ho = 1, Wo = 1;                      // output spatial size
  int64_t Cg = 0, Og = 0, K = 0;               // per-group channels and reduction length

  int64_t L() const { return Ho * Wo; }
  int64_t R() const { return N * Ho * Wo; }
  int64_t khw() const { return kh * kw; }
};

enum class GradMode { AdderNet, Exact };

inline GradMode parse_grad_mode(c10::string_view s) {
  if (s == "addernet") return GradMode::AdderNet;
  if (s == "exact") return GradMode::Exact;
  TORCH_CHECK(false, "shiftadd: grad_mode must be 'addernet' or 'exact', got '", std::string(s), "'");
}

// True when the output should be channels-last: the rule shared with the fake kernels
// in shiftadd/_ops.py (`_conv_memory_format`), so fake and real strides agree.
inline bool wants_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_float_pair(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": weight dtype ", w.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  TORCH_CHECK(w.device() == x.device(), op, ": weight is on ", w.device(), " but x is on ", x.device());
}

// The quantized adder (adder_linear_int8): x (N, K) and weight (O, K) int8 -> (N, O) int32.
// |x - w| <= 255, so the exact sum fits in int32 up to this K (the Python side has the same
// limit: shiftadd/reference/adder.py ADDER_INT8_MAX_K).
constexpr int64_t kAdderInt8MaxK = 2147483647LL / 255;

inline void check_adder_int8(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kChar, op, ": x must be int8, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kChar, op, ": weight must be int8, got ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N, K), got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D (O, K), got ", w.dim(), "-D");
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x has ", x.size(1), " features, weight expects ", w.size(1));
  TORCH_CHECK(x.size(1) <= kAdderInt8MaxK, op, ": K = ", x.size(1), " exceeds ", kAdderInt8MaxK,
              ", beyond which the int32 sum could overflow");
  TORCH_CHECK(x.device() == w.device(), op, ": weight is on ", w.device(), " but x is on ", x.device());
}

// Argument checks of the power-of-two quantizers, shared by the CPU and CUDA
// implementations (csrc/cpu/shift.cpp, csrc/cuda/shift.cpp).
inline void check_noise(const char* op, const at::Tensor& ref, const c10::optional<at::Tensor>& noise) {
  if (!noise.has_value()) return;
  TORCH_CHECK(noise->sizes() == ref.sizes(), op, ": noise must have the shape of the weight ", ref.sizes(), ", got ",
              noise->sizes());
  TORCH_CHECK(noise->scalar_type() == ref.scalar_type(), op, ": noise dtype ", noise->scalar_type(),
              " does not match ", ref.scalar_type());
  TORCH_CHECK(noise->device() == ref.device(), op, ": noise is on ", noise->device(), ", weight on ", ref.device());
}

inline void check_out_dtype(const char* op, const c10::optional<at::ScalarType>& out_dtype) {
  TORCH_CHECK(!out_dtype.has_value() || *out_dtype == at::kFloat || *out_dtype == at::kDouble ||
                  *out_dtype == at::kHalf || *out_dtype == at::kBFloat16,
              op, ": out_dtype must be float32, float64, float16, bfloat16 or None, got ", *out_dtype);
}

inline void check_quantize_q(const char* op, const at::Tensor& weight, int64_t weight_bits,
                             const c10::optional<at::Tensor>& noise, const c10::optional<at::ScalarType>& out_dtype) {
  TORCH_CHECK(weight_bits >= 2 && weight_bits <= 8, op, ": weight_bits must be in [2, 8], got ", weight_bits);
  TORCH_CHECK(weight.is_floating_point(), op, ": weight must be floating point, got ", weight.scalar_type());
  check_noise(op, weight, noise);
  check_out_dtype(op, out_dtype);
}

inline void check_quantize_ps(const char* op, const at::Tensor& shift, const at::Tensor& sign, int64_t weight_bits,
                              const c10::optional<at::Tensor>& noise, const c10::optional<at::ScalarType>& out_dtype) {
  TORCH_CHECK(weight_bits >= 2 && weight_bits <= 8, op, ": weight_bits must be in [2, 8], got ", weight_bits);
  TORCH_CHECK(shift.is_floating_point(), op, ": shift must be floating point, got ", shift.scalar_type());
  TORCH_CHECK(sign.scalar_type() == shift.scalar_type(), op, ": sign dtype ", sign.scalar_type(),
              " does not match shift dtype ", shift.scalar_type());
  TORCH_CHECK(sign.sizes() == shift.sizes(), op, ": sign shape ", sign.sizes(), " does not match shift shape ",
              shift.sizes());
  TORCH_CHECK(sign.device() == shift.device(), op, ": sign is on ", sign.device(), ", shift on ", shift.device());
  check_noise(op, shift, noise);
  check_out_dtype(op, out_dtype);
}

inline void check_round_to_fixed(const char* op, const at::Tensor& x, int64_t int_bits, int64_t frac_bits) {
  TORCH_CHECK(x.is_floating_point(), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(int_bits >= 1 && int_bits <= 64, op, ": int_bits must be in [1, 64], got ", int_bits);
  TORCH_CHECK(frac_bits >= 0 && frac_bits <= 64, op, ": frac_bits must be in [0, 64], got ", frac_bits);
}

// Arguments of the packed power-of-two linear (layout: shiftadd/packed.py), shared by the
// CPU and CUDA implementations; returns the bytes per row of codes.  Devices are the
// caller's to check.
inline int64_t check_packed(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                            const at::Tensor& zero_codes, int64_t bits, int64_t O, int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 8 || bits == 16, op, ": bits must be 4, 8 or 16, got ", bits);
  TORCH_CHECK(O >= 0 && K >= 0, op, ": out_features and in_features must be >= 0, got ", O, ", ", K);
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kInt, op, ": scales must be int32, got ", scales.scalar_type());
  TORCH_CHECK(zero_codes.scalar_type() == at::kInt, op, ": zero_codes must be int32, got ", zero_codes.scalar_type());
  const int64_t rb = bits == 4 ? (K + 1) / 2 : K * (bits / 8);
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == O && codes.size(1) == rb, op, ": codes must have shape (", O, ", ",
              rb, ") for ", O, "x", K, " ", bits, "-bit codes, got ", codes.sizes());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == O, op, ": scales must have shape (", O, ",), got ",
              scales.sizes());
  TORCH_CHECK(zero_codes.dim() == 1 && zero_codes.size(0) == O, op, ": zero_codes must have shape (", O, ",), got ",
              zero_codes.sizes());
  return rb;
}

// x (N, K) floating point and bias (O,) of x's dtype, for the packed linear.
inline void check_packed_input(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t O,
                               int64_t K) {
  TORCH_CHECK(x.is_floating_point(), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, op, ": x must be (N, ", K, "), got ", x.sizes());
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
              " does not match x dtype ", x.scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == O, op, ": bias must have shape (", O, ",), got ", bias->sizes());
  TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), ", x on ", x.device());
}

// Builds and validates the conv geometry; `op` names the operator in error messages.
inline Geom make_conv_geom(const char* op, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 4, op, ": weight must be 4-D (O, C/groups, kh, kw), got ", w.dim(), "-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 elements");
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ", dilation);
  // below 2^31 each, so that the extents below cannot overflow int64
  const int64_t lim = (int64_t(1) << 31) - 1;
  TORCH_CHECK(stride[0] <= lim && stride[1] <= lim && padding[0] <= lim && padding[1] <= lim && dilation[0] <= lim &&
                  dilation[1] <= lim,
              op, ": stride, padding and dilation must be below 2^31, got ", stride, ", ", padding, ", ", dilation);
  TORCH_CHECK(w.size(2) > 0 && w.size(3) > 0, op, ": weight's kernel size must be positive, got ", w.size(2), "x",
              w.size(3));
  TORCH_CHECK(x.size(2) <= lim && x.size(3) <= lim && w.size(2) <= lim && w.size(3) <= lim, op,
              ": input and kernel height and width must be below 2^31");
  Geom g;
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.xsN = x.stride(0); g.xsC = x.stride(1); g.xsH = x.stride(2); g.xsW = x.stride(3);
  g.O = w.size(0); g.kh = w.size(2); g.kw = w.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1]; g.G = groups;
  TORCH_CHECK(g.C % groups == 0, op, ": input channels (", g.C, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(g.O % groups == 0, op, ": output channels (", g.O, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(w.size(1) * groups == g.C, op, ": weight has ", w.size(1), " input channels per group but x has ",
              g.C, " channels and groups=", groups);
  g.Cg = g.C / groups; g.Og = g.O / groups; g.K = g.Cg * g.kh * g.kw;
  const int64_t eh = g.dh * (g.kh - 1) + 1, ew = g.dw * (g.kw - 1) + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= eh && g.W + 2 * g.pw >= ew, op, ": padded input (", g.H + 2 * g.ph, "x",
              g.W + 2 * g.pw, ") is smaller than the dilated kernel (", eh, "x", ew, ")");
  g.Ho = (g.H + 2 * g.ph - eh) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - ew) / g.sw + 1;
  return g;
}

inline Geom make_linear_geom(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N, K), got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D (O, K), got ", w.dim(), "-D");
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x has ", x.size(1), " features but weight expects ", w.size(1));
  Geom g;
  g.N = x.size(0); g.C = x.size(1); g.xsN = x.stride(0); g.xsC = x.stride(1);
  g.O = w.size(0); g.Cg = g.C; g.Og = g.O; g.K = g.C;
  return g;
}

}  // namespace shiftadd
