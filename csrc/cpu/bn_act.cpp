// CPU kernel for dwsep::bn_act: y = act(z * scale[c] + shift[c]), vectorized (at::vec) with the
// activation a compile-time code; NaN propagates through every activation, as in F.relu /
// F.relu6 (act_vec).
#include <torch/library.h>

#include "cpu/depthwise_common.h"

namespace dwsep {
namespace cpu {
namespace {

// NCHW: one plane at a time, its channel's scale and shift broadcast over the plane.
template <typename T, int kAct>
void bn_act_nchw(const T* z, T* y, const at::Tensor& scale, const at::Tensor& shift, int64_t N,
                 int64_t C, int64_t HW) {
  using IO = VecIO<T>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  constexpr int64_t kV = IO::kV;
  const Acc* scp = scale.const_data_ptr<Acc>();
  const Acc* shp = shift.const_data_ptr<Acc>();
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % C;
      const Vec a(scp[c]), b(shp[c]);
      const T* zi = z + p * HW;
      T* yo = y + p * HW;
      int64_t i = 0;
      for (; i + kV <= HW; i += kV)
        IO::store(yo + i, act_vec<kAct>(at::vec::fmadd(IO::load(zi + i), a, b)));
      if (i < HW)
        IO::store(yo + i, act_vec<kAct>(at::vec::fmadd(IO::load(zi + i, HW - i), a, b)), HW - i);
    }
  });
}

at::Tensor bn_act_cpu(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                      int64_t act) {
  constexpr const char* op = "bn_act";
  check_float_dtype(op, "z", z);
  const bool nhwc = is_nhwc(op, "z", z);
  check_act(op, act);
  check_cpu(op, "z", z);
  const int64_t C = z.size(1);
  check_channel_vec(op, "scale", scale, C, z);
  check_channel_vec(op, "shift", shift, C, z);
  at::Tensor y = new_output(z.sizes(), z.options(), memory_format(nhwc));
  if (z.numel() == 0) return y;
  const int64_t N = z.size(0), HW = z.size(2) * z.size(3);
  DWSEP_CPU_DISPATCH(z.scalar_type(), "dwsep_bn_act_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    dispatch_act(act, [&](auto A) {
      constexpr int kAct = decltype(A)::value;
      if (nhwc) {
        scale_shift_act_rows<scalar_t, kAct>(zp, yp, scale, shift, N * HW, C);
      } else {
        bn_act_nchw<scalar_t, kAct>(zp, yp, scale, shift, N, C, HW);
      }
    });
  });
  return y;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(dwsep, CPU, m) {
  m.impl("bn_act", &cpu::bn_act_cpu);
}

}  // namespace dwsep
