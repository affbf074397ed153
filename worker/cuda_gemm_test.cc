// CudaGemm: the tuned choices compute what cuBLAS's default computes, at
// every token count (tuned ones and those between), for each output dtype
// and beta the engine uses; a chosen algorithm gives the same bits on every
// call. GPU parts skip without a device.
#include "worker/cuda_gemm.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda_ops/cuda_ops.h"
#include "worker/cuda_util.h"

namespace strata {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

TEST(CudaGemmLadder, FineWhereWavesChangeAndEndsAtTheMaximum) {
  const std::vector<int64_t> l = CudaGemm::Ladder(4096);
  ASSERT_FALSE(l.empty());
  EXPECT_EQ(l.front(), 16);
  EXPECT_EQ(l.back(), 4096);
  EXPECT_TRUE(std::is_sorted(l.begin(), l.end()));
  EXPECT_EQ(std::adjacent_find(l.begin(), l.end()), l.end());
  for (size_t i = 1; i < l.size(); ++i) {
    const int64_t step = l[i] - l[i - 1];
    EXPECT_LE(step, l[i - 1] < 512 ? 16 : l[i - 1] < 1024 ? 64 : 256) << l[i];
  }
  EXPECT_EQ(CudaGemm::Ladder(100).back(), 100);
  EXPECT_EQ(CudaGemm::Ladder(8), std::vector<int64_t>{8});
  EXPECT_TRUE(CudaGemm::Ladder(0).empty());
}

// Host copy of `count` elements of a device array of fp32 or fp16.
std::vector<float> ToHost(const void* p, cudaDataType t, int64_t count) {
  std::vector<float> out(count);
  if (t == CUDA_R_32F) {
    EXPECT_EQ(cudaMemcpy(out.data(), p, count * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  } else {
    std::vector<__half> h(count);
    EXPECT_EQ(cudaMemcpy(h.data(), p, count * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int64_t i = 0; i < count; ++i) out[i] = __half2float(h[i]);
  }
  return out;
}

TEST(CudaGemm, TunedChoicesMatchTheDefaultAtEveryTokenCount) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  cublasHandle_t cublas = nullptr;
  ASSERT_EQ(cublasCreate(&cublas), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasSetStream(cublas, stream), CUBLAS_STATUS_SUCCESS);
  const size_t ws_bytes = size_t{32} << 20;
  DeviceBuffer ws, w, x, y, yref, y0;
  ASSERT_TRUE(ws.Allocate(ws_bytes).ok());
  ASSERT_EQ(cublasSetWorkspace(cublas, ws.get(), ws_bytes), CUBLAS_STATUS_SUCCESS);
  const int64_t max_m = 600;
  struct Shape {
    int64_t n, k;
    cudaDataType out;
    float beta;
  };
  // A narrow column-parallel projection (fp32 out), a row-parallel partial
  // (fp16 out), a residual-accumulating one (fp32, beta 1).
  const std::vector<Shape> shapes = {{960, 1280, CUDA_R_32F, 0.0f},
                                     {1280, 320, CUDA_R_16F, 0.0f},
                                     {1280, 864, CUDA_R_32F, 1.0f}};
  int64_t max_nk = 0, max_n = 0, max_k = 0;
  for (const Shape& s : shapes) {
    max_nk = std::max(max_nk, s.n * s.k);
    max_n = std::max(max_n, s.n);
    max_k = std::max(max_k, s.k);
  }
  ASSERT_TRUE(w.Allocate(max_nk * 2).ok());
  ASSERT_TRUE(x.Allocate(max_m * max_k * 2).ok());
  ASSERT_TRUE(y.Allocate(max_m * max_n * 4).ok());
  ASSERT_TRUE(yref.Allocate(max_m * max_n * 4).ok());
  ASSERT_TRUE(y0.Allocate(max_m * max_n * 4).ok());
  using cuda_ops::ActDtype;
  ASSERT_EQ(cuda_ops::FillUniform(w.get(), ActDtype::kFp16, max_nk, 1, -0.05f, 0.05f, stream), cudaSuccess);
  ASSERT_EQ(cuda_ops::FillUniform(x.get(), ActDtype::kFp16, max_m * max_k, 2, -1.0f, 1.0f, stream), cudaSuccess);
  ASSERT_EQ(cuda_ops::FillUniform(y0.get(), ActDtype::kFp32, max_m * max_n, 3, -1.0f, 1.0f, stream), cudaSuccess);

  CudaGemm tuned, plain;  // `plain` is never tuned: cuBLAS's default
  ASSERT_TRUE(tuned.Init(cublas, stream, CUDA_R_16F, ws.get(), ws_bytes).ok());
  ASSERT_TRUE(plain.Init(cublas, stream, CUDA_R_16F, ws.get(), ws_bytes).ok());
  std::vector<CudaGemm::TuneJob> jobs;
  for (const Shape& s : shapes) jobs.push_back({s.n, s.k, s.out, s.beta, w.get(), x.get(), y.get(), max_m});
  absl::StatusOr<CudaGemm::TuneStats> st = tuned.Tune(jobs);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->points, 3 * static_cast<int>(CudaGemm::Ladder(max_m).size()));
  std::printf("[gemm tuning] %d points, cuBLASLt kept at %d, %.0f ms\n", st->points, st->lt_chosen, st->ms);

  for (const Shape& s : shapes) {
    const size_t esz = s.out == CUDA_R_32F ? 4 : 2;
    for (int64_t m : {int64_t{1}, int64_t{5}, int64_t{16}, int64_t{17}, int64_t{100}, int64_t{264},
                      int64_t{511}, int64_t{512}, int64_t{513}, max_m}) {
      // beta 1 (fp32 outputs only here) accumulates onto the same y0 each time.
      auto run = [&](CudaGemm& g, DeviceBuffer& out) {
        if (s.beta != 0.0f) {
          EXPECT_EQ(cudaMemcpyAsync(out.get(), y0.get(), m * s.n * esz, cudaMemcpyDeviceToDevice, stream),
                    cudaSuccess);
        }
        const absl::Status r = g.Run(x.get(), w.get(), out.get(), s.out, m, s.n, s.k, s.beta);
        EXPECT_TRUE(r.ok()) << r;
        EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      };
      run(plain, yref);
      run(tuned, y);
      const std::vector<float> a = ToHost(y.get(), s.out, m * s.n), b = ToHost(yref.get(), s.out, m * s.n);
      double max_diff = 0, max_ref = 0;
      for (int64_t i = 0; i < m * s.n; ++i) {
        max_diff = std::max(max_diff, std::fabs(double{a[i]} - b[i]));
        max_ref = std::max(max_ref, std::fabs(double{b[i]}));
      }
      // fp32 accumulation in another order: ~1e-6 relative; fp16 outputs
      // may round the other way (one unit in the last place, ~1e-3).
      const double tol = (s.out == CUDA_R_32F ? 2e-5 : 2e-3) * std::max(1.0, max_ref);
      EXPECT_LE(max_diff, tol) << "n " << s.n << " k " << s.k << " m " << m;
      // The same call again gives the same bits.
      run(tuned, yref);
      const std::vector<float> c = ToHost(yref.get(), s.out, m * s.n);
      EXPECT_EQ(std::memcmp(a.data(), c.data(), a.size() * sizeof(float)), 0) << "m " << m;
    }
  }
  cublasDestroy(cublas);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace strata
