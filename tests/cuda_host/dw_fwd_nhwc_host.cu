// Host run of the channels_last depthwise forward kernel's per-thread body
// (csrc/cuda/depthwise_fwd_nhwc.cuh): every thread id of an emulated grid in turn, on the CPU.
// Built with the host C++ compiler (as C++, the CUDA headers for the storage types) and
// AddressSanitizer by tests/test_cuda_host.py, which writes the inputs, runs this program and
// compares its output with the float64 reference. Buffers are allocated at their exact sizes,
// so a read or write one element out of bounds stops the run.
//
//   dw_fwd_nhwc_host DIR DTYPE N C H W STRIDE ACT VEC NTHREADS
//     DIR: x.bin, w.bin, scale.bin, shift.bin in, y.bin out (raw, native byte order)
//     DTYPE: float32 | float64 | float16 | bfloat16; VEC: 1 (scalar) or 0 (16-byte vectors,
//     needs C % (16 / element size) == 0); NTHREADS: the emulated grid's thread count.
// y is filled with 0xff bytes (NaN in every dtype) before the run, so an output the kernel does
// not write shows up as NaN.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/depthwise_fwd_nhwc.cuh"

namespace {

using dwsep::cuda::AccOf;
using dwsep::cuda::DwShape;

std::vector<unsigned char> read_file(const std::string& path, size_t bytes) {
  std::vector<unsigned char> buf(bytes);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  const size_t got = bytes == 0 ? 0 : std::fread(buf.data(), 1, bytes, f);
  std::fclose(f);
  if (got != bytes) {
    std::fprintf(stderr, "%s: expected %zu bytes, read %zu\n", path.c_str(), bytes, got);
    std::exit(2);
  }
  return buf;
}

// A heap copy of exactly `count` elements, so that AddressSanitizer bounds the kernel's
// accesses at the tensor's own end.
template <typename U>
U* exact_copy(const std::vector<unsigned char>& src, size_t count) {
  U* p = static_cast<U*>(std::malloc(count * sizeof(U) > 0 ? count * sizeof(U) : 1));
  if (count > 0) std::memcpy(p, src.data(), count * sizeof(U));
  return p;
}

template <typename T, int S, int ACT, int VEC>
int run(const std::string& dir, const DwShape& s, int64_t nthreads) {
  using Acc = typename AccOf<T>::type;
  const size_t nx = s.N * s.C * s.H * s.W, ny = s.N * s.C * s.Ho * s.Wo, nw = s.C * 9;
  T* x = exact_copy<T>(read_file(dir + "/x.bin", nx * sizeof(T)), nx);
  T* w = exact_copy<T>(read_file(dir + "/w.bin", nw * sizeof(T)), nw);
  Acc* sc = exact_copy<Acc>(read_file(dir + "/scale.bin", s.C * sizeof(Acc)), s.C);
  Acc* sh = exact_copy<Acc>(read_file(dir + "/shift.bin", s.C * sizeof(Acc)), s.C);
  T* y = static_cast<T*>(std::malloc(ny * sizeof(T) > 0 ? ny * sizeof(T) : 1));
  std::memset(y, 0xff, ny * sizeof(T));
  for (int64_t t = 0; t < nthreads; ++t)
    dwsep::cuda::dw_fwd_nhwc_thread<T, S, ACT, VEC>(x, w, sc, sh, y, s, t, nthreads);
  FILE* f = std::fopen((dir + "/y.bin").c_str(), "wb");
  if (f == nullptr || std::fwrite(y, sizeof(T), ny, f) != ny) {
    std::fprintf(stderr, "cannot write y.bin\n");
    return 2;
  }
  std::fclose(f);
  for (void* p : {static_cast<void*>(x), static_cast<void*>(w), static_cast<void*>(sc),
                  static_cast<void*>(sh), static_cast<void*>(y)})
    std::free(p);
  return 0;
}

template <typename T>
int dispatch(const std::string& dir, const DwShape& s, int act, bool vec, int64_t nthreads) {
  constexpr int kVec = 16 / sizeof(T);
  if (vec && s.C % kVec != 0) {
    std::fprintf(stderr, "VEC=0 (vectors) needs C %% %d == 0, got C=%lld\n", kVec,
                 static_cast<long long>(s.C));
    return 2;
  }
  // The launcher guarantees a thread per channel vector (launch_fwd_nhwc).
  if (nthreads < s.C / (vec ? kVec : 1)) {
    std::fprintf(stderr, "NTHREADS must be at least C / VEC\n");
    return 2;
  }
#define DWSEP_HOST_RUN(S_, ACT_) \
  return vec ? run<T, S_, ACT_, kVec>(dir, s, nthreads) : run<T, S_, ACT_, 1>(dir, s, nthreads)
  if (s.stride == 1) {
    if (act == 0) DWSEP_HOST_RUN(1, 0);
    if (act == 1) DWSEP_HOST_RUN(1, 1);
    DWSEP_HOST_RUN(1, 2);
  }
  if (act == 0) DWSEP_HOST_RUN(2, 0);
  if (act == 1) DWSEP_HOST_RUN(2, 1);
  DWSEP_HOST_RUN(2, 2);
#undef DWSEP_HOST_RUN
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 11) {
    std::fprintf(stderr, "usage: %s DIR DTYPE N C H W STRIDE ACT VEC NTHREADS\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1], dtype = argv[2];
  DwShape s{};
  s.N = std::atoll(argv[3]);
  s.C = std::atoll(argv[4]);
  s.H = std::atoll(argv[5]);
  s.W = std::atoll(argv[6]);
  s.stride = std::atoi(argv[7]);
  s.Ho = (s.H - 1) / s.stride + 1;
  s.Wo = (s.W - 1) / s.stride + 1;
  s.nhwc = true;
  const int act = std::atoi(argv[8]);
  const bool vec = std::atoi(argv[9]) == 0;
  const int64_t nthreads = std::atoll(argv[10]);
  if ((s.stride != 1 && s.stride != 2) || act < 0 || act > 2 || nthreads < 1) {
    std::fprintf(stderr, "bad arguments (stride 1|2, act 0..2, NTHREADS >= 1)\n");
    return 2;
  }
  if (dtype == "float32") return dispatch<float>(dir, s, act, vec, nthreads);
  if (dtype == "float64") return dispatch<double>(dir, s, act, vec, nthreads);
  if (dtype == "float16") return dispatch<__half>(dir, s, act, vec, nthreads);
  if (dtype == "bfloat16") return dispatch<__nv_bfloat16>(dir, s, act, vec, nthreads);
  std::fprintf(stderr, "unknown dtype %s\n", dtype.c_str());
  return 2;
}
