// Pointwise (1x1) conv backward.
//
// pw_bwd_reduce: per-channel sum(g_z) and sum(g_z * xhat), g_z = grad_y * act'(z*scale + shift),
//   xhat = (z - mean) * invstd. Two deterministic stages: per-block partial sums over a fixed
//   range of rows (NHWC) or images (NCHW) into a workspace, then a fixed-order sum per channel.
// pw_bwd: g_conv = k*g_z + b*z + c is formed once by an elementwise kernel into a temporary
//   buffer in x's dtype (the glue allocates it), then read by both GEMMs of the engine in
//   pointwise_fwd.cu (pw_gemm):
//     grad_x = g_conv . W          (NHWC: [pix, Cout] x [Cout, Cin]; NCHW: W^T x g_conv[n])
//     grad_w = g_conv^T . x        (split-K over pixels (and images), fp32/fp64 partials)
//   and the split-K partials are summed in a fixed order by a last kernel (no atomics).

#include <algorithm>
#include <type_traits>

#include "cuda/cuda_common.cuh"
#include "cuda/pointwise.h"

namespace dwsep {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// act'(u) != 0 with a run-time act code (these kernels are memory-bound; one uniform branch).
template <typename Acc>
__device__ __forceinline__ bool pass(int act, Acc u) {
  return act == 1 ? act_pass<1>(u) : (act == 2 ? act_pass<2>(u) : true);
}

int64_t cdiv(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
unsigned grid_1d(int64_t n_items) {
  const int64_t blocks = cdiv(n_items, kThreads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65536 * 8)));
}

// ---------------------------------------------------------------------------------------------
// g_conv = k[c]*g_z + b[c]*z + c[c], g_z = act'(z*scale + shift) ? grad_y : 0. VEC consecutive
// elements per thread share one channel run (NHWC: C % VEC == 0; NCHW: HW % VEC == 0).

template <typename T, int VEC, bool NHWC>
__global__ void __launch_bounds__(kThreads)
    gconv_kernel(const T* __restrict__ grad_y, const T* __restrict__ z,
                 const typename AccOf<T>::type* __restrict__ scale,
                 const typename AccOf<T>::type* __restrict__ shift,
                 const typename AccOf<T>::type* __restrict__ kc,
                 const typename AccOf<T>::type* __restrict__ bc,
                 const typename AccOf<T>::type* __restrict__ cc, T* __restrict__ out, int64_t n_vec,
                 int64_t C, int64_t HW, int act) {
  using Acc = typename AccOf<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec;
       i += stride) {
    const int64_t e = i * VEC;
    const Vec<T, VEC> gy = reinterpret_cast<const Vec<T, VEC>*>(grad_y)[i];
    const Vec<T, VEC> zv = reinterpret_cast<const Vec<T, VEC>*>(z)[i];
    Vec<T, VEC> o;
    const int64_t c0 = NHWC ? e % C : (e / HW) % C;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = NHWC ? c0 + j : c0;
      const Acc zz = to_acc<Acc>(zv.v[j]);
      const Acc gz = pass(act, zz * scale[c] + shift[c]) ? to_acc<Acc>(gy.v[j]) : Acc(0);
      o.v[j] = from_acc<T>(kc[c] * gz + bc[c] * zz + cc[c]);
    }
    reinterpret_cast<Vec<T, VEC>*>(out)[i] = o;
  }
}

// ---------------------------------------------------------------------------------------------
// pw_bwd_reduce, stage 1.

// NHWC: rows of C channels. Thread (tx, ty) owns channel vector tx of the block's channel range
// and rows r0+ty, r0+ty+TY, ...; the TY row-lanes are summed in order through shared memory.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduce_nhwc_kernel(const T* __restrict__ grad_y, const T* __restrict__ z,
                       const typename AccOf<T>::type* __restrict__ scale,
                       const typename AccOf<T>::type* __restrict__ shift,
                       const typename AccOf<T>::type* __restrict__ mean,
                       const typename AccOf<T>::type* __restrict__ invstd,
                       typename AccOf<T>::type* __restrict__ ws1,
                       typename AccOf<T>::type* __restrict__ ws2, int64_t M, int64_t C,
                       int64_t rows_per_block, int tx_count, int act) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc sh1[kThreads * VEC];
  __shared__ Acc sh2[kThreads * VEC];
  const int tx = threadIdx.x % tx_count, ty = threadIdx.x / tx_count;
  const int ty_count = kThreads / tx_count;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * tx_count + tx;
  const int64_t c0 = cv * VEC;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = min(M, r0 + rows_per_block);
  Acc s1[VEC], s2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s1[j] = s2[j] = Acc(0);
  if (c0 < C) {
    Acc sc[VEC], sh[VEC], mu[VEC], is[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sc[j] = scale[c0 + j];
      sh[j] = shift[c0 + j];
      mu[j] = mean[c0 + j];
      is[j] = invstd[c0 + j];
    }
    for (int64_t r = r0 + ty; r < r1; r += ty_count) {
      const int64_t off = r * C + c0;
      const Vec<T, VEC> gy = *reinterpret_cast<const Vec<T, VEC>*>(grad_y + off);
      const Vec<T, VEC> zv = *reinterpret_cast<const Vec<T, VEC>*>(z + off);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const Acc zz = to_acc<Acc>(zv.v[j]);
        const Acc gz = pass(act, zz * sc[j] + sh[j]) ? to_acc<Acc>(gy.v[j]) : Acc(0);
        s1[j] += gz;
        s2[j] += gz * ((zz - mu[j]) * is[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sh1[threadIdx.x * VEC + j] = s1[j];
    sh2[threadIdx.x * VEC + j] = s2[j];
  }
  __syncthreads();
  if (ty != 0 || c0 >= C) return;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    Acc a1 = 0, a2 = 0;
    for (int y = 0; y < ty_count; ++y) {
      a1 += sh1[(y * tx_count + tx) * VEC + j];
      a2 += sh2[(y * tx_count + tx) * VEC + j];
    }
    ws1[blockIdx.y * C + c0 + j] = a1;
    ws2[blockIdx.y * C + c0 + j] = a2;
  }
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// NCHW: block (c, g) sums the planes (n, c) of images [g*npb, (g+1)*npb), then a fixed tree.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(const T* __restrict__ grad_y, const T* __restrict__ z,
                       const typename AccOf<T>::type* __restrict__ scale,
                       const typename AccOf<T>::type* __restrict__ shift,
                       const typename AccOf<T>::type* __restrict__ mean,
                       const typename AccOf<T>::type* __restrict__ invstd,
                       typename AccOf<T>::type* __restrict__ ws1,
                       typename AccOf<T>::type* __restrict__ ws2, int64_t N, int64_t C, int64_t HW,
                       int64_t imgs_per_block, int act) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc sh1[kThreads / 32], sh2[kThreads / 32];
  const int64_t c = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * imgs_per_block;
  const int64_t n1 = min(N, n0 + imgs_per_block);
  const Acc sc = scale[c], sh = shift[c], mu = mean[c], is = invstd[c];
  const int64_t hv = HW / VEC;
  Acc s1 = 0, s2 = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = (n * C + c) * HW;
    const Vec<T, VEC>* gyp = reinterpret_cast<const Vec<T, VEC>*>(grad_y + base);
    const Vec<T, VEC>* zp = reinterpret_cast<const Vec<T, VEC>*>(z + base);
    for (int64_t i = threadIdx.x; i < hv; i += kThreads) {
      const Vec<T, VEC> gy = gyp[i];
      const Vec<T, VEC> zv = zp[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const Acc zz = to_acc<Acc>(zv.v[j]);
        const Acc gz = pass(act, zz * sc + sh) ? to_acc<Acc>(gy.v[j]) : Acc(0);
        s1 += gz;
        s2 += gz * ((zz - mu) * is);
      }
    }
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sh1[warp] = s1;
    sh2[warp] = s2;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  Acc a1 = 0, a2 = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    a1 += sh1[w];
    a2 += sh2[w];
  }
  ws1[blockIdx.y * C + c] = a1;
  ws2[blockIdx.y * C + c] = a2;
}

// Stage 2: out[c] = sum over g = 0..G-1 of ws[g][c], in order.
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    sum_groups_kernel(const Acc* __restrict__ ws1, const Acc* __restrict__ ws2, int64_t G,
                      int64_t C, Acc* __restrict__ out1, Acc* __restrict__ out2) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Acc a1 = 0, a2 = 0;
  for (int64_t g = 0; g < G; ++g) {
    a1 += ws1[g * C + c];
    a2 += ws2[g * C + c];
  }
  out1[c] = a1;
  out2[c] = a2;
}

// Split-K reduction of the weight gradient: out[i] = sum over s of ws[s][i], in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    splitk_sum_kernel(const typename AccOf<T>::type* __restrict__ ws, int64_t splits, int64_t MN,
                      T* __restrict__ out) {
  using Acc = typename AccOf<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < MN;
       i += stride) {
    Acc s = 0;
    for (int64_t k = 0; k < splits; ++k) s += ws[k * MN + i];
    out[i] = from_acc<T>(s);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Row/image groups of pw_bwd_reduce: a function of the shape only, so the workspace size and
// the summation order do not depend on pointers.
int64_t reduce_groups(const PwBwdReduceParams& p) {
  if (p.nhwc) {
    const int64_t M = p.N * p.HW;
    const int64_t gx = cdiv(p.C, kThreads);
    const int64_t g = std::min(cdiv(M, 64), std::max<int64_t>(1, 1024 / gx));
    return cdiv(M, cdiv(M, std::min<int64_t>(g, 65535)));
  }
  const int64_t g = std::min(p.N, std::max<int64_t>(1, 1024 / p.C));
  return cdiv(p.N, cdiv(p.N, std::min<int64_t>(g, 65535)));
}

template <typename T>
cudaError_t launch_reduce(const PwBwdReduceParams& p, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  const T* gy = static_cast<const T*>(p.grad_y);
  const T* z = static_cast<const T*>(p.z);
  const Acc* sc = static_cast<const Acc*>(p.scale);
  const Acc* sh = static_cast<const Acc*>(p.shift);
  const Acc* mu = static_cast<const Acc*>(p.mean);
  const Acc* is = static_cast<const Acc*>(p.invstd);
  const int64_t G = reduce_groups(p);
  Acc* ws1 = static_cast<Acc*>(p.workspace);
  Acc* ws2 = ws1 + G * p.C;
  const bool ptr_ok = aligned16(gy) && aligned16(z);
  if (p.nhwc) {
    const int64_t M = p.N * p.HW;
    const int64_t rows = cdiv(M, G);
    const bool vec = ptr_ok && p.C % kVec == 0;
    const int64_t cvec = vec ? p.C / kVec : p.C;
    int tx = 1;
    while (tx < cvec && tx < kThreads) tx *= 2;
    const dim3 grid(static_cast<unsigned>(cdiv(cvec, tx)), static_cast<unsigned>(G));
    if (vec)
      reduce_nhwc_kernel<T, kVec>
          <<<grid, kThreads, 0, stream>>>(gy, z, sc, sh, mu, is, ws1, ws2, M, p.C, rows, tx, p.act);
    else
      reduce_nhwc_kernel<T, 1>
          <<<grid, kThreads, 0, stream>>>(gy, z, sc, sh, mu, is, ws1, ws2, M, p.C, rows, tx, p.act);
  } else {
    const int64_t imgs = cdiv(p.N, G);
    const bool vec = ptr_ok && p.HW % kVec == 0;
    const dim3 grid(static_cast<unsigned>(p.C), static_cast<unsigned>(G));
    if (vec)
      reduce_nchw_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(gy, z, sc, sh, mu, is, ws1, ws2,
                                                                 p.N, p.C, p.HW, imgs, p.act);
    else
      reduce_nchw_kernel<T, 1><<<grid, kThreads, 0, stream>>>(gy, z, sc, sh, mu, is, ws1, ws2, p.N,
                                                              p.C, p.HW, imgs, p.act);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  sum_groups_kernel<Acc><<<static_cast<unsigned>(cdiv(p.C, kThreads)), kThreads, 0, stream>>>(
      ws1, ws2, G, p.C, static_cast<Acc*>(p.sum_gz), static_cast<Acc*>(p.sum_gz_xhat));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gconv(const PwBwdParams& p, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t numel = p.s.N * p.s.Cout * p.s.HW;
  const int64_t inner = p.s.nhwc ? p.s.Cout : p.s.HW;
  const bool vec =
      inner % kVec == 0 && aligned16(p.grad_y) && aligned16(p.z) && aligned16(p.g_conv);
  const T* gy = static_cast<const T*>(p.grad_y);
  const T* z = static_cast<const T*>(p.z);
  const Acc* sc = static_cast<const Acc*>(p.scale);
  const Acc* sh = static_cast<const Acc*>(p.shift);
  const Acc* k = static_cast<const Acc*>(p.k);
  const Acc* b = static_cast<const Acc*>(p.b);
  const Acc* c = static_cast<const Acc*>(p.c);
  T* out = static_cast<T*>(p.g_conv);
  auto go = [&](auto vec_tag, auto nhwc_tag) {
    constexpr int V = decltype(vec_tag)::value;
    constexpr bool NHWC = decltype(nhwc_tag)::value;
    const int64_t n_vec = numel / V;
    gconv_kernel<T, V, NHWC><<<grid_1d(n_vec), kThreads, 0, stream>>>(
        gy, z, sc, sh, k, b, c, out, n_vec, p.s.Cout, p.s.HW, p.act);
  };
  using VecT = std::integral_constant<int, kVec>;
  using One = std::integral_constant<int, 1>;
  using Yes = std::integral_constant<bool, true>;
  using No = std::integral_constant<bool, false>;
  if (vec)
    p.s.nhwc ? go(VecT{}, Yes{}) : go(VecT{}, No{});
  else
    p.s.nhwc ? go(One{}, Yes{}) : go(One{}, No{});
  return cudaGetLastError();
}

// grad_x = g_conv . W (a plain store epilogue).
PwGemmParams dgrad_gemm(const PwBwdParams& p) {
  const PwShape& s = p.s;
  PwGemmParams g{};
  if (s.nhwc) {  // gX[pix][ci] = G[pix][co] * W[co][ci]
    g.a = p.g_conv, g.lda = s.Cout, g.batch_a = 0, g.a_kmajor = true;
    g.b = p.w, g.ldb = s.Cin, g.batch_b = 0, g.b_kmajor = false;
    g.c = p.grad_x, g.ldc = s.Cin, g.batch_c = 0;
    g.M = s.N * s.HW, g.N = s.Cin, g.K = s.Cout, g.batch = 1;
  } else {  // gX[n][ci][hw] = W^T[ci][co] * G[n][co][hw]
    g.a = p.w, g.lda = s.Cin, g.batch_a = 0, g.a_kmajor = false;
    g.b = p.g_conv, g.ldb = s.HW, g.batch_b = s.Cout * s.HW, g.b_kmajor = false;
    g.c = p.grad_x, g.ldc = s.HW, g.batch_c = s.Cin * s.HW;
    g.M = s.Cin, g.N = s.HW, g.K = s.Cout, g.batch = s.N;
  }
  g.reduce_batch = false;
  g.splits = 1;
  g.epi = PwGemmParams::kStore;
  g.chan = 0;
  g.allow_tf32 = p.allow_tf32;
  return g;
}

// grad_w partials = g_conv^T . x over fixed k-ranges (split-K; NCHW sums over images too).
PwGemmParams wgrad_gemm(const PwBwdParams& p, DType dtype) {
  const PwShape& s = p.s;
  PwGemmParams g{};
  if (s.nhwc) {  // gW[co][ci] = sum_pix G[pix][co] * X[pix][ci]
    g.a = p.g_conv, g.lda = s.Cout, g.batch_a = 0, g.a_kmajor = false;
    g.b = p.x, g.ldb = s.Cin, g.batch_b = 0, g.b_kmajor = false;
    g.K = s.N * s.HW, g.batch = 1;
  } else {  // gW[co][ci] = sum_n sum_hw G[n][co][hw] * X[n][ci][hw]
    g.a = p.g_conv, g.lda = s.HW, g.batch_a = s.Cout * s.HW, g.a_kmajor = true;
    g.b = p.x, g.ldb = s.HW, g.batch_b = s.Cin * s.HW, g.b_kmajor = true;
    g.K = s.HW, g.batch = s.N;
  }
  g.M = s.Cout, g.N = s.Cin;
  g.reduce_batch = true;
  g.epi = PwGemmParams::kPartial;
  g.chan = 0;
  g.allow_tf32 = p.allow_tf32;
  const PwGemmTile tile = pw_gemm_config(g, dtype);
  g.cfg = tile.cfg;
  // Enough slices to fill the GPU about twice, at least 8 k-tiles each, and at most 2^25
  // partial elements (128 MiB of fp32).
  const int64_t tiles = cdiv(g.M, tile.bm) * cdiv(g.N, tile.bn);
  const int64_t total_kt = g.batch * cdiv(g.K, tile.bk);
  int64_t splits = cdiv(2 * static_cast<int64_t>(pw_num_sms()), tiles);
  splits = std::min(splits, std::max<int64_t>(1, total_kt / 8));
  splits = std::min(splits, std::max<int64_t>(1, (int64_t(1) << 25) / (g.M * g.N)));
  g.splits = std::max<int64_t>(1, splits);
  g.ldc = g.N;
  g.batch_c = g.M * g.N;
  return g;
}

}  // namespace

int64_t pw_bwd_reduce_workspace_bytes(const PwBwdReduceParams& p, DType dtype) {
  if (p.N * p.HW == 0 || p.C == 0) return 0;
  const int64_t acc_bytes = dtype == DType::kFloat64 ? 8 : 4;
  return 2 * reduce_groups(p) * p.C * acc_bytes;
}

cudaError_t pw_bwd_reduce(const PwBwdReduceParams& p, DType dtype, cudaStream_t stream) {
  if (p.N * p.HW == 0 || p.C == 0) return cudaSuccess;
  if (p.C > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.act < 0 || p.act > 2) return cudaErrorInvalidValue;
  DWSEP_DISPATCH_DTYPE(dtype, T, { return launch_reduce<T>(p, stream); });
  return cudaSuccess;
}

int64_t pw_bwd_workspace_bytes(const PwBwdParams& p, DType dtype) {
  if (p.s.N * p.s.HW == 0 || p.s.Cout == 0 || p.s.Cin == 0) return 0;
  const int64_t acc_bytes = dtype == DType::kFloat64 ? 8 : 4;
  const PwGemmParams g = wgrad_gemm(p, dtype);
  return g.splits * g.M * g.N * acc_bytes;
}

cudaError_t pw_bwd(const PwBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.s.N * p.s.HW == 0 || p.s.Cout == 0 || p.s.Cin == 0) return cudaSuccess;
  if (p.act < 0 || p.act > 2) return cudaErrorInvalidValue;
  cudaError_t e = cudaSuccess;
  DWSEP_DISPATCH_DTYPE(dtype, T, { e = launch_gconv<T>(p, stream); });
  if (e != cudaSuccess) return e;

  PwGemmParams dg = dgrad_gemm(p);
  dg.cfg = pw_gemm_config(dg, dtype).cfg;
  e = pw_gemm(dg, dtype, stream);
  if (e != cudaSuccess) return e;

  PwGemmParams wg = wgrad_gemm(p, dtype);
  wg.c = p.workspace;
  e = pw_gemm(wg, dtype, stream);
  if (e != cudaSuccess) return e;
  const int64_t mn = wg.M * wg.N;
  DWSEP_DISPATCH_DTYPE(dtype, T, {
    splitk_sum_kernel<T><<<grid_1d(mn), kThreads, 0, stream>>>(
        static_cast<const typename AccOf<T>::type*>(p.workspace), wg.splits, mn,
        static_cast<T*>(p.grad_w));
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dwsep
