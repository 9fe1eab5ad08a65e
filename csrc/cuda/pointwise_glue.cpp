// CUDA host glue for the pointwise ops: dwsep::pw_fwd, pw_fwd_stats, pw_bwd_reduce, pw_bwd.
// Checks, output and workspace allocation (caching allocator), params filling, launch on the
// current stream. Kernels: pointwise_fwd.cu (GEMM engine, forward) and pointwise_bwd.cu.
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/glue_common.h"
#include "cuda/pointwise.h"

namespace dwsep {
namespace {

// fp32 inputs use TF32 tensor cores when PyTorch allows TF32 for convolutions (the same switch
// as cuDNN: torch.backends.cudnn.allow_tf32 / torch.backends.cudnn.conv.fp32_precision).
bool allow_tf32() {
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
}

// x (N, Cin, H, W) and weight (Cout, Cin): the shape of the problem.
cuda::PwShape check_x_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_float_dtype(op, "x", x);
  TORCH_CHECK(x.is_cuda(), "dwsep::", op, ": x must be a CUDA tensor, got ", x.device());
  const bool nhwc = is_nhwc(op, "x", x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "dwsep::", op,
              ": weight must be (Cout, Cin) with Cin=", x.size(1), ", got ", weight.sizes());
  check_same(op, "weight", weight, x, "x");
  TORCH_CHECK(weight.is_contiguous(), "dwsep::", op, ": weight must be contiguous, got strides ",
              weight.strides());
  return {x.size(0), x.size(1), weight.size(0), x.size(2) * x.size(3), nhwc};
}

// A (N, C, H, W) tensor that must match `ref` in sizes, dtype and device, and be dense in the
// memory format the kernels index `ref` by (checked on the strides, so that tensors whose two
// formats coincide, e.g. one channel, are accepted either way).
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                const char* ref_name, at::IntArrayRef sizes, bool nhwc) {
  check_same(op, name, t, ref, ref_name);
  TORCH_CHECK(t.sizes() == sizes, "dwsep::", op, ": ", name, " must have shape ", sizes, ", got ",
              t.sizes());
  TORCH_CHECK(nhwc ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous(),
              "dwsep::", op, ": ", name, " must be dense ",
              (nhwc ? "channels_last" : "contiguous NCHW"), " like ", ref_name, ", got strides ",
              t.strides());
}

// The shape handed to the kernels: s with the layout they index by (kernel_nhwc).
cuda::PwShape kernel_shape(cuda::PwShape s) {
  s.nhwc = kernel_nhwc(s.nhwc, s.HW);
  return s;
}

at::Tensor workspace(int64_t bytes, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(bytes, 16)}, like.options().dtype(at::kByte));
}

at::Tensor pw_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& shift, int64_t act) {
  constexpr const char* op = "pw_fwd";
  const cuda::PwShape s = check_x_weight(op, x, weight);
  check_act(op, act);
  check_channel_vec(op, "scale", scale, s.Cout, x);
  check_channel_vec(op, "shift", shift, s.Cout, x);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y =
      new_output({s.N, s.Cout, x.size(2), x.size(3)}, x.options(), memory_format(s.nhwc));
  if (y.numel() == 0) return y;
  cuda::PwFwdParams p{x.data_ptr(), weight.data_ptr(), scale.data_ptr(),      shift.data_ptr(),
                      y.data_ptr(), kernel_shape(s),   static_cast<int>(act), allow_tf32()};
  check_cuda(op, cuda::pw_fwd(p, cuda_dtype(op, x.scalar_type()), current_stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pw_fwd_stats_cuda(const at::Tensor& x,
                                                                 const at::Tensor& weight) {
  constexpr const char* op = "pw_fwd_stats";
  const cuda::PwShape s = check_x_weight(op, x, weight);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor z =
      new_output({s.N, s.Cout, x.size(2), x.size(3)}, x.options(), memory_format(s.nhwc));
  const auto vec_opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor mean = new_output({s.Cout}, vec_opts);
  at::Tensor var = new_output({s.Cout}, vec_opts);
  if (s.Cout == 0) return {z, mean, var};
  if (s.N * s.HW == 0) {  // no samples: mean 0, var 0 by convention
    mean.zero_();
    var.zero_();
    return {z, mean, var};
  }
  const cuda::DType dtype = cuda_dtype(op, x.scalar_type());
  cuda::PwFwdStatsParams p{x.data_ptr(),   weight.data_ptr(), z.data_ptr(), mean.data_ptr(),
                           var.data_ptr(), kernel_shape(s),   allow_tf32(), nullptr};
  at::Tensor ws = workspace(cuda::pw_fwd_stats_workspace_bytes(p, dtype), x);
  p.workspace = ws.data_ptr();
  check_cuda(op, cuda::pw_fwd_stats(p, dtype, current_stream()));
  return {z, mean, var};
}

std::tuple<at::Tensor, at::Tensor> pw_bwd_reduce_cuda(const at::Tensor& grad_y, const at::Tensor& z,
                                                      const at::Tensor& scale,
                                                      const at::Tensor& shift,
                                                      const at::Tensor& mean,
                                                      const at::Tensor& invstd, int64_t act) {
  constexpr const char* op = "pw_bwd_reduce";
  check_float_dtype(op, "z", z);
  TORCH_CHECK(z.is_cuda(), "dwsep::", op, ": z must be a CUDA tensor, got ", z.device());
  const bool nhwc = is_nhwc(op, "z", z);
  check_like(op, "grad_y", grad_y, z, "z", z.sizes(), nhwc);
  check_act(op, act);
  const int64_t C = z.size(1);
  check_channel_vec(op, "scale", scale, C, z);
  check_channel_vec(op, "shift", shift, C, z);
  check_channel_vec(op, "mean", mean, C, z);
  check_channel_vec(op, "invstd", invstd, C, z);
  c10::cuda::CUDAGuard guard(z.device());
  const auto vec_opts = z.options().dtype(acc_type(z.scalar_type()));
  at::Tensor sum_gz = new_output({C}, vec_opts);
  at::Tensor sum_gz_xhat = new_output({C}, vec_opts);
  if (C == 0) return {sum_gz, sum_gz_xhat};
  if (z.numel() == 0) {
    sum_gz.zero_();
    sum_gz_xhat.zero_();
    return {sum_gz, sum_gz_xhat};
  }
  const cuda::DType dtype = cuda_dtype(op, z.scalar_type());
  cuda::PwBwdReduceParams p{grad_y.data_ptr(),
                            z.data_ptr(),
                            scale.data_ptr(),
                            shift.data_ptr(),
                            mean.data_ptr(),
                            invstd.data_ptr(),
                            sum_gz.data_ptr(),
                            sum_gz_xhat.data_ptr(),
                            z.size(0),
                            C,
                            z.size(2) * z.size(3),
                            kernel_nhwc(nhwc, z.size(2) * z.size(3)),
                            static_cast<int>(act),
                            nullptr};
  at::Tensor ws = workspace(cuda::pw_bwd_reduce_workspace_bytes(p, dtype), z);
  p.workspace = ws.data_ptr();
  check_cuda(op, cuda::pw_bwd_reduce(p, dtype, current_stream()));
  return {sum_gz, sum_gz_xhat};
}

std::tuple<at::Tensor, at::Tensor> pw_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& z,
                                               const at::Tensor& x, const at::Tensor& weight,
                                               const at::Tensor& scale, const at::Tensor& shift,
                                               const at::Tensor& k, const at::Tensor& b,
                                               const at::Tensor& c, int64_t act) {
  constexpr const char* op = "pw_bwd";
  cuda::PwShape s = check_x_weight(op, x, weight);
  const bool x_nhwc = s.nhwc;
  // Layout shared by z/grad_y (Cout channels) and x (Cin channels), decided as the CPU op does
  // (cpu/pointwise_bwd.cpp, pw_bwd_layout): channels_last if z or x is strictly channels_last;
  // every tensor must then be dense in it (one channel or 1x1 images: dense in both).
  s.nhwc = is_nhwc(op, "z", z) || x_nhwc;
  const std::vector<int64_t> zsizes{s.N, s.Cout, x.size(2), x.size(3)};
  check_like(op, "z", z, x, "x", zsizes, s.nhwc);
  check_like(op, "grad_y", grad_y, x, "x", zsizes, s.nhwc);
  TORCH_CHECK(x.is_contiguous(memory_format(s.nhwc)), "dwsep::", op,
              ": x must be contiguous in the layout of z (", s.nhwc ? "channels_last" : "NCHW",
              "), got strides ", x.strides());
  check_act(op, act);
  check_channel_vec(op, "scale", scale, s.Cout, x);
  check_channel_vec(op, "shift", shift, s.Cout, x);
  check_channel_vec(op, "k", k, s.Cout, x);
  check_channel_vec(op, "b", b, s.Cout, x);
  check_channel_vec(op, "c", c, s.Cout, x);
  c10::cuda::CUDAGuard guard(x.device());
  // grad_x follows x's own format (as the CPU op and the fake impl do); for an x dense in both
  // formats the two coincide in memory.
  at::Tensor grad_x = new_output(x.sizes(), x.options(), memory_format(x_nhwc));
  at::Tensor grad_w = new_output(weight.sizes(), weight.options());
  if (s.N * s.HW == 0 || s.Cout == 0 || s.Cin == 0) {
    // Empty sums: grad_w (if any) is 0 without samples, grad_x (if any) is 0 without outputs.
    if (grad_w.numel() > 0) grad_w.zero_();
    if (grad_x.numel() > 0) grad_x.zero_();
    return {grad_x, grad_w};
  }
  const cuda::DType dtype = cuda_dtype(op, x.scalar_type());
  at::Tensor g_conv = at::empty({s.N * s.Cout * s.HW}, x.options());
  cuda::PwBwdParams p{
      grad_y.data_ptr(),     z.data_ptr(),      x.data_ptr(),      weight.data_ptr(),
      scale.data_ptr(),      shift.data_ptr(),  k.data_ptr(),      b.data_ptr(),
      c.data_ptr(),          grad_x.data_ptr(), grad_w.data_ptr(), kernel_shape(s),
      static_cast<int>(act), allow_tf32(),      g_conv.data_ptr(), nullptr};
  at::Tensor ws = workspace(cuda::pw_bwd_workspace_bytes(p, dtype), x);
  p.workspace = ws.data_ptr();
  check_cuda(op, cuda::pw_bwd(p, dtype, current_stream()));
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(dwsep, CUDA, m) {
  m.impl("pw_fwd", &pw_fwd_cuda);
  m.impl("pw_fwd_stats", &pw_fwd_stats_cuda);
  m.impl("pw_bwd_reduce", &pw_bwd_reduce_cuda);
  m.impl("pw_bwd", &pw_bwd_cuda);
}

}  // namespace dwsep
