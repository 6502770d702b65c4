// CUDA kernels of the shiftadd adder (L1) operators and their raw-pointer launchers
// (declared in csrc/cuda/kernels.h; the torch glue is csrc/cuda/adder.cpp).  This file
// includes CUDA headers only.
//
// Every operator is an implicit GEMM over rows r = (n, oy, ox), output channels o and
// the reduction k = (c, i, j) of one group; the im2col matrix X is never built: the
// global->shared loads compute the input position of each (r, k) and read a zero where
// it falls on padding.
//
//   forward       Y[r, o]  = -sum_k |X[r, k] - W[o, k]|
//   grad input    dX[p, c] =  sum_(i,j,o) g[r(p,i,j), o] f(W[o, c, i, j] - x[p, c])
//                 (gather: each input position p sums the taps that reach it)
//   grad weight   dW[o, k] =  sum_r g[r, o] sign(X[r, k] - W[o, k])       (exact mode)
//
// Kernels (256 threads each):
//   adder_fwd_tiled   128x128 (or 256x32) block tile, 8x8 (8x4) outputs per thread,
//                     BK = 8, two shared-memory stages filled by cp.async (float) or
//                     through registers (half / bfloat16, converted to float on the way)
//   adder_fwd_h2      float16 only (Algo::Fp16x2): the tiled forward in half2 arithmetic,
//                     float16 partial sums flushed to float32 every 16 columns
//   adder_fwd_direct  one thread per (row, group), all Og <= 8 outputs in registers
//   adder_gin_tiled   128x64 (256x32) tile of (input position, channel), 8x4 per thread,
//                     reduction over (tap, o) in chunks of 8 o
//   adder_gin_direct  one thread per (input position, channel)
//   adder_gw_tiled    64x64 tile of (o, k), 4x4 per thread, rows split over blocks into
//                     float32 partial sums, adder_gw_reduce adds them in a fixed order
//   adder_gw_direct   one block per (o, k), fixed-order tree reduction
//   adder_split_reduce  the reduction splits (split-K) of the tiled forward and grad input:
//                     when the output tiles alone leave SMs idle, S blocks per tile each sum
//                     a range of the reduction stages into float32 partial sums, and this
//                     kernel adds them in split order (KSplit, k_split)
// All accumulate in float32 (adder_fwd_h2: in float16 partial sums of 16 terms, then float32).
// Results are deterministic (no atomics anywhere).
//
// NaN / Inf follow the CPU kernels: |x - w| and the hardtanh propagate NaN (clamp written
// with comparisons, which ptxas turns into NaN-propagating FMNMX.NAN); sign(0) =
// sign(NaN) = 0 and g * 0 keeps a NaN g; terms that do not exist in the definition (taps
// that miss an input position, padding rows) are skipped, never multiplied by zero.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/kernels.h"

// Launch hook: `kern` must be a plain identifier (a kernel function pointer).  A host
// emulation of these kernels may define SA_LAUNCH before including this file.
#ifndef SA_LAUNCH
#define SA_LAUNCH(kern, grid, block, stream, ...) kern<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800) && !defined(SA_EMULATION)
#define SA_CP_ASYNC 1
#else
#define SA_CP_ASYNC 0
#endif

namespace shiftadd {
namespace cuda {
namespace {

constexpr int kThreads = 256;      // threads per block, every kernel
constexpr int kBK = 8;             // reduction depth of one shared-memory stage (forward, grad input)
constexpr int kPad = 4;            // shared-memory row padding, in floats (keeps float4 alignment)
constexpr int kFar = -(1 << 29);   // input coordinate of rows past the end: every bound check fails
constexpr int kKtabAlign = 64;     // the column table is padded to a multiple of this

// ---------------------------------------------------------------------------------
// small device helpers
// ---------------------------------------------------------------------------------

template <bool B>
struct BoolC {
  static constexpr bool value = B;
};

template <typename T>
struct IsFloat {
  static constexpr bool value = false;
};
template <>
struct IsFloat<float> {
  static constexpr bool value = true;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// clamp(d, -1, 1) with NaN passing through (as the CPU kernels and torch.clamp)
__device__ __forceinline__ float hardtanh(float d) {
  d = 1.f < d ? 1.f : d;
  return -1.f > d ? -1.f : d;
}
// clamp(a - b, 0, 1) in one instruction (FADD.SAT); NaN gives 0 (callers exclude NaN)
__device__ __forceinline__ float sub_sat(float a, float b) {
#if defined(__CUDA_ARCH__) && !defined(SA_EMULATION)
  float d;
  asm("sub.rn.sat.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  const float d = a - b;
  return d > 1.f ? 1.f : (d > 0.f ? d : 0.f);
#endif
}
// sign(a - b) as torch.sign (0 for 0 and NaN), from comparisons: exact as the CPU's
// sign of the difference (which never underflows to zero there) even under flush-to-zero
__device__ __forceinline__ float sign_cmp(float a, float b) {
  float s = a > b ? 1.f : 0.f;
  s = a < b ? -1.f : s;
  return s;
}

// 4-byte global -> shared copy, zero-filled when !ok (src is then never read).
__device__ __forceinline__ void cp_async_f32(float* dst, const float* src, bool ok) {
#if SA_CP_ASYNC
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const size_t gsrc = __cvta_generic_to_global(src);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gsrc), "r"(ok ? 4 : 0) : "memory");
#else
  *dst = ok ? *src : 0.f;
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if SA_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// waits until at most N committed groups of this thread are still in flight
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if SA_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Division by a run-time constant d >= 1 for 0 <= n < 2^31 (multiply-high and shift).
struct FastDiv {
  uint32_t d, m, s;
};

FastDiv make_fastdiv(int64_t d) {
  FastDiv f;
  f.d = static_cast<uint32_t>(d < 1 ? 1 : d);
  uint32_t s = 0;
  while (s < 31 && (uint64_t(1) << s) < f.d) s++;
  f.s = s;
  f.m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << s) - f.d)) / f.d + 1);
  return f;
}

__host__ __device__ __forceinline__ int fdiv(int n, const FastDiv& f) {
#if defined(__CUDA_ARCH__)
  const uint32_t t = __umulhi(static_cast<uint32_t>(n), f.m);
#else
  const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * f.m) >> 32);
#endif
  return static_cast<int>((t + static_cast<uint32_t>(n)) >> f.s);
}

// The geometry as the kernels see it: counts in 32 bits (adder_check_sizes), strides in 64.
struct DevGeom {
  int N, C, H, W, O, kh, kw, sh, sw, ph, pw, dh, dw, G, Ho, Wo, Cg, Og, K, khw, L, R, P, HW;
  long long xsN, xsC, xsH, xsW;
  FastDiv fL, fWo, fHW, fW, fsh, fsw, fkw;
};

struct Strides4 {
  long long n, c, h, w;
};

DevGeom make_dev_geom(const ConvGeom& g) {
  DevGeom d;
  d.N = (int)g.N; d.C = (int)g.C; d.H = (int)g.H; d.W = (int)g.W; d.O = (int)g.O;
  d.kh = (int)g.kh; d.kw = (int)g.kw; d.sh = (int)g.sh; d.sw = (int)g.sw; d.ph = (int)g.ph; d.pw = (int)g.pw;
  d.dh = (int)g.dh; d.dw = (int)g.dw; d.G = (int)g.G; d.Ho = (int)g.Ho; d.Wo = (int)g.Wo;
  d.Cg = (int)g.Cg; d.Og = (int)g.Og; d.K = (int)g.K; d.khw = (int)(g.kh * g.kw);
  d.L = (int)(g.Ho * g.Wo); d.R = (int)(g.N * g.Ho * g.Wo); d.P = (int)(g.N * g.H * g.W); d.HW = (int)(g.H * g.W);
  d.xsN = g.xsN; d.xsC = g.xsC; d.xsH = g.xsH; d.xsW = g.xsW;
  d.fL = make_fastdiv(d.L); d.fWo = make_fastdiv(d.Wo); d.fHW = make_fastdiv(d.HW); d.fW = make_fastdiv(d.W);
  d.fsh = make_fastdiv(d.sh); d.fsw = make_fastdiv(d.sw); d.fkw = make_fastdiv(d.kw);
  return d;
}

Strides4 make_strides(const int64_t* s) { return Strides4{s[0], s[1], s[2], s[3]}; }

// Row r = (n, oy, ox) of the implicit GEMM.
struct RowPos {
  int n, oy, ox;
};
__device__ __forceinline__ RowPos decode_row(const DevGeom& g, int r) {
  RowPos p;
  p.n = fdiv(r, g.fL);
  const int l = r - p.n * g.L;
  p.oy = fdiv(l, g.fWo);
  p.ox = l - p.oy * g.Wo;
  return p;
}
// Input position p = (n, iy, ix).
__device__ __forceinline__ RowPos decode_pos(const DevGeom& g, int p) {
  RowPos q;
  q.n = fdiv(p, g.fHW);
  const int l = p - q.n * g.HW;
  q.oy = fdiv(l, g.fW);
  q.ox = l - q.oy * g.W;
  return q;
}

// ---------------------------------------------------------------------------------
// preparation kernels (tiny): the im2col column table and packed float32 weights
// ---------------------------------------------------------------------------------

// Column t of the reduction in the kernels' order: (c, i, j) as the weight, or for
// channels-last x (cl_order) (i, j, c), so that consecutive columns are consecutive channels.
__device__ __forceinline__ int column_k(const DevGeom& g, int t, int cl_order) {
  if (!cl_order) return t;
  const int tap = t / g.Cg;
  return (t - tap * g.Cg) * g.khw + tap;
}

// ktab[t] = {offset of column t inside one image of x, dy << 16 | dx} (dy, dx < 2^15 by
// adder_check_sizes); zeros for K <= t < nk (the loaders also check t < K).
__global__ void adder_prep_ktab(const DevGeom g, int2* __restrict__ ktab, int nk, int cl_order) {
  for (long long t_ = blockIdx.x * blockDim.x + threadIdx.x; t_ < nk; t_ += gridDim.x * blockDim.x) {
    const int t = static_cast<int>(t_);  // 64-bit loop counter: no overflow near 2^31
    int2 e = make_int2(0, 0);
    if (t < g.K) {
      const int k = column_k(g, t, cl_order);
      const int c = k / g.khw, tap = k - c * g.khw;
      const int i = tap / g.kw, j = tap - i * g.kw;
      const int dy = i * g.dh, dx = j * g.dw;
      e.x = static_cast<int>(c * g.xsC + dy * g.xsH + dx * g.xsW);
      e.y = (dy << 16) | dx;
    }
    ktab[t] = e;
  }
}
__device__ __forceinline__ int tab_dy(int2 e) { return e.y >> 16; }
__device__ __forceinline__ int tab_dx(int2 e) { return e.y & 0xffff; }

// wt[gi][t][o] = w(gi Og + o, column t) as float (WT = float) or as is (WT = T = __half, for
// the fp16x2 forward), for the forward (w(o, k) = w[o wsO + k wsK]).
__device__ __forceinline__ void store_wt(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_wt(float* p, __half v) { *p = __half2float(v); }
__device__ __forceinline__ void store_wt(float* p, __nv_bfloat16 v) { *p = __bfloat162float(v); }
__device__ __forceinline__ void store_wt(__half* p, __half v) { *p = v; }

template <typename T, typename WT = float>
__global__ void adder_prep_wt(const DevGeom g, const T* __restrict__ w, long long wsO, long long wsK, int cl_order,
                              WT* __restrict__ wt) {
  const int total = g.G * g.K * g.Og;
  for (long long idx_ = blockIdx.x * blockDim.x + threadIdx.x; idx_ < total; idx_ += gridDim.x * blockDim.x) {
    const int idx = static_cast<int>(idx_);  // 64-bit loop counter: no overflow near 2^31
    const int o = idx % g.Og, rest = idx / g.Og;
    const int t = rest % g.K, gi = rest / g.K;
    store_wt(wt + idx, w[(long long)(gi * g.Og + o) * wsO + (long long)column_k(g, t, cl_order) * wsK]);
  }
}

// wt2[gi][tap][o][c] = w[gi Og + o][c][tap] as float, for the grad input; *wbad = 1 if
// some weight is NaN or infinite (the caller zeroes *wbad first).
template <typename T>
__global__ void adder_prep_wt2(const DevGeom g, const T* __restrict__ w, float* __restrict__ wt2,
                               int* __restrict__ wbad) {
  const int total = g.O * g.K;
  for (long long idx_ = blockIdx.x * blockDim.x + threadIdx.x; idx_ < total; idx_ += gridDim.x * blockDim.x) {
    const int idx = static_cast<int>(idx_);  // 64-bit loop counter: no overflow near 2^31
    const int cl = idx % g.Cg;
    int rest = idx / g.Cg;
    const int o = rest % g.Og;
    rest /= g.Og;
    const int tap = rest % g.khw, gi = rest / g.khw;
    const float v = to_f(w[((long long)(gi * g.Og + o) * g.Cg + cl) * g.khw + tap]);
    wt2[idx] = v;
    if ((__float_as_uint(v) & 0x7f800000u) == 0x7f800000u) *wbad = 1;
  }
}

// ---------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------

template <int BM_, int BN_, int TN_>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, TN = TN_;  // 8 rows per thread
};
using FwdWide = TileCfg<128, 128, 8>;    // Og > 32 (Tuning::fit_tiles: Og > 64)
using FwdNarrow = TileCfg<256, 32, 4>;   // 8 < Og <= 32 (fit_tiles: 16 < Og <= 64)
using FwdNarrow16 = TileCfg<512, 16, 4>; // fit_tiles: Og <= 16 (no idle half of a 32-wide tile)

// The load mapping of the forward tile (adder_fwd_tiled, adder_fwd_h2): 256 threads, BK
// columns per stage; CL selects threads along the tile's columns (channels-last x).
// A element q of a thread: CL: row a_m + q RSTEP, column a_k; else row a_m + (q / CPT)
// kThreads, column a_k + q % CPT (a tile of more rows than threads: each thread loads all BK
// columns of BM / kThreads rows).  B: BLOAD threads load BE elements each (BN BK < kThreads:
// the first BN BK threads one each).
template <class Cfg, bool CL>
struct FwdTile {
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, TN = Cfg::TN, BK = kBK;
  static constexpr int AE = BM * BK / kThreads;  // A elements per thread and stage
  static constexpr int BE = BN * BK >= kThreads ? BN * BK / kThreads : 1;  // B elements per loading thread
  static constexpr int BLOAD = BN * BK / BE;     // threads that load B
  static constexpr int TX = BN / TN;             // threads along the columns of the tile
  static constexpr int RSTEP = kThreads / BK;    // CL: row distance between a thread's A elements
  static constexpr int CPT = AE < BK ? AE : BK;  // not CL: columns per thread
  static_assert(AE >= 1 && TX * (BM / 8) == kThreads && (TN == 8 || TN == 4), "tile config");
  static_assert(CL || (BM <= kThreads && kThreads % BM == 0 && (kThreads / BM) * AE == BK) ||
                    (BM % kThreads == 0 && AE == (BM / kThreads) * BK), "row mapping");
  static_assert(!CL || RSTEP * AE == BM, "column mapping");
  static_assert(BLOAD <= kThreads && BLOAD % BN == 0 && (BLOAD / BN) * BE == BK, "B mapping");
  __device__ static __forceinline__ int a_col(int a_k, int q) { return CL ? a_k : a_k + q % CPT; }
  __device__ static __forceinline__ int a_row(int a_m, int q) {
    return CL ? a_m + q * RSTEP : a_m + (q / CPT) * kThreads;
  }
};

// Shared by the two tiled forwards (adder_fwd_tiled, adder_fwd_h2).
// Rows[m] for the BM rows from m0: offset of the row's tap (0, 0) in x (split in two ints;
// it may lie outside the image) and that tap's input coordinates (kFar past the last row).
template <int BM>
__device__ __forceinline__ void decode_tile_rows(const DevGeom& g, int m0, int4* Rows) {
  for (int m = threadIdx.x; m < BM; m += kThreads) {
    const int r = m0 + m;
    int4 e = make_int4(0, 0, kFar, kFar);
    if (r < g.R) {
      const RowPos p = decode_row(g, r);
      e.z = p.oy * g.sh - g.ph;
      e.w = p.ox * g.sw - g.pw;
      const long long base = p.n * g.xsN + e.z * g.xsH + e.w * g.xsW;
      e.x = static_cast<int>(static_cast<unsigned long long>(base) & 0xffffffffULL);
      e.y = static_cast<int>(base >> 32);
    }
    Rows[m] = e;
  }
}

// Element (row mm, column t*BK + kk) of the implicit im2col matrix of one group: whether
// it lies inside the image (false on padding and past column K), and its offset in x.
__device__ __forceinline__ bool a_element(const DevGeom& g, const int2* __restrict__ ktab, const int4* Rows, int t,
                                          int kk, int mm, long long* off) {
  const int2 e = ktab[t * kBK + kk];
  const int4 rw = Rows[mm];
  const bool ok = t * kBK + kk < g.K && (unsigned)(rw.z + tab_dy(e)) < (unsigned)g.H &&
                  (unsigned)(rw.w + tab_dx(e)) < (unsigned)g.W;
  const unsigned long long hi = static_cast<unsigned>(rw.y), lo = static_cast<unsigned>(rw.x);
  *off = static_cast<long long>((hi << 32) | lo) + e.x;
  return ok;
}

// Writes a thread's 8 x TN outputs -acc (rows ty*4 + {0..3}, BM/2 + ty*4 + {0..3}; columns
// tx*4 + {0..3}, BN/2 + tx*4 + {0..3}) of group gi, skipping those past R and Og.
template <class Cfg, typename T>
__device__ __forceinline__ void store_tile(const DevGeom& g, T* __restrict__ y, const Strides4& ys, int m0, int o0,
                                           int gi, int ty, int tx, const float (&acc)[8][Cfg::TN]) {
#pragma unroll
  for (int i = 0; i < 8; i++) {
    const int r = m0 + (i < 4 ? ty * 4 + i : Cfg::BM / 2 + ty * 4 + (i - 4));
    if (r < g.R) {
      const RowPos p = decode_row(g, r);
      const long long roff = p.n * ys.n + p.oy * ys.h + p.ox * ys.w;
#pragma unroll
      for (int j = 0; j < Cfg::TN; j++) {
        const int o = o0 + (j < 4 ? tx * 4 + j : Cfg::BN / 2 + tx * 4 + (j - 4));
        if (o < g.Og) y[roff + (long long)(gi * g.Og + o) * ys.c] = from_f<T>(-acc[i][j]);
      }
    }
  }
}

// Split-K: writes a thread's 8 x TN float32 partial sums acc (same rows and columns as
// store_tile; columns c0 + ... of group gi, c < Cg) to part[r * rs + (gi * Cg + c) * cs],
// skipping rows past nrows.
template <class Cfg>
__device__ __forceinline__ void store_partial(float* __restrict__ part, long long rs, long long cs, int nrows,
                                              int Cg, int m0, int c0, int gi, int ty, int tx,
                                              const float (&acc)[8][Cfg::TN]) {
#pragma unroll
  for (int i = 0; i < 8; i++) {
    const int r = m0 + (i < 4 ? ty * 4 + i : Cfg::BM / 2 + ty * 4 + (i - 4));
    if (r < nrows) {
#pragma unroll
      for (int j = 0; j < Cfg::TN; j++) {
        const int c = c0 + (j < 4 ? tx * 4 + j : Cfg::BN / 2 + tx * 4 + (j - 4));
        if (c < Cg) part[r * rs + (long long)(gi * Cg + c) * cs] = acc[i][j];
      }
    }
  }
}

// Y tile [m0, m0 + BM) x [o0, o0 + BN) of group gi for every (gi, o-tile) assigned to
// this block.  CL selects the global->shared mapping: threads along rows (NCHW x, k
// order (c, i, j)) or along columns (channels-last x, k order (i, j, c)).
// SPLIT (split-K): this block sums stages [z tps, (z + 1) tps), z = blockIdx.z, and
// writes the positive partial sums to part (slice z of R x O floats, row stride prs,
// column stride pcs) for adder_split_reduce; otherwise it sums all stages and writes -acc
// to y (part, tps, prs, pcs unused: the instantiation without splits keeps the registers
// of the kernel before splits existed, which the 128-register bound leaves no room for).
template <typename T, bool CL, class Cfg, bool SPLIT = false>
__global__ void __launch_bounds__(kThreads, 2)
    adder_fwd_tiled(const DevGeom g, const T* __restrict__ x, const int2* __restrict__ ktab,
                    const float* __restrict__ wt, T* __restrict__ y, const Strides4 ys, float* __restrict__ part,
                    int tps, long long prs, long long pcs) {
  using S = FwdTile<Cfg, CL>;
  constexpr int BM = S::BM, BN = S::BN, TN = S::TN, BK = S::BK, AE = S::AE, BE = S::BE, TX = S::TX;
  constexpr bool kAsync = IsFloat<T>::value && SA_CP_ASYNC;

  __shared__ __align__(16) float As[2][BK][BM + kPad];
  __shared__ __align__(16) float Bs[2][BK][BN + kPad];

  const int tid = threadIdx.x;
  const int m0 = blockIdx.x * BM;
  const int nT = (g.K + BK - 1) / BK;
  const int nOt = (g.Og + BN - 1) / BN;
  const int t0 = SPLIT ? blockIdx.z * tps : 0;  // this block's stages [t0, t1)
  const int t1 = SPLIT ? (t0 + tps < nT ? t0 + tps : nT) : nT;

  // A loader: element q of this thread is (row S::a_row(a_m, q), column S::a_col(a_k, q)).
  // Per row: offset of its tap (0, 0) in x (may lie outside the image) and input
  // coordinates of that tap, decoded once into shared memory.
  __shared__ int4 Rows[BM];
  const int a_m = CL ? tid / BK : tid % BM;
  const int a_k = CL ? tid % BK : (tid / BM) * AE;
  decode_tile_rows<BM>(g, m0, Rows);
  __syncthreads();
  // B loader: element q is (column b_k + q, output b_o)
  const int b_o = tid % BN, b_k = (tid / BN) * BE;
  // compute: rows ty*4 + {0..3} and BM/2 + ty*4 + {0..3}; columns tx*4 + {0..3} (+ BN/2)
  const int tx = tid % TX, ty = tid / TX;

  for (long long yz_ = blockIdx.y; yz_ < g.G * nOt; yz_ += gridDim.y) {
    const int yz = static_cast<int>(yz_);  // 64-bit loop counter: no overflow near 2^31
    const int gi = yz / nOt, o0 = (yz - gi * nOt) * BN;
    const T* xg = x + (long long)gi * g.Cg * g.xsC;
    const float* wg = wt + (long long)gi * g.K * g.Og;
    float areg[AE];
    float acc[8][TN];
#pragma unroll
    for (int i = 0; i < 8; i++)
#pragma unroll
      for (int j = 0; j < TN; j++) acc[i][j] = 0.f;

    auto load = [&](int t, int buf) {
#pragma unroll
      for (int q = 0; q < AE; q++) {
        const int kk = S::a_col(a_k, q), mm = S::a_row(a_m, q);
        long long off;
        const bool ok = a_element(g, ktab, Rows, t, kk, mm, &off);
        const T* src = ok ? xg + off : xg;
        if constexpr (kAsync) {
          cp_async_f32(&As[buf][kk][mm], reinterpret_cast<const float*>(src), ok);
        } else {
          areg[q] = ok ? to_f(*src) : 0.f;
        }
      }
      if (S::BLOAD == kThreads || tid < S::BLOAD) {
#pragma unroll
        for (int q = 0; q < BE; q++) {
          const int kk = b_k + q, k = t * BK + kk, o = o0 + b_o;
          const bool ok = k < g.K && o < g.Og;
          cp_async_f32(&Bs[buf][kk][b_o], ok ? wg + ((long long)k * g.Og + o) : wg, ok);
        }
      }
    };
    auto store_a = [&](int buf) {
      if constexpr (!kAsync) {
#pragma unroll
        for (int q = 0; q < AE; q++) As[buf][S::a_col(a_k, q)][S::a_row(a_m, q)] = areg[q];
      }
    };
    auto compute = [&](int buf) {
#pragma unroll
      for (int kk = 0; kk < BK; kk++) {
        float a[8], b[TN];
        const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
        const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][BM / 2 + ty * 4]);
        a[0] = a0.x; a[1] = a0.y; a[2] = a0.z; a[3] = a0.w;
        a[4] = a1.x; a[5] = a1.y; a[6] = a1.z; a[7] = a1.w;
        const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
        b[0] = b0.x; b[1] = b0.y; b[2] = b0.z; b[3] = b0.w;
        if constexpr (TN == 8) {
          const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][kk][BN / 2 + tx * 4]);
          b[4] = b1.x; b[5] = b1.y; b[6] = b1.z; b[7] = b1.w;
        }
#pragma unroll
        for (int i = 0; i < 8; i++)
#pragma unroll
          for (int j = 0; j < TN; j++) acc[i][j] += fabsf(a[i] - b[j]);
      }
    };

    load(t0, 0);
    cp_async_commit();
    store_a(0);
    for (int t = t0; t < t1; t++) {
      const int buf = (t - t0) & 1;
      if (t + 1 < t1) load(t + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();  // stage t complete and visible
      compute(buf);
      if (t + 1 < t1) store_a(buf ^ 1);
      __syncthreads();  // stage t consumed: its buffer may be refilled
    }

    if constexpr (SPLIT) {
      store_partial<Cfg>(part + (long long)blockIdx.z * g.R * g.O, prs, pcs, g.R, g.Og, m0, o0, gi, ty, tx, acc);
    } else {
      store_tile<Cfg>(g, y, ys, m0, o0, gi, ty, tx, acc);
    }
  }
}

// fp16x2 forward (float16 x and w only): the tile of adder_fwd_tiled computed in packed
// half2 arithmetic, two outputs per instruction.  Each thread holds its 8 x TN outputs
// as 8 x TN/2 __half2 partial sums: h += |a - b| (HSUB2, then HADD2 of the absolute
// value), each step rounded to float16.  After every kH2Flush columns (and at the end)
// the partial sums are added to float32 accumulators and restart from zero, so the
// float16 rounding error grows with kH2Flush, not with K.  Shared memory holds float16.
// Result (bit for bit, shiftadd/reference/adder.py l1_forward_fp16x2): columns t in the
// kernel's order (column_k), in chunks of kH2Flush from t = 0; per chunk a float16 sum in
// column order starting from +0; chunks added in order to a float32 sum from 0; the output
// is float16(-sum).  A float16 |a - b| or chunk sum above 65504 becomes inf.
constexpr int kPadH = 8;                 // shared-memory row padding, in halves (16 bytes)
constexpr int kH2Flush = 2 * kBK;        // columns per float16 partial sum

template <bool CL, class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    adder_fwd_h2(const DevGeom g, const __half* __restrict__ x, const int2* __restrict__ ktab,
                 const __half* __restrict__ wt, __half* __restrict__ y, const Strides4 ys) {
  using S = FwdTile<Cfg, CL>;
  constexpr int BM = S::BM, BN = S::BN, TN = S::TN, BK = S::BK, AE = S::AE, BE = S::BE, TX = S::TX;
  constexpr int FS = kH2Flush / BK;  // stages per float16 partial sum
  static_assert(kH2Flush % BK == 0, "flush at stage ends");

  __shared__ __align__(16) __half As[2][BK][BM + kPadH];
  __shared__ __align__(16) __half Bs[2][BK][BN + kPadH];

  const int tid = threadIdx.x;
  const int m0 = blockIdx.x * BM;
  const int nT = (g.K + BK - 1) / BK;
  const int nOt = (g.Og + BN - 1) / BN;
  const __half hzero = __float2half_rn(0.f);

  __shared__ int4 Rows[BM];
  const int a_m = CL ? tid / BK : tid % BM;
  const int a_k = CL ? tid % BK : (tid / BM) * AE;
  decode_tile_rows<BM>(g, m0, Rows);
  __syncthreads();
  const int b_o = tid % BN, b_k = (tid / BN) * BE;
  const int tx = tid % TX, ty = tid / TX;

  for (long long yz_ = blockIdx.y; yz_ < g.G * nOt; yz_ += gridDim.y) {
    const int yz = static_cast<int>(yz_);
    const int gi = yz / nOt, o0 = (yz - gi * nOt) * BN;
    const __half* xg = x + (long long)gi * g.Cg * g.xsC;
    const __half* wg = wt + (long long)gi * g.K * g.Og;
    __half areg[AE], breg[BE];
    float acc[8][TN];
    __half2 h[8][TN / 2];
#pragma unroll
    for (int i = 0; i < 8; i++) {
#pragma unroll
      for (int j = 0; j < TN; j++) acc[i][j] = 0.f;
#pragma unroll
      for (int j = 0; j < TN / 2; j++) h[i][j] = __half2half2(hzero);
    }

    const bool b_loader = S::BLOAD == kThreads || tid < S::BLOAD;
    auto load = [&](int t) {
#pragma unroll
      for (int q = 0; q < AE; q++) {
        long long off;
        areg[q] = a_element(g, ktab, Rows, t, S::a_col(a_k, q), S::a_row(a_m, q), &off) ? xg[off] : hzero;
      }
#pragma unroll
      for (int q = 0; q < BE; q++) {
        const int k = t * BK + b_k + q, o = o0 + b_o;
        breg[q] = (b_loader && k < g.K && o < g.Og) ? wg[(long long)k * g.Og + o] : hzero;
      }
    };
    auto store = [&](int buf) {
#pragma unroll
      for (int q = 0; q < AE; q++) As[buf][S::a_col(a_k, q)][S::a_row(a_m, q)] = areg[q];
      if (b_loader) {
#pragma unroll
        for (int q = 0; q < BE; q++) Bs[buf][b_k + q][b_o] = breg[q];
      }
    };
    auto compute = [&](int buf) {
#pragma unroll
      for (int kk = 0; kk < BK; kk++) {
        // rows ty*4 + {0..3}, BM/2 + ty*4 + {0..3}; column pairs tx*4 + {0, 2} (+ BN/2)
        const __half2* pa0 = reinterpret_cast<const __half2*>(&As[buf][kk][ty * 4]);
        const __half2* pa1 = reinterpret_cast<const __half2*>(&As[buf][kk][BM / 2 + ty * 4]);
        const __half2 p0 = pa0[0], p1 = pa0[1], p2 = pa1[0], p3 = pa1[1];
        const __half2 a[8] = {__low2half2(p0), __high2half2(p0), __low2half2(p1), __high2half2(p1),
                              __low2half2(p2), __high2half2(p2), __low2half2(p3), __high2half2(p3)};
        __half2 b[TN / 2];
        const __half2* pb0 = reinterpret_cast<const __half2*>(&Bs[buf][kk][tx * 4]);
        b[0] = pb0[0];
        b[1] = pb0[1];
        if constexpr (TN == 8) {
          const __half2* pb1 = reinterpret_cast<const __half2*>(&Bs[buf][kk][BN / 2 + tx * 4]);
          b[2] = pb1[0];
          b[3] = pb1[1];
        }
#pragma unroll
        for (int i = 0; i < 8; i++)
#pragma unroll
          for (int j = 0; j < TN / 2; j++) h[i][j] = __hadd2(h[i][j], __habs2(__hsub2(a[i], b[j])));
      }
    };
    auto flush = [&]() {
#pragma unroll
      for (int i = 0; i < 8; i++)
#pragma unroll
        for (int j = 0; j < TN / 2; j++) {
          const float2 f = __half22float2(h[i][j]);
          acc[i][2 * j] += f.x;
          acc[i][2 * j + 1] += f.y;
          h[i][j] = __half2half2(hzero);
        }
    };

    load(0);
    store(0);
    for (int t = 0; t < nT; t++) {
      const int buf = t & 1;
      if (t + 1 < nT) load(t + 1);  // global loads in flight during the compute
      __syncthreads();              // stage t stored and visible
      compute(buf);
      if ((t + 1) % FS == 0 || t + 1 == nT) flush();
      if (t + 1 < nT) store(buf ^ 1);  // the other buffer: its last readers passed the barrier above
    }
    __syncthreads();  // the next (gi, o-tile) overwrites buffer 0

    store_tile<Cfg>(g, y, ys, m0, o0, gi, ty, tx, acc);
  }
}

// One thread per (row, group) with all Og <= kDirectOg outputs in registers.
constexpr int kDirectOg = 8;

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    adder_fwd_direct(const DevGeom g, const T* __restrict__ x, const int2* __restrict__ ktab,
                     const float* __restrict__ wt, T* __restrict__ y, const Strides4 ys) {
  for (long long gi_ = blockIdx.y; gi_ < g.G; gi_ += gridDim.y) {
    const int gi = static_cast<int>(gi_);  // 64-bit loop counter: no overflow near 2^31
    const T* xg = x + (long long)gi * g.Cg * g.xsC;
    const float* wg = wt + (long long)gi * g.K * g.Og;
    for (long long r_ = blockIdx.x * blockDim.x + threadIdx.x; r_ < g.R; r_ += gridDim.x * blockDim.x) {
      const int r = static_cast<int>(r_);  // 64-bit loop counter: no overflow near 2^31
      const RowPos p = decode_row(g, r);
      const int iy0 = p.oy * g.sh - g.ph, ix0 = p.ox * g.sw - g.pw;
      const long long base = p.n * g.xsN + iy0 * g.xsH + ix0 * g.xsW;
      float acc[kDirectOg];
#pragma unroll
      for (int o = 0; o < kDirectOg; o++) acc[o] = 0.f;
      for (int k = 0; k < g.K; k++) {
        const int2 e = ktab[k];
        const bool ok = (unsigned)(iy0 + tab_dy(e)) < (unsigned)g.H && (unsigned)(ix0 + tab_dx(e)) < (unsigned)g.W;
        const float xv = ok ? to_f(xg[base + e.x]) : 0.f;
        const float* wk = wg + (long long)k * g.Og;
#pragma unroll
        for (int o = 0; o < kDirectOg; o++)
          if (o < g.Og) acc[o] += fabsf(xv - wk[o]);
      }
      const long long roff = p.n * ys.n + p.oy * ys.h + p.ox * ys.w;
#pragma unroll
      for (int o = 0; o < kDirectOg; o++)
        if (o < g.Og) y[roff + (long long)(gi * g.Og + o) * ys.c] = from_f<T>(-acc[o]);
    }
  }
}

// ---------------------------------------------------------------------------------
// grad input (gather)
// ---------------------------------------------------------------------------------

using GinWide = TileCfg<128, 64, 4>;    // Cg > 32
using GinNarrow = TileCfg<256, 32, 4>;  // Cg <= 32

// Output position (qy, qx) that tap (i, j) of input position (iy, ix) belongs to, if any.
struct TapHit {
  bool ok;
  int rr;  // row r = n L + qy Wo + qx
};
__device__ __forceinline__ TapHit tap_hit(const DevGeom& g, int n, int iy, int ix, int tap) {
  const int i = fdiv(tap, g.fkw), j = tap - i * g.kw;
  const int ny = iy + g.ph - i * g.dh, nx = ix + g.pw - j * g.dw;
  TapHit h{false, 0};
  if (ny < 0 || nx < 0) return h;
  const int qy = fdiv(ny, g.fsh), qx = fdiv(nx, g.fsw);
  h.ok = qy * g.sh == ny && qx * g.sw == nx && qy < g.Ho && qx < g.Wo;
  h.rr = n * g.L + qy * g.Wo + qx;
  return h;
}

// dX tile: input positions [p0, p0 + BM) x channels [c0, c0 + BN) of group gi, summed
// over the stages (tap, o-chunk of 8).  Each thread keeps its 8 x 4 x values in registers.
// A row whose tap misses its position gets g = 0 in the stage; 0 * f(w - x) is an exact
// zero unless f is NaN, which needs a NaN or infinite x or weight (sign is never NaN).
// So a block whose x values are finite, with finite weights (flag *wbad == 0, set by
// the weight packing), runs unmasked; otherwise the stage rows flagged invalid in Vf are
// skipped term by term, so that a NaN never meets a term that is not in the definition.
// Split-K (part != nullptr): this block sums stages [z tps, (z + 1) tps), z = blockIdx.z,
// into part (slice z of P x C floats, row stride prs, column stride pcs) for
// adder_split_reduce; otherwise tps >= the stage count and the block writes dx.
// SAT (Tuning::sat_gin, AdderNet mode, blocks that run unmasked): hardtanh(d) = 2 s - 1
// with s = clamp(d / 2 + 1/2, 0, 1), so sum_o g hardtanh(w - x) = 2 sum_o g s - sum_o g,
// s = sat((w / 2 + 1/2) - x / 2): one FADD.SAT and one FFMA per term instead of FADD,
// two FMNMX and FFMA, plus one add per row and stage for sum_o g (x / 2 is exact for normal
// x; w / 2 + 1/2 rounds once).  The rounding differs from the clamp form (within float32 sums).
template <typename T, bool EXACT, class Cfg, bool SAT = false>
__global__ void __launch_bounds__(kThreads, 1)
    adder_gin_tiled(const DevGeom g, const float* __restrict__ gt, const T* __restrict__ x,
                    const float* __restrict__ wt2, const int* __restrict__ wbad, T* __restrict__ dx,
                    const Strides4 dxs, float* __restrict__ part, int tps, long long prs, long long pcs) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, TN = Cfg::TN, BK = kBK;
  constexpr int AE = BM * BK / kThreads;
  constexpr int BE = BN * BK / kThreads;
  constexpr int TX = BN / TN;
  static_assert(TN == 4 && AE >= 1 && BE >= 1 && TX * (BM / 8) == kThreads, "tile config");
  static_assert(kThreads % BM == 0 && (kThreads / BM) * AE == BK, "A mapping");
  static_assert(kThreads % BN == 0 && (kThreads / BN) * BE == BK, "B mapping");

  __shared__ __align__(16) float As[2][BK][BM + kPad];
  __shared__ __align__(16) float Bs[2][BK][BN + kPad];
  __shared__ __align__(16) unsigned char Vf[2][BM];

  const int tid = threadIdx.x;
  const int p0 = blockIdx.x * BM;
  const int nOc = (g.Og + BK - 1) / BK;
  const int nT = g.khw * nOc;
  const int t0 = blockIdx.z * tps;  // this block's stages [t0, t1)
  const int t1 = t0 + tps < nT ? t0 + tps : nT;
  const int nCt = (g.Cg + BN - 1) / BN;
  const bool w_finite = EXACT || *wbad == 0;

  // A loader: one position a_m, o offsets a_k .. a_k + AE - 1
  const int a_m = tid % BM, a_k = (tid / BM) * AE;
  const int lp = p0 + a_m;
  const bool lrow = lp < g.P;
  RowPos lpos{0, 0, 0};
  if (lrow) lpos = decode_pos(g, lp);
  const int b_n = tid % BN, b_k = (tid / BN) * BE;
  const int tx = tid % TX, ty = tid / TX;

  for (long long yz_ = blockIdx.y; yz_ < g.G * nCt; yz_ += gridDim.y) {
    const int yz = static_cast<int>(yz_);  // 64-bit loop counter: no overflow near 2^31
    const int gi = yz / nCt, c0 = (yz - gi * nCt) * BN;
    float xr[8][TN], acc[8][TN];
    bool x_finite = true;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const int p = p0 + (i < 4 ? ty * 4 + i : BM / 2 + ty * 4 + (i - 4));
      RowPos q{0, 0, 0};
      if (p < g.P) q = decode_pos(g, p);
      const long long off = q.n * g.xsN + q.oy * g.xsH + q.ox * g.xsW;
#pragma unroll
      for (int j = 0; j < TN; j++) {
        const int cl = c0 + tx * 4 + j;
        xr[i][j] = (p < g.P && cl < g.Cg) ? to_f(x[off + (long long)(gi * g.Cg + cl) * g.xsC]) : 0.f;
        x_finite = x_finite && (__float_as_uint(xr[i][j]) & 0x7f800000u) != 0x7f800000u;
        acc[i][j] = 0.f;
      }
    }
    const bool fast = __syncthreads_and((x_finite && w_finite) ? 1 : 0) != 0;
    // SAT form: this tile's x halved (exact for normal x), the rows' sums of g, and whether it applies
    const bool sat = SAT && !EXACT && fast;
    float gs[8];
#pragma unroll
    for (int i = 0; i < 8; i++) gs[i] = 0.f;
    if (sat) {
#pragma unroll
      for (int i = 0; i < 8; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) xr[i][j] *= 0.5f;
    }

    // the stage pipeline; masked: skip the terms of the rows flagged invalid
    auto run = [&](auto masked, auto satc) {
      constexpr bool kSat = decltype(satc)::value;
      int ld_tap = t0 / nOc, ld_oc = t0 - (t0 / nOc) * nOc;  // next stage to load
      TapHit hit = tap_hit(g, lpos.n, lpos.oy, lpos.ox, ld_tap);  // (a split may start inside a tap)
      hit.ok = hit.ok && lrow;
      auto load = [&](int buf) {
        if (ld_oc == 0) {
          hit = tap_hit(g, lpos.n, lpos.oy, lpos.ox, ld_tap);
          hit.ok = hit.ok && lrow;
        }
        const int ob = ld_oc * BK;
        const float* ga = gt + (long long)(gi * g.Og + ob + a_k) * g.R + hit.rr;
#pragma unroll
        for (int q = 0; q < AE; q++) {
          const bool ok = hit.ok && ob + a_k + q < g.Og;
          cp_async_f32(&As[buf][a_k + q][a_m], ok ? ga + (long long)q * g.R : gt, ok);
        }
        if (decltype(masked)::value && tid < BM) Vf[buf][a_m] = hit.ok ? 1 : 0;
#pragma unroll
        for (int q = 0; q < BE; q++) {
          const int kk = b_k + q, o = ob + kk, cl = c0 + b_n;
          const bool ok = o < g.Og && cl < g.Cg;
          cp_async_f32(&Bs[buf][kk][b_n],
                       ok ? wt2 + (((long long)(gi * g.khw + ld_tap) * g.Og + o) * g.Cg + cl) : wt2, ok);
        }
        if (++ld_oc == nOc) {
          ld_oc = 0;
          ld_tap++;
        }
      };
      auto compute = [&](int buf) {
        unsigned v0 = 0, v1 = 0;
        if constexpr (decltype(masked)::value) {
          v0 = *reinterpret_cast<const unsigned*>(&Vf[buf][ty * 4]);
          v1 = *reinterpret_cast<const unsigned*>(&Vf[buf][BM / 2 + ty * 4]);
        }
#pragma unroll 2
        for (int kk = 0; kk < BK; kk++) {
          float a[8], b[TN];
          const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
          const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][BM / 2 + ty * 4]);
          a[0] = a0.x; a[1] = a0.y; a[2] = a0.z; a[3] = a0.w;
          a[4] = a1.x; a[5] = a1.y; a[6] = a1.z; a[7] = a1.w;
          const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
          b[0] = b0.x; b[1] = b0.y; b[2] = b0.z; b[3] = b0.w;
          if constexpr (kSat) {
#pragma unroll
            for (int j = 0; j < TN; j++) b[j] = fmaf(b[j], 0.5f, 0.5f);
#pragma unroll
            for (int i = 0; i < 8; i++) {
              gs[i] += a[i];
#pragma unroll
              for (int j = 0; j < TN; j++) acc[i][j] = fmaf(a[i], sub_sat(b[j], xr[i][j]), acc[i][j]);
            }
          } else {
#pragma unroll
            for (int i = 0; i < 8; i++) {
#pragma unroll
              for (int j = 0; j < TN; j++) {
                const float f = EXACT ? sign_cmp(b[j], xr[i][j]) : hardtanh(b[j] - xr[i][j]);
                const float v = fmaf(a[i], f, acc[i][j]);
                if constexpr (decltype(masked)::value) {
                  const bool valid = (((i < 4) ? v0 : v1) >> (8 * (i & 3))) & 1u;
                  acc[i][j] = valid ? v : acc[i][j];
                } else {
                  acc[i][j] = v;
                }
              }
            }
          }
        }
      };

      load(0);
      cp_async_commit();
      for (int t = t0; t < t1; t++) {
        const int buf = (t - t0) & 1;
        if (t + 1 < t1) load(buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // stage t complete and visible
        compute(buf);
        __syncthreads();  // stage t consumed
      }
    };
    if constexpr (EXACT) {
      run(BoolC<false>(), BoolC<false>());  // sign is never NaN: 0 * sign is always an exact zero
    } else {
      if (sat) {
        run(BoolC<false>(), BoolC<SAT>());
      } else if (fast) {
        run(BoolC<false>(), BoolC<false>());
      } else {
        run(BoolC<true>(), BoolC<false>());
      }
    }
    if (sat) {  // 2 sum g s - sum g
#pragma unroll
      for (int i = 0; i < 8; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] = fmaf(2.f, acc[i][j], -gs[i]);
    }

    if (part != nullptr) {
      store_partial<Cfg>(part + (long long)blockIdx.z * g.P * g.C, prs, pcs, g.P, g.Cg, p0, c0, gi, ty, tx, acc);
      continue;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const int p = p0 + (i < 4 ? ty * 4 + i : BM / 2 + ty * 4 + (i - 4));
      if (p < g.P) {
        const RowPos q = decode_pos(g, p);
        const long long off = q.n * dxs.n + q.oy * dxs.h + q.ox * dxs.w;
#pragma unroll
        for (int j = 0; j < TN; j++) {
          const int cl = c0 + tx * 4 + j;
          if (cl < g.Cg) dx[off + (long long)(gi * g.Cg + cl) * dxs.c] = from_f<T>(acc[i][j]);
        }
      }
    }
  }
}

// One thread per (input position, channel).
template <typename T, bool EXACT>
__global__ void __launch_bounds__(kThreads, 1)
    adder_gin_direct(const DevGeom g, const float* __restrict__ gt, const T* __restrict__ x,
                     const float* __restrict__ wt2, T* __restrict__ dx, const Strides4 dxs) {
  for (long long c_ = blockIdx.y; c_ < g.C; c_ += gridDim.y) {
    const int c = static_cast<int>(c_);  // 64-bit loop counter: no overflow near 2^31
    const int gi = c / g.Cg, cl = c - gi * g.Cg;
    for (long long p_ = blockIdx.x * blockDim.x + threadIdx.x; p_ < g.P; p_ += gridDim.x * blockDim.x) {
      const int p = static_cast<int>(p_);  // 64-bit loop counter: no overflow near 2^31
      const RowPos q = decode_pos(g, p);
      const float xv = to_f(x[q.n * g.xsN + c * g.xsC + q.oy * g.xsH + q.ox * g.xsW]);
      float acc = 0.f;
      for (int tap = 0; tap < g.khw; tap++) {
        const TapHit h = tap_hit(g, q.n, q.oy, q.ox, tap);
        if (!h.ok) continue;
        const float* gp = gt + (long long)gi * g.Og * g.R + h.rr;
        const float* wp = wt2 + (long long)(gi * g.khw + tap) * g.Og * g.Cg + cl;
        for (int o = 0; o < g.Og; o++) {
          const float wv = wp[(long long)o * g.Cg];
          acc = fmaf(gp[(long long)o * g.R], EXACT ? sign_cmp(wv, xv) : hardtanh(wv - xv), acc);
        }
      }
      dx[q.n * dxs.n + c * dxs.c + q.oy * dxs.h + q.ox * dxs.w] = from_f<T>(acc);
    }
  }
}

// ---------------------------------------------------------------------------------
// grad weight, exact mode
// ---------------------------------------------------------------------------------

constexpr int kGwBM = 64;  // o per tile
constexpr int kGwBN = 64;  // k per tile
constexpr int kGwBR = 32;  // rows per stage

// Partial sums part[s][gi Og + o][k] over rows [s rps, (s + 1) rps) for the tile
// o in [o0, o0 + 64), k in [k0, k0 + 64).  Each thread keeps its 4 x 4 weights in registers.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    adder_gw_tiled(const DevGeom g, const float* __restrict__ gt, const T* __restrict__ x,
                   const T* __restrict__ w, const int2* __restrict__ ktab, float* __restrict__ part, int rps) {
  constexpr int BM = kGwBM, BN = kGwBN, BR = kGwBR;
  constexpr int QE = BM * BR / kThreads;  // 8: A and B elements per thread and stage
  constexpr bool kAsync = IsFloat<T>::value && SA_CP_ASYNC;
  static_assert(BM == BN && kThreads == BR * (BM / QE) && kThreads == (BM / 4) * (BN / 4), "tile config");

  __shared__ __align__(16) float As[2][BR][BM + kPad];  // g[r][o]
  __shared__ __align__(16) float Bs[2][BR][BN + kPad];  // X[r][k]
  __shared__ int2 Ks[BN];

  const int tid = threadIdx.x;
  const int k0 = blockIdx.x * BN;
  const int s = blockIdx.z;
  const int rs0 = s * rps;
  const int rs1 = (long long)rs0 + rps < g.R ? rs0 + rps : g.R;
  const int nT = rs1 > rs0 ? (rs1 - rs0 + BR - 1) / BR : 0;
  const int nOt = (g.Og + BM - 1) / BM;
  if (tid < BN) Ks[tid] = ktab[k0 + tid];
  __syncthreads();

  const int l_r = tid % BR, l_q = (tid / BR) * QE;  // loader: row l_r, columns l_q .. l_q + 7
  const int tx = tid % (BN / 4), ty = tid / (BN / 4);

  for (long long yz_ = blockIdx.y; yz_ < g.G * nOt; yz_ += gridDim.y) {
    const int yz = static_cast<int>(yz_);  // 64-bit loop counter: no overflow near 2^31
    const int gi = yz / nOt, o0 = (yz - gi * nOt) * BM;
    const T* xg = x + (long long)gi * g.Cg * g.xsC;
    float wr[4][4], acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int o = o0 + ty * 4 + i, k = k0 + tx * 4 + j;
        wr[i][j] = (o < g.Og && k < g.K) ? to_f(w[(long long)(gi * g.Og + o) * g.K + k]) : 0.f;
        acc[i][j] = 0.f;
      }
    float breg[QE];

    auto load = [&](int t, int buf) {
      const int r = rs0 + t * BR + l_r;
      const bool rok = r < rs1;
      int iy0 = kFar, ix0 = kFar;
      long long base = 0;
      if (rok) {
        const RowPos p = decode_row(g, r);
        iy0 = p.oy * g.sh - g.ph;
        ix0 = p.ox * g.sw - g.pw;
        base = p.n * g.xsN + iy0 * g.xsH + ix0 * g.xsW;
      }
      const float* ga = gt + (long long)(gi * g.Og + o0 + l_q) * g.R + r;
#pragma unroll
      for (int q = 0; q < QE; q++) {
        const bool ok = rok && o0 + l_q + q < g.Og;
        cp_async_f32(&As[buf][l_r][l_q + q], ok ? ga + (long long)q * g.R : gt, ok);
      }
#pragma unroll
      for (int q = 0; q < QE; q++) {
        const int2 e = Ks[l_q + q];
        const bool ok = k0 + l_q + q < g.K && (unsigned)(iy0 + tab_dy(e)) < (unsigned)g.H &&
                        (unsigned)(ix0 + tab_dx(e)) < (unsigned)g.W;
        const T* src = ok ? xg + (base + e.x) : xg;
        if constexpr (kAsync) {
          cp_async_f32(&Bs[buf][l_r][l_q + q], reinterpret_cast<const float*>(src), ok);
        } else {
          breg[q] = ok ? to_f(*src) : 0.f;
        }
      }
    };
    auto store_b = [&](int buf) {
      if constexpr (!kAsync) {
#pragma unroll
        for (int q = 0; q < QE; q++) Bs[buf][l_r][l_q + q] = breg[q];
      }
    };
    auto compute = [&](int buf) {
#pragma unroll 8
      for (int rr = 0; rr < BR; rr++) {
        const float4 a4 = *reinterpret_cast<const float4*>(&As[buf][rr][ty * 4]);
        const float4 b4 = *reinterpret_cast<const float4*>(&Bs[buf][rr][tx * 4]);
        const float a[4] = {a4.x, a4.y, a4.z, a4.w};
        const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
          for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], sign_cmp(b[j], wr[i][j]), acc[i][j]);
      }
    };

    if (nT > 0) {
      load(0, 0);
      cp_async_commit();
      store_b(0);
    }
    for (int t = 0; t < nT; t++) {
      const int buf = t & 1;
      if (t + 1 < nT) load(t + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      compute(buf);
      if (t + 1 < nT) store_b(buf ^ 1);
      __syncthreads();
    }

    float* pg = part + ((long long)s * g.O + gi * g.Og) * g.K;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int o = o0 + ty * 4 + i, k = k0 + tx * 4 + j;
        if (o < g.Og && k < g.K) pg[(long long)o * g.K + k] = acc[i][j];
      }
  }
}

// dw[i] = sum_s part[s][i], s in order.
template <typename T>
__global__ void adder_gw_reduce(const float* __restrict__ part, int S, long long n, T* __restrict__ dw) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < S; s++) v += part[s * n + i];
    dw[i] = from_f<T>(v);
  }
}

// Split-K of the tiled forward and grad input: out[row, col] = sgn * sum_s part[s][row, col],
// s in order from 0 (deterministic).  part: S slices of nrows x ncols floats, rows fastest
// if rfast (the layout the output's strides favour), else columns.  Rows are output rows r
// (forward, POS = false: decode_row, sgn = -1) or input positions p (grad input, POS =
// true: decode_pos, sgn = +1); column col is at col * os.c.
template <typename T, bool POS>
__global__ void adder_split_reduce(const DevGeom g, const float* __restrict__ part, int S, int nrows, int ncols,
                                   int rfast, float sgn, T* __restrict__ out, const Strides4 os) {
  const long long n = (long long)nrows * ncols;
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
    long long r, c;
    if (rfast) {
      c = e / nrows;
      r = e - c * nrows;
    } else {
      r = e / ncols;
      c = e - r * ncols;
    }
    float sum = 0.f;
    for (int z = 0; z < S; z++) sum += part[z * n + e];
    const RowPos q = POS ? decode_pos(g, (int)r) : decode_row(g, (int)r);
    out[q.n * os.n + q.oy * os.h + q.ox * os.w + c * os.c] = from_f<T>(sgn * sum);
  }
}

// One block per weight element (o, k): the threads stride over the rows, then a
// fixed-order tree reduction.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    adder_gw_direct(const DevGeom g, const float* __restrict__ gt, const T* __restrict__ x,
                    const T* __restrict__ w, T* __restrict__ dw) {
  __shared__ float red[kThreads];
  const int tid = threadIdx.x;
  const int total = g.O * g.K;
  for (long long idx_ = blockIdx.x; idx_ < total; idx_ += gridDim.x) {
    const int idx = static_cast<int>(idx_);  // 64-bit loop counter: no overflow near 2^31
    const int o = idx / g.K, k = idx - o * g.K;
    const int gi = o / g.Og;
    const int cl = k / g.khw, tap = k - cl * g.khw;
    const int i = tap / g.kw, j = tap - i * g.kw;
    const int dy = i * g.dh - g.ph, dxo = j * g.dw - g.pw;
    const float wv = to_f(w[idx]);
    const T* xc = x + (long long)(gi * g.Cg + cl) * g.xsC;
    const float* go = gt + (long long)o * g.R;
    float acc = 0.f;
    for (int r = tid; r < g.R; r += kThreads) {
      const RowPos p = decode_row(g, r);
      const int iy = p.oy * g.sh + dy, ix = p.ox * g.sw + dxo;
      const bool ok = (unsigned)iy < (unsigned)g.H && (unsigned)ix < (unsigned)g.W;
      const float xv = ok ? to_f(xc[p.n * g.xsN + iy * g.xsH + ix * g.xsW]) : 0.f;
      acc = fmaf(go[r], sign_cmp(xv, wv), acc);
    }
    red[tid] = acc;
    __syncthreads();
#pragma unroll
    for (int h = kThreads / 2; h > 0; h >>= 1) {
      if (tid < h) red[tid] += red[tid + h];
      __syncthreads();
    }
    if (tid == 0) dw[idx] = from_f<T>(red[0]);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------

constexpr int64_t kI32 = 2147483647;
constexpr unsigned kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }
unsigned grid_cap(int64_t v, int64_t cap) { return (unsigned)(v < 1 ? 1 : (v > cap ? cap : v)); }

// a * b <= lim for non-negative a, b, without overflow
bool mul_le(int64_t a, int64_t b, int64_t lim) { return a == 0 || b <= lim / a; }

int num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();  // clear; fall back to an H100-like count
    return 132;
  }
  return n;
}

// Elementwise work: enough blocks for the device, grid-stride beyond.
unsigned ew_blocks(int64_t n) { return grid_cap(ceil_div(n, kThreads), 4096); }

template <typename F>
cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::Float32: return f(float());
    case DType::Float16: return f(__half());
    case DType::BFloat16: return f(__nv_bfloat16());
    default: return cudaErrorInvalidValue;  // float64 adder kernels do not exist on the GPU
  }
}

// The batch-small linear case runs transposed: Y^T = adder(W, X) (|a - b| is
// symmetric), so the many output features fill the rows of the tile.
bool swap_linear(const ConvGeom& g) {
  return g.G == 1 && g.H == 1 && g.W == 1 && g.kh == 1 && g.kw == 1 && g.ph == 0 && g.pw == 0 && g.N > 0 &&
         g.N <= 32 && g.O >= 4 * g.N && g.N * g.K <= kI32;
}
ConvGeom swapped(const ConvGeom& g, int64_t* xs_w) {
  // rows: the O weight rows (contiguous, row stride K); columns: the N rows of x
  ConvGeom s = g;
  s.N = g.O; s.C = g.K; s.Cg = g.K; s.K = g.K;
  s.xsN = g.K; s.xsC = 1; s.xsH = 0; s.xsW = 0;
  s.O = g.N; s.Og = g.N;
  xs_w[0] = g.xsN;  // the "weight" of the swapped problem is x
  xs_w[1] = g.xsC;
  return s;
}

// fit (Tuning::fit_tiles): the tile that leaves the fewest idle columns per shared-memory
// read (a 32-wide tile reads 3 float4 per 32 products, the 128-wide one 4 per 64), for the
// float32-accumulating forward; the fp16x2 forward keeps the first rule.
enum class FwdKernel { Direct, Wide, Narrow, Narrow16 };
FwdKernel fwd_kernel(const ConvGeom& g, Algo algo, bool fit) {
  if (algo == Algo::Direct || (algo == Algo::Auto && g.Og <= kDirectOg)) {
    if (g.Og <= kDirectOg) return FwdKernel::Direct;
  }
  if (fit && algo != Algo::Fp16x2) {
    return g.Og <= 16 ? FwdKernel::Narrow16 : g.Og <= 64 ? FwdKernel::Narrow : FwdKernel::Wide;
  }
  return g.Og > 32 ? FwdKernel::Wide : FwdKernel::Narrow;
}

bool channels_last_order(const ConvGeom& g) { return g.xsC == 1 && g.C > 1; }

// The grid of a tiled forward: row tiles along x, (group, output-channel tile) pairs along
// y, reduction splits along z.
template <class Cfg>
dim3 tiled_grid(const DevGeom& g, int splits = 1) {
  return dim3(grid_cap(ceil_div(g.R, Cfg::BM), kI32), grid_cap((int64_t)g.G * ceil_div(g.Og, Cfg::BN), kMaxGridY),
              (unsigned)splits);
}

// Reduction splits (split-K) of the tiled forward and grad input.  A block sums its tile
// over all stages (BK-column steps of the reduction); when there are fewer tiles than
// `resident` blocks per SM times the SMs, the SMs left idle cost the most: the ResNet-20
// layers of 64 channels on 8x8 (8192 rows) are 64 forward tiles, the ResNet-50 stage-3
// layer (6272 rows, 256 channels) 98, on an H100's 132 SMs.  Then S blocks share each
// tile, block z summing stages [z tps, (z + 1) tps) into float32 partial sums that
// adder_split_reduce adds in split order: deterministic, but rounded differently from
// one block summing all stages (within float32 accumulation error).
// split_k (Tuning::split_k): < 0 this rule; 0 or 1 no split; N > 1 at most N.
struct KSplit {
  int S, tps;  // splits, stages per split
};
constexpr int kMinSplitStages = 8;  // the rule keeps >= 8 stages (64 reduction columns) per split
constexpr int kMaxAutoSplits = 16;
KSplit k_split(int64_t tiles, int64_t stages, int64_t out_elems, int resident, int split_k) {
  int64_t S = 1;
  if (split_k > 1) {
    S = split_k;
  } else if (split_k < 0) {
    const int64_t target = (int64_t)resident * num_sms();
    // Only when at least half the slots would be idle: with more tiles the splits spill
    // into a second wave (H100, 2026-11-23: 256 forward tiles of 512x16 for 264 slots ran
    // 0.132 ms split in 2, 0.097 ms unsplit; 64 and 98 tiles split 5 and 3 ways gained
    // 1.1-1.4x in the forward, the 64-channel grad input split 3 ways 1.14x)
    if (tiles > 0 && 2 * tiles <= target) {
      S = ceil_div(target, tiles);
      S = S > stages / kMinSplitStages ? stages / kMinSplitStages : S;
      S = S > kMaxAutoSplits ? kMaxAutoSplits : S;
    }
  }
  S = S > stages ? stages : S;
  const int64_t cap = ((int64_t)1 << 26) / (out_elems > 0 ? out_elems : 1);  // partial sums <= 256 MB
  S = S > cap ? cap : S;
  S = S > 65535 ? 65535 : S;  // grid z
  if (S <= 1) return KSplit{1, (int)stages};
  const int64_t tps = ceil_div(stages, S);
  return KSplit{(int)ceil_div(stages, tps), (int)tps};
}

// The split of the float32-accumulating tiled forward (none for the direct and fp16x2
// kernels: fp16x2's chunked sums are defined over the whole reduction in order).
KSplit fwd_split(const ConvGeom& g, Algo algo, const Tuning& tune) {
  const int64_t stages = ceil_div(g.K, kBK), R = g.N * g.Ho * g.Wo;
  const FwdKernel fk = fwd_kernel(g, algo, tune.fit_tiles);
  if (algo == Algo::Fp16x2 || fk == FwdKernel::Direct || R == 0 || g.Og == 0) return KSplit{1, (int)stages};
  const int bm = fk == FwdKernel::Wide ? FwdWide::BM : fk == FwdKernel::Narrow ? FwdNarrow::BM : FwdNarrow16::BM;
  const int bn = fk == FwdKernel::Wide ? FwdWide::BN : fk == FwdKernel::Narrow ? FwdNarrow::BN : FwdNarrow16::BN;
  const int64_t tiles = ceil_div(R, bm) * g.G * ceil_div(g.Og, bn);
  return k_split(tiles, stages, R * g.O, 2, tune.split_k);  // 2: __launch_bounds__(kThreads, 2)
}

// The tiled forward instantiation for channels-last x (cl) and reduction splits (split).
template <typename T, class Cfg>
auto fwd_tiled_kernel(bool cl, bool split) {
  return cl ? (split ? adder_fwd_tiled<T, true, Cfg, true> : adder_fwd_tiled<T, true, Cfg, false>)
            : (split ? adder_fwd_tiled<T, false, Cfg, true> : adder_fwd_tiled<T, false, Cfg, false>);
}

size_t fwd_workspace_plain(const ConvGeom& g, const KSplit& sp) {
  const int64_t nk = ceil_div(g.K, kKtabAlign) * kKtabAlign;
  const size_t part = sp.S > 1 ? align_up((size_t)sp.S * (size_t)(g.N * g.Ho * g.Wo * g.O) * sizeof(float)) : 0;
  return align_up((size_t)nk * sizeof(int2)) + align_up((size_t)(g.G * g.K * g.Og) * sizeof(float)) + part;
}

cudaError_t fwd_plain(const ConvGeom& cg, DType dt, const void* x, const void* w, int64_t wsO, int64_t wsK, void* y,
                      const int64_t* ys, void* ws, size_t ws_bytes, Algo algo, const Tuning& tune,
                      cudaStream_t stream) {
  if (cg.N * cg.Ho * cg.Wo == 0 || cg.Og == 0 || cg.G == 0) return cudaSuccess;
  if (cg.K <= 0) return cudaErrorInvalidValue;
  const KSplit sp = fwd_split(cg, algo, tune);
  if (ws_bytes < fwd_workspace_plain(cg, sp) || ws == nullptr) return cudaErrorInvalidValue;
  if (algo == Algo::Fp16x2 && dt != DType::Float16) return cudaErrorInvalidValue;
  const DevGeom g = make_dev_geom(cg);
  const bool cl = channels_last_order(cg);
  const int nk = (int)(ceil_div(cg.K, kKtabAlign) * kKtabAlign);
  int2* ktab = static_cast<int2*>(ws);
  float* wt = reinterpret_cast<float*>(static_cast<char*>(ws) + align_up((size_t)nk * sizeof(int2)));
  float* part = sp.S > 1 ? reinterpret_cast<float*>(reinterpret_cast<char*>(wt) +
                                                    align_up((size_t)(cg.G * cg.K * cg.Og) * sizeof(float)))
                         : nullptr;
  const Strides4 st = make_strides(ys);
  // partial sums laid out like y: rows fastest unless y's channel stride is 1
  const bool rfast = st.c != 1;
  const long long prs = rfast ? 1 : cg.O, pcs = rfast ? g.R : 1;
  {
    auto kern = adder_prep_ktab;
    SA_LAUNCH(kern, dim3(ew_blocks(nk)), dim3(kThreads), stream, g, ktab, nk, cl ? 1 : 0);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const FwdKernel fk = fwd_kernel(cg, algo, tune.fit_tiles);
  if (algo == Algo::Fp16x2) {  // every shape (no direct kernel); float16 weights in the float workspace
    const __half* xp = static_cast<const __half*>(x);
    __half* yp = static_cast<__half*>(y);
    __half* wh = reinterpret_cast<__half*>(wt);
    {
      auto kern = adder_prep_wt<__half, __half>;
      SA_LAUNCH(kern, dim3(ew_blocks(cg.G * cg.K * cg.Og)), dim3(kThreads), stream, g, static_cast<const __half*>(w),
                (long long)wsO, (long long)wsK, cl ? 1 : 0, wh);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (fk == FwdKernel::Wide) {
      auto kern = cl ? adder_fwd_h2<true, FwdWide> : adder_fwd_h2<false, FwdWide>;
      SA_LAUNCH(kern, tiled_grid<FwdWide>(g), dim3(kThreads), stream, g, xp, (const int2*)ktab, (const __half*)wh, yp,
                st);
    } else {
      auto kern = cl ? adder_fwd_h2<true, FwdNarrow> : adder_fwd_h2<false, FwdNarrow>;
      SA_LAUNCH(kern, tiled_grid<FwdNarrow>(g), dim3(kThreads), stream, g, xp, (const int2*)ktab, (const __half*)wh, yp,
                st);
    }
    return cudaGetLastError();
  }
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    {
      auto kern = adder_prep_wt<T>;
      SA_LAUNCH(kern, dim3(ew_blocks(cg.G * cg.K * cg.Og)), dim3(kThreads), stream, g, static_cast<const T*>(w),
                (long long)wsO, (long long)wsK, cl ? 1 : 0, wt);
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (fk == FwdKernel::Direct) {
      auto kern = adder_fwd_direct<T>;
      const dim3 grid(grid_cap(ceil_div(g.R, kThreads), kI32), grid_cap(g.G, kMaxGridY));
      SA_LAUNCH(kern, grid, dim3(kThreads), stream, g, xp, (const int2*)ktab, (const float*)wt, yp, st);
    } else if (fk == FwdKernel::Wide) {
      auto kern = fwd_tiled_kernel<T, FwdWide>(cl, part != nullptr);
      SA_LAUNCH(kern, tiled_grid<FwdWide>(g, sp.S), dim3(kThreads), stream, g, xp, (const int2*)ktab,
                (const float*)wt, yp, st, part, sp.tps, prs, pcs);
    } else if (fk == FwdKernel::Narrow) {
      auto kern = fwd_tiled_kernel<T, FwdNarrow>(cl, part != nullptr);
      SA_LAUNCH(kern, tiled_grid<FwdNarrow>(g, sp.S), dim3(kThreads), stream, g, xp, (const int2*)ktab,
                (const float*)wt, yp, st, part, sp.tps, prs, pcs);
    } else {
      auto kern = fwd_tiled_kernel<T, FwdNarrow16>(cl, part != nullptr);
      SA_LAUNCH(kern, tiled_grid<FwdNarrow16>(g, sp.S), dim3(kThreads), stream, g, xp, (const int2*)ktab,
                (const float*)wt, yp, st, part, sp.tps, prs, pcs);
    }
    e = cudaGetLastError();
    if (e != cudaSuccess || part == nullptr) return e;
    {
      auto kern = adder_split_reduce<T, false>;
      SA_LAUNCH(kern, dim3(ew_blocks((int64_t)g.R * cg.O)), dim3(kThreads), stream, g, (const float*)part, sp.S, g.R,
                (int)cg.O, rfast ? 1 : 0, -1.f, yp, st);
    }
    return cudaGetLastError();
  });
}

enum class GinKernel { Direct, Wide, Narrow };
GinKernel gin_kernel(const ConvGeom& g, Algo algo) {
  if (algo == Algo::Direct || (algo == Algo::Auto && (g.Cg < 16 || g.Og < 4))) return GinKernel::Direct;
  return g.Cg > 32 ? GinKernel::Wide : GinKernel::Narrow;
}

// The split of the tiled grad input (KSplit): stages are (tap, chunk of 8 output channels).
KSplit gin_split(const ConvGeom& g, Algo algo, const Tuning& tune) {
  const int64_t stages = g.kh * g.kw * ceil_div(g.Og, kBK), P = g.N * g.H * g.W;
  const GinKernel gk = gin_kernel(g, algo);
  if (gk == GinKernel::Direct || P == 0 || stages == 0) return KSplit{1, (int)stages};
  const int bm = gk == GinKernel::Wide ? GinWide::BM : GinNarrow::BM;
  const int bn = gk == GinKernel::Wide ? GinWide::BN : GinNarrow::BN;
  const int64_t tiles = ceil_div(P, bm) * g.G * ceil_div(g.Cg, bn);
  return k_split(tiles, stages, P * g.C, 1, tune.split_k);  // 1: __launch_bounds__(kThreads, 1), 152-192 registers
}

enum class GwKernel { Direct, Tiled };
GwKernel gw_kernel(const ConvGeom& g, Algo algo) {
  if (algo == Algo::Direct || (algo == Algo::Auto && (g.Og < 16 || g.K < 16))) return GwKernel::Direct;
  return GwKernel::Tiled;
}

// Row splits of the tiled weight gradient: about 4 blocks per SM, >= 256 rows per split,
// partial buffer <= 512 MB.
struct GwSplit {
  int S, rps;
};
GwSplit gw_split(const ConvGeom& g) {
  const int64_t R = g.N * g.Ho * g.Wo;
  const int64_t tiles = ceil_div(g.K, kGwBN) * g.G * ceil_div(g.Og, kGwBM);
  int64_t S = ceil_div(4 * (int64_t)num_sms(), tiles);
  S = S > ceil_div(R, 256) ? ceil_div(R, 256) : S;
  const int64_t cap = ((int64_t)1 << 27) / (g.O * g.K > 0 ? g.O * g.K : 1);
  S = S > cap ? cap : S;
  S = S > 65535 ? 65535 : S;
  S = S < 1 ? 1 : S;
  const int64_t rps = ceil_div(ceil_div(R, S), kGwBR) * kGwBR;
  S = ceil_div(R, rps);
  return GwSplit{(int)(S < 1 ? 1 : S), (int)rps};
}

}  // namespace

// ---------------------------------------------------------------------------------
// public launchers
// ---------------------------------------------------------------------------------

const char* adder_check_sizes(const ConvGeom& g) {
  const int64_t lim = kI32;
  if (g.N < 0 || g.C < 0 || g.H < 0 || g.W < 0 || g.O < 0 || g.kh < 1 || g.kw < 1 || g.G < 1 || g.Ho < 1 ||
      g.Wo < 1 || g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1 || g.ph < 0 || g.pw < 0 || g.xsN < 0 || g.xsC < 0 ||
      g.xsH < 0 || g.xsW < 0)
    return "invalid geometry (negative size, stride or padding)";
  if (g.N > lim || g.C > lim || g.O > lim) return "a dimension of x or weight is 2^31 or more";
  if (g.H + 2 * g.ph >= (int64_t(1) << 29) || g.W + 2 * g.pw >= (int64_t(1) << 29))
    return "the padded input height or width is 2^29 or more";
  if (g.kh > lim || g.kw > lim || g.sh > lim || g.sw > lim || g.dh > lim || g.dw > lim)
    return "kernel size, stride or dilation is 2^31 or more";
  if (g.dh * (g.kh - 1) >= (1 << 15) || g.dw * (g.kw - 1) >= (1 << 15))
    return "the dilated kernel extent dilation*(kernel_size-1) is 2^15 or more";
  // rows and positions keep 1024 of headroom: tile indices run up to one tile past the end
  if (!mul_le(g.N, g.Ho * g.Wo, lim - 1024)) return "the number of output positions N*Ho*Wo is 2^31 - 1024 or more";
  if (!mul_le(g.N, g.H * g.W, lim - 1024)) return "the number of input positions N*H*W is 2^31 - 1024 or more";
  if (!mul_le(g.Cg, g.kh * g.kw, lim)) return "the reduction length C/groups*kh*kw is 2^31 or more";
  if (!mul_le(g.O, g.Cg * g.kh * g.kw, lim)) return "the weight has 2^31 elements or more";
  // one image of x: every in-image offset is a 32-bit int (an empty x reads nothing)
  if (g.C > 0 && g.H > 0 && g.W > 0) {
    const char* span_msg = "one image of x spans 2^31 elements or more (its C, H, W strides)";
    if (g.C > 1 && g.xsC > lim / (g.C - 1)) return span_msg;
    if (g.H > 1 && g.xsH > lim / (g.H - 1)) return span_msg;
    if (g.W > 1 && g.xsW > lim / (g.W - 1)) return span_msg;
    const int64_t span = (g.C - 1) * g.xsC + (g.H - 1) * g.xsH + (g.W - 1) * g.xsW;
    if (span > lim) return span_msg;
  }
  return nullptr;
}

size_t adder_forward_workspace(const ConvGeom& g, Algo algo, const Tuning& tune) {
  if (swap_linear(g)) {
    int64_t xs_w[2];
    const ConvGeom s = swapped(g, xs_w);
    return fwd_workspace_plain(s, fwd_split(s, algo, tune));
  }
  return fwd_workspace_plain(g, fwd_split(g, algo, tune));
}

cudaError_t adder_forward(const ConvGeom& g, DType dt, const void* x, const void* w, void* y, const int64_t* ys,
                          void* workspace, size_t workspace_bytes, Algo algo, const Tuning& tune, cudaStream_t stream) {
  if (adder_check_sizes(g) != nullptr) return cudaErrorInvalidValue;
  if (swap_linear(g)) {
    int64_t xs_w[2];
    const ConvGeom s = swapped(g, xs_w);
    const int64_t ys2[4] = {ys[1], ys[0], 0, 0};
    return fwd_plain(s, dt, w, x, xs_w[0], xs_w[1], y, ys2, workspace, workspace_bytes, algo, tune, stream);
  }
  return fwd_plain(g, dt, x, w, g.K, 1, y, ys, workspace, workspace_bytes, algo, tune, stream);
}

size_t adder_grad_input_workspace(const ConvGeom& g, Algo algo, const Tuning& tune) {
  const KSplit sp = gin_split(g, algo, tune);
  const size_t part = sp.S > 1 ? align_up((size_t)sp.S * (size_t)(g.N * g.H * g.W * g.C) * sizeof(float)) : 0;
  return align_up((size_t)(g.O * g.K) * sizeof(float)) + align_up(sizeof(int)) + part;
}

cudaError_t adder_grad_input(const ConvGeom& cg, DType dt, bool exact, const float* gt, const void* x, const void* w,
                             void* dx, const int64_t* dxs, void* workspace, size_t workspace_bytes, Algo algo,
                             const Tuning& tune, cudaStream_t stream) {
  if (adder_check_sizes(cg) != nullptr) return cudaErrorInvalidValue;
  if (cg.N * cg.H * cg.W == 0 || cg.C == 0) return cudaSuccess;
  if (cg.N * cg.Ho * cg.Wo == 0 || cg.Og == 0) return cudaErrorInvalidValue;  // caller returns zeros
  if (workspace == nullptr || workspace_bytes < adder_grad_input_workspace(cg, algo, tune))
    return cudaErrorInvalidValue;
  const DevGeom g = make_dev_geom(cg);
  float* wt2 = static_cast<float*>(workspace);
  int* wbad = reinterpret_cast<int*>(static_cast<char*>(workspace) + align_up((size_t)(cg.O * cg.K) * sizeof(float)));
  const KSplit sp = gin_split(cg, algo, tune);
  float* part = sp.S > 1 ? reinterpret_cast<float*>(reinterpret_cast<char*>(wbad) + align_up(sizeof(int))) : nullptr;
  const Strides4 st = make_strides(dxs);
  const bool rfast = st.c != 1;  // partial sums laid out like dx
  const long long prs = rfast ? 1 : cg.C, pcs = rfast ? g.P : 1;
  const GinKernel gk = gin_kernel(cg, algo);
  cudaError_t err = cudaMemsetAsync(wbad, 0, sizeof(int), stream);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* dxp = static_cast<T*>(dx);
    {
      auto kern = adder_prep_wt2<T>;
      SA_LAUNCH(kern, dim3(ew_blocks(cg.O * cg.K)), dim3(kThreads), stream, g, static_cast<const T*>(w), wt2, wbad);
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (gk == GinKernel::Direct) {
      auto kern = exact ? adder_gin_direct<T, true> : adder_gin_direct<T, false>;
      const dim3 grid(grid_cap(ceil_div(g.P, kThreads), kI32), grid_cap(g.C, kMaxGridY));
      SA_LAUNCH(kern, grid, dim3(kThreads), stream, g, gt, xp, (const float*)wt2, dxp, st);
    } else if (gk == GinKernel::Wide) {
      auto kern = exact ? adder_gin_tiled<T, true, GinWide>
                        : (tune.sat_gin ? adder_gin_tiled<T, false, GinWide, true>
                                        : adder_gin_tiled<T, false, GinWide>);
      const dim3 grid(grid_cap(ceil_div(g.P, GinWide::BM), kI32),
                      grid_cap((int64_t)g.G * ceil_div(g.Cg, GinWide::BN), kMaxGridY), (unsigned)sp.S);
      SA_LAUNCH(kern, grid, dim3(kThreads), stream, g, gt, xp, (const float*)wt2, (const int*)wbad, dxp, st, part,
                sp.tps, prs, pcs);
    } else {
      auto kern = exact ? adder_gin_tiled<T, true, GinNarrow>
                        : (tune.sat_gin ? adder_gin_tiled<T, false, GinNarrow, true>
                                        : adder_gin_tiled<T, false, GinNarrow>);
      const dim3 grid(grid_cap(ceil_div(g.P, GinNarrow::BM), kI32),
                      grid_cap((int64_t)g.G * ceil_div(g.Cg, GinNarrow::BN), kMaxGridY), (unsigned)sp.S);
      SA_LAUNCH(kern, grid, dim3(kThreads), stream, g, gt, xp, (const float*)wt2, (const int*)wbad, dxp, st, part,
                sp.tps, prs, pcs);
    }
    e = cudaGetLastError();
    if (e != cudaSuccess || part == nullptr || gk == GinKernel::Direct) return e;
    {
      auto kern = adder_split_reduce<T, true>;
      SA_LAUNCH(kern, dim3(ew_blocks((int64_t)g.P * cg.C)), dim3(kThreads), stream, g, (const float*)part, sp.S, g.P,
                (int)cg.C, rfast ? 1 : 0, 1.f, dxp, st);
    }
    return cudaGetLastError();
  });
}

size_t adder_grad_weight_workspace(const ConvGeom& g, Algo algo) {
  if (gw_kernel(g, algo) == GwKernel::Direct || g.N * g.Ho * g.Wo == 0) return 0;
  const GwSplit sp = gw_split(g);
  const int64_t nk = ceil_div(g.K, kKtabAlign) * kKtabAlign;
  return align_up((size_t)nk * sizeof(int2)) + align_up((size_t)sp.S * (size_t)(g.O * g.K) * sizeof(float));
}

cudaError_t adder_grad_weight_exact(const ConvGeom& cg, DType dt, const float* gt, const void* x, const void* w,
                                    void* dw, void* workspace, size_t workspace_bytes, Algo algo,
                                    cudaStream_t stream) {
  if (adder_check_sizes(cg) != nullptr) return cudaErrorInvalidValue;
  if (cg.O * cg.K == 0) return cudaSuccess;
  if (cg.N * cg.Ho * cg.Wo == 0) return cudaErrorInvalidValue;  // caller returns zeros
  const DevGeom g = make_dev_geom(cg);
  const GwKernel gk = gw_kernel(cg, algo);
  if (gk == GwKernel::Direct) {
    return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
      using T = decltype(tag);
      auto kern = adder_gw_direct<T>;
      SA_LAUNCH(kern, dim3(grid_cap(cg.O * cg.K, kI32)), dim3(kThreads), stream, g, gt, static_cast<const T*>(x),
                static_cast<const T*>(w), static_cast<T*>(dw));
      return cudaGetLastError();
    });
  }
  if (workspace == nullptr || workspace_bytes < adder_grad_weight_workspace(cg, algo)) return cudaErrorInvalidValue;
  const GwSplit sp = gw_split(cg);
  const int nk = (int)(ceil_div(cg.K, kKtabAlign) * kKtabAlign);
  int2* ktab = static_cast<int2*>(workspace);
  float* part = reinterpret_cast<float*>(static_cast<char*>(workspace) + align_up((size_t)nk * sizeof(int2)));
  {
    auto kern = adder_prep_ktab;
    SA_LAUNCH(kern, dim3(ew_blocks(nk)), dim3(kThreads), stream, g, ktab, nk, 0);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    {
      auto kern = adder_gw_tiled<T>;
      const dim3 grid(grid_cap(ceil_div(g.K, kGwBN), kI32), grid_cap((int64_t)g.G * ceil_div(g.Og, kGwBM), kMaxGridY),
                      (unsigned)sp.S);
      SA_LAUNCH(kern, grid, dim3(kThreads), stream, g, gt, static_cast<const T*>(x), static_cast<const T*>(w),
                (const int2*)ktab, part, sp.rps);
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    {
      auto kern = adder_gw_reduce<T>;
      const long long n = (long long)cg.O * cg.K;
      SA_LAUNCH(kern, dim3(ew_blocks(n)), dim3(kThreads), stream, (const float*)part, sp.S, n, static_cast<T*>(dw));
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace shiftadd
