// Pointwise (1x1) conv ops as GEMMs: params structs and launchers. No torch here (see
// pointwise_glue.cpp); included by pointwise_fwd.cu, pointwise_bwd.cu and the glue.
//
// Layouts. channels_last (NHWC): one GEMM over all pixels, Y[M = N*H*W, Cout] = X[M, Cin] * W^T.
// NCHW: one GEMM per image, Y[n][Cout, HW] = W[Cout, Cin] * X[n][Cin, HW] (images on grid z).
//
// Workspaces: the glue asks for the size (`*_workspace_bytes`, which depends only on the shapes,
// the dtype and the current device's SM count), allocates it on the device and passes it in.
// Every launcher returns the first CUDA error it meets (cudaSuccess when numel is 0).
#pragma once

#include <cstdint>

#include "cuda/launch.h"

namespace dwsep {
namespace cuda {

// Sizes shared by all pointwise ops: x is (N, Cin, H, W), z/y/grad_y are (N, Cout, H, W),
// weight is (Cout, Cin) contiguous; the activations are all dense in the layout `nhwc`, the one
// the kernels index them by (the glue passes nhwc = true for 1x1 images, whose two layouts are
// the same bytes, whatever format their tensors carry).
struct PwShape {
  int64_t N, Cin, Cout, HW;
  bool nhwc;
};

// y = act(conv1x1(x) * scale[co] + shift[co]).
struct PwFwdParams {
  const void* x;
  const void* w;
  const void* scale;  // acc dtype (fp32, or fp64 for fp64 tensors), Cout entries
  const void* shift;
  void* y;
  PwShape s;
  int act;          // 0 none, 1 relu, 2 relu6
  bool allow_tf32;  // fp32 only: TF32 tensor cores instead of the exact fp32 SIMT GEMM
};
cudaError_t pw_fwd(const PwFwdParams& p, DType dtype, cudaStream_t stream);

// z = conv1x1(x) in x's dtype; mean/var (acc dtype, Cout entries) = per-channel mean and biased
// variance of z over (N, H, W), taken from the fp32 (fp64) accumulators before rounding.
// Needs N*H*W > 0 (the glue fills mean = var = 0 otherwise).
struct PwFwdStatsParams {
  const void* x;
  const void* w;
  void* z;
  void* mean;
  void* var;
  PwShape s;
  bool allow_tf32;
  void* workspace;  // pw_fwd_stats_workspace_bytes() bytes
};
int64_t pw_fwd_stats_workspace_bytes(const PwFwdStatsParams& p, DType dtype);
cudaError_t pw_fwd_stats(const PwFwdStatsParams& p, DType dtype, cudaStream_t stream);

// sum_gz[c] = sum g_z, sum_gz_xhat[c] = sum g_z * (z - mean[c]) * invstd[c] over (N, H, W),
// g_z = grad_y * act'(z * scale[c] + shift[c]). Shape: z is (N, C, H, W) (C = Cout).
struct PwBwdReduceParams {
  const void* grad_y;
  const void* z;
  const void* scale;
  const void* shift;
  const void* mean;
  const void* invstd;
  void* sum_gz;
  void* sum_gz_xhat;
  int64_t N, C, HW;
  bool nhwc;
  int act;
  void* workspace;  // pw_bwd_reduce_workspace_bytes() bytes
};
int64_t pw_bwd_reduce_workspace_bytes(const PwBwdReduceParams& p, DType dtype);
cudaError_t pw_bwd_reduce(const PwBwdReduceParams& p, DType dtype, cudaStream_t stream);

// g_conv = k*g_z + b*z + c (per output channel), g_z = grad_y * act'(z*scale + shift);
// grad_x[n,ci,hw] = sum_co g_conv[n,co,hw] * W[co,ci]; grad_w[co,ci] = sum_(n,hw) g_conv * x.
// g_conv is formed by an elementwise kernel into `g_conv` (N*Cout*HW elements of x's dtype, in
// z's memory order) and then read by both GEMMs. grad_w is reduced from fixed split-K fp32 (fp64)
// partials in a fixed order, so it is bitwise reproducible.
struct PwBwdParams {
  const void* grad_y;
  const void* z;
  const void* x;
  const void* w;
  const void* scale;
  const void* shift;
  const void* k;
  const void* b;
  const void* c;
  void* grad_x;
  void* grad_w;
  PwShape s;
  int act;
  bool allow_tf32;
  void* g_conv;     // temporary, N*Cout*HW elements of x's dtype
  void* workspace;  // pw_bwd_workspace_bytes() bytes
};
int64_t pw_bwd_workspace_bytes(const PwBwdParams& p, DType dtype);
cudaError_t pw_bwd(const PwBwdParams& p, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Internal building block shared by pointwise_fwd.cu (which defines it) and pointwise_bwd.cu:
// a batched GEMM C[z][m][n] = sum_k A[m][k] * B[k][n] with a choice of epilogue.
//
// A element (m, k) of batch b lives at a + b*batch_a + (a_kmajor ? m*lda + k : k*lda + m);
// B element (k, n) of batch b lives at b + b*batch_b + (b_kmajor ? n*ldb + k : k*ldb + n);
// C is row-major, element (m, n) of slice z at c + z*batch_c + m*ldc + n.
// reduce_batch = false: `batch` independent GEMMs, slice z = batch b.
// reduce_batch = true: the sum over all batches and all K goes into `splits` partial slices
//   (epilogue kPartial, fixed contiguous k-tile ranges); the caller reduces them in order.
struct PwGemmParams {
  enum Epi : int { kStore = 0, kStats = 1, kPartial = 2 };
  const void* a;
  int64_t lda, batch_a;
  bool a_kmajor;
  const void* b;
  int64_t ldb, batch_b;
  bool b_kmajor;
  void* c;  // x's dtype (kStore, kStats) or acc dtype (kPartial)
  int64_t ldc, batch_c;
  int64_t M, N, K;
  int64_t batch;
  bool reduce_batch;
  int64_t splits;  // reduce_batch only
  int epi;
  // kStore: optional per-channel affine + activation (chan 0: none, 1: channel = m, 2: = n).
  int chan;
  const void* scale;
  const void* shift;
  int act;
  // kStats: per-tile (count, mean, M2) partials of the channel (chan 1 or 2) over the other
  // dimension; partial index p = z * tiles_along_other_dim + tile index.
  void* stat_cnt;   // [P]
  void* stat_mean;  // [P][channels]
  void* stat_m2;    // [P][channels]
  bool allow_tf32;
  int cfg;  // tile configuration, from pw_gemm_config()
};

// Tile configuration for this problem (deterministic in shapes, dtype and SM count).
struct PwGemmTile {
  int cfg;
  int bm, bn, bk;
};
PwGemmTile pw_gemm_config(const PwGemmParams& p, DType dtype);
cudaError_t pw_gemm(const PwGemmParams& p, DType dtype, cudaStream_t stream);

// SM count of the current device (1 if it cannot be read).
int pw_num_sms();

}  // namespace cuda
}  // namespace dwsep
