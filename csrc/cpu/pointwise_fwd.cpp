// CPU kernels for dwsep::pw_fwd (1x1 conv + folded BN + activation) and dwsep::pw_fwd_stats
// (1x1 conv output z plus its per-channel batch mean / biased variance).
//
// The GEMM is torch's (at::cpu::mm_out, i.e. at::mm's CPU kernel: MKL/oneDNN sgemm/dgemm), run
// block by block (PwBlocks: fixed pixel blocks sized to stay in L2) inside at::parallel_for;
// each block's vectorized epilogue (scale/shift + act, or the statistics and the rounding of z)
// runs right after its GEMM while the block is still in cache. NHWC: block = rows of the
// (N*HW, Cin) matrix times W^T. NCHW: block = W times a column block of one image's (Cin, HW).
//
// fp16/bf16: the x block is converted to fp32 and multiplied with an fp32 copy of W (sgemm with
// fp32 accumulation); the statistics come from the fp32 result before z is rounded to x's dtype.
// fp64 runs dgemm.
//
// Statistics are deterministic whatever the thread count: per block (count, mean, M2) from a
// two-pass over the in-cache fp32 block, merged across blocks with Chan's formula in a fixed
// order, in double.
#include <torch/library.h>

#include <ATen/Context.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/unsqueeze.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include "cpu/depthwise_common.h"

namespace dwsep {
namespace cpu {
namespace {

// NCHW planes below this many pixels go to oneDNN (see use_onednn).
constexpr int64_t kOnednnMaxNchwPlane = 28 * 28;
// channels_last planes up to this many pixels, or inputs up to this many elements, take one
// at::mm plus a scale/shift/activation pass instead of oneDNN's 1x1 convolution (use_mm_nhwc).
constexpr int64_t kMmMaxNhwcPlane = 14 * 14;
constexpr int64_t kMmMaxNhwcInput = 512 * 1024;
// GEMMs of fewer rows than this (the 7x7 layers at batch 1) and at least kMmSplitMinMacs
// multiply-adds run as one single-threaded GEMM per thread over a share of at least
// kMmSplitMinCols output channels (see conv1x1_mm_nhwc).
constexpr int64_t kMmSplitMaxRows = 64;
constexpr int64_t kMmSplitMinCols = 128;
constexpr int64_t kMmSplitMinMacs = 1 << 22;  // below it, the parallel region costs more

template <typename T>
at::Tensor acc_weight(const at::Tensor& weight) {
  using Acc = typename AccOf<T>::type;
  const auto acc = c10::CppTypeToScalarType<Acc>::value;
  return weight.scalar_type() == acc ? weight : weight.to(acc).contiguous();
}

// Moments of one block of z (two passes over the in-cache block), stored as row `bi` of the
// [count][Cp] partials. NHWC: `len` rows of Cout channels, row stride Cout. NCHW: Cout rows of
// `len` pixels, row stride `ld`.
template <typename Acc>
void block_moments_nhwc(const Acc* zb, int64_t len, int64_t Cout, Acc* pmean, Acc* pm2) {
  using Vec = at::vec::Vectorized<Acc>;
  constexpr int64_t kV = Vec::size();
  const Vec inv(static_cast<Acc>(1.0 / static_cast<double>(len)));
  for (int64_t c0 = 0; c0 < Cout; c0 += kV) {
    const int64_t cnt = std::min(kV, Cout - c0);
    Vec sum(0);
    for (int64_t i = 0; i < len; ++i) sum = sum + Vec::loadu(zb + i * Cout + c0, cnt);
    const Vec mean = sum * inv;
    Vec m2(0);
    for (int64_t i = 0; i < len; ++i) {
      const Vec d = Vec::loadu(zb + i * Cout + c0, cnt) - mean;
      m2 = at::vec::fmadd(d, d, m2);
    }
    mean.store(pmean + c0);
    m2.store(pm2 + c0);
  }
}

template <typename Acc>
void block_moments_nchw_row(const Acc* zr, int64_t len, Acc* pmean, Acc* pm2) {
  using Vec = at::vec::Vectorized<Acc>;
  constexpr int64_t kV = Vec::size();
  Vec sum(0);
  int64_t i = 0;
  for (; i + kV <= len; i += kV) sum = sum + Vec::loadu(zr + i);
  if (i < len) sum = sum + Vec::loadu(zr + i, len - i);
  const Acc mean = static_cast<Acc>(hsum(sum) / static_cast<double>(len));
  const Vec mv(mean);
  Vec m2(0);
  for (i = 0; i + kV <= len; i += kV) {
    const Vec d = Vec::loadu(zr + i) - mv;
    m2 = at::vec::fmadd(d, d, m2);
  }
  if (i < len) {
    const Vec d = Vec::set(Vec(0), Vec::loadu(zr + i, len - i) - mv, len - i);
    m2 = at::vec::fmadd(d, d, m2);
  }
  *pmean = mean;
  *pm2 = static_cast<Acc>(hsum(m2));
}

// kStats = false: y = act(z * scale + shift) (pw_fwd).
// kStats = true: y holds z, and pmean/pm2 ([count][Cp]) the per-block moments (pw_fwd_stats).
template <typename T, int kAct, bool kStats>
void pw_forward(const T* x, const at::Tensor& wa, const typename AccOf<T>::type* scale,
                const typename AccOf<T>::type* shift, T* y, typename AccOf<T>::type* pmean,
                typename AccOf<T>::type* pm2, const PwShape& s, const PwBlocks& B) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  constexpr bool kSame = std::is_same_v<T, Acc>;
  const int64_t Cin = s.Cin, Cout = s.Cout, HW = s.HW, Cp = round_up(Cout, kV);
  const Acc* wp = wa.const_data_ptr<Acc>();
  std::vector<Acc> sc, sh;
  if constexpr (!kStats) {
    sc.assign(scale, scale + Cout);
    sh.assign(shift, shift + Cout);
    sc.resize(Cp, Acc(0));
    sh.resize(Cp, Acc(0));
  }
  at::parallel_for(0, B.count, 1, [&](int64_t b0, int64_t b1) {
    std::vector<Acc> xbuf(kSame ? 0 : B.bs * Cin), zbuf(B.bs * Cout);
    for (int64_t bi = b0; bi < b1; ++bi) {
      const auto blk = B.get(bi);
      const int64_t len = blk.len;
      if (B.nhwc) {
        // Z[len, Cout] = X[len, Cin] @ W^T
        const T* xb = x + blk.p0 * Cin;
        T* yb = y + blk.p0 * Cout;
        const Acc* xa = reinterpret_cast<const Acc*>(xb);
        if constexpr (!kSame) {
          convert_to_acc<T>(xb, xbuf.data(), len * Cin);
          xa = xbuf.data();
        }
        Acc* zb = kSame ? reinterpret_cast<Acc*>(yb) : zbuf.data();
        at::Tensor zt = blob(zb, {len, Cout}, {Cout, 1});
        at::cpu::mm_out(zt, blob(xa, {len, Cin}, {Cin, 1}), blob(wp, {Cin, Cout}, {1, Cin}));
        if constexpr (kStats) {
          block_moments_nhwc<Acc>(zb, len, Cout, pmean + bi * Cp, pm2 + bi * Cp);
          if constexpr (!kSame) convert_from_acc<T>(zb, yb, len * Cout);
        } else {
          for (int64_t i = 0; i < len; ++i)
            scale_shift_act_row<T, kAct>(zb + i * Cout, yb + i * Cout, sc.data(), sh.data(), Cout);
        }
      } else {
        // Z[Cout, len] = W @ X_n[:, p0:p0+len]
        const T* xb = x + blk.n * Cin * HW + blk.p0;
        T* yb = y + blk.n * Cout * HW + blk.p0;
        at::Tensor xt;
        if constexpr (kSame) {
          xt = blob(reinterpret_cast<const Acc*>(xb), {Cin, len}, {HW, 1});
        } else {
          for (int64_t ci = 0; ci < Cin; ++ci)
            convert_to_acc<T>(xb + ci * HW, xbuf.data() + ci * len, len);
          xt = blob(xbuf.data(), {Cin, len}, {len, 1});
        }
        // A whole fp32/fp64 image is written in place; partial blocks go through zbuf.
        const bool direct = kSame && len == HW;
        Acc* zb = direct ? reinterpret_cast<Acc*>(yb) : zbuf.data();
        at::Tensor zt = blob(zb, {Cout, len}, {len, 1});
        at::cpu::mm_out(zt, blob(wp, {Cout, Cin}, {Cin, 1}), xt);
        for (int64_t co = 0; co < Cout; ++co) {
          const Acc* zr = zb + co * len;
          T* yr = yb + co * HW;
          if constexpr (kStats) {
            block_moments_nchw_row<Acc>(zr, len, pmean + bi * Cp + co, pm2 + bi * Cp + co);
            if (!direct) convert_from_acc<T>(zr, yr, len);
          } else {
            const Vec a(sc[co]), b(sh[co]);
            int64_t i = 0;
            for (; i + kV <= len; i += kV)
              IO::store(yr + i, act_vec<kAct>(at::vec::fmadd(Vec::loadu(zr + i), a, b)));
            if (i < len)
              IO::store(yr + i, act_vec<kAct>(at::vec::fmadd(Vec::loadu(zr + i, len - i), a, b)),
                        len - i);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// oneDNN path (fp32 inference). Where oneDNN's 1x1 convolution beats block-wise sgemm, the BN is
// folded into the weights (W' = scale * W, one small pass over Cout x Cin) and the shift becomes
// the convolution's bias, so the GEMM, the BN and (with the in-place activation on the result,
// vectorized by ATen) the whole op take one oneDNN primitive plus one pass over y instead of
// eager's three passes. Measured on the 2-core EPYC dev host (fp32, batch 8, MobileNetV1-1.0
// shapes, bench/NOTES.md): oneDNN wins every channels_last layer and the NCHW layers with small
// planes (14x14, 7x7), where a per-image sgemm has a short N; block-wise sgemm wins the NCHW
// layers with large planes (28x28 and up), where oneDNN reorders the NCHW input.
bool use_onednn(const PwShape& s, at::ScalarType dtype) {
  if (dtype != at::kFloat || !at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn())
    return false;
  return s.nhwc || s.HW < kOnednnMaxNchwPlane;
}

// Small channels_last planes (HW <= kMmMaxNhwcPlane) and small inputs (N*HW*Cin <=
// kMmMaxNhwcInput): the 1x1 convolution as one at::mm over the (N*HW, Cin) matrix, returned as
// the channels_last (N, Cout, H, W) tensor. Measured on the 2-core Intel Xeon host against
// oneDNN's 1x1 convolution, MobileNetV1's shapes (bench/NOTES.md, sessions 17 and 18): at 14x14
// and 7x7 torch's multi-threaded GEMM is faster at batch 8 (by 5% and 20-25%); on the larger
// planes it is 5-25% faster on inputs up to ~400K elements (batch 1 and 2), even at ~800K and
// 5-14% slower from 1.6M (batch 4 and 8).
bool use_mm_nhwc(const PwShape& s) {
  return s.nhwc && (s.HW <= kMmMaxNhwcPlane || s.N * s.HW * s.Cin <= kMmMaxNhwcInput);
}

// With few rows (M < kMmSplitMaxRows) the output channels are split among the threads, each
// running its share as a single-threaded GEMM (inside at::parallel_for): the library's own
// multi-threaded GEMM splits such shapes poorly. Measured on the 2-core Xeon host (fp32, two
// threads, one GEMM against the split): 49x1024x1024 402 -> 346 us, 49x512x1024 196 -> 161 us
// (the pw_fwd op: 422-427 -> 388-391 us, 208-226 -> 179-183 us); at 196 and 392 rows even; a
// tiny GEMM (25x12x301) 8 -> 16 us, hence the work bound (bench/NOTES.md, session 18).
at::Tensor conv1x1_mm_nhwc(const at::Tensor& x, const at::Tensor& w, const PwShape& s) {
  const int64_t M = s.N * s.HW;
  at::Tensor y = at::empty({s.N, s.H, s.W, s.Cout}, x.options());
  at::Tensor y2 = y.view({M, s.Cout});
  const at::Tensor xm = x.permute({0, 2, 3, 1}).reshape({M, s.Cin});
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), s.Cout / kMmSplitMinCols);
  if (M >= kMmSplitMaxRows || parts < 2 || M * s.Cin * s.Cout < kMmSplitMinMacs ||
      at::in_parallel_region()) {
    at::mm_out(y2, xm, w.t());
    return y.permute({0, 3, 1, 2});
  }
  const int64_t per = ceil_div(s.Cout, parts);
  // The workers call the CPU kernel itself (at::cpu::mm_out), not the dispatcher: grad mode and
  // inference mode are thread-local, so through the dispatcher a worker saw neither the caller's
  // no_grad (mm_out refused a weight that requires grad) nor its inference_mode (writing into
  // an inference tensor outside inference mode is refused).
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t c0 = i * per, n = std::min(per, s.Cout - c0);
      if (n <= 0) continue;
      at::Tensor yi = y2.narrow(1, c0, n);  // row-major with leading dimension Cout
      at::cpu::mm_out(yi, xm, w.narrow(0, c0, n).t());
    }
  });
  return y.permute({0, 3, 1, 2});
}

at::Tensor pw_fwd_onednn(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                         const at::Tensor& shift, int64_t act, const PwShape& s) {
  at::NoGradGuard no_grad;
  if (use_mm_nhwc(s)) {
    // The GEMM on the weights as they are, then the BN and the activation in one pass over y
    // (folding the BN into the weights would cost a pass over the largest weights, 1024x1024).
    at::Tensor y = conv1x1_mm_nhwc(x, weight, s);
    dispatch_act(act, [&](auto A) {
      float* yp = y.mutable_data_ptr<float>();
      scale_shift_act_rows<float, decltype(A)::value>(yp, yp, scale, shift, s.N * s.HW, s.Cout);
    });
    return y;
  }
  const at::Tensor wf = at::mul(weight, scale.unsqueeze(1));
  at::Tensor y = at::conv2d(x, wf.view({s.Cout, s.Cin, 1, 1}), shift);
  if (act == kActRelu) {
    y.relu_();
  } else if (act == kActRelu6) {
    y.clamp_(0, 6);
  }
  const auto fmt = memory_format(s.nhwc);
  return y.is_contiguous(fmt) ? y : y.contiguous(fmt);
}

// Training forward on the same oneDNN path (fp32, where use_onednn): z = conv2d(x, W) (or
// conv1x1_mm_nhwc's at::mm on small channels_last planes), then the per-block moments over the
// fixed PwBlocks blocks of z (the same partials, merged in the same order, as the block-wise
// path). Measured on the 2-core dev host, channels_last, batch 8
// (bench/NOTES.md).
template <typename Acc>
at::Tensor pw_fwd_stats_onednn(const at::Tensor& x, const at::Tensor& weight, Acc* pmean, Acc* pm2,
                               const PwShape& s, const PwBlocks& B) {
  at::Tensor z;
  {
    at::NoGradGuard no_grad;
    z = use_mm_nhwc(s) ? conv1x1_mm_nhwc(x, weight, s)
                       : at::conv2d(x, weight.view({s.Cout, s.Cin, 1, 1}));
  }
  const auto fmt = memory_format(s.nhwc);
  if (!z.is_contiguous(fmt)) z = z.contiguous(fmt);
  const Acc* zp = z.const_data_ptr<Acc>();
  const int64_t Cout = s.Cout, HW = s.HW, Cp = round_up(Cout, VecIO<Acc>::kV);
  at::parallel_for(0, B.count, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      const auto blk = B.get(bi);
      if (B.nhwc) {
        block_moments_nhwc<Acc>(zp + blk.p0 * Cout, blk.len, Cout, pmean + bi * Cp, pm2 + bi * Cp);
      } else {
        const Acc* zb = zp + blk.n * Cout * HW + blk.p0;
        for (int64_t co = 0; co < Cout; ++co)
          block_moments_nchw_row<Acc>(zb + co * HW, blk.len, pmean + bi * Cp + co,
                                      pm2 + bi * Cp + co);
      }
    }
  });
  return z;
}

// ---------------------------------------------------------------------------------------------
// Glue

at::Tensor pw_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const at::Tensor& shift, int64_t act) {
  constexpr const char* op = "pw_fwd";
  const PwShape s = check_pw_input(op, x, weight);
  check_act(op, act);
  check_channel_vec(op, "scale", scale, s.Cout, x);
  check_channel_vec(op, "shift", shift, s.Cout, x);
  if (s.N > 0 && use_onednn(s, x.scalar_type()))
    return pw_fwd_onednn(x, weight, scale, shift, act, s);
  at::Tensor y = new_output({s.N, s.Cout, s.H, s.W}, x.options(), memory_format(s.nhwc));
  if (y.numel() == 0) return y;
  const PwBlocks B(s);
  DWSEP_CPU_DISPATCH(x.scalar_type(), "dwsep_pw_fwd_cpu", [&] {
    using Acc = typename AccOf<scalar_t>::type;
    const at::Tensor wa = acc_weight<scalar_t>(weight);
    dispatch_act(act, [&](auto A) {
      pw_forward<scalar_t, decltype(A)::value, false>(
          x.const_data_ptr<scalar_t>(), wa, scale.const_data_ptr<Acc>(),
          shift.const_data_ptr<Acc>(), y.mutable_data_ptr<scalar_t>(), nullptr, nullptr, s, B);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pw_fwd_stats_cpu(const at::Tensor& x,
                                                                const at::Tensor& weight) {
  constexpr const char* op = "pw_fwd_stats";
  const PwShape s = check_pw_input(op, x, weight);
  const auto vopts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor mean = new_output({s.Cout}, vopts);
  at::Tensor var = new_output({s.Cout}, vopts);
  const bool onednn = s.N * s.HW * s.Cout > 0 && use_onednn(s, x.scalar_type());
  // The oneDNN path returns its own z; allocate one here only for the block-wise path.
  at::Tensor z = onednn ? at::Tensor()
                        : new_output({s.N, s.Cout, s.H, s.W}, x.options(), memory_format(s.nhwc));
  if (!onednn && z.numel() == 0) {  // no samples: mean 0, var 0
    mean.zero_();
    var.zero_();
    return {z, mean, var};
  }
  const PwBlocks B(s);
  DWSEP_CPU_DISPATCH(x.scalar_type(), "dwsep_pw_fwd_stats_cpu", [&] {
    using Acc = typename AccOf<scalar_t>::type;
    const int64_t Cp = round_up(s.Cout, VecIO<scalar_t>::kV);
    std::vector<Acc> pmean(B.count * Cp), pm2(B.count * Cp);
    if (onednn) {  // fp32 only (use_onednn)
      z = pw_fwd_stats_onednn<Acc>(x, weight, pmean.data(), pm2.data(), s, B);
    } else {
      const at::Tensor wa = acc_weight<scalar_t>(weight);
      pw_forward<scalar_t, kActNone, true>(x.const_data_ptr<scalar_t>(), wa, nullptr, nullptr,
                                           z.mutable_data_ptr<scalar_t>(), pmean.data(), pm2.data(),
                                           s, B);
    }
    Acc* mp = mean.mutable_data_ptr<Acc>();
    Acc* vp = var.mutable_data_ptr<Acc>();
    at::parallel_for(0, s.Cout, 16, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        Moments m;
        for (int64_t b = 0; b < B.count; ++b)
          m.merge(static_cast<double>(B.get(b).len), pmean[b * Cp + c], pm2[b * Cp + c]);
        mp[c] = static_cast<Acc>(m.mean);
        vp[c] = static_cast<Acc>(m.var());
      }
    });
  });
  return {z, mean, var};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(dwsep, CPU, m) {
  m.impl("pw_fwd", &cpu::pw_fwd_cpu);
  m.impl("pw_fwd_stats", &cpu::pw_fwd_stats_cpu);
}

}  // namespace dwsep
