// dw_bwd_reduce, channels_last, registers only: the work of one thread, as a __host__
// __device__ function of (thread id, thread count), like the forward and statistics bodies in
// depthwise_fwd_nhwc.cuh (whose strip walker it shares), and run on the host by
// tests/cuda_host/dw_nhwc_host.cu in the same way.
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
  using V = Vec<T, VEC>;
  const int64_t CG = s.C / VEC;  // exact: VEC > 1 only when C % VEC == 0
  constexpr int TWS = dw_nhwc_strip_width(S);
  const int64_t strips = (s.Wo + TWS - 1) / TWS;
  for (int64_t pair = tid; pair < g.chunks * CG; pair += nthreads) {
    const int64_t chunk = pair / CG;
    const int64_t c0 = (pair % CG) * VEC;
    const NhwcTapRegs<T, VEC> taps(w, c0);
    Acc mu[VEC], is[VEC], s_gz[VEC], s_gzx[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      mu[v] = mean[c0 + v];
      is[v] = invstd[c0 + v];
      s_gz[v] = s_gzx[v] = Acc(0);
    }
    const int64_t it0 = chunk * g.items_per_chunk;
    const int64_t it1 = it0 + g.items_per_chunk < g.items ? it0 + g.items_per_chunk : g.items;
    for (int64_t item = it0; item < it1; ++item) {
      const int64_t row = (item / strips) * s.Wo * s.C + c0;  // item / strips = n * Ho + ho
      nhwc_strip<T, S, VEC>(x, taps, s, c0, item, [&](int64_t wo, const Acc* z) {
        const V yv = *reinterpret_cast<const V*>(y + row + wo * s.C);
        const V gv = *reinterpret_cast<const V*>(grad_y + row + wo * s.C);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const Acc gz = act_pass_rt(act, to_acc<Acc>(yv.v[v])) ? to_acc<Acc>(gv.v[v]) : Acc(0);
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
  }
}

}  // namespace cuda
}  // namespace dwsep
