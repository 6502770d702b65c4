// CPU kernels of the packed power-of-two (shift) inference ops (schemas: shiftadd/_ops.py;
// the packed layout: shiftadd/packed.py; references: shiftadd/reference/shift.py).
//
//   shift_linear_packed(x, codes, scales, zero_codes, bits, O, K, bias)   y = x W^T + bias
//   shift_linear_int(x_int, codes, scales, zero_codes, bits, O, K)        y = sum ±(x >> s), int64
//
// Weight (o, k) has a B-bit code c (B = 4: nibble k&1 of byte k/2, low nibble first;
// 8: byte k; 16: little-endian bytes 2k, 2k+1); w = 0 if c == zero_codes[o], else
// (-1)^(c >> (B-1)) * 2^(scales[o] - (c & (2^(B-1)-1))).
//
// Float kernel (x float32; float16/bfloat16 are computed in float32): a GEMV over
// output channels, OpenMP (at::parallel_for) over blocks of R channels.  Each weight
// vector is decoded in registers and used for up to 4 batch rows (FMA):
//   AVX-512, 4-bit: 8 code bytes -> 16 nibbles (psrlw + punpcklbw + vpmovzxbd) -> vpermps
//                   into the channel's 16-entry float table (one zmm per channel), R = 4;
//   AVX-512, 8-bit: vscalefps(±1, E - m), masked to 0 at the zero code, R = 4;
//   AVX2,    4-bit: 4 code bytes -> 8 nibbles -> two vpermps (table entries 0-7, 8-15)
//                   and a blend on the nibble's bit 3, R = 2;
//   AVX2,    8-bit: vgatherdps from the channel's 256-entry table, R = 2;
//   otherwise (generic ISA, float64, 16-bit codes): each channel decoded into a
//                   buffer through its table, then dot products.
// Batches above kDirectBatch decode tiles of channels to float and call at::mm.
// The tables hold exact powers of two (subnormals included, 0 below the range, inf above).
//
// Integer kernel: scalar, exact; a per-channel table (code -> shift, sign) for 4/8 bits.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "shiftadd.h"

#if SHIFTADD_X86
#include <immintrin.h>
#endif

namespace shiftadd {
namespace cpu {
namespace packed {

constexpr int64_t kDirectBatch = 16;  // batches up to this run the direct kernel, larger decode + at::mm

struct Packed {
  const uint8_t* codes;
  int64_t row_bytes;
  const int32_t* scales;
  const int32_t* zc;
  int bits;
  int64_t O, K;
  const uint8_t* row(int64_t o) const { return codes + o * row_bytes; }
};

inline int32_t code_at(const uint8_t* row, int bits, int64_t k) {
  if (bits == 4) return (row[k >> 1] >> ((k & 1) * 4)) & 15;
  if (bits == 8) return row[k];
  return (int32_t)row[2 * k] | ((int32_t)row[2 * k + 1] << 8);
}

// 2^e exactly in T (round-to-nearest-even of the exact value: 0 below half the smallest
// subnormal, inf above the largest finite).
template <typename T>
inline T pow2(int64_t e);
template <>
inline float pow2<float>(int64_t e) {
  uint32_t b;
  if (e > 127) b = 0x7f800000u;
  else if (e >= -126) b = (uint32_t)(e + 127) << 23;
  else if (e >= -149) b = 1u << (e + 149);
  else b = 0;
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
template <>
inline double pow2<double>(int64_t e) {
  uint64_t b;
  if (e > 1023) b = 0x7ff0000000000000ull;
  else if (e >= -1022) b = (uint64_t)(e + 1023) << 52;
  else if (e >= -1074) b = 1ull << (e + 1074);
  else b = 0;
  double v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

template <typename T>
inline T decode_value(int32_t c, int bits, int32_t E, int32_t zc) {
  if (c == zc) return T(0);
  const int32_t half = 1 << (bits - 1);
  const T v = pow2<T>((int64_t)E - (c & (half - 1)));
  return (c & half) ? -v : v;
}

// The 2^bits-entry table of one channel (bits 4 or 8).
template <typename T>
inline void build_lut(T* lut, int bits, int32_t E, int32_t zc) {
  for (int32_t c = 0; c < (1 << bits); c++) lut[c] = decode_value<T>(c, bits, E, zc);
}

// Channel o decoded into w[0, K).
template <typename T>
inline void decode_row(const Packed& P, int64_t o, T* w, T* lut) {
  const uint8_t* r = P.row(o);
  if (P.bits == 16) {
    for (int64_t k = 0; k < P.K; k++) w[k] = decode_value<T>(code_at(r, 16, k), 16, P.scales[o], P.zc[o]);
    return;
  }
  build_lut(lut, P.bits, P.scales[o], P.zc[o]);
  if (P.bits == 8) {
    for (int64_t k = 0; k < P.K; k++) w[k] = lut[r[k]];
    return;
  }
  int64_t k = 0;
  for (; k + 2 <= P.K; k += 2) {
    const uint8_t b = r[k >> 1];
    w[k] = lut[b & 15];
    w[k + 1] = lut[b >> 4];
  }
  if (k < P.K) w[k] = lut[r[k >> 1] & 15];
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
  for (; i < n; i++) s[0] += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

inline int64_t grain_rows(int64_t K, int64_t per) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / (std::max<int64_t>(K, 1) * per));
}

// Any bits, float or double: channel by channel through a decoded buffer.
template <typename T>
void gemm_generic(const Packed& P, const T* x, int64_t N, T* y, const T* bias) {
  at::parallel_for(0, P.O, grain_rows(P.K, 1), [&](int64_t o0, int64_t o1) {
    std::vector<T> w(std::max<int64_t>(P.K, 1)), lut(256);
    for (int64_t o = o0; o < o1; o++) {
      decode_row(P, o, w.data(), lut.data());
      const T b = bias ? bias[o] : T(0);
      for (int64_t n = 0; n < N; n++) y[n * P.O + o] = dot(x + n * P.K, w.data(), P.K) + b;
    }
  });
}

#if SHIFTADD_X86

// ---------------------------------------------------------------------------- AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
namespace avx512 {

constexpr int R = 4;  // output channels per block

struct Row {
  const uint8_t* codes;
  __m512 lut;          // 4-bit: the 16-entry table
  __m512i E, zc;       // 8-bit: scale and zero code
  const float* lutm;   // the table in memory (tails)
};

inline __m512 decode4(const Row& r, int64_t k) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.codes + (k >> 1)));
  const __m128i n = _mm_unpacklo_epi8(b, _mm_srli_epi16(b, 4));  // nibble i in byte i (low 4 bits)
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(n), r.lut);   // vpermps reads index bits 0-3
}

inline __m512 decode8(const Row& r, int64_t k) {
  const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.codes + k)));
  const __m512i m = _mm512_and_si512(c, _mm512_set1_epi32(127));
  const __m512i s = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(128)), 24);
  const __m512 one = _mm512_castsi512_ps(_mm512_or_si512(s, _mm512_set1_epi32(0x3f800000)));
  const __m512 v = _mm512_scalef_ps(one, _mm512_cvtepi32_ps(_mm512_sub_epi32(r.E, m)));  // exact ±2^(E-m)
  return _mm512_maskz_mov_ps(_mm512_cmpneq_epi32_mask(c, r.zc), v);
}

using V = __m512;
constexpr int L = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(V v) { return _mm512_reduce_add_ps(v); }

inline void init_row(Row& r, const Packed& P, int64_t o, const float* lut) {
  r.codes = P.row(o);
  r.lutm = lut;
  r.lut = _mm512_loadu_ps(lut);
  r.E = _mm512_set1_epi32(P.scales[o]);
  r.zc = _mm512_set1_epi32(P.zc[o]);
}

#include "cpu/shift_packed_kernels.inc"
}  // namespace avx512
#pragma GCC pop_options

// ---------------------------------------------------------------------------- AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

constexpr int R = 2;

struct Row {
  const uint8_t* codes;
  __m256 lo, hi;       // 4-bit: table entries 0-7 and 8-15
  const float* lutm;   // 4-bit: 16 entries; 8-bit: 256 (gathered)
};

inline __m256 decode4(const Row& r, int64_t k) {
  int32_t four;
  std::memcpy(&four, r.codes + (k >> 1), 4);
  const __m128i b = _mm_cvtsi32_si128(four);
  const __m128i n = _mm_unpacklo_epi8(b, _mm_srli_epi16(b, 4));
  const __m256i idx = _mm256_cvtepu8_epi32(n);  // low 3 bits pick the entry, bit 3 the half
  const __m256 a = _mm256_permutevar8x32_ps(r.lo, idx), c = _mm256_permutevar8x32_ps(r.hi, idx);
  return _mm256_blendv_ps(a, c, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline __m256 decode8(const Row& r, int64_t k) {
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.codes + k)));
  return _mm256_i32gather_ps(r.lutm, idx, 4);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

using V = __m256;
constexpr int L = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

inline void init_row(Row& r, const Packed& P, int64_t o, const float* lut) {
  r.codes = P.row(o);
  r.lutm = lut;
  r.lo = _mm256_loadu_ps(lut);
  r.hi = _mm256_loadu_ps(lut + 8);
}

#include "cpu/shift_packed_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options

#endif  // SHIFTADD_X86

// y (N, O) = x (N, K) W^T + bias, float32, the direct kernel of the instruction set in use.
void gemm_f32(const Packed& P, const float* x, int64_t N, float* y, const float* bias) {
#if SHIFTADD_X86
  if (P.bits != 16) {
    switch (current_isa()) {
      case Isa::Avx512:
        return P.bits == 4 ? avx512::gemm<4>(P, x, N, y, bias) : avx512::gemm<8>(P, x, N, y, bias);
      case Isa::Avx2:
        return P.bits == 4 ? avx2::gemm<4>(P, x, N, y, bias) : avx2::gemm<8>(P, x, N, y, bias);
      default: break;
    }
  }
#endif
  gemm_generic<float>(P, x, N, y, bias);
}

template <typename T>
void decode_rows(const Packed& P, int64_t o0, int64_t o1, T* w) {
  at::parallel_for(o0, o1, grain_rows(P.K, 1), [&](int64_t a, int64_t b) {
    alignas(64) T lut[256];
    for (int64_t o = a; o < b; o++) {
      T* wr = w + (o - o0) * P.K;
#if SHIFTADD_X86
      if constexpr (std::is_same<T, float>::value) {
        if (P.bits != 16 && current_isa() == Isa::Avx512) { avx512::decode_row_f32(P, o, wr, lut); continue; }
        if (P.bits != 16 && current_isa() == Isa::Avx2) { avx2::decode_row_f32(P, o, wr, lut); continue; }
      }
#endif
      decode_row(P, o, wr, lut);
    }
  });
}

// Large batches: decode tiles of output channels, then at::mm.
void gemm_tiled(const Packed& P, const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& bias) {
  const int64_t tile = std::min<int64_t>(P.O, std::max<int64_t>(64, (int64_t(1) << 22) / std::max<int64_t>(P.K, 1)));
  at::Tensor w = at::empty({tile, P.K}, x.options());
  for (int64_t o0 = 0; o0 < P.O; o0 += tile) {
    const int64_t rows = std::min(tile, P.O - o0);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shift_linear_packed", [&] {
      decode_rows<scalar_t>(P, o0, o0 + rows, w.mutable_data_ptr<scalar_t>());
    });
    at::Tensor wt = w.narrow(0, 0, rows);
    at::Tensor yo = y.narrow(1, o0, rows);
    if (bias.has_value())
      yo.copy_(at::addmm(bias->narrow(0, o0, rows), x, wt.t()));
    else
      yo.copy_(at::mm(x, wt.t()));
  }
}

Packed make_packed(const char* op, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zero_codes,
                   int64_t bits, int64_t O, int64_t K) {
  const int64_t rb = check_packed(op, codes, scales, zero_codes, bits, O, K);
  for (const at::Tensor* t : {&codes, &scales, &zero_codes})
    TORCH_CHECK(t->device().is_cpu(), op, ": the packed weight must be on the CPU for the cpu backend, got ",
                t->device());
  Packed P;
  P.codes = codes.const_data_ptr<uint8_t>();
  P.row_bytes = rb;
  P.scales = scales.const_data_ptr<int32_t>();
  P.zc = zero_codes.const_data_ptr<int32_t>();
  P.bits = (int)bits;
  P.O = O;
  P.K = K;
  return P;
}

at::Tensor shift_linear_packed(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                               const at::Tensor& zero_codes, int64_t bits, int64_t out_features, int64_t in_features,
                               const c10::optional<at::Tensor>& bias) {
  const char* op = "shiftadd::shift_linear_packed";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor for the cpu backend, got ", x.device());
  check_packed_input(op, x, bias, out_features, in_features);
  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous(), zc = zero_codes.contiguous();
  const Packed P = make_packed(op, cc, sc, zc, bits, out_features, in_features);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = x.to(acc).contiguous();
  c10::optional<at::Tensor> ba;
  if (bias.has_value()) ba = bias->to(acc).contiguous();
  const int64_t N = x.size(0);
  at::Tensor y = at::empty({N, out_features}, x.options().dtype(acc));
  if (N > 0 && out_features > 0) {
    if (N > kDirectBatch) {
      gemm_tiled(P, xa, y, ba);
    } else if (acc == at::kFloat) {
      gemm_f32(P, xa.const_data_ptr<float>(), N, y.mutable_data_ptr<float>(),
               ba.has_value() ? ba->const_data_ptr<float>() : nullptr);
    } else {
      gemm_generic<double>(P, xa.const_data_ptr<double>(), N, y.mutable_data_ptr<double>(),
                           ba.has_value() ? ba->const_data_ptr<double>() : nullptr);
    }
  }
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// ---------------------------------------------------------------------------- integer mode

// sign * (x >> s) for s >= 0 (arithmetic, s >= 64 acts as 63), sign * (x << -s) for s < 0
// (modulo 2^64; -s >= 64 gives 0).  Computed in uint64 so wrap-around is defined.
inline uint64_t shifted(int64_t x, int32_t s) {
  if (s >= 0) return (uint64_t)(x >> std::min(s, 63));
  if (s <= -64) return 0;
  return (uint64_t)x << (-s);
}

template <typename I>
void int_kernel(const Packed& P, const I* x, int64_t N, int64_t* y) {
  at::parallel_for(0, P.O, grain_rows(P.K, std::max<int64_t>(N, 1)), [&](int64_t o0, int64_t o1) {
    std::vector<int32_t> sh(std::max<int64_t>(P.K, 1));
    std::vector<int8_t> sg(std::max<int64_t>(P.K, 1));
    const int32_t half = 1 << (P.bits - 1);
    for (int64_t o = o0; o < o1; o++) {
      const uint8_t* r = P.row(o);
      const int32_t E = P.scales[o], zc = P.zc[o];
      for (int64_t k = 0; k < P.K; k++) {
        const int32_t c = code_at(r, P.bits, k);
        const int64_t s = (int64_t)(c & (half - 1)) - E;  // right-shift amount: the weight is ±2^-s
        sh[k] = (int32_t)std::max<int64_t>(std::min<int64_t>(s, 64), -64);
        sg[k] = c == zc ? 0 : ((c & half) ? -1 : 1);
      }
      for (int64_t n = 0; n < N; n++) {
        const I* xr = x + n * P.K;
        uint64_t acc = 0;
        for (int64_t k = 0; k < P.K; k++) {
          if (sg[k] == 0) continue;  // zero weights are skipped
          const uint64_t t = shifted((int64_t)xr[k], sh[k]);
          acc = sg[k] > 0 ? acc + t : acc - t;
        }
        y[n * P.O + o] = (int64_t)acc;
      }
    }
  });
}

at::Tensor shift_linear_int(const at::Tensor& x_int, const at::Tensor& codes, const at::Tensor& scales,
                            const at::Tensor& zero_codes, int64_t bits, int64_t out_features, int64_t in_features) {
  const char* op = "shiftadd::shift_linear_int";
  const auto st = x_int.scalar_type();
  TORCH_CHECK(st == at::kChar || st == at::kShort || st == at::kInt || st == at::kLong, op,
              ": x_int must be a signed integer tensor (int8, int16, int32, int64), got ", st);
  TORCH_CHECK(x_int.device().is_cpu(), op, ": x_int must be a CPU tensor for the cpu backend, got ", x_int.device());
  TORCH_CHECK(x_int.dim() == 2 && x_int.size(1) == in_features, op, ": x_int must be (N, ", in_features, "), got ",
              x_int.sizes());
  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous(), zc = zero_codes.contiguous();
  const Packed P = make_packed(op, cc, sc, zc, bits, out_features, in_features);
  const at::Tensor xc = x_int.contiguous();
  const int64_t N = x_int.size(0);
  at::Tensor y = at::zeros({N, out_features}, x_int.options().dtype(at::kLong));
  if (N == 0 || out_features == 0) return y;
  AT_DISPATCH_SWITCH(st, "shift_linear_int",
                     AT_DISPATCH_CASE(at::kChar, [&] { int_kernel<scalar_t>(P, xc.const_data_ptr<scalar_t>(), N, y.mutable_data_ptr<int64_t>()); })
                     AT_DISPATCH_CASE(at::kShort, [&] { int_kernel<scalar_t>(P, xc.const_data_ptr<scalar_t>(), N, y.mutable_data_ptr<int64_t>()); })
                     AT_DISPATCH_CASE(at::kInt, [&] { int_kernel<scalar_t>(P, xc.const_data_ptr<scalar_t>(), N, y.mutable_data_ptr<int64_t>()); })
                     AT_DISPATCH_CASE(at::kLong, [&] { int_kernel<scalar_t>(P, xc.const_data_ptr<scalar_t>(), N, y.mutable_data_ptr<int64_t>()); }));
  return y;
}

}  // namespace packed

TORCH_LIBRARY_IMPL(shiftadd, CPU, m) {
  m.impl("shift_linear_packed", &packed::shift_linear_packed);
  m.impl("shift_linear_int", &packed::shift_linear_int);
}

}  // namespace cpu
}  // namespace shiftadd
