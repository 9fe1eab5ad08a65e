// Host runs of the channels_last depthwise kernels' per-thread bodies
// (csrc/cuda/depthwise_fwd_nhwc.cuh): every thread id of an emulated grid in turn, on the CPU.
// Built with the host C++ compiler (as C++, the CUDA headers for the storage types) and
// AddressSanitizer + UBSan by tests/test_cuda_host.py, which writes the inputs, runs this program
// and compares its output with the float64 reference. Buffers are allocated at their exact
// sizes, so a read or write one element out of bounds stops the run.
//
//   dw_nhwc_host OP DIR DTYPE N C H W STRIDE ACT VEC NTHREADS
//     OP: fwd (dw_fwd_nhwc_thread: x, w, scale, shift -> y), stats (dw_stats_nhwc_thread:
//     x, w -> ws, the [chunks][C][3] moments of dw_nhwc_chunks; ACT ignored) or reduce
//     (dw_bwd_reduce_nhwc_thread: grad_y, y_saved, x, w, mean, invstd -> ws, [chunks][C][2]) or
//     bwd / bwd_noz (dw_bwd_gconv_nhwc_thread for every thread, then dw_bwd_dx_nhwc_thread for
//     every thread, as the two kernels; use_z true / false: grad_y, y_saved, x, w, k, b, c ->
//     y.bin = grad_x (N x H x W x C) and ws.bin = the [chunks][C][9] weight-gradient partials)
//     DIR: the inputs as NAME.bin, the output as y.bin or ws.bin (raw, native byte order)
//     DTYPE: float32 | float64 | float16 | bfloat16; VEC: 1 (scalar) or 0 (the launcher's
//     vectors: 16 bytes, 4 channels for the 16-bit types in bwd; C must be a multiple);
//     NTHREADS: the emulated grid's thread count.
//   dw_nhwc_host pack16 DIR DTYPE COUNT   (run_pack16 below)
//   dw_nhwc_host pwtile DTYPE BM MAJOR W ROWS_LEFT COLS_LEFT LD   (check_tile below)
//   dw_nhwc_host pwwalk DTYPE BM AMAJOR BMAJOR W M N K NB LDA LDB BATCH_A BATCH_B KT0 NKT TM TN
//     (check_walk below)
// The output is filled with 0xff bytes (NaN in every dtype) before the run, so a value the
// kernel does not write shows up as NaN.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/depthwise_bwd_nhwc.cuh"
#include "cuda/pointwise_tile.cuh"

namespace {

using dwsep::cuda::AccOf;
using dwsep::cuda::DType;
using dwsep::cuda::DwShape;

std::vector<unsigned char> read_file(const std::string& path, size_t bytes) {
  std::vector<unsigned char> buf(bytes);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  const size_t got = bytes == 0 ? 0 : std::fread(buf.data(), 1, bytes, f);
  std::fclose(f);
  if (got != bytes) {
    std::fprintf(stderr, "%s: expected %zu bytes, read %zu\n", path.c_str(), bytes, got);
    std::exit(2);
  }
  return buf;
}

// A heap copy of exactly `count` elements, so that AddressSanitizer bounds the kernel's
// accesses at the tensor's own end.
template <typename U>
U* exact_copy(const std::vector<unsigned char>& src, size_t count) {
  U* p = static_cast<U*>(std::malloc(count * sizeof(U) > 0 ? count * sizeof(U) : 1));
  if (count > 0) std::memcpy(p, src.data(), count * sizeof(U));
  return p;
}

template <typename U>
U* nan_filled(size_t count) {
  U* p = static_cast<U*>(std::malloc(count * sizeof(U) > 0 ? count * sizeof(U) : 1));
  std::memset(p, 0xff, count * sizeof(U));
  return p;
}

template <typename U>
int write_file(const std::string& path, const U* p, size_t count) {
  FILE* f = std::fopen(path.c_str(), "wb");
  const bool ok = f != nullptr && std::fwrite(p, sizeof(U), count, f) == count;
  if (f != nullptr) std::fclose(f);
  if (!ok) std::fprintf(stderr, "cannot write %s\n", path.c_str());
  return ok ? 0 : 2;
}

// ACT >= 0: the forward with that activation; ACT = -1: the reductions (stats, reduce) and
// ACT = -2 the backward, which take the activation at run time as their kernels do.
template <typename T, int S, int ACT, int VEC>
int run(const std::string& op, const std::string& dir, const DwShape& s, DType dtype, int act,
        int64_t nthreads) {
  using Acc = typename AccOf<T>::type;
  const size_t nx = s.N * s.C * s.H * s.W, ny = s.N * s.C * s.Ho * s.Wo, nw = s.C * 9;
  T* x = exact_copy<T>(read_file(dir + "/x.bin", nx * sizeof(T)), nx);
  T* w = exact_copy<T>(read_file(dir + "/w.bin", nw * sizeof(T)), nw);
  int rc = 0;
  if constexpr (ACT >= 0) {
    Acc* sc = exact_copy<Acc>(read_file(dir + "/scale.bin", s.C * sizeof(Acc)), s.C);
    Acc* sh = exact_copy<Acc>(read_file(dir + "/shift.bin", s.C * sizeof(Acc)), s.C);
    T* y = nan_filled<T>(ny);
    for (int64_t t = 0; t < nthreads; ++t)
      dwsep::cuda::dw_fwd_nhwc_thread<T, S, ACT, VEC>(x, w, sc, sh, y, s, t, nthreads);
    rc = write_file(dir + "/y.bin", y, ny);
    std::free(sc);
    std::free(sh);
    std::free(y);
  } else if constexpr (ACT == -2) {
    T* gy = exact_copy<T>(read_file(dir + "/grad_y.bin", ny * sizeof(T)), ny);
    T* ys = exact_copy<T>(read_file(dir + "/y_saved.bin", ny * sizeof(T)), ny);
    Acc* kv = exact_copy<Acc>(read_file(dir + "/k.bin", s.C * sizeof(Acc)), s.C);
    Acc* bv = exact_copy<Acc>(read_file(dir + "/b.bin", s.C * sizeof(Acc)), s.C);
    Acc* cv = exact_copy<Acc>(read_file(dir + "/c.bin", s.C * sizeof(Acc)), s.C);
    const bool use_z = op == "bwd";
    const dwsep::cuda::DwNhwcChunks g = dwsep::cuda::dw_nhwc_chunks(s, dtype);
    const size_t off = dwsep::cuda::dw_nhwc_bwd_gconv_offset(s, g);
    const size_t nws = dwsep::cuda::dw_workspace_elems(dwsep::cuda::DwKernel::kBwd, s, dtype);
    Acc* ws = nan_filled<Acc>(nws);
    T* gx = nan_filled<T>(nx);
    for (int64_t t = 0; t < nthreads; ++t) {
      dwsep::cuda::dw_bwd_gconv_nhwc_thread<T, S, VEC>(gy, ys, x, w, kv, bv, cv, ws + off, ws, s, g,
                                                       act, use_z, t, nthreads);
    }
    for (int64_t t = 0; t < nthreads; ++t)
      dwsep::cuda::dw_bwd_dx_nhwc_thread<T, S, VEC>(ws + off, w, gx, s, t, nthreads);
    rc = write_file(dir + "/y.bin", gx, nx);
    if (rc == 0) rc = write_file(dir + "/ws.bin", ws, g.chunks * s.C * 9);
    for (void* p : {static_cast<void*>(gy), static_cast<void*>(ys), static_cast<void*>(kv),
                    static_cast<void*>(bv), static_cast<void*>(cv), static_cast<void*>(ws),
                    static_cast<void*>(gx)})
      std::free(p);
  } else if (op == "stats") {
    const dwsep::cuda::DwNhwcChunks g = dwsep::cuda::dw_nhwc_chunks(s, dtype);
    const size_t nws = g.chunks * s.C * 3;
    Acc* ws = nan_filled<Acc>(nws);
    for (int64_t t = 0; t < nthreads; ++t)
      dwsep::cuda::dw_stats_nhwc_thread<T, S, VEC>(x, w, ws, s, g, t, nthreads);
    rc = write_file(dir + "/ws.bin", ws, nws);
    std::free(ws);
  } else {
    T* gy = exact_copy<T>(read_file(dir + "/grad_y.bin", ny * sizeof(T)), ny);
    T* ys = exact_copy<T>(read_file(dir + "/y_saved.bin", ny * sizeof(T)), ny);
    Acc* mu = exact_copy<Acc>(read_file(dir + "/mean.bin", s.C * sizeof(Acc)), s.C);
    Acc* is = exact_copy<Acc>(read_file(dir + "/invstd.bin", s.C * sizeof(Acc)), s.C);
    const dwsep::cuda::DwNhwcChunks g = dwsep::cuda::dw_nhwc_chunks(s, dtype);
    const size_t nws = g.chunks * s.C * 2;
    Acc* ws = nan_filled<Acc>(nws);
    for (int64_t t = 0; t < nthreads; ++t) {
      dwsep::cuda::dw_bwd_reduce_nhwc_thread<T, S, VEC>(gy, ys, x, w, mu, is, ws, s, g, act, t,
                                                        nthreads);
    }
    rc = write_file(dir + "/ws.bin", ws, nws);
    for (void* p : {static_cast<void*>(gy), static_cast<void*>(ys), static_cast<void*>(mu),
                    static_cast<void*>(is), static_cast<void*>(ws)})
      std::free(p);
  }
  std::free(x);
  std::free(w);
  return rc;
}

template <typename T>
int dispatch(const std::string& op, const std::string& dir, const DwShape& s, DType dtype, int act,
             bool vec, int64_t nthreads) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kBwdVec = sizeof(T) >= 4 ? 16 / sizeof(T) : 4;  // as dw_bwd's dispatch
  const bool bwd = op == "bwd" || op == "bwd_noz";
  const int width = bwd ? kBwdVec : kVec;
  if (vec && s.C % width != 0) {
    std::fprintf(stderr, "VEC=0 (vectors) needs C %% %d == 0, got C=%lld\n", width,
                 static_cast<long long>(s.C));
    return 2;
  }
  // The forward's and dx's launchers give at least a thread per channel vector.
  if ((op == "fwd" || bwd) && nthreads < s.C / (vec ? width : 1)) {
    std::fprintf(stderr, "NTHREADS must be at least C / VEC\n");
    return 2;
  }
#define DWSEP_HOST_RUN(S_, ACT_)                                        \
  return vec ? run<T, S_, ACT_, kVec>(op, dir, s, dtype, act, nthreads) \
             : run<T, S_, ACT_, 1>(op, dir, s, dtype, act, nthreads)
  if (bwd) {
    if (vec) {
      return s.stride == 1 ? run<T, 1, -2, kBwdVec>(op, dir, s, dtype, act, nthreads)
                           : run<T, 2, -2, kBwdVec>(op, dir, s, dtype, act, nthreads);
    }
    return s.stride == 1 ? run<T, 1, -2, 1>(op, dir, s, dtype, act, nthreads)
                         : run<T, 2, -2, 1>(op, dir, s, dtype, act, nthreads);
  }
  if (op != "fwd") {
    if (s.stride == 1) DWSEP_HOST_RUN(1, -1);
    DWSEP_HOST_RUN(2, -1);
  }
  if (s.stride == 1) {
    if (act == 0) DWSEP_HOST_RUN(1, 0);
    if (act == 1) DWSEP_HOST_RUN(1, 1);
    DWSEP_HOST_RUN(1, 2);
  }
  if (act == 0) DWSEP_HOST_RUN(2, 0);
  if (act == 1) DWSEP_HOST_RUN(2, 1);
  DWSEP_HOST_RUN(2, 2);
#undef DWSEP_HOST_RUN
}

}  // namespace

// pack16 (cuda_common.cuh, the 16-byte stores of the pointwise GEMM epilogue): x.bin holds
// COUNT accumulator values (fp64 for DTYPE float64, fp32 otherwise), COUNT a multiple of
// 16 / sizeof(T); y.bin gets each group of 16 / sizeof(T) converted to T and packed, in the
// order the 16 bytes land in memory.
template <typename T>
int run_pack16(const std::string& dir, int64_t count) {
  using Acc = typename AccOf<T>::type;
  constexpr int64_t V = 16 / sizeof(T);
  if (count % V != 0) {
    std::fprintf(stderr, "pack16: COUNT must be a multiple of %lld\n", static_cast<long long>(V));
    return 2;
  }
  const auto raw = read_file(dir + "/x.bin", static_cast<size_t>(count) * sizeof(Acc));
  Acc* v = exact_copy<Acc>(raw, static_cast<size_t>(count));
  uint4* out = nan_filled<uint4>(static_cast<size_t>(count / V));
  for (int64_t i = 0; i < count / V; ++i) out[i] = dwsep::cuda::pack16<T>(v + i * V);
  const int rc = write_file(dir + "/y.bin", out, static_cast<size_t>(count / V));
  std::free(v);
  std::free(out);
  return rc;
}

// A deterministic distinct finite value for element i of an operand.
template <typename T>
T test_value(size_t i) {
  if constexpr (sizeof(T) == 2) {
    const uint16_t bits = static_cast<uint16_t>(i % 30000 + 1);  // finite for fp16 and bf16
    T v;
    std::memcpy(&v, &bits, 2);
    return v;
  } else {
    return static_cast<T>(i + 1);
  }
}

// An operand of nb batches (stride `batch`) of `rows` rows (stride ld) of `cols` elements, in an
// exact allocation (a read past its last element stops the run).
template <typename T>
struct HostOperand {
  T* p = nullptr;
  size_t count = 0;
  HostOperand(int64_t nb, int64_t batch, int64_t rows, int64_t ld, int64_t cols) {
    count = rows > 0 && cols > 0 && nb > 0
                ? static_cast<size_t>((nb - 1) * batch + (rows - 1) * ld + cols)
                : size_t{0};
    p = static_cast<T*>(std::malloc(count > 0 ? count * sizeof(T) : 16));
    for (size_t i = 0; i < count; ++i) p[i] = test_value<T>(i);
  }
  ~HostOperand() { std::free(p); }
};

// Checks one shared tile (R rows of COLS elements, pitch COLS + V, pre-filled with 0xff) against
// want(r, c): a pointer to the expected element, or nullptr where the tile must hold zero.
template <typename T, int R, int COLS, class Want>
int compare_tile(const T* s, const std::string& what, Want want) {
  constexpr int V = 16 / sizeof(T);
  const T zero = dwsep::cuda::zero_value<T>();
  unsigned char ff[sizeof(T)];
  std::memset(ff, 0xff, sizeof(T));
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < COLS + V; ++c) {
      const T* w = c < COLS ? want(r, c) : nullptr;
      const void* expect = c >= COLS ? static_cast<const void*>(ff)
                           : w       ? static_cast<const void*>(w)
                                     : static_cast<const void*>(&zero);
      if (std::memcmp(s + r * (COLS + V) + c, expect, sizeof(T)) != 0) {
        std::fprintf(stderr, "%s: shared element (%d, %d) wrong\n", what.c_str(), r, c);
        return 1;
      }
    }
  return 0;
}

// pwtile (pointwise_tile.cuh, the GEMM's operand tile loads): every thread of one block runs
// load_tile<T, R, CPR, NT, W> (W = 17: kFullChunks, the predicated 16-byte copies) for a tile with
// rows_left rows of cols_left elements at stride ld (an exact allocation, so a read past the last
// valid element stops the run); the shared tile, pre-filled with 0xff bytes, must then hold those
// elements, zeros elsewhere in its R x CPR*V extent, and the 0xff pattern in its row padding. The
// values are distinct finite bit patterns; the comparison is bitwise. Returns 1 with the first
// mismatch.
template <typename T, int R, int CPR, int NT, int W>
int check_tile(int rows_left, int cols_left, int64_t ld) {
  constexpr int V = 16 / sizeof(T);
  constexpr int COLS = CPR * V;
  const int pitch = COLS + V;
  HostOperand<T> g(1, 0, rows_left, ld, cols_left);
  T* s = nan_filled<T>(static_cast<size_t>(R) * pitch);
  for (int tid = 0; tid < NT; ++tid)
    dwsep::cuda::load_tile<T, R, CPR, NT, W>(s, pitch, g.p, ld, rows_left, cols_left, tid);
  const int bad = compare_tile<T, R, COLS>(s, "pwtile", [&](int r, int c) -> const T* {
    return r < rows_left && c < cols_left ? g.p + r * ld + c : nullptr;
  });
  std::free(s);
  return bad;
}

// pwwalk (pointwise_tile.cuh: OperandStream + KWalk, the GEMM's k-loop loads): every thread of
// one block keeps its own A and B streams and k-walk, as in pw_gemm_kernel, and loads k-tiles
// kt0 .. kt0 + nkt - 1 of the flattened (batch, k-tile) sequence for the C tile (tm, tn) of an
// M x N x K GEMM over nb batches; A is [m][k] (AK) or [k][m], B [n][k] (BK) or [k][n], with the
// given row and batch strides. After each k-tile both shared tiles are compared bitwise with
// the elements of batch kt / KT at k offset (kt % KT) * BK, zeros outside the valid extents.
template <typename T, int BM, int NT, bool AK, bool BKM, int W>
int check_walk(int64_t M, int64_t N, int64_t K, int64_t nb, int64_t lda, int64_t ldb,
               int64_t batch_a, int64_t batch_b, int64_t kt0, int64_t nkt, int64_t tm, int64_t tn) {
  constexpr int V = 16 / sizeof(T), BK = 64 / sizeof(T), BN = BM;
  constexpr int AR = AK ? BM : BK, ACOLS = AK ? BK : BM;
  constexpr int BR = BKM ? BN : BK, BCOLS = BKM ? BK : BN;
  using OpA = dwsep::cuda::OperandStream<T, BK, AR, ACOLS / V, NT, AK>;
  using OpB = dwsep::cuda::OperandStream<T, BK, BR, BCOLS / V, NT, BKM>;
  HostOperand<T> a(nb, batch_a, AK ? M : K, lda, AK ? K : M);
  HostOperand<T> b(nb, batch_b, BKM ? N : K, ldb, BKM ? K : N);
  const int64_t KT = (K + BK - 1) / BK, m0 = tm * BM, n0 = tn * BN;
  const int mv = static_cast<int>(std::min<int64_t>(BM, M - m0));
  const int nv = static_cast<int>(std::min<int64_t>(BN, N - n0));
  std::vector<OpA> op_a;
  std::vector<OpB> op_b;
  std::vector<dwsep::cuda::KWalk<BK>> walk(NT);
  for (int tid = 0; tid < NT; ++tid) {
    op_a.emplace_back(tid, a.p, lda, batch_a, m0, mv);
    op_b.emplace_back(tid, b.p, ldb, batch_b, n0, nv);
    walk[tid].start(kt0 / KT, (kt0 % KT) * BK, K, op_a[tid], op_b[tid]);
  }
  T* sa = nan_filled<T>(static_cast<size_t>(AR) * (ACOLS + V));
  T* sb = nan_filled<T>(static_cast<size_t>(BR) * (BCOLS + V));
  int bad = 0;
  for (int64_t kt = kt0; kt < kt0 + nkt && bad == 0; ++kt) {
    const int64_t bi = kt / KT, k0 = (kt % KT) * BK;
    const int kv = static_cast<int>(std::min<int64_t>(BK, K - k0));
    std::memset(sa, 0xff, static_cast<size_t>(AR) * (ACOLS + V) * sizeof(T));
    std::memset(sb, 0xff, static_cast<size_t>(BR) * (BCOLS + V) * sizeof(T));
    for (int tid = 0; tid < NT && bad == 0; ++tid) {
      if (walk[tid].depth() != kv) {
        std::fprintf(stderr, "pwwalk: k-tile %lld, thread %d: depth %d, want %d\n",
                     static_cast<long long>(kt), tid, walk[tid].depth(), kv);
        bad = 1;
      }
      op_a[tid].template load<W>(sa, ACOLS + V, kv);
      op_b[tid].template load<W>(sb, BCOLS + V, kv);
      walk[tid].next(op_a[tid], op_b[tid]);
    }
    if (bad) break;
    // A(m, k) of batch bi; the tile's row r and column c are (m, k) or (k, m).
    const std::string at = "pwwalk: k-tile " + std::to_string(kt) + ", ";
    bad = compare_tile<T, AR, ACOLS>(sa, at + "A", [&](int r, int c) -> const T* {
      const int m = AK ? r : c, k = AK ? c : r;
      if (m >= mv || k >= kv) return nullptr;
      const int64_t gm = m0 + m, gk = k0 + k;
      return a.p + bi * batch_a + (AK ? gm * lda + gk : gk * lda + gm);
    });
    if (bad == 0)
      bad = compare_tile<T, BR, BCOLS>(sb, at + "B", [&](int r, int c) -> const T* {
        const int n = BKM ? r : c, k = BKM ? c : r;
        if (n >= nv || k >= kv) return nullptr;
        const int64_t gn = n0 + n, gk = k0 + k;
        return b.p + bi * batch_b + (BKM ? gn * ldb + gk : gk * ldb + gn);
      });
  }
  std::free(sa);
  std::free(sb);
  return bad;
}

template <typename T, int BM, int NT, bool AK, bool BKM>
int run_pwwalk(int w, const int64_t* g) {
  auto run = [&](auto width) {
    return check_walk<T, BM, NT, AK, BKM, decltype(width)::value>(
        g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]);
  };
  if (w == dwsep::cuda::kFullChunks) return run(std::integral_constant<int, 17>{});
  if (w == 16) return run(std::integral_constant<int, 16>{});
  if (w == 8) return run(std::integral_constant<int, 8>{});
  if constexpr (sizeof(T) <= 4) {
    if (w == 4) return run(std::integral_constant<int, 4>{});
  }
  if constexpr (sizeof(T) == 2) {
    if (w == 0) return run(std::integral_constant<int, 0>{});
  }
  std::fprintf(stderr, "pwwalk: width %d is not one the kernel uses for this type\n", w);
  return 2;
}

// The operand layouts the pointwise ops use: (K, K), (K, N), (M, N).
template <typename T, int BM, int NT>
int pwwalk_layout(bool ak, bool bk, int w, const int64_t* g) {
  if (ak && bk) return run_pwwalk<T, BM, NT, true, true>(w, g);
  if (ak && !bk) return run_pwwalk<T, BM, NT, true, false>(w, g);
  if (!ak && !bk) return run_pwwalk<T, BM, NT, false, false>(w, g);
  std::fprintf(stderr, "pwwalk: M-major A with K-major B is not a layout the GEMM runs\n");
  return 2;
}

template <typename T>
int pwwalk_dispatch(int bm, bool ak, bool bk, int w, const int64_t* g) {
  if (bm == 64) return pwwalk_layout<T, 64, 128>(ak, bk, w, g);
  if constexpr (sizeof(T) == 2) {
    if (bm == 128) return pwwalk_layout<T, 128, 256>(ak, bk, w, g);
  }
  std::fprintf(stderr, "pwwalk: no BM=%d configuration for this type\n", bm);
  return 2;
}

// The tile shapes of pw_gemm_kernel: BK = 64 bytes of K per stage; K-major operands are BM rows
// of BK / V chunks, M/N-major ones BK rows of BM / V chunks.
template <typename T, int BM, int NT, bool KMAJOR>
int run_pwtile(int w, int rows_left, int cols_left, int64_t ld) {
  constexpr int V = 16 / sizeof(T), BK = 64 / sizeof(T);
  constexpr int R = KMAJOR ? BM : BK, CPR = KMAJOR ? BK / V : BM / V;
  if (w == dwsep::cuda::kFullChunks) {  // 16-byte chunks that are full or empty
    if (cols_left % V != 0) {
      std::fprintf(stderr, "pwtile: full chunks need cols_left %% %d == 0, got %d\n", V, cols_left);
      return 2;
    }
    return check_tile<T, R, CPR, NT, dwsep::cuda::kFullChunks>(rows_left, cols_left, ld);
  }
  if (w == 16) return check_tile<T, R, CPR, NT, 16>(rows_left, cols_left, ld);
  if (w == 8) return check_tile<T, R, CPR, NT, 8>(rows_left, cols_left, ld);
  if constexpr (sizeof(T) <= 4) {
    if (w == 4) return check_tile<T, R, CPR, NT, 4>(rows_left, cols_left, ld);
  }
  if constexpr (sizeof(T) == 2) {
    if (w == 0) return check_tile<T, R, CPR, NT, 0>(rows_left, cols_left, ld);
  }
  std::fprintf(stderr, "pwtile: width %d is not one the kernel uses for this type\n", w);
  return 2;
}

template <typename T>
int pwtile_dispatch(int bm, bool kmajor, int w, int rows_left, int cols_left, int64_t ld) {
  if (bm == 64) {  // CfgSmall / CfgF64: 4 warps
    return kmajor ? run_pwtile<T, 64, 128, true>(w, rows_left, cols_left, ld)
                  : run_pwtile<T, 64, 128, false>(w, rows_left, cols_left, ld);
  }
  if constexpr (sizeof(T) == 2) {
    if (bm == 128) {  // CfgBig: 8 warps, 16-bit types only
      return kmajor ? run_pwtile<T, 128, 256, true>(w, rows_left, cols_left, ld)
                    : run_pwtile<T, 128, 256, false>(w, rows_left, cols_left, ld);
    }
  }
  std::fprintf(stderr, "pwtile: no BM=%d configuration for this type\n", bm);
  return 2;
}

int main(int argc, char** argv) {
  if (argc == 9 && std::string(argv[1]) == "pwtile") {
    // pwtile DTYPE BM MAJOR(k|mn) W ROWS_LEFT COLS_LEFT LD
    const std::string dtype = argv[2];
    const int bm = std::atoi(argv[3]);
    const bool kmajor = std::string(argv[4]) == "k";
    const int w = std::atoi(argv[5]), rows = std::atoi(argv[6]), cols = std::atoi(argv[7]);
    const int64_t ld = std::atoll(argv[8]);
    if (dtype == "float32") return pwtile_dispatch<float>(bm, kmajor, w, rows, cols, ld);
    if (dtype == "float64") return pwtile_dispatch<double>(bm, kmajor, w, rows, cols, ld);
    if (dtype == "float16") return pwtile_dispatch<__half>(bm, kmajor, w, rows, cols, ld);
    if (dtype == "bfloat16") return pwtile_dispatch<__nv_bfloat16>(bm, kmajor, w, rows, cols, ld);
    std::fprintf(stderr, "unknown dtype %s\n", dtype.c_str());
    return 2;
  }
  if (argc == 19 && std::string(argv[1]) == "pwwalk") {
    // pwwalk DTYPE BM AMAJOR BMAJOR W M N K NB LDA LDB BATCH_A BATCH_B KT0 NKT TM TN
    const std::string dtype = argv[2];
    const int bm = std::atoi(argv[3]);
    const bool ak = std::string(argv[4]) == "k", bk = std::string(argv[5]) == "k";
    const int w = std::atoi(argv[6]);
    int64_t g[12];
    for (int i = 0; i < 12; ++i) g[i] = std::atoll(argv[7 + i]);
    if (dtype == "float32") return pwwalk_dispatch<float>(bm, ak, bk, w, g);
    if (dtype == "float64") return pwwalk_dispatch<double>(bm, ak, bk, w, g);
    if (dtype == "float16") return pwwalk_dispatch<__half>(bm, ak, bk, w, g);
    if (dtype == "bfloat16") return pwwalk_dispatch<__nv_bfloat16>(bm, ak, bk, w, g);
    std::fprintf(stderr, "unknown dtype %s\n", dtype.c_str());
    return 2;
  }
  if (argc == 5 && std::string(argv[1]) == "pack16") {  // pack16 DIR DTYPE COUNT
    const std::string dir = argv[2], dtype = argv[3];
    const int64_t count = std::atoll(argv[4]);
    if (dtype == "float32") return run_pack16<float>(dir, count);
    if (dtype == "float64") return run_pack16<double>(dir, count);
    if (dtype == "float16") return run_pack16<__half>(dir, count);
    if (dtype == "bfloat16") return run_pack16<__nv_bfloat16>(dir, count);
    std::fprintf(stderr, "unknown dtype %s\n", dtype.c_str());
    return 2;
  }
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s OP DIR DTYPE N C H W STRIDE ACT VEC NTHREADS\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1], dir = argv[2], dtype = argv[3];
  DwShape s{};
  s.N = std::atoll(argv[4]);
  s.C = std::atoll(argv[5]);
  s.H = std::atoll(argv[6]);
  s.W = std::atoll(argv[7]);
  s.stride = std::atoi(argv[8]);
  s.Ho = (s.H - 1) / s.stride + 1;
  s.Wo = (s.W - 1) / s.stride + 1;
  s.nhwc = true;
  const int act = std::atoi(argv[9]);
  const bool vec = std::atoi(argv[10]) == 0;
  const int64_t nthreads = std::atoll(argv[11]);
  if ((op != "fwd" && op != "stats" && op != "reduce" && op != "bwd" && op != "bwd_noz") ||
      (s.stride != 1 && s.stride != 2) || act < 0 || act > 2 || nthreads < 1) {
    std::fprintf(
        stderr,
        "bad arguments (OP fwd|stats|reduce|bwd|bwd_noz, stride 1|2, act 0..2, NTHREADS >= 1)\n");
    return 2;
  }
  if (dtype == "float32") return dispatch<float>(op, dir, s, DType::kFloat32, act, vec, nthreads);
  if (dtype == "float64") return dispatch<double>(op, dir, s, DType::kFloat64, act, vec, nthreads);
  if (dtype == "float16") return dispatch<__half>(op, dir, s, DType::kFloat16, act, vec, nthreads);
  if (dtype == "bfloat16") {
    return dispatch<__nv_bfloat16>(op, dir, s, DType::kBFloat16, act, vec, nthreads);
  }
  std::fprintf(stderr, "unknown dtype %s\n", dtype.c_str());
  return 2;
}
