// CPU decode throughput on a real model: tokens/s at batch 1 and batched
// throughput at larger batches (greedy, fixed output length, fp32 KV cache
// unless told otherwise), for each weight storage dtype of the CPU engine.
// Prints numbers; it is not a test.
//
//   cpu_decode_bench --model ../shared/data/models/stories15M --batches 1,16
//   cpu_decode_bench --fma-peak   (the ceiling batch 16's GEMMs are held to)
//
// Timings on a shared machine are noisy, so every repeat runs all (weight
// dtype, batch) cells back to back and the table shows the best and the
// median per cell; the load average before and after is printed. OpenMP's
// wait policy is read by the runtime at start-up: --omp-wait-policy re-runs
// the program with OMP_WAIT_POLICY set (the header says what was used).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "CLI/CLI.hpp"
#include "kernels/cpu/gemm_cpu.h"
#include "kernels/cpu/ops_cpu.h"
#include "runtime/kv_format_util.h"
#include "runtime/tokenizer.h"
#include "runtime/weights.h"
#include "worker/cpu_engine.h"
#include "worker/offline_generator.h"

using namespace strata;

namespace {

std::string LoadAverage() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "unset";
}

struct Cell {
  std::string dtype;
  int batch = 0;
  std::vector<double> tps;  // one per repeat
};

// The cores' fp32 FMA peak: 12 independent AVX-512 FMA chains per thread, one
// thread per hardware thread; GFLOP/s (2 per multiply-add), best of 3; 0
// without AVX-512 in the build.
double FmaPeakGflops() {
#if defined(__AVX512F__)
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  constexpr int64_t kIters = 16'000'000;  // per chain
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<float> sink(threads);
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&sink, t] {
        __m512 a[12];
        for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.0f + i * 1e-7f);
        const __m512 b = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-8f);
        for (int64_t k = 0; k < kIters; ++k) {
          for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
        }
        __m512 s = a[0];
        for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, s);
        float r = 0;
        for (float x : lanes) r += x;
        sink[t] = r;
      });
    }
    for (std::thread& th : pool) th.join();
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    float all = 0;
    for (float x : sink) all += x;
    if (all == 12345.0f) std::printf(" ");  // keeps the chains live
    best = std::max(best, 2.0 * 16 * 12 * kIters * threads / sec / 1e9);
  }
  return best;
#else
  return 0;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"CPU decode benchmark"};
  std::string model = "../shared/data/models/stories15M", kv_dtype = "fp32", wait_policy;
  std::vector<std::string> weight_dtypes = {"fp32", "fp16"};
  std::vector<int> batches = {1, 16};
  int prompt_len = 8, gen_len = 200, repeats = 3;
  app.add_option("--model", model)->capture_default_str();
  app.add_option("--kv-cache-dtype", kv_dtype)->capture_default_str();
  app.add_option("--weight-dtypes", weight_dtypes, "CPU engine weight storage: fp32, fp16")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--batches", batches)->delimiter(',')->capture_default_str();
  app.add_option("--prompt-len", prompt_len)->capture_default_str();
  app.add_option("--gen-len", gen_len)->capture_default_str();
  app.add_option("--repeats", repeats)->capture_default_str();
  bool fma_peak = false;
  app.add_flag("--fma-peak", fma_peak,
               "only print the cores' fp32 FMA peak (AVX-512 chains on every hardware thread)");
  app.add_option("--omp-wait-policy", wait_policy,
                 "re-run with OMP_WAIT_POLICY set to this (active, passive); default: as inherited");
  CLI11_PARSE(app, argc, argv);
  if (fma_peak) {
    const double g = FmaPeakGflops();
    if (g == 0) {
      std::fprintf(stderr, "cpu_decode_bench: --fma-peak needs an AVX-512 build (-march=native)\n");
      return 2;
    }
    std::printf("fp32 FMA peak: %.1f GFLOP/s on %u hardware threads\n", g,
                std::max(1u, std::thread::hardware_concurrency()));
    return 0;
  }

  if (!wait_policy.empty() && Env("OMP_WAIT_POLICY") != wait_policy) {
    setenv("OMP_WAIT_POLICY", wait_policy.c_str(), 1);
    execv("/proc/self/exe", argv);
    std::perror("cpu_decode_bench: re-exec");
    return 2;
  }

  auto weights = LoadModelWeights(model);
  if (!weights.ok()) {
    std::fprintf(stderr, "cpu_decode_bench: %s\n", std::string(weights.status().message()).c_str());
    return 2;
  }
  namespace fs = std::filesystem;
  const fs::path dir = fs::is_directory(model) ? fs::path(model) : fs::path(model).parent_path();
  std::vector<std::unique_ptr<OfflineGenerator>> gens;
  for (const std::string& wd : weight_dtypes) {
    EngineOptions eo;
    if (wd == "fp32") {
      eo.weight_dtype = WeightDtype::kFp32;
    } else if (wd == "fp16") {
      eo.weight_dtype = WeightDtype::kFp16;
    } else {
      std::fprintf(stderr, "cpu_decode_bench: --weight-dtypes: unknown %s\n", wd.c_str());
      return 2;
    }
    auto kv = ParseKvFormat(kv_dtype, "", weights->source_dtype);
    auto tok = Tokenizer::LoadFromDirectory(dir.string());
    if (!kv.ok() || !tok.ok()) {
      std::fprintf(stderr, "cpu_decode_bench: %s\n",
                   std::string((kv.ok() ? tok.status() : kv.status()).message()).c_str());
      return 2;
    }
    eo.kv_format = *kv;
    eo.block_size = 16;
    const int32_t per_seq = (weights->config.max_position_embeddings + 15) / 16;
    eo.num_gpu_blocks = per_seq * std::max(16, *std::max_element(batches.begin(), batches.end()));
    auto engine = CpuEngine::Create(*weights, eo);
    if (!engine.ok()) {
      std::fprintf(stderr, "cpu_decode_bench: %s\n", std::string(engine.status().message()).c_str());
      return 2;
    }
    OfflineOptions oo;
    oo.model_path = model;
    oo.kv_cache_dtype = kv_dtype;
    gens.push_back(std::make_unique<OfflineGenerator>(std::move(*engine), std::move(*tok), oo));
  }
  weights->layers.clear();

  std::printf("model %s, kv %s, prompt %d, generate %d tokens per sequence, %d repeats\n",
              model.c_str(), kv_dtype.c_str(), prompt_len, gen_len, repeats);
  std::printf("threads %d, OMP_WAIT_POLICY %s, GOMP_SPINCOUNT %s, AVX-512 GEMM %s\n",
              cpu::NumThreads(), Env("OMP_WAIT_POLICY").c_str(), Env("GOMP_SPINCOUNT").c_str(),
              cpu::CpuHasAvx512() ? "yes" : "no (portable)");
  std::printf("load average before: %s\n", LoadAverage().c_str());

  std::vector<Cell> cells;
  for (const std::string& wd : weight_dtypes) {
    for (int b : batches) cells.push_back({wd, b, {}});
  }
  // Every repeat measures every cell, so slow phases of a loaded machine
  // spread over all of them instead of hitting one.
  for (int r = 0; r < repeats; ++r) {
    for (size_t ci = 0; ci < cells.size(); ++ci) {
      Cell& cell = cells[ci];
      OfflineGenerator& gen = *gens[ci / batches.size()];
      const int b = cell.batch;
      std::vector<GenerateRequest> reqs(b);
      for (int i = 0; i < b; ++i) {
        reqs[i].prompt_ids.push_back(1);
        for (int t = 1; t < prompt_len; ++t) reqs[i].prompt_ids.push_back(100 + (i * 7 + t * 13) % 5000);
        reqs[i].max_new_tokens = gen_len;
      }
      // Time prefill separately so the figure is decode throughput.
      std::vector<GenerateRequest> warm = reqs;
      for (auto& w : warm) w.max_new_tokens = 1;
      const auto t0 = std::chrono::steady_clock::now();
      auto p = gen.Generate(warm);
      const auto t1 = std::chrono::steady_clock::now();
      auto res = gen.Generate(reqs);
      const auto t2 = std::chrono::steady_clock::now();
      if (!p.ok() || !res.ok()) {
        std::fprintf(stderr, "generation failed\n");
        return 1;
      }
      const double prefill = std::chrono::duration<double>(t1 - t0).count();
      const double total = std::chrono::duration<double>(t2 - t1).count() - prefill;
      cell.tps.push_back(double(b) * (gen_len - 1) / total);
    }
  }
  std::printf("load average after:  %s\n", LoadAverage().c_str());

  std::printf("%8s %6s %14s %14s %12s %12s\n", "weights", "batch", "best tok/s", "median tok/s",
              "ms/step", "vs batch 1");
  for (size_t ci = 0; ci < cells.size(); ++ci) {
    Cell& c = cells[ci];
    std::sort(c.tps.begin(), c.tps.end());
    const double best = c.tps.back(), median = c.tps[c.tps.size() / 2];
    const double base = cells[ci - ci % batches.size()].tps.back();  // this dtype's first batch
    std::printf("%8s %6d %14.1f %14.1f %12.3f %11.2fx\n", c.dtype.c_str(), c.batch, best, median,
                1000.0 * c.batch / best, best / base);
  }
  return 0;
}
