// The CUDA engine's dense projections, y[m][n] = x[m][k] w[n][k]^T + beta y
// (row-major; 16-bit x and w, fp32 accumulation, fp32 or 16-bit y), with the
// algorithm chosen per (shape, token count) by timing at start-up.
//
// Why: cuBLAS's default algorithm for a step of a few hundred tokens can
// leave SMs idle once tensor parallelism narrows the output (llama-2-13b at
// tp=4, 264 tokens: 325 TFLOP/s against 523 at tp=1; bench/RESULTS.md).
// Tune() runs, for each registered weight matrix and each token count of a
// ladder (every 16 up to 512, then coarser), cuBLAS's default and the
// cuBLASLt heuristic's candidates on the real weights and random inputs, and
// keeps a candidate only where it beats the default by kMargin; everywhere
// else the default stays. Run() takes the choice of the smallest tuned count
// >= m (checked once per exact m and cached), so a step does no search and
// stays capturable into CUDA graphs. Split-K candidates reduce through the
// workspace (in-place reductions with atomics are excluded), so a chosen
// algorithm gives the same bits on every call; a different process may time
// differently and choose differently (last-bit differences between
// restarts; CudaEngineOptions::tune_gemms off avoids them).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace strata {

class CudaGemm {
 public:
  // A candidate must take at most this share of the default's time to be kept.
  static constexpr double kMargin = 0.95;

  CudaGemm() = default;
  ~CudaGemm();
  CudaGemm(const CudaGemm&) = delete;
  CudaGemm& operator=(const CudaGemm&) = delete;

  // in: CUDA_R_16F or CUDA_R_16BF. The workspace (on `stream`'s device) is
  // the one cublas_ uses too: every GEMM runs on the same stream.
  absl::Status Init(cublasHandle_t cublas, cudaStream_t stream, cudaDataType in, void* workspace,
                    size_t workspace_bytes);

  // One weight matrix to tune for: w [n][k] on the device, and scratch x
  // ([max_m][k] of `in`, random contents) and y ([max_m][n] of `out`) that
  // the timing runs overwrite; beta as the engine calls it (1: accumulate).
  struct TuneJob {
    int64_t n = 0, k = 0;
    cudaDataType out = CUDA_R_32F;
    float beta = 0.0f;
    const void* w = nullptr;
    const void* x = nullptr;
    void* y = nullptr;
    int64_t max_m = 0;
  };
  struct TuneStats {
    double ms = 0;        // host time of Tune()
    int points = 0;       // (job, token count) pairs timed
    int lt_chosen = 0;    // of which a cuBLASLt candidate beat the default
    double est_gain = 0;  // mean over points of 1 - chosen / default time
  };
  // Times up to `candidates` algorithms per (job, token count) against the
  // default; synchronizes the stream. Jobs with a shape tuned before are skipped.
  absl::StatusOr<TuneStats> Tune(const std::vector<TuneJob>& jobs, int candidates = 8);

  // y = x w^T + beta y on the stream.
  absl::Status Run(const void* x, const void* w, void* y, cudaDataType out, int64_t m, int64_t n,
                   int64_t k, float beta);

  // The token counts tuned for max_m (ascending, ending at max_m).
  static std::vector<int64_t> Ladder(int64_t max_m);

 private:
  struct Exact {  // one exact m of a shape that runs a cuBLASLt algorithm
    cublasLtMatrixLayout_t b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool ok = false;
  };
  struct Choice {
    int64_t m = 0;
    bool lt = false;  // false: cuBLAS's default
    cublasLtMatmulAlgo_t algo{};
  };
  struct Tuned {  // one (n, k, out)
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr;
    int64_t k = 0;
    std::vector<Choice> ladder;  // m ascending
    std::unordered_map<int64_t, Exact> exact;
  };
  absl::Status Default(const void* x, const void* w, void* y, cudaDataType out, int64_t m,
                       int64_t n, int64_t k, float beta);
  absl::Status Layouts(const Tuned& t, int64_t m, int64_t n, cudaDataType out, Exact* e) const;

  cublasHandle_t cublas_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaDataType in_ = CUDA_R_16F;
  void* ws_ = nullptr;
  size_t ws_bytes_ = 0;
  std::map<std::tuple<int64_t, int64_t, int>, std::unique_ptr<Tuned>> tuned_;
};

}  // namespace strata
