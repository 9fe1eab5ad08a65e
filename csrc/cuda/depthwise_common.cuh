// Tile helpers shared by the depthwise forward and backward kernels (device code; included
// by depthwise_fwd.cu and depthwise_bwd.cu only).
#pragma once

#include "cuda/cuda_common.cuh"
#include "cuda/depthwise.h"

#include <atomic>
#include <type_traits>

namespace dwsep {
namespace cuda {
namespace dwtile {

// These helpers serve the NCHW shared-memory tile kernels (the channels_last kernels use no
// shared memory: depthwise_fwd_nhwc.cuh, depthwise_bwd_nhwc.cuh).

// Offset of element (n, c, h, w) of a dense NCHW tensor.
__device__ __forceinline__ int64_t offset_nchw(int64_t n, int64_t c, int64_t h, int64_t w,
                                               int64_t C, int64_t H, int64_t W) {
  return ((n * C + c) * H + h) * W + w;
}

// Index of (pixel pix, channel lane cl) in a staged tile of `npix` pixels x CB planes, planar:
// the threads of a warp take consecutive pixels and so read consecutive words.
__device__ __forceinline__ int sidx(int pix, int cl, int npix) {
  return cl * npix + pix;
}

// Thread -> (channel lane cl, pixel lane pl), a bijection of [0, kDwThreads) onto
// [0, CB) x [0, PL) with PL = kDwThreads / CB. Consecutive threads take consecutive pixels,
// the contiguous dimension in global memory.
__device__ __forceinline__ void lanes(int CB, int& cl, int& pl) {
  const int tid = threadIdx.x;
  const int PL = kDwThreads / CB;
  cl = tid / PL;
  pl = tid % PL;
}

// Stages x[n, c, r0 + r, q0 + q] for r < XH, q < XW into xs (acc dtype), 0 outside the image
// or when the channel lane is past C (cok false). Called by all threads of the block. Each
// thread first loads up to kTileBatch values into registers (predicated, 0 where out of range)
// and then stores them, so its global loads are in flight together.
constexpr int kTileBatch = 4;

template <typename T, typename Acc>
__device__ __forceinline__ void load_x_tile(Acc* xs, const T* __restrict__ x, int64_t n, int64_t c,
                                            bool cok, const DwShape& s, int64_t r0, int64_t q0,
                                            int XH, int XW, int CB, int cl, int pl) {
  const int PL = kDwThreads / CB;
  const int npix = XH * XW;
  for (int p0 = pl; p0 < npix; p0 += kTileBatch * PL) {
    Acc v[kTileBatch];
#pragma unroll
    for (int u = 0; u < kTileBatch; ++u) {
      const int p = p0 + u * PL;
      const int r = p / XW;
      const int q = p - r * XW;
      const int64_t h = r0 + r;
      const int64_t w = q0 + q;
      const bool ok = cok && p < npix && h >= 0 && h < s.H && w >= 0 && w < s.W;
      v[u] = ok ? to_acc<Acc>(x[offset_nchw(n, c, h, w, s.C, s.H, s.W)]) : Acc(0);
    }
#pragma unroll
    for (int u = 0; u < kTileBatch; ++u) {
      const int p = p0 + u * PL;
      if (p < npix) xs[sidx(p, cl, npix)] = v[u];
    }
  }
}

// z at output (r, q) of the tile from a staged x tile whose row 0 is input row (ho0 - lo)*S - 1:
// the input row of tap i is (ho0 + r)*S + i - 1, i.e. tile row (r + lo)*S + i (same for cols).
template <int S, typename Acc>
__device__ __forceinline__ Acc conv_from_tile(const Acc* xs, const Acc (&wr)[9], int r, int q,
                                              int lo, int XH, int XW, int cl) {
  const int npix = XH * XW;
  Acc z = Acc(0);
#pragma unroll
  for (int i = 0; i < 3; ++i) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const int pix = ((r + lo) * S + i) * XW + (q + lo) * S + j;
      z += xs[sidx(pix, cl, npix)] * wr[i * 3 + j];
    }
  }
  return z;
}

// ------------------------------------------------------------------------------------------
// Finalize reductions: fold a [chunks][E] table of per-chunk partials (column e of chunk j at
// ws[j*E + e]) over the chunks, in parallel but in a fixed order. A block of kDwThreads takes
// CG = kDwThreads / L consecutive columns with L lanes each (thread t: column t % CG, lane
// t / CG, so a warp reads consecutive columns of one chunk). Lane l folds chunks l, l + L,
// l + 2L, ... in that order, then a fixed-shape shared-memory tree combines the L lane results
// (lane l += lane l + off for off = L/2, ..., 1). L is a power of two that depends on `chunks`
// only, so the result is bitwise reproducible run to run, independent of scheduling.
constexpr int kFinChunksPerLane = 8;  // target sequential chunks per lane
constexpr int kFinBatch = 4;          // loads a lane issues before folding them

inline int finalize_lanes(int64_t chunks) {
  int L = 1;
  while (L < kDwThreads && static_cast<int64_t>(L) * kFinChunksPerLane < chunks) L *= 2;
  return L;
}

inline unsigned finalize_blocks(int64_t E, int L) {
  const int64_t cg = kDwThreads / L;
  const int64_t blocks = (E + cg - 1) / cg;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);  // columns e >= E do nothing
}

// Sum over chunks of column e = blockIdx.x * CG + threadIdx.x % CG (in Acc); valid in lane 0
// (threadIdx.x < CG) of columns e < E. Every thread of the block must call it (barriers).
template <typename Acc>
__device__ __forceinline__ Acc finalize_column_sum(const Acc* __restrict__ ws, int64_t chunks,
                                                   int64_t E, int L, int64_t& e) {
  __shared__ Acc red[kDwThreads];
  const int CG = kDwThreads / L;
  const int t = threadIdx.x;
  const int ci = t % CG;
  const int l = t / CG;
  e = static_cast<int64_t>(blockIdx.x) * CG + ci;
  Acc a = Acc(0);
  if (e < E) {
    for (int64_t j = l; j < chunks; j += static_cast<int64_t>(kFinBatch) * L) {
      Acc v[kFinBatch];
#pragma unroll
      for (int u = 0; u < kFinBatch; ++u) {
        const int64_t ju = j + static_cast<int64_t>(u) * L;
        v[u] = ju < chunks ? ws[ju * E + e] : Acc(0);
      }
#pragma unroll
      for (int u = 0; u < kFinBatch; ++u) {
        if (j + static_cast<int64_t>(u) * L < chunks) a += v[u];
      }
    }
  }
  red[t] = a;
  __syncthreads();
  for (int off = L / 2; off > 0; off /= 2) {
    if (l < off) red[t] = red[t] + red[t + off * CG];
    __syncthreads();
  }
  return red[t];
}

// Blocks of kDwThreads threads of `kernel` resident at once on the current device (SMs x
// blocks per SM), or 0 if the runtime cannot say. Queried once per device and cached in
// cache[device] (a static array of the caller, one per kernel instantiation).
constexpr int kMaxCachedDevices = 64;

template <typename Kernel>
inline int64_t resident_blocks(Kernel kernel, std::atomic<int>* cache) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (dev >= 0 && dev < kMaxCachedDevices) {
    const int hit = cache[dev].load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kDwThreads, 0) !=
          cudaSuccess) {
    cudaGetLastError();  // clear the error: the caller falls back to one item per thread
    return 0;
  }
  const int wave = sms * (per_sm > 0 ? per_sm : 1);
  if (dev >= 0 && dev < kMaxCachedDevices) cache[dev].store(wave, std::memory_order_relaxed);
  return wave;
}

// Blocks for a persistent launch of `kernel` over `work` thread-sized pieces: one per
// kDwThreads pieces while that fits in one wave of resident blocks, else one wave (the threads
// then loop), never fewer than min_blocks and at most 2^20 (the kernels grid-stride).
template <typename Kernel>
inline unsigned persistent_grid(int64_t work, int64_t min_blocks, Kernel kernel,
                                std::atomic<int>* cache) {
  int64_t blocks = (work + kDwThreads - 1) / kDwThreads;
  const int64_t wave = resident_blocks(kernel, cache);
  if (wave > 0 && blocks > wave) blocks = wave;
  if (blocks < min_blocks) blocks = min_blocks;
  if (blocks < 1) blocks = 1;
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
  return static_cast<unsigned>(blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// Launches kKernel (a __global__ function of kDwThreads-thread blocks) on persistent_grid(work,
// min_blocks), with its resident-wave count cached per kernel and device.
template <auto kKernel, typename... Args>
cudaError_t launch_persistent(int64_t work, int64_t min_blocks, cudaStream_t stream, Args... args) {
  static std::atomic<int> cached_wave[kMaxCachedDevices];  // 0 = not yet queried
  const unsigned blocks = persistent_grid(work, min_blocks, kKernel, cached_wave);
  kKernel<<<blocks, kDwThreads, 0, stream>>>(args...);
  return cudaGetLastError();
}

// Launches a finalize kernel kKernel(ws, chunks, C, L, outs...) that folds a [chunks][E]
// workspace table (E = cols_per_channel * C columns, finalize_column_sum's layout) over the
// chunks with finalize_lanes(chunks) lanes per column.
template <auto kKernel, typename Acc, typename... Outs>
cudaError_t launch_finalize(const void* ws, int64_t chunks, int64_t C, int64_t cols_per_channel,
                            cudaStream_t stream, Outs... outs) {
  const int L = finalize_lanes(chunks);
  kKernel<<<finalize_blocks(cols_per_channel * C, L), kDwThreads, 0, stream>>>(
      static_cast<const Acc*>(ws), chunks, C, L, outs...);
  return cudaGetLastError();
}

// Compile-time dispatch of the launchers: f(IntC<S>{}) for stride S in {1, 2}, and
// f(IntC<S>{}, IntC<V>{}) with V = kVec channels per thread where the 16-byte path applies
// (vec_ok), else 1. The callers have rejected other strides.
template <int V>
using IntC = std::integral_constant<int, V>;

template <class F>
cudaError_t with_stride(int stride, F&& f) {
  return stride == 1 ? f(IntC<1>{}) : f(IntC<2>{});
}

template <int kVec, class F>
cudaError_t with_stride_vec(int stride, bool vec_ok, F&& f) {
  return with_stride(stride, [&](auto S) { return vec_ok ? f(S, IntC<kVec>{}) : f(S, IntC<1>{}); });
}

}  // namespace dwtile
}  // namespace cuda
}  // namespace dwsep
