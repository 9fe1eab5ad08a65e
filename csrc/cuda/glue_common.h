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

// Layout the kernels index the tensors by, for tensors dense in the format `nhwc` (is_nhwc(),
// which answers NCHW for a tensor dense in both). With 1x1 images (HW == 1) every (N, C, 1, 1)
// tensor has the same bytes in both formats, so the kernels run as NHWC (the pointwise GEMM is
// then one GEMM with M = N instead of N one-column GEMMs, and the elementwise and reduction
// kernels vectorize along C); outputs are still allocated in the op's format `nhwc`. (The other
// tensors dense in both formats, C == 1, already run as NCHW, which vectorizes along HW.)
inline bool kernel_nhwc(bool nhwc, int64_t HW) {
  return nhwc || HW == 1;
}

}  // namespace dwsep
