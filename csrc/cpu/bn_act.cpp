// CPU kernel for dwsep::bn_act: y = act(z * scale[c] + shift[c]).
#include <torch/library.h>

#include "cpu/cpu_common.h"

namespace dwsep {
namespace cpu {
namespace {

template <typename T>
void bn_act_kernel(const T* z, T* y, const typename AccOf<T>::type* scale,
                   const typename AccOf<T>::type* shift, int64_t N, int64_t C, int64_t HW,
                   bool nhwc, int64_t act) {
  using Acc = typename AccOf<T>::type;
  if (nhwc) {
    at::parallel_for(0, N * HW, 256, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const T* zi = z + p * C;
        T* yo = y + p * C;
        for (int64_t c = 0; c < C; ++c) {
          yo[c] =
              static_cast<T>(apply_act<Acc>(static_cast<Acc>(zi[c]) * scale[c] + shift[c], act));
        }
      }
    });
  } else {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % C;
        const Acc s = scale[c], b = shift[c];
        const T* zi = z + plane * HW;
        T* yo = y + plane * HW;
        for (int64_t i = 0; i < HW; ++i) {
          yo[i] = static_cast<T>(apply_act<Acc>(static_cast<Acc>(zi[i]) * s + b, act));
        }
      }
    });
  }
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
  DWSEP_CPU_DISPATCH(z.scalar_type(), "dwsep_bn_act_cpu", [&] {
    using Acc = typename AccOf<scalar_t>::type;
    bn_act_kernel<scalar_t>(z.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                            scale.const_data_ptr<Acc>(), shift.const_data_ptr<Acc>(), z.size(0), C,
                            z.size(2) * z.size(3), nhwc, act);
  });
  return y;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(dwsep, CPU, m) {
  m.impl("bn_act", &cpu::bn_act_cpu);
}

}  // namespace dwsep
