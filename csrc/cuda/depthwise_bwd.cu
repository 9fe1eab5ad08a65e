// Depthwise 3x3 (padding 1, stride 1 or 2) backward kernels:
//   dw_bwd_reduce: sum_gz[c] = sum g_z, sum_gz_xhat[c] = sum g_z * (z - mean[c]) * invstd[c]
//                  with g_z = grad_y * act'(y) and z = conv(x) recomputed (never stored)
//   dw_bwd:        g_conv = k[c]*g_z + (use_z ? b[c]*z + c[c] : 0), formed on the fly;
//                  grad_x = transposed depthwise conv of g_conv;
//                  grad_w[c,i,j] = sum_{n,ho,wo} g_conv[n,c,ho,wo] * x[n,c, ho*S+i-1, wo*S+j-1]
//
// Conventions (as in depthwise_fwd.cu; the shared tile helpers are in depthwise_common.cuh):
//   z[n,c,ho,wo] = sum_{i,j} w[c,i,j] * x[n,c, ho*S + i - 1, wo*S + j - 1], x = 0 outside.
// Both ops reduce over (N, Ho, Wo) in two stages without atomics: grid (channel group, chunk),
// each block walks the items (image, tile) of its chunk in order, its threads accumulate in
// registers, the block sums its threads in a fixed binary tree and writes one partial per
// (chunk, channel) into the workspace; a second kernel adds the chunks in order 0, 1, ...
// Every result is therefore bitwise reproducible.

#include "cuda/cuda_common.cuh"
#include "cuda/depthwise.h"
#include "cuda/depthwise_bwd_nhwc.cuh"
#include "cuda/depthwise_common.cuh"

namespace dwsep {
namespace cuda {
namespace {

using namespace dwtile;  // NOLINT(build/namespaces)

// ------------------------------------------------------------------------------------------
// Helpers local to the backward (the tile helpers are in depthwise_common.cuh).

// Sum of v over the PL pixel lanes of channel lane cl, in a fixed binary tree; every thread
// gets its channel's sum. red holds kDwThreads values; the leading barrier makes the call
// safe to repeat (the previous call's readers are done before red is overwritten).
template <typename Acc>
__device__ __forceinline__ Acc block_sum_lanes(Acc v, Acc* red, int cl, int pl, int PL) {
  const int ri = cl * PL + pl;
  __syncthreads();
  red[ri] = v;
  __syncthreads();
  for (int off = PL / 2; off > 0; off /= 2) {
    if (pl < off) red[ri] += red[ri + off];
    __syncthreads();
  }
  return red[cl * PL];
}

// Decodes item (within a channel group) into image n and output tile origin (ho0, wo0).
__device__ __forceinline__ void decode_item(int64_t it, const DwPlan& g, int64_t& n, int64_t& ho0,
                                            int64_t& wo0) {
  const int64_t tw = it % g.tiles_w;
  it /= g.tiles_w;
  const int64_t th = it % g.tiles_h;
  n = it / g.tiles_h;
  ho0 = th * g.TH;
  wo0 = tw * g.TW;
}

// ------------------------------------------------------------------------------------------
// dw_bwd_reduce, stage 1: ws[(chunk*C + c)*2 + {0, 1}] = partial (sum g_z, sum g_z*xhat).
// Channels_last: registers only (dw_bwd_reduce_nhwc_thread, persistent grid); NCHW: the
// shared-memory tile kernel below.

template <typename T, int S, int VEC>
__global__ void __launch_bounds__(kDwThreads, 1)
    dw_bwd_reduce_nhwc_kernel(const T* __restrict__ grad_y, const T* __restrict__ y,
                              const T* __restrict__ x, const T* __restrict__ w,
                              const typename AccOf<T>::type* __restrict__ mean,
                              const typename AccOf<T>::type* __restrict__ invstd,
                              typename AccOf<T>::type* __restrict__ ws, DwShape s, DwNhwcChunks g,
                              int act) {
  dw_bwd_reduce_nhwc_thread<T, S, VEC>(grad_y, y, x, w, mean, invstd, ws, s, g, act,
                                       static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                       static_cast<int64_t>(gridDim.x) * blockDim.x);
}

template <typename T, int S>
__global__ void __launch_bounds__(kDwThreads, 2)
    dw_bwd_reduce_nchw_kernel(const T* __restrict__ grad_y, const T* __restrict__ y,
                              const T* __restrict__ x, const T* __restrict__ w,
                              const typename AccOf<T>::type* __restrict__ mean,
                              const typename AccOf<T>::type* __restrict__ invstd,
                              typename AccOf<T>::type* __restrict__ ws, DwShape s, DwPlan g,
                              int act) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char dw_smem[];
  Acc* xs = reinterpret_cast<Acc*>(dw_smem);
  __shared__ Acc red[kDwThreads];
  int cl, pl;
  lanes(g.CB, cl, pl);
  const int PL = kDwThreads / g.CB;
  const int tile_px = g.TH * g.TW;
  const int64_t chunk = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * g.CB + cl;
  const bool cok = c < s.C;
  Acc wr[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) wr[k] = cok ? to_acc<Acc>(w[c * 9 + k]) : Acc(0);
  const Acc mu = cok ? mean[c] : Acc(0);
  const Acc is = cok ? invstd[c] : Acc(0);

  Acc s_gz = Acc(0), s_gzx = Acc(0);
  const int64_t it0 = chunk * g.items_per_chunk;
  const int64_t it1 = it0 + g.items_per_chunk < g.items ? it0 + g.items_per_chunk : g.items;
  for (int64_t it = it0; it < it1; ++it) {  // uniform across the block
    int64_t n, ho0, wo0;
    decode_item(it, g, n, ho0, wo0);
    __syncthreads();  // the previous item's readers of xs are done
    load_x_tile(xs, x, n, c, cok, s, ho0 * S - 1, wo0 * S - 1, g.XH, g.XW, g.CB, cl, pl);
    __syncthreads();
    if (cok) {
      for (int p = pl; p < tile_px; p += PL) {
        const int r = p / g.TW;
        const int q = p - r * g.TW;
        const int64_t ho = ho0 + r, wo = wo0 + q;
        if (ho >= s.Ho || wo >= s.Wo) continue;
        const int64_t o = offset_nchw(n, c, ho, wo, s.C, s.Ho, s.Wo);
        const Acc yv = to_acc<Acc>(y[o]);  // both loads issued before the activation test
        const Acc gyv = to_acc<Acc>(grad_y[o]);
        const Acc gz = act_pass_rt(act, yv) ? gyv : Acc(0);
        const Acc z = conv_from_tile<S>(xs, wr, r, q, 0, g.XH, g.XW, cl);
        s_gz += gz;
        s_gzx += gz * ((z - mu) * is);
      }
    }
  }
  const Acc t0 = block_sum_lanes(s_gz, red, cl, pl, PL);
  const Acc t1 = block_sum_lanes(s_gzx, red, cl, pl, PL);
  if (pl == 0 && cok) {
    ws[(chunk * s.C + c) * 2 + 0] = t0;
    ws[(chunk * s.C + c) * 2 + 1] = t1;
  }
}

// Column e of the [chunks][2C] workspace is sum_gz[e / 2] (e even) or sum_gz_xhat[e / 2] (odd),
// folded over the chunks in the fixed order of finalize_column_sum.
template <typename Acc>
__global__ void __launch_bounds__(kDwThreads)
    dw_bwd_reduce_finalize_kernel(const Acc* __restrict__ ws, int64_t chunks, int64_t C, int L,
                                  Acc* __restrict__ sum_gz, Acc* __restrict__ sum_gzx) {
  int64_t e;
  const Acc a = finalize_column_sum(ws, chunks, 2 * C, L, e);
  if (static_cast<int>(threadIdx.x) < kDwThreads / L && e < 2 * C) {
    Acc* out = (e & 1) ? sum_gzx : sum_gz;
    out[e >> 1] = a;
  }
}

// ------------------------------------------------------------------------------------------
// dw_bwd, channels_last: g_conv and the weight-gradient partials (dw_bwd_gconv_nhwc_thread), then
// grad_x from g_conv (dw_bwd_dx_nhwc_thread); persistent grids. NCHW: the tile kernel below.

template <typename T, int S, int VEC>
__global__ void __launch_bounds__(kDwThreads, 1)
    dw_bwd_gconv_nhwc_kernel(const T* __restrict__ grad_y, const T* __restrict__ y,
                             const T* __restrict__ x, const T* __restrict__ w,
                             const typename AccOf<T>::type* __restrict__ kv,
                             const typename AccOf<T>::type* __restrict__ bv,
                             const typename AccOf<T>::type* __restrict__ cv,
                             typename AccOf<T>::type* __restrict__ gconv,
                             typename AccOf<T>::type* __restrict__ ws, DwShape s, DwNhwcChunks g,
                             int act, bool use_z) {
  dw_bwd_gconv_nhwc_thread<T, S, VEC>(grad_y, y, x, w, kv, bv, cv, gconv, ws, s, g, act, use_z,
                                      static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                      static_cast<int64_t>(gridDim.x) * blockDim.x);
}

template <typename T, int S, int VEC>
__global__ void __launch_bounds__(kDwThreads, 1)
    dw_bwd_dx_nhwc_kernel(const typename AccOf<T>::type* __restrict__ gconv,
                          const T* __restrict__ w, T* __restrict__ grad_x, DwShape s) {
  dw_bwd_dx_nhwc_thread<T, S, VEC>(gconv, w, grad_x, s,
                                   static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                   static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// ------------------------------------------------------------------------------------------
// dw_bwd, stage 1. Per item (image n, output tile [ho0, ho0+TH) x [wo0, wo0+TW)) of the block's
// channel group:
//
//  1. Stage x rows [(ho0 - lo)*S - 1, (ho0 + TH)*S + 1] (XH = (TH + lo)*S + 3 rows; cols
//     likewise) in xs, with lo = 1 for S = 1 and 0 for S = 2.
//  2. Compute g_conv for the outputs [ho0 - lo, ho0 + TH] x [wo0 - lo, wo0 + TW] (GH x GW, the
//     tile plus the halo the transposed conv needs) into gs; outputs outside [0,Ho) x [0,Wo)
//     get 0. z of g-tile row gr (output ho0 - lo + gr) uses tile rows gr*S + i, i <= 2, the
//     last being (GH-1)*S + 2 = (TH+lo)*S + 2 = XH - 1: inside the x tile.
//  3. grad_x for the input pixels [ho0*S, (ho0+TH)*S) x [wo0*S, (wo0+TW)*S) (clipped to the
//     image). These ranges over all tiles partition [0, H) x [0, W): tiles_h*TH*S >= Ho*S >= H.
//     Input row h = ho0*S + ir receives tap i from output ho with ho*S + i - 1 = h, i.e.
//     u = ir + 1 - i = (ho - ho0)*S, only when S divides u. With ho - ho0 = u/S, the g-tile
//     row is gr = u/S + lo. Bounds: u in [-1, TH*S]. S = 1: gr = u + 1 in [0, TH + 1] = [0,
//     GH-1]. S = 2: u odd is skipped (u = -1 included), so u in [0, 2TH] and gr = u/2 in
//     [0, TH] = [0, GH-1]. Outputs outside the image contribute the 0 stored in gs.
//  4. grad_w partials over the tile's own outputs (no halo, so every output counts once): the
//     thread's 9 accumulators += g * x at tile rows (r + lo)*S + i, cols (q + lo)*S + j.
// Barriers: before 1 (readers of xs/gs of the previous item are done), between 1 and 2 (xs
// complete), between 2 and 3/4 (gs complete).

template <typename T, int S>
__global__ void __launch_bounds__(kDwThreads, 2)
    dw_bwd_nchw_kernel(const T* __restrict__ grad_y, const T* __restrict__ y,
                       const T* __restrict__ x, const T* __restrict__ w,
                       const typename AccOf<T>::type* __restrict__ kv,
                       const typename AccOf<T>::type* __restrict__ bv,
                       const typename AccOf<T>::type* __restrict__ cv, T* __restrict__ grad_x,
                       typename AccOf<T>::type* __restrict__ ws, DwShape s, DwPlan g, int act,
                       bool use_z) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char dw_smem[];
  const int xpix = g.XH * g.XW;
  const int gpix = g.GH * g.GW;
  Acc* xs = reinterpret_cast<Acc*>(dw_smem);
  Acc* gs = xs + static_cast<int64_t>(xpix) * g.CB;
  __shared__ Acc red[kDwThreads];
  int cl, pl;
  lanes(g.CB, cl, pl);
  const int PL = kDwThreads / g.CB;
  const int lo = g.lo;  // == (S == 1); hi == 1
  const int tile_px = g.TH * g.TW;
  const int in_w = g.TW * S;  // input tile width (before clipping to W)
  const int in_px = g.TH * S * in_w;
  const int64_t chunk = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * g.CB + cl;
  const bool cok = c < s.C;
  Acc wr[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) wr[k] = cok ? to_acc<Acc>(w[c * 9 + k]) : Acc(0);
  const Acc kc = cok ? kv[c] : Acc(0);
  const Acc bc = (cok && use_z) ? bv[c] : Acc(0);
  const Acc cc = (cok && use_z) ? cv[c] : Acc(0);

  Acc gw[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) gw[k] = Acc(0);

  const int64_t it0 = chunk * g.items_per_chunk;
  const int64_t it1 = it0 + g.items_per_chunk < g.items ? it0 + g.items_per_chunk : g.items;
  for (int64_t it = it0; it < it1; ++it) {  // uniform across the block
    int64_t n, ho0, wo0;
    decode_item(it, g, n, ho0, wo0);
    const int64_t gho0 = ho0 - lo, gwo0 = wo0 - lo;  // output at g-tile (0, 0)

    // 1. x tile.
    __syncthreads();
    load_x_tile(xs, x, n, c, cok, s, gho0 * S - 1, gwo0 * S - 1, g.XH, g.XW, g.CB, cl, pl);
    __syncthreads();

    // 2. g_conv tile (with halo). Each thread first loads y and grad_y of up to kTileBatch
    //    pixels (predicated on being in range, both regardless of the activation), then the
    //    activation test selects and the values are stored.
    for (int p0 = pl; p0 < gpix; p0 += kTileBatch * PL) {
      Acc yv[kTileBatch], gyv[kTileBatch];
      bool ok[kTileBatch];
#pragma unroll
      for (int u = 0; u < kTileBatch; ++u) {
        const int p = p0 + u * PL;
        const int gr = p / g.GW;
        const int gq = p - gr * g.GW;
        const int64_t ho = gho0 + gr, wo = gwo0 + gq;
        ok[u] = cok && p < gpix && ho >= 0 && ho < s.Ho && wo >= 0 && wo < s.Wo;
        const int64_t o = ok[u] ? offset_nchw(n, c, ho, wo, s.C, s.Ho, s.Wo) : 0;
        yv[u] = ok[u] ? to_acc<Acc>(y[o]) : Acc(0);
        gyv[u] = ok[u] ? to_acc<Acc>(grad_y[o]) : Acc(0);
      }
#pragma unroll
      for (int u = 0; u < kTileBatch; ++u) {
        const int p = p0 + u * PL;
        if (p >= gpix) continue;
        const int gr = p / g.GW;
        const int gq = p - gr * g.GW;
        Acc gv = Acc(0);
        if (ok[u]) {
          const Acc gz = act_pass_rt(act, yv[u]) ? gyv[u] : Acc(0);
          gv = kc * gz;
          if (use_z) {
            // Output (ho0 + r) with r = gr - lo: conv_from_tile's tile row (r + lo)*S + i.
            const Acc z = conv_from_tile<S>(xs, wr, gr - lo, gq - lo, lo, g.XH, g.XW, cl);
            gv += bc * z + cc;
          }
        }
        gs[sidx(p, cl, gpix)] = gv;
      }
    }
    __syncthreads();

    if (cok) {
      // 3. grad_x: gather from the g tile through the transposed taps.
      for (int p = pl; p < in_px; p += PL) {
        const int ir = p / in_w;
        const int iq = p - ir * in_w;
        const int64_t h = ho0 * S + ir, wi = wo0 * S + iq;
        if (h >= s.H || wi >= s.W) continue;
        Acc acc = Acc(0);
#pragma unroll
        for (int i = 0; i < 3; ++i) {
          const int u = ir + 1 - i;
          if (S == 2 && (u & 1)) continue;  // no output row maps tap i onto this row
          const int gr = (S == 1 ? u : u / 2) + lo;
#pragma unroll
          for (int j = 0; j < 3; ++j) {
            const int v = iq + 1 - j;
            if (S == 2 && (v & 1)) continue;
            const int gq = (S == 1 ? v : v / 2) + lo;
            acc += gs[sidx(gr * g.GW + gq, cl, gpix)] * wr[i * 3 + j];
          }
        }
        grad_x[offset_nchw(n, c, h, wi, s.C, s.H, s.W)] = from_acc<T>(acc);
      }

      // 4. grad_w partials over the tile's own outputs.
      for (int p = pl; p < tile_px; p += PL) {
        const int r = p / g.TW;
        const int q = p - r * g.TW;
        if (ho0 + r >= s.Ho || wo0 + q >= s.Wo) continue;
        const Acc gv = gs[sidx((r + lo) * g.GW + (q + lo), cl, gpix)];
#pragma unroll
        for (int i = 0; i < 3; ++i) {
#pragma unroll
          for (int j = 0; j < 3; ++j) {
            const int pix = ((r + lo) * S + i) * g.XW + (q + lo) * S + j;
            gw[i * 3 + j] += gv * xs[sidx(pix, cl, xpix)];
          }
        }
      }
    }
  }

#pragma unroll
  for (int k = 0; k < 9; ++k) {
    const Acc t = block_sum_lanes(gw[k], red, cl, pl, PL);
    if (pl == 0 && cok) ws[(chunk * s.C + c) * 9 + k] = t;
  }
}

// grad_w[e] (e = c*9 + k) = column e of the [chunks][9C] workspace folded over the chunks in
// the fixed order of finalize_column_sum, in weight's dtype.
template <typename T>
__global__ void __launch_bounds__(kDwThreads)
    dw_bwd_finalize_kernel(const typename AccOf<T>::type* __restrict__ ws, int64_t chunks,
                           int64_t C, int L, T* __restrict__ grad_w) {
  using Acc = typename AccOf<T>::type;
  int64_t e;
  const Acc a = finalize_column_sum(ws, chunks, 9 * C, L, e);
  if (static_cast<int>(threadIdx.x) < kDwThreads / L && e < 9 * C) grad_w[e] = from_acc<T>(a);
}

// ------------------------------------------------------------------------------------------
// Launchers.

template <typename Acc>
cudaError_t launch_bwd_reduce_finalize(const DwBwdReduceParams& p, int64_t chunks,
                                       cudaStream_t stream) {
  return launch_finalize<dw_bwd_reduce_finalize_kernel<Acc>, Acc>(
      p.workspace, chunks, p.s.C, 2, stream, static_cast<Acc*>(p.sum_gz),
      static_cast<Acc*>(p.sum_gz_xhat));
}

template <typename T, int S, int VEC>
cudaError_t launch_bwd_reduce_nhwc(const DwBwdReduceParams& p, DType dtype, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const DwNhwcChunks g = dw_nhwc_chunks(p.s, dtype);
  const cudaError_t err = launch_persistent<dw_bwd_reduce_nhwc_kernel<T, S, VEC>>(
      g.chunks * (p.s.C / VEC), 1, stream, static_cast<const T*>(p.grad_y),
      static_cast<const T*>(p.y), static_cast<const T*>(p.x), static_cast<const T*>(p.weight),
      static_cast<const Acc*>(p.mean), static_cast<const Acc*>(p.invstd),
      static_cast<Acc*>(p.workspace), p.s, g, p.act);
  if (err != cudaSuccess) return err;
  return launch_bwd_reduce_finalize<Acc>(p, g.chunks, stream);
}

template <typename T, int S>
cudaError_t launch_bwd_reduce_nchw(const DwBwdReduceParams& p, DType dtype, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const DwPlan g = dw_plan(DwKernel::kBwdReduce, p.s, dtype);
  if (g.cgroups > 0x7fffffff || g.chunks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(g.cgroups), static_cast<unsigned>(g.chunks));
  dw_bwd_reduce_nchw_kernel<T, S><<<grid, kDwThreads, g.smem_bytes, stream>>>(
      static_cast<const T*>(p.grad_y), static_cast<const T*>(p.y), static_cast<const T*>(p.x),
      static_cast<const T*>(p.weight), static_cast<const Acc*>(p.mean),
      static_cast<const Acc*>(p.invstd), static_cast<Acc*>(p.workspace), p.s, g, p.act);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_bwd_reduce_finalize<Acc>(p, g.chunks, stream);
}

template <typename T>
cudaError_t launch_bwd_finalize(const DwBwdParams& p, int64_t chunks, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  return launch_finalize<dw_bwd_finalize_kernel<T>, Acc>(p.workspace, chunks, p.s.C, 9, stream,
                                                         static_cast<T*>(p.grad_weight));
}

template <typename T, int S, int VEC>
cudaError_t launch_bwd_nhwc(const DwBwdParams& p, DType dtype, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const DwShape& s = p.s;
  const DwNhwcChunks g = dw_nhwc_chunks(s, dtype);
  const int64_t CG = s.C / VEC;
  const int64_t min_blocks = (CG + kDwThreads - 1) / kDwThreads;  // dx: a thread per vector
  if (min_blocks > (int64_t(1) << 20)) return cudaErrorInvalidConfiguration;
  Acc* ws = static_cast<Acc*>(p.workspace);
  Acc* gconv = ws + dw_nhwc_bwd_gconv_offset(s, g);
  cudaError_t err = launch_persistent<dw_bwd_gconv_nhwc_kernel<T, S, VEC>>(
      g.chunks * CG, 1, stream, static_cast<const T*>(p.grad_y), static_cast<const T*>(p.y),
      static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<const Acc*>(p.k),
      static_cast<const Acc*>(p.b), static_cast<const Acc*>(p.c), gconv, ws, s, g, p.act, p.use_z);
  if (err != cudaSuccess) return err;
  err = launch_persistent<dw_bwd_dx_nhwc_kernel<T, S, VEC>>(
      dw_dx_nhwc_items(s) * CG, min_blocks, stream, static_cast<const Acc*>(gconv),
      static_cast<const T*>(p.weight), static_cast<T*>(p.grad_x), s);
  if (err != cudaSuccess) return err;
  return launch_bwd_finalize<T>(p, g.chunks, stream);
}

template <typename T, int S>
cudaError_t launch_bwd_nchw(const DwBwdParams& p, DType dtype, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const DwPlan g = dw_plan(DwKernel::kBwd, p.s, dtype);
  if (g.cgroups > 0x7fffffff || g.chunks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(g.cgroups), static_cast<unsigned>(g.chunks));
  dw_bwd_nchw_kernel<T, S><<<grid, kDwThreads, g.smem_bytes, stream>>>(
      static_cast<const T*>(p.grad_y), static_cast<const T*>(p.y), static_cast<const T*>(p.x),
      static_cast<const T*>(p.weight), static_cast<const Acc*>(p.k), static_cast<const Acc*>(p.b),
      static_cast<const Acc*>(p.c), static_cast<T*>(p.grad_x), static_cast<Acc*>(p.workspace), p.s,
      g, p.act, p.use_z);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_bwd_finalize<T>(p, g.chunks, stream);
}

}  // namespace

cudaError_t dw_bwd_reduce(const DwBwdReduceParams& p, DType dtype, cudaStream_t stream) {
  const DwShape& s = p.s;
  if (s.N * s.C * s.Ho * s.Wo == 0) return cudaSuccess;  // the glue writes zeros
  if (s.stride != 1 && s.stride != 2) return cudaErrorInvalidValue;
  if (p.act < 0 || p.act > 2) return cudaErrorInvalidValue;
  DWSEP_DISPATCH_DTYPE(dtype, T, {
    if (s.nhwc) {
      constexpr int kVec = 16 / sizeof(T);
      const bool vec_ok =
          s.C % kVec == 0 && aligned16(p.x) && aligned16(p.y) && aligned16(p.grad_y);
      return with_stride_vec<kVec>(s.stride, vec_ok, [&](auto S, auto V) {
        return launch_bwd_reduce_nhwc<T, decltype(S)::value, decltype(V)::value>(p, dtype, stream);
      });
    }
    return with_stride(s.stride, [&](auto S) {
      return launch_bwd_reduce_nchw<T, decltype(S)::value>(p, dtype, stream);
    });
  });
  return cudaSuccess;
}

cudaError_t dw_bwd(const DwBwdParams& p, DType dtype, cudaStream_t stream) {
  const DwShape& s = p.s;
  if (s.N * s.C * s.Ho * s.Wo == 0) return cudaSuccess;  // the glue zeroes grad_weight
  if (s.stride != 1 && s.stride != 2) return cudaErrorInvalidValue;
  if (p.act < 0 || p.act > 2) return cudaErrorInvalidValue;
  DWSEP_DISPATCH_DTYPE(dtype, T, {
    if (s.nhwc) {
      // 4 channels per thread for the 16-bit types (8-byte accesses): the nine weight-gradient
      // accumulators per channel, the taps and the window of 8 channels would not fit in 255
      // registers.
      constexpr int kVec = sizeof(T) >= 4 ? 16 / sizeof(T) : 4;
      const bool vec_ok = s.C % kVec == 0 && aligned16(p.x) && aligned16(p.y) &&
                          aligned16(p.grad_y) && aligned16(p.grad_x);
      return with_stride_vec<kVec>(s.stride, vec_ok, [&](auto S, auto V) {
        return launch_bwd_nhwc<T, decltype(S)::value, decltype(V)::value>(p, dtype, stream);
      });
    }
    return with_stride(
        s.stride, [&](auto S) { return launch_bwd_nchw<T, decltype(S)::value>(p, dtype, stream); });
  });
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace dwsep
