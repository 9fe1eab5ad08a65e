// Operator schemas for the dwsep library and the Python module that loads them.
//
// Every op is defined once here; kernels attach per device with TORCH_LIBRARY_IMPL in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*_glue.cpp (CUDA). Fake (meta) implementations and
// autograd live in Python (dwsep/ops.py). Kernels allocate their outputs with the caching
// allocator and write every element; see debug_poison() for the test hook that proves it.

#include <Python.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#ifdef DWSEP_WITH_CUDA
#include "cuda/launch.h"
#endif

namespace dwsep {

namespace {
bool g_debug_poison = false;
void set_debug_poison(bool enable) {
  g_debug_poison = enable;
}
}  // namespace

// (error, SASS version, PTX version) of this build's kernel image for CUDA device `device`
// (cuda::kernel_image); error is the CUDA error's name and message, empty when an image runs
// there, and says so when the extension was built without CUDA.
std::tuple<std::vector<int64_t>, std::string> cuda_kernel_image(int64_t device) {
#ifdef DWSEP_WITH_CUDA
  int binary = 0, ptx = 0;
  const cudaError_t e = cuda::kernel_image(static_cast<int>(device), &binary, &ptx);
  std::string error;
  if (e != cudaSuccess) error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  return {{binary, ptx}, error};
#else
  (void)device;
  return {{0, 0}, "dwsep._C was built without CUDA kernels"};
#endif
}

bool debug_poison() {
  return g_debug_poison;
}

TORCH_LIBRARY(dwsep, m) {
  // Depthwise 3x3 (padding 1) conv, BN folded into per-channel (scale, shift), activation.
  // act: 0 = none, 1 = relu, 2 = relu6. scale/shift/stat tensors are fp32 (fp64 for fp64 x).
  m.def(
      "dw_fwd(Tensor x, Tensor weight, Tensor scale, Tensor shift, int stride, int act) -> Tensor");
  // Per-channel batch mean and biased variance of conv(x) over (N, Ho, Wo).
  m.def("dw_stats(Tensor x, Tensor weight, int stride) -> (Tensor mean, Tensor var)");
  // The same statistics plus z = conv(x) itself, in x's dtype and layout (CPU only: the CPU
  // training forward runs the conv once, then bn_act; the GPU backends read x twice instead).
  m.def("dw_fwd_stats(Tensor x, Tensor weight, int stride) -> (Tensor z, Tensor mean, Tensor var)");
  // Per-channel sum(g_z) and sum(g_z * xhat), with g_z = grad_y * act'(y) and
  // xhat = (conv(x) - mean) * invstd (conv recomputed, not stored).
  m.def(
      "dw_bwd_reduce(Tensor grad_y, Tensor y, Tensor x, Tensor weight, Tensor mean, "
      "Tensor invstd, int stride, int act) -> (Tensor sum_gz, Tensor sum_gz_xhat)");
  // Input and weight gradients of the conv, given g_conv = k*g_z + (use_z ? b*conv(x) + c : 0).
  m.def(
      "dw_bwd(Tensor grad_y, Tensor y, Tensor x, Tensor weight, Tensor k, Tensor b, Tensor c, "
      "int stride, int act, bool use_z) -> (Tensor grad_x, Tensor grad_weight)");

  // Pointwise 1x1 conv as a GEMM (weight is (Cout, Cin)), fused BN (scale, shift) + activation.
  m.def("pw_fwd(Tensor x, Tensor weight, Tensor scale, Tensor shift, int act) -> Tensor");
  // Training forward: z = conv1x1(x) in x's dtype, plus per-channel mean and biased variance of
  // z computed from the fp32 accumulators.
  m.def("pw_fwd_stats(Tensor x, Tensor weight) -> (Tensor z, Tensor mean, Tensor var)");
  // y = act(z * scale + shift), per channel.
  m.def("bn_act(Tensor z, Tensor scale, Tensor shift, int act) -> Tensor");
  // Per-channel sum(g_z) and sum(g_z * xhat), with g_z = grad_y * act'(z*scale + shift) and
  // xhat = (z - mean) * invstd.
  m.def(
      "pw_bwd_reduce(Tensor grad_y, Tensor z, Tensor scale, Tensor shift, Tensor mean, "
      "Tensor invstd, int act) -> (Tensor sum_gz, Tensor sum_gz_xhat)");
  // grad_x = g_conv @ weight, grad_weight = g_conv^T @ x, g_conv = k*g_z + b*z + c.
  m.def(
      "pw_bwd(Tensor grad_y, Tensor z, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
      "Tensor k, Tensor b, Tensor c, int act) -> (Tensor grad_x, Tensor grad_weight)");

  // Test hook: when enabled, every op fills its outputs with NaN (or a sentinel) before the
  // kernel runs, so tests can prove that each output element is written.
  m.def("_set_debug_poison(bool enable) -> ()", &set_debug_poison);
  // Build coverage of a CUDA device: ([sass_version, ptx_version], error); see cuda_kernel_image.
  m.def("_cuda_kernel_image(int device) -> (int[] versions, str error)", &cuda_kernel_image);
}

}  // namespace dwsep

extern "C" {
// `import dwsep._C` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef DWSEP_WITH_CUDA
  PyModule_AddIntConstant(mod, "cuda_compiled", 1);
#else
  PyModule_AddIntConstant(mod, "cuda_compiled", 0);
#endif
  return mod;
}
}
