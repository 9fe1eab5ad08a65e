// dw_fwd and dw_stats, channels_last, registers only: the work of one thread, as __host__
// __device__ functions of (thread id, thread count). The kernels in depthwise_fwd.cu call them
// with their grid index; tests/cuda_host/dw_nhwc_host.cu calls them on the host for every
// thread id in turn, which checks their indexing (bounds under AddressSanitizer, every output
// written) and arithmetic against the float64 reference on a machine with no GPU. They use no
// shared memory, no synchronization and no other thread's data, so running the threads one
// after another on the host computes what the GPU computes.
//
// A thread owns one channel vector (VEC channels) at a time and keeps its 9 x VEC taps in
// registers while it walks many pixel items (n, ho, strip of TWS output columns; depthwise.h).
// The weight is (C, 9), so loading the taps is VEC x 9 strided scalar loads: done per pixel
// item (as up to session 11) that was 72 scalar loads against 30 vector loads of x for bf16,
// and the forward ran at 0.93x eager on the H100 (session 3). Consecutive threads take
// consecutive channel vectors of the same pixels, so each warp load or store is a contiguous run
// of 16-byte vectors.
//
// VEC = 16 / sizeof(T) needs C % VEC == 0 and 16-byte aligned x (and y); VEC = 1 is the scalar
// path for any C.
#pragma once

#include "cuda/cuda_common.cuh"
#include "cuda/depthwise.h"

namespace dwsep {
namespace cuda {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// The taps of channels [c0, c0 + VEC), in registers (flip: rotated by 180 degrees, tap k
// holding weight tap 8 - k, for the stride-1 input gradient).
template <typename Acc, int VEC>
struct NhwcTapRegs {
  Acc w[9][VEC];

  template <typename Tw>
  __host__ __device__ __forceinline__ NhwcTapRegs(const Tw* __restrict__ weight, int64_t c0,
                                                  bool flip = false) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
#pragma unroll
      for (int k = 0; k < 9; ++k) w[k][v] = to_acc<Acc>(weight[(c0 + v) * 9 + (flip ? 8 - k : k)]);
    }
  }
};

// z of channels [c0, c0 + VEC) at every output of pixel item `item`, in column order:
// f(wo, z, win) with z an Acc[VEC] and win the input window below. A 3x3 window of input vectors
// slides along W: win[i][a] holds input row ho*S + i - 1, column wo*S + a - 1 for the current
// output wo. Stepping wo -> wo+1 shifts it by S columns: S = 1 reuses columns a = 1, 2 as 0, 1 and
// takes one new column; S = 2 reuses column 2 as 0 and takes two new columns.
//
// PREFETCH: the new columns of output wo + 1 are loaded before z of wo is computed, so a
// thread's next loads are in flight during its arithmetic (S more 16-byte registers sets). Without
// it each step waits for its own loads: the session-12 SASS of the bf16 forward issues three
// 16-byte loads, waits, then ~210 instructions of arithmetic per output column, with one block
// (8 warps) per SM to hide the latency.
template <typename T, int S, int VEC, bool PREFETCH = true, class F>
__host__ __device__ __forceinline__ void nhwc_strip(
    const T* __restrict__ x, const NhwcTapRegs<typename AccOf<T>::type, VEC>& taps,
    const DwShape& s, int64_t c0, int64_t item, F&& f) {
  using Acc = typename AccOf<T>::type;
  using V = Vec<T, VEC>;
  constexpr int TWS = dw_nhwc_strip_width(S);
  const int64_t strips = (s.Wo + TWS - 1) / TWS;
  const int64_t strip = item % strips;
  const int64_t ho = (item / strips) % s.Ho;
  const int64_t n = item / strips / s.Ho;
  V zero;
#pragma unroll
  for (int v = 0; v < VEC; ++v) zero.v[v] = from_acc<T>(Acc(0));

  // Row pointers (at column 0, channel c0) of the three input rows; rows outside [0, H) are
  // zero padding and never dereferenced.
  const T* rowp[3];
  bool rowok[3];
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const int64_t hi = ho * S + i - 1;
    rowok[i] = hi >= 0 && hi < s.H;
    rowp[i] = x + ((n * s.H + (rowok[i] ? hi : 0)) * s.W) * s.C + c0;
  }
  // Input column wi of the three rows (zero outside the image).
  auto load_col = [&](V(&dst)[3], int64_t wi) {
    const bool colok = wi >= 0 && wi < s.W;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      dst[i] = (rowok[i] && colok) ? *reinterpret_cast<const V*>(rowp[i] + wi * s.C) : zero;
    }
  };
  // The S new columns of output wo: S = 1 column wo + 1; S = 2 columns 2wo and 2wo + 1.
  V nxt[S][3];
  auto load_new = [&](int64_t wo) {
    if (S == 2) load_col(nxt[0], wo * S);
    load_col(nxt[S - 1], wo * S + 1);
  };

  V win[3][3];
  const int64_t wo0 = strip * TWS;
  {
    V c0v[3], c1v[3], c2v[3];
    load_col(c0v, wo0 * S - 1);
    load_col(c1v, wo0 * S);
    load_col(c2v, wo0 * S + 1);
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      win[i][0] = c0v[i];
      win[i][1] = c1v[i];
      win[i][2] = c2v[i];
    }
  }
#pragma unroll
  for (int kk = 0; kk < TWS; ++kk) {
    const int64_t wo = wo0 + kk;
    if (wo >= s.Wo) break;
    if (kk > 0) {
      if (!PREFETCH) load_new(wo);
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        if (S == 1) {
          win[i][0] = win[i][1];
          win[i][1] = win[i][2];
          win[i][2] = nxt[0][i];
        } else {
          win[i][0] = win[i][2];
          win[i][1] = nxt[0][i];
          win[i][2] = nxt[S - 1][i];
        }
      }
    }
    // Columns past the image are not loaded (load_col's bounds), so this reads nothing outside x
    // even when wo + 1 is past the row.
    if (PREFETCH && kk + 1 < TWS) load_new(wo + 1);
    Acc z[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      Acc a = Acc(0);
#pragma unroll
      for (int i = 0; i < 3; ++i) {
#pragma unroll
        for (int j = 0; j < 3; ++j) a += to_acc<Acc>(win[i][j].v[v]) * taps.w[i * 3 + j][v];
      }
      z[v] = a;
    }
    f(wo, z, win);
  }
}

// Which bodies prefetch (nhwc_strip's PREFETCH), from the sm_90 ptxas report (session 13): only
// where the kernel needs more than 128 registers without it, so that it runs one 256-thread
// block per SM either way, and stays spill-free with it:
//   forward, statistics: the 16-bit types (fp32 and fp64 fit in 128 registers without it, two
//                        blocks per SM, and need 140-156 with it)
//   backward reduction:  fp32 and fp64 (the 16-bit kernels, at 234-246 without, would spill)
//   g_conv:              every type (184-209 without, 203-222 with)
//   dx (stride 1):       none (116-118 without, 130-132 with)
// Building with -DDWSEP_DW_NHWC_PREFETCH=0 (e.g. NVCC_APPEND_FLAGS) turns it off everywhere, for
// an A/B measurement.
#ifndef DWSEP_DW_NHWC_PREFETCH
#define DWSEP_DW_NHWC_PREFETCH 1
#endif
template <bool kWanted>
constexpr bool kNhwcPrefetch = DWSEP_DW_NHWC_PREFETCH != 0 && kWanted;

// The (chunk, channel vector) pairs of the partition g = dw_nhwc_chunks(s, dtype) that thread
// tid of nthreads takes in the reductions: pair index j * CG + cg (CG = C / VEC), pairs tid,
// tid + nthreads, ...; f(chunk, c0, it0, it1) with c0 the vector's first channel and
// [it0, it1) the chunk's pixel items.
template <int VEC, class F>
__host__ __device__ __forceinline__ void for_chunk_pairs(const DwShape& s, const DwNhwcChunks& g,
                                                         int64_t tid, int64_t nthreads, F&& f) {
  const int64_t CG = s.C / VEC;  // exact: VEC > 1 only when C % VEC == 0
  for (int64_t pair = tid; pair < g.chunks * CG; pair += nthreads) {
    const int64_t chunk = pair / CG;
    const int64_t it0 = chunk * g.items_per_chunk;
    const int64_t it1 = it0 + g.items_per_chunk < g.items ? it0 + g.items_per_chunk : g.items;
    f(chunk, (pair % CG) * VEC, it0, it1);
  }
}

// dw_fwd: y = act(z * scale + shift). Thread t takes channel vector t % CG (CG = C / VEC) for the
// whole launch, with its taps, scale and shift loaded once, and the pixel items t / CG,
// t / CG + workers, ... (workers = nthreads / CG; threads t >= workers * CG idle). The launcher
// gives at least CG threads.
template <typename T, int S, int ACT, int VEC>
__host__ __device__ __forceinline__ void dw_fwd_nhwc_thread(
    const T* __restrict__ x, const T* __restrict__ w,
    const typename AccOf<T>::type* __restrict__ scale,
    const typename AccOf<T>::type* __restrict__ shift, T* __restrict__ y, const DwShape& s,
    int64_t tid, int64_t nthreads) {
  using Acc = typename AccOf<T>::type;
  constexpr bool kPf = kNhwcPrefetch<sizeof(T) == 2>;  // see kNhwcPrefetch
  using V = Vec<T, VEC>;
  const int64_t CG = s.C / VEC;  // exact: VEC > 1 only when C % VEC == 0
  const int64_t workers = nthreads / CG;
  if (tid >= workers * CG) return;
  const int64_t c0 = (tid % CG) * VEC;
  const int64_t items = dw_nhwc_pixel_items(s);
  const NhwcTapRegs<Acc, VEC> taps(w, c0);
  Acc sc[VEC], sh[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sc[v] = scale[c0 + v];
    sh[v] = shift[c0 + v];
  }
  constexpr int TWS = dw_nhwc_strip_width(S);
  const int64_t strips = (s.Wo + TWS - 1) / TWS;
  for (int64_t item = tid / CG; item < items; item += workers) {
    T* yrow = y + ((item / strips) * s.Wo) * s.C + c0;  // item / strips = n * Ho + ho
    nhwc_strip<T, S, VEC, kPf>(x, taps, s, c0, item, [&](int64_t wo, const Acc* z, const auto&) {
      V out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) out.v[v] = from_acc<T>(apply_act<ACT>(z[v] * sc[v] + sh[v]));
      *reinterpret_cast<V*>(yrow + wo * s.C) = out;
    });
  }
}

// dw_stats, stage 1: for each (chunk j, channel vector) pair of the partition
// dw_nhwc_chunks(s, dtype) = g (pair index j * CG + cg; thread t takes pairs t,
// t + nthreads, ...), the count, mean and M2 of z over the chunk's outputs, Welford in Acc (one
// reciprocal per output pixel, shared by the VEC channels), written to
// ws[(j * C + c) * 3 + {0, 1, 2}]. dw_stats_finalize_kernel merges the chunks in a fixed order.
template <typename T, int S, int VEC>
__host__ __device__ __forceinline__ void dw_stats_nhwc_thread(
    const T* __restrict__ x, const T* __restrict__ w, typename AccOf<T>::type* ws, const DwShape& s,
    const DwNhwcChunks& g, int64_t tid, int64_t nthreads) {
  using Acc = typename AccOf<T>::type;
  constexpr bool kPf = kNhwcPrefetch<sizeof(T) == 2>;  // see kNhwcPrefetch
  for_chunk_pairs<VEC>(
      s, g, tid, nthreads, [&](int64_t chunk, int64_t c0, int64_t it0, int64_t it1) {
        const NhwcTapRegs<Acc, VEC> taps(w, c0);
        Acc cnt = Acc(0), mean[VEC], m2[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) mean[v] = m2[v] = Acc(0);
        for (int64_t item = it0; item < it1; ++item) {
          nhwc_strip<T, S, VEC, kPf>(x, taps, s, c0, item, [&](int64_t, const Acc* z, const auto&) {
            cnt += Acc(1);
            const Acc r = Acc(1) / cnt;
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const Acc d = z[v] - mean[v];
              mean[v] += d * r;
              m2[v] += d * (z[v] - mean[v]);
            }
          });
        }
        Acc* o = ws + (chunk * s.C + c0) * 3;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          o[3 * v] = cnt;
          o[3 * v + 1] = mean[v];
          o[3 * v + 2] = m2[v];
        }
      });
}

}  // namespace cuda
}  // namespace dwsep
