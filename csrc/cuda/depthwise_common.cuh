// Tile helpers shared by the depthwise forward and backward kernels (device code; included
// by depthwise_fwd.cu and depthwise_bwd.cu only).
#pragma once

#include "cuda/cuda_common.cuh"
#include "cuda/depthwise.h"

namespace dwsep {
namespace cuda {
namespace dwtile {

// Offset of element (n, c, h, w) of a dense (N, C, H, W) tensor in either layout.
template <bool NHWC>
__device__ __forceinline__ int64_t offset4(int64_t n, int64_t c, int64_t h, int64_t w, int64_t C,
                                           int64_t H, int64_t W) {
  return NHWC ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

// Index of (pixel pix, channel lane cl) in a staged tile of `npix` pixels x CB channels:
// channel-fastest for NHWC (threads of a warp take consecutive channels), planar for NCHW
// (threads of a warp take consecutive pixels). Either way a warp reads consecutive words.
template <bool NHWC>
__device__ __forceinline__ int sidx(int pix, int cl, int CB, int npix) {
  return NHWC ? pix * CB + cl : cl * npix + pix;
}

// Thread -> (channel lane cl, pixel lane pl), a bijection of [0, kDwThreads) onto
// [0, CB) x [0, PL) with PL = kDwThreads / CB. Consecutive threads take consecutive channels
// (NHWC) or consecutive pixels (NCHW), which are the contiguous dimension in global memory.
template <bool NHWC>
__device__ __forceinline__ void lanes(int CB, int& cl, int& pl) {
  const int tid = threadIdx.x;
  const int PL = kDwThreads / CB;
  cl = NHWC ? tid % CB : tid / PL;
  pl = NHWC ? tid / CB : tid % PL;
}

// Stages x[n, c, r0 + r, q0 + q] for r < XH, q < XW into xs (acc dtype), 0 outside the image
// or when the channel lane is past C (cok false). Called by all threads of the block.
template <bool NHWC, typename T, typename Acc>
__device__ __forceinline__ void load_x_tile(Acc* xs, const T* __restrict__ x, int64_t n, int64_t c,
                                            bool cok, const DwShape& s, int64_t r0, int64_t q0,
                                            int XH, int XW, int CB, int cl, int pl) {
  const int PL = kDwThreads / CB;
  const int npix = XH * XW;
  for (int p = pl; p < npix; p += PL) {
    const int r = p / XW;
    const int q = p - r * XW;
    const int64_t h = r0 + r;
    const int64_t w = q0 + q;
    Acc v = Acc(0);
    if (cok && h >= 0 && h < s.H && w >= 0 && w < s.W) {
      v = to_acc<Acc>(x[offset4<NHWC>(n, c, h, w, s.C, s.H, s.W)]);
    }
    xs[sidx<NHWC>(p, cl, CB, npix)] = v;
  }
}

// z at output (r, q) of the tile from a staged x tile whose row 0 is input row (ho0 - lo)*S - 1:
// the input row of tap i is (ho0 + r)*S + i - 1, i.e. tile row (r + lo)*S + i (same for cols).
template <int S, bool NHWC, typename Acc>
__device__ __forceinline__ Acc conv_from_tile(const Acc* xs, const Acc (&wr)[9], int r, int q,
                                              int lo, int XH, int XW, int CB, int cl) {
  const int npix = XH * XW;
  Acc z = Acc(0);
#pragma unroll
  for (int i = 0; i < 3; ++i) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const int pix = ((r + lo) * S + i) * XW + (q + lo) * S + j;
      z += xs[sidx<NHWC>(pix, cl, CB, npix)] * wr[i * 3 + j];
    }
  }
  return z;
}

inline unsigned grid_1d(int64_t work_items, int64_t per_block) {
  const int64_t blocks = (work_items + per_block - 1) / per_block;
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace dwtile
}  // namespace cuda
}  // namespace dwsep
