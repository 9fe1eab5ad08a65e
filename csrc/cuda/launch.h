// Types shared by the CUDA launchers (.cu) and their host glue (.cpp). No torch, no CUDA
// device code: this header is included from both sides.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dwsep {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// y = act(z * scale[c] + shift[c]); z, y dense NCHW or NHWC of (N, C, H, W).
struct BnActParams {
  const void* z;
  void* y;
  const void* scale;  // acc dtype (fp32, or fp64 for fp64 tensors)
  const void* shift;
  int64_t N, C, HW;
  bool nhwc;
  int act;
};

cudaError_t bn_act(const BnActParams& p, DType dtype, cudaStream_t stream);

// Whether this build holds a kernel image that can run on `device` (SASS for its architecture,
// or PTX the driver can JIT-compile for it): cudaSuccess and the image's SASS and PTX versions
// (10 * major + minor; 0 when absent), or the error (cudaErrorNoKernelImageForDevice when the
// build does not cover this GPU). Every .cu file is built for the same architectures, so one
// probe kernel answers for all kernels. The current device is left as it was.
cudaError_t kernel_image(int device, int* binary_version, int* ptx_version);

}  // namespace cuda
}  // namespace dwsep
