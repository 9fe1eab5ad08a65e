// Depthwise 3x3 (padding 1, stride 1 or 2) forward kernels:
//   dw_fwd:   y = act(conv(x) * scale[c] + shift[c])   (inference: BN folded into scale/shift)
//   dw_stats: per-channel mean and biased variance of z = conv(x) over (N, Ho, Wo)
//
// Conventions used throughout (see csrc/cuda/depthwise.h for the params and the tiling plan):
//   z[n,c,ho,wo] = sum_{i,j in 0..2} w[c,i,j] * x[n,c, ho*S + i - 1, wo*S + j - 1],
// with x = 0 outside [0,H) x [0,W). Offsets into tensors are int64; indices inside a
// shared-memory tile are int (a tile has < 48 KiB).

#include "cuda/cuda_common.cuh"
#include "cuda/depthwise.h"
#include "cuda/depthwise_common.cuh"
#include "cuda/depthwise_fwd_nhwc.cuh"

namespace dwsep {
namespace cuda {
namespace {

using namespace dwtile;  // NOLINT(build/namespaces)

// ------------------------------------------------------------------------------------------
// dw_fwd, channels_last: registers only; the work of one thread is dw_fwd_nhwc_thread
// (depthwise_fwd_nhwc.cuh). A persistent grid (about one wave of resident blocks, see
// launch_fwd_nhwc), so that each thread keeps its channel vector's taps over many pixel items.

template <typename T, int S, int ACT, int VEC>
__global__ void __launch_bounds__(kDwThreads, 1)
    dw_fwd_nhwc_kernel(const T* __restrict__ x, const T* __restrict__ w,
                       const typename AccOf<T>::type* __restrict__ scale,
                       const typename AccOf<T>::type* __restrict__ shift, T* __restrict__ y,
                       DwShape s) {
  dw_fwd_nhwc_thread<T, S, ACT, VEC>(x, w, scale, shift, y, s,
                                     static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                     static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// dw_stats stage 1, channels_last: registers only, dw_stats_nhwc_thread; the finalize below
// merges its per-(chunk, channel) moments as those of the shared-memory kernel.
template <typename T, int S, int VEC>
__global__ void __launch_bounds__(kDwThreads, 1)
    dw_stats_nhwc_kernel(const T* __restrict__ x, const T* __restrict__ w,
                         typename AccOf<T>::type* __restrict__ ws, DwShape s, DwNhwcChunks g) {
  dw_stats_nhwc_thread<T, S, VEC>(x, w, ws, s, g,
                                  static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                  static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// ------------------------------------------------------------------------------------------
// dw_fwd, NCHW: a block per (image n, group of CB planes, TH x TW output tile), grid-stride
// over those. The block stages the (TH-1)*S+3 x (TW-1)*S+3 input tile with its halo (zero
// padding outside the image) in shared memory; each thread then computes the outputs
// p = pl, pl + PL, ... of its plane cl (consecutive threads: consecutive pixels of a row).

template <typename T, int S, int ACT>
__device__ __forceinline__ void fwd_nchw_item(const T* __restrict__ x, const T* __restrict__ w,
                                              const typename AccOf<T>::type* __restrict__ scale,
                                              const typename AccOf<T>::type* __restrict__ shift,
                                              T* __restrict__ y, const DwShape& s, const DwPlan& g,
                                              typename AccOf<T>::type* xs, int cl, int pl,
                                              int64_t n, int64_t cg, int tile) {
  using Acc = typename AccOf<T>::type;
  const int PL = kDwThreads / g.CB;
  const int tile_px = g.TH * g.TW;
  const int tiles_w = static_cast<int>(g.tiles_w);
  const int th = tile / tiles_w;
  const int tw = tile - th * tiles_w;
  const int64_t c = cg * g.CB + cl;
  const bool cok = c < s.C;
  const int64_t ho0 = static_cast<int64_t>(th) * g.TH, wo0 = static_cast<int64_t>(tw) * g.TW;

  Acc wr[9], sc = Acc(0), sh = Acc(0);
#pragma unroll
  for (int k = 0; k < 9; ++k) wr[k] = cok ? to_acc<Acc>(w[c * 9 + k]) : Acc(0);
  if (cok) {
    sc = scale[c];
    sh = shift[c];
  }

  __syncthreads();  // the previous item's readers of xs are done
  load_x_tile(xs, x, n, c, cok, s, ho0 * S - 1, wo0 * S - 1, g.XH, g.XW, g.CB, cl, pl);
  __syncthreads();
  if (cok) {
    for (int p = pl; p < tile_px; p += PL) {
      const int r = p / g.TW;
      const int q = p - r * g.TW;
      const int64_t ho = ho0 + r, wo = wo0 + q;
      if (ho >= s.Ho || wo >= s.Wo) continue;
      const Acc z = conv_from_tile<S>(xs, wr, r, q, 0, g.XH, g.XW, cl);
      y[offset_nchw(n, c, ho, wo, s.C, s.Ho, s.Wo)] = from_acc<T>(apply_act<ACT>(z * sc + sh));
    }
  }
}

template <typename T, int S, int ACT>
__global__ void __launch_bounds__(kDwThreads, 2)
    dw_fwd_nchw_kernel(const T* __restrict__ x, const T* __restrict__ w,
                       const typename AccOf<T>::type* __restrict__ scale,
                       const typename AccOf<T>::type* __restrict__ shift, T* __restrict__ y,
                       DwShape s, DwPlan g) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char dw_smem[];
  Acc* xs = reinterpret_cast<Acc*>(dw_smem);
  int cl, pl;
  lanes(g.CB, cl, pl);
  // Grid: x = output tiles of a plane (tiles_h * tiles_w < 2^31, checked by the launcher),
  // y = channel groups, z = images, each grid-stride so that any N and C fit the 65535 limit
  // of y and z. The loop bounds are uniform across the block, so every thread reaches the
  // barriers inside fwd_nchw_item.
  const int tiles = static_cast<int>(g.tiles_h * g.tiles_w);
  for (int64_t n = blockIdx.z; n < s.N; n += gridDim.z) {
    for (int64_t cg = blockIdx.y; cg < g.cgroups; cg += gridDim.y) {
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        fwd_nchw_item<T, S, ACT>(x, w, scale, shift, y, s, g, xs, cl, pl, n, cg, tile);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// dw_stats, NCHW (channels_last: dw_stats_nhwc_kernel above, same workspace layout and
// finalize). Stage 1: grid (channel group, chunk). Each block walks the items (image, tile) of
// its chunk in order; each thread keeps a Welford (count, mean, M2) of the z values of its
// channel; the block merges its threads with Chan's formula in a fixed binary tree and writes
// one (count, mean, M2) per channel to ws[(chunk*C + c)*3 + 0..2]. Stage 2: one thread per
// channel merges the chunks in a fixed order (counts in fp64). No atomics: the result is a
// pure function of the inputs and the plan, bitwise reproducible.

// (na, ma, Ma) <- (na, ma, Ma) + (nb, mb, Mb).
template <typename Acc>
__device__ __forceinline__ void chan_merge(Acc& na, Acc& ma, Acc& Ma, Acc nb, Acc mb, Acc Mb) {
  if (nb == Acc(0)) return;
  const Acc n = na + nb;
  const Acc d = mb - ma;
  const Acc f = nb / n;
  ma = ma + d * f;
  Ma = Ma + Mb + d * d * na * f;
  na = n;
}

template <typename T, int S>
__global__ void __launch_bounds__(kDwThreads, 2)
    dw_stats_nchw_kernel(const T* __restrict__ x, const T* __restrict__ w,
                         typename AccOf<T>::type* __restrict__ ws, DwShape s, DwPlan g) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char dw_smem[];
  Acc* xs = reinterpret_cast<Acc*>(dw_smem);
  __shared__ Acc red_n[kDwThreads], red_m[kDwThreads], red_M[kDwThreads];
  int cl, pl;
  lanes(g.CB, cl, pl);
  const int PL = kDwThreads / g.CB;
  const int tile_px = g.TH * g.TW;
  const int64_t cg = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t c = cg * g.CB + cl;
  const bool cok = c < s.C;
  Acc wr[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) wr[k] = cok ? to_acc<Acc>(w[c * 9 + k]) : Acc(0);

  int64_t cnt = 0;
  Acc mean = Acc(0), m2 = Acc(0);
  const int64_t it0 = chunk * g.items_per_chunk;
  const int64_t it1 = it0 + g.items_per_chunk < g.items ? it0 + g.items_per_chunk : g.items;
  for (int64_t it = it0; it < it1; ++it) {  // uniform across the block
    int64_t t = it;
    const int64_t tw = t % g.tiles_w;
    t /= g.tiles_w;
    const int64_t th = t % g.tiles_h;
    const int64_t n = t / g.tiles_h;
    const int64_t ho0 = th * g.TH, wo0 = tw * g.TW;
    __syncthreads();  // the previous item's readers of xs are done
    load_x_tile(xs, x, n, c, cok, s, ho0 * S - 1, wo0 * S - 1, g.XH, g.XW, g.CB, cl, pl);
    __syncthreads();
    if (cok) {
      for (int p = pl; p < tile_px; p += PL) {
        const int r = p / g.TW;
        const int q = p - r * g.TW;
        if (ho0 + r >= s.Ho || wo0 + q >= s.Wo) continue;
        const Acc z = conv_from_tile<S>(xs, wr, r, q, 0, g.XH, g.XW, cl);
        ++cnt;
        const Acc d = z - mean;
        mean += d / static_cast<Acc>(cnt);
        m2 += d * (z - mean);
      }
    }
  }

  // Fixed-order tree over the PL pixel lanes of each channel lane.
  const int ri = cl * PL + pl;
  red_n[ri] = static_cast<Acc>(cnt);
  red_m[ri] = mean;
  red_M[ri] = m2;
  __syncthreads();
  for (int off = PL / 2; off > 0; off /= 2) {
    if (pl < off) {
      Acc na = red_n[ri], ma = red_m[ri], Ma = red_M[ri];
      chan_merge(na, ma, Ma, red_n[ri + off], red_m[ri + off], red_M[ri + off]);
      red_n[ri] = na;
      red_m[ri] = ma;
      red_M[ri] = Ma;
    }
    __syncthreads();
  }
  if (pl == 0 && cok) {
    Acc* o = ws + (chunk * s.C + c) * 3;
    o[0] = red_n[ri];
    o[1] = red_m[ri];
    o[2] = red_M[ri];
  }
}

// Folds the per-chunk (count, mean, M2) triples of each channel (ws[(j*C + c)*3 + 0..2]) with
// Chan's merge, in the fixed order of finalize_column_sum (lane l takes chunks l, l + L, ...
// sequentially, then a fixed shared-memory tree over the L lanes). Counts are merged in double
// (exact integers well past 2^24); mean and M2 in Acc.
template <typename Acc>
__device__ __forceinline__ void chan_merge_fin(double& na, Acc& ma, Acc& Ma, double nb, Acc mb,
                                               Acc Mb) {
  if (nb == 0.0) return;
  const double nt = na + nb;
  const Acc d = mb - ma;
  const Acc f = static_cast<Acc>(nb / nt);
  ma = ma + d * f;
  Ma = Ma + Mb + d * d * static_cast<Acc>(na) * f;
  na = nt;
}

template <typename Acc>
__global__ void __launch_bounds__(kDwThreads)
    dw_stats_finalize_kernel(const Acc* __restrict__ ws, int64_t chunks, int64_t C, int L,
                             Acc* __restrict__ mean, Acc* __restrict__ var) {
  __shared__ double red_n[kDwThreads];
  __shared__ Acc red_m[kDwThreads];
  __shared__ Acc red_M[kDwThreads];
  const int CG = kDwThreads / L;
  const int t = threadIdx.x;
  const int ci = t % CG;
  const int l = t / CG;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * CG + ci;
  double n = 0.0;
  Acc m = Acc(0), M = Acc(0);
  if (c < C) {
    for (int64_t j = l; j < chunks; j += static_cast<int64_t>(kFinBatch) * L) {
      Acc vn[kFinBatch], vm[kFinBatch], vM[kFinBatch];
#pragma unroll
      for (int u = 0; u < kFinBatch; ++u) {
        const int64_t ju = j + static_cast<int64_t>(u) * L;
        const bool ok = ju < chunks;
        const Acc* in = ws + ((ok ? ju : 0) * C + c) * 3;
        vn[u] = ok ? in[0] : Acc(0);  // a count of 0 is skipped by the merge
        vm[u] = ok ? in[1] : Acc(0);
        vM[u] = ok ? in[2] : Acc(0);
      }
#pragma unroll
      for (int u = 0; u < kFinBatch; ++u) {
        chan_merge_fin(n, m, M, static_cast<double>(vn[u]), vm[u], vM[u]);
      }
    }
  }
  red_n[t] = n;
  red_m[t] = m;
  red_M[t] = M;
  __syncthreads();
  for (int off = L / 2; off > 0; off /= 2) {
    if (l < off) {
      const int o = t + off * CG;
      double na = red_n[t];
      Acc ma = red_m[t], Ma = red_M[t];
      chan_merge_fin(na, ma, Ma, red_n[o], red_m[o], red_M[o]);
      red_n[t] = na;
      red_m[t] = ma;
      red_M[t] = Ma;
    }
    __syncthreads();
  }
  if (l == 0 && c < C) {
    const double nt = red_n[t];
    mean[c] = nt > 0.0 ? red_m[t] : Acc(0);
    var[c] = nt > 0.0 ? red_M[t] / static_cast<Acc>(nt) : Acc(0);
  }
}

// ------------------------------------------------------------------------------------------
// Launchers.

template <typename T, int S, int ACT, int VEC>
cudaError_t launch_fwd_nhwc(const DwFwdParams& p, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const DwShape& s = p.s;
  // One item per thread when they all fit in one wave of resident blocks; otherwise that wave,
  // each thread walking many items with its taps in registers. At least one thread per channel
  // vector (dw_fwd_nhwc_thread needs nthreads >= C / VEC).
  const int64_t CG = s.C / VEC;
  const int64_t min_blocks = (CG + kDwThreads - 1) / kDwThreads;
  if (min_blocks > (int64_t(1) << 20)) return cudaErrorInvalidConfiguration;
  return launch_persistent<dw_fwd_nhwc_kernel<T, S, ACT, VEC>>(
      dw_nhwc_pixel_items(s) * CG, min_blocks, stream, static_cast<const T*>(p.x),
      static_cast<const T*>(p.weight), static_cast<const Acc*>(p.scale),
      static_cast<const Acc*>(p.shift), static_cast<T*>(p.y), s);
}

template <typename T, int S, int ACT>
cudaError_t launch_fwd_nchw(const DwFwdParams& p, DType dtype, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const DwPlan g = dw_plan(DwKernel::kFwdTile, p.s, dtype);
  const int64_t tiles = g.tiles_h * g.tiles_w;
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles),
                  static_cast<unsigned>(g.cgroups < 65535 ? g.cgroups : 65535),
                  static_cast<unsigned>(p.s.N < 65535 ? p.s.N : 65535));
  dw_fwd_nchw_kernel<T, S, ACT><<<grid, kDwThreads, g.smem_bytes, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<const Acc*>(p.scale),
      static_cast<const Acc*>(p.shift), static_cast<T*>(p.y), p.s, g);
  return cudaGetLastError();
}

template <typename Acc>
cudaError_t launch_stats_finalize(const DwStatsParams& p, int64_t chunks, cudaStream_t stream) {
  return launch_finalize<dw_stats_finalize_kernel<Acc>, Acc>(
      p.workspace, chunks, p.s.C, 1, stream, static_cast<Acc*>(p.mean), static_cast<Acc*>(p.var));
}

template <typename T, int S, int VEC>
cudaError_t launch_stats_nhwc(const DwStatsParams& p, DType dtype, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const DwNhwcChunks g = dw_nhwc_chunks(p.s, dtype);
  const cudaError_t err = launch_persistent<dw_stats_nhwc_kernel<T, S, VEC>>(
      g.chunks * (p.s.C / VEC), 1, stream, static_cast<const T*>(p.x),
      static_cast<const T*>(p.weight), static_cast<Acc*>(p.workspace), p.s, g);
  if (err != cudaSuccess) return err;
  return launch_stats_finalize<Acc>(p, g.chunks, stream);
}

template <typename T, int S>
cudaError_t launch_stats_nchw(const DwStatsParams& p, DType dtype, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const DwPlan g = dw_plan(DwKernel::kStats, p.s, dtype);
  if (g.cgroups > 0x7fffffff || g.chunks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(g.cgroups), static_cast<unsigned>(g.chunks));
  dw_stats_nchw_kernel<T, S><<<grid, kDwThreads, g.smem_bytes, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<Acc*>(p.workspace),
      p.s, g);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_stats_finalize<Acc>(p, g.chunks, stream);
}

}  // namespace

cudaError_t dw_fwd(const DwFwdParams& p, DType dtype, cudaStream_t stream) {
  const DwShape& s = p.s;
  if (s.N * s.C * s.Ho * s.Wo == 0) return cudaSuccess;
  if (s.stride != 1 && s.stride != 2) return cudaErrorInvalidValue;
  DWSEP_DISPATCH_DTYPE(dtype, T, {
    constexpr int kVec = 16 / sizeof(T);
    const bool vec_ok = s.C % kVec == 0 && aligned16(p.x) && aligned16(p.y);
    DWSEP_DISPATCH_ACT(p.act, ACT, {
      if (s.nhwc) {
        return with_stride_vec<kVec>(s.stride, vec_ok, [&](auto S, auto V) {
          return launch_fwd_nhwc<T, decltype(S)::value, ACT, decltype(V)::value>(p, stream);
        });
      }
      return with_stride(s.stride, [&](auto S) {
        return launch_fwd_nchw<T, decltype(S)::value, ACT>(p, dtype, stream);
      });
    });
  });
  return cudaSuccess;
}

cudaError_t dw_stats(const DwStatsParams& p, DType dtype, cudaStream_t stream) {
  const DwShape& s = p.s;
  if (s.N * s.C * s.Ho * s.Wo == 0) return cudaSuccess;  // the glue writes mean = var = 0
  if (s.stride != 1 && s.stride != 2) return cudaErrorInvalidValue;
  DWSEP_DISPATCH_DTYPE(dtype, T, {
    if (s.nhwc) {
      constexpr int kVec = 16 / sizeof(T);
      const bool vec_ok = s.C % kVec == 0 && aligned16(p.x);
      return with_stride_vec<kVec>(s.stride, vec_ok, [&](auto S, auto V) {
        return launch_stats_nhwc<T, decltype(S)::value, decltype(V)::value>(p, dtype, stream);
      });
    }
    return with_stride(s.stride, [&](auto S) {
      return launch_stats_nchw<T, decltype(S)::value>(p, dtype, stream);
    });
  });
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace dwsep
