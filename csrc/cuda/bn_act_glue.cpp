// CUDA host glue for dwsep::bn_act.
#include <torch/library.h>

#include "cuda/glue_common.h"

namespace dwsep {
namespace {

at::Tensor bn_act_cuda(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                       int64_t act) {
  constexpr const char* op = "bn_act";
  check_float_dtype(op, "z", z);
  const bool nhwc = is_nhwc(op, "z", z);
  check_act(op, act);
  TORCH_CHECK(z.is_cuda(), "dwsep::bn_act: z must be a CUDA tensor, got ", z.device());
  const int64_t C = z.size(1);
  check_channel_vec(op, "scale", scale, C, z);
  check_channel_vec(op, "shift", shift, C, z);
  c10::cuda::CUDAGuard guard(z.device());
  at::Tensor y = new_output(z.sizes(), z.options(), memory_format(nhwc));
  if (z.numel() == 0) return y;
  const int64_t HW = z.size(2) * z.size(3);
  cuda::BnActParams p{
      z.data_ptr(), y.data_ptr(),          scale.data_ptr(),     shift.data_ptr(), z.size(0), C,
      HW,           kernel_nhwc(nhwc, HW), static_cast<int>(act)};
  check_cuda(op, cuda::bn_act(p, cuda_dtype(op, z.scalar_type()), current_stream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(dwsep, CUDA, m) {
  m.impl("bn_act", &bn_act_cuda);
}

}  // namespace dwsep
