// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "common.h"

namespace dwsep {
namespace cpu {

// fp32 accumulation for fp32/fp16/bf16 storage, fp64 for fp64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename Acc>
inline Acc apply_act(Acc v, int64_t act) {
  if (act == kActRelu) return v > Acc(0) ? v : Acc(0);
  if (act == kActRelu6) return v < Acc(0) ? Acc(0) : (v > Acc(6) ? Acc(6) : v);
  return v;
}

// Gradient mask of the activation, judged from its input or output (same set). NaN passes.
template <typename Acc>
inline bool act_pass(Acc v, int64_t act) {
  if (act == kActRelu) return !(v <= Acc(0));
  if (act == kActRelu6) return !(v <= Acc(0) || v >= Acc(6));
  return true;
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "dwsep::", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
}

}  // namespace cpu
}  // namespace dwsep

#define DWSEP_CPU_DISPATCH(dtype, op, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, __VA_ARGS__)
