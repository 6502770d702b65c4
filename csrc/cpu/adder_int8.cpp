// CPU kernel of shiftadd::adder_linear_int8 (schema: shiftadd/_ops.py), the quantized
// adder inference path:
//
//   x (N, K) int8, weight (O, K) int8 -> y (N, O) int32,  y[n, o] = -sum_k |x[n, k] - w[o, k]|
//
// computed exactly: every |difference| is at most 255 and K is at most kAdderInt8MaxK
// (shiftadd.h), so the sum fits in int32.  The operands are read in place (no copy of the
// weight per call): each vector is biased by 128 (v ^ 0x80) into unsigned bytes, which keeps
// every difference, and vpsadbw (_mm256_sad_epu8 / _mm512_sad_epu8) sums 8 absolute byte
// differences into each 64-bit lane.  A register tile of 2 (or, for one row of x, 1) rows
// of x by 4 rows of w keeps one accumulator per pair; the last K % 64 bytes of a row are one
// masked load (AVX-512), or the last K % 32 go through a zero-filled buffer (AVX2): the
// bytes past K are equal on both sides and add nothing.  The AVX-512 version
// runs where the instruction set in use is avx512 and the CPU has AVX-512BW; else AVX2;
// without AVX2 a scalar loop computes the same sums.

#include <algorithm>
#include <cstdint>
#include <cstdlib>

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

constexpr int64_t kOB = 4;  // rows of w per register tile (rows of x: 2, or 1 for N = 1)

struct Operands {
  const int8_t* x;
  const int8_t* w;
  int64_t K, O;  // rows of x and w are K bytes apart (contiguous)
  int32_t* y;    // (N, O), contiguous
};

// Scalar sums for the rows [n0, n1) x [o0, o1).
void tile_generic(const Operands& a, int64_t n0, int64_t n1, int64_t o0, int64_t o1) {
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* xr = a.x + n * a.K;
    for (int64_t o = o0; o < o1; o++) {
      const int8_t* wr = a.w + o * a.K;
      int64_t acc = 0;
      for (int64_t k = 0; k < a.K; k++) acc += std::abs(static_cast<int>(xr[k]) - static_cast<int>(wr[k]));
      a.y[n * a.O + o] = static_cast<int32_t>(-acc);
    }
  }
}

// The tail bytes [k0, K) of a row, biased, in a zero-filled vector-sized buffer.
inline void tail_copy(const int8_t* row, int64_t k0, int64_t K, uint8_t* buf) {
  for (int64_t k = k0; k < K; k++) buf[k - k0] = static_cast<uint8_t>(row[k]) ^ 0x80u;
}

#if SHIFTADD_X86
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
inline int64_t hsum64(__m256i v) {
  const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}
#define SA_V 32
#define SA_VEC __m256i
#define SA_ZERO() _mm256_setzero_si256()
#define SA_SET1(b) _mm256_set1_epi8(b)
#define SA_LOADU(p) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
#define SA_LOAD(p) _mm256_load_si256(reinterpret_cast<const __m256i*>(p))
#define SA_XOR(a, b) _mm256_xor_si256(a, b)
#define SA_ADD64(a, b) _mm256_add_epi64(a, b)
#define SA_SAD(a, b) _mm256_sad_epu8(a, b)
#define SA_HSUM(a) hsum64(a)
#include "cpu/adder_int8_tile.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
namespace avx512 {
#define SA_V 64
#define SA_VEC __m512i
#define SA_ZERO() _mm512_setzero_si512()
#define SA_SET1(b) _mm512_set1_epi8(b)
#define SA_LOADU(p) _mm512_loadu_si512(p)
#define SA_LOAD(p) _mm512_load_si512(p)
#define SA_XOR(a, b) _mm512_xor_si512(a, b)
#define SA_ADD64(a, b) _mm512_add_epi64(a, b)
#define SA_SAD(a, b) _mm512_sad_epu8(a, b)
#define SA_HSUM(a) _mm512_reduce_add_epi64(a)
// a masked load reads (and faults on) only the bytes of the mask: the first n
#define SA_LOAD_TAIL(p, n) _mm512_maskz_loadu_epi8(static_cast<__mmask64>((1ULL << (n)) - 1), (p))
#include "cpu/adder_int8_tile.inc"
}  // namespace avx512
#pragma GCC pop_options

bool has_avx512bw() {
  static const bool yes = __builtin_cpu_supports("avx512bw");
  return yes;
}

// Full tiles of NB x kOB, edge tiles one pair at a time.
template <int NB, void (*FULL)(const Operands&, int64_t, int64_t), void (*ONE)(const Operands&, int64_t, int64_t)>
void run_tiles(const Operands& a, int64_t N) {
  const int64_t nt = (N + NB - 1) / NB, ot = (a.O + kOB - 1) / kOB;
  at::parallel_for(0, nt * ot, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const int64_t n0 = (t / ot) * NB, o0 = (t % ot) * kOB;
      const int64_t n1 = std::min(N, n0 + NB), o1 = std::min(a.O, o0 + kOB);
      if (n1 - n0 == NB && o1 - o0 == kOB) {
        FULL(a, n0, o0);
      } else {
        for (int64_t n = n0; n < n1; n++)
          for (int64_t o = o0; o < o1; o++) ONE(a, n, o);
      }
    }
  });
}

void run_avx2(const Operands& a, int64_t N) {
  if (N == 1)
    run_tiles<1, avx2::tile<1, kOB>, avx2::tile<1, 1>>(a, N);
  else
    run_tiles<2, avx2::tile<2, kOB>, avx2::tile<1, 1>>(a, N);
}

void run_avx512(const Operands& a, int64_t N) {
  if (N == 1)
    run_tiles<1, avx512::tile<1, kOB>, avx512::tile<1, 1>>(a, N);
  else
    run_tiles<2, avx512::tile<2, kOB>, avx512::tile<1, 1>>(a, N);
}
#endif

void run_generic(const Operands& a, int64_t N) {
  const int64_t nt = (N + 1) / 2, ot = (a.O + kOB - 1) / kOB;
  at::parallel_for(0, nt * ot, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const int64_t n0 = (t / ot) * 2, o0 = (t % ot) * kOB;
      tile_generic(a, n0, std::min(N, n0 + 2), o0, std::min(a.O, o0 + kOB));
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
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();  // no copy when already contiguous
  const Operands a{xc.const_data_ptr<int8_t>(), wc.const_data_ptr<int8_t>(), K, O, y.mutable_data_ptr<int32_t>()};
#if SHIFTADD_X86
  if (current_isa() == Isa::Avx512 && has_avx512bw()) {
    run_avx512(a, N);
    return y;
  }
  if (current_isa() != Isa::Generic) {
    run_avx2(a, N);
    return y;
  }
#endif
  run_generic(a, N);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(shiftadd, CPU, m) { m.impl("adder_linear_int8", &adder_linear_int8); }

}  // namespace cpu
}  // namespace shiftadd
