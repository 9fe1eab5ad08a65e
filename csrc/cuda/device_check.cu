// Build coverage check: does dwsep._C hold a kernel image for a given GPU? Asked once per device
// by dwsep/backends.py before the 'cuda' backend is used there, so that a GPU the build was not
// compiled for gets a clear error naming the fix instead of a failed launch inside an op.
#include "cuda/launch.h"

namespace dwsep {
namespace cuda {
namespace {

__global__ void probe_kernel() {}

}  // namespace

cudaError_t kernel_image(int device, int* binary_version, int* ptx_version) {
  *binary_version = 0;
  *ptx_version = 0;
  int previous = 0;
  cudaError_t e = cudaGetDevice(&previous);
  if (e != cudaSuccess) return e;
  if (previous != device) {
    e = cudaSetDevice(device);
    if (e != cudaSuccess) return e;
  }
  cudaFuncAttributes attr{};
  e = cudaFuncGetAttributes(&attr, probe_kernel);
  if (e == cudaSuccess) {
    *binary_version = attr.binaryVersion;
    *ptx_version = attr.ptxVersion;
  } else {
    (void)cudaGetLastError();  // not a sticky error: clear it so later calls do not see it
  }
  if (previous != device) (void)cudaSetDevice(previous);
  return e;
}

}  // namespace cuda
}  // namespace dwsep
