// Params structs, tiling plan and launchers of the depthwise 3x3 (padding 1) CUDA kernels.
// No torch, no CUDA device code: included from the .cu launchers and from the host glue
// (csrc/cuda/depthwise_glue.cpp), which allocates the reduction workspaces this plan sizes.
#pragma once

#include <cstdint>

#include "cuda/launch.h"

namespace dwsep {
namespace cuda {

// Threads per block of every depthwise kernel.
constexpr int kDwThreads = 256;

// Geometry shared by all depthwise ops. Tensors are dense NCHW (nhwc=false) or dense
// channels_last (nhwc=true); x is (N, C, H, W), outputs (N, C, Ho, Wo) with
// Ho = (H-1)/stride + 1, Wo = (W-1)/stride + 1. The 3x3 weight is contiguous (C, 1, 3, 3) in x's
// dtype; per-channel vectors are fp32 (fp64 when x is fp64).
struct DwShape {
  int64_t N, C, H, W, Ho, Wo;
  int stride;  // 1 or 2
  bool nhwc;
};

// y = act(conv(x) * scale[c] + shift[c]).
struct DwFwdParams {
  DwShape s;
  const void* x;
  const void* weight;
  const void* scale;
  const void* shift;
  void* y;
  int act;  // 0 none, 1 relu, 2 relu6
};

// mean, var (biased) of z = conv(x) per channel over (N, Ho, Wo).
struct DwStatsParams {
  DwShape s;
  const void* x;
  const void* weight;
  void* mean;
  void* var;
  void* workspace;  // dw_workspace_elems(kStats, ...) acc-dtype values
};

// sum_gz = sum g_z, sum_gz_xhat = sum g_z * (conv(x) - mean) * invstd, g_z = grad_y * act'(y).
struct DwBwdReduceParams {
  DwShape s;
  const void* grad_y;
  const void* y;
  const void* x;
  const void* weight;
  const void* mean;
  const void* invstd;
  void* sum_gz;
  void* sum_gz_xhat;
  void* workspace;  // dw_workspace_elems(kBwdReduce, ...) acc-dtype values
  int act;
};

// g_conv = k*g_z + (use_z ? b*conv(x) + c : 0); grad_x = conv^T(g_conv), grad_weight.
struct DwBwdParams {
  DwShape s;
  const void* grad_y;
  const void* y;
  const void* x;
  const void* weight;
  const void* k;
  const void* b;
  const void* c;
  void* grad_x;
  void* grad_weight;  // (C, 1, 3, 3) contiguous, weight's dtype
  void* workspace;    // dw_workspace_elems(kBwd, ...) acc-dtype values
  int act;
  bool use_z;
};

// Kernels and workspaces: the NCHW shared-memory tile kernels (forward, stats, bwd_reduce,
// bwd) use dw_plan below; the channels_last ones are registers-only (dw_nhwc_chunks below).
enum class DwKernel : int { kFwdTile = 0, kStats = 1, kBwdReduce = 2, kBwd = 3 };

// Tiling of an NCHW shared-memory tile kernel; a pure function of (kernel, shape, dtype), so the
// reduction order (and with it every result bit) does not depend on the device.
//
// A block handles CB consecutive (n, c) planes of one image (channels c0..c0+CB-1) and an
// output tile of TH x TW pixels. It stages the x tile (rows r0 .. r0+XH-1, cols q0 .. q0+XW-1,
// zero outside the image) in shared memory, where r0 = (ho0 - lo)*stride - 1 and lo = 1 for the
// stride-1 backward (the g_conv tile then has a 1-pixel halo on both sides), 0 otherwise. For
// kBwd it also stages the g_conv tile of GH x GW outputs starting at (ho0 - lo, wo0 - lo).
struct DwPlan {
  int TH, TW;  // output tile
  int CB;      // channels per block; a power of two <= 32, so it divides kDwThreads
  int lo, hi;  // output-space halo of the staged tiles (kBwd: lo = stride==1, hi = 1)
  int XH, XW;  // x tile: (TH - 1 + lo + hi)*stride + 3 rows, likewise cols
  int GH, GW;  // g_conv tile (kBwd): TH + lo + hi rows, TW + lo + hi cols; else 0
  int64_t tiles_h, tiles_w;
  int64_t cgroups;          // ceil(C / CB)
  int64_t items;            // N * tiles_h * tiles_w: (image, tile) pairs per channel group
  int64_t chunks;           // reductions: grid.y; chunk j handles items [j*ipc, (j+1)*ipc)
  int64_t items_per_chunk;  // ipc
  int64_t smem_bytes;       // dynamic shared memory: (XH*XW + GH*GW) * CB * acc bytes
  int64_t ws_per_channel;   // workspace values per (chunk, channel): stats 3, reduce 2, bwd 9
};

inline int64_t dw_ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline DwPlan dw_plan(DwKernel kind, const DwShape& s, DType dtype) {
  DwPlan p{};
  const int S = s.stride;
  const int acc_bytes = dtype == DType::kFloat64 ? 8 : 4;
  // At most 128 bytes of staged data per pixel (32 fp32 or 16 fp64 channels): keeps every
  // tile below the 48 KiB of dynamic shared memory a launch gets without an opt-in.
  const int64_t cb_max = 128 / acc_bytes;
  int64_t c_pow2 = 1;
  while (c_pow2 < s.C && c_pow2 < cb_max) c_pow2 *= 2;
  const int lo = (kind == DwKernel::kBwd && S == 1) ? 1 : 0;
  const int hi = kind == DwKernel::kBwd ? 1 : 0;
  // Dynamic shared memory of a (TH, TW, CB) tile; growth steps must stay within the budget
  // (48 KiB per block without an opt-in, less the static reduction arrays).
  const int64_t kSmemBudget = 40 * 1024;
  auto smem = [&](int64_t th, int64_t tw, int64_t cb) {
    const int64_t xh = (th - 1 + lo + hi) * S + 3, xw = (tw - 1 + lo + hi) * S + 3;
    const int64_t g = kind == DwKernel::kBwd ? (th + lo + hi) * (tw + lo + hi) : 0;
    return (xh * xw + g) * cb * acc_bytes;
  };
  // W is the coalesced dimension: a wide tile of one plane, and several planes per block when
  // the planes are small (7x7, 14x14), up to ~1024 outputs per block.
  int64_t TH = S == 1 ? 16 : 8;
  int64_t TW = 32;
  TH = TH < s.Ho ? TH : s.Ho;
  TW = TW < s.Wo ? TW : s.Wo;
  int64_t CB = 1;
  while (CB * 2 <= c_pow2 && CB * 2 * TH * TW <= 1024 && smem(TH, TW, CB * 2) <= kSmemBudget) {
    CB *= 2;
  }
  p.TH = static_cast<int>(TH);
  p.TW = static_cast<int>(TW);
  p.CB = static_cast<int>(CB);
  p.lo = lo;
  p.hi = hi;
  p.XH = (p.TH - 1 + p.lo + p.hi) * S + 3;
  p.XW = (p.TW - 1 + p.lo + p.hi) * S + 3;
  p.GH = kind == DwKernel::kBwd ? p.TH + p.lo + p.hi : 0;
  p.GW = kind == DwKernel::kBwd ? p.TW + p.lo + p.hi : 0;
  p.tiles_h = dw_ceil_div(s.Ho, TH);
  p.tiles_w = dw_ceil_div(s.Wo, TW);
  p.cgroups = dw_ceil_div(s.C, CB);
  p.items = s.N * p.tiles_h * p.tiles_w;
  if (kind == DwKernel::kFwdTile) {
    p.chunks = 1;
    p.items_per_chunk = p.items;
  } else {
    // About 2048 blocks in all, at most 65535 chunks (grid.y limit), at least one item each.
    int64_t chunks = dw_ceil_div(2048, p.cgroups);
    const int64_t max_chunks = p.items < 65535 ? p.items : 65535;
    chunks = chunks < 1 ? 1 : (chunks > max_chunks ? max_chunks : chunks);
    p.items_per_chunk = dw_ceil_div(p.items, chunks);
    p.chunks = dw_ceil_div(p.items, p.items_per_chunk);
  }
  p.smem_bytes = smem(TH, TW, CB);
  p.ws_per_channel = kind == DwKernel::kStats       ? 3
                     : kind == DwKernel::kBwdReduce ? 2
                     : kind == DwKernel::kBwd       ? 9
                                                    : 0;
  return p;
}

// The registers-only channels_last kernels (depthwise_fwd_nhwc.cuh) walk "pixel items": a strip
// of dw_nhwc_strip_width(stride) output columns of one output row of one image.
__host__ __device__ constexpr int dw_nhwc_strip_width(int stride) {
  return stride == 1 ? 8 : 4;
}

__host__ __device__ inline int64_t dw_nhwc_pixel_items(const DwShape& s) {
  const int tws = dw_nhwc_strip_width(s.stride);
  return s.N * s.Ho * ((s.Wo + tws - 1) / tws);
}

// Partition of the channels_last reductions (dw_stats_nhwc_thread, dw_bwd_reduce_nhwc_thread):
// chunk j holds the pixel
// items [j * items_per_chunk, min(items, (j + 1) * items_per_chunk)), each non-empty. A pure
// function of (shape, dtype), as dw_plan, so every result bit is independent of the device.
// About 32K (chunk, channel vector) pairs in all, one thread each; at most 2^22 outputs per
// chunk (the fp32 count and Welford mean of a chunk stay exact / accurate).
struct DwNhwcChunks {
  int64_t items, chunks, items_per_chunk;
};

inline DwNhwcChunks dw_nhwc_chunks(const DwShape& s, DType dtype) {
  DwNhwcChunks g{};
  const int64_t elem = dtype == DType::kFloat64 ? 8 : (dtype == DType::kFloat32 ? 4 : 2);
  const int64_t vecs = dw_ceil_div(s.C, 16 / elem);  // channel vectors of the 16-byte path
  g.items = dw_nhwc_pixel_items(s);
  if (g.items == 0) return g;
  int64_t chunks = dw_ceil_div(32768, vecs);
  const int64_t min_chunks = dw_ceil_div(g.items * dw_nhwc_strip_width(s.stride), 1 << 22);
  chunks = chunks < min_chunks ? min_chunks : chunks;
  chunks = chunks > g.items ? g.items : chunks;
  g.items_per_chunk = dw_ceil_div(g.items, chunks);
  g.chunks = dw_ceil_div(g.items, g.items_per_chunk);
  return g;
}

// Channels_last dw_bwd workspace: the [chunks][C][9] weight-gradient partials, then (from this
// offset, a multiple of 4 values so that the 16-byte vector accesses stay aligned) g_conv, dense
// N x Ho x Wo x C.
inline int64_t dw_nhwc_bwd_gconv_offset(const DwShape& s, const DwNhwcChunks& g) {
  return dw_ceil_div(g.chunks * s.C * 9, 4) * 4;
}

// Number of acc-dtype (fp32, or fp64 for fp64 x) values of the workspace the glue allocates
// for dw_stats (kStats), dw_bwd_reduce (kBwdReduce) and dw_bwd (kBwd); 0 when numel is 0.
inline int64_t dw_workspace_elems(DwKernel kind, const DwShape& s, DType dtype) {
  if (s.N * s.C * s.Ho * s.Wo == 0) return 0;
  if (s.nhwc && kind == DwKernel::kStats) return dw_nhwc_chunks(s, dtype).chunks * s.C * 3;
  if (s.nhwc && kind == DwKernel::kBwdReduce) return dw_nhwc_chunks(s, dtype).chunks * s.C * 2;
  if (s.nhwc && kind == DwKernel::kBwd) {
    return dw_nhwc_bwd_gconv_offset(s, dw_nhwc_chunks(s, dtype)) + s.N * s.Ho * s.Wo * s.C;
  }
  const DwPlan p = dw_plan(kind, s, dtype);
  return p.chunks * s.C * p.ws_per_channel;
}

cudaError_t dw_fwd(const DwFwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t dw_stats(const DwStatsParams& p, DType dtype, cudaStream_t stream);
cudaError_t dw_bwd_reduce(const DwBwdReduceParams& p, DType dtype, cudaStream_t stream);
cudaError_t dw_bwd(const DwBwdParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace dwsep
