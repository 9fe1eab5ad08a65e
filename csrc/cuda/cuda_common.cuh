// Device-side helpers shared by the dwsep CUDA kernels (the conversions and the activation are
// also host-callable, for the host runs of tests/cuda_host). Plain CUDA: no torch headers, so nvcc
// stays fast. Host glue (csrc/cuda/*_glue.cpp) converts tensors into the params structs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/launch.h"

namespace dwsep {
namespace cuda {

// fp32 accumulation for every storage type but fp64, which accumulates in fp64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename Acc, typename T>
__host__ __device__ __forceinline__ Acc to_acc(T v) {
  return static_cast<Acc>(v);
}
template <>
__host__ __device__ __forceinline__ float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__host__ __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename Acc>
__host__ __device__ __forceinline__ T from_acc(Acc v) {
  return static_cast<T>(v);
}
template <>
__host__ __device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// 16 bytes of T values (16 / sizeof(T) of them), converted from Acc and packed into four 32-bit
// words, so that a store of the result is one 16-byte instruction. A struct of T[16 / sizeof(T)]
// copied to memory is not: nvcc splits such a copy per element when the struct is filled element
// by element (seen in the pointwise GEMM epilogue: eight 2-byte stores per 16 bytes of bf16).
template <typename T, typename Acc>
__host__ __device__ __forceinline__ uint4 pack16(const Acc* v) {
  uint32_t w[4];
  if constexpr (sizeof(T) == 2) {
    auto bits = [](T x) -> uint32_t {
      if constexpr (std::is_same_v<T, __half>)
        return __half_as_ushort(x);
      else
        return __bfloat16_as_ushort(x);
    };
#pragma unroll
    for (int q = 0; q < 4; ++q)
      w[q] = bits(from_acc<T>(v[2 * q])) | (bits(from_acc<T>(v[2 * q + 1])) << 16);
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float f = from_acc<float>(v[q]);
      uint32_t u;
      memcpy(&u, &f, 4);
      w[q] = u;
    }
  } else {
    static_assert(sizeof(T) == 8, "pack16 packs 2-, 4- or 8-byte values");
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const double d = from_acc<double>(v[q]);
      uint64_t u;
      memcpy(&u, &d, 8);
      w[2 * q] = static_cast<uint32_t>(u);
      w[2 * q + 1] = static_cast<uint32_t>(u >> 32);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

#ifdef __CUDACC__
// One 16-byte store to global memory (dst 16-byte aligned). Inline PTX because a plain store of
// a uint4 is not always one instruction: in the pointwise GEMM epilogue nvcc 13 emitted four
// 4-byte stores for `*reinterpret_cast<uint4*>(dst) = v` (alignment not carried through), which
// the same statement in a small kernel did not.
__device__ __forceinline__ void st_global16(void* dst, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}
#endif

// Whether a pointer allows 16-byte vector accesses.
inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// act: 0 = none, 1 = relu, 2 = relu6. NaN propagates (as F.relu / F.relu6): every
// comparison with NaN is false, so both select v.
template <int ACT, typename Acc>
__host__ __device__ __forceinline__ Acc apply_act(Acc v) {
  if (ACT == 1) return v < Acc(0) ? Acc(0) : v;
  if (ACT == 2) return v < Acc(0) ? Acc(0) : (v > Acc(6) ? Acc(6) : v);
  return v;
}

// Whether the activation passes the gradient, judged from its input or output value
// (identical sets for these activations: relu y > 0, relu6 0 < y < 6). NaN propagates.
template <int ACT, typename Acc>
__host__ __device__ __forceinline__ bool act_pass(Acc v) {
  if (ACT == 1) return !(v <= Acc(0));
  if (ACT == 2) return !(v <= Acc(0) || v >= Acc(6));
  return true;
}

// The same with a run-time act code.
template <typename Acc>
__host__ __device__ __forceinline__ bool act_pass_rt(int act, Acc yv) {
  return act == 1 ? act_pass<1>(yv) : (act == 2 ? act_pass<2>(yv) : true);
}

}  // namespace cuda
}  // namespace dwsep

// Turn a runtime dtype into a storage type T (exactly one switch per launcher).
#define DWSEP_DISPATCH_DTYPE(dtype, T, ...) \
  switch (dtype) {                          \
    case ::dwsep::cuda::DType::kFloat32: {  \
      using T = float;                      \
      __VA_ARGS__;                          \
    } break;                                \
    case ::dwsep::cuda::DType::kFloat64: {  \
      using T = double;                     \
      __VA_ARGS__;                          \
    } break;                                \
    case ::dwsep::cuda::DType::kFloat16: {  \
      using T = __half;                     \
      __VA_ARGS__;                          \
    } break;                                \
    case ::dwsep::cuda::DType::kBFloat16: { \
      using T = __nv_bfloat16;              \
      __VA_ARGS__;                          \
    } break;                                \
    default:                                \
      return cudaErrorInvalidValue;         \
  }

#define DWSEP_DISPATCH_ACT(act, ACT, ...) \
  switch (act) {                          \
    case 0: {                             \
      constexpr int ACT = 0;              \
      __VA_ARGS__;                        \
    } break;                              \
    case 1: {                             \
      constexpr int ACT = 1;              \
      __VA_ARGS__;                        \
    } break;                              \
    case 2: {                             \
      constexpr int ACT = 2;              \
      __VA_ARGS__;                        \
    } break;                              \
    default:                              \
      return cudaErrorInvalidValue;       \
  }
