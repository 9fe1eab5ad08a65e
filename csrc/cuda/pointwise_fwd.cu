// Pointwise (1x1) conv forward as a GEMM, plus the GEMM engine shared with the backward
// (pointwise_bwd.cu calls pw_gemm() for the data and weight gradients).
//
// Engine: one CTA computes a BM x BN tile of C = A * B through a STAGES-deep cp.async pipeline
// (16-byte copies, zero-filled at ragged edges; 8- or 4-byte copies, or element-wise loads
// through registers for 16-bit types, when a row stride or a base pointer is not 16-byte
// aligned) into padded shared memory (row pitch + 16 bytes: the ldmatrix and cp.async accesses
// are bank-conflict free). Per element type:
//   fp16/bf16: ldmatrix(.trans) + mma.sync.m16n8k16, fp32 accumulators;
//   fp32:      mma.sync.m16n8k8 TF32 (only when allowed by the caller) or exact fp32 FMA;
//   fp64:      fp64 FMA (exists for gradcheck).
// All paths keep the accumulators in the m16n8 C-fragment layout (lane = 4*g + t holds rows g and
// g+8, columns 2t and 2t+1 of every 16x8 block), so one epilogue serves them all: the fragments
// are staged through shared memory, then stored with coalesced 16-byte writes after the per-
// channel affine + activation (kStore), together with per-tile channel statistics (kStats), or
// as fp32/fp64 split-K partials (kPartial).
//
// Operand layouts: A is K-major ([m][k]) or M-major ([k][m]), B is K-major ([n][k]) or N-major
// ([k][n]); the pointwise ops use three of the four combinations (see pointwise.h).

#include <algorithm>
#include <array>
#include <atomic>

#include "cuda/cuda_common.cuh"
#include "cuda/pointwise.h"
#include "cuda/pointwise_tile.cuh"

namespace dwsep {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// D = A * B + D for one 16x8x16 block (A row-major 16x16, B column-major 16x8, fp32 D).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// D = A * B + D for one 16x8x8 TF32 block.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4],
                                              const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// v[0, N) = p[0, N) for fp32 or fp64 values, in 16-byte loads (p 16-byte aligned).
template <typename Acc, int N>
__device__ __forceinline__ void load16(Acc (&v)[N], const Acc* p) {
  static_assert((N * sizeof(Acc)) % 16 == 0, "whole 16-byte chunks");
  if constexpr (sizeof(Acc) == 4) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(p)[q];
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int q = 0; q < N / 2; ++q) {
      const double2 f = reinterpret_cast<const double2*>(p)[q];
      v[2 * q] = f.x;
      v[2 * q + 1] = f.y;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Compile-time configuration.

enum class Kind { kF16, kBF16, kTF32, kF32, kF64 };
template <Kind K>
struct KindTraits;
template <>
struct KindTraits<Kind::kF16> {
  using T = __half;
};
template <>
struct KindTraits<Kind::kBF16> {
  using T = __nv_bfloat16;
};
template <>
struct KindTraits<Kind::kTF32> {
  using T = float;
};
template <>
struct KindTraits<Kind::kF32> {
  using T = float;
};
template <>
struct KindTraits<Kind::kF64> {
  using T = double;
};

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MINB_>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_, MINB = MINB_;
  static constexpr int NWARPS = WARPS_M * WARPS_N, NT = NWARPS * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WM / 16, NI = WN / 8;             // m16n8 blocks per warp
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16x16");
  static_assert(STAGES >= 2, "pipeline needs at least two stages");
};
// cfg 0: 128x128 tile, 8 warps of 64x32 (16-bit types only); cfg 1: 64x64, 4 warps of 32x32.
// The loaders' cp.async chunk loops are kept rolled (unroll 1): that keeps every GEMM variant
// free of spills on sm_80 and sm_90 (fewer live address registers). The copies inside a chunk,
// and the element-wise loads of all of a thread's chunks, are unrolled: independent, issued back
// to back (checked in the SASS; not run on a GPU yet).
using CfgBig = TileCfg<128, 128, 2, 4, 4, 2>;
using CfgSmall = TileCfg<64, 64, 2, 2, 4, 4>;
// fp64: the 64x64 tile with a looser register cap (64 fp64 accumulators per thread).
using CfgF64 = TileCfg<64, 64, 2, 2, 4, 2>;

// Shared-memory layout of one configuration. K-major operand tiles are [rows][BK + PADK],
// M/N-major ones [BK][cols + PADMN]; the epilogue reuses the space as an Acc tile [BM][BN + 8]
// plus a small scratch for the statistics.
template <typename T, typename Acc, class C, bool AK, bool BK_MAJOR>
struct SmemLayout {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));   // elements per 16 bytes
  static constexpr int BK = 64 / static_cast<int>(sizeof(T));  // 64 bytes of K per stage
  static constexpr int PADK = V;
  static constexpr int PADMN = sizeof(T) == 4 ? 8 : V;  // fp32: 32 bytes (TF32 fragment reads)
  static constexpr int SA = AK ? BK + PADK : C::BM + PADMN;
  static constexpr int A_ELEMS = AK ? C::BM * SA : BK * SA;
  static constexpr int SB = BK_MAJOR ? BK + PADK : C::BN + PADMN;
  static constexpr int B_ELEMS = BK_MAJOR ? C::BN * SB : BK * SB;
  static constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS;
  static constexpr size_t PIPE_BYTES = size_t(C::STAGES) * STAGE_ELEMS * sizeof(T);
  static constexpr int SC = C::BN + 8;  // Acc pitch of the staged C tile
  static constexpr int R = C::NT / C::BN;
  static constexpr size_t EPI_BYTES = (size_t(C::BM) * SC + size_t(R) * C::BN) * sizeof(Acc);
  static constexpr size_t BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  static_assert((A_ELEMS * sizeof(T)) % 16 == 0 && (STAGE_ELEMS * sizeof(T)) % 16 == 0,
                "stage buffers must stay 16-byte aligned");
  static_assert((SA * sizeof(T)) % 16 == 0 && (SB * sizeof(T)) % 16 == 0,
                "row pitches must be 16-byte multiples");
  static_assert(C::NT % C::BN == 0, "stats need NT to be a multiple of BN");
};

// Kernel arguments (by value).
struct KArgs {
  const void* a;
  const void* b;
  void* c;
  int64_t lda, ldb, ldc, batch_a, batch_b, batch_c;
  int64_t M, N, K;
  int64_t KT;        // k-tiles per batch
  int64_t total_kt;  // batch * KT
  int64_t kt_per_z;  // reduce: k-tiles per split
  int64_t Z;         // slices (batches, or splits when reducing)
  int64_t tiles_m, tiles_n;
  bool reduce;
  int a_w, b_w;      // copy widths of the operand loads in bytes: 16, 8, 4, or 0 (element-wise)
  bool full_chunks;  // both operands' contiguous extents are multiples of 16 bytes
  bool c_vec;        // C rows allow 16-byte stores
  bool ss_vec;       // scale and shift allow 16-byte loads
  int epi, chan, act;
  const void* scale;
  const void* shift;
  void* stat_cnt;
  void* stat_mean;
  void* stat_m2;
};

// ---------------------------------------------------------------------------------------------
// Global -> shared tile loads (one pipeline stage): TileSource::load (pointwise_tile.cuh) per
// copy width.

// VEC: 16-byte copies of chunks that are full or empty (kFullChunks), no run-time branch.
// Otherwise one uniform branch on the width w, which is 16 or 8 for fp64, 16, 8 or 4 for fp32
// (element-aligned pointers always allow one element per copy), and 16, 8, 4 or 0 for 16-bit
// types.
template <bool VEC, class Op, typename T>
__device__ __forceinline__ void load_operand(const Op& op, T* s, int pitch, int kv, int w) {
  if constexpr (!VEC) {
    if (w == 8) {
      op.template load<8>(s, pitch, kv);
      return;
    }
    if constexpr (sizeof(T) <= 4) {
      if (w == 4) {
        op.template load<4>(s, pitch, kv);
        return;
      }
    }
    if constexpr (sizeof(T) == 2) {
      if (w != 16) {
        op.template load<0>(s, pitch, kv);
        return;
      }
    }
  }
  if constexpr (VEC)
    op.template load<kFullChunks>(s, pitch, kv);
  else
    op.template load<16>(s, pitch, kv);
}

// ---------------------------------------------------------------------------------------------
// One stage of math: acc += A_tile * B_tile for this warp's WM x WN sub-tile.

template <Kind KD, class C, class L, bool AK, bool BK_MAJOR, typename T, typename Acc>
__device__ __forceinline__ void compute_stage(const T* as, const T* bs, Acc (&acc)[C::MI][C::NI][4],
                                              int lane, int wm0, int wn0) {
  const int g = lane >> 2, t = lane & 3;
  // Element accessors A(m, k), B(k, n) inside the stage tiles.
  auto A = [&](int m, int k) -> T { return AK ? as[m * L::SA + k] : as[k * L::SA + m]; };
  auto B = [&](int k, int n) -> T { return BK_MAJOR ? bs[n * L::SB + k] : bs[k * L::SB + n]; };

  if constexpr (KD == Kind::kF16 || KD == Kind::kBF16) {
    static_assert(C::NI % 2 == 0, "B fragments are loaded in pairs");
#pragma unroll
    for (int ks = 0; ks < L::BK; ks += 16) {
      uint32_t af[C::MI][4];
      uint32_t bf[C::NI][2];
#pragma unroll
      for (int i = 0; i < C::MI; ++i) {
        const int mb = wm0 + 16 * i;
        if constexpr (AK) {
          // matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
          ldsm_x4(af[i], as + (mb + (lane & 15)) * L::SA + ks + ((lane >> 4) << 3));
        } else {
          // stored [k][m]; transposed loads of the same four 8x8 blocks
          ldsm_x4_trans(af[i], as + (ks + (lane & 7) + ((lane >> 4) << 3)) * L::SA + mb +
                                   (((lane >> 3) & 1) << 3));
        }
      }
#pragma unroll
      for (int jp = 0; jp < C::NI / 2; ++jp) {
        const int nb = wn0 + 16 * jp;
        uint32_t r[4];
        if constexpr (BK_MAJOR) {
          // stored [n][k]: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
          ldsm_x4(r, bs + (nb + (lane & 7) + ((lane >> 4) << 3)) * L::SB + ks +
                         (((lane >> 3) & 1) << 3));
        } else {
          // stored [k][n]: the same blocks, transposed
          ldsm_x4_trans(r, bs + (ks + (lane & 7) + (((lane >> 3) & 1) << 3)) * L::SB + nb +
                               ((lane >> 4) << 3));
        }
        bf[2 * jp][0] = r[0];
        bf[2 * jp][1] = r[1];
        bf[2 * jp + 1][0] = r[2];
        bf[2 * jp + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < C::MI; ++i)
#pragma unroll
        for (int j = 0; j < C::NI; ++j) mma_16816<T>(acc[i][j], af[i], bf[j]);
    }
  } else if constexpr (KD == Kind::kTF32) {
#pragma unroll
    for (int ks = 0; ks < L::BK; ks += 8) {
      uint32_t af[C::MI][4];
      uint32_t bf[C::NI][2];
#pragma unroll
      for (int i = 0; i < C::MI; ++i) {
        const int m = wm0 + 16 * i + g;
        af[i][0] = to_tf32(A(m, ks + t));
        af[i][1] = to_tf32(A(m + 8, ks + t));
        af[i][2] = to_tf32(A(m, ks + t + 4));
        af[i][3] = to_tf32(A(m + 8, ks + t + 4));
      }
#pragma unroll
      for (int j = 0; j < C::NI; ++j) {
        const int n = wn0 + 8 * j + g;
        bf[j][0] = to_tf32(B(ks + t, n));
        bf[j][1] = to_tf32(B(ks + t + 4, n));
      }
#pragma unroll
      for (int i = 0; i < C::MI; ++i)
#pragma unroll
        for (int j = 0; j < C::NI; ++j) mma_1688_tf32(acc[i][j], af[i], bf[j]);
    }
  } else {
    // Exact SIMT FMA in the same fragment layout: acc[i][j] = rows (g, g+8) x cols (2t, 2t+1).
#pragma unroll 4
    for (int k = 0; k < L::BK; ++k) {
      Acc av[C::MI][2], bv[C::NI][2];
#pragma unroll
      for (int i = 0; i < C::MI; ++i) {
        av[i][0] = A(wm0 + 16 * i + g, k);
        av[i][1] = A(wm0 + 16 * i + g + 8, k);
      }
#pragma unroll
      for (int j = 0; j < C::NI; ++j) {
        bv[j][0] = B(k, wn0 + 8 * j + 2 * t);
        bv[j][1] = B(k, wn0 + 8 * j + 2 * t + 1);
      }
#pragma unroll
      for (int i = 0; i < C::MI; ++i)
#pragma unroll
        for (int j = 0; j < C::NI; ++j) {
          acc[i][j][0] = fma(av[i][0], bv[j][0], acc[i][j][0]);
          acc[i][j][1] = fma(av[i][0], bv[j][1], acc[i][j][1]);
          acc[i][j][2] = fma(av[i][1], bv[j][0], acc[i][j][2]);
          acc[i][j][3] = fma(av[i][1], bv[j][1], acc[i][j][3]);
        }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Epilogue pieces (operate on the staged Acc tile cs[BM][SC]).

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // butterfly: every lane ends with the same bits
}

// Per-tile (count, mean, M2) of each channel over the other dimension: a two-pass mean/M2 over
// the tile's valid rows (or columns) in a fixed order.
template <typename Acc, class C, class L>
__device__ __forceinline__ void tile_stats(const KArgs& a, Acc* cs, int64_t z, int64_t tm,
                                           int64_t tn, int mv, int nv, int tid, int lane,
                                           int warp) {
  Acc* cnt = static_cast<Acc*>(a.stat_cnt);
  Acc* mean_out = static_cast<Acc*>(a.stat_mean);
  Acc* m2_out = static_cast<Acc*>(a.stat_m2);
  if (a.chan == 2) {  // channel = column n (NHWC): reduce over the tile's mv rows
    Acc* scratch = cs + C::BM * L::SC;
    constexpr int R = L::R;
    const int col = tid % C::BN, rg = tid / C::BN;
    const int64_t p = z * a.tiles_m + tm;
    Acc s = 0;
    for (int r = rg; r < mv; r += R) s += cs[r * L::SC + col];
    scratch[rg * C::BN + col] = s;
    __syncthreads();
    Acc tot = 0;
#pragma unroll
    for (int q = 0; q < R; ++q) tot += scratch[q * C::BN + col];
    const Acc mean = tot / static_cast<Acc>(mv);
    __syncthreads();
    Acc m2 = 0;
    for (int r = rg; r < mv; r += R) {
      const Acc d = cs[r * L::SC + col] - mean;
      m2 += d * d;
    }
    scratch[rg * C::BN + col] = m2;
    __syncthreads();
    if (rg == 0 && col < nv) {
      Acc m2t = 0;
#pragma unroll
      for (int q = 0; q < R; ++q) m2t += scratch[q * C::BN + col];
      const int64_t ch = tn * C::BN + col;
      mean_out[p * a.N + ch] = mean;
      m2_out[p * a.N + ch] = m2t;
    }
    if (tid == 0 && tn == 0) cnt[p] = static_cast<Acc>(mv);
  } else {  // channel = row m (NCHW): one warp per row, reduce over the tile's nv columns
    const int64_t p = z * a.tiles_n + tn;
    for (int r = warp; r < mv; r += C::NWARPS) {
      Acc s = 0;
      for (int c = lane; c < nv; c += 32) s += cs[r * L::SC + c];
      const Acc mean = warp_sum(s) / static_cast<Acc>(nv);
      Acc m2 = 0;
      for (int c = lane; c < nv; c += 32) {
        const Acc d = cs[r * L::SC + c] - mean;
        m2 += d * d;
      }
      m2 = warp_sum(m2);
      if (lane == 0) {
        const int64_t ch = tm * C::BM + r;
        mean_out[p * a.M + ch] = mean;
        m2_out[p * a.M + ch] = m2;
      }
    }
    if (tid == 0 && tm == 0) cnt[p] = static_cast<Acc>(nv);
  }
}

// Coalesced store of the staged tile: each thread writes 16 bytes of one row per step.
template <typename OutT, typename Acc, class C, class L>
__device__ __forceinline__ void store_tile(const KArgs& a, const Acc* cs, int64_t z, int64_t m0,
                                           int64_t n0, int mv, int nv, int tid) {
  constexpr int VO = 16 / sizeof(OutT);
  constexpr int CPR = C::BN / VO;
  static_assert((VO * sizeof(Acc)) % 16 == 0, "staged values are read 16 bytes at a time");
  OutT* out = static_cast<OutT*>(a.c) + z * a.batch_c;
  const Acc* scale = static_cast<const Acc*>(a.scale);
  const Acc* shift = static_cast<const Acc*>(a.shift);
  const int chan = a.epi == PwGemmParams::kStore ? a.chan : 0;
  const int act = a.epi == PwGemmParams::kStore ? a.act : 0;
  for (int idx = tid; idx < C::BM * CPR; idx += C::NT) {
    const int r = idx / CPR;
    const int cc = (idx % CPR) * VO;
    if (r >= mv || cc >= nv) continue;
    const int nj = min(VO, nv - cc);
    const int64_t gm = m0 + r, gn = n0 + cc;
    Acc v[VO];
    load16<Acc, VO>(v, cs + r * L::SC + cc);
    if (chan == 1) {
      const Acc s = scale[gm], h = shift[gm];
#pragma unroll
      for (int j = 0; j < VO; ++j) v[j] = v[j] * s + h;
    } else if (chan == 2) {
      if (a.ss_vec && nj == VO) {  // 16-byte loads of the VO scales and shifts (gn % VO == 0)
        Acc sc[VO], sh[VO];
        load16<Acc, VO>(sc, scale + gn);
        load16<Acc, VO>(sh, shift + gn);
#pragma unroll
        for (int j = 0; j < VO; ++j) v[j] = v[j] * sc[j] + sh[j];
      } else {
#pragma unroll
        for (int j = 0; j < VO; ++j)
          if (j < nj) v[j] = v[j] * scale[gn + j] + shift[gn + j];
      }
    }
    if (act == 1) {
#pragma unroll
      for (int j = 0; j < VO; ++j) v[j] = apply_act<1>(v[j]);
    } else if (act == 2) {
#pragma unroll
      for (int j = 0; j < VO; ++j) v[j] = apply_act<2>(v[j]);
    }
    OutT* dst = out + gm * a.ldc + gn;
    if (a.c_vec && nj == VO) {
      st_global16(dst, pack16<OutT>(v));
    } else {
#pragma unroll
      for (int j = 0; j < VO; ++j)
        if (j < nj) dst[j] = from_acc<OutT>(v[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The GEMM kernel.

// VEC: both operands load with 16-byte copies (a_w == b_w == 16) of chunks that are full or empty
// (full_chunks); otherwise the loads branch on a_w / b_w at run time.
template <Kind KD, class C, bool AK, bool BK_MAJOR, bool VEC>
__global__ void __launch_bounds__(C::NT, C::MINB) pw_gemm_kernel(const KArgs args) {
  using T = typename KindTraits<KD>::T;
  using Acc = typename AccOf<T>::type;
  using L = SmemLayout<T, Acc, C, AK, BK_MAJOR>;
  constexpr int V = L::V;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / C::WARPS_N) * C::WM, wn0 = (warp % C::WARPS_N) * C::WN;
  const int64_t tile = blockIdx.x;
  const int64_t tn = tile % args.tiles_n, tm = tile / args.tiles_n;
  const int64_t m0 = tm * C::BM, n0 = tn * C::BN;
  // Valid rows and columns of this C tile (also the extents of the operand tiles along m, n).
  const int mv = static_cast<int>(min(static_cast<int64_t>(C::BM), args.M - m0));
  const int nv = static_cast<int>(min(static_cast<int64_t>(C::BN), args.N - n0));
  const T* A = static_cast<const T*>(args.a);
  const T* B = static_cast<const T*>(args.b);

  for (int64_t z = blockIdx.z; z < args.Z; z += gridDim.z) {
    int64_t kt0, kt1;
    if (args.reduce) {
      kt0 = min(z * args.kt_per_z, args.total_kt);
      kt1 = min(kt0 + args.kt_per_z, args.total_kt);
    } else {
      kt0 = z * args.KT;
      kt1 = kt0 + args.KT;
    }
    const int64_t nkt = kt1 - kt0;

    // Flattened k-tile kt (batch kt / KT, k offset (kt % KT) * BK). The stages load k-tiles
    // kt0, kt0 + 1, ... strictly in order (prologue, then one per iteration), so the position of
    // the next one is kept incrementally: batch bi and k offset k0 (one division per slice, none
    // per k-tile).
    int64_t k0 = 0;
    int64_t bi = z;  // batch of k-tile kt0 (reduce: kt0 / KT; no k-tile when nkt == 0)
    if (args.reduce) {
      bi = 0;
      if (nkt > 0) {
        bi = kt0 / args.KT;
        k0 = (kt0 - bi * args.KT) * L::BK;
      }
    }

    // Each thread's share of the A and B tiles (pointwise_tile.cuh): positioned at k-tile
    // (bi, k0) once per slice, then moved along k by one add per stage (KWalk).
    OperandStream<T, L::BK, AK ? C::BM : L::BK, AK ? L::BK / V : C::BM / V, C::NT, AK> op_a(
        tid, A, args.lda, args.batch_a, m0, mv);
    OperandStream<T, L::BK, BK_MAJOR ? C::BN : L::BK, BK_MAJOR ? L::BK / V : C::BN / V, C::NT,
                  BK_MAJOR>
        op_b(tid, B, args.ldb, args.batch_b, n0, nv);
    KWalk<L::BK> walk;
    if (nkt > 0) walk.start(bi, k0, args.K, op_a, op_b);

    // Load the next k-tile into `stage`, then move on to the one after it.
    auto load_stage = [&](int stage) {
      T* as = smem + stage * L::STAGE_ELEMS;
      const int kv = walk.depth();
      load_operand<VEC>(op_a, as, L::SA, kv, args.a_w);
      load_operand<VEC>(op_b, as + L::A_ELEMS, L::SB, kv, args.b_w);
      walk.next(op_a, op_b);
    };

    Acc acc[C::MI][C::NI][4];
#pragma unroll
    for (int i = 0; i < C::MI; ++i)
#pragma unroll
      for (int j = 0; j < C::NI; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = Acc(0);

    // Pipeline: STAGES-1 tiles in flight ahead of the one being consumed. Exactly one commit
    // group per prologue step and per iteration (possibly empty), so at iteration kt
    // wait_group(STAGES-2) guarantees that the group holding tile kt has landed.
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
      if (s < nkt) load_stage(s);
      cp_async_commit();
    }
    int rd = 0, wr = C::STAGES - 1;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      cp_async_wait<C::STAGES - 2>();
      // Makes tile kt visible to all threads, and guarantees everyone finished reading stage
      // `wr` (consumed in iteration kt-1) before it is refilled below.
      __syncthreads();
      if (kt + C::STAGES - 1 < nkt) load_stage(wr);  // k-tile kt + STAGES - 1
      cp_async_commit();
      const T* as = smem + rd * L::STAGE_ELEMS;
      compute_stage<KD, C, L, AK, BK_MAJOR>(as, as + L::A_ELEMS, acc, lane, wm0, wn0);
      rd = rd + 1 == C::STAGES ? 0 : rd + 1;
      wr = wr + 1 == C::STAGES ? 0 : wr + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // all warps are done with the stages: reuse the space for the C tile

    // Stage the accumulators: acc[i][j] holds rows (g, g+8) x cols (2t, 2t+1) of block (i, j).
    Acc* cs = reinterpret_cast<Acc*>(smem_raw);
    {
      const int g = lane >> 2, t = lane & 3;
#pragma unroll
      for (int i = 0; i < C::MI; ++i)
#pragma unroll
        for (int j = 0; j < C::NI; ++j) {
          const int r = wm0 + 16 * i + g;
          const int c = wn0 + 8 * j + 2 * t;
          Acc* p0 = cs + r * L::SC + c;
          Acc* p1 = p0 + 8 * L::SC;
          if constexpr (sizeof(Acc) == 4) {
            *reinterpret_cast<float2*>(p0) = make_float2(acc[i][j][0], acc[i][j][1]);
            *reinterpret_cast<float2*>(p1) = make_float2(acc[i][j][2], acc[i][j][3]);
          } else {
            *reinterpret_cast<double2*>(p0) = make_double2(acc[i][j][0], acc[i][j][1]);
            *reinterpret_cast<double2*>(p1) = make_double2(acc[i][j][2], acc[i][j][3]);
          }
        }
    }
    __syncthreads();
    if (args.epi == PwGemmParams::kStats)
      tile_stats<Acc, C, L>(args, cs, z, tm, tn, mv, nv, tid, lane, warp);
    if (args.epi == PwGemmParams::kPartial)
      store_tile<Acc, Acc, C, L>(args, cs, z, m0, n0, mv, nv, tid);
    else
      store_tile<T, Acc, C, L>(args, cs, z, m0, n0, mv, nv, tid);
    __syncthreads();  // the next slice reuses the shared memory
  }
}

// ---------------------------------------------------------------------------------------------
// Statistics merge: Chan's parallel-variance formula, fixed order.

template <typename Acc>
__device__ __forceinline__ void chan_merge(Acc& n, Acc& mean, Acc& m2, Acc nb, Acc mean_b,
                                           Acc m2_b) {
  if (!(nb > Acc(0))) return;
  const Acc nn = n + nb;
  const Acc d = mean_b - mean;
  const Acc f = nb / nn;
  mean += d * f;
  m2 += m2_b + d * d * n * f;
  n = nn;
}

// Block (32 channels x 8 warps) merges partials [p0, p1) of its 32 channels: warp w takes
// p0+w, p0+w+8, ... in order, then warp 0 merges the 8 warp results in order. Final pass writes
// mean and biased var; otherwise (count, mean, M2) per group blockIdx.y.
template <typename Acc>
__global__ void __launch_bounds__(256)
    stats_merge_kernel(const Acc* __restrict__ cnt, const Acc* __restrict__ mean,
                       const Acc* __restrict__ m2, int64_t P, int64_t C, int64_t chunk,
                       Acc* __restrict__ out_cnt, Acc* __restrict__ out_mean,
                       Acc* __restrict__ out_m2_or_var, bool final_pass) {
  __shared__ Acc sh_n[8][32], sh_mean[8][32], sh_m2[8][32];
  const int lane = threadIdx.x, w = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t p1 = min(P, p0 + chunk);
  Acc n = 0, mu = 0, q = 0;
  if (c < C)
    for (int64_t p = p0 + w; p < p1; p += 8)
      chan_merge(n, mu, q, cnt[p], mean[p * C + c], m2[p * C + c]);
  sh_n[w][lane] = n;
  sh_mean[w][lane] = mu;
  sh_m2[w][lane] = q;
  __syncthreads();
  if (w != 0 || c >= C) return;
#pragma unroll
  for (int i = 1; i < 8; ++i) chan_merge(n, mu, q, sh_n[i][lane], sh_mean[i][lane], sh_m2[i][lane]);
  if (final_pass) {
    out_mean[c] = mu;
    out_m2_or_var[c] = n > Acc(0) ? q / n : Acc(0);
  } else {
    out_mean[blockIdx.y * C + c] = mu;
    out_m2_or_var[blockIdx.y * C + c] = q;
    if (c == 0) out_cnt[blockIdx.y] = n;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int64_t cdiv(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
int elem_size(DType d) {
  switch (d) {
    case DType::kFloat64:
      return 8;
    case DType::kFloat32:
      return 4;
    default:
      return 2;
  }
}

// Copy width (bytes) for an operand's tile loads: the widest of 16, 8, 4 (and at least one
// element) to which its base pointer, row stride and batch stride are all aligned; 0 (element-wise
// loads) when there is none.
int copy_width(const void* p, int64_t ld, int64_t batch, int es) {
  for (int w = 16; w >= 4 && w >= es; w /= 2)
    if (reinterpret_cast<uintptr_t>(p) % w == 0 && (ld * es) % w == 0 && (batch * es) % w == 0)
      return w;
  return 0;
}

constexpr int kMaxDevices = 64;

template <Kind KD, class C, bool AK, bool BK_MAJOR, bool VEC>
cudaError_t launch_gemm(const KArgs& a, cudaStream_t stream) {
  using T = typename KindTraits<KD>::T;
  using L = SmemLayout<T, typename AccOf<T>::type, C, AK, BK_MAJOR>;
  constexpr size_t smem = L::BYTES;
  auto kernel = pw_gemm_kernel<KD, C, AK, BK_MAJOR, VEC>;
  if (smem > 48 * 1024) {
    // The opt-in to more than 48 KiB is per device and per kernel: set it once for each (a race
    // between host threads only sets it twice, which is harmless; a cudaDeviceReset, which
    // PyTorch never does, would need it set again).
    static std::array<std::atomic<bool>, kMaxDevices> attr_set{};
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    const bool cached = dev >= 0 && dev < kMaxDevices;
    if (!cached || !attr_set[dev].load(std::memory_order_acquire)) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
      if (e != cudaSuccess) return e;
      if (cached) attr_set[dev].store(true, std::memory_order_release);
    }
  }
  const dim3 grid(static_cast<unsigned>(a.tiles_m * a.tiles_n), 1,
                  static_cast<unsigned>(std::min<int64_t>(a.Z, 65535)));
  kernel<<<grid, C::NT, smem, stream>>>(a);
  return cudaGetLastError();
}

template <Kind KD, class C, bool AK, bool BK_MAJOR>
cudaError_t launch_vec(const KArgs& a, cudaStream_t stream) {
  return a.a_w == 16 && a.b_w == 16 && a.full_chunks
             ? launch_gemm<KD, C, AK, BK_MAJOR, true>(a, stream)
             : launch_gemm<KD, C, AK, BK_MAJOR, false>(a, stream);
}

// The operand-layout combinations the pointwise ops use: (K, K), (K, N), (M, N).
template <Kind KD, class C>
cudaError_t launch_layout(const KArgs& a, bool a_kmajor, bool b_kmajor, cudaStream_t stream) {
  if (a_kmajor && b_kmajor) return launch_vec<KD, C, true, true>(a, stream);
  if (a_kmajor && !b_kmajor) return launch_vec<KD, C, true, false>(a, stream);
  if (!a_kmajor && !b_kmajor) return launch_vec<KD, C, false, false>(a, stream);
  return cudaErrorInvalidValue;  // M-major A with K-major B: not needed by any op
}

PwGemmParams fwd_gemm(const PwShape& s, const void* x, const void* w, void* y, bool tf32) {
  PwGemmParams g{};
  if (s.nhwc) {  // Y[pix][co] = X[pix][ci] * W[co][ci]^T
    g.a = x, g.lda = s.Cin, g.batch_a = 0, g.a_kmajor = true;
    g.b = w, g.ldb = s.Cin, g.batch_b = 0, g.b_kmajor = true;
    g.c = y, g.ldc = s.Cout, g.batch_c = 0;
    g.M = s.N * s.HW, g.N = s.Cout, g.K = s.Cin, g.batch = 1;
    g.chan = 2;
  } else {  // Y[n][co][hw] = W[co][ci] * X[n][ci][hw]
    g.a = w, g.lda = s.Cin, g.batch_a = 0, g.a_kmajor = true;
    g.b = x, g.ldb = s.HW, g.batch_b = s.Cin * s.HW, g.b_kmajor = false;
    g.c = y, g.ldc = s.HW, g.batch_c = s.Cout * s.HW;
    g.M = s.Cout, g.N = s.HW, g.K = s.Cin, g.batch = s.N;
    g.chan = 1;
  }
  g.reduce_batch = false;
  g.splits = 1;
  g.allow_tf32 = tf32;
  return g;
}

// Statistics plan: P per-tile partials, merged in G groups (G == 1: one final pass).
struct StatsPlan {
  PwGemmParams g;
  int64_t P, C, G, chunk;
  int64_t ws_elems;
};

StatsPlan plan_stats(const PwFwdStatsParams& p, DType dtype) {
  StatsPlan sp{};
  sp.g = fwd_gemm(p.s, p.x, p.w, p.z, p.allow_tf32);
  sp.g.epi = PwGemmParams::kStats;
  const PwGemmTile tile = pw_gemm_config(sp.g, dtype);
  sp.g.cfg = tile.cfg;
  sp.C = p.s.Cout;
  sp.P = p.s.nhwc ? cdiv(sp.g.M, tile.bm) : sp.g.batch * cdiv(sp.g.N, tile.bn);
  const int64_t cx = cdiv(sp.C, 32);
  if (sp.P <= 512) {
    sp.G = 1;
    sp.chunk = sp.P;
  } else {
    const int64_t g = std::min(cdiv(sp.P, 64), std::max<int64_t>(1, 512 / cx));
    sp.chunk = cdiv(sp.P, g);
    sp.G = cdiv(sp.P, sp.chunk);
  }
  sp.ws_elems = sp.P * (1 + 2 * sp.C) + (sp.G > 1 ? sp.G * (1 + 2 * sp.C) : 0);
  return sp;
}

template <typename Acc>
cudaError_t launch_merge(const StatsPlan& sp, Acc* ws, Acc* mean, Acc* var, cudaStream_t stream) {
  Acc* cnt1 = ws;
  Acc* mean1 = cnt1 + sp.P;
  Acc* m21 = mean1 + sp.P * sp.C;
  const dim3 block(32, 8);
  const unsigned gx = static_cast<unsigned>(cdiv(sp.C, 32));
  if (sp.G == 1) {
    stats_merge_kernel<Acc><<<dim3(gx, 1), block, 0, stream>>>(cnt1, mean1, m21, sp.P, sp.C, sp.P,
                                                               nullptr, mean, var, true);
    return cudaGetLastError();
  }
  Acc* cnt2 = m21 + sp.P * sp.C;
  Acc* mean2 = cnt2 + sp.G;
  Acc* m22 = mean2 + sp.G * sp.C;
  stats_merge_kernel<Acc><<<dim3(gx, static_cast<unsigned>(sp.G)), block, 0, stream>>>(
      cnt1, mean1, m21, sp.P, sp.C, sp.chunk, cnt2, mean2, m22, false);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  stats_merge_kernel<Acc><<<dim3(gx, 1), block, 0, stream>>>(cnt2, mean2, m22, sp.G, sp.C, sp.G,
                                                             nullptr, mean, var, true);
  return cudaGetLastError();
}

}  // namespace

int pw_num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    return 1;
  }
  return n;
}

PwGemmTile pw_gemm_config(const PwGemmParams& p, DType dtype) {
  const int bk = 64 / elem_size(dtype);
  const PwGemmTile small{1, 64, 64, bk};
  const PwGemmTile big{0, 128, 128, bk};
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return small;
  if (p.M <= 64 || p.N <= 64) return small;
  if (p.reduce_batch) return (p.M >= 256 && p.N >= 256) ? big : small;
  const int64_t zb = std::max<int64_t>(p.batch, 1);
  const int64_t big_tiles = cdiv(p.M, 128) * cdiv(p.N, 128) * zb;
  const int64_t big_work = cdiv(p.M, 128) * cdiv(p.N, 128) * 4;  // in 64x64 units
  const int64_t small_work = cdiv(p.M, 64) * cdiv(p.N, 64);
  // The big tile when it fills the GPU and wastes little on ragged edges.
  return (big_tiles >= pw_num_sms() && 4 * big_work <= 5 * small_work) ? big : small;
}

cudaError_t pw_gemm(const PwGemmParams& p, DType dtype, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0 || p.batch <= 0) return cudaSuccess;
  const int es = elem_size(dtype);
  const int V = 16 / es;
  const int bk = 64 / es;
  const int bm = p.cfg == 0 ? 128 : 64, bn = bm;
  if (p.cfg == 0 && dtype != DType::kFloat16 && dtype != DType::kBFloat16)
    return cudaErrorInvalidValue;

  KArgs a{};
  a.a = p.a, a.b = p.b, a.c = p.c;
  a.lda = p.lda, a.ldb = p.ldb, a.ldc = p.ldc;
  a.batch_a = p.batch_a, a.batch_b = p.batch_b, a.batch_c = p.batch_c;
  a.M = p.M, a.N = p.N, a.K = p.K;
  a.KT = cdiv(p.K, bk);
  a.reduce = p.reduce_batch;
  if (p.reduce_batch) {
    a.total_kt = p.batch * a.KT;
    a.Z = std::max<int64_t>(p.splits, 1);
    a.kt_per_z = cdiv(a.total_kt, a.Z);
  } else {
    a.total_kt = p.batch * a.KT;
    a.Z = p.batch;
    a.kt_per_z = a.KT;
  }
  a.tiles_m = cdiv(p.M, bm);
  a.tiles_n = cdiv(p.N, bn);
  if (a.tiles_m * a.tiles_n > 0x7fffffff) return cudaErrorInvalidConfiguration;
  a.a_w = copy_width(p.a, p.lda, p.batch_a, es);
  a.b_w = copy_width(p.b, p.ldb, p.batch_b, es);
  // Element-wise loads exist for 16-bit types only; wider elements are at least 4-byte aligned
  // (fp32: one element per copy; fp64: 8 bytes) unless the pointer is not element-aligned.
  if (es > 2 && (a.a_w == 0 || a.b_w == 0)) return cudaErrorMisalignedAddress;
  // A tile's 16-byte chunks are then all full or empty: a K-major tile's valid columns are
  // min(BK, K - k0), an M/N-major one's min(BM, M - m0) (BN, N), all multiples of V.
  a.full_chunks = (p.a_kmajor ? p.K : p.M) % V == 0 && (p.b_kmajor ? p.K : p.N) % V == 0;
  const int vo = p.epi == PwGemmParams::kPartial ? 16 / (dtype == DType::kFloat64 ? 8 : 4) : V;
  a.c_vec = p.ldc % vo == 0 && p.batch_c % vo == 0 && aligned16(p.c);
  a.ss_vec = aligned16(p.scale) && aligned16(p.shift);
  a.epi = p.epi, a.chan = p.chan, a.act = p.act;
  a.scale = p.scale, a.shift = p.shift;
  a.stat_cnt = p.stat_cnt, a.stat_mean = p.stat_mean, a.stat_m2 = p.stat_m2;
  if ((p.epi == PwGemmParams::kStats && p.chan != 1 && p.chan != 2) ||
      (p.epi == PwGemmParams::kStore && p.chan != 0 && (p.scale == nullptr || p.shift == nullptr)))
    return cudaErrorInvalidValue;

  const bool ak = p.a_kmajor, bkm = p.b_kmajor;
  switch (dtype) {
    case DType::kFloat16:
      return p.cfg == 0 ? launch_layout<Kind::kF16, CfgBig>(a, ak, bkm, stream)
                        : launch_layout<Kind::kF16, CfgSmall>(a, ak, bkm, stream);
    case DType::kBFloat16:
      return p.cfg == 0 ? launch_layout<Kind::kBF16, CfgBig>(a, ak, bkm, stream)
                        : launch_layout<Kind::kBF16, CfgSmall>(a, ak, bkm, stream);
    case DType::kFloat32:
      return p.allow_tf32 ? launch_layout<Kind::kTF32, CfgSmall>(a, ak, bkm, stream)
                          : launch_layout<Kind::kF32, CfgSmall>(a, ak, bkm, stream);
    case DType::kFloat64:
      return launch_layout<Kind::kF64, CfgF64>(a, ak, bkm, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t pw_fwd(const PwFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.s.N * p.s.HW == 0 || p.s.Cout == 0) return cudaSuccess;
  if (p.act < 0 || p.act > 2) return cudaErrorInvalidValue;
  PwGemmParams g = fwd_gemm(p.s, p.x, p.w, p.y, p.allow_tf32);
  g.epi = PwGemmParams::kStore;
  g.scale = p.scale;
  g.shift = p.shift;
  g.act = p.act;
  g.cfg = pw_gemm_config(g, dtype).cfg;
  return pw_gemm(g, dtype, stream);
}

int64_t pw_fwd_stats_workspace_bytes(const PwFwdStatsParams& p, DType dtype) {
  if (p.s.N * p.s.HW == 0 || p.s.Cout == 0) return 0;
  const int64_t acc_bytes = dtype == DType::kFloat64 ? 8 : 4;
  return plan_stats(p, dtype).ws_elems * acc_bytes;
}

cudaError_t pw_fwd_stats(const PwFwdStatsParams& p, DType dtype, cudaStream_t stream) {
  if (p.s.N * p.s.HW == 0 || p.s.Cout == 0) return cudaSuccess;
  StatsPlan sp = plan_stats(p, dtype);
  auto run = [&](auto* ws, auto* mean, auto* var) -> cudaError_t {
    sp.g.stat_cnt = ws;
    sp.g.stat_mean = ws + sp.P;
    sp.g.stat_m2 = ws + sp.P + sp.P * sp.C;
    const cudaError_t e = pw_gemm(sp.g, dtype, stream);
    if (e != cudaSuccess) return e;
    return launch_merge(sp, ws, mean, var, stream);
  };
  if (dtype == DType::kFloat64)
    return run(static_cast<double*>(p.workspace), static_cast<double*>(p.mean),
               static_cast<double*>(p.var));
  return run(static_cast<float*>(p.workspace), static_cast<float*>(p.mean),
             static_cast<float*>(p.var));
}

}  // namespace cuda
}  // namespace dwsep
