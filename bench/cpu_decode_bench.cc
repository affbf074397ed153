// CPU decode throughput on a real model: tokens/s at batch 1 and batched
// throughput at larger batches (greedy, fixed output length, fp32 KV cache
// unless told otherwise). Prints numbers; it is not a test.
//
//   cpu_decode_bench --model ../shared/data/models/stories15M --batches 1,16
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "kernels/cpu/ops_cpu.h"
#include "worker/offline_generator.h"

using namespace strata;

int main(int argc, char** argv) {
  CLI::App app{"CPU decode benchmark"};
  OfflineOptions opts;
  opts.model_path = "../shared/data/models/stories15M";
  opts.kv_cache_dtype = "fp32";
  std::vector<int> batches = {1, 16};
  int prompt_len = 8, gen_len = 200, repeats = 3;
  app.add_option("--model", opts.model_path)->capture_default_str();
  app.add_option("--kv-cache-dtype", opts.kv_cache_dtype)->capture_default_str();
  app.add_option("--batches", batches)->delimiter(',')->capture_default_str();
  app.add_option("--prompt-len", prompt_len)->capture_default_str();
  app.add_option("--gen-len", gen_len)->capture_default_str();
  app.add_option("--repeats", repeats)->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto gen = OfflineGenerator::Create(opts);
  if (!gen.ok()) {
    std::fprintf(stderr, "cpu_decode_bench: %s\n", std::string(gen.status().message()).c_str());
    return 2;
  }
  std::printf("model %s, kv %s, threads %d, prompt %d, generate %d tokens per sequence\n",
              opts.model_path.c_str(), opts.kv_cache_dtype.c_str(), cpu::NumThreads(), prompt_len,
              gen_len);
  std::printf("%6s %14s %14s %12s\n", "batch", "tokens/s", "ms/step", "vs batch 1");
  double base = 0;
  for (int b : batches) {
    std::vector<GenerateRequest> reqs(b);
    for (int i = 0; i < b; ++i) {
      reqs[i].prompt_ids.push_back(1);
      for (int t = 1; t < prompt_len; ++t) reqs[i].prompt_ids.push_back(100 + (i * 7 + t * 13) % 5000);
      reqs[i].max_new_tokens = gen_len;
    }
    double best = 0;
    for (int r = 0; r < repeats; ++r) {
      // Time prefill separately so the figure is decode throughput.
      std::vector<GenerateRequest> warm = reqs;
      for (auto& w : warm) w.max_new_tokens = 1;
      const auto t0 = std::chrono::steady_clock::now();
      auto p = (*gen)->Generate(warm);
      const auto t1 = std::chrono::steady_clock::now();
      auto res = (*gen)->Generate(reqs);
      const auto t2 = std::chrono::steady_clock::now();
      if (!p.ok() || !res.ok()) {
        std::fprintf(stderr, "generation failed\n");
        return 1;
      }
      const double prefill = std::chrono::duration<double>(t1 - t0).count();
      const double total = std::chrono::duration<double>(t2 - t1).count() - prefill;
      const double tps = double(b) * (gen_len - 1) / total;
      best = std::max(best, tps);
    }
    if (b == batches.front()) base = best;
    std::printf("%6d %14.1f %14.3f %11.2fx\n", b, best, 1000.0 * b / best, best / base);
  }
  return 0;
}
