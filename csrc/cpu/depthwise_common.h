// Pieces shared by the CPU depthwise and pointwise kernels: vector load/store with dtype
// conversion, activation helpers, compile-time dispatch, fixed (thread-count independent)
// chunking, moment merging, the glue checks, and the two 3x3 conv cores (NHWC: vectors over C;
// NCHW: vectors along W over zero-padded row buffers).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/cpu_common.h"

namespace dwsep {
namespace cpu {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------
// Vector I/O: T storage, Acc (fp32, or fp64 for fp64) arithmetic. Vectors hold kV Acc lanes.

template <typename T>
struct VecIO {
  using Acc = typename AccOf<T>::type;
  using Vec = Vectorized<Acc>;
  static constexpr int64_t kV = Vec::size();

  static inline Vec load(const T* p) {
    if constexpr (std::is_same_v<T, Acc>) {
      return Vec::loadu(p);
    } else if constexpr (std::is_same_v<T, at::Half>) {
      Vec v;
      at::vec::load_fp32_from_fp16(p, v);
      return v;
    } else {
      Vec v;
      at::vec::load_fp32_from_bf16(p, v);
      return v;
    }
  }
  // First n lanes from p, the rest zero.
  static inline Vec load(const T* p, int64_t n) {
    if constexpr (std::is_same_v<T, Acc>) {
      return Vec::loadu(p, n);
    } else {
      Acc tmp[kV] = {};
      for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<Acc>(p[i]);
      return Vec::loadu(tmp);
    }
  }
  static inline void store(T* p, const Vec& v) {
    if constexpr (std::is_same_v<T, Acc>) {
      v.store(p);
    } else {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
      if constexpr (std::is_same_v<T, at::Half>) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(__m256(v)));
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
      }
#else
      at::vec::convert_from_float<T>(v, v).store(p, kV);
#endif
    }
  }
  // First n lanes of v to p.
  static inline void store(T* p, const Vec& v, int64_t n) {
    if constexpr (std::is_same_v<T, Acc>) {
      v.store(p, n);
    } else {
      Acc tmp[kV];
      v.store(tmp);
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
    }
  }
};

// dst[j * ld_dst + i] = src[i * ld_src + j] for i, j < 8 (an 8x8 fp32 transpose), in registers
// on AVX2: 8 loads, 24 shuffles, 8 stores, inlined. (at::vec::transpose_mxn<float, 8, 8> is the
// same idea, but GCC keeps it out of line and spills half of it to the stack.)
inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // columns 0, 1 | 4, 5 of rows i, i + 1
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // columns 2, 3 | 6, 7
  }
  for (int h = 0; h < 8; h += 4) {  // rows h .. h + 3: columns c | c + 4 in r[h + c]
    r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ld_dst, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ld_dst, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
#endif
}

// dst[0, n) = src[0, n) converted to Acc; src and dst must not overlap.
// (Explicit vector loops rather than memcpy: glibc's `rep movsb` path for mid-sized copies is
// several times slower than this on the AMD hosts measured.) A ragged tail of a run of at least
// one vector is one more full vector ending at n, overlapping the last one (it rewrites equal
// values): no scalar tail for the 14- and 28-wide rows of MobileNet's small planes.
template <typename T>
inline void convert_to_acc(const T* src, typename AccOf<T>::type* dst, int64_t n) {
  using IO = VecIO<T>;
  int64_t i = 0;
  for (; i + IO::kV <= n; i += IO::kV) IO::load(src + i).store(dst + i);
  if (i == n) return;
  if (n >= IO::kV) {
    IO::load(src + n - IO::kV).store(dst + n - IO::kV);
    return;
  }
  for (; i < n; ++i) dst[i] = static_cast<typename AccOf<T>::type>(src[i]);
}

// dst[0, n) = src[0, n) rounded to T; src and dst must not overlap. Tail as in convert_to_acc.
template <typename T>
inline void convert_from_acc(const typename AccOf<T>::type* src, T* dst, int64_t n) {
  using IO = VecIO<T>;
  int64_t i = 0;
  for (; i + IO::kV <= n; i += IO::kV) IO::store(dst + i, IO::Vec::loadu(src + i));
  if (i == n) return;
  if (n >= IO::kV) {
    IO::store(dst + n - IO::kV, IO::Vec::loadu(src + n - IO::kV));
    return;
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Row copies for rows shorter than a vector (the 7-wide rows of 7x7 planes), where the tail
// trick above does not apply: one full vector, reading src[0, kV) (the caller guarantees kV
// readable elements, e.g. the rows after this one in the same plane) and writing dst[0, kV), so
// dst[n, kV) receives junk the caller must overwrite or clear. Longer runs, or too few readable
// elements: the exact copies above.
template <typename T>
inline void convert_to_acc_over(const T* src, typename AccOf<T>::type* dst, int64_t n,
                                int64_t readable) {
  using IO = VecIO<T>;
  if (n < IO::kV && readable >= IO::kV) {
    IO::load(src).store(dst);
  } else {
    convert_to_acc<T>(src, dst, n);
  }
}
// The same for stores: writes dst[0, kV) when n < kV <= writable (junk in dst[n, kV)).
template <typename T>
inline void convert_from_acc_over(const typename AccOf<T>::type* src, T* dst, int64_t n,
                                  int64_t writable) {
  using IO = VecIO<T>;
  if (n < IO::kV && writable >= IO::kV) {
    IO::store(dst, IO::Vec::loadu(src));
  } else {
    convert_from_acc<T>(src, dst, n);
  }
}

// Sum of the lanes, in lane order, in double.
template <typename Acc>
inline double hsum(const Vectorized<Acc>& v) {
  Acc tmp[Vectorized<Acc>::size()];
  v.store(tmp);
  double s = 0;
  for (int64_t i = 0; i < Vectorized<Acc>::size(); ++i) s += static_cast<double>(tmp[i]);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Activations (kAct is a compile-time act code).

template <int kAct, typename Vec>
inline Vec act_vec(const Vec& v) {
  // clamp/clamp_min put v last in max/min, so a NaN v propagates (as F.relu6 does) without the
  // extra NaN fix-ups of at::vec::maximum/minimum.
  if constexpr (kAct == kActRelu) {
    return at::vec::clamp_min(v, Vec(0));
  } else if constexpr (kAct == kActRelu6) {
    return at::vec::clamp(v, Vec(0), Vec(6));
  } else {
    return v;
  }
}

// g where the activation passes gradient (judged from its input or output), else 0.
// NaN passes (every comparison with NaN is false), as the other backends' masks do.
template <int kAct, typename Vec>
inline Vec act_grad(const Vec& g, const Vec& v) {
  if constexpr (kAct == kActRelu) {
    return Vec::blendv(g, Vec(0), v <= Vec(0));
  } else if constexpr (kAct == kActRelu6) {
    return Vec::blendv(g, Vec(0), (v <= Vec(0)) | (v >= Vec(6)));
  } else {
    return g;
  }
}

// ---------------------------------------------------------------------------------------------
// Run-time values to template arguments, one switch each.

template <class F>
inline void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case kActRelu:
      f(std::integral_constant<int, kActRelu>{});
      break;
    case kActRelu6:
      f(std::integral_constant<int, kActRelu6>{});
      break;
    default:
      f(std::integral_constant<int, kActNone>{});
      break;
  }
}

template <class F>
inline void dispatch_stride(int64_t stride, F&& f) {
  if (stride == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
inline int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}

// Grain (work items per task) so that a task does at least ~`target` elements of work.
inline int64_t grain_for(int64_t work_per_item, int64_t target = 32768) {
  return std::max<int64_t>(1, target / std::max<int64_t>(1, work_per_item));
}

// ---------------------------------------------------------------------------------------------
// Moments (count, mean, M2) merged with Chan et al.'s formula, in double.

struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mean_b, double m2_b) {
    if (nb <= 0) return;
    const double tot = n + nb;
    const double d = mean_b - mean;
    mean += d * (nb / tot);
    m2 += m2_b + d * d * (n * nb / tot);
    n = tot;
  }
  double var() const { return n > 0 ? m2 / n : 0.0; }
};

// The same merge on vectors of per-channel moments (counts are common to all lanes).
template <typename Vec>
inline void chan_merge(Vec& mean_a, Vec& m2_a, double na, const Vec& mean_b, const Vec& m2_b,
                       double nb) {
  using Acc = typename Vec::value_type;
  const double tot = na + nb;
  const Vec d = mean_b - mean_a;
  mean_a = at::vec::fmadd(d, Vec(static_cast<Acc>(nb / tot)), mean_a);
  m2_a = at::vec::fmadd(d * d, Vec(static_cast<Acc>(na * nb / tot)), m2_a + m2_b);
}

// Merges one tile's shifted sums into a chunk's per-channel moments at lanes [c0, c0 + kV):
// K is a value of the tile (so the shifted sums do not cancel), s1 = sum(z - K) and
// s2 = sum((z - K)^2) over its nb outputs, i.e. mean = K + s1/nb and M2 = s2 - s1^2/nb, merged
// after the na outputs already in (km, k2).
template <typename Vec>
inline void merge_shifted_sums(typename Vec::value_type* km, typename Vec::value_type* k2,
                               int64_t c0, const Vec& K, const Vec& s1, const Vec& s2, double na,
                               double nb) {
  using Acc = typename Vec::value_type;
  const Vec inv(static_cast<Acc>(1.0 / nb));
  const Vec mr = at::vec::fmadd(s1, inv, K);
  const Vec m2r = at::vec::maximum(s2 - s1 * s1 * inv, Vec(0));
  Vec ma = Vec::loadu(km + c0), m2a = Vec::loadu(k2 + c0);
  chan_merge(ma, m2a, na, mr, m2r, nb);
  ma.store(km + c0);
  m2a.store(k2 + c0);
}

// ---------------------------------------------------------------------------------------------
// Depthwise glue checks.

struct DwShape {
  int64_t N, C, H, W, Ho, Wo;
  bool nhwc;
};

inline int64_t dw_out_size(int64_t size, int64_t stride) {
  return size <= 0 ? 0 : (size - 1) / stride + 1;
}

inline DwShape check_dw_input(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              int64_t stride) {
  check_cpu(op, "x", x);
  check_float_dtype(op, "x", x);
  const bool nhwc = is_nhwc(op, "x", x);
  check_cpu(op, "weight", weight);
  check_same(op, "weight", weight, x, "x");
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "dwsep::", op, ": weight must be (C,1,3,3) with C=", C, ", got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "dwsep::", op, ": weight must be contiguous, got strides ",
              weight.strides());
  TORCH_CHECK(stride == 1 || stride == 2, "dwsep::", op, ": stride must be 1 or 2, got ", stride);
  DwShape s;
  s.N = x.size(0);
  s.C = C;
  s.H = x.size(2);
  s.W = x.size(3);
  s.Ho = dw_out_size(s.H, stride);
  s.Wo = dw_out_size(s.W, stride);
  s.nhwc = nhwc;
  return s;
}

// t must be a CPU tensor like `ref` (dtype), of the given sizes, dense in the layout `nhwc`.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name, at::IntArrayRef sizes, bool nhwc) {
  check_cpu(op, name, t);
  check_same(op, name, t, ref, ref_name);
  TORCH_CHECK(t.sizes() == sizes, "dwsep::", op, ": ", name, " must have shape ", sizes, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(memory_format(nhwc)), "dwsep::", op, ": ", name,
              " must be contiguous in the ", nhwc ? "channels_last" : "NCHW", " layout of ",
              ref_name, ", got strides ", t.strides());
}

// Per-channel vector copied to a zero-padded buffer of length round_up(C, kV).
template <typename Acc>
inline std::vector<Acc> padded_vec(const at::Tensor& v, int64_t Cp) {
  std::vector<Acc> out(Cp, Acc(0));
  const Acc* p = v.const_data_ptr<Acc>();
  std::copy(p, p + v.numel(), out.begin());
  return out;
}

// One NHWC row of C channels: y = act(z * scale + shift), with scale and shift zero-padded to
// a multiple of the vector width (NaN propagates, see act_vec). z is T or Acc (the pointwise
// GEMM's fp32 tile); it may be y's own memory.
template <typename T, int kAct, typename Z>
inline void scale_shift_act_row(const Z* zr, T* yr, const typename AccOf<T>::type* sc,
                                const typename AccOf<T>::type* sh, int64_t C) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  static_assert(std::is_same_v<Z, T> || std::is_same_v<Z, typename IO::Acc>, "z is T or Acc");
  auto load = [](const Z* p, int64_t n) {
    if constexpr (std::is_same_v<Z, typename IO::Acc>) {
      return n == kV ? Vec::loadu(p) : Vec::loadu(p, n);
    } else {
      return n == kV ? IO::load(p) : IO::load(p, n);
    }
  };
  int64_t c = 0;
  for (; c + kV <= C; c += kV) {
    const Vec v = at::vec::fmadd(load(zr + c, kV), Vec::loadu(sc + c), Vec::loadu(sh + c));
    IO::store(yr + c, act_vec<kAct>(v));
  }
  if (c < C) {
    const Vec v = at::vec::fmadd(load(zr + c, C - c), Vec::loadu(sc + c), Vec::loadu(sh + c));
    IO::store(yr + c, act_vec<kAct>(v), C - c);
  }
}

// The M rows of a row-major (M, C) matrix: y = act(z * scale + shift), one vectorized pass,
// parallel over rows; z may be y (in place).
template <typename T, int kAct, typename Z>
void scale_shift_act_rows(const Z* z, T* y, const at::Tensor& scale, const at::Tensor& shift,
                          int64_t M, int64_t C) {
  using Acc = typename AccOf<T>::type;
  const int64_t Cp = round_up(C, VecIO<T>::kV);
  const auto sc = padded_vec<Acc>(scale, Cp);
  const auto sh = padded_vec<Acc>(shift, Cp);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / Cp), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      scale_shift_act_row<T, kAct>(z + r * C, y + r * C, sc.data(), sh.data(), C);
  });
}

// Depthwise weights (C,1,3,3) as Acc, transposed to [9][Cp] (zero-padded channels).
template <typename T>
inline std::vector<typename AccOf<T>::type> dw_weight_taps(const at::Tensor& weight, int64_t C,
                                                           int64_t Cp) {
  using Acc = typename AccOf<T>::type;
  std::vector<Acc> wt(9 * Cp, Acc(0));
  const T* w = weight.const_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < 9; ++t) wt[t * Cp + c] = static_cast<Acc>(w[c * 9 + t]);
  return wt;
}

// Prefetch the cache lines of base[begin, end) for reading, into L2 and up. On x86 as an
// asm statement the compiler must keep: GCC 12's dead-code elimination removed a loop of
// __builtin_prefetch calls from the in-place NHWC kernels (no prefetch instruction in their
// code), which made the 28x28x256 stride-1 forward 1.25x slower with x read from memory
// (bench/NOTES.md, session 19). test_cpu_prefetch_emitted checks the built library.
template <typename T>
inline void prefetch_span(const T* base, int64_t begin, int64_t end) {
  const char* p = reinterpret_cast<const char*>(base + begin);
  const char* e = reinterpret_cast<const char*>(base + end);
  for (; p < e; p += 64) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    asm volatile("prefetcht1 %0" : : "m"(*p));
#else
    __builtin_prefetch(p, 0, 2);
#endif
  }
}

// Buffer strides (elements) that avoid 4 KiB aliasing: a stride that is a multiple of 512 bytes
// (e.g. 1024 fp32 channels per pixel) puts all nine taps of an output in one L1 set, which was
// measured 3x slower. Such strides get 64 bytes more.
template <typename Acc>
inline int64_t pad_stride(int64_t n) {
  return (n * static_cast<int64_t>(sizeof(Acc))) % 512 == 0
             ? n + 64 / static_cast<int64_t>(sizeof(Acc))
             : n;
}

// Pixel stride of channel-vector buffers: C rounded up to whole vectors, then pad_stride.
template <typename Acc>
inline int64_t pixel_stride(int64_t C) {
  return pad_stride<Acc>(round_up(C, Vectorized<Acc>::size()));
}

// ---------------------------------------------------------------------------------------------
// NHWC conv core. NhwcRows keeps the last three input rows of an image as zero-padded Acc rows
// ((W+2) pixels x Cp channels; a ring keyed by row, each row converted once with one
// sequential copy). NhwcTaps then reads full vectors with no border checks:
// z[wo, c0:c0+kV] = sum_ij w_ij * row_i[wo*S+j, c0:c0+kV] (padded pixel index).

// z of four neighbouring output pixels from the row pointers r0, r1, r2 at the first pixel's
// first input column (P the pixel stride). Neighbouring outputs share input columns (stride 1:
// 6 columns per row feed 4 outputs; stride 2: 9), so each input vector is loaded once per row
// instead of once per tap: 18 (27) loads per 4 outputs instead of 36.
template <typename Acc, int S>
inline void conv4(const Acc* r0, const Acc* r1, const Acc* r2, int64_t P, const Vectorized<Acc>* w,
                  Vectorized<Acc>* out) {
  using Vec = Vectorized<Acc>;
  const Acc* rows[3] = {r0, r1, r2};
  Vec a[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  for (int i = 0; i < 3; ++i) {
    for (int col = 0; col < 3 * S + 3; ++col) {  // input columns wo*S .. (wo+3)*S+2
      const Vec v = Vec::loadu(rows[i] + col * P);
      for (int k = 0; k < 4; ++k) {  // output wo+k uses columns k*S .. k*S+2
        const int j = col - k * S;
        if (j >= 0 && j < 3) a[k] = at::vec::fmadd(v, w[3 * i + j], a[k]);
      }
    }
  }
  for (int k = 0; k < 4; ++k) out[k] = a[k];
}

// The constants of each channel block, [C / kV][stride][kV]: its nine taps (from wt, [9][Cp]),
// then the channel vectors of the extras (e.g. scale and shift), for
// NhwcTaps::sweep_pixel_groups. C a multiple of the vector. Empty when default-constructed (the
// callers' block-major fallbacks).
template <typename Acc>
struct BlockConstants {
  static constexpr int64_t kV = Vectorized<Acc>::size();
  std::vector<Acc> data;
  int64_t stride = 9;  // vectors per block

  BlockConstants() = default;
  BlockConstants(const std::vector<Acc>& wt, int64_t Cp, int64_t C,
                 std::initializer_list<const Acc*> extra)
      : data((9 + static_cast<int64_t>(extra.size())) * C),
        stride(9 + static_cast<int64_t>(extra.size())) {
    for (int64_t c0 = 0; c0 < C; c0 += kV) {
      Acc* b = data.data() + stride * c0;
      for (int t = 0; t < 9; ++t) std::copy_n(wt.data() + t * Cp + c0, kV, b + t * kV);
      int e = 9;
      for (const Acc* v : extra) std::copy_n(v + c0, kV, b + (e++) * kV);
    }
  }

  bool empty() const { return data.empty(); }

  // Bytes of the constants of C channels with `extras` extra vectors per block.
  static int64_t bytes(int64_t C, int64_t extras) {
    return (9 + extras) * C * static_cast<int64_t>(sizeof(Acc));
  }

  // Extra e (0-based, in the constructor's order) of the block whose constants start at kb.
  static Vectorized<Acc> extra(const Acc* kb, int e) {
    return Vectorized<Acc>::loadu(kb + (9 + e) * kV);
  }
};

template <typename Acc, int S>
struct NhwcTaps {
  using Vec = Vectorized<Acc>;
  const Acc* rows[3];
  int64_t P;           // pixel stride (elements)
  int64_t origin = 0;  // padded pixel index of rows[i][0] (1 when the rows are x itself)

  inline int64_t offset(int64_t wo, int64_t c0) const { return (wo * S - origin) * P + c0; }

  inline Vec z(int64_t wo, int64_t c0, const Vec* w) const {
    const int64_t off = offset(wo, c0);
    Vec a[3];
    for (int i = 0; i < 3; ++i) {
      const Acc* p = rows[i] + off;
      a[i] = at::vec::fmadd(
          Vec::loadu(p), w[3 * i],
          at::vec::fmadd(Vec::loadu(p + P), w[3 * i + 1], Vec::loadu(p + 2 * P) * w[3 * i + 2]));
    }
    return a[0] + a[1] + a[2];
  }

  // z of the four output pixels wo..wo+3 (conv4).
  inline void z4(int64_t wo, int64_t c0, const Vec* w, Vec* out) const {
    const int64_t off = offset(wo, c0);
    conv4<Acc, S>(rows[0] + off, rows[1] + off, rows[2] + off, P, w, out);
  }

  // f(wo, z(wo)) for wo = begin, begin + 1, ..., end - 1 in order: four outputs at a time
  // through z4, the remaining (< 4) one at a time.
  template <class F>
  inline void sweep(int64_t begin, int64_t end, int64_t c0, const Vec* w, F&& f) const {
    int64_t wo = begin;
    for (; wo + 3 < end; wo += 4) {
      Vec zs[4];
      z4(wo, c0, w, zs);
      for (int k = 0; k < 4; ++k) f(wo + k, zs[k]);
    }
    for (; wo < end; ++wo) f(wo, z(wo, c0, w));
  }

  // f(wo, c0, zs, n, kb) for the outputs [begin, end) and every channel block c0 of C (a
  // multiple of the vector), pixel-major: for each group of n outputs wo..wo+n-1 (n = 4, the
  // last < 4 one at a time), all channel blocks, with zs[k] = z(wo + k); consecutive calls of f
  // cover whole output pixels in order. The constants of block c0 are at kb = k.data +
  // (c0 / kV) * k.stride * kV (BlockConstants): the nine taps, then the caller's own (read
  // with BlockConstants::extra); one pointer walks them, three row pointers walk the inputs.
  // (Written over [9][Cp] taps and the rows through this struct, GCC kept 18 column pointers and
  // the taps' 9 on the stack: 30 instructions per output vector instead of 21. With the taps held
  // in registers across the sweep, the backward's per-output work spilled them: 16 ymm registers on
  // AVX2.)
  template <class F>
  inline void sweep_pixel_groups(int64_t begin, int64_t end, int64_t C,
                                 const BlockConstants<Acc>& k, F&& f) const {
    constexpr int64_t kV = Vec::size();
    // Locals, so that the loops below do not reload them after f's stores.
    const Acc* const consts = k.data.data();
    const int64_t step = k.stride * kV, stride = P;
    int64_t wo = begin;
    for (; wo + 3 < end; wo += 4) {
      const int64_t off = offset(wo, 0);
      const Acc *r0 = rows[0] + off, *r1 = rows[1] + off, *r2 = rows[2] + off;
      const Acc* kb = consts;
      for (int64_t c0 = 0; c0 < C; c0 += kV, kb += step, r0 += kV, r1 += kV, r2 += kV) {
        Vec w[9];
        for (int t = 0; t < 9; ++t) w[t] = Vec::loadu(kb + t * kV);
        Vec zs[4];
        conv4<Acc, S>(r0, r1, r2, stride, w, zs);
        f(wo, c0, static_cast<const Vec*>(zs), 4, kb);
      }
    }
    for (; wo < end; ++wo) {
      const Acc* kb = consts;
      for (int64_t c0 = 0; c0 < C; c0 += kV, kb += step) {
        Vec w[9];
        for (int t = 0; t < 9; ++t) w[t] = Vec::loadu(kb + t * kV);
        const Vec z1 = z(wo, c0, w);
        f(wo, c0, &z1, 1, kb);
      }
    }
  }

  // acc[3i+j] += g * row_i[wo*S+j, c0:c0+kV]: the weight-gradient taps of output pixel wo.
  inline void wgrad(int64_t wo, int64_t c0, const Vec& g, Vec* acc) const {
    const int64_t off = offset(wo, c0);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        acc[3 * i + j] = at::vec::fmadd(g, Vec::loadu(rows[i] + off + j * P), acc[3 * i + j]);
  }

  // The same for the four output pixels wo..wo+3 (g[k] of pixel wo+k), each input vector loaded
  // once per row as in z4.
  inline void wgrad4(int64_t wo, int64_t c0, const Vec* g, Vec* acc) const {
    const int64_t off = offset(wo, c0);
    for (int i = 0; i < 3; ++i) {
      const Acc* p = rows[i] + off;
      for (int col = 0; col < 3 * S + 3; ++col) {
        const Vec v = Vec::loadu(p + col * P);
        for (int k = 0; k < 4; ++k) {
          const int j = col - k * S;
          if (j >= 0 && j < 3) acc[3 * i + j] = at::vec::fmadd(g[k], v, acc[3 * i + j]);
        }
      }
    }
  }

  // acc += wgrad of the outputs [begin, end), g(wo) at g + wo * gP: four at a time, then
  // singly.
  inline void wgrad_range(int64_t begin, int64_t end, int64_t c0, const Acc* g, int64_t gP,
                          Vec* acc) const {
    int64_t wo = begin;
    for (; wo + 3 < end; wo += 4) {
      const Vec gs[4] = {Vec::loadu(g + wo * gP), Vec::loadu(g + (wo + 1) * gP),
                         Vec::loadu(g + (wo + 2) * gP), Vec::loadu(g + (wo + 3) * gP)};
      wgrad4(wo, c0, gs, acc);
    }
    for (; wo < end; ++wo) wgrad(wo, c0, Vec::loadu(g + wo * gP), acc);
  }
};

template <typename T, int S>
class NhwcRows {
 public:
  using Acc = typename AccOf<T>::type;
  static constexpr int64_t kV = VecIO<T>::kV;

  NhwcRows(const T* x, const DwShape& s) : x_(x), H_(s.H), W_(s.W), C_(s.C) {
    P_ = pixel_stride<Acc>(s.C);
    len_ = pad_stride<Acc>((s.W + 2) * P_);
    buf_.assign(3 * len_, Acc(0));
    for (int i = 0; i < 3; ++i) {
      tag_[i] = -1;
      filled_[i] = 0;
    }
  }

  // The three input rows of output row ho of image n. A row new to the ring is converted lazily,
  // tile by tile, by ready(): the loads of x then interleave with the compute instead of coming
  // in one burst per row, which the hardware prefetchers handled poorly.
  NhwcTaps<Acc, S> taps(int64_t n, int64_t ho) {
    NhwcTaps<Acc, S> t;
    for (int i = 0; i < 3; ++i) {
      const int64_t h = ho * S - 1 + i;
      const int64_t key = n * (H_ + 2) + h + 1;  // unique per (image, row), rows -1..H
      const int64_t slot = ((h % 3) + 3) % 3;
      Acc* dst = buf_.data() + slot * len_;
      if (tag_[slot] != key) {
        tag_[slot] = key;
        if (h < 0 || h >= H_) {
          std::fill(dst + P_, dst + (W_ + 1) * P_, Acc(0));
          filled_[slot] = W_;
        } else {
          src_[slot] = x_ + (n * H_ + h) * W_ * C_;
          filled_[slot] = 0;
        }
      }
      cur_[i] = slot;
      t.rows[i] = dst;
    }
    t.P = P_;
    return t;
  }

  // Make the current rows valid for output columns [0, wb): image columns [0, wb*S+1).
  void ready(int64_t wb) {
    const int64_t need = std::min(W_, wb * S + 1);
    for (int i = 0; i < 3; ++i) {
      const int64_t slot = cur_[i];
      const int64_t from = filled_[slot];
      if (from >= need) continue;
      Acc* d = buf_.data() + slot * len_ + P_;  // pixel 0 is the left zero pad
      const T* src = src_[slot];
      if (C_ == P_) {
        convert_to_acc<T>(src + from * C_, d + from * P_, (need - from) * C_);
      } else {  // padding lanes past C stay 0
        for (int64_t w = from; w < need; ++w) convert_to_acc<T>(src + w * C_, d + w * P_, C_);
      }
      // The next tile's columns.
      prefetch_span(src, need * C_, std::min(W_, 2 * need - from) * C_);
      filled_[slot] = need;
    }
  }

 private:
  const T* x_;
  int64_t H_, W_, C_, P_, len_;
  int64_t tag_[3], filled_[3], cur_[3] = {0, 1, 2};
  const T* src_[3] = {nullptr, nullptr, nullptr};
  std::vector<Acc> buf_;
};

// NHWC rows read in place, with no ring copy: stride 1, T == Acc (fp32, fp64), C a multiple of
// the vector and planes at least kNhwcInPlaceMinW wide. The taps of the interior outputs (all
// three input columns inside the image) read x itself (NhwcTaps with origin 1; rows above or
// below the image read a zero row); the border outputs (the first and last columns) go
// through edge(), which skips the taps outside the image. Measured on the dev host (fp32,
// batch 8, 2 threads, against the ring + staging tile, alternated): with x read from memory
// (6 input sets rotated) 1.2-1.45x on the stride-1 112-, 56- and 28-wide MobileNet layers;
// stride 2 was 1.2-1.3x slower that way (faster only with x already in L3), 14 wide neutral,
// 7x7 with 1024 channels slower (a border output per 3.5 pixels; 36 KB of taps reloaded per
// pixel group). Hence stride 1 and the width threshold.
constexpr int64_t kNhwcInPlaceMinW = 28;

template <typename T, int S>
inline bool nhwc_in_place(const DwShape& s) {
  return S == 1 && std::is_same_v<T, typename AccOf<T>::type> && s.C % VecIO<T>::kV == 0 &&
         s.W >= kNhwcInPlaceMinW;
}

template <typename T, int S>
class NhwcInPlace {
 public:
  using Vec = Vectorized<T>;
  static_assert(std::is_same_v<T, typename AccOf<T>::type>, "in-place rows need T == Acc");
  static_assert(S == 1, "in-place rows are used at stride 1 only (see above)");

  // Output wo (= its centre column) is interior when 1 <= wo <= W - 2.
  NhwcInPlace(const T* x, const DwShape& s)
      : x_(x),
        H_(s.H),
        W_(s.W),
        C_(s.C),
        interior_end_(std::max<int64_t>(1, s.W - 1)),
        zero_(s.W * s.C, T(0)) {}

  // Taps of output row ho of image n (and the rows for edge()).
  NhwcTaps<T, S> taps(int64_t n, int64_t ho) {
    NhwcTaps<T, S> t;
    for (int i = 0; i < 3; ++i) {
      const int64_t h = ho * S - 1 + i;
      xr_[i] = (h >= 0 && h < H_) ? x_ + (n * H_ + h) * W_ * C_ : nullptr;
      t.rows[i] = xr_[i] ? xr_[i] : zero_.data();
    }
    t.P = C_;
    t.origin = 1;
    return t;
  }

  // Outputs [1, interior_end()) are interior; 0 and [max(1, interior_end()), Wo) are borders.
  int64_t interior_end() const { return interior_end_; }

  // f(t, x[row i][wo - 1 + j, c0 : c0 + kV]) for each tap t = 3i + j of border output wo that
  // lies inside the image.
  template <class F>
  inline void edge_taps(int64_t wo, int64_t c0, F&& f) const {
    const int64_t col0 = wo - 1;
    const int jlo = col0 < 0 ? 1 : 0;
    const int jhi = static_cast<int>(std::min<int64_t>(3, W_ - col0));
    for (int i = 0; i < 3; ++i) {
      if (!xr_[i]) continue;
      for (int j = jlo; j < jhi; ++j) f(3 * i + j, Vec::loadu(xr_[i] + (col0 + j) * C_ + c0));
    }
  }

  // z of border output wo for channels [c0, c0 + kV), the taps outside the image skipped.
  Vec edge(int64_t wo, int64_t c0, const T* wt, int64_t Cp) const {
    Vec acc(0);
    edge_taps(wo, c0, [&](int t, const Vec& v) {
      acc = at::vec::fmadd(v, Vec::loadu(wt + t * Cp + c0), acc);
    });
    return acc;
  }

  // acc[t] += g * (input under tap t) for border output wo: its weight-gradient taps.
  void edge_wgrad(int64_t wo, int64_t c0, const Vec& g, Vec* acc) const {
    edge_taps(wo, c0, [&](int t, const Vec& v) { acc[t] = at::vec::fmadd(g, v, acc[t]); });
  }

  // Prefetch the input columns of output columns [wa, wb) in the row new to this output row
  // (the bottom one; the other two were read for the previous row).
  void prefetch(int64_t wa, int64_t wb) const {
    if (xr_[2]) prefetch_span(xr_[2], std::max<int64_t>(0, wa - 1) * C_, std::min(W_, wb + 1) * C_);
  }

 private:
  const T* x_;
  int64_t H_, W_, C_, interior_end_;
  const T* xr_[3] = {nullptr, nullptr, nullptr};
  std::vector<T> zero_;
};

// NHWC rows are processed in column tiles of this many output pixels, so that the three input
// rows of a tile stay in L1 while each channel block sweeps the tile with its taps in registers.
inline int64_t nhwc_col_tile(int64_t P, int64_t S, int64_t acc_bytes) {
  return std::max<int64_t>(8, 16384 / (3 * S * P * acc_bytes));
}

// Tiles 8x wider (the input rows in L2, not L1) for the kernels whose per-tile overheads are
// larger: the statistics (a moment merge per tile and channel block), the backward reduction
// and the backward (two more input streams, grad_y and y, and g_conv rows written). Measured on
// the dev host (fp32, channels_last, batch 8, x from memory), against the forward's tiles:
// 56x56x128 s1 statistics 1.9 -> 1.0 ms, reduction 3.1 -> 2.15 ms, backward 4.9 -> 3.3 ms;
// 28x28x256 s1 0.74-0.9 -> 0.53-0.59, 1.63 -> 1.12 and 2.33 -> 1.84; 56x56x128 s2 backward
// 2.26 -> 1.94; whole rows (wider still) no better; 112-wide 32-channel rows unchanged. The
// forward itself was neutral either way and keeps the narrow tiles.
inline int64_t nhwc_wide_col_tile(int64_t P, int64_t S, int64_t acc_bytes) {
  return std::max<int64_t>(8, 131072 / (3 * S * P * acc_bytes));
}

// f(src, cb, ce) for the chunks [cb, ce) of [0, nchunks), in parallel, src the task's NHWC row
// source: the rows in place where nhwc_in_place allows, else the ring.
template <typename T, int S, class F>
inline void parallel_nhwc_rows(const T* x, const DwShape& s, int64_t nchunks, F&& f) {
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    if constexpr (S == 1 && std::is_same_v<T, typename AccOf<T>::type>) {
      if (nhwc_in_place<T, S>(s)) {
        NhwcInPlace<T, S> src(x, s);
        f(src, cb, ce);
        return;
      }
    }
    NhwcRows<T, S> src(x, s);
    f(src, cb, ce);
  });
}

// One column tile [wa, wb) of an output row, for code written once over both NHWC row sources
// (the ring, NhwcRows, and the in-place rows, NhwcInPlace; cv = the source's taps of the row,
// w = the nine tap vectors of channels [c0, c0 + kV), wt/Cp the [9][Cp] taps they came from).
//   tile_ready(src, wa, wb, WB): before the tile (ring: convert its columns; in place: prefetch
//     the next tile's).
//   tile_z(src, cv, wa, wb, c0, w, wt, Cp, f): f(wo, z(wo)) for every output of the tile (in
//     place: the interior ones swept, the border ones through edge()).
//   tile_z_pixels(src, cv, wa, wb, C, k, wt, Cp, f): the same for all channel blocks at once,
//     pixel-major, the taps read from per-block constants k (BlockConstants).
//   tile_wgrad(src, cv, wa, wb, c0, g, P, acc): acc[t] += g(wo) * tap t's input, with g(wo) at
//     g + wo * P, for every output of the tile.
template <typename T, int S>
inline void tile_ready(NhwcRows<T, S>& src, int64_t, int64_t wb, int64_t) {
  src.ready(wb);
}
template <typename T, int S>
inline void tile_ready(NhwcInPlace<T, S>& src, int64_t, int64_t wb, int64_t WB) {
  src.prefetch(wb, std::min(src.interior_end(), wb + WB));
}

template <typename T, int S, typename Acc, typename Vec, class F>
inline void tile_z(const NhwcRows<T, S>&, const NhwcTaps<Acc, S>& cv, int64_t wa, int64_t wb,
                   int64_t c0, const Vec* w, const Acc*, int64_t, F&& f) {
  cv.sweep(wa, wb, c0, w, f);
}
template <typename T, int S, typename Vec, class F>
inline void tile_z(const NhwcInPlace<T, S>& src, const NhwcTaps<T, S>& cv, int64_t wa, int64_t wb,
                   int64_t c0, const Vec* w, const T* wt, int64_t Cp, F&& f) {
  const int64_t ia = std::max<int64_t>(wa, 1), ib = std::min(wb, src.interior_end());
  for (int64_t wo = wa; wo < std::min(ia, wb); ++wo) f(wo, src.edge(wo, c0, wt, Cp));
  if (ia < ib) cv.sweep(ia, ib, c0, w, f);
  for (int64_t wo = std::max(ia, ib); wo < wb; ++wo) f(wo, src.edge(wo, c0, wt, Cp));
}

// The same, pixel-major (NhwcTaps::sweep_pixel_groups; C a multiple of the vector, k the
// per-block constants): f(wo, c0, zs, n, kb) for every output of the tile and every channel
// block, in place the border outputs one at a time through edge().
template <typename T, int S, typename Acc, class F>
inline void tile_z_pixels(const NhwcRows<T, S>&, const NhwcTaps<Acc, S>& cv, int64_t wa, int64_t wb,
                          int64_t C, const BlockConstants<Acc>& k, const Acc*, int64_t, F&& f) {
  cv.sweep_pixel_groups(wa, wb, C, k, f);
}
template <typename T, int S, class F>
inline void tile_z_pixels(const NhwcInPlace<T, S>& src, const NhwcTaps<T, S>& cv, int64_t wa,
                          int64_t wb, int64_t C, const BlockConstants<T>& k, const T* wt,
                          int64_t Cp, F&& f) {
  constexpr int64_t kV = Vectorized<T>::size();
  auto border = [&](int64_t wo) {
    const T* kb = k.data.data();
    for (int64_t c0 = 0; c0 < C; c0 += kV, kb += k.stride * kV) {
      const Vectorized<T> z = src.edge(wo, c0, wt, Cp);
      f(wo, c0, &z, 1, kb);
    }
  };
  const int64_t ia = std::max<int64_t>(wa, 1), ib = std::min(wb, src.interior_end());
  for (int64_t wo = wa; wo < std::min(ia, wb); ++wo) border(wo);
  if (ia < ib) cv.sweep_pixel_groups(ia, ib, C, k, f);
  for (int64_t wo = std::max(ia, ib); wo < wb; ++wo) border(wo);
}

template <typename T, int S, typename Acc, typename Vec>
inline void tile_wgrad(const NhwcRows<T, S>&, const NhwcTaps<Acc, S>& cv, int64_t wa, int64_t wb,
                       int64_t c0, const Acc* g, int64_t P, Vec* acc) {
  cv.wgrad_range(wa, wb, c0, g, P, acc);
}
template <typename T, int S, typename Vec>
inline void tile_wgrad(const NhwcInPlace<T, S>& src, const NhwcTaps<T, S>& cv, int64_t wa,
                       int64_t wb, int64_t c0, const T* g, int64_t P, Vec* acc) {
  const int64_t ia = std::max<int64_t>(wa, 1), ib = std::min(wb, src.interior_end());
  for (int64_t wo = wa; wo < std::min(ia, wb); ++wo)
    src.edge_wgrad(wo, c0, Vec::loadu(g + wo * P), acc);
  if (ia < ib) cv.wgrad_range(ia, ib, c0, g, P, acc);
  for (int64_t wo = std::max(ia, ib); wo < wb; ++wo)
    src.edge_wgrad(wo, c0, Vec::loadu(g + wo * P), acc);
}

// ---------------------------------------------------------------------------------------------
// NCHW conv core. PlaneRows keeps the last three input rows of one plane as zero-padded Acc
// rows (a ring keyed by h mod 3, each row converted once). Stride 1: row r[p] = x[p-1], zero at
// p = 0 and p > W. Stride 2: the padded row split into its even and odd entries, so that
// z[wo] = w0*even[wo] + w1*odd[wo] + w2*even[wo+1] reads contiguous vectors.

template <typename T, int S>
class PlaneRows {
 public:
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  static constexpr int64_t kV = IO::kV;

  PlaneRows(int64_t H, int64_t W) : H_(H), W_(W), Wo_(dw_out_size(W, S)) {
    if constexpr (S == 1) {
      half_ = 0;
      len_ = W + 2 + 2 * kV;
    } else {
      half_ = Wo_ + 1 + kV;
      len_ = 2 * half_;
      scratch_.assign(2 * half_ + 2 * kV, Acc(0));
    }
    buf_.assign(3 * len_, Acc(0));
  }

  // Offset of the odd half in a stride-2 row.
  int64_t half() const { return half_; }

  void reset(const T* plane) {
    plane_ = plane;
    for (auto& t : tag_) t = std::numeric_limits<int64_t>::min();
  }

  const Acc* get(int64_t h) {
    const int64_t slot = ((h % 3) + 3) % 3;
    Acc* dst = buf_.data() + slot * len_;
    if (tag_[slot] != h) {
      fill(h, dst);
      tag_[slot] = h;
    }
    return dst;
  }

 private:
  void fill(int64_t h, Acc* dst) {
    const bool inside = h >= 0 && h < H_;
    if constexpr (S == 1) {
      if (inside) {
        convert_to_acc<T>(plane_ + h * W_, dst + 1, W_);
      } else {
        std::fill(dst + 1, dst + 1 + W_, Acc(0));
      }
    } else {
      if (!inside) {
        std::fill(dst, dst + len_, Acc(0));
        return;
      }
      Acc* sc = scratch_.data();
      convert_to_acc<T>(plane_ + h * W_, sc + 1, W_);
      for (int64_t m = 0; m < Wo_ + 1; m += kV) {
        auto eo = at::vec::deinterleave2(Vec::loadu(sc + 2 * m), Vec::loadu(sc + 2 * m + kV));
        eo.first.store(dst + m);
        eo.second.store(dst + half_ + m);
      }
    }
  }

  int64_t H_, W_, Wo_, half_, len_;
  const T* plane_ = nullptr;
  int64_t tag_[3];
  std::vector<Acc> buf_, scratch_;
};

// z[wo0 : wo0+kV] of one output row from the three PlaneRows rows r[i] (w: 9 broadcast taps).
template <int S, typename Acc>
inline Vectorized<Acc> nchw_conv(const Acc* const* r, int64_t wo0, const Vectorized<Acc>* w,
                                 int64_t half) {
  using Vec = Vectorized<Acc>;
  Vec a[3];
  for (int i = 0; i < 3; ++i) {
    const Acc* p = r[i] + wo0;
    if constexpr (S == 1) {
      a[i] = at::vec::fmadd(
          Vec::loadu(p), w[3 * i],
          at::vec::fmadd(Vec::loadu(p + 1), w[3 * i + 1], Vec::loadu(p + 2) * w[3 * i + 2]));
    } else {
      a[i] = at::vec::fmadd(
          Vec::loadu(p), w[3 * i],
          at::vec::fmadd(Vec::loadu(p + half), w[3 * i + 1], Vec::loadu(p + 1) * w[3 * i + 2]));
    }
  }
  return a[0] + a[1] + a[2];
}

// NCHW small-plane conv core. A whole zero-padded plane is held flat in Acc, so that the
// outputs, indexed q = ho*L + wo over rows of L >= Wo entries (the extra entries per row are
// junk and never stored), are one long run of full vectors whose nine taps sit at constant
// offsets from q. Stride 1: one plane with rows of L = W+2. Stride 2: the padded plane split by
// row and column parity into four sub-planes with rows of L = Wo+1 (EE, EO, OE, OO), so that
// every tap is again a contiguous load. Used where the rows are too short for the row kernels
// (ragged tail vectors and per-row overheads dominate there).
template <typename T, int S>
class FlatPlane {
 public:
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  static constexpr int64_t kV = IO::kV;

  FlatPlane(int64_t H, int64_t W) : H_(H), W_(W), Ho_(dw_out_size(H, S)), Wo_(dw_out_size(W, S)) {
    L_ = S == 1 ? W + 2 : Wo_ + 1;
    sub_ = pad_stride<Acc>((Ho_ * S + 3) * L_ + 2 * kV);
    buf_.assign((S == 1 ? 1 : 4) * sub_, Acc(0));
    // Stride 2: a scratch row covers the split's reads, [0, 2 * round_up(L_, kV)) >= W + 2; the
    // ring is followed by a vector of slack for the last slot's junk-clearing store.
    Ls_ = 2 * round_up(L_, kV);
    if constexpr (S == 2) scratch_.assign(kRing * Ls_ + kV, Acc(0));
    count_ = (Ho_ - 1) * L_ + Wo_;
    valid_.assign(round_up(count_, kV) + kV, Acc(0));
    for (int64_t q = 0; q < count_; ++q) valid_[q] = (q % L_) < Wo_ ? Acc(1) : Acc(0);
  }

  int64_t L() const { return L_; }
  // Flat outputs to compute: q in [0, count()), in vectors of kV (the last one may run over).
  int64_t count() const { return count_; }
  // 1 where q is a real output, 0 on junk entries and past count().
  const Acc* valid() const { return valid_.data(); }

  // Copy one input plane in (the padding stays 0). Stride 2: each row is converted into a ring
  // of scratch rows of Ls_ entries that hold the left zero pad, the W inputs and zeros after
  // them, and kLag rows later split by column parity two vectors at a time. (Splitting a row
  // right after converting it loads vectors that straddle the stores just made, which stalls
  // store-to-load forwarding: the 14x14 stride-2 layer ran 2.5x slower that way.)
  // The split's full-vector stores may run past a sub-plane row of L_ entries into the rows
  // after it: they write zeros there (scratch entries past W), and rows are split top to bottom,
  // so a later row overwrites them with its own values and the bottom padding row only ever
  // receives zeros.
  //
  // Rows narrower than a vector are copied as one full vector read from the plane (the rows
  // after it; the last rows, with fewer than a vector left in the plane, element-wise), and the
  // junk that lands past the row is cleared by a vector of zeros stored right after it (stride
  // 1: over the right pad and the next row's left pad and data; stride 2: over the scratch row's
  // tail and the next scratch row's start). Rows are converted top to bottom, so the next row's
  // data is written afterwards, and the bottom padding only receives zeros.
  void load(const T* plane) {
    Acc* b = buf_.data();
    const Vec zero(0);
    const int64_t HW = H_ * W_;
    if constexpr (S == 1) {
      for (int64_t h = 0; h < H_; ++h) {
        Acc* dst = b + (h + 1) * L_ + 1;
        convert_to_acc_over<T>(plane + h * W_, dst, W_, HW - h * W_);
        if (W_ < kV) zero.store(dst + W_);
      }
    } else {
      // Row h is converted into scratch slot h % kRing and split kLag rows later.
      Acc* sc = scratch_.data();
      for (int64_t h = 0; h < H_ + kLag; ++h) {
        if (h < H_) {
          Acc* dst = sc + (h % kRing) * Ls_ + 1;
          convert_to_acc_over<T>(plane + h * W_, dst, W_, HW - h * W_);
          if (W_ < kV) zero.store(dst + W_);
        }
        const int64_t hs = h - kLag;
        if (hs < 0) continue;
        const int64_t p = hs + 1;
        Acc* e = b + (p & 1) * 2 * sub_ + (p >> 1) * L_;  // column-even sub-plane row
        Acc* o = e + sub_;                                // column-odd sub-plane row
        const Acc* r = sc + (hs % kRing) * Ls_;
        for (int64_t m = 0; m < L_; m += kV) {
          auto eo = at::vec::deinterleave2(Vec::loadu(r + 2 * m), Vec::loadu(r + 2 * m + kV));
          eo.first.store(e + m);
          eo.second.store(o + m);
        }
      }
    }
  }

  // z at flat outputs [q, q + kV).
  inline Vec z(int64_t q, const Vec* w) const {
    const Acc* b = buf_.data() + q;
    if constexpr (S == 1) {
      Vec a[3];
      for (int i = 0; i < 3; ++i) {
        const Acc* r = b + i * L_;
        a[i] = at::vec::fmadd(
            Vec::loadu(r), w[3 * i],
            at::vec::fmadd(Vec::loadu(r + 1), w[3 * i + 1], Vec::loadu(r + 2) * w[3 * i + 2]));
      }
      return a[0] + a[1] + a[2];
    } else {
      const Acc* ee = b;
      const Acc* eo = b + sub_;
      const Acc* oe = b + 2 * sub_;
      const Acc* oo = b + 3 * sub_;
      const Vec a0 = at::vec::fmadd(
          Vec::loadu(ee), w[0], at::vec::fmadd(Vec::loadu(eo), w[1], Vec::loadu(ee + 1) * w[2]));
      const Vec a1 = at::vec::fmadd(
          Vec::loadu(oe), w[3], at::vec::fmadd(Vec::loadu(oo), w[4], Vec::loadu(oe + 1) * w[5]));
      const Vec a2 =
          at::vec::fmadd(Vec::loadu(ee + L_), w[6],
                         at::vec::fmadd(Vec::loadu(eo + L_), w[7], Vec::loadu(ee + L_ + 1) * w[8]));
      return a0 + a1 + a2;
    }
  }

  // acc[3i+j] += g * (the input under tap (i, j)) for flat outputs [q, q + kV): the
  // weight-gradient taps (stride 1).
  inline void wgrad(int64_t q, const Vec& g, Vec* acc) const {
    static_assert(S == 1, "flat weight-gradient taps are stride 1 only");
    const Acc* b = buf_.data() + q;
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        acc[3 * i + j] = at::vec::fmadd(g, Vec::loadu(b + i * L_ + j), acc[3 * i + j]);
  }

  // Copy an output-shaped plane (Ho x Wo) into flat layout dst (junk entries untouched).
  void to_flat(const T* plane, Acc* dst) const {
    for (int64_t ho = 0; ho < Ho_; ++ho) convert_to_acc<T>(plane + ho * Wo_, dst + ho * L_, Wo_);
  }
  // Copy the real outputs of a flat buffer out to an Ho x Wo plane. Rows narrower than a vector
  // are stored as full vectors while a vector's room is left in the plane; the junk they put
  // into the next row is overwritten by that row (rows go top to bottom, all within this plane).
  void from_flat(const Acc* src, T* plane) const {
    const int64_t HWo = Ho_ * Wo_;
    for (int64_t ho = 0; ho < Ho_; ++ho)
      convert_from_acc_over<T>(src + ho * L_, plane + ho * Wo_, Wo_, HWo - ho * Wo_);
  }
  // Length of flat scratch buffers (covers the last vector's overrun).
  int64_t flat_len() const { return round_up(count_, kV) + kV; }

 private:
  static constexpr int64_t kRing = 8, kLag = 4;  // stride-2 scratch rows; rows between
                                                 // converting a row and splitting it
  int64_t H_, W_, Ho_, Wo_, L_, Ls_, sub_, count_;
  std::vector<Acc> buf_, valid_, scratch_;
};

// Planes at most this wide go through FlatPlane (NCHW forward, stats and BN-sum kernels).
constexpr int64_t kFlatMaxW = 64;

// Rows of each NHWC chunk for the deterministic reductions: ~32K elements of work per chunk,
// at most 4096 pixels per chunk (bounds the fp32 accumulation length per lane).
inline int64_t nhwc_rows_per_chunk(int64_t Wo, int64_t C) {
  const int64_t by_work = ceil_div(32768, std::max<int64_t>(1, Wo * C));
  const int64_t by_len = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, Wo));
  return std::max<int64_t>(1, std::min(by_work, by_len));
}

// f(r, r0, q1, q2) for every output row r of the NHWC reduction chunks [cb, ce) (chunk k: rows
// [k*G, min(rows, k*G + G)), r0 its first row), q1 and q2 the chunk's two Cp-long partials in
// p1 and p2, zeroed before its first row.
template <typename Acc, class F>
inline void for_chunk_rows(int64_t cb, int64_t ce, int64_t G, int64_t rows, int64_t Cp, Acc* p1,
                           Acc* p2, F&& f) {
  for (int64_t k = cb; k < ce; ++k) {
    Acc* q1 = p1 + k * Cp;
    Acc* q2 = p2 + k * Cp;
    std::fill(q1, q1 + Cp, Acc(0));
    std::fill(q2, q2 + Cp, Acc(0));
    const int64_t r0 = k * G, r1 = std::min(rows, r0 + G);
    for (int64_t r = r0; r < r1; ++r) f(r, r0, q1, q2);
  }
}

// ---------------------------------------------------------------------------------------------
// Pointwise (1x1 conv = GEMM) helpers.

struct PwShape {
  int64_t N, Cin, Cout, H, W, HW;
  bool nhwc;
};

inline PwShape check_pw_input(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_cpu(op, "x", x);
  check_float_dtype(op, "x", x);
  const bool nhwc = is_nhwc(op, "x", x);
  check_cpu(op, "weight", weight);
  check_same(op, "weight", weight, x, "x");
  const int64_t Cin = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == Cin && weight.size(0) >= 1, "dwsep::", op,
              ": weight must be (Cout, Cin) with Cin=", Cin, " and Cout >= 1, got ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "dwsep::", op, ": weight must be contiguous, got strides ",
              weight.strides());
  PwShape s;
  s.N = x.size(0);
  s.Cin = Cin;
  s.Cout = weight.size(0);
  s.H = x.size(2);
  s.W = x.size(3);
  s.HW = s.H * s.W;
  s.nhwc = nhwc;
  return s;
}

// A CPU tensor over existing memory (no ownership, never requires grad), for the GEMM calls made
// from inside parallel regions.
template <typename Acc>
inline at::Tensor blob(const Acc* p, at::IntArrayRef sizes, at::IntArrayRef strides) {
  return at::from_blob(const_cast<Acc*>(p), sizes, strides,
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value));
}

// Fixed pixel blocks of a pointwise layer (independent of the thread count). NHWC: blocks of
// `bs` rows of the (N*HW, C) matrix. NCHW: blocks of `bs` pixels of one image's (C, HW) matrix.
// The GEMM of a block and its epilogue run while the block is in L2.
struct PwBlocks {
  bool nhwc;
  int64_t HW, M, bs, per_img, count;
  struct Block {
    int64_t n, p0, len;  // NHWC: n = 0 and p0 = first row of the (N*HW, C) matrix
  };

  explicit PwBlocks(const PwShape& s) : nhwc(s.nhwc), HW(s.HW) {
    // ~256 KB of fp32 on the wider side of a block.
    const int64_t wide = std::max(s.Cin, s.Cout);
    bs = std::max<int64_t>(16, round_up(std::max<int64_t>(1, 65536 / wide), 16));
    if (nhwc) {
      M = s.N * s.HW;
      per_img = 0;
      count = ceil_div(M, bs);
    } else {
      M = s.HW;
      if (s.HW <= bs + bs / 2) bs = s.HW;
      per_img = ceil_div(s.HW, bs);
      count = s.N * per_img;
    }
  }

  Block get(int64_t b) const {
    if (nhwc) return {0, b * bs, std::min(bs, M - b * bs)};
    const int64_t n = b / per_img, p0 = (b % per_img) * bs;
    return {n, p0, std::min(bs, HW - p0)};
  }
};

}  // namespace cpu
}  // namespace dwsep
