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

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "dwsep::", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
}

}  // namespace cpu
}  // namespace dwsep

#define DWSEP_CPU_DISPATCH(dtype, op, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, __VA_ARGS__)
