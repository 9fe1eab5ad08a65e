// CPU kernels for the pointwise backward:
//   dwsep::pw_bwd_reduce: per-channel sum(g_z) and sum(g_z * xhat), g_z = grad_y * act'(z*scale
//                         + shift), xhat = (z - mean) * invstd. Vectorized, fixed chunks.
//   dwsep::pw_bwd: g_conv = k*g_z + b*z + c formed in an fp32/fp64 buffer, then
//                  grad_x = g_conv @ W and grad_weight = g_conv^T @ x with torch's GEMM
//                  (at::cpu::mm_out / addmm_, at::mm's CPU kernel). Two schedules:
//                  - blocks: small pixel blocks in parallel, each GEMM single-threaded while
//                    the block is in cache (few channels: the GEMMs are thin);
//                  - chunks (channels_last, Cin * Cout >= 256^2): large fixed row chunks one
//                    after another, g_conv formed in parallel, each GEMM over the whole chunk
//                    with the GEMM library's own threads (1.25-1.8x faster on MobileNetV1's
//                    512- and 1024-channel layers on 2 cores, where the blocks' weight-gradient
//                    GEMMs have a short reduction and rewrite a large partial for every block).
//
// Deterministic: the blocks schedule accumulates the weight gradient per fixed group of blocks
// (a split-K over pixels with fixed boundaries) and sums the group partials in a fixed order,
// whatever the thread count; the chunks schedule accumulates chunk after chunk with fixed
// boundaries, each GEMM as deterministic as torch's CPU GEMM (run to run, at a given thread
// count); the reduce op uses fixed chunks with a fixed-order double reduction.
// fp16/bf16 blocks are converted to fp32 for the GEMMs (fp32 accumulation).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include "cpu/depthwise_common.h"

namespace dwsep {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// pw_bwd_reduce

template <typename T, int kAct>
void pw_bwd_reduce_kernel(const T* gy, const T* z, const at::Tensor& scale, const at::Tensor& shift,
                          const at::Tensor& mean, const at::Tensor& invstd, double* out1,
                          double* out2, const PwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const int64_t C = s.Cout, Cp = round_up(C, kV), HW = s.HW;
  if (s.nhwc) {
    const auto sc = padded_vec<Acc>(scale, Cp);
    const auto sh = padded_vec<Acc>(shift, Cp);
    const auto mu = padded_vec<Acc>(mean, Cp);
    const auto is = padded_vec<Acc>(invstd, Cp);
    const int64_t M = s.N * HW;
    const int64_t G = nhwc_rows_per_chunk(1, C);  // pixels per chunk
    const int64_t nchunks = ceil_div(M, G);
    std::vector<Acc> p1(nchunks * Cp), p2(nchunks * Cp);
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t k = cb; k < ce; ++k) {
        const int64_t m0 = k * G, m1 = std::min(M, m0 + G);
        for (int64_t c0 = 0; c0 < C; c0 += kV) {
          const int64_t cnt = std::min(kV, C - c0);
          const Vec a = Vec::loadu(sc.data() + c0), b = Vec::loadu(sh.data() + c0);
          const Vec m = Vec::loadu(mu.data() + c0), iv = Vec::loadu(is.data() + c0);
          Vec a1(0), a2(0);
          for (int64_t i = m0; i < m1; ++i) {
            const int64_t o = i * C + c0;
            // Padded lanes load grad_y = 0, so g_z = 0 there.
            const Vec zv = cnt == kV ? IO::load(z + o) : IO::load(z + o, cnt);
            const Vec g = cnt == kV ? IO::load(gy + o) : IO::load(gy + o, cnt);
            const Vec gz = act_grad<kAct>(g, at::vec::fmadd(zv, a, b));
            a1 = a1 + gz;
            a2 = at::vec::fmadd(gz, (zv - m) * iv, a2);
          }
          a1.store(p1.data() + k * Cp + c0);
          a2.store(p2.data() + k * Cp + c0);
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t k = 0; k < nchunks; ++k) {
        s1 += static_cast<double>(p1[k * Cp + c]);
        s2 += static_cast<double>(p2[k * Cp + c]);
      }
      out1[c] = s1;
      out2[c] = s2;
    }
  } else {
    const Acc* scp = scale.const_data_ptr<Acc>();
    const Acc* shp = shift.const_data_ptr<Acc>();
    const Acc* mup = mean.const_data_ptr<Acc>();
    const Acc* isp = invstd.const_data_ptr<Acc>();
    std::vector<double> p1(s.N * C), p2(s.N * C);
    at::parallel_for(0, s.N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const Vec a(scp[c]), b(shp[c]), m(mup[c]), iv(isp[c]);
        const T* zp = z + p * HW;
        const T* gp = gy + p * HW;
        double d1 = 0, d2 = 0;
        for (int64_t i0 = 0; i0 < HW; i0 += 4096) {  // Acc blocks, flushed to double
          const int64_t i1 = std::min(HW, i0 + 4096);
          Vec a1(0), a2(0);
          for (int64_t i = i0; i < i1; i += kV) {
            const int64_t cnt = std::min(kV, i1 - i);
            const Vec zv = cnt == kV ? IO::load(zp + i) : IO::load(zp + i, cnt);
            const Vec g = cnt == kV ? IO::load(gp + i) : IO::load(gp + i, cnt);
            const Vec gz = act_grad<kAct>(g, at::vec::fmadd(zv, a, b));
            a1 = a1 + gz;
            a2 = at::vec::fmadd(gz, (zv - m) * iv, a2);
          }
          d1 += hsum(a1);
          d2 += hsum(a2);
        }
        p1[p] = d1;
        p2[p] = d2;
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t n = 0; n < s.N; ++n) {
        s1 += p1[n * C + c];
        s2 += p2[n * C + c];
      }
      out1[c] = s1;
      out2[c] = s2;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// pw_bwd

// g_conv = k*g_z + b*z + c for `rows` channels_last rows of Cout channels (row stride Cout),
// g_z = grad_y * act'(z*scale + shift), into `out` (Acc, row stride Cout).
template <typename T, int kAct>
inline void g_conv_rows_nhwc(const T* gy, const T* z, int64_t rows, int64_t Cout,
                             const std::vector<typename AccOf<T>::type>& sc,
                             const std::vector<typename AccOf<T>::type>& sh,
                             const std::vector<typename AccOf<T>::type>& kk,
                             const std::vector<typename AccOf<T>::type>& bb,
                             const std::vector<typename AccOf<T>::type>& cc,
                             typename AccOf<T>::type* out) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c0 = 0; c0 < Cout; c0 += kV) {
      const int64_t cnt = std::min(kV, Cout - c0);
      const int64_t o = i * Cout + c0;
      const Vec zv = cnt == kV ? IO::load(z + o) : IO::load(z + o, cnt);
      const Vec gv = cnt == kV ? IO::load(gy + o) : IO::load(gy + o, cnt);
      const Vec gz = act_grad<kAct>(
          gv, at::vec::fmadd(zv, Vec::loadu(sc.data() + c0), Vec::loadu(sh.data() + c0)));
      const Vec gc = at::vec::fmadd(
          Vec::loadu(kk.data() + c0), gz,
          at::vec::fmadd(Vec::loadu(bb.data() + c0), zv, Vec::loadu(cc.data() + c0)));
      gc.store(out + o, cnt);
    }
  }
}

// Rows per chunk of the chunks schedule: ~4 MB of fp32 on the wider side (fixed, so results do
// not depend on the machine), at least 256.
inline int64_t pw_bwd_chunk_rows(int64_t cin, int64_t cout) {
  return std::max<int64_t>(256, (int64_t(1) << 20) / std::max(cin, cout));
}

// DWSEP_CPU_PW_BWD=blocks|chunks forces a schedule (for A/B measurements; chunks only applies
// to channels_last); unset or anything else: chunks for channels_last with Cin * Cout >= 256^2
// (where it measured faster on 2 cores, fp32 and bf16; below that the blocks were as fast or
// up to 10% faster).
inline bool pw_bwd_use_chunks(bool nhwc, int64_t cin, int64_t cout) {
  if (!nhwc) return false;
  const char* force = std::getenv("DWSEP_CPU_PW_BWD");
  if (force != nullptr && std::strcmp(force, "blocks") == 0) return false;
  if (force != nullptr && std::strcmp(force, "chunks") == 0) return true;
  return cin * cout >= 256 * 256;
}

// The chunks schedule (channels_last): rows [r0, r1) of the (N*HW, C) matrices at a time.
template <typename T, int kAct>
void pw_bwd_chunks(const T* gy, const T* z, const T* x, const typename AccOf<T>::type* wp,
                   const std::vector<typename AccOf<T>::type>& sc,
                   const std::vector<typename AccOf<T>::type>& sh,
                   const std::vector<typename AccOf<T>::type>& kk,
                   const std::vector<typename AccOf<T>::type>& bb,
                   const std::vector<typename AccOf<T>::type>& cc, T* gx,
                   typename AccOf<T>::type* gw, const PwShape& s) {
  using Acc = typename AccOf<T>::type;
  constexpr bool kSame = std::is_same_v<T, Acc>;
  const int64_t Cin = s.Cin, Cout = s.Cout, M = s.N * s.HW;
  const int64_t R = std::min(M, pw_bwd_chunk_rows(Cin, Cout));
  std::vector<Acc> gbuf(R * Cout), xbuf(kSame ? 0 : R * Cin), gxbuf(kSame ? 0 : R * Cin);
  const at::Tensor wt = blob(wp, {Cout, Cin}, {Cin, 1});
  at::Tensor gwt = blob(gw, {Cout, Cin}, {Cin, 1});
  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t len = std::min(R, M - r0);
    const T* gyb = gy + r0 * Cout;
    const T* zb = z + r0 * Cout;
    at::parallel_for(0, len, 64, [&](int64_t i0, int64_t i1) {
      g_conv_rows_nhwc<T, kAct>(gyb + i0 * Cout, zb + i0 * Cout, i1 - i0, Cout, sc, sh, kk, bb, cc,
                                gbuf.data() + i0 * Cout);
    });
    const at::Tensor gt = blob(gbuf.data(), {len, Cout}, {Cout, 1});
    // grad_x[len, Cin] = G @ W
    Acc* gxa = kSame ? reinterpret_cast<Acc*>(gx + r0 * Cin) : gxbuf.data();
    at::Tensor gxt = blob(gxa, {len, Cin}, {Cin, 1});
    at::cpu::mm_out(gxt, gt, wt);
    const T* xb = x + r0 * Cin;
    const Acc* xa = reinterpret_cast<const Acc*>(xb);
    if constexpr (!kSame) {
      at::parallel_for(0, len, 64, [&](int64_t i0, int64_t i1) {
        convert_from_acc<T>(gxa + i0 * Cin, gx + (r0 + i0) * Cin, (i1 - i0) * Cin);
        convert_to_acc<T>(xb + i0 * Cin, xbuf.data() + i0 * Cin, (i1 - i0) * Cin);
      });
      xa = xbuf.data();
    }
    // grad_w (+)= G^T @ X
    const at::Tensor gtt = blob(gbuf.data(), {Cout, len}, {1, Cout});
    const at::Tensor xt = blob(xa, {len, Cin}, {Cin, 1});
    if (r0 == 0) {
      at::cpu::mm_out(gwt, gtt, xt);
    } else {
      at::cpu::addmm_(gwt, gtt, xt);
    }
  }
}

template <typename T, int kAct>
void pw_bwd_kernel(const T* gy, const T* z, const T* x, const at::Tensor& wa,
                   const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& kt,
                   const at::Tensor& bt, const at::Tensor& ct, T* gx, typename AccOf<T>::type* gw,
                   const PwShape& s) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  constexpr bool kSame = std::is_same_v<T, Acc>;
  const int64_t Cin = s.Cin, Cout = s.Cout, HW = s.HW, Cp = round_up(Cout, kV);
  const Acc* wp = wa.const_data_ptr<Acc>();
  const auto sc = padded_vec<Acc>(scale, Cp);
  const auto sh = padded_vec<Acc>(shift, Cp);
  const auto kk = padded_vec<Acc>(kt, Cp);
  const auto bb = padded_vec<Acc>(bt, Cp);
  const auto cc = padded_vec<Acc>(ct, Cp);
  if (pw_bwd_use_chunks(s.nhwc, Cin, Cout)) {
    pw_bwd_chunks<T, kAct>(gy, z, x, wp, sc, sh, kk, bb, cc, gx, gw, s);
    return;
  }
  const PwBlocks B(s);
  // Weight-gradient partials: one per fixed group of consecutive blocks, at most 64 groups and
  // ~32 MB of partials.
  const int64_t wsize = Cout * Cin;
  const int64_t max_groups = std::max<int64_t>(
      1, std::min<int64_t>(64, (int64_t(32) << 20) / (wsize * static_cast<int64_t>(sizeof(Acc)))));
  const int64_t per_group = ceil_div(B.count, std::min(B.count, max_groups));
  const int64_t ngroups = ceil_div(B.count, per_group);
  std::vector<Acc> part(ngroups * wsize);

  at::parallel_for(0, ngroups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<Acc> gbuf(B.bs * Cout), xbuf(kSame && B.nhwc ? 0 : B.bs * Cin), gxbuf(B.bs * Cin);
    for (int64_t g = g0; g < g1; ++g) {
      at::Tensor pt = blob(part.data() + g * wsize, {Cout, Cin}, {Cin, 1});
      for (int64_t bi = g * per_group; bi < std::min(B.count, (g + 1) * per_group); ++bi) {
        const auto blk = B.get(bi);
        const int64_t len = blk.len;
        const bool first = bi == g * per_group;
        if (B.nhwc) {
          // G[len, Cout]
          const T* gyb = gy + blk.p0 * Cout;
          const T* zb = z + blk.p0 * Cout;
          g_conv_rows_nhwc<T, kAct>(gyb, zb, len, Cout, sc, sh, kk, bb, cc, gbuf.data());
          const at::Tensor gt = blob(gbuf.data(), {len, Cout}, {Cout, 1});
          // grad_x[len, Cin] = G @ W
          T* gxb = gx + blk.p0 * Cin;
          Acc* gxa = kSame ? reinterpret_cast<Acc*>(gxb) : gxbuf.data();
          at::Tensor gxt = blob(gxa, {len, Cin}, {Cin, 1});
          at::cpu::mm_out(gxt, gt, blob(wp, {Cout, Cin}, {Cin, 1}));
          if constexpr (!kSame) convert_from_acc<T>(gxa, gxb, len * Cin);
          // partial += G^T @ X
          const T* xb = x + blk.p0 * Cin;
          const Acc* xa = reinterpret_cast<const Acc*>(xb);
          if constexpr (!kSame) {
            convert_to_acc<T>(xb, xbuf.data(), len * Cin);
            xa = xbuf.data();
          }
          const at::Tensor gtt = blob(gbuf.data(), {Cout, len}, {1, Cout});
          const at::Tensor xt = blob(xa, {len, Cin}, {Cin, 1});
          if (first) {
            at::cpu::mm_out(pt, gtt, xt);
          } else {
            at::cpu::addmm_(pt, gtt, xt);
          }
        } else {
          // G[Cout, len] for image n, pixels [p0, p0+len)
          const int64_t off = blk.n * Cout * HW + blk.p0;
          for (int64_t co = 0; co < Cout; ++co) {
            const T* zr = z + off + co * HW;
            const T* gr = gy + off + co * HW;
            Acc* out = gbuf.data() + co * len;
            const Vec a(sc[co]), b(sh[co]), kv(kk[co]), bv(bb[co]), cv(cc[co]);
            for (int64_t i = 0; i < len; i += kV) {
              const int64_t cnt = std::min(kV, len - i);
              const Vec zv = cnt == kV ? IO::load(zr + i) : IO::load(zr + i, cnt);
              const Vec gv = cnt == kV ? IO::load(gr + i) : IO::load(gr + i, cnt);
              const Vec gz = act_grad<kAct>(gv, at::vec::fmadd(zv, a, b));
              at::vec::fmadd(kv, gz, at::vec::fmadd(bv, zv, cv)).store(out + i, cnt);
            }
          }
          const at::Tensor gt = blob(gbuf.data(), {Cout, len}, {len, 1});
          // grad_x[Cin, len] = W^T @ G
          T* gxb = gx + blk.n * Cin * HW + blk.p0;
          const bool direct = kSame && len == HW;
          Acc* gxa = direct ? reinterpret_cast<Acc*>(gxb) : gxbuf.data();
          at::Tensor gxt = blob(gxa, {Cin, len}, {len, 1});
          at::cpu::mm_out(gxt, blob(wp, {Cin, Cout}, {1, Cin}), gt);
          if (!direct)
            for (int64_t ci = 0; ci < Cin; ++ci)
              convert_from_acc<T>(gxa + ci * len, gxb + ci * HW, len);
          // partial += G @ X^T
          const T* xb = x + blk.n * Cin * HW + blk.p0;
          at::Tensor xtt;
          if constexpr (kSame) {
            xtt = blob(reinterpret_cast<const Acc*>(xb), {len, Cin}, {1, HW});
          } else {
            for (int64_t ci = 0; ci < Cin; ++ci)
              convert_to_acc<T>(xb + ci * HW, xbuf.data() + ci * len, len);
            xtt = blob(xbuf.data(), {len, Cin}, {1, len});
          }
          if (first) {
            at::cpu::mm_out(pt, gt, xtt);
          } else {
            at::cpu::addmm_(pt, gt, xtt);
          }
        }
      }
    }
  });
  // Fixed-order sum of the group partials.
  at::parallel_for(0, wsize, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += kV) {
      const int64_t cnt = std::min(kV, i1 - i);
      Vec acc = Vec::loadu(part.data() + i, cnt);
      for (int64_t g = 1; g < ngroups; ++g)
        acc = acc + Vec::loadu(part.data() + g * wsize + i, cnt);
      acc.store(gw + i, cnt);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Glue

// Layout shared by z/grad_y (Cout channels) and x (Cin channels): channels_last if either is
// strictly channels_last; every tensor must then be dense in it (a tensor with one channel or a
// 1x1 image is dense in both layouts).
bool pw_bwd_layout(const char* op, const at::Tensor& z, const at::Tensor& x) {
  return is_nhwc(op, "z", z) || is_nhwc(op, "x", x);
}

std::tuple<at::Tensor, at::Tensor> pw_bwd_reduce_cpu(const at::Tensor& grad_y, const at::Tensor& z,
                                                     const at::Tensor& scale,
                                                     const at::Tensor& shift,
                                                     const at::Tensor& mean,
                                                     const at::Tensor& invstd, int64_t act) {
  constexpr const char* op = "pw_bwd_reduce";
  check_cpu(op, "z", z);
  check_float_dtype(op, "z", z);
  const bool nhwc = is_nhwc(op, "z", z);
  check_act(op, act);
  check_like(op, "grad_y", grad_y, z, "z", z.sizes(), nhwc);
  const int64_t C = z.size(1);
  check_channel_vec(op, "scale", scale, C, z);
  check_channel_vec(op, "shift", shift, C, z);
  check_channel_vec(op, "mean", mean, C, z);
  check_channel_vec(op, "invstd", invstd, C, z);
  const auto vopts = z.options().dtype(acc_type(z.scalar_type()));
  at::Tensor sum_gz = new_output({C}, vopts);
  at::Tensor sum_gzxh = new_output({C}, vopts);
  if (z.numel() == 0) {
    sum_gz.zero_();
    sum_gzxh.zero_();
    return {sum_gz, sum_gzxh};
  }
  PwShape s;
  s.N = z.size(0);
  s.Cin = s.Cout = C;
  s.H = z.size(2);
  s.W = z.size(3);
  s.HW = s.H * s.W;
  s.nhwc = nhwc;
  std::vector<double> a(C), b(C);
  DWSEP_CPU_DISPATCH(z.scalar_type(), "dwsep_pw_bwd_reduce_cpu", [&] {
    dispatch_act(act, [&](auto A) {
      pw_bwd_reduce_kernel<scalar_t, decltype(A)::value>(grad_y.const_data_ptr<scalar_t>(),
                                                         z.const_data_ptr<scalar_t>(), scale, shift,
                                                         mean, invstd, a.data(), b.data(), s);
    });
    using Acc = typename AccOf<scalar_t>::type;
    Acc* ap = sum_gz.mutable_data_ptr<Acc>();
    Acc* bp = sum_gzxh.mutable_data_ptr<Acc>();
    for (int64_t c = 0; c < C; ++c) {
      ap[c] = static_cast<Acc>(a[c]);
      bp[c] = static_cast<Acc>(b[c]);
    }
  });
  return {sum_gz, sum_gzxh};
}

std::tuple<at::Tensor, at::Tensor> pw_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& z,
                                              const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& scale, const at::Tensor& shift,
                                              const at::Tensor& k, const at::Tensor& b,
                                              const at::Tensor& c, int64_t act) {
  constexpr const char* op = "pw_bwd";
  PwShape s = check_pw_input(op, x, weight);
  check_act(op, act);
  check_cpu(op, "z", z);
  s.nhwc = pw_bwd_layout(op, z, x);
  const std::vector<int64_t> zsz{s.N, s.Cout, s.H, s.W};
  check_like(op, "z", z, x, "x", zsz, s.nhwc);
  check_like(op, "grad_y", grad_y, x, "x", zsz, s.nhwc);
  TORCH_CHECK(x.is_contiguous(memory_format(s.nhwc)), "dwsep::", op,
              ": x must be contiguous in the layout of z (", s.nhwc ? "channels_last" : "NCHW",
              "), got strides ", x.strides());
  check_channel_vec(op, "scale", scale, s.Cout, x);
  check_channel_vec(op, "shift", shift, s.Cout, x);
  check_channel_vec(op, "k", k, s.Cout, x);
  check_channel_vec(op, "b", b, s.Cout, x);
  check_channel_vec(op, "c", c, s.Cout, x);
  // grad_x follows x's own format (as the fake impl does); for an x dense in both layouts the
  // two coincide in memory.
  at::Tensor grad_x = new_output(x.sizes(), x.options(), memory_format(is_nhwc(op, "x", x)));
  at::Tensor grad_w = new_output(weight.sizes(), weight.options());
  if (x.numel() == 0 || s.N * s.HW == 0) {
    grad_w.zero_();
    return {grad_x, grad_w};
  }
  DWSEP_CPU_DISPATCH(x.scalar_type(), "dwsep_pw_bwd_cpu", [&] {
    using Acc = typename AccOf<scalar_t>::type;
    const auto acc = c10::CppTypeToScalarType<Acc>::value;
    const at::Tensor wa = weight.scalar_type() == acc ? weight : weight.to(acc).contiguous();
    std::vector<Acc> gw(s.Cout * s.Cin);
    dispatch_act(act, [&](auto A) {
      pw_bwd_kernel<scalar_t, decltype(A)::value>(
          grad_y.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
          x.const_data_ptr<scalar_t>(), wa, scale, shift, k, b, c,
          grad_x.mutable_data_ptr<scalar_t>(), gw.data(), s);
    });
    convert_from_acc<scalar_t>(gw.data(), grad_w.mutable_data_ptr<scalar_t>(), s.Cout * s.Cin);
  });
  return {grad_x, grad_w};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(dwsep, CPU, m) {
  m.impl("pw_bwd_reduce", &cpu::pw_bwd_reduce_cpu);
  m.impl("pw_bwd", &cpu::pw_bwd_cpu);
}

}  // namespace dwsep
