// CUDA kernel of the quantized adder, shiftadd::adder_linear_int8 (launcher declared in
// csrc/cuda/kernels.h; torch glue in csrc/cuda/adder_int8.cpp).  CUDA headers only.
//
//   y[n, o] = -sum_k |x[n, k] - w[o, k]|,  x (N, K), w (O, K) int8, y (N, O) int32, exact.
//
// Both operands are biased by 128 (byte ^ 0x80) into unsigned bytes, which keeps every
// difference; four bytes share one 32-bit word and __vsadu4(a, b) returns the sum of their
// four absolute differences, so one instruction does four adder-MACs.  A block computes a
// 64 x 64 tile of y (each of its 256 threads a 4 x 4 register tile), staging 32 bytes of K
// per row of x and w in shared memory at a time.  Bytes past K are 0x80 on both sides (a
// zero difference).  Rows are read as 32-bit words when the pointers and row strides
// allow it, else byte by byte.  Sums stay below 2^31 for K <= 2^31 / 255 (checked by the glue).

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"

#ifndef SA_LAUNCH
#define SA_LAUNCH(kern, grid, block, stream, ...) kern<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace shiftadd {
namespace cuda {
namespace {

constexpr int kTile = 64;            // rows of x and of w per block
constexpr int kWords = 8;            // 32-bit words of K staged per step (32 bytes)
constexpr int kThreads = 256;        // 16 x 16 threads, 4 x 4 outputs each
constexpr uint32_t kBias = 0x80808080u;

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint32_t sad4(uint32_t a, uint32_t b) { return __vsadu4(a, b); }
#else
__device__ __forceinline__ uint32_t sad4(uint32_t a, uint32_t b) {
  uint32_t s = 0;
  for (int i = 0; i < 32; i += 8) {
    const int d = static_cast<int>((a >> i) & 0xffu) - static_cast<int>((b >> i) & 0xffu);
    s += static_cast<uint32_t>(d < 0 ? -d : d);
  }
  return s;
}
#endif

// Word j (bytes 4j .. 4j+3 from k0) of row `row` of an int8 matrix, biased; 0x80 bytes past
// K or past the last row.  WORDS: rows are 4-byte aligned and K % 4 == 0.
template <bool WORDS>
__device__ __forceinline__ uint32_t load_word(const int8_t* __restrict__ m, int64_t stride, int64_t rows, int64_t K,
                                              int64_t row, int64_t k) {
  if (row >= rows) return kBias;
  const int8_t* p = m + row * stride;
  if (WORDS) {
    if (k < K) return *reinterpret_cast<const uint32_t*>(p + k) ^ kBias;
    return kBias;
  }
  uint32_t v = 0;
#pragma unroll
  for (int b = 0; b < 4; b++) {
    const uint32_t byte = (k + b < K) ? static_cast<uint32_t>(static_cast<uint8_t>(p[k + b])) : 0u;
    v |= byte << (8 * b);
  }
  return v ^ kBias;
}

template <bool WORDS>
__global__ void __launch_bounds__(kThreads)
    adder_int8_kernel(const int8_t* __restrict__ x, int64_t sxn, const int8_t* __restrict__ w, int64_t swo,
                      int32_t* __restrict__ y, int64_t N, int64_t O, int64_t K, int64_t o_tiles) {
  __shared__ uint32_t xs[kWords][kTile];
  __shared__ uint32_t ws[kWords][kTile];
  const int64_t tile = blockIdx.x;
  const int64_t n0 = (tile / o_tiles) * kTile, o0 = (tile % o_tiles) * kTile;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  uint32_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0u;

  for (int64_t k0 = 0; k0 < K; k0 += 4 * kWords) {
    // 64 rows x 8 words per operand = 512 words: 2 per thread and operand
#pragma unroll
    for (int e = 0; e < 2; e++) {
      const int idx = tid + e * kThreads;
      const int r = idx / kWords, c = idx % kWords;
      xs[c][r] = load_word<WORDS>(x, sxn, N, K, n0 + r, k0 + 4 * c);
      ws[c][r] = load_word<WORDS>(w, swo, O, K, o0 + r, k0 + 4 * c);
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kWords; c++) {
      uint32_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; i++) a[i] = xs[c][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; j++) b[j] = ws[c][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] += sad4(a[i], b[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int64_t n = n0 + ty * 4 + i;
    if (n >= N) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int64_t o = o0 + tx * 4 + j;
      if (o < O) y[n * O + o] = -static_cast<int32_t>(acc[i][j]);
    }
  }
}

}  // namespace

cudaError_t adder_linear_int8(const int8_t* x, int64_t sxn, const int8_t* w, int64_t swo, int32_t* y, int64_t N,
                              int64_t O, int64_t K, cudaStream_t stream) {
  if (N < 0 || O < 0 || K < 0 || K > 2147483647LL / 255) return cudaErrorInvalidValue;
  if (N == 0 || O == 0) return cudaSuccess;
  const int64_t n_tiles = (N + kTile - 1) / kTile, o_tiles = (O + kTile - 1) / kTile;
  if (n_tiles * o_tiles > 2147483647LL) return cudaErrorInvalidValue;
  const bool words = K % 4 == 0 && sxn % 4 == 0 && swo % 4 == 0 && (reinterpret_cast<uintptr_t>(x) & 3) == 0 &&
                     (reinterpret_cast<uintptr_t>(w) & 3) == 0;
  const dim3 grid(static_cast<unsigned>(n_tiles * o_tiles));
  if (words) {
    SA_LAUNCH(adder_int8_kernel<true>, grid, dim3(kThreads), stream, x, sxn, w, swo, y, N, O, K, o_tiles);
  } else {
    SA_LAUNCH(adder_int8_kernel<false>, grid, dim3(kThreads), stream, x, sxn, w, swo, y, N, O, K, o_tiles);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace shiftadd
