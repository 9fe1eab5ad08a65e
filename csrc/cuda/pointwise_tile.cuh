// Global -> shared operand tile loads of the pointwise GEMM (pointwise_fwd.cu), one pipeline
// stage at a time, and the k-walk that positions them. Host-callable too: on the host cp.async
// is a plain copy with zero fill, so tests/cuda_host runs load_tile (one tile) and
// OperandStream + KWalk (a slice's k-tiles, across batches) for every thread of a block and
// checks the shared-memory images (tests/test_cuda_host.py::test_pw_load_tile_matches_reference,
// ::test_pw_k_walk_matches_reference).
//
// Both operand layouts load the same way: a tile of R rows x CPR 16-byte chunks (K-major: rows
// m or n, chunks along k; M/N-major: rows k, chunks along m or n). Row r of the tile starts at
// g + r * ld in global memory and at s + r * pitch in shared memory; only its first rows_left
// rows and the first cols_left elements of each row exist, everything else is zero-filled.
// W is the copy width in bytes, the widest to which the operand's base pointer, ld and batch
// stride are all aligned (picked on the host; VEC: 16 with every chunk full or empty, the
// predicated copies of kFullChunks): 16, 8 or 4 bytes use cp.async (so a
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

// Async copy of 16 bytes global -> shared, or 16 zero bytes when !valid (cp.async's ignore-src
// predicate: no source-size arithmetic, which the zero-fill form above costs per copy in SASS).
// src must be a valid 16-byte-aligned address either way.
__host__ __device__ __forceinline__ void cp_async16_or_zero(void* dst, const void* src,
                                                            bool valid) {
#ifdef __CUDA_ARCH__
  asm volatile(
      "{\n"
      "  .reg .pred ignore;\n"
      "  setp.eq.u32 ignore, %2, 0;\n"
      "  cp.async.cg.shared.global [%0], [%1], 16, ignore;\n"
      "}\n" ::"r"(smem_u32(dst)),
      "l"(src), "r"(static_cast<unsigned>(valid))
      : "memory");
#else
  if (valid)
    std::memcpy(dst, src, 16);
  else
    std::memset(dst, 0, 16);
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

// The copy "width" of TileSource::load for 16-byte copies of chunks that are full or empty.
constexpr int kFullChunks = 17;

// Where one thread's chunks of an operand tile come from. Thread tid's chunks are
// ci = tid + it * NT (it < ITERS): with NT a multiple of CPR they all sit in the same column
// c = (tid % CPR) * V, RS = NT / CPR rows apart, starting at row r0 = tid / CPR. `src` is the
// global address of the thread's first chunk in the current tile: set from the tile's origin
// by seek() and moved to the next k-tile by advance() (one 64-bit add; the GEMM re-seeks only
// when a k-tile starts a new batch), so a pipeline stage costs the copies and little else (the
// session-3 form recomputed a 64-bit row offset, the extents and the zero-fill clamps for every
// chunk of every k-tile: ~50 instructions per 16-byte copy in the sm_90 SASS; session 14 cut
// that to ~22 plus ~45 per stage for the tile origins; with OperandStream/KWalk below and the
// full-chunk copies, the big 16-bit kernel's whole stage load is ~45 instructions for its four
// copies, and its k-loop went from ~250 to ~150 instructions per k-tile next to 32 HMMA).
template <typename T, int R, int CPR, int NT>
struct TileSource {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
  static constexpr int ITERS = R * CPR / NT;
  static constexpr int RS = NT / CPR;
  static_assert((R * CPR) % NT == 0 && NT % CPR == 0,
                "chunks must divide evenly among threads, a thread's chunks in one column");

  const T* src;
  int r0, c;

  __host__ __device__ __forceinline__ explicit TileSource(int tid)
      : src(nullptr), r0(tid / CPR), c((tid % CPR) * V) {}

  // The tile whose row 0, column 0 is at g, rows ld elements apart.
  __host__ __device__ __forceinline__ void seek(const T* g, int64_t ld) { src = g + r0 * ld + c; }
  __host__ __device__ __forceinline__ void advance(int64_t elems) { src += elems; }

  // Loads the thread's chunks of the current tile into the shared tile s (row pitch `pitch`):
  // rows past rows_left and columns past cols_left are zero-filled. `safe` is a valid W-aligned
  // global address for the copies that read nothing. W = 17 is the 16-byte copy for tiles whose
  // chunks are all full or empty (cols_left a multiple of V, as when the operand's contiguous
  // extent is: every MobileNet layer), one predicated copy per chunk.
  template <int W>
  __host__ __device__ __forceinline__ void load(T* s, int pitch, int64_t ld, int rows_left,
                                                int cols_left, const T* safe) const {
    const int cvalid = clamp_int(cols_left - c, 0, V);  // the same for every chunk of the thread
    const int64_t step = RS * ld;
    const T* p = src;
    T* d = s + r0 * pitch + c;
    if constexpr (W == kFullChunks) {
      // A chunk is valid iff its row is (and its column, the same for all of them). Unrolled:
      // this form keeps every GEMM variant free of spills on sm_80 and sm_90.
      const int rows = cvalid > 0 ? rows_left : 0;
#pragma unroll
      for (int it = 0, r = r0; it < ITERS; ++it, r += RS, p += step, d += RS * pitch) {
        const bool valid = r < rows;
        cp_async16_or_zero(d, valid ? p : safe, valid);
      }
    } else if constexpr (W == 0) {
      // Element-wise: every load of the thread's ITERS chunks first, then the shared stores,
      // so one global round trip per stage instead of one per chunk.
      T pk[ITERS][V];
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int nvalid = r0 + it * RS < rows_left ? cvalid : 0;
        const T* q = p + it * step;
#pragma unroll
        for (int e = 0; e < V; ++e) pk[it][e] = e < nvalid ? q[e] : zero_value<T>();
      }
#pragma unroll
      for (int it = 0; it < ITERS; ++it)
        *reinterpret_cast<uint4*>(d + it * RS * pitch) = pack16<T>(pk[it]);
    } else {
      // Rolled (unroll 1): unrolled, the big bf16 GEMM spills under its 128-register cap
      // (sm_90). The row pointers advance by one add per chunk (no 64-bit multiply in the loop).
#pragma unroll 1
      for (int it = 0, r = r0; it < ITERS; ++it, r += RS, p += step, d += RS * pitch)
        load_chunk<T, W>(d, p, safe, r < rows_left ? cvalid : 0);
    }
  }
};

// One GEMM operand as a stream of tiles along k: the thread's TileSource plus what positions it.
// The operand is `base` with row stride ld and batch stride `batch`; the CTA's tiles start at
// m or n = mn0 and have mn_valid valid rows (K-major: [m][k] rows) or columns (M/N-major:
// [k][m] rows of m). Tiles are BK deep in k.
template <typename T, int BK, int R, int CPR, int NT, bool KMAJOR>
struct OperandStream {
  TileSource<T, R, CPR, NT> src;
  const T* base;
  int64_t ld, batch, mn0;
  int mn_valid;

  __host__ __device__ __forceinline__ OperandStream(int tid, const T* base_, int64_t ld_,
                                                    int64_t batch_, int64_t mn0_, int mn_valid_)
      : src(tid), base(base_), ld(ld_), batch(batch_), mn0(mn0_), mn_valid(mn_valid_) {}

  // To the tile of batch bi at k offset k0.
  __host__ __device__ __forceinline__ void seek(int64_t bi, int64_t k0) {
    const T* b = base + bi * batch;
    src.seek(KMAJOR ? b + mn0 * ld + k0 : b + k0 * ld + mn0, ld);
  }
  // To the next tile of the same batch (k0 + BK).
  __host__ __device__ __forceinline__ void advance() {
    src.advance(KMAJOR ? static_cast<int64_t>(BK) : BK * ld);
  }
  // The current tile into s (row pitch `pitch`), kv of its BK k-positions valid.
  template <int W>
  __host__ __device__ __forceinline__ void load(T* s, int pitch, int kv) const {
    src.template load<W>(s, pitch, ld, KMAJOR ? mn_valid : kv, KMAJOR ? kv : mn_valid, base);
  }
};

// The k-tiles one GEMM slice loads, strictly in order: batch bi and k offset k0 of the next one
// (k-tiles are BK deep, KT = cdiv(K, BK) per batch, and a reduce slice runs across batches).
// depth() is the current tile's valid depth; next() moves both operand streams on: one add each
// within a batch, a seek from the batch base when the tile was a batch's last (also past the
// slice's end, where nothing is loaded from them).
template <int BK>
struct KWalk {
  int64_t bi, k0, K;

  template <class OA, class OB>
  __host__ __device__ __forceinline__ void start(int64_t bi_, int64_t k0_, int64_t K_, OA& a,
                                                 OB& b) {
    bi = bi_;
    k0 = k0_;
    K = K_;
    a.seek(bi, k0);
    b.seek(bi, k0);
  }

  __host__ __device__ __forceinline__ int depth() const {
    return static_cast<int>(K - k0 < BK ? K - k0 : static_cast<int64_t>(BK));
  }

  template <class OA, class OB>
  __host__ __device__ __forceinline__ void next(OA& a, OB& b) {
    k0 += BK;
    if (k0 >= K) {
      k0 = 0;
      ++bi;
      a.seek(bi, k0);
      b.seek(bi, k0);
    } else {
      a.advance();
      b.advance();
    }
  }
};

// One whole tile by every thread's share: the tile at g (row stride ld), its first rows_left
// rows and cols_left columns valid, into s. The GEMM keeps a TileSource per operand across
// k-tiles instead; this is the stateless form (tests/cuda_host runs it for each thread).
template <typename T, int R, int CPR, int NT, int W>
__host__ __device__ __forceinline__ void load_tile(T* s, int pitch, const T* g, int64_t ld,
                                                   int rows_left, int cols_left, int tid) {
  TileSource<T, R, CPR, NT> ts(tid);
  ts.seek(g, ld);
  ts.template load<W>(s, pitch, ld, rows_left, cols_left, g);
}

}  // namespace cuda
}  // namespace dwsep
