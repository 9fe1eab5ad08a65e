// CUDA host glue for the depthwise ops: dwsep::dw_fwd, dw_stats, dw_bwd_reduce, dw_bwd.
// Checks what would crash a kernel, fills the params structs, allocates outputs (and the fp32 /
// fp64 reduction workspaces), launches on the current stream and checks the launch.
#include <torch/library.h>

#include "cuda/depthwise.h"
#include "cuda/glue_common.h"

namespace dwsep {
namespace {

// Checks x and weight and returns the geometry. x: 4-D CUDA, dense NCHW or channels_last;
// weight: contiguous (C, 1, 3, 3) with x's dtype and device.
cuda::DwShape dw_shape(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       int64_t stride) {
  check_float_dtype(op, "x", x);
  const bool nhwc = is_nhwc(op, "x", x);
  TORCH_CHECK(x.is_cuda(), "dwsep::", op, ": x must be a CUDA tensor, got ", x.device());
  check_same(op, "weight", weight, x, "x");
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "dwsep::", op, ": weight must be (C,1,3,3) with C=", C, ", got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "dwsep::", op, ": weight must be contiguous, got strides ",
              weight.strides());
  TORCH_CHECK(stride == 1 || stride == 2, "dwsep::", op, ": stride must be 1 or 2, got ", stride);
  cuda::DwShape s{};
  s.N = x.size(0);
  s.C = C;
  s.H = x.size(2);
  s.W = x.size(3);
  s.Ho = s.H > 0 ? (s.H - 1) / stride + 1 : 0;
  s.Wo = s.W > 0 ? (s.W - 1) / stride + 1 : 0;
  s.stride = static_cast<int>(stride);
  s.nhwc = nhwc;
  return s;
}

// grad_y / y: (N, C, Ho, Wo), x's dtype and device, dense in x's memory format. (A tensor
// that is dense in both formats has the same element offsets in both, so x's format decides.)
void check_out_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                    const cuda::DwShape& s) {
  check_same(op, name, t, x, "x");
  TORCH_CHECK(t.dim() == 4 && t.size(0) == s.N && t.size(1) == s.C && t.size(2) == s.Ho &&
                  t.size(3) == s.Wo,
              "dwsep::", op, ": ", name, " must have shape (", s.N, ", ", s.C, ", ", s.Ho, ", ",
              s.Wo, ") for x of shape ", x.sizes(), " and stride ", s.stride, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(memory_format(s.nhwc)), "dwsep::", op, ": ", name,
              " must be dense in x's memory format (", s.nhwc ? "channels_last" : "NCHW",
              "), got strides ", t.strides());
}

// Fp32 (fp64 for fp64 x) scratch for the per-block partials of a two-stage reduction.
at::Tensor workspace(const char* op, cuda::DwKernel kind, const cuda::DwShape& s,
                     const at::Tensor& x) {
  const int64_t n = cuda::dw_workspace_elems(kind, s, cuda_dtype(op, x.scalar_type()));
  return at::empty({n > 0 ? n : 1}, x.options().dtype(acc_type(x.scalar_type())));
}

at::Tensor dw_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& shift, int64_t stride, int64_t act) {
  constexpr const char* op = "dw_fwd";
  const cuda::DwShape s = dw_shape(op, x, weight, stride);
  check_act(op, act);
  check_channel_vec(op, "scale", scale, s.C, x);
  check_channel_vec(op, "shift", shift, s.C, x);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = new_output({s.N, s.C, s.Ho, s.Wo}, x.options(), memory_format(s.nhwc));
  if (y.numel() == 0) return y;
  cuda::DwFwdParams p{};
  p.s = s;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.scale = scale.data_ptr();
  p.shift = shift.data_ptr();
  p.y = y.data_ptr();
  p.act = static_cast<int>(act);
  check_cuda(op, cuda::dw_fwd(p, cuda_dtype(op, x.scalar_type()), current_stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> dw_stats_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 int64_t stride) {
  constexpr const char* op = "dw_stats";
  const cuda::DwShape s = dw_shape(op, x, weight, stride);
  c10::cuda::CUDAGuard guard(x.device());
  const auto vec_opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor mean = new_output({s.C}, vec_opts);
  at::Tensor var = new_output({s.C}, vec_opts);
  if (s.N * s.Ho * s.Wo == 0 || s.C == 0) {  // no values: mean = var = 0
    mean.zero_();
    var.zero_();
    return {mean, var};
  }
  at::Tensor ws = workspace(op, cuda::DwKernel::kStats, s, x);
  cuda::DwStatsParams p{};
  p.s = s;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.mean = mean.data_ptr();
  p.var = var.data_ptr();
  p.workspace = ws.data_ptr();
  check_cuda(op, cuda::dw_stats(p, cuda_dtype(op, x.scalar_type()), current_stream()));
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> dw_bwd_reduce_cuda(const at::Tensor& grad_y, const at::Tensor& y,
                                                      const at::Tensor& x, const at::Tensor& weight,
                                                      const at::Tensor& mean,
                                                      const at::Tensor& invstd, int64_t stride,
                                                      int64_t act) {
  constexpr const char* op = "dw_bwd_reduce";
  const cuda::DwShape s = dw_shape(op, x, weight, stride);
  check_act(op, act);
  check_out_like(op, "grad_y", grad_y, x, s);
  check_out_like(op, "y", y, x, s);
  check_channel_vec(op, "mean", mean, s.C, x);
  check_channel_vec(op, "invstd", invstd, s.C, x);
  c10::cuda::CUDAGuard guard(x.device());
  const auto vec_opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor sum_gz = new_output({s.C}, vec_opts);
  at::Tensor sum_gzx = new_output({s.C}, vec_opts);
  if (s.N * s.Ho * s.Wo == 0 || s.C == 0) {  // empty sums
    sum_gz.zero_();
    sum_gzx.zero_();
    return {sum_gz, sum_gzx};
  }
  at::Tensor ws = workspace(op, cuda::DwKernel::kBwdReduce, s, x);
  cuda::DwBwdReduceParams p{};
  p.s = s;
  p.grad_y = grad_y.data_ptr();
  p.y = y.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.mean = mean.data_ptr();
  p.invstd = invstd.data_ptr();
  p.sum_gz = sum_gz.data_ptr();
  p.sum_gz_xhat = sum_gzx.data_ptr();
  p.workspace = ws.data_ptr();
  p.act = static_cast<int>(act);
  check_cuda(op, cuda::dw_bwd_reduce(p, cuda_dtype(op, x.scalar_type()), current_stream()));
  return {sum_gz, sum_gzx};
}

std::tuple<at::Tensor, at::Tensor> dw_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& y,
                                               const at::Tensor& x, const at::Tensor& weight,
                                               const at::Tensor& k, const at::Tensor& b,
                                               const at::Tensor& c, int64_t stride, int64_t act,
                                               bool use_z) {
  constexpr const char* op = "dw_bwd";
  const cuda::DwShape s = dw_shape(op, x, weight, stride);
  check_act(op, act);
  check_out_like(op, "grad_y", grad_y, x, s);
  check_out_like(op, "y", y, x, s);
  check_channel_vec(op, "k", k, s.C, x);
  check_channel_vec(op, "b", b, s.C, x);
  check_channel_vec(op, "c", c, s.C, x);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = new_output(x.sizes(), x.options(), memory_format(s.nhwc));
  at::Tensor grad_w = new_output(weight.sizes(), weight.options());
  if (s.N * s.Ho * s.Wo == 0 || s.C == 0) {  // grad_x is empty; the weight gradient is 0
    grad_w.zero_();
    return {grad_x, grad_w};
  }
  at::Tensor ws = workspace(op, cuda::DwKernel::kBwd, s, x);
  cuda::DwBwdParams p{};
  p.s = s;
  p.grad_y = grad_y.data_ptr();
  p.y = y.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.k = k.data_ptr();
  p.b = b.data_ptr();
  p.c = c.data_ptr();
  p.grad_x = grad_x.data_ptr();
  p.grad_weight = grad_w.data_ptr();
  p.workspace = ws.data_ptr();
  p.act = static_cast<int>(act);
  p.use_z = use_z;
  check_cuda(op, cuda::dw_bwd(p, cuda_dtype(op, x.scalar_type()), current_stream()));
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(dwsep, CUDA, m) {
  m.impl("dw_fwd", &dw_fwd_cuda);
  m.impl("dw_stats", &dw_stats_cuda);
  m.impl("dw_bwd_reduce", &dw_bwd_reduce_cuda);
  m.impl("dw_bwd", &dw_bwd_cuda);
}

}  // namespace dwsep
