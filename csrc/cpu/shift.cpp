// CPU implementations of the shiftadd power-of-two quantizers (schemas: shiftadd/_ops.py;
// rules: DeepShift, see shiftadd/reference/shift.py for the same rules in PyTorch).
//
//   quantize_pot_q(w, b, noise)      sign(w) * 2^round(log2 clamp(|w|, 2^-(2^(b-1)-1), 1))
//   quantize_pot_ps(P, S, b, noise)  sign(round(S)) * 2^round(clamp(P, -(2^(b-1)-2), 0))
//   round_to_fixed(x, i, f)          clamp(floor(x 2^f) 2^-f, -2^(i-1), 2^(i-1) - 1)
//
// round() is half-to-even (torch.round); with `noise` u in [0, 1) it is stochastic,
// floor(v) + (u < frac(v)).  round(log2 a) is computed exactly from the IEEE exponent
// and mantissa, without log2; 2^p from the exponent bits.
// Shift linear/conv on the CPU use ATen's matmul/conv on the decoded weight (Python side).

#include <cmath>
#include <cstring>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "shiftadd.h"

namespace shiftadd {
namespace cpu {
namespace {

constexpr int64_t kGrain = 16384;

// Exact helpers on IEEE doubles, written without libm calls so the loops vectorise.
inline uint64_t bits_of(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}
inline double from_bits(uint64_t b) {
  double v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// round(log2 a) for a normal, positive double, exactly: a = m 2^e with m in [1, 2), and
// log2 m >= 1/2  <=>  m^2 >= 2.
inline int64_t round_log2(double a) {
  const uint64_t b = bits_of(a);
  const int64_t e = (int64_t)((b >> 52) & 0x7ff) - 1023;
  const double m = from_bits((b & 0xfffffffffffffULL) | (1023ULL << 52));
  return e + (m * m >= 2.0 ? 1 : 0);
}

// 2^p for an integer p in the normal range, exactly.
inline double exp2_int(int64_t p) { return from_bits((uint64_t)(p + 1023) << 52); }

// Round half to even (torch.round) in the default rounding mode, for |v| < 2^52.
inline double round_even(double v) {
  const double magic = 4503599627370496.0;  // 2^52
  const double r = (std::fabs(v) + magic) - magic;
  return std::copysign(r, v);
}

// floor(v) exactly in precision A (float or double).
template <typename A>
inline A floor_exact(A v) {
  const A magic = std::is_same<A, double>::value ? (A)4503599627370496.0 : (A)8388608.0;  // 2^52 or 2^23
  if (!(std::fabs(v) < magic)) return v;  // already an integer (or inf / NaN)
  const A t = std::copysign((std::fabs(v) + magic) - magic, v);
  return t > v ? t - A(1) : t;
}

inline double stochastic_floor(double v, double u) {
  const double fl = floor_exact(v);
  return fl + (u < v - fl ? 1.0 : 0.0);
}

void check_noise(const char* op, const at::Tensor& ref, const c10::optional<at::Tensor>& noise) {
  if (!noise.has_value()) return;
  TORCH_CHECK(noise->sizes() == ref.sizes(), op, ": noise must have the shape of the weight ", ref.sizes(), ", got ",
              noise->sizes());
  TORCH_CHECK(noise->scalar_type() == ref.scalar_type(), op, ": noise dtype ", noise->scalar_type(),
              " does not match ", ref.scalar_type());
  TORCH_CHECK(noise->device() == ref.device(), op, ": noise is on ", noise->device(), ", weight on ", ref.device());
}

void check_bits(const char* op, int64_t weight_bits) {
  TORCH_CHECK(weight_bits >= 2 && weight_bits <= 8, op, ": weight_bits must be in [2, 8], got ", weight_bits);
}

template <typename F>
void elementwise(at::Tensor& out, F f) {
  at::parallel_for(0, out.numel(), kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) f(i);
  });
}

at::Tensor quantize_pot_q(const at::Tensor& weight, int64_t weight_bits, const c10::optional<at::Tensor>& noise) {
  const char* op = "shiftadd::quantize_pot_q";
  check_bits(op, weight_bits);
  TORCH_CHECK(weight.is_floating_point(), op, ": weight must be floating point, got ", weight.scalar_type());
  check_noise(op, weight, noise);
  const int64_t min_p = -((int64_t(1) << (weight_bits - 1)) - 1);
  const double lo = std::ldexp(1.0, (int)min_p);
  const at::Tensor w = weight.contiguous();
  at::Tensor u = noise.has_value() ? noise->contiguous() : at::Tensor();
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quantize_pot_q", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* up = u.defined() ? u.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    elementwise(out, [&](int64_t i) {
      const double v = static_cast<double>(wp[i]);
      const double a = std::min(std::max(std::fabs(v), lo), 1.0);
      int64_t p = up ? (int64_t)stochastic_floor(std::log2(a), static_cast<double>(up[i])) : round_log2(a);
      p = std::min<int64_t>(std::max<int64_t>(p, min_p), 0);
      const double r = exp2_int(p);
      const double q = v > 0 ? r : (v < 0 ? -r : 0.0);
      op_[i] = static_cast<scalar_t>(v != v ? v : q);  // NaN stays NaN
    });
  });
  return out;
}

at::Tensor quantize_pot_ps(const at::Tensor& shift, const at::Tensor& sign, int64_t weight_bits,
                           const c10::optional<at::Tensor>& noise) {
  const char* op = "shiftadd::quantize_pot_ps";
  check_bits(op, weight_bits);
  TORCH_CHECK(shift.is_floating_point(), op, ": shift must be floating point, got ", shift.scalar_type());
  TORCH_CHECK(sign.scalar_type() == shift.scalar_type(), op, ": sign dtype ", sign.scalar_type(),
              " does not match shift dtype ", shift.scalar_type());
  TORCH_CHECK(sign.sizes() == shift.sizes(), op, ": sign shape ", sign.sizes(), " does not match shift shape ",
              shift.sizes());
  TORCH_CHECK(sign.device() == shift.device(), op, ": sign is on ", sign.device(), ", shift on ", shift.device());
  check_noise(op, shift, noise);
  const double min_p = -(double)((int64_t(1) << (weight_bits - 1)) - 2);
  const at::Tensor P = shift.contiguous(), S = sign.contiguous();
  at::Tensor u = noise.has_value() ? noise->contiguous() : at::Tensor();
  at::Tensor out = at::empty(shift.sizes(), shift.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(), "quantize_pot_ps", [&] {
    const scalar_t* pp = P.const_data_ptr<scalar_t>();
    const scalar_t* sp = S.const_data_ptr<scalar_t>();
    const scalar_t* up = u.defined() ? u.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    elementwise(out, [&](int64_t i) {
      const double pv = static_cast<double>(pp[i]), sv = static_cast<double>(sp[i]);
      const double pc = std::min(std::max(pv, min_p), 0.0);
      const double p = up ? stochastic_floor(pc, static_cast<double>(up[i])) : round_even(pc);
      // sign(round(S)) with round half to even: 0 for |S| <= 1/2
      const double s = sv > 0.5 ? 1.0 : (sv < -0.5 ? -1.0 : 0.0);
      const double w = s * exp2_int((int64_t)p);
      op_[i] = static_cast<scalar_t>(pv != pv || sv != sv ? (double)NAN : w);
    });
  });
  return out;
}

at::Tensor round_to_fixed(const at::Tensor& x, int64_t int_bits, int64_t frac_bits) {
  const char* op = "shiftadd::round_to_fixed";
  TORCH_CHECK(x.is_floating_point(), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(int_bits >= 1 && int_bits <= 64, op, ": int_bits must be in [1, 64], got ", int_bits);
  TORCH_CHECK(frac_bits >= 0 && frac_bits <= 64, op, ": frac_bits must be in [0, 64], got ", frac_bits);
  const double hi = std::ldexp(1.0, (int)int_bits - 1) - 1.0, lo = -std::ldexp(1.0, (int)int_bits - 1);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "round_to_fixed", [&] {
    // computed in the tensor's own precision (float for the 16-bit types), as the reference
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const acc_t ahi = (acc_t)hi, alo = (acc_t)lo;
    const acc_t scale = std::ldexp(acc_t(1), (int)frac_bits), inv = std::ldexp(acc_t(1), -(int)frac_bits);
    elementwise(out, [&](int64_t i) {
      // x * 2^f and * 2^-f are exact (ldexp), floor is exact
      acc_t v = floor_exact(static_cast<acc_t>(xp[i]) * scale) * inv;
      v = ahi < v ? ahi : v;  // NaN passes through, as torch.clamp
      v = alo > v ? alo : v;
      op_[i] = static_cast<scalar_t>(v);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(shiftadd, CPU, m) {
  m.impl("quantize_pot_q", &quantize_pot_q);
  m.impl("quantize_pot_ps", &quantize_pot_ps);
  m.impl("round_to_fixed", &round_to_fixed);
}

}  // namespace cpu
}  // namespace shiftadd
