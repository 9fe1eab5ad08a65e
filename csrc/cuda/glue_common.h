// Host glue helpers for the CUDA ops (torch headers allowed; compiled by the host compiler).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"
#include "cuda/launch.h"

namespace dwsep {

inline cuda::DType cuda_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "dwsep::", op, ": unsupported dtype ", t,
                  " (expected float16, bfloat16, float32 or float64)");
  }
}

inline void check_cuda(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "dwsep::", op,
              ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

}  // namespace dwsep
