// CUDA kernels of the shiftadd power-of-two quantizers and their launchers (declared in
// csrc/cuda/kernels.h; the torch glue is csrc/cuda/shift.cpp).  CUDA headers only.
//
// Each computes bit for bit what csrc/cpu/shift.cpp computes:
//   quantize_pot_q(w, b, noise)      sign(w) 2^round(log2 clamp(|w|, 2^-(2^(b-1)-1), 1))
//   quantize_pot_ps(P, S, b, noise)  sign(round(S)) 2^round(clamp(P, -(2^(b-1)-2), 0))
//   round_to_fixed(x, i, f)          clamp(floor(x 2^f) 2^-f, -2^(i-1), 2^(i-1) - 1)
// round() is half-to-even, or floor(v) + (u < frac(v)) with noise u; round(log2 a) comes
// from the exponent and mantissa bits, 2^p from the exponent bits.  The arithmetic is
// done in double, which is exact here, with conversions written as PTX so that the
// extension's --use_fast_math (flush-to-zero of float32) cannot change a result: a
// float32 denormal input or a 2^-127 output survive as the CPU computes them.
// round_to_fixed of float / half / bfloat16 is float arithmetic on the CPU; every step
// of it is exact (scaling by 2^f, floor, scaling back), so the double computation gives
// the same value, clamped to the same float bounds.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/kernels.h"

#ifndef SA_LAUNCH
#define SA_LAUNCH(kern, grid, block, stream, ...) kern<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

#if defined(__CUDA_ARCH__) && !defined(SA_EMULATION)
#define SA_DEVICE_PTX 1
#else
#define SA_DEVICE_PTX 0
#endif

namespace shiftadd {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// exact float -> double and round-to-nearest double -> float, never flushing denormals
__device__ __forceinline__ double f2d(float v) {
#if SA_DEVICE_PTX
  double d;
  asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(v));
  return d;
#else
  return static_cast<double>(v);
#endif
}
__device__ __forceinline__ float d2f(double v) {
#if SA_DEVICE_PTX
  float f;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(v));
  return f;
#else
  return static_cast<float>(v);
#endif
}

__device__ __forceinline__ double to_d(double v) { return v; }
__device__ __forceinline__ double to_d(float v) { return f2d(v); }
__device__ __forceinline__ double to_d(__half v) { return f2d(__half2float(v)); }
__device__ __forceinline__ double to_d(__nv_bfloat16 v) { return f2d(__bfloat162float(v)); }

// double -> T as the CPU's static_cast<T>(double): half and bfloat16 go through float
template <typename T>
__device__ __forceinline__ T from_d(double v);
template <>
__device__ __forceinline__ double from_d<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ float from_d<float>(double v) {
  return d2f(v);
}
template <>
__device__ __forceinline__ __half from_d<__half>(double v) {
  return __float2half_rn(d2f(v));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_d<__nv_bfloat16>(double v) {
  return __float2bfloat16_rn(d2f(v));
}

__device__ __forceinline__ uint64_t bits_of(double v) { return static_cast<uint64_t>(__double_as_longlong(v)); }
__device__ __forceinline__ double from_bits(uint64_t b) { return __longlong_as_double(static_cast<long long>(b)); }
// NaN test on the bits (immune to any fast-math assumption)
__device__ __forceinline__ bool is_nan(double v) {
  return (bits_of(v) & 0x7fffffffffffffffULL) > 0x7ff0000000000000ULL;
}

// round(log2 a) for a normal positive double: a = m 2^e, m in [1, 2); log2 m >= 1/2 <=> m^2 >= 2
__device__ __forceinline__ int round_log2(double a) {
  const uint64_t b = bits_of(a);
  const int e = static_cast<int>((b >> 52) & 0x7ff) - 1023;
  const double m = from_bits((b & 0xfffffffffffffULL) | (1023ULL << 52));
  return e + (m * m >= 2.0 ? 1 : 0);
}
// log2 a, exact when a is a power of two
__device__ __forceinline__ double log2_of(double a) {
  const uint64_t b = bits_of(a);
  if ((b & 0xfffffffffffffULL) == 0) return static_cast<double>(static_cast<int>((b >> 52) & 0x7ff) - 1023);
  return log2(a);
}
// 2^p for an integer p in the normal range
__device__ __forceinline__ double exp2_int(int p) { return from_bits(static_cast<uint64_t>(p + 1023) << 52); }

__device__ __forceinline__ double stochastic_floor(double v, double u) {
  const double fl = floor(v);
  return fl + (u < v - fl ? 1.0 : 0.0);
}

struct QOp {
  int min_p;
  double lo;  // 2^min_p
  template <typename T>
  __device__ __forceinline__ double operator()(T wv, T uv, bool has_noise) const {
    const double v = to_d(wv);
    if (is_nan(v)) return v;  // NaN stays NaN
    double a = fabs(v);
    a = a < lo ? lo : a;
    a = 1.0 < a ? 1.0 : a;
    int p = has_noise ? static_cast<int>(stochastic_floor(log2_of(a), to_d(uv))) : round_log2(a);
    p = p < min_p ? min_p : (p > 0 ? 0 : p);
    const double r = exp2_int(p);
    return v > 0 ? r : (v < 0 ? -r : 0.0);
  }
};

struct PSOp {
  double min_p;
  template <typename T>
  __device__ __forceinline__ double operator()(T pv_, T sv_, T uv, bool has_noise) const {
    const double pv = to_d(pv_), sv = to_d(sv_);
    if (is_nan(pv) || is_nan(sv)) return __longlong_as_double(0x7ff8000000000000LL);
    double pc = pv < min_p ? min_p : pv;
    pc = 0.0 < pc ? 0.0 : pc;
    const double p = has_noise ? stochastic_floor(pc, to_d(uv)) : rint(pc);  // rint: half to even
    const double s = sv > 0.5 ? 1.0 : (sv < -0.5 ? -1.0 : 0.0);
    return s * exp2_int(static_cast<int>(p));
  }
};

struct FixedOp {
  double scale, inv, hi, lo;  // 2^f, 2^-f and the clamp bounds in the computing precision
  template <typename T>
  __device__ __forceinline__ double operator()(T xv) const {
    double v = floor(to_d(xv) * scale) * inv;
    v = hi < v ? hi : v;  // NaN passes through, as torch.clamp
    v = lo > v ? lo : v;
    return v;
  }
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// out[i] = TO(op(a[i], b[i], c[i])) for i < n: the op computes in double, the result is
// converted once to the output type TO (which may differ from the input type T).  NIN
// inputs are read (b, c only when NIN says so).  V > 1: packs of at most 16 bytes on
// each side (the launcher checks the alignment), then a scalar tail.
template <typename T, typename TO, int V, int NIN, class Op>
__global__ void __launch_bounds__(kThreads)
    map_kernel(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ c, TO* __restrict__ out,
               long long n, Op op, int has_noise) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long nv = V > 1 ? n / V : 0;
  auto apply = [&](T av, T bv, T cv) -> TO {
    if constexpr (NIN == 1) {
      return from_d<TO>(op(av));
    } else if constexpr (NIN == 2) {
      (void)cv;
      return from_d<TO>(op(av, bv, has_noise != 0));
    } else {
      return from_d<TO>(op(av, bv, cv, has_noise != 0));
    }
  };
  if constexpr (V > 1) {
    using P = Pack<T, V>;
    using PO = Pack<TO, V>;
    for (long long i = tid; i < nv; i += stride) {
      const P pa = reinterpret_cast<const P*>(a)[i];
      P pb = pa, pc = pa;
      PO po;
      if (NIN >= 2 && b != nullptr) pb = reinterpret_cast<const P*>(b)[i];
      if (NIN >= 3 && c != nullptr) pc = reinterpret_cast<const P*>(c)[i];
#pragma unroll
      for (int e = 0; e < V; e++) po.v[e] = apply(pa.v[e], pb.v[e], pc.v[e]);
      reinterpret_cast<PO*>(out)[i] = po;
    }
  }
  for (long long i = nv * V + tid; i < n; i += stride) {
    const T av = a[i];
    const T bv = (NIN >= 2 && b != nullptr) ? b[i] : av;
    const T cv = (NIN >= 3 && c != nullptr) ? c[i] : av;
    out[i] = apply(av, bv, cv);
  }
}

bool aligned(const void* p, size_t bytes) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

template <typename T, typename TO, int NIN, class Op>
cudaError_t launch_map(const void* a, const void* b, const void* c, void* out, int64_t n, Op op, bool has_noise,
                       cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  constexpr int V = 16 / (int)(sizeof(T) > sizeof(TO) ? sizeof(T) : sizeof(TO));
  constexpr size_t in_bytes = sizeof(T) * V, out_bytes = sizeof(TO) * V;
  const bool vec = aligned(a, in_bytes) && aligned(b, in_bytes) && aligned(c, in_bytes) && aligned(out, out_bytes) &&
                   n >= V;
  const int64_t work = vec ? (n + V - 1) / V : n;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > 8192 ? 8192 : blocks);
  const T* ap = static_cast<const T*>(a);
  const T* bp = static_cast<const T*>(b);
  const T* cp = static_cast<const T*>(c);
  TO* op_ = static_cast<TO*>(out);
  if (vec) {
    auto kern = map_kernel<T, TO, V, NIN, Op>;
    SA_LAUNCH(kern, dim3((unsigned)blocks), dim3(kThreads), stream, ap, bp, cp, op_, (long long)n, op,
              has_noise ? 1 : 0);
  } else {
    auto kern = map_kernel<T, TO, 1, NIN, Op>;
    SA_LAUNCH(kern, dim3((unsigned)blocks), dim3(kThreads), stream, ap, bp, cp, op_, (long long)n, op,
              has_noise ? 1 : 0);
  }
  return cudaGetLastError();
}

template <typename F>
cudaError_t dispatch_all(DType dt, F&& f) {
  switch (dt) {
    case DType::Float32: return f(float());
    case DType::Float64: return f(double());
    case DType::Float16: return f(__half());
    case DType::BFloat16: return f(__nv_bfloat16());
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t quantize_pot_q(DType dt, DType out_dt, const void* w, const void* noise, void* out, int64_t n,
                           int weight_bits, cudaStream_t stream) {
  if (weight_bits < 2 || weight_bits > 8 || n < 0) return cudaErrorInvalidValue;
  QOp op;
  op.min_p = -((1 << (weight_bits - 1)) - 1);
  op.lo = 1.0;
  for (int i = 0; i < -op.min_p; i++) op.lo *= 0.5;  // 2^min_p, exact
  return dispatch_all(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return dispatch_all(out_dt, [&](auto otag) -> cudaError_t {
      using TO = decltype(otag);
      return launch_map<T, TO, 2>(w, noise, nullptr, out, n, op, noise != nullptr, stream);
    });
  });
}

cudaError_t quantize_pot_ps(DType dt, DType out_dt, const void* shift, const void* sign, const void* noise, void* out,
                            int64_t n, int weight_bits, cudaStream_t stream) {
  if (weight_bits < 2 || weight_bits > 8 || n < 0) return cudaErrorInvalidValue;
  PSOp op;
  op.min_p = -static_cast<double>((1 << (weight_bits - 1)) - 2);
  return dispatch_all(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return dispatch_all(out_dt, [&](auto otag) -> cudaError_t {
      using TO = decltype(otag);
      return launch_map<T, TO, 3>(shift, sign, noise, out, n, op, noise != nullptr, stream);
    });
  });
}

cudaError_t round_to_fixed(DType dt, const void* x, void* out, int64_t n, int int_bits, int frac_bits,
                           cudaStream_t stream) {
  if (int_bits < 1 || int_bits > 64 || frac_bits < 0 || frac_bits > 64 || n < 0) return cudaErrorInvalidValue;
  double p_i = 1.0, p_f = 1.0;
  for (int i = 0; i < int_bits - 1; i++) p_i *= 2.0;  // 2^(i-1), exact
  for (int i = 0; i < frac_bits; i++) p_f *= 2.0;     // 2^f, exact
  const double hi = p_i - 1.0, lo = -p_i;             // as the CPU: in double, then in the computing precision
  FixedOp op;
  op.scale = p_f;
  op.inv = 1.0 / p_f;  // exact: a power of two
  const bool is_double = dt == DType::Float64;
  op.hi = is_double ? hi : static_cast<double>(static_cast<float>(hi));
  op.lo = is_double ? lo : static_cast<double>(static_cast<float>(lo));
  return dispatch_all(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return launch_map<T, T, 1>(x, nullptr, nullptr, out, n, op, false, stream);
  });
}

}  // namespace cuda
}  // namespace shiftadd
