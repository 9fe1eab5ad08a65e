// Host-side helpers shared by the CPU and CUDA glue (torch headers allowed here, never in .cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace dwsep {

// Set by the `dwsep::_set_debug_poison` op; outputs are pre-filled with NaN when true.
bool debug_poison();

enum Act : int64_t { kActNone = 0, kActRelu = 1, kActRelu6 = 2 };

inline void check_act(const char* op, int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 2, "dwsep::", op,
              ": act must be 0 (none), 1 (relu) or 2 (relu6), got ", act);
}

// True when x is dense channels_last (and not also dense NCHW); false for dense NCHW.
// Anything else is rejected: the Python layer makes inputs dense in one of the two formats.
inline bool is_nhwc(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "dwsep::", op, ": ", name, " must be 4-D (N, C, H, W), got ", x.dim(),
              "-D");
  if (x.is_contiguous()) return false;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "dwsep::", op, ": ", name,
              " must be contiguous in NCHW or channels_last memory format, got strides ",
              x.strides());
  return true;
}

inline at::MemoryFormat memory_format(bool nhwc) {
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "dwsep::", op, ": ", name, " must be on ", ref.device(),
              " like ", ref_name, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "dwsep::", op, ": ", name, " must have dtype ",
              ref.scalar_type(), " like ", ref_name, ", got ", t.scalar_type());
}

// Per-channel fp32 (fp64 when x is fp64) vectors: scale, shift, mean, invstd, k, b, c.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_channel_vec(const char* op, const char* name, const at::Tensor& v, int64_t C,
                              const at::Tensor& x) {
  TORCH_CHECK(v.device() == x.device(), "dwsep::", op, ": ", name, " must be on ", x.device(),
              ", got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C && v.is_contiguous(), "dwsep::", op, ": ", name,
              " must be a contiguous 1-D tensor of length ", C, ", got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc_type(x.scalar_type()), "dwsep::", op, ": ", name,
              " must have dtype ", acc_type(x.scalar_type()), " for x of dtype ", x.scalar_type(),
              ", got ", v.scalar_type());
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "dwsep::", op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", t);
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                             at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  at::Tensor out = at::empty(sizes, opts.memory_format(fmt));
  if (debug_poison() && out.numel() > 0) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace dwsep
