// dw_bwd_reduce and dw_bwd, channels_last, registers only: the work of one thread, as
// __host__ __device__ functions of (thread id, thread count), like the forward and statistics
// bodies in depthwise_fwd_nhwc.cuh (whose strip walker they share), and run on the host by
// tests/cuda_host/dw_nhwc_host.cu in the same way.
//
// dw_bwd runs as two kernels: g_conv (materialized in the acc dtype, with the weight-gradient
// partials) and then grad_x from g_conv. The second reads what other threads of the first
// wrote; the kernel boundary orders that on the GPU, and the host run finishes every thread of
// the first before starting the second. The shared-memory tile kernel they replace for this
// layout formed g_conv in shared memory instead, staging every tensor one element per thread.
#pragma once

#include "cuda/depthwise_fwd_nhwc.cuh"

namespace dwsep {
namespace cuda {

// Stage 1: for each (chunk j, channel vector) pair of dw_nhwc_chunks(s, dtype) = g (pair index
// j * CG + cg; thread t takes pairs t, t + nthreads, ...), the partial sums over the chunk's
// outputs of g_z = grad_y * act'(y) and of g_z * (z - mean) * invstd, z = conv(x) recomputed,
// written to ws[(j * C + c) * 2 + {0, 1}] (the layout dw_bwd_reduce_finalize_kernel folds).
template <typename T, int S, int VEC>
__host__ __device__ __forceinline__ void dw_bwd_reduce_nhwc_thread(
    const T* __restrict__ grad_y, const T* __restrict__ y, const T* __restrict__ x,
    const T* __restrict__ w, const typename AccOf<T>::type* __restrict__ mean,
    const typename AccOf<T>::type* __restrict__ invstd, typename AccOf<T>::type* ws,
    const DwShape& s, const DwNhwcChunks& g, int act, int64_t tid, int64_t nthreads) {
  using Acc = typename AccOf<T>::type;
  constexpr bool kPf = kNhwcPrefetch<(sizeof(T) >= 4)>;  // see kNhwcPrefetch
  using V = Vec<T, VEC>;
  constexpr int TWS = dw_nhwc_strip_width(S);
  const int64_t strips = (s.Wo + TWS - 1) / TWS;
  for_chunk_pairs<VEC>(
      s, g, tid, nthreads, [&](int64_t chunk, int64_t c0, int64_t it0, int64_t it1) {
        const NhwcTapRegs<Acc, VEC> taps(w, c0);
        Acc mu[VEC], is[VEC], s_gz[VEC], s_gzx[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          mu[v] = mean[c0 + v];
          is[v] = invstd[c0 + v];
          s_gz[v] = s_gzx[v] = Acc(0);
        }
        for (int64_t item = it0; item < it1; ++item) {
          const int64_t row = (item / strips) * s.Wo * s.C + c0;  // item / strips = n * Ho + ho
          nhwc_strip<T, S, VEC, kPf>(
              x, taps, s, c0, item, [&](int64_t wo, const Acc* z, const auto&) {
                const V yv = *reinterpret_cast<const V*>(y + row + wo * s.C);
                const V gv = *reinterpret_cast<const V*>(grad_y + row + wo * s.C);
#pragma unroll
                for (int v = 0; v < VEC; ++v) {
                  const Acc gz =
                      act_pass_rt(act, to_acc<Acc>(yv.v[v])) ? to_acc<Acc>(gv.v[v]) : Acc(0);
                  s_gz[v] += gz;
                  s_gzx[v] += gz * ((z[v] - mu[v]) * is[v]);
                }
              });
        }
        Acc* o = ws + (chunk * s.C + c0) * 2;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          o[2 * v] = s_gz[v];
          o[2 * v + 1] = s_gzx[v];
        }
      });
}

// dw_bwd stage 1: for each (chunk j, channel vector) pair of dw_nhwc_chunks(s, dtype) = g (as
// the reduction), g_conv = k * g_z + (use_z ? b * z + c : 0) at every output of the chunk,
// written to gconv (dense N x Ho x Wo x C, acc dtype), and the chunk's weight-gradient partials
// sum g_conv * x(tap) to ws[(j * C + ch) * 9 + tap] (the layout dw_bwd_finalize_kernel folds).
template <typename T, int S, int VEC>
__host__ __device__ __forceinline__ void dw_bwd_gconv_nhwc_thread(
    const T* __restrict__ grad_y, const T* __restrict__ y, const T* __restrict__ x,
    const T* __restrict__ w, const typename AccOf<T>::type* __restrict__ kv,
    const typename AccOf<T>::type* __restrict__ bv, const typename AccOf<T>::type* __restrict__ cv,
    typename AccOf<T>::type* __restrict__ gconv, typename AccOf<T>::type* __restrict__ ws,
    const DwShape& s, const DwNhwcChunks& g, int act, bool use_z, int64_t tid, int64_t nthreads) {
  using Acc = typename AccOf<T>::type;
  constexpr bool kPf = kNhwcPrefetch<true>;  // see kNhwcPrefetch
  using V = Vec<T, VEC>;
  using VA = Vec<Acc, VEC>;
  constexpr int TWS = dw_nhwc_strip_width(S);
  const int64_t strips = (s.Wo + TWS - 1) / TWS;
  for_chunk_pairs<VEC>(
      s, g, tid, nthreads, [&](int64_t chunk, int64_t c0, int64_t it0, int64_t it1) {
        const NhwcTapRegs<Acc, VEC> taps(w, c0);
        Acc kc[VEC], bc[VEC], cc[VEC], gw[9][VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          kc[v] = kv[c0 + v];
          bc[v] = use_z ? bv[c0 + v] : Acc(0);
          cc[v] = use_z ? cv[c0 + v] : Acc(0);
#pragma unroll
          for (int t = 0; t < 9; ++t) gw[t][v] = Acc(0);
        }
        for (int64_t item = it0; item < it1; ++item) {
          const int64_t row = (item / strips) * s.Wo * s.C + c0;  // item / strips = n * Ho + ho
          nhwc_strip<T, S, VEC, kPf>(
              x, taps, s, c0, item, [&](int64_t wo, const Acc* z, const auto& win) {
                const V yv = *reinterpret_cast<const V*>(y + row + wo * s.C);
                const V gv = *reinterpret_cast<const V*>(grad_y + row + wo * s.C);
                VA out;
#pragma unroll
                for (int v = 0; v < VEC; ++v) {
                  const Acc gz =
                      act_pass_rt(act, to_acc<Acc>(yv.v[v])) ? to_acc<Acc>(gv.v[v]) : Acc(0);
                  const Acc gc = use_z ? kc[v] * gz + (bc[v] * z[v] + cc[v]) : kc[v] * gz;
                  out.v[v] = gc;
#pragma unroll
                  for (int i = 0; i < 3; ++i) {
#pragma unroll
                    for (int j = 0; j < 3; ++j)
                      gw[i * 3 + j][v] += gc * to_acc<Acc>(win[i][j].v[v]);
                  }
                }
                *reinterpret_cast<VA*>(gconv + row + wo * s.C) = out;
              });
        }
        Acc* o = ws + (chunk * s.C + c0) * 9;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
#pragma unroll
          for (int t = 0; t < 9; ++t) o[9 * v + t] = gw[t][v];
        }
      });
}

// Work items of the input-gradient pass: strips of dw_nhwc_strip_width(1) input columns of one
// input row of one image.
__host__ __device__ inline int64_t dw_dx_nhwc_items(const DwShape& s) {
  constexpr int TWS = dw_nhwc_strip_width(1);
  return s.N * s.H * ((s.W + TWS - 1) / TWS);
}

// dw_bwd stage 2: grad_x[n, h, w, c] = sum over taps (i, j) and outputs (ho, wo) with
// ho * S + i - 1 = h, wo * S + j - 1 = w of weight[c, i, j] * gconv[n, ho, wo, c]. Thread t keeps
// channel vector t % CG and its taps for the whole launch and walks the items (input rows in
// strips, dw_dx_nhwc_items) t / CG, t / CG + workers, ..., as the forward. Stride 1: a 3x3 conv
// of gconv (Ho x Wo = H x W, zero outside) with the taps rotated by 180 degrees, through the
// forward's strip walker. Stride 2: input pixel (h, w) takes the taps of its parity class (one,
// two or four of them), gathered per pixel.
template <typename T, int S, int VEC>
__host__ __device__ __forceinline__ void dw_bwd_dx_nhwc_thread(
    const typename AccOf<T>::type* __restrict__ gconv, const T* __restrict__ w,
    T* __restrict__ grad_x, const DwShape& s, int64_t tid, int64_t nthreads) {
  using Acc = typename AccOf<T>::type;
  constexpr bool kPf = kNhwcPrefetch<false>;  // see kNhwcPrefetch
  using V = Vec<T, VEC>;
  using VA = Vec<Acc, VEC>;
  constexpr int TWS = dw_nhwc_strip_width(1);
  const int64_t CG = s.C / VEC;  // exact: VEC > 1 only when C % VEC == 0
  const int64_t workers = nthreads / CG;
  if (tid >= workers * CG) return;
  const int64_t c0 = (tid % CG) * VEC;
  const int64_t items = dw_dx_nhwc_items(s);
  const int64_t strips = (s.W + TWS - 1) / TWS;
  const NhwcTapRegs<Acc, VEC> taps(w, c0, /*flip=*/S == 1);
  DwShape gs = s;  // stride 1: gconv as the input of a stride-1 conv whose output is grad_x
  gs.H = s.Ho;
  gs.W = s.Wo;
  gs.Ho = s.H;
  gs.Wo = s.W;
  for (int64_t item = tid / CG; item < items; item += workers) {
    T* xrow = grad_x + (item / strips) * s.W * s.C + c0;  // item / strips = n * H + h
    if constexpr (S == 1) {
      const auto store = [&](int64_t wi, const Acc* z, const auto&) {
        V out;
#pragma unroll
        for (int v = 0; v < VEC; ++v) out.v[v] = from_acc<T>(z[v]);
        *reinterpret_cast<V*>(xrow + wi * s.C) = out;
      };
      nhwc_strip<Acc, 1, VEC, kPf>(gconv, taps, gs, c0, item, store);
    } else {
      const int64_t h = (item / strips) % s.H;
      const int64_t n = item / strips / s.H;
      const Acc* gimg = gconv + n * s.Ho * s.Wo * s.C + c0;
      const int64_t w0 = (item % strips) * TWS;
#pragma unroll
      for (int kk = 0; kk < TWS; ++kk) {
        const int64_t wi = w0 + kk;
        if (wi >= s.W) break;
        Acc acc[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = Acc(0);
#pragma unroll
        for (int i = 0; i < 3; ++i) {
          const int64_t hh = h + 1 - i;  // = 2 * ho when tap row i reaches input row h
          if (hh < 0 || (hh & 1) || hh / 2 >= s.Ho) continue;
#pragma unroll
          for (int j = 0; j < 3; ++j) {
            const int64_t ww = wi + 1 - j;
            if (ww < 0 || (ww & 1) || ww / 2 >= s.Wo) continue;
            const VA gv = *reinterpret_cast<const VA*>(gimg + ((hh / 2) * s.Wo + ww / 2) * s.C);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[v] += taps.w[i * 3 + j][v] * gv.v[v];
          }
        }
        V out;
#pragma unroll
        for (int v = 0; v < VEC; ++v) out.v[v] = from_acc<T>(acc[v]);
        *reinterpret_cast<V*>(xrow + wi * s.C) = out;
      }
    }
  }
}

}  // namespace cuda
}  // namespace dwsep
