// CPU implementations of the shiftadd power-of-two quantizers (schemas: shiftadd/_ops.py;
// rules: DeepShift, see shiftadd/reference/shift.py for the same rules in PyTorch).
//
//   quantize_pot_q(w, b, noise)      sign(w) * 2^round(log2 clamp(|w|, 2^-(2^(b-1)-1), 1))
//   quantize_pot_ps(P, S, b, noise)  sign(round(S)) * 2^round(clamp(P, -(2^(b-1)-2), 0))
//   round_to_fixed(x, i, f)          clamp(floor(x 2^f) 2^-f, -2^(i-1), 2^(i-1) - 1)
//
// The quantizers write out_dtype (default: the input's): the exact double result is
// converted once (see to_out and compute_out below).
// round() is half-to-even (torch.round); with `noise` u in [0, 1) it is stochastic,
// floor(v) + (u < frac(v)).  round(log2 a) is computed exactly from the IEEE exponent
// and mantissa, without log2; 2^p from the exponent bits.  The element loops are plain
// loops over __restrict pointers with branch-free selects: with -fno-trapping-math
// (setup.py) GCC vectorises them.
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

// 2^p for an integer p in the normal range, exactly.
inline double exp2_int(int64_t p) { return from_bits((uint64_t)(p + 1023) << 52); }

// Round half to even (torch.round) in the default rounding mode, for |v| < 2^52.
inline double round_even(double v) {
  const double magic = 4503599627370496.0;  // 2^52
  const double r = (std::fabs(v) + magic) - magic;
  return std::copysign(r, v);
}

// floor(v) exactly in precision A (float or double), branch-free so that loops vectorise:
// round to an integer by adding and subtracting 2^52 (2^23), step down where that rounded
// up; values of magnitude >= 2^52 (2^23) are integers already (inf and NaN pass through).
template <typename A>
inline A floor_exact(A v) {
  const A magic = std::is_same<A, double>::value ? (A)4503599627370496.0 : (A)8388608.0;  // 2^52 or 2^23
  const A ax = std::fabs(v);
  A t = std::copysign((ax + magic) - magic, v);
  t = t > v ? t - A(1) : t;
  return ax < magic ? t : v;
}

// 2^p for an integer-valued double p in the normal range, from the bits: p + 1023 lands in
// the low mantissa bits of (p + 1023) + 2^52 (no double-to-int conversion, which SSE2
// cannot vectorise).
inline double exp2_of_integral(double p) {
  const uint64_t b = bits_of((p + 1023.0) + 4503599627370496.0);
  return from_bits((b & 0x7ffULL) << 52);
}

inline double stochastic_floor(double v, double u) {
  const double fl = floor_exact(v);
  return fl + (u < v - fl ? 1.0 : 0.0);
}

// The element loops: plain loops over __restrict pointers, so that they vectorise (a
// lambda called per element through captured pointers did not: the stores could alias).
// The output of a quantizer, from its exact double value (a signed power of two, 0 or NaN):
// static_cast, except for bfloat16, whose value is then exactly the top half of the
// float's bits (a zero mantissa survives the truncation; a NaN keeps its quiet bit), a
// shift that vectorises where c10::BFloat16's rounding constructor does not.
template <typename O>
inline O to_out(double v) {
  return static_cast<O>(v);
}
template <>
inline at::BFloat16 to_out<at::BFloat16>(double v) {
  const float f = static_cast<float>(v);
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return at::BFloat16(static_cast<uint16_t>(b >> 16), at::BFloat16::from_bits());
}
template <typename T, typename O>
void q_deterministic(const T* __restrict w, O* __restrict out, int64_t n, double lo, int64_t) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    const double v = static_cast<double>(w[i]);
    // a in [2^min_p, 1] is a normal double: a = m 2^e, m in [1, 2); round(log2 a) is e + [m^2 >= 2],
    // so 2^round(log2 a) is 2^e, doubled when m^2 >= 2; it stays inside [2^min_p, 1] (no clamp).
    const double a = std::min(std::max(std::fabs(v), lo), 1.0);
    const uint64_t b = bits_of(a);
    const double pe = from_bits(b & 0x7ff0000000000000ULL);
    const double m = from_bits((b & 0xfffffffffffffULL) | (1023ULL << 52));
    const double r = m * m >= 2.0 ? pe * 2.0 : pe;
    const double q = v > 0 ? r : (v < 0 ? -r : 0.0);
    out[i] = to_out<O>(v != v ? v : q);  // NaN stays NaN
  }
}

template <typename T, typename O>
void q_stochastic(const T* __restrict w, const T* __restrict u, O* __restrict out, int64_t n, double lo,
                  int64_t min_p) {
  for (int64_t i = 0; i < n; i++) {
    const double v = static_cast<double>(w[i]);
    const double a = std::min(std::max(std::fabs(v), lo), 1.0);
    int64_t p = (int64_t)stochastic_floor(std::log2(a), static_cast<double>(u[i]));
    p = p < min_p ? min_p : (p > 0 ? 0 : p);
    const double r = exp2_int(p);
    const double q = v > 0 ? r : (v < 0 ? -r : 0.0);
    out[i] = to_out<O>(v != v ? v : q);
  }
}

template <typename T, typename O, bool STOCHASTIC>
void ps_kernel(const T* __restrict P, const T* __restrict S, const T* __restrict u, O* __restrict out, int64_t n,
               double min_p) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    const double pv = static_cast<double>(P[i]), sv = static_cast<double>(S[i]);
    const double pc = std::min(std::max(pv, min_p), 0.0);
    const double p = STOCHASTIC ? stochastic_floor(pc, static_cast<double>(u[i])) : round_even(pc);
    // sign(round(S)) with round half to even: 0 for |S| <= 1/2
    const double sg = sv > 0.5 ? 1.0 : (sv < -0.5 ? -1.0 : 0.0);
    const double wq = sg * exp2_of_integral(p);
    out[i] = to_out<O>(pv != pv || sv != sv ? (double)NAN : wq);
  }
}

template <typename T, typename A>
void fixed_kernel(const T* __restrict x, T* __restrict out, int64_t n, A scale, A inv, A alo, A ahi) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    // x * 2^f and * 2^-f are exact (ldexp), floor is exact
    A v = floor_exact(static_cast<A>(x[i]) * scale) * inv;
    v = ahi < v ? ahi : v;  // NaN passes through, as torch.clamp
    v = alo > v ? alo : v;
    out[i] = static_cast<T>(v);
  }
}

// The dtype a quantizer's loop writes for the requested output dtype: float16 is written
// as float32 and converted by ATen afterwards (its vectorised conversion rounds the exact
// value once, as a direct write would; c10::Half stores did not vectorise in this loop:
// 4x slower than float32 and a conversion, measured on 2048^2).
inline at::ScalarType compute_out(at::ScalarType want) { return want == at::kHalf ? at::kFloat : want; }

// f(O{}) for the dtype a quantizer's loop writes (compute_out of a checked out_dtype)
template <typename F>
void dispatch_out(const char* op, at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float());
    case at::kDouble: return f(double());
    case at::kBFloat16: return f(at::BFloat16());
    default: break;
  }
  TORCH_CHECK(false, op, ": internal error: no quantizer loop writes ", t);
}

at::Tensor quantize_pot_q(const at::Tensor& weight, int64_t weight_bits, const c10::optional<at::Tensor>& noise,
                          c10::optional<at::ScalarType> out_dtype) {
  const char* op = "shiftadd::quantize_pot_q";
  check_quantize_q(op, weight, weight_bits, noise, out_dtype);
  const int64_t min_p = -((int64_t(1) << (weight_bits - 1)) - 1);
  const double lo = std::ldexp(1.0, (int)min_p);
  const at::Tensor w = weight.contiguous();
  at::Tensor u = noise.has_value() ? noise->contiguous() : at::Tensor();
  const at::ScalarType want = out_dtype.value_or(weight.scalar_type());
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(compute_out(want)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quantize_pot_q", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* up = u.defined() ? u.const_data_ptr<scalar_t>() : nullptr;
    dispatch_out(op, out.scalar_type(), [&](auto otag) {
      using O = decltype(otag);
      O* op_ = out.mutable_data_ptr<O>();
      at::parallel_for(0, out.numel(), kGrain, [&](int64_t b, int64_t e) {
        if (up == nullptr)
          q_deterministic(wp + b, op_ + b, e - b, lo, min_p);
        else
          q_stochastic(wp + b, up + b, op_ + b, e - b, lo, min_p);
      });
    });
  });
  return want == out.scalar_type() ? out : out.to(want);
}

at::Tensor quantize_pot_ps(const at::Tensor& shift, const at::Tensor& sign, int64_t weight_bits,
                           const c10::optional<at::Tensor>& noise, c10::optional<at::ScalarType> out_dtype) {
  const char* op = "shiftadd::quantize_pot_ps";
  check_quantize_ps(op, shift, sign, weight_bits, noise, out_dtype);
  const double min_p = -(double)((int64_t(1) << (weight_bits - 1)) - 2);
  const at::Tensor P = shift.contiguous(), S = sign.contiguous();
  at::Tensor u = noise.has_value() ? noise->contiguous() : at::Tensor();
  const at::ScalarType want = out_dtype.value_or(shift.scalar_type());
  at::Tensor out = at::empty(shift.sizes(), shift.options().dtype(compute_out(want)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(), "quantize_pot_ps", [&] {
    const scalar_t* pp = P.const_data_ptr<scalar_t>();
    const scalar_t* sp = S.const_data_ptr<scalar_t>();
    const scalar_t* up = u.defined() ? u.const_data_ptr<scalar_t>() : nullptr;
    dispatch_out(op, out.scalar_type(), [&](auto otag) {
      using O = decltype(otag);
      O* op_ = out.mutable_data_ptr<O>();
      at::parallel_for(0, out.numel(), kGrain, [&](int64_t b, int64_t e) {
        if (up == nullptr)
          ps_kernel<scalar_t, O, false>(pp + b, sp + b, nullptr, op_ + b, e - b, min_p);
        else
          ps_kernel<scalar_t, O, true>(pp + b, sp + b, up + b, op_ + b, e - b, min_p);
      });
    });
  });
  return want == out.scalar_type() ? out : out.to(want);
}

at::Tensor round_to_fixed(const at::Tensor& x, int64_t int_bits, int64_t frac_bits) {
  const char* op = "shiftadd::round_to_fixed";
  check_round_to_fixed(op, x, int_bits, frac_bits);
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
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t b, int64_t e) {
      fixed_kernel<scalar_t, acc_t>(xp + b, op_ + b, e - b, scale, inv, alo, ahi);
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
