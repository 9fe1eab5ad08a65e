// CPU kernels for the depthwise backward:
//   dwsep::dw_bwd_reduce: per-channel sum(g_z) and sum(g_z * xhat), z = conv(x) recomputed.
//   dwsep::dw_bwd: g_conv = k*g_z (+ b*conv(x) + c), grad_x = transposed depthwise conv of g_conv
//                  (stride 1 and 2), grad_weight = sum of g_conv (x) x-patches.
//
// Everything is deterministic whatever the thread count: reductions go through fixed chunks
// (NHWC: groups of output rows, or bands of an image's rows; NCHW: planes) with Acc partials,
// then a fixed-order reduction in double. NHWC keeps g_conv in a ring of three rows per task
// (bands recompute the rows just outside them; the weight-gradient taps are accumulated while
// a row is hot and grad_x gathered as soon as its rows exist); at stride 1, fp32/fp64 rows at
// least 28 wide are read in place as in the forward. NCHW keeps one zero-padded g_conv plane
// per task in cache.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "cpu/depthwise_common.h"

namespace dwsep {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// dw_bwd_reduce

template <typename T, int S, int kAct>
void dw_bwd_reduce_nhwc(const T* gy, const T* y, const T* x, const at::Tensor& weight,
                        const at::Tensor& mean, const at::Tensor& invstd, double* out1,
                        double* out2, const DwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const int64_t C = s.C, Cp = round_up(C, kV);
  const auto wt = dw_weight_taps<T>(weight, C, Cp);
  const auto mu = padded_vec<Acc>(mean, Cp);
  const auto is = padded_vec<Acc>(invstd, Cp);
  const int64_t rows = s.N * s.Ho;
  const int64_t G = nhwc_rows_per_chunk(s.Wo, C);
  const int64_t nchunks = ceil_div(rows, G);
  const int64_t WB = nhwc_wide_col_tile(pixel_stride<Acc>(C), S, sizeof(Acc));
  std::vector<Acc> p1(nchunks * Cp), p2(nchunks * Cp);
  // C a multiple of the vector: pixel-major over per-block constants (taps, mean, invstd); the
  // same sums in the same order as the block-major loop below.
  const bool by_pixel = C % kV == 0;
  const auto consts =
      by_pixel ? BlockConstants<Acc>(wt, Cp, C, {mu.data(), is.data()}) : BlockConstants<Acc>();
  // The chunks' rows from either row source (tile_z).
  auto chunks = [&](auto& src, int64_t cb, int64_t ce) {
    auto row = [&](int64_t r, int64_t, Acc* k1, Acc* k2) {
      const auto cv = src.taps(r / s.Ho, r % s.Ho);
      const T* gr = gy + r * s.Wo * C;
      const T* yr = y + r * s.Wo * C;
      // Captured by value (see dw_fwd_nhwc_pixels); a group's sums stay in registers.
      auto sums = [gr, yr, k1, k2, C](int64_t wo, int64_t c0, const Vec* zs, int n, const Acc* kb) {
        const Vec m = BlockConstants<Acc>::extra(kb, 0), iv = BlockConstants<Acc>::extra(kb, 1);
        Vec a1 = Vec::loadu(k1 + c0), a2 = Vec::loadu(k2 + c0);
        for (int k = 0; k < n; ++k) {
          const int64_t o = (wo + k) * C + c0;
          const Vec gz = act_grad<kAct>(IO::load(gr + o), IO::load(yr + o));
          a1 = a1 + gz;
          a2 = at::vec::fmadd(gz, (zs[k] - m) * iv, a2);
        }
        a1.store(k1 + c0);
        a2.store(k2 + c0);
      };
      for (int64_t wa = 0; wa < s.Wo; wa += WB) {
        const int64_t wb = std::min(s.Wo, wa + WB);
        tile_ready(src, wa, wb, WB);
        if (by_pixel) {
          tile_z_pixels(src, cv, wa, wb, C, consts, wt.data(), Cp, sums);
          continue;
        }
        for (int64_t c0 = 0; c0 < C; c0 += kV) {
          const int64_t cnt = std::min(kV, C - c0);
          Vec w[9];
          for (int t = 0; t < 9; ++t) w[t] = Vec::loadu(wt.data() + t * Cp + c0);
          const Vec m = Vec::loadu(mu.data() + c0), iv = Vec::loadu(is.data() + c0);
          Vec a1 = Vec::loadu(k1 + c0), a2 = Vec::loadu(k2 + c0);
          // Padded lanes load grad_y = 0, so g_z = 0 there.
          auto gz_at = [&](int64_t wo) {
            const int64_t o = wo * C + c0;
            return cnt == kV ? act_grad<kAct>(IO::load(gr + o), IO::load(yr + o))
                             : act_grad<kAct>(IO::load(gr + o, cnt), IO::load(yr + o, cnt));
          };
          tile_z(src, cv, wa, wb, c0, w, wt.data(), Cp, [&](int64_t wo, const Vec& z) {
            const Vec gz = gz_at(wo);
            a1 = a1 + gz;
            a2 = at::vec::fmadd(gz, (z - m) * iv, a2);
          });
          a1.store(k1 + c0);
          a2.store(k2 + c0);
        }
      }
    };
    for_chunk_rows(cb, ce, G, rows, Cp, p1.data(), p2.data(), row);
  };
  parallel_nhwc_rows<T, S>(x, s, nchunks, chunks);
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t k = 0; k < nchunks; ++k) {
      s1 += static_cast<double>(p1[k * Cp + c]);
      s2 += static_cast<double>(p2[k * Cp + c]);
    }
    out1[c] = s1;
    out2[c] = s2;
  }
}

// Plane p (= n * C + c) for the flat NCHW backward kernels: x into fp, grad_y and y into the
// flat buffers gf and yf (their junk entries untouched), channel c's nine taps broadcast into w.
template <typename T, int S, typename Acc>
inline void flat_plane_inputs(FlatPlane<T, S>& fp, const T* gy, const T* y, const T* x, const T* wp,
                              int64_t p, const DwShape& s, Acc* gf, Acc* yf, Vectorized<Acc>* w) {
  const int64_t c = p % s.C, HWo = s.Ho * s.Wo;
  fp.load(x + p * s.H * s.W);
  fp.to_flat(gy + p * HWo, gf);
  fp.to_flat(y + p * HWo, yf);
  for (int t = 0; t < 9; ++t) w[t] = Vectorized<Acc>(static_cast<Acc>(wp[c * 9 + t]));
}

template <typename T, int S, int kAct>
void dw_bwd_reduce_nchw(const T* gy, const T* y, const T* x, const at::Tensor& weight,
                        const at::Tensor& mean, const at::Tensor& invstd, double* out1,
                        double* out2, const DwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const T* wp = weight.const_data_ptr<T>();
  const Acc* mup = mean.const_data_ptr<Acc>();
  const Acc* isp = invstd.const_data_ptr<Acc>();
  const int64_t HW = s.H * s.W, HWo = s.Ho * s.Wo;
  const int64_t R = std::max<int64_t>(1, 4096 / s.Wo);  // rows per Acc accumulation block
  std::vector<double> p1(s.N * s.C), p2(s.N * s.C);
  if (s.W <= kFlatMaxW && HWo <= 4096) {
    at::parallel_for(0, s.N * s.C, grain_for(HWo), [&](int64_t begin, int64_t end) {
      FlatPlane<T, S> fp(s.H, s.W);
      // grad_y and y in the flat layout; junk entries stay 0, so g_z = 0 there.
      std::vector<Acc> gf(fp.flat_len(), Acc(0)), yf(fp.flat_len(), Acc(0));
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % s.C;
        Vec w[9];
        flat_plane_inputs(fp, gy, y, x, wp, p, s, gf.data(), yf.data(), w);
        const Vec m(mup[c]), iv(isp[c]);
        Vec a1(0), a2(0);
        for (int64_t q = 0; q < fp.count(); q += kV) {
          const Vec gz = act_grad<kAct>(Vec::loadu(gf.data() + q), Vec::loadu(yf.data() + q));
          a1 = a1 + gz;
          a2 = at::vec::fmadd(gz, (fp.z(q, w) - m) * iv, a2);
        }
        p1[p] = hsum(a1);
        p2[p] = hsum(a2);
      }
    });
  } else {
    at::parallel_for(0, s.N * s.C, grain_for(HWo), [&](int64_t begin, int64_t end) {
      PlaneRows<T, S> rows(s.H, s.W);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % s.C;
        rows.reset(x + p * HW);
        Vec w[9];
        for (int t = 0; t < 9; ++t) w[t] = Vec(static_cast<Acc>(wp[c * 9 + t]));
        const Vec m(mup[c]), iv(isp[c]);
        const T* gp = gy + p * HWo;
        const T* yp = y + p * HWo;
        double d1 = 0, d2 = 0;
        for (int64_t h0 = 0; h0 < s.Ho; h0 += R) {
          Vec a1(0), a2(0);
          for (int64_t ho = h0; ho < std::min(s.Ho, h0 + R); ++ho) {
            const Acc* r[3] = {rows.get(ho * S - 1), rows.get(ho * S), rows.get(ho * S + 1)};
            const T* gr = gp + ho * s.Wo;
            const T* yr = yp + ho * s.Wo;
            int64_t wo = 0;
            for (; wo + kV <= s.Wo; wo += kV) {
              const Vec z = nchw_conv<S>(r, wo, w, rows.half());
              const Vec gz = act_grad<kAct>(IO::load(gr + wo), IO::load(yr + wo));
              a1 = a1 + gz;
              a2 = at::vec::fmadd(gz, (z - m) * iv, a2);
            }
            if (wo < s.Wo) {  // lanes past Wo load grad_y = 0, so g_z = 0 there
              const Vec z = nchw_conv<S>(r, wo, w, rows.half());
              const Vec gz =
                  act_grad<kAct>(IO::load(gr + wo, s.Wo - wo), IO::load(yr + wo, s.Wo - wo));
              a1 = a1 + gz;
              a2 = at::vec::fmadd(gz, (z - m) * iv, a2);
            }
          }
          d1 += hsum(a1);
          d2 += hsum(a2);
        }
        p1[p] = d1;
        p2[p] = d2;
      }
    });
  }
  for (int64_t c = 0; c < s.C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      s1 += p1[n * s.C + c];
      s2 += p2[n * s.C + c];
    }
    out1[c] = s1;
    out2[c] = s2;
  }
}

// ---------------------------------------------------------------------------------------------
// dw_bwd, NHWC

// Output rows per band of the NHWC backward: bands recompute the g_conv rows just outside them
// (one on each side at stride 1, one after at stride 2), so they are at least 32 rows long
// where the 4096-pixel bound on the fp32 partials allows. (Measured, fp32 channels_last batch
// 8: 32 rows 0-5% faster than 16 and 8 on the stride-1 layers; 64 no better.)
inline int64_t dw_bwd_band_rows(int64_t Wo, int64_t C) {
  const int64_t by_len = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, Wo));
  return std::min(by_len, std::max<int64_t>(32, nhwc_rows_per_chunk(Wo, C)));
}

// Each image's output rows are cut into fixed bands (the deterministic chunks); a task walks
// its bands' g_conv rows top to bottom through a ring of three zero-bordered Acc rows (in L2),
// accumulating the weight-gradient taps of the band's own rows while the row is hot, and
// gathers grad_x for the input rows an output row q owns (stride 1: row q; stride 2: rows 2q
// and 2q+1) as soon as g_conv row q + 1 exists. g_conv never goes to memory.
template <typename T, int S, int kAct>
void dw_bwd_nhwc(const T* gy, const T* y, const T* x, const at::Tensor& weight,
                 const at::Tensor& kt, const at::Tensor& bt, const at::Tensor& ct, bool use_z,
                 T* gx, double* gw, const DwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const int64_t C = s.C, Cp = round_up(C, kV);
  const auto wt = dw_weight_taps<T>(weight, C, Cp);
  const auto kk = padded_vec<Acc>(kt, Cp);
  const auto bb = padded_vec<Acc>(bt, Cp);
  const auto cc = padded_vec<Acc>(ct, Cp);
  // A g_conv row: Wo + 2 pixels of stride P (pixels 0 and Wo + 1 and lanes C..P hold 0).
  const int64_t P = pixel_stride<Acc>(C), RW = pad_stride<Acc>((s.Wo + 2) * P);
  const int64_t bands = ceil_div(s.Ho, dw_bwd_band_rows(s.Wo, C));
  const int64_t nchunks = s.N * bands;
  const int64_t WB = nhwc_wide_col_tile(P, S, sizeof(Acc));
  std::vector<Acc> pw(nchunks * 9 * Cp);
  // With z and C a multiple of the vector, g_conv is computed pixel-major over per-block
  // constants (taps, k, b, c), then the tile's weight-gradient taps block by block: the same
  // arithmetic as the block-major loop below, without its register spills.
  const bool by_pixel = use_z && C % kV == 0;
  const auto consts = by_pixel ? BlockConstants<Acc>(wt, Cp, C, {kk.data(), bb.data(), cc.data()})
                               : BlockConstants<Acc>();

  // g_conv of output row (n, ho) into grow (pixel wo at grow + (wo + 1) * P); when kw is given,
  // its weight-gradient taps are added to kw ([9][Cp]).
  auto g_row = [&](auto& src, int64_t n, int64_t ho, Acc* grow, Acc* kw) {
    const auto cv = src.taps(n, ho);
    const int64_t r = n * s.Ho + ho;
    const T* gr = gy + r * s.Wo * C;
    const T* yr = y + r * s.Wo * C;
    Acc* g = grow + P;
    // Captured by value (see dw_fwd_nhwc_pixels).
    auto g_conv = [gr, yr, g, C, P](int64_t wo, int64_t c0, const Vec* zs, int n, const Acc* kb) {
      using K = BlockConstants<Acc>;
      const Vec kv = K::extra(kb, 0), bv = K::extra(kb, 1), cvv = K::extra(kb, 2);
      for (int k = 0; k < n; ++k) {
        const int64_t o = (wo + k) * C + c0;
        const Vec gz = act_grad<kAct>(IO::load(gr + o), IO::load(yr + o));
        at::vec::fmadd(kv, gz, at::vec::fmadd(bv, zs[k], cvv)).store(g + (wo + k) * P + c0);
      }
    };
    for (int64_t wa = 0; wa < s.Wo; wa += WB) {
      const int64_t wb = std::min(s.Wo, wa + WB);
      tile_ready(src, wa, wb, WB);
      if (by_pixel) {
        tile_z_pixels(src, cv, wa, wb, C, consts, wt.data(), Cp, g_conv);
        for (int64_t c0 = 0; kw && c0 < C; c0 += kV) {
          Vec acc[9];
          for (int t = 0; t < 9; ++t) acc[t] = Vec::loadu(kw + t * Cp + c0);
          tile_wgrad(src, cv, wa, wb, c0, g + c0, P, acc);
          for (int t = 0; t < 9; ++t) acc[t].store(kw + t * Cp + c0);
        }
        continue;
      }
      for (int64_t c0 = 0; c0 < C; c0 += kV) {
        const int64_t cnt = std::min(kV, C - c0);
        // g_conv; padded lanes get k = b = c = 0 and g_z = 0, so they hold 0.
        const Vec kv = Vec::loadu(kk.data() + c0);
        auto gz_at = [&](int64_t wo) {
          const int64_t o = wo * C + c0;
          return cnt == kV ? act_grad<kAct>(IO::load(gr + o), IO::load(yr + o))
                           : act_grad<kAct>(IO::load(gr + o, cnt), IO::load(yr + o, cnt));
        };
        if (use_z) {
          Vec w[9];
          for (int t = 0; t < 9; ++t) w[t] = Vec::loadu(wt.data() + t * Cp + c0);
          const Vec bv = Vec::loadu(bb.data() + c0), cvv = Vec::loadu(cc.data() + c0);
          tile_z(src, cv, wa, wb, c0, w, wt.data(), Cp, [&](int64_t wo, const Vec& z) {
            at::vec::fmadd(kv, gz_at(wo), at::vec::fmadd(bv, z, cvv)).store(g + wo * P + c0);
          });
        } else {
          for (int64_t wo = wa; wo < wb; ++wo) (kv * gz_at(wo)).store(g + wo * P + c0);
        }
        if (kw) {
          Vec acc[9];
          for (int t = 0; t < 9; ++t) acc[t] = Vec::loadu(kw + t * Cp + c0);
          tile_wgrad(src, cv, wa, wb, c0, g + c0, P, acc);
          for (int t = 0; t < 9; ++t) acc[t].store(kw + t * Cp + c0);
        }
      }
    }
  };

  // grad_x[h][w] = sum_ij w_ij g_conv[(h + 1 - i) / S][(w + 1 - j) / S] over the terms with
  // whole quotients. Stride 1: the 3x3 correlation of g_conv rows h - 1 .. h + 1 (zero
  // bordered) with the flipped taps, swept four pixels at a time (NhwcTaps). Stride 2: per
  // column parity, from the one or two g_conv rows that reach h.
  std::vector<Acc> wflip(9 * Cp);
  for (int t = 0; t < 9; ++t)
    std::copy(wt.data() + (8 - t) * Cp, wt.data() + (9 - t) * Cp, wflip.data() + t * Cp);
  // Stride 1 with C a multiple of the vector: the gather pixel-major too (grad_x written in
  // order, each pixel's channels one after another).
  const auto flip_consts =
      S == 1 && C % kV == 0 ? BlockConstants<Acc>(wflip, Cp, C, {}) : BlockConstants<Acc>();
  auto gather = [&](int64_t n, int64_t h, auto&& grow) {
    T* xr = gx + (n * s.H + h) * s.W * C;
    // (g_conv row, kernel row) pairs that reach input row h: g_conv row o uses input rows
    // o*S - 1 + i under kernel row i.
    const Acc* gr[3];
    int ki[3];
    int nr = 0;
    for (int i = 0; i < 3; ++i) {
      if ((h + 1 - i) % S != 0) continue;
      gr[nr] = grow((h + 1 - i) / S);
      ki[nr++] = i;
    }
    NhwcTaps<Acc, 1> gt;
    gt.P = P;
    for (int i = 0; i < 3 && S == 1; ++i) gt.rows[i] = gr[2 - i];
    if constexpr (S == 1) {
      if (!flip_consts.empty()) {
        gt.sweep_pixel_groups(0, s.W, C, flip_consts,
                              [xr, C](int64_t col, int64_t c0, const Vec* v, int n, const Acc*) {
                                for (int k = 0; k < n; ++k)
                                  IO::store(xr + (col + k) * C + c0, v[k]);
                              });
        return;
      }
    }
    for (int64_t c0 = 0; c0 < C; c0 += kV) {
      const int64_t cnt = std::min(kV, C - c0);
      auto put = [&](int64_t col, const Vec& v) {
        if (cnt == kV) {
          IO::store(xr + col * C + c0, v);
        } else {
          IO::store(xr + col * C + c0, v, cnt);
        }
      };
      Vec w[9];
      if constexpr (S == 1) {
        for (int t = 0; t < 9; ++t) w[t] = Vec::loadu(wflip.data() + t * Cp + c0);
        gt.sweep(0, s.W, c0, w, put);
        continue;
      }
      for (int t = 0; t < 9; ++t) w[t] = Vec::loadu(wt.data() + t * Cp + c0);
      // Column 2m takes tap j = 1 of g_conv column m, column 2m + 1 taps j = 2 of column m and
      // j = 0 of column m + 1 (padded pixels m + 1 and m + 2): the columns go in pairs, each
      // g_conv vector loaded once; nr (1 for even h, 2 for odd) fixed at compile time.
      auto pairs = [&](auto nr_c) {
        constexpr int NR = decltype(nr_c)::value;
        const Acc* g[NR];
        const Vec* wr[NR];
        Vec a[NR];
        for (int q = 0; q < NR; ++q) {
          g[q] = gr[q] + c0;
          wr[q] = w + 3 * ki[q];
          a[q] = Vec::loadu(g[q] + P);
        }
        for (int64_t m = 0; 2 * m < s.W; ++m) {
          Vec ev(0), od(0);
          for (int q = 0; q < NR; ++q) {
            const Vec b = Vec::loadu(g[q] + (m + 2) * P);
            ev = at::vec::fmadd(a[q], wr[q][1], ev);
            od = at::vec::fmadd(b, wr[q][0], at::vec::fmadd(a[q], wr[q][2], od));
            a[q] = b;
          }
          put(2 * m, ev);
          if (2 * m + 1 < s.W) put(2 * m + 1, od);
        }
      };
      if (nr == 1) {
        pairs(std::integral_constant<int, 1>{});
      } else {
        pairs(std::integral_constant<int, 2>{});
      }
    }
  };

  auto run_bands = [&](auto& src, int64_t cb, int64_t ce) {
    // Three ring rows and a zero row (the g_conv rows outside the image).
    std::vector<Acc> ring(4 * RW, Acc(0));
    auto grow = [&](int64_t q) -> Acc* {
      return ring.data() + (q >= 0 && q < s.Ho ? q % 3 : 3) * RW;
    };
    // grad_x of the input rows that output row q owns; needs g_conv rows q - 1 .. q + 1.
    auto emit = [&](int64_t n, int64_t q) {
      for (int64_t h = q * S; h < std::min(s.H, (q + 1) * S); ++h) gather(n, h, grow);
    };
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t n = k / bands, b = k % bands;
      const int64_t ho0 = b * s.Ho / bands, ho1 = (b + 1) * s.Ho / bands;
      Acc* kw = pw.data() + k * 9 * Cp;
      std::fill(kw, kw + 9 * Cp, Acc(0));
      const int64_t qa = S == 1 ? std::max<int64_t>(0, ho0 - 1) : ho0;
      const int64_t qb = std::min(s.Ho, ho1 + 1);
      for (int64_t q = qa; q < qb; ++q) {
        g_row(src, n, q, grow(q), q >= ho0 && q < ho1 ? kw : nullptr);
        if (q - 1 >= ho0) emit(n, q - 1);
      }
      if (ho1 == s.Ho) emit(n, s.Ho - 1);
    }
  };
  parallel_nhwc_rows<T, S>(x, s, nchunks, run_bands);

  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < 9; ++t) {
      double acc = 0;
      for (int64_t k = 0; k < nchunks; ++k) acc += static_cast<double>(pw[(k * 9 + t) * Cp + c]);
      gw[c * 9 + t] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// dw_bwd, NCHW

// grad_weight[c][t] = the sum over images n of the plane partials pw[(n * C + c) * 9 + t].
inline void sum_plane_partials(const std::vector<double>& pw, const DwShape& s, double* gw) {
  for (int64_t c = 0; c < s.C; ++c)
    for (int t = 0; t < 9; ++t) {
      double acc = 0;
      for (int64_t n = 0; n < s.N; ++n) acc += pw[(n * s.C + c) * 9 + t];
      gw[c * 9 + t] = acc;
    }
}

// Stride 1, planes at most kFlatBwdMaxW wide and 4096 outputs (the 14x14 and 7x7 layers): one plane
// at a time in FlatPlane's flat layout (rows of L = W + 2 entries, the outputs one run of full
// vectors; junk entries masked to g_conv = 0), g_conv stored in the padded geometry of the input
// (entry (h + 1) * L + w + 1, zero border), and grad_x at flat entry p the correlation of that
// plane with the flipped taps, again full vectors at constant offsets. (The row kernel spends a
// masked vector per row on such planes, 7 of 8 lanes on the 7-wide ones.) Measured (fp32, batch 8,
// against the row kernel, alternated builds): 14x14x512 1.2 -> 0.88-0.96 ms, 7x7x1024 1.26-1.29 ->
// 0.76-0.95, 12x12x512 1.05-1.12 -> 0.61-0.69, 20x20x256 even; 24-, 28- and 56-wide planes 1.5-1.6x
// slower, hence the bound.
constexpr int64_t kFlatBwdMaxW = 16;

template <typename T, int kAct>
void dw_bwd_nchw_flat(const T* gy, const T* y, const T* x, const T* wp,
                      const typename AccOf<T>::type* kp, const typename AccOf<T>::type* bp,
                      const typename AccOf<T>::type* cp, bool use_z, T* gx, double* gw,
                      const DwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const int64_t HW = s.H * s.W;
  std::vector<double> pw(s.N * s.C * 9);
  at::parallel_for(0, s.N * s.C, grain_for(2 * HW), [&](int64_t begin, int64_t end) {
    FlatPlane<T, 1> fp(s.H, s.W);
    const int64_t L = fp.L(), len = fp.flat_len();
    // Junk entries of gf and yf are never written, so they stay 0.
    std::vector<Acc> gf(len, Acc(0)), yf(len, Acc(0)), xf(len, Acc(0));
    std::vector<Acc> gpad((s.H + 3) * L + 3 * kV, Acc(0));
    Acc* g0 = gpad.data() + L + 1;  // g_conv of flat output q at g0[q]
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % s.C;
      Vec w[9];
      flat_plane_inputs(fp, gy, y, x, wp, p, s, gf.data(), yf.data(), w);
      const Vec kv(kp[c]), bv(bp[c]), cv(cp[c]);
      Vec acc[9];
      for (int t = 0; t < 9; ++t) acc[t] = Vec(0);
      for (int64_t q = 0; q < fp.count(); q += kV) {
        Vec g = kv * act_grad<kAct>(Vec::loadu(gf.data() + q), Vec::loadu(yf.data() + q));
        if (use_z) g = at::vec::fmadd(bv, fp.z(q, w), g + cv);
        // Junk entries (and those past count()) get 0, whatever z is there.
        g = Vec::blendv(Vec(0), g, Vec::loadu(fp.valid() + q) != Vec(0));
        g.store(g0 + q);
        fp.wgrad(q, g, acc);
      }
      for (int t = 0; t < 9; ++t) pw[p * 9 + t] = hsum(acc[t]);
      // grad_x[h][w] = sum_ij w_ij gpad[(h + 2 - i) * L + w + 2 - j].
      for (int64_t q = 0; q < fp.count(); q += kV) {
        const Acc* b = gpad.data() + q;
        Vec v(0);
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j)
            v = at::vec::fmadd(Vec::loadu(b + (2 - i) * L + 2 - j), w[3 * i + j], v);
        v.store(xf.data() + q);
      }
      fp.from_flat(xf.data(), gx + p * HW);
    }
  });
  sum_plane_partials(pw, s, gw);
}

template <typename T, int S, int kAct>
void dw_bwd_nchw(const T* gy, const T* y, const T* x, const at::Tensor& weight,
                 const at::Tensor& kt, const at::Tensor& bt, const at::Tensor& ct, bool use_z,
                 T* gx, double* gw, const DwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const T* wp = weight.const_data_ptr<T>();
  const Acc* kp = kt.const_data_ptr<Acc>();
  const Acc* bp = bt.const_data_ptr<Acc>();
  const Acc* cp = ct.const_data_ptr<Acc>();
  const int64_t HW = s.H * s.W, HWo = s.Ho * s.Wo;
  if constexpr (S == 1) {
    if (s.W <= kFlatBwdMaxW && HWo <= 4096)  // 4096: the fp32 accumulation length
      return dw_bwd_nchw_flat<T, kAct>(gy, y, x, wp, kp, bp, cp, use_z, gx, gw, s);
  }
  const int64_t R = std::max<int64_t>(1, 4096 / s.Wo);  // rows per Acc accumulation block
  // Padded g_conv plane: row ho+1 holds g_conv[ho] at columns 1..Wo; everything else is 0.
  const int64_t Lg = s.Wo + 2 + 2 * kV;
  std::vector<double> pw(s.N * s.C * 9);
  at::parallel_for(0, s.N * s.C, grain_for(HWo + HW), [&](int64_t begin, int64_t end) {
    PlaneRows<T, S> rows(s.H, s.W);
    std::vector<Acc> gpad((s.Ho + 2) * Lg, Acc(0));
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % s.C;
      rows.reset(x + p * HW);
      Vec w[9];
      for (int t = 0; t < 9; ++t) w[t] = Vec(static_cast<Acc>(wp[c * 9 + t]));
      const Vec kv(kp[c]), bv(bp[c]), cv(cp[c]);
      const T* gp = gy + p * HWo;
      const T* yp = y + p * HWo;
      double dw[9] = {};
      for (int64_t h0 = 0; h0 < s.Ho; h0 += R) {
        Vec acc[9];
        for (int t = 0; t < 9; ++t) acc[t] = Vec(0);
        for (int64_t ho = h0; ho < std::min(s.Ho, h0 + R); ++ho) {
          const Acc* r[3] = {rows.get(ho * S - 1), rows.get(ho * S), rows.get(ho * S + 1)};
          const T* gr = gp + ho * s.Wo;
          const T* yr = yp + ho * s.Wo;
          Acc* grow = gpad.data() + (ho + 1) * Lg + 1;
          for (int64_t wo = 0; wo < s.Wo; wo += kV) {
            const int64_t cnt = std::min(kV, s.Wo - wo);
            const Vec gz = cnt == kV
                               ? act_grad<kAct>(IO::load(gr + wo), IO::load(yr + wo))
                               : act_grad<kAct>(IO::load(gr + wo, cnt), IO::load(yr + wo, cnt));
            Vec g = kv * gz;
            if (use_z) g = at::vec::fmadd(bv, nchw_conv<S>(r, wo, w, rows.half()), g + cv);
            g.store(grow + wo, cnt);  // lanes past Wo stay 0
          }
          for (int64_t wo = 0; wo < s.Wo; wo += kV) {
            const Vec g = Vec::loadu(grow + wo);
            for (int i = 0; i < 3; ++i) {
              const Acc* xi = r[i] + wo;
              if constexpr (S == 1) {
                acc[3 * i] = at::vec::fmadd(g, Vec::loadu(xi), acc[3 * i]);
                acc[3 * i + 1] = at::vec::fmadd(g, Vec::loadu(xi + 1), acc[3 * i + 1]);
                acc[3 * i + 2] = at::vec::fmadd(g, Vec::loadu(xi + 2), acc[3 * i + 2]);
              } else {
                acc[3 * i] = at::vec::fmadd(g, Vec::loadu(xi), acc[3 * i]);
                acc[3 * i + 1] = at::vec::fmadd(g, Vec::loadu(xi + rows.half()), acc[3 * i + 1]);
                acc[3 * i + 2] = at::vec::fmadd(g, Vec::loadu(xi + 1), acc[3 * i + 2]);
              }
            }
          }
        }
        for (int t = 0; t < 9; ++t) dw[t] += hsum(acc[t]);
      }
      for (int t = 0; t < 9; ++t) pw[p * 9 + t] = dw[t];

      // grad_x of the plane from the padded g_conv plane.
      T* xp = gx + p * HW;
      for (int64_t h = 0; h < s.H; ++h) {
        T* xr = xp + h * s.W;
        if constexpr (S == 1) {
          // grad_x[h][w] = sum_ij w_ij * gpad[h+2-i][w+2-j]
          for (int64_t col = 0; col < s.W; col += kV) {
            Vec v(0);
            for (int i = 0; i < 3; ++i) {
              const Acc* g = gpad.data() + (h + 2 - i) * Lg + col;
              v = at::vec::fmadd(Vec::loadu(g + 2), w[3 * i], v);
              v = at::vec::fmadd(Vec::loadu(g + 1), w[3 * i + 1], v);
              v = at::vec::fmadd(Vec::loadu(g), w[3 * i + 2], v);
            }
            const int64_t cnt = std::min(kV, s.W - col);
            if (cnt == kV) {
              IO::store(xr + col, v);
            } else {
              IO::store(xr + col, v, cnt);
            }
          }
        } else {
          // Even columns 2m take tap j=1 of g_conv column m; odd columns 2m+1 take j=0 of
          // column m+1 and j=2 of column m. Rows likewise by the parity of h.
          const Acc* gr[2];
          int ki[2];
          int nr = 0;
          if (h % 2 == 0) {
            gr[nr] = gpad.data() + (h / 2 + 1) * Lg;
            ki[nr++] = 1;
          } else {
            gr[nr] = gpad.data() + ((h + 1) / 2 + 1) * Lg;
            ki[nr++] = 0;
            gr[nr] = gpad.data() + ((h - 1) / 2 + 1) * Lg;
            ki[nr++] = 2;
          }
          for (int64_t m = 0; 2 * m < s.W; m += kV) {
            Vec ev(0), od(0);
            for (int q = 0; q < nr; ++q) {
              const Acc* g = gr[q] + m;
              const Vec* wr = w + 3 * ki[q];
              const Vec g1 = Vec::loadu(g + 1);
              ev = at::vec::fmadd(g1, wr[1], ev);
              od = at::vec::fmadd(Vec::loadu(g + 2), wr[0], at::vec::fmadd(g1, wr[2], od));
            }
            const auto lohi = at::vec::interleave2(ev, od);
            const int64_t col = 2 * m;
            const int64_t cnt = std::min(2 * kV, s.W - col);
            if (cnt == 2 * kV) {
              IO::store(xr + col, lohi.first);
              IO::store(xr + col + kV, lohi.second);
            } else if (cnt > kV) {
              IO::store(xr + col, lohi.first);
              IO::store(xr + col + kV, lohi.second, cnt - kV);
            } else {
              IO::store(xr + col, lohi.first, cnt);
            }
          }
        }
      }
    }
  });
  sum_plane_partials(pw, s, gw);
}

// ---------------------------------------------------------------------------------------------
// Glue

std::tuple<at::Tensor, at::Tensor> dw_bwd_reduce_cpu(const at::Tensor& grad_y, const at::Tensor& y,
                                                     const at::Tensor& x, const at::Tensor& weight,
                                                     const at::Tensor& mean,
                                                     const at::Tensor& invstd, int64_t stride,
                                                     int64_t act) {
  constexpr const char* op = "dw_bwd_reduce";
  const DwShape s = check_dw_input(op, x, weight, stride);
  check_act(op, act);
  const std::vector<int64_t> ysz{s.N, s.C, s.Ho, s.Wo};
  check_like(op, "grad_y", grad_y, x, "x", ysz, s.nhwc);
  check_like(op, "y", y, x, "x", ysz, s.nhwc);
  check_channel_vec(op, "mean", mean, s.C, x);
  check_channel_vec(op, "invstd", invstd, s.C, x);
  const auto vopts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor sum_gz = new_output({s.C}, vopts);
  at::Tensor sum_gzxh = new_output({s.C}, vopts);
  if (s.N * s.Ho * s.Wo == 0) {
    sum_gz.zero_();
    sum_gzxh.zero_();
    return {sum_gz, sum_gzxh};
  }
  std::vector<double> a(s.C), b(s.C);
  DWSEP_CPU_DISPATCH(x.scalar_type(), "dwsep_dw_bwd_reduce_cpu", [&] {
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_stride(stride, [&](auto S) {
      dispatch_act(act, [&](auto A) {
        constexpr int kS = decltype(S)::value, kA = decltype(A)::value;
        if (s.nhwc) {
          dw_bwd_reduce_nhwc<scalar_t, kS, kA>(gp, yp, xp, weight, mean, invstd, a.data(), b.data(),
                                               s);
        } else {
          dw_bwd_reduce_nchw<scalar_t, kS, kA>(gp, yp, xp, weight, mean, invstd, a.data(), b.data(),
                                               s);
        }
      });
    });
    using Acc = typename AccOf<scalar_t>::type;
    Acc* ap = sum_gz.mutable_data_ptr<Acc>();
    Acc* bp = sum_gzxh.mutable_data_ptr<Acc>();
    for (int64_t c = 0; c < s.C; ++c) {
      ap[c] = static_cast<Acc>(a[c]);
      bp[c] = static_cast<Acc>(b[c]);
    }
  });
  return {sum_gz, sum_gzxh};
}

std::tuple<at::Tensor, at::Tensor> dw_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& y,
                                              const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& k, const at::Tensor& b,
                                              const at::Tensor& c, int64_t stride, int64_t act,
                                              bool use_z) {
  constexpr const char* op = "dw_bwd";
  const DwShape s = check_dw_input(op, x, weight, stride);
  check_act(op, act);
  const std::vector<int64_t> ysz{s.N, s.C, s.Ho, s.Wo};
  check_like(op, "grad_y", grad_y, x, "x", ysz, s.nhwc);
  check_like(op, "y", y, x, "x", ysz, s.nhwc);
  check_channel_vec(op, "k", k, s.C, x);
  check_channel_vec(op, "b", b, s.C, x);
  check_channel_vec(op, "c", c, s.C, x);
  at::Tensor grad_x = new_output(x.sizes(), x.options(), memory_format(s.nhwc));
  at::Tensor grad_w = new_output(weight.sizes(), weight.options());
  if (x.numel() == 0) {
    grad_w.zero_();
    return {grad_x, grad_w};
  }
  std::vector<double> gw(s.C * 9);
  DWSEP_CPU_DISPATCH(x.scalar_type(), "dwsep_dw_bwd_cpu", [&] {
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    dispatch_stride(stride, [&](auto S) {
      dispatch_act(act, [&](auto A) {
        constexpr int kS = decltype(S)::value, kA = decltype(A)::value;
        if (s.nhwc) {
          dw_bwd_nhwc<scalar_t, kS, kA>(gp, yp, xp, weight, k, b, c, use_z, gxp, gw.data(), s);
        } else {
          dw_bwd_nchw<scalar_t, kS, kA>(gp, yp, xp, weight, k, b, c, use_z, gxp, gw.data(), s);
        }
      });
    });
    scalar_t* gwp = grad_w.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < s.C * 9; ++i) gwp[i] = static_cast<scalar_t>(gw[i]);
  });
  return {grad_x, grad_w};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(dwsep, CPU, m) {
  m.impl("dw_bwd_reduce", &cpu::dw_bwd_reduce_cpu);
  m.impl("dw_bwd", &cpu::dw_bwd_cpu);
}

}  // namespace dwsep
