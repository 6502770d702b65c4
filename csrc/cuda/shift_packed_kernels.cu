// CUDA kernels of the packed power-of-two linear (shift_linear_packed; layout in
// shiftadd/packed.py, launchers declared in csrc/cuda/kernels.h, torch glue in
// csrc/cuda/shift_packed.cpp).  CUDA headers only.
//
// Weight (o, k) has a B-bit code c; w = 0 if c == zero_codes[o], else
// (-1)^(c >> (B-1)) * 2^(scales[o] - (c & (2^(B-1)-1))).
//
// packed_gemv (B = 4, K % 8 == 0, codes 4-byte aligned, N <= 16): y = x W^T + bias for a
// few rows of x.  Bandwidth-bound: the 4-bit codes are read once, as 4-byte words (8
// codes), coalesced across a warp.  A warp owns ROWS output channels; each lane handles 8
// consecutive k of a 256-k stretch per step.  A code becomes +-2^-m (the channel's
// exponent E is applied to the float32 sum at the end, in double, then rounded once)
// through a 16-entry float table per channel in shared memory (16 entries in 16 banks:
// no bank conflicts).  x rows are read as float through the read-only cache, NB rows per
// pass (the codes are re-read per pass of NB rows: N <= 4 reads them once).
//
// packed_decode (any B, any K): W (O, K) in float32 / float16 / bfloat16 with the channel
// exponent applied (exact powers of two; below a format's range 0, above it inf), for the
// decode + cuBLAS path of larger batches and of the shapes packed_gemv does not take.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"

namespace shiftadd {
namespace cuda {
namespace {

constexpr int kWarps = 8;   // warps per block
constexpr int kRows = 2;    // output channels per warp
constexpr int kMaxNB = 4;   // x rows per pass

__device__ __forceinline__ float load_f(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 2^e exactly in float (0 below the subnormal range, inf above)
__device__ __forceinline__ float pow2f(int e) {
  if (e > 127) return __int_as_float(0x7f800000);
  if (e >= -126) return __int_as_float((e + 127) << 23);
  if (e >= -149) return __int_as_float(1 << (e + 149));
  return 0.0f;
}

// 8 consecutive x values (x + k, k % 8 == 0, rows 16-byte aligned when the launcher says so)
template <typename T>
__device__ __forceinline__ void load8(const T* p, bool vec, float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    if (vec) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p));
      const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
      return;
    }
  } else {
    if (vec) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
      const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < 8; j++) v[j] = to_f(h[j]);  // from registers (not __ldg: u is local)
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < 8; j++) v[j] = load_f(p + j);
}

// y = x W^T (+ bias) for rows [n0, n0 + NB) of x, channels of this block.
template <typename T, int NB>
__global__ void __launch_bounds__(kWarps * 32)
    packed_gemv_kernel(const T* __restrict__ x, int64_t sxn, const uint8_t* __restrict__ codes, int64_t row_bytes,
                       const int32_t* __restrict__ scales, const int32_t* __restrict__ zc,
                       const T* __restrict__ bias, T* __restrict__ y, int64_t syn, int n0, int O, int K, bool xvec) {
  __shared__ float table[kWarps][kRows][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int o_base = (blockIdx.x * kWarps + warp) * kRows;
  // the channel tables: code c -> +-2^(E - (c & 7)) as float32 (0 below its range, inf
  // above, as packed_decode and the reference decode), 0 at the zero code
  if (lane < 16) {
#pragma unroll
    for (int r = 0; r < kRows; r++) {
      const int o = o_base + r;
      const int z = o < O ? __ldg(zc + o) : -1;
      int e = o < O ? __ldg(scales + o) : 0;
      e = e < -1000 ? -1000 : (e > 1000 ? 1000 : e);
      const float mag = pow2f(e - (lane & 7));
      table[warp][r][lane] = lane == z ? 0.0f : ((lane & 8) ? -mag : mag);
    }
  }
  __syncwarp();
  float acc[kRows][NB];
#pragma unroll
  for (int r = 0; r < kRows; r++)
#pragma unroll
    for (int b = 0; b < NB; b++) acc[r][b] = 0.0f;

  const uint32_t* crow[kRows];
#pragma unroll
  for (int r = 0; r < kRows; r++) {
    const int o = o_base + r < O ? o_base + r : O - 1;  // a duplicate channel, never stored
    crow[r] = reinterpret_cast<const uint32_t*>(codes + (int64_t)o * row_bytes);
  }
  const int words = K >> 3;
  for (int wi = lane; wi < words; wi += 32) {
    uint32_t cw[kRows];
#pragma unroll
    for (int r = 0; r < kRows; r++) cw[r] = __ldg(crow[r] + wi);
    float wv[kRows][8];
#pragma unroll
    for (int r = 0; r < kRows; r++)
#pragma unroll
      for (int j = 0; j < 8; j++) wv[r][j] = table[warp][r][(cw[r] >> (4 * j)) & 15];
#pragma unroll
    for (int b = 0; b < NB; b++) {
      float xv[8];
      load8(x + (int64_t)(n0 + b) * sxn + 8 * (int64_t)wi, xvec, xv);
#pragma unroll
      for (int r = 0; r < kRows; r++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[r][b] = fmaf(xv[j], wv[r][j], acc[r][b]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; r++)
#pragma unroll
    for (int b = 0; b < NB; b++)
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) acc[r][b] += __shfl_xor_sync(0xffffffffu, acc[r][b], s);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; r++) {
      const int o = o_base + r;
      if (o >= O) continue;
      const float bo = bias != nullptr ? load_f(bias + o) : 0.0f;
#pragma unroll
      for (int b = 0; b < NB; b++) store_f(y + (int64_t)(n0 + b) * syn + o, bias != nullptr ? acc[r][b] + bo : acc[r][b]);
    }
  }
}

template <typename T>
cudaError_t launch_gemv(const void* x, int64_t sxn, const uint8_t* codes, int64_t row_bytes, const int32_t* scales,
                        const int32_t* zc, const void* bias, void* y, int64_t syn, int64_t N, int64_t O, int64_t K,
                        cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  const bool xvec = (reinterpret_cast<uintptr_t>(x) & 15) == 0 && ((sxn * (int64_t)sizeof(T)) & 15) == 0;
  const int per_block = kWarps * kRows;
  const dim3 grid((unsigned)((O + per_block - 1) / per_block)), block(kWarps * 32);
  for (int64_t n0 = 0; n0 < N; n0 += kMaxNB) {
    const int nb = (int)(N - n0 < kMaxNB ? N - n0 : kMaxNB);
    auto kern = nb == 1 ? packed_gemv_kernel<T, 1>
                : nb == 2 ? packed_gemv_kernel<T, 2> : nb == 3 ? packed_gemv_kernel<T, 3> : packed_gemv_kernel<T, 4>;
    kern<<<grid, block, 0, stream>>>(xp, sxn, codes, row_bytes, scales, zc, bp, yp, syn, (int)n0, (int)O, (int)K,
                                     xvec);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
__global__ void __launch_bounds__(256)
    packed_decode_kernel(const uint8_t* __restrict__ codes, int64_t row_bytes, const int32_t* __restrict__ scales,
                         const int32_t* __restrict__ zc, int bits, T* __restrict__ w, int64_t O, int64_t K) {
  const int64_t total = O * K;
  const int half = 1 << (bits - 1);
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = i / K, k = i - o * K;
    const uint8_t* row = codes + o * row_bytes;
    int c;
    if (bits == 4) c = (row[k >> 1] >> ((k & 1) * 4)) & 15;
    else if (bits == 8) c = row[k];
    else c = (int)row[2 * k] | ((int)row[2 * k + 1] << 8);
    float v = 0.0f;
    if (c != __ldg(zc + o)) {
      // E - m stays far inside int range: |E| < 2^31 is clamped first
      int e = __ldg(scales + o);
      e = e < -1000 ? -1000 : (e > 1000 ? 1000 : e);
      v = pow2f(e - (c & (half - 1)));
      v = (c & half) ? -v : v;
    }
    store_f(w + i, v);
  }
}

}  // namespace

bool packed_gemv_supported(int bits, int64_t N, int64_t O, int64_t K, const void* codes, int64_t row_bytes) {
  return bits == 4 && N >= 1 && N <= kPackedGemvMaxBatch && K % 8 == 0 && K > 0 && K < (int64_t(1) << 31) &&
         O > 0 && O < (int64_t(1) << 31) - 64 && (reinterpret_cast<uintptr_t>(codes) & 3) == 0 && row_bytes % 4 == 0;
}

cudaError_t packed_gemv(DType dt, const void* x, int64_t sxn, const uint8_t* codes, int64_t row_bytes,
                        const int32_t* scales, const int32_t* zero_codes, const void* bias, void* y, int64_t syn,
                        int64_t N, int64_t O, int64_t K, cudaStream_t stream) {
  if (!packed_gemv_supported(4, N, O, K, codes, row_bytes)) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::Float32:
      return launch_gemv<float>(x, sxn, codes, row_bytes, scales, zero_codes, bias, y, syn, N, O, K, stream);
    case DType::Float16:
      return launch_gemv<__half>(x, sxn, codes, row_bytes, scales, zero_codes, bias, y, syn, N, O, K, stream);
    case DType::BFloat16:
      return launch_gemv<__nv_bfloat16>(x, sxn, codes, row_bytes, scales, zero_codes, bias, y, syn, N, O, K, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t packed_decode(DType dt, const uint8_t* codes, int64_t row_bytes, const int32_t* scales,
                          const int32_t* zero_codes, int bits, void* w, int64_t O, int64_t K, cudaStream_t stream) {
  if ((bits != 4 && bits != 8 && bits != 16) || O < 0 || K < 0) return cudaErrorInvalidValue;
  const int64_t total = O * K;
  if (total == 0) return cudaSuccess;
  int64_t blocks = (total + 255) / 256;
  blocks = blocks > 16384 ? 16384 : blocks;
  const dim3 grid((unsigned)blocks), block(256);
  switch (dt) {
    case DType::Float32:
      packed_decode_kernel<<<grid, block, 0, stream>>>(codes, row_bytes, scales, zero_codes, bits,
                                                       static_cast<float*>(w), O, K);
      break;
    case DType::Float16:
      packed_decode_kernel<<<grid, block, 0, stream>>>(codes, row_bytes, scales, zero_codes, bits,
                                                       static_cast<__half*>(w), O, K);
      break;
    case DType::BFloat16:
      packed_decode_kernel<<<grid, block, 0, stream>>>(codes, row_bytes, scales, zero_codes, bits,
                                                       static_cast<__nv_bfloat16*>(w), O, K);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace shiftadd
