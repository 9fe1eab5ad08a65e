// CPU kernels for dwsep::dw_fwd (fused depthwise 3x3 conv + folded BN + activation) and
// dwsep::dw_stats (per-channel batch mean / biased variance of the conv output).
//
// NHWC: parallel over output rows (n, ho); vectors over C with the 9 taps, scale and shift of a
// channel block held in registers while the block sweeps a column tile of the row (input rows
// converted into a padded ring; fp32/fp64 outputs stored straight to y, pixel-major where the
// blocks' constants stay in L1, fp16/bf16 and ragged channel counts staged in a tile); at
// stride 1, fp32/fp64 planes at least 28 wide read x in place instead of the ring
// (NhwcInPlace). NCHW: parallel over planes (n, c); vectors along W over zero-padded (stride 2:
// even/odd split) row buffers, each input row converted once; fp32 at stride 2 with outputs at
// most 16 wide, eight planes at a time, one per vector lane (dw_fwd_nchw_lanes). All read x
// once and write y once.
//
// dw_stats is deterministic whatever the thread count: fixed chunks (NHWC: groups of output
// rows; NCHW: planes, in row blocks) each produce (count, mean, M2) from a two-pass over small
// in-cache blocks, merged with Chan's formula in a fixed order, the final merge in double.
// dw_fwd_stats is the same pass (the same statistics, bit for bit) that also stores the conv
// output z: the CPU training forward then runs the conv once (z, then bn_act) instead of twice
// (dw_stats, then dw_fwd), since on a CPU the conv, not the traffic, bounds these kernels.
#include <torch/library.h>

#include "cpu/depthwise_common.h"

namespace dwsep {
namespace cpu {
namespace {

// Whether the NHWC forward stores its outputs straight to y (fp32/fp64, C a multiple of the
// vector) instead of staging each tile in an Acc buffer: pixel-major (each output pixel's channel
// blocks one after another) from the rows in place, and from the ring when the per-block
// constants (nine taps, scale, shift) fit in kNhwcPixelMajorMaxConstBytes (up to 512 fp32
// channels); block-major otherwise. Measured against the ring's staging tile (fp32,
// channels_last, batch 8, 2 threads, 6 inputs rotated, alternated in one process; bench/NOTES.md,
// session 19), ring pixel-major: 112x112x64 s2 1.27-1.31 -> 1.05-1.09 ms, 56x56x128 s2 0.54-0.60
// -> 0.45-0.50, 28x28x256 s2 0.26-0.29 -> 0.23-0.26, 14x14x512 s1 0.28-0.30 -> 0.22-0.25,
// 14x14x512 s2 0.13 -> 0.12; with 1024 channels (45 KB of constants) pixel-major was 0-3% slower
// than the staging tile, and block-major direct stores 8-12% faster.
constexpr int64_t kNhwcPixelMajorMaxConstBytes = 24 * 1024;

template <typename T>
inline bool nhwc_direct_stores(const DwShape& s) {
  return std::is_same_v<T, typename AccOf<T>::type> && s.C % VecIO<T>::kV == 0;
}

// NHWC, outputs stored straight to y pixel-major, from either row source: the rows in place
// (no ring copy; the border outputs 0 and [ie, Wo) through edge(), the interior in column
// tiles) or the ring (every output in column tiles).
template <typename T, int S, int kAct, class Src>
void dw_fwd_nhwc_pixels(const T* x, T* y, const std::vector<T>& wt, const std::vector<T>& sc,
                        const std::vector<T>& sh, const DwShape& s) {
  using Vec = Vectorized<T>;
  constexpr bool kInPlace = std::is_same_v<Src, NhwcInPlace<T, S>>;
  const int64_t C = s.C;
  const int64_t WB = nhwc_col_tile(kInPlace ? C : pixel_stride<T>(C), S, sizeof(T));
  // Per channel block: the nine taps, scale, shift (tile_z_pixels).
  const BlockConstants<T> consts(wt, C, C, {sc.data(), sh.data()});
  at::parallel_for(0, s.N * s.Ho, grain_for(s.Wo * C), [&](int64_t begin, int64_t end) {
    Src src(x, s);
    for (int64_t r = begin; r < end; ++r) {
      const auto cv = src.taps(r / s.Ho, r % s.Ho);
      T* const yr = y + r * s.Wo * C;
      // Captured by value: through references, the pointers were reloaded after every store.
      auto out = [yr, C](int64_t wo, int64_t c0, const Vec* zs, int n, const T* kb) {
        const Vec a = BlockConstants<T>::extra(kb, 0), b = BlockConstants<T>::extra(kb, 1);
        for (int k = 0; k < n; ++k)
          act_vec<kAct>(at::vec::fmadd(zs[k], a, b)).store(yr + (wo + k) * C + c0);
      };
      int64_t ia = 0, ie = s.Wo;
      if constexpr (kInPlace) {
        ia = 1;
        ie = src.interior_end();
        tile_z_pixels(src, cv, 0, 1, C, consts, wt.data(), C, out);
      }
      for (int64_t wa = ia; wa < ie; wa += WB) {
        const int64_t wb = std::min(ie, wa + WB);
        tile_ready(src, wa, wb, WB);
        tile_z_pixels(src, cv, wa, wb, C, consts, wt.data(), C, out);
      }
      if constexpr (kInPlace) tile_z_pixels(src, cv, ie, s.Wo, C, consts, wt.data(), C, out);
    }
  });
}

template <typename T, int S, int kAct>
void dw_fwd_nhwc(const T* x, T* y, const at::Tensor& weight, const at::Tensor& scale,
                 const at::Tensor& shift, const DwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const int64_t C = s.C, Cp = round_up(C, kV);
  const auto wt = dw_weight_taps<T>(weight, C, Cp);
  const auto sc = padded_vec<Acc>(scale, Cp);
  const auto sh = padded_vec<Acc>(shift, Cp);
  const bool direct = nhwc_direct_stores<T>(s);
  if constexpr (std::is_same_v<T, Acc>) {
    if constexpr (S == 1) {
      if (nhwc_in_place<T, S>(s))
        return dw_fwd_nhwc_pixels<T, S, kAct, NhwcInPlace<T, S>>(x, y, wt, sc, sh, s);
    }
    if (direct && BlockConstants<Acc>::bytes(C, 2) <= kNhwcPixelMajorMaxConstBytes)
      return dw_fwd_nhwc_pixels<T, S, kAct, NhwcRows<T, S>>(x, y, wt, sc, sh, s);
  }
  const int64_t P = pixel_stride<Acc>(C);
  const int64_t WB = nhwc_col_tile(P, S, sizeof(Acc));
  at::parallel_for(0, s.N * s.Ho, grain_for(s.Wo * C), [&](int64_t begin, int64_t end) {
    NhwcRows<T, S> ring(x, s);
    // Each channel block of a tile is stored straight to y (direct), or staged in L1 and the
    // tile written out as one sequential run (converted to T, or with a ragged last block).
    std::vector<Acc> tile(direct ? 0 : WB * P);
    for (int64_t r = begin; r < end; ++r) {
      const auto cv = ring.taps(r / s.Ho, r % s.Ho);
      T* yr = y + r * s.Wo * C;
      for (int64_t wa = 0; wa < s.Wo; wa += WB) {
        const int64_t wb = std::min(s.Wo, wa + WB);
        ring.ready(wb);
        for (int64_t c0 = 0; c0 < C; c0 += kV) {
          Vec w[9];
          for (int t = 0; t < 9; ++t) w[t] = Vec::loadu(wt.data() + t * Cp + c0);
          const Vec a = Vec::loadu(sc.data() + c0), b = Vec::loadu(sh.data() + c0);
          if constexpr (std::is_same_v<T, Acc>) {
            if (direct) {
              cv.sweep(wa, wb, c0, w, [&](int64_t wo, const Vec& z) {
                act_vec<kAct>(at::vec::fmadd(z, a, b)).store(yr + wo * C + c0);
              });
              continue;
            }
          }
          Acc* tw = tile.data() - wa * P + c0;
          cv.sweep(wa, wb, c0, w, [&](int64_t wo, const Vec& z) {
            act_vec<kAct>(at::vec::fmadd(z, a, b)).store(tw + wo * P);
          });
        }
        if (direct) continue;
        if (C == P) {
          convert_from_acc<T>(tile.data(), yr + wa * C, (wb - wa) * C);
        } else {
          for (int64_t wo = wa; wo < wb; ++wo)
            convert_from_acc<T>(tile.data() + (wo - wa) * P, yr + wo * C, C);
        }
      }
    }
  });
}

// NCHW fp32, stride 2, outputs at most kLaneMaxWo wide (the 28x28 and 14x14 stride-2 layers):
// eight planes at a time, one per vector lane. Each input row of the eight planes is transposed
// in registers into pixel vectors of a zero-bordered tile [H + 2][W + 2][8] (the channels_last
// layout, eight channels), the conv sweeps that tile four outputs at a time with per-lane taps
// (NhwcTaps, as the channels_last kernel), and each output row is transposed back into the
// eight planes. Against one plane at a time (FlatPlane: the plane split by column parity into
// four sub-planes, one vector per 8 flat outputs, junk columns computed and dropped), there is
// no parity split, every load is aligned and shared by up to four outputs, and no lane is junk.
// At stride 1 the same kernel measured slower than FlatPlane (batch 8 from memory: 14x14x512
// 0.60-0.62 -> 0.84-1.05 ms, 7x7x1024 0.36 -> 0.47-0.48; bench/NOTES.md, session 10): there
// FlatPlane wastes few lanes and needs no split, and the transposes cost more than they save.
// Planes [gbegin * 8, gend * 8).
constexpr int64_t kLaneMaxWo = 16;

template <int S, int kAct>
void dw_fwd_nchw_lanes(const float* x, float* y, const float* wp, const float* scp,
                       const float* shp, const DwShape& s, int64_t gbegin, int64_t gend) {
  using Vec = Vectorized<float>;
  constexpr int64_t kL = 8;  // planes per group: one per lane of a vector, 8x8 transposes
  static_assert(Vec::size() == kL, "one plane per lane of an 8-lane fp32 vector");
  const int64_t H = s.H, W = s.W, Ho = s.Ho, Wo = s.Wo, HW = H * W, HWo = Ho * Wo;
  const int64_t L = W + 2;  // tile row, in pixels
  const int64_t x_len = s.N * s.C * HW;
  at::parallel_for(gbegin, gend, grain_for(HWo * kL), [&](int64_t gb, int64_t ge) {
    std::vector<float> tile((H + 2) * L * kL, 0.0f);  // borders stay 0
    alignas(64) float tmp[kL * kL];
    alignas(64) float out[kLaneMaxWo * kL];
    alignas(64) float consts[11 * kL];
    NhwcTaps<float, S> cv;
    cv.P = kL;
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t p0 = g * kL;
      int64_t c = p0 % s.C;  // channel of lane k, wrapping into the next image
      for (int64_t k = 0; k < kL; ++k, c = c + 1 == s.C ? 0 : c + 1) {
        for (int t = 0; t < 9; ++t) consts[t * kL + k] = wp[c * 9 + t];
        consts[9 * kL + k] = scp[c];
        consts[10 * kL + k] = shp[c];
      }
      Vec w[9];
      for (int t = 0; t < 9; ++t) w[t] = Vec::loadu(consts + t * kL);
      const Vec a = Vec::loadu(consts + 9 * kL), b = Vec::loadu(consts + 10 * kL);
      // Input rows into the tile: pixel j of row h at tile[(h + 1) * L + j + 1]. Rows of 8 or
      // more: full 8x8 transposes, the last one ending at W (overlapping the one before it: it
      // rewrites equal values). Narrower rows: 8-wide reads run into the next row (or plane),
      // harmless inside x, and only the W real pixels go into the tile (its border stays 0).
      const float* xg = x + p0 * HW;
      for (int64_t h = 0; h < H; ++h) {
        float* trow = tile.data() + ((h + 1) * L + 1) * kL;
        const float* xr = xg + h * W;
        if (W >= kL) {
          for (int64_t w0 = 0; w0 < W; w0 += kL) {
            const int64_t c0 = std::min(w0, W - kL);
            transpose8x8(xr + c0, HW, trow + c0 * kL, kL);
          }
          continue;
        }
        if ((p0 + 7) * HW + h * W + kL <= x_len) {  // the last plane's 8-wide read stays in x
          transpose8x8(xr, HW, tmp, kL);
        } else {
          at::vec::transpose_mxn<float>(xr, HW, tmp, kL, kL, static_cast<int>(W));
        }
        for (int64_t j = 0; j < W; ++j) Vec::loadu(tmp + j * kL).store(trow + j * kL);
      }
      // Output rows: the conv of tile rows ho * S .. ho * S + 2, transposed back into the planes
      // (rows of 8 or more as the input rows).
      float* yg = y + p0 * HWo;
      for (int64_t ho = 0; ho < Ho; ++ho) {
        for (int i = 0; i < 3; ++i) cv.rows[i] = tile.data() + (ho * S + i) * L * kL;
        cv.sweep(0, Wo, 0, w, [&](int64_t wo, const Vec& z) {
          act_vec<kAct>(at::vec::fmadd(z, a, b)).store(out + wo * kL);
        });
        float* yr = yg + ho * Wo;
        if (Wo >= kL) {
          for (int64_t w0 = 0; w0 < Wo; w0 += kL) {
            const int64_t c0 = std::min(w0, Wo - kL);
            transpose8x8(out + c0 * kL, kL, yr + c0, HWo);
          }
          continue;
        }
        // Narrower rows: 8 lanes stored per plane, the ones past Wo landing in the plane's next
        // rows, which are written after this one. Where that would spill into the next plane
        // (the last rows), the Wo real lanes are stored one by one. (A masked store, vmaskmovps,
        // is microcoded on the AMD hosts measured: 7-wide outputs ran at half speed with it.)
        if ((ho * Wo) + kL <= HWo) {
          transpose8x8(out, kL, yr, HWo);
          continue;
        }
        transpose8x8(out, kL, tmp, kL);
        for (int64_t k = 0; k < kL; ++k)
          for (int64_t j = 0; j < Wo; ++j) yr[k * HWo + j] = tmp[k * kL + j];
      }
    }
  });
}

template <typename T, int S, int kAct>
void dw_fwd_nchw(const T* x, T* y, const at::Tensor& weight, const at::Tensor& scale,
                 const at::Tensor& shift, const DwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const T* wp = weight.const_data_ptr<T>();
  const Acc* scp = scale.const_data_ptr<Acc>();
  const Acc* shp = shift.const_data_ptr<Acc>();
  const int64_t HW = s.H * s.W, HWo = s.Ho * s.Wo;
  int64_t p_begin = 0;  // planes before p_begin are done
  if constexpr (std::is_same_v<T, float> && Vectorized<float>::size() == 8) {
    const int64_t groups = s.N * s.C / 8;
    if (S == 2 && s.Wo <= kLaneMaxWo && groups > 0) {
      dw_fwd_nchw_lanes<S, kAct>(x, y, wp, scp, shp, s, 0, groups);
      p_begin = groups * 8;
      if (p_begin == s.N * s.C) return;
    }
  }
  if (s.W <= kFlatMaxW) {
    at::parallel_for(p_begin, s.N * s.C, grain_for(HWo), [&](int64_t begin, int64_t end) {
      FlatPlane<T, S> fp(s.H, s.W);
      std::vector<Acc> out(fp.flat_len());
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % s.C;
        fp.load(x + p * HW);
        Vec w[9];
        for (int t = 0; t < 9; ++t) w[t] = Vec(static_cast<Acc>(wp[c * 9 + t]));
        const Vec a(scp[c]), b(shp[c]);
        for (int64_t q = 0; q < fp.count(); q += kV)
          act_vec<kAct>(at::vec::fmadd(fp.z(q, w), a, b)).store(out.data() + q);
        fp.from_flat(out.data(), y + p * HWo);
      }
    });
    return;
  }
  at::parallel_for(0, s.N * s.C, grain_for(HWo), [&](int64_t begin, int64_t end) {
    PlaneRows<T, S> rows(s.H, s.W);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % s.C;
      rows.reset(x + p * HW);
      Vec w[9];
      for (int t = 0; t < 9; ++t) w[t] = Vec(static_cast<Acc>(wp[c * 9 + t]));
      const Vec a(scp[c]), b(shp[c]);
      T* yp = y + p * HWo;
      for (int64_t ho = 0; ho < s.Ho; ++ho) {
        const Acc* r[3] = {rows.get(ho * S - 1), rows.get(ho * S), rows.get(ho * S + 1)};
        T* yr = yp + ho * s.Wo;
        int64_t wo = 0;
        for (; wo + kV <= s.Wo; wo += kV) {
          const Vec z = nchw_conv<S>(r, wo, w, rows.half());
          IO::store(yr + wo, act_vec<kAct>(at::vec::fmadd(z, a, b)));
        }
        if (wo < s.Wo) {
          const Vec z = nchw_conv<S>(r, wo, w, rows.half());
          IO::store(yr + wo, act_vec<kAct>(at::vec::fmadd(z, a, b)), s.Wo - wo);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// dw_stats

// z: nullptr, or the conv output (NHWC) to store as the statistics are taken.
template <typename T, int S, bool kZ>
void dw_stats_nhwc(const T* x, const at::Tensor& weight, double* mean, double* var, T* z,
                   const DwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const int64_t C = s.C, Cp = round_up(C, kV);
  const auto wt = dw_weight_taps<T>(weight, C, Cp);
  const int64_t rows = s.N * s.Ho;
  const int64_t G = nhwc_rows_per_chunk(s.Wo, C);
  const int64_t nchunks = ceil_div(rows, G);
  const int64_t WB = nhwc_wide_col_tile(pixel_stride<Acc>(C), S, sizeof(Acc));
  // Per chunk: mean and M2 per channel (Acc); the count is known from the chunk's row range.
  std::vector<Acc> cmean(nchunks * Cp), cm2(nchunks * Cp);
  // The chunks' rows from either row source (tile_z): per column tile, (count, mean, M2)
  // merged into the chunk's moments. Padded channel lanes compute z = 0 and are never read back.
  auto chunks = [&](auto& src, int64_t cb, int64_t ce) {
    auto row = [&](int64_t r, int64_t r0, Acc* km, Acc* k2) {
      const auto cv = src.taps(r / s.Ho, r % s.Ho);
      [[maybe_unused]] T* const zr = kZ ? z + r * s.Wo * C : nullptr;
      for (int64_t wa = 0; wa < s.Wo; wa += WB) {
        const int64_t wb = std::min(s.Wo, wa + WB);
        tile_ready(src, wa, wb, WB);
        for (int64_t c0 = 0; c0 < C; c0 += kV) {
          Vec w[9];
          for (int t = 0; t < 9; ++t) w[t] = Vec::loadu(wt.data() + t * Cp + c0);
          // Sums shifted by the tile's first value (merge_shifted_sums).
          const int64_t nc = std::min(kV, C - c0);
          auto keep = [&](int64_t wo, const Vec& zv) {
            if constexpr (kZ) {
              if (nc == kV) {
                IO::store(zr + wo * C + c0, zv);
              } else {
                IO::store(zr + wo * C + c0, zv, nc);
              }
            }
          };
          Vec K;
          tile_z(src, cv, wa, wa + 1, c0, w, wt.data(), Cp, [&](int64_t wo, const Vec& zv) {
            K = zv;
            keep(wo, zv);
          });
          Vec s1(0), s2(0);
          tile_z(src, cv, wa + 1, wb, c0, w, wt.data(), Cp, [&](int64_t wo, const Vec& zv) {
            keep(wo, zv);
            const Vec d = zv - K;
            s1 = s1 + d;
            s2 = at::vec::fmadd(d, d, s2);
          });
          merge_shifted_sums(km, k2, c0, K, s1, s2, static_cast<double>((r - r0) * s.Wo + wa),
                             static_cast<double>(wb - wa));
        }
      }
    };
    for_chunk_rows(cb, ce, G, rows, Cp, cmean.data(), cm2.data(), row);
  };
  parallel_nhwc_rows<T, S>(x, s, nchunks, chunks);
  at::parallel_for(0, C, 64, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      Moments m;
      for (int64_t k = 0; k < nchunks; ++k) {
        const int64_t r0 = k * G, r1 = std::min(rows, r0 + G);
        m.merge(static_cast<double>((r1 - r0) * s.Wo), cmean[k * Cp + c], cm2[k * Cp + c]);
      }
      mean[c] = m.mean;
      var[c] = m.var();
    }
  });
}

template <typename T, int S, bool kZ>
void dw_stats_nchw(const T* x, const at::Tensor& weight, double* mean, double* var, T* z,
                   const DwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const T* wp = weight.const_data_ptr<T>();
  const int64_t HW = s.H * s.W, HWo = s.Ho * s.Wo;
  // Row blocks of at most ~4096 outputs: two-pass (mean, M2) in cache, then Chan merges.
  const int64_t R = std::max<int64_t>(1, 4096 / s.Wo);
  std::vector<double> pmean(s.N * s.C), pm2(s.N * s.C);
  if (s.W <= kFlatMaxW && HWo <= 4096) {
    // Small planes: shifted sums over the whole plane (pivot K = the plane's first output),
    // junk entries masked out.
    at::parallel_for(0, s.N * s.C, grain_for(HWo), [&](int64_t begin, int64_t end) {
      FlatPlane<T, S> fp(s.H, s.W);
      const Acc* valid = fp.valid();
      std::vector<Acc> out(kZ ? fp.flat_len() : 0);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % s.C;
        fp.load(x + p * HW);
        Vec w[9];
        for (int t = 0; t < 9; ++t) w[t] = Vec(static_cast<Acc>(wp[c * 9 + t]));
        Acc k0[kV];
        fp.z(0, w).store(k0);
        const Vec K(k0[0]);
        Vec s1(0), s2(0);
        for (int64_t q = 0; q < fp.count(); q += kV) {
          const Vec zq = fp.z(q, w);
          if constexpr (kZ) zq.store(out.data() + q);
          const Vec d = (zq - K) * Vec::loadu(valid + q);
          s1 = s1 + d;
          s2 = at::vec::fmadd(d, d, s2);
        }
        if constexpr (kZ) fp.from_flat(out.data(), z + p * HWo);
        const double n = static_cast<double>(HWo), t1 = hsum(s1);
        pmean[p] = static_cast<double>(k0[0]) + t1 / n;
        pm2[p] = std::max(0.0, hsum(s2) - t1 * t1 / n);
      }
    });
  } else {
    at::parallel_for(0, s.N * s.C, grain_for(HWo), [&](int64_t begin, int64_t end) {
      PlaneRows<T, S> rows(s.H, s.W);
      std::vector<Acc> zb(R * s.Wo + kV);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % s.C;
        rows.reset(x + p * HW);
        Vec w[9];
        for (int t = 0; t < 9; ++t) w[t] = Vec(static_cast<Acc>(wp[c * 9 + t]));
        Moments m;
        for (int64_t h0 = 0; h0 < s.Ho; h0 += R) {
          const int64_t h1 = std::min(s.Ho, h0 + R);
          const int64_t nb = (h1 - h0) * s.Wo;
          for (int64_t ho = h0; ho < h1; ++ho) {
            const Acc* r[3] = {rows.get(ho * S - 1), rows.get(ho * S), rows.get(ho * S + 1)};
            Acc* zr = zb.data() + (ho - h0) * s.Wo;
            int64_t wo = 0;
            for (; wo + kV <= s.Wo; wo += kV) nchw_conv<S>(r, wo, w, rows.half()).store(zr + wo);
            if (wo < s.Wo) nchw_conv<S>(r, wo, w, rows.half()).store(zr + wo, s.Wo - wo);
          }
          if constexpr (kZ) convert_from_acc<T>(zb.data(), z + p * HWo + h0 * s.Wo, nb);
          Vec sum(0);
          int64_t i = 0;
          for (; i + kV <= nb; i += kV) sum = sum + Vec::loadu(zb.data() + i);
          if (i < nb) sum = sum + Vec::loadu(zb.data() + i, nb - i);
          const Acc mb = static_cast<Acc>(hsum(sum) / static_cast<double>(nb));
          const Vec mv(mb);
          Vec ss(0);
          for (i = 0; i + kV <= nb; i += kV) {
            const Vec d = Vec::loadu(zb.data() + i) - mv;
            ss = at::vec::fmadd(d, d, ss);
          }
          if (i < nb) {
            const Vec d = Vec::set(Vec(0), Vec::loadu(zb.data() + i, nb - i) - mv, nb - i);
            ss = at::vec::fmadd(d, d, ss);
          }
          m.merge(static_cast<double>(nb), static_cast<double>(mb), hsum(ss));
        }
        pmean[p] = m.mean;
        pm2[p] = m.m2;
      }
    });
  }
  const double cnt = static_cast<double>(HWo);
  for (int64_t c = 0; c < s.C; ++c) {
    Moments m;
    for (int64_t n = 0; n < s.N; ++n) m.merge(cnt, pmean[n * s.C + c], pm2[n * s.C + c]);
    mean[c] = m.mean;
    var[c] = m.var();
  }
}

// ---------------------------------------------------------------------------------------------
// Glue

at::Tensor dw_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const at::Tensor& shift, int64_t stride, int64_t act) {
  constexpr const char* op = "dw_fwd";
  const DwShape s = check_dw_input(op, x, weight, stride);
  check_act(op, act);
  check_channel_vec(op, "scale", scale, s.C, x);
  check_channel_vec(op, "shift", shift, s.C, x);
  at::Tensor y = new_output({s.N, s.C, s.Ho, s.Wo}, x.options(), memory_format(s.nhwc));
  if (y.numel() == 0) return y;
  DWSEP_CPU_DISPATCH(x.scalar_type(), "dwsep_dw_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    dispatch_stride(stride, [&](auto S) {
      dispatch_act(act, [&](auto A) {
        if (s.nhwc) {
          dw_fwd_nhwc<scalar_t, decltype(S)::value, decltype(A)::value>(xp, yp, weight, scale,
                                                                        shift, s);
        } else {
          dw_fwd_nchw<scalar_t, decltype(S)::value, decltype(A)::value>(xp, yp, weight, scale,
                                                                        shift, s);
        }
      });
    });
  });
  return y;
}

// dw_stats, and with z defined, dw_fwd_stats (z: x's shape and layout at the output size).
void dw_stats_into(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                   const at::Tensor& mean, const at::Tensor& var, const at::Tensor& z,
                   const DwShape& s) {
  if (s.N * s.Ho * s.Wo == 0) {  // no samples: mean 0, var 0
    mean.zero_();
    var.zero_();
    return;
  }
  std::vector<double> m(s.C), v(s.C);
  DWSEP_CPU_DISPATCH(x.scalar_type(), "dwsep_dw_stats_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* zp = z.defined() ? z.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_stride(stride, [&](auto S) {
      auto run = [&](auto Z) {  // Z: whether z is stored (a compile-time flag of the kernels)
        constexpr int kS = decltype(S)::value;
        constexpr bool kZ = decltype(Z)::value;
        if (s.nhwc) {
          dw_stats_nhwc<scalar_t, kS, kZ>(xp, weight, m.data(), v.data(), zp, s);
        } else {
          dw_stats_nchw<scalar_t, kS, kZ>(xp, weight, m.data(), v.data(), zp, s);
        }
      };
      if (zp) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
    using Acc = typename AccOf<scalar_t>::type;
    Acc* mp = mean.mutable_data_ptr<Acc>();
    Acc* vp = var.mutable_data_ptr<Acc>();
    for (int64_t c = 0; c < s.C; ++c) {
      mp[c] = static_cast<Acc>(m[c]);
      vp[c] = static_cast<Acc>(v[c]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dw_stats_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                int64_t stride) {
  constexpr const char* op = "dw_stats";
  const DwShape s = check_dw_input(op, x, weight, stride);
  const auto vopts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor mean = new_output({s.C}, vopts);
  at::Tensor var = new_output({s.C}, vopts);
  dw_stats_into(x, weight, stride, mean, var, at::Tensor(), s);
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_fwd_stats_cpu(const at::Tensor& x,
                                                                const at::Tensor& weight,
                                                                int64_t stride) {
  constexpr const char* op = "dw_fwd_stats";
  const DwShape s = check_dw_input(op, x, weight, stride);
  const auto vopts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor z = new_output({s.N, s.C, s.Ho, s.Wo}, x.options(), memory_format(s.nhwc));
  at::Tensor mean = new_output({s.C}, vopts);
  at::Tensor var = new_output({s.C}, vopts);
  dw_stats_into(x, weight, stride, mean, var, z, s);
  return {z, mean, var};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(dwsep, CPU, m) {
  m.impl("dw_fwd", &cpu::dw_fwd_cpu);
  m.impl("dw_stats", &cpu::dw_stats_cpu);
  m.impl("dw_fwd_stats", &cpu::dw_fwd_stats_cpu);
}

}  // namespace dwsep
