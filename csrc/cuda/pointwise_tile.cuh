// Global -> shared operand tile loads of the pointwise GEMM (pointwise_fwd.cu), one pipeline
// stage at a time. Host-callable too: on the host cp_async is a plain copy with zero fill, so
// tests/cuda_host runs load_tile for every thread of a block and checks the shared-memory image
// (tests/test_cuda_host.py::test_pw_load_tile_matches_reference).
//
// Both operand layouts load the same way: a tile of R rows x CPR 16-byte chunks (K-major: rows
// m or n, chunks along k; M/N-major: rows k, chunks along m or n). Row r of the tile starts at
// g + r * ld in global memory and at s + r * pitch in shared memory; only its first rows_left
// rows and the first cols_left elements of each row exist, everything else is zero-filled.
// W is the copy width in bytes, the widest to which the operand's base pointer, ld and batch
// stride are all aligned (picked on the host: 16 when VEC): 16, 8 or 4 bytes use cp.async (so a
// row stride that is not a multiple of 16 bytes, e.g. an NCHW plane of 196 fp16 or 49 fp32
// values, still loads asynchronously), 0 loads element-wise through registers (16-bit types
// with 2-byte-aligned rows, e.g. an NCHW plane of 49 fp16 values): all the loads of a thread's
// chunks are issued before their 16-byte shared stores, so they overlap.
#pragma once

#include <cstring>

#include "cuda/cuda_common.cuh"

namespace dwsep {
namespace cuda {

#ifdef __CUDACC__
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Async copy of W = 16, 8 or 4 bytes global -> shared; bytes past src_bytes (0..W) are
// zero-filled. src and dst must be W-aligned (src even when src_bytes is 0). 16 bytes go through
// L2 only (.cg exists for 16 bytes only), 8 and 4 bytes through L1 (.ca).
template <int W>
__host__ __device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  static_assert(W == 16 || W == 8 || W == 4, "cp.async copies 4, 8 or 16 bytes");
#ifdef __CUDA_ARCH__
  if constexpr (W == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "n"(W), "r"(src_bytes)
                 : "memory");
  }
#else
  if (src_bytes > 0) std::memcpy(dst, src, static_cast<size_t>(src_bytes));
  std::memset(static_cast<char*>(dst) + src_bytes, 0, static_cast<size_t>(W - src_bytes));
#endif
}

template <typename T>
__host__ __device__ __forceinline__ T zero_value() {
  return from_acc<T>(typename AccOf<T>::type(0));
}

__host__ __device__ __forceinline__ int clamp_int(int v, int lo, int hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// One 16-byte chunk at d: its first nvalid (0..V) elements from src, the rest zero, in copies of
// W bytes. `safe` is a valid W-aligned global address, passed to the copies that read nothing.
template <typename T, int W>
__host__ __device__ __forceinline__ void load_chunk(T* d, const T* src, const T* safe, int nvalid) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  constexpr int E = W / static_cast<int>(sizeof(T));  // elements per copy
  static_assert(E >= 1 && V % E == 0, "the copy width must be a multiple of the element size");
#pragma unroll
  for (int q = 0; q < V / E; ++q) {
    const int n = clamp_int(nvalid - q * E, 0, E);
    cp_async<W>(d + q * E, n > 0 ? src + q * E : safe, n * static_cast<int>(sizeof(T)));
  }
}

// Thread tid's chunks are ci = tid + it * NT (it < ITERS): with NT a multiple of CPR they all
// sit in the same column c = (tid % CPR) * V, RS = NT / CPR rows apart, so the thread computes
// its global row pointer, shared offset and column extent once and steps by RS rows per chunk
// (the session-3 form recomputed a 64-bit row offset, the extents and the zero-fill clamps for
// every chunk of every k-tile: ~50 instructions per 16-byte copy in the sm_90 SASS).
template <typename T, int R, int CPR, int NT, int W>
__host__ __device__ __forceinline__ void load_tile(T* s, int pitch, const T* g, int64_t ld,
                                                   int rows_left, int cols_left, int tid) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  constexpr int ITERS = R * CPR / NT;
  constexpr int RS = NT / CPR;
  static_assert((R * CPR) % NT == 0 && NT % CPR == 0,
                "chunks must divide evenly among threads, a thread's chunks in one column");
  const int r0 = tid / CPR;
  const int c = (tid % CPR) * V;
  const int cvalid = clamp_int(cols_left - c, 0, V);  // the same for every chunk of the thread
  const T* src = g + r0 * ld + c;
  const int64_t step = RS * ld;
  T* d = s + r0 * pitch + c;
  if constexpr (W == 0) {
    // Element-wise: every load of the thread's ITERS chunks first, then the shared stores, so
    // one global round trip per stage instead of one per chunk.
    T pk[ITERS][V];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int nvalid = r0 + it * RS < rows_left ? cvalid : 0;
      const T* p = src + it * step;
#pragma unroll
      for (int e = 0; e < V; ++e) pk[it][e] = e < nvalid ? p[e] : zero_value<T>();
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it)
      *reinterpret_cast<uint4*>(d + it * RS * pitch) = pack16<T>(pk[it]);
  } else {
    // Rolled (unroll 1): unrolled, the big bf16 GEMM spills under its 128-register cap (sm_90).
    // The row pointers advance by one add per chunk (no 64-bit multiply in the loop).
#pragma unroll 1
    for (int it = 0, r = r0; it < ITERS; ++it, r += RS, src += step, d += RS * pitch)
      load_chunk<T, W>(d, src, g, r < rows_left ? cvalid : 0);
  }
}

}  // namespace cuda
}  // namespace dwsep
