// Raw-pointer launchers of the shiftadd CUDA kernels (csrc/cuda/*_kernels.cu).
//
// Plain C++ types only: this header is included by the .cu files (which see no torch
// header) and by the torch glue (csrc/cuda/adder.cpp, shift.cpp).  Every launcher takes
// device pointers, sizes and strides in elements (int64), a dtype tag and a stream; it
// checks its configuration, enqueues its kernels on `stream` and returns the
// cudaError_t of the launch (cudaSuccess, or the first error).  Nothing is synchronised.
//
// Adder operators (AdderNet, Chen et al., CVPR 2020) as implicit GEMMs over rows r = (n, oy, ox) (R = N Ho Wo),
// output channels o inside a group (Og) and the reduction k = (c, i, j) inside a group
// (K = Cg kh kw); X is the implicit im2col of x, padded positions read as zeros of x:
//
//   forward          Y[r, o]  = -sum_k |X[r, k] - W[o, k]|
//   grad input       dX[r, k] =  sum_o g[r, o] f(W[o, k] - X[r, k]),  f = hardtanh | sign
//   grad weight      dW[o, k] =  sum_r g[r, o] sign(X[r, k] - W[o, k])     (exact mode)
//
// Accumulation is in float32 for every input dtype.  Index limits: see adder_check_sizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace shiftadd {
namespace cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// Kernel choice (tests force one; Auto picks by shape).  Fp16x2 (adder_forward only, float16
// only): the tiled forward in packed half2 arithmetic, float16 partial sums of 16 columns
// added to float32 (error about that of float16 sums of 16 terms, not of K), for every shape.
enum class Algo : int { Auto = 0, Tiled = 1, Direct = 2, Fp16x2 = 3 };

// Choices of the tiled forward and grad input kernels, tested and timed on an H100 on
// 2026-11-23 (benchmarks/RESULTS.md).  Fitted tiles and the saturate grad input are the
// defaults (classic / clamp give the earlier kernels).  Splits stay off by default: they
// made the few-tile layers' forward 1.1-1.4x faster, but their float32 partial sums (S
// times the output) broke the memory bound (extra memory <= inputs + outputs) on
// both layers they sped up.  The glue, csrc/cuda/adder.cpp, reads them from
// SHIFTADD_CUDA_SPLIT_K, SHIFTADD_CUDA_TILES and SHIFTADD_CUDA_GIN.  Results stay
// deterministic.
struct Tuning {
  // Reduction splits (split-K) when the output tiles alone leave SMs idle: < 0 by the rule
  // of k_split (adder_kernels.cu), 0 or 1 never, N > 1 at most N.  Not for the fp16x2
  // forward.  The float32 sums are rounded differently with a split.
  int split_k = 0;
  // Forward tile widths fitted to the output channels: 16 wide for Og <= 16, 32 wide for
  // Og <= 64, else 128 (without: 32 wide up to Og = 32, then 128).  Not for fp16x2.
  bool fit_tiles = true;
  // AdderNet-mode grad input in the saturate form (adder_gin_tiled SAT): one FADD.SAT and one
  // FFMA per term instead of four instructions; the rounding differs within float32 sums.
  bool sat_gin = true;
};

// The conv geometry, same fields and meaning as shiftadd::Geom in csrc/shiftadd.h (kept
// free of torch types).  A linear layer is H = W = kh = kw = 1, xsH = xsW = 0.
struct ConvGeom {
  int64_t N = 0, C = 0, H = 1, W = 1;          // input x (N, C, H, W)
  int64_t xsN = 0, xsC = 0, xsH = 0, xsW = 0;  // strides of x in elements (any layout)
  int64_t O = 0, kh = 1, kw = 1;               // weight (O, C/G, kh, kw), contiguous
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, G = 1;
  int64_t Ho = 1, Wo = 1;                      // output spatial size
  int64_t Cg = 0, Og = 0, K = 0;               // C/G, O/G, Cg kh kw
};

// nullptr when the kernels can run this geometry, else a static message naming the
// quantity that does not fit their 32-bit index arithmetic (rows N*Ho*Wo, input
// positions N*H*W, weight elements, the element span of one image of x, ...).  Offsets
// into x, y, dx and grad are 64-bit; only these counts must stay below 2^31.
const char* adder_check_sizes(const ConvGeom& g);

// ---------------------------------------------------------------------------------
// Adder forward.  x: dtype dt, strides g.xs*; w: contiguous (O, Cg, kh, kw), dtype dt;
// y: dtype dt, element strides ys = {n, o, oy, ox} (linear: {n, o, 0, 0}).  Requires
// g.K > 0 (the caller fills y with zeros when K == 0); nothing is launched when R or
// Og is 0.  Workspace: adder_forward_workspace(g, algo, tune) bytes of device memory,
// aligned to 256 bytes (a packed weight copy, the im2col column table, split partial sums).
size_t adder_forward_workspace(const ConvGeom& g, Algo algo, const Tuning& tune);
cudaError_t adder_forward(const ConvGeom& g, DType dt, const void* x, const void* w, void* y, const int64_t* ys,
                          void* workspace, size_t workspace_bytes, Algo algo, const Tuning& tune,
                          cudaStream_t stream);

// ---------------------------------------------------------------------------------
// Adder grad input (gather formulation, no atomics: each output element of dx is
// written exactly once, zero where no output position reads it).
// gt: grad_out as float32, contiguous (O, R) (row o = output channel, column r = n Ho Wo
// position); x, w as for the forward; dx: dtype dt, element strides dxs = {n, c, y, x}
// (linear: {n, c, 0, 0}).  exact: sign instead of hardtanh.  Requires R > 0 and
// Og > 0 (the caller returns zeros otherwise).
size_t adder_grad_input_workspace(const ConvGeom& g, Algo algo, const Tuning& tune);
cudaError_t adder_grad_input(const ConvGeom& g, DType dt, bool exact, const float* gt, const void* x, const void* w,
                             void* dx, const int64_t* dxs, void* workspace, size_t workspace_bytes, Algo algo,
                             const Tuning& tune, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// Adder grad weight, exact (sign) mode.  Deterministic: rows are split across blocks
// into float32 partial sums (workspace) that a second kernel adds in a fixed order.
// gt as for grad input; dw: dtype dt, contiguous (O, Cg, kh, kw), fully written.
// Requires R > 0 (the caller returns zeros otherwise).
size_t adder_grad_weight_workspace(const ConvGeom& g, Algo algo);
cudaError_t adder_grad_weight_exact(const ConvGeom& g, DType dt, const float* gt, const void* x, const void* w,
                                    void* dw, void* workspace, size_t workspace_bytes, Algo algo, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// Power-of-two quantizers (DeepShift, Elhoushi et al., 2021), elementwise over n contiguous elements, bit
// for bit what csrc/cpu/shift.cpp computes (all four dtypes, float64 included).
// noise: nullptr for deterministic rounding, else n uniform [0, 1) values of dtype dt.
// out: n values of dtype out_dt (any of the four; the exact result is converted once).
cudaError_t quantize_pot_q(DType dt, DType out_dt, const void* w, const void* noise, void* out, int64_t n,
                           int weight_bits, cudaStream_t stream);
cudaError_t quantize_pot_ps(DType dt, DType out_dt, const void* shift, const void* sign, const void* noise, void* out,
                            int64_t n, int weight_bits, cudaStream_t stream);
cudaError_t round_to_fixed(DType dt, const void* x, void* out, int64_t n, int int_bits, int frac_bits,
                           cudaStream_t stream);

// ---------------------------------------------------------------------------------
// Packed power-of-two linear (layout: shiftadd/packed.py; csrc/cuda/shift_packed_kernels.cu).
// codes (O, row_bytes) uint8, scales and zero_codes (O,) int32, all contiguous.
//
// packed_gemv: y[n, o] = sum_k x[n, k] w[o, k] (+ bias[o]) for 4-bit codes and small
// batches; x (N, K) with row stride sxn and unit column stride, y (N, O) with row stride
// syn, bias (O,) or nullptr, all of dtype dt (float32, float16 or bfloat16; float32
// accumulation).  Only where packed_gemv_supported says so (else cudaErrorInvalidValue).
constexpr int64_t kPackedGemvMaxBatch = 16;
bool packed_gemv_supported(int bits, int64_t N, int64_t O, int64_t K, const void* codes, int64_t row_bytes);
cudaError_t packed_gemv(DType dt, const void* x, int64_t sxn, const uint8_t* codes, int64_t row_bytes,
                        const int32_t* scales, const int32_t* zero_codes, const void* bias, void* y, int64_t syn,
                        int64_t N, int64_t O, int64_t K, cudaStream_t stream);
// packed_decode: the dense weight w (O, K), contiguous, of dtype dt (float32, float16 or
// bfloat16), exact powers of two (0 below the dtype's range, inf above); any code width.
cudaError_t packed_decode(DType dt, const uint8_t* codes, int64_t row_bytes, const int32_t* scales,
                          const int32_t* zero_codes, int bits, void* w, int64_t O, int64_t K, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// Quantized adder (csrc/cuda/adder_int8_kernels.cu): y[n, o] = -sum_k |x[n, k] - w[o, k]|,
// exactly, for x (N, K) and w (O, K) int8 with row strides sxn and swo (unit column
// stride) and y (N, O) int32, contiguous.  K <= 2^31 / 255 (the caller checks).
cudaError_t adder_linear_int8(const int8_t* x, int64_t sxn, const int8_t* w, int64_t swo, int32_t* y, int64_t N,
                              int64_t O, int64_t K, cudaStream_t stream);

}  // namespace cuda
}  // namespace shiftadd
