// CPU kernel of shiftadd::adder_linear_int8 (schema: shiftadd/_ops.py), the quantized
// adder inference path:
//
//   x (N, K) int8, weight (O, K) int8 -> y (N, O) int32,  y[n, o] = -sum_k |x[n, k] - w[o, k]|
//
// computed exactly: every |difference| is at most 255 and K is at most kAdderInt8MaxK
// (shiftadd.h), so the sum fits in int32.  Both operands are biased by 128 (v ^ 0x80) into
// uint8, which keeps every difference, and rows are zero-padded to a multiple of 32 bytes
// (a zero pair adds |0 - 0| = 0).  vpsadbw (_mm256_sad_epu8 / _mm512_sad_epu8) sums 8
// absolute byte differences into each 64-bit lane: a 2 (rows of x) x 4 (rows of w) register
// tile keeps 8 such accumulators.  The AVX-512 version runs where the instruction set in use
// is avx512 and the CPU has AVX-512BW; else AVX2; without AVX2 a scalar loop computes the
// same sums.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
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
namespace {

constexpr int64_t kRowAlign = 64;  // bytes per AVX-512 vector (two AVX2 vectors)
constexpr int64_t kNB = 2, kOB = 4;  // register tile: rows of x by rows of w

// rows x K int8 -> rows x Kp uint8, biased by 128, zero-padded
std::vector<uint8_t> biased_rows(const int8_t* src, int64_t rows, int64_t K, int64_t Kp) {
  std::vector<uint8_t> out(static_cast<size_t>(rows * Kp), 0);
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const int8_t* s = src + r * K;
      uint8_t* d = out.data() + r * Kp;
      for (int64_t k = 0; k < K; k++) d[k] = static_cast<uint8_t>(s[k]) ^ 0x80u;
    }
  });
  return out;
}

// Scalar sums for the rows [n0, n1) x [o0, o1).
void tile_generic(const uint8_t* xb, const uint8_t* wb, int64_t Kp, int64_t O, int64_t n0, int64_t n1, int64_t o0,
                  int64_t o1, int32_t* y) {
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* xr = xb + n * Kp;
    for (int64_t o = o0; o < o1; o++) {
      const uint8_t* wr = wb + o * Kp;
      int64_t acc = 0;
      for (int64_t k = 0; k < Kp; k++) acc += std::abs(static_cast<int>(xr[k]) - static_cast<int>(wr[k]));
      y[n * O + o] = static_cast<int32_t>(-acc);
    }
  }
}

#if SHIFTADD_X86
__attribute__((target("avx2"))) inline int64_t hsum64(__m256i v) {
  const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

// One tile of NB rows of x by OB rows of w (full tiles only).
template <int NB, int OB>
__attribute__((target("avx2"))) void tile_avx2(const uint8_t* xb, const uint8_t* wb, int64_t Kp, int64_t O,
                                               int64_t n0, int64_t o0, int32_t* y) {
  __m256i acc[NB][OB];
  for (int i = 0; i < NB; i++)
    for (int j = 0; j < OB; j++) acc[i][j] = _mm256_setzero_si256();
  const uint8_t* xr[NB];
  const uint8_t* wr[OB];
  for (int i = 0; i < NB; i++) xr[i] = xb + (n0 + i) * Kp;
  for (int j = 0; j < OB; j++) wr[j] = wb + (o0 + j) * Kp;
  for (int64_t k = 0; k < Kp; k += 32) {
    __m256i xv[NB], wv[OB];
    for (int i = 0; i < NB; i++) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[i] + k));
    for (int j = 0; j < OB; j++) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + k));
    for (int i = 0; i < NB; i++)
      for (int j = 0; j < OB; j++) acc[i][j] = _mm256_add_epi64(acc[i][j], _mm256_sad_epu8(xv[i], wv[j]));
  }
  for (int i = 0; i < NB; i++)
    for (int j = 0; j < OB; j++) y[(n0 + i) * O + o0 + j] = static_cast<int32_t>(-hsum64(acc[i][j]));
}

template <int NB, int OB>
__attribute__((target("avx512f,avx512bw"))) void tile_avx512(const uint8_t* xb, const uint8_t* wb, int64_t Kp,
                                                             int64_t O, int64_t n0, int64_t o0, int32_t* y) {
  __m512i acc[NB][OB];
  for (int i = 0; i < NB; i++)
    for (int j = 0; j < OB; j++) acc[i][j] = _mm512_setzero_si512();
  const uint8_t* xr[NB];
  const uint8_t* wr[OB];
  for (int i = 0; i < NB; i++) xr[i] = xb + (n0 + i) * Kp;
  for (int j = 0; j < OB; j++) wr[j] = wb + (o0 + j) * Kp;
  for (int64_t k = 0; k < Kp; k += 64) {
    __m512i xv[NB], wv[OB];
    for (int i = 0; i < NB; i++) xv[i] = _mm512_loadu_si512(xr[i] + k);
    for (int j = 0; j < OB; j++) wv[j] = _mm512_loadu_si512(wr[j] + k);
    for (int i = 0; i < NB; i++)
      for (int j = 0; j < OB; j++) acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_sad_epu8(xv[i], wv[j]));
  }
  for (int i = 0; i < NB; i++)
    for (int j = 0; j < OB; j++) y[(n0 + i) * O + o0 + j] = static_cast<int32_t>(-_mm512_reduce_add_epi64(acc[i][j]));
}

bool has_avx512bw() {
  static const bool yes = __builtin_cpu_supports("avx512bw");
  return yes;
}

template <void (*FULL)(const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, int64_t, int32_t*),
          void (*ONE)(const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, int64_t, int32_t*)>
void run_tiles(const uint8_t* xb, const uint8_t* wb, int64_t N, int64_t O, int64_t Kp, int32_t* y) {
  const int64_t nt = (N + kNB - 1) / kNB, ot = (O + kOB - 1) / kOB;
  at::parallel_for(0, nt * ot, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const int64_t n0 = (t / ot) * kNB, o0 = (t % ot) * kOB;
      const int64_t n1 = std::min(N, n0 + kNB), o1 = std::min(O, o0 + kOB);
      if (n1 - n0 == kNB && o1 - o0 == kOB) {
        FULL(xb, wb, Kp, O, n0, o0, y);
      } else {  // an edge tile: one row of x by one row of w at a time
        for (int64_t n = n0; n < n1; n++)
          for (int64_t o = o0; o < o1; o++) ONE(xb, wb, Kp, O, n, o, y);
      }
    }
  });
}
#endif

void run_generic(const uint8_t* xb, const uint8_t* wb, int64_t N, int64_t O, int64_t Kp, int32_t* y) {
  const int64_t nt = (N + kNB - 1) / kNB, ot = (O + kOB - 1) / kOB;
  at::parallel_for(0, nt * ot, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const int64_t n0 = (t / ot) * kNB, o0 = (t % ot) * kOB;
      tile_generic(xb, wb, Kp, O, n0, std::min(N, n0 + kNB), o0, std::min(O, o0 + kOB), y);
    }
  });
}

at::Tensor adder_linear_int8(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "shiftadd::adder_linear_int8";
  check_adder_int8(op, x, weight);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": the cpu kernel takes CPU tensors, got x on ",
              x.device(), " and weight on ", weight.device());
  const int64_t N = x.size(0), K = x.size(1), O = weight.size(0);
  at::Tensor y = at::empty({N, O}, x.options().dtype(at::kInt));
  if (N == 0 || O == 0) return y;
  if (K == 0) return y.zero_();
  const int64_t Kp = (K + kRowAlign - 1) / kRowAlign * kRowAlign;
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const std::vector<uint8_t> xb = biased_rows(xc.const_data_ptr<int8_t>(), N, K, Kp);
  const std::vector<uint8_t> wb = biased_rows(wc.const_data_ptr<int8_t>(), O, K, Kp);
  int32_t* yp = y.mutable_data_ptr<int32_t>();
#if SHIFTADD_X86
  if (current_isa() == Isa::Avx512 && has_avx512bw()) {
    run_tiles<tile_avx512<kNB, kOB>, tile_avx512<1, 1>>(xb.data(), wb.data(), N, O, Kp, yp);
    return y;
  }
  if (current_isa() != Isa::Generic) {
    run_tiles<tile_avx2<kNB, kOB>, tile_avx2<1, 1>>(xb.data(), wb.data(), N, O, Kp, yp);
    return y;
  }
#endif
  run_generic(xb.data(), wb.data(), N, O, Kp, yp);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(shiftadd, CPU, m) { m.impl("adder_linear_int8", &adder_linear_int8); }

}  // namespace cpu
}  // namespace shiftadd
