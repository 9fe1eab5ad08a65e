// dw_fwd, channels_last, registers only: the work of one thread, as a __host__ __device__
// function of (thread id, thread count). The kernel in depthwise_fwd.cu calls it with its grid
// index; tests/cuda_host/dw_fwd_nhwc_host.cu calls it on the host for every thread id in turn,
// which checks the indexing of this kernel (bounds under AddressSanitizer, every output written,
// values against the float64 reference) on a machine with no GPU. It uses no shared memory, no
// synchronization and no other thread's data, so running the threads one after another on the
// host computes exactly what the GPU computes.
//
// Each thread owns one channel vector (VEC channels) for the whole launch and loads its 9 x VEC
// taps and its folded scale/shift once. The weight is (C, 9), so those loads are strided
// scalars: done per work item (as up to session 11) they were 72 scalar loads against 30 vector
// loads of x for bf16, and the kernel ran at 0.93x eager on the H100 (session 3). Thread t takes
// channel vector t % CG and walks the pixel items (n, ho, strip of TWS output columns)
// t / CG, t / CG + workers, ... with workers = nthreads / CG; threads t >= workers * CG idle.
// Consecutive threads take consecutive channel vectors of the same pixels, so each warp load or
// store is a contiguous run of 16-byte vectors.
//
// Within an item the thread slides a 3x3 window of input vectors along W: win[i][a] holds input
// row ho*S + i - 1, column wo*S + a - 1 for the current output wo. Stepping wo -> wo+1 shifts
// the window by S columns: S = 1 reuses columns a = 1, 2 as 0, 1 and loads one new column;
// S = 2 reuses column 2 as 0 and loads two new columns.
//
// VEC = 16 / sizeof(T) needs C % VEC == 0 and 16-byte aligned x and y (every vector then starts
// at a multiple of VEC elements); VEC = 1 is the scalar fallback for any C.
#pragma once

#include "cuda/cuda_common.cuh"
#include "cuda/depthwise.h"

namespace dwsep {
namespace cuda {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Output columns per pixel item.
template <int S>
__host__ __device__ constexpr int nhwc_strip_width() {
  return S == 1 ? 8 : 4;
}

// Pixel items (n, ho, strip) of a shape.
template <int S>
__host__ __device__ inline int64_t nhwc_pixel_items(const DwShape& s) {
  constexpr int TWS = nhwc_strip_width<S>();
  return s.N * s.Ho * ((s.Wo + TWS - 1) / TWS);
}

template <typename T, int S, int ACT, int VEC>
__host__ __device__ __forceinline__ void dw_fwd_nhwc_thread(
    const T* __restrict__ x, const T* __restrict__ w,
    const typename AccOf<T>::type* __restrict__ scale,
    const typename AccOf<T>::type* __restrict__ shift, T* __restrict__ y, const DwShape& s,
    int64_t tid, int64_t nthreads) {
  using Acc = typename AccOf<T>::type;
  using V = Vec<T, VEC>;
  constexpr int TWS = nhwc_strip_width<S>();
  const int64_t CG = s.C / VEC;  // exact: VEC > 1 only when C % VEC == 0
  const int64_t workers = nthreads / CG;
  if (tid >= workers * CG) return;
  const int64_t c0 = (tid % CG) * VEC;
  const int64_t strips = (s.Wo + TWS - 1) / TWS;
  const int64_t items = nhwc_pixel_items<S>(s);

  Acc wr[9][VEC], sc[VEC], sh[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
#pragma unroll
    for (int k = 0; k < 9; ++k) wr[k][v] = to_acc<Acc>(w[(c0 + v) * 9 + k]);
    sc[v] = scale[c0 + v];
    sh[v] = shift[c0 + v];
  }
  V zero;
#pragma unroll
  for (int v = 0; v < VEC; ++v) zero.v[v] = from_acc<T>(Acc(0));

  for (int64_t item = tid / CG; item < items; item += workers) {
    const int64_t strip = item % strips;
    const int64_t ho = (item / strips) % s.Ho;
    const int64_t n = item / strips / s.Ho;

    // Row pointers (at column 0, channel c0) of the three input rows; rows outside [0, H)
    // are zero padding and never dereferenced.
    const T* rowp[3];
    bool rowok[3];
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      const int64_t hi = ho * S + i - 1;
      rowok[i] = hi >= 0 && hi < s.H;
      rowp[i] = x + ((n * s.H + (rowok[i] ? hi : 0)) * s.W) * s.C + c0;
    }
    // Loads input column wi of the three rows into window column a.
    V win[3][3];
    auto load_col = [&](int a, int64_t wi) {
      const bool colok = wi >= 0 && wi < s.W;
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        win[i][a] = (rowok[i] && colok) ? *reinterpret_cast<const V*>(rowp[i] + wi * s.C) : zero;
      }
    };

    T* yrow = y + ((n * s.Ho + ho) * s.Wo) * s.C + c0;
    const int64_t wo0 = strip * TWS;
#pragma unroll
    for (int kk = 0; kk < TWS; ++kk) {
      const int64_t wo = wo0 + kk;
      if (wo >= s.Wo) break;
      if (kk == 0) {
        load_col(0, wo * S - 1);
        load_col(1, wo * S);
        load_col(2, wo * S + 1);
      } else if (S == 1) {
#pragma unroll
        for (int i = 0; i < 3; ++i) {
          win[i][0] = win[i][1];
          win[i][1] = win[i][2];
        }
        load_col(2, wo * S + 1);
      } else {
#pragma unroll
        for (int i = 0; i < 3; ++i) win[i][0] = win[i][2];
        load_col(1, wo * S);
        load_col(2, wo * S + 1);
      }
      V out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        Acc z = Acc(0);
#pragma unroll
        for (int i = 0; i < 3; ++i) {
#pragma unroll
          for (int a = 0; a < 3; ++a) z += to_acc<Acc>(win[i][a].v[v]) * wr[i * 3 + a][v];
        }
        out.v[v] = from_acc<T>(apply_act<ACT>(z * sc[v] + sh[v]));
      }
      *reinterpret_cast<V*>(yrow + wo * s.C) = out;
    }
  }
}

}  // namespace cuda
}  // namespace dwsep
