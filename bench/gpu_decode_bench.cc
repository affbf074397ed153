// Decode step time of the CUDA engine (dummy weights of a named shape,
// random KV contents) for batch x context x KV dtype, next to the memory
// roofline: (weight bytes + KV bytes read) / copy bandwidth, the bandwidth
// measured in the same run by a large device-to-device cudaMemcpy (bytes read
// + bytes written over time). Step time: CUDA events around Engine::Step on
// the engine's stream (host planning, uploads, graph replay, sampling and the
// token download included), after warm-up; the median of --iters.
//
// When batch x context needs more KV blocks than the card holds, sequences
// share physical blocks (block tables wrap around the pool; each sequence's
// last block, the one written, stays private). The kernels still read every
// logical byte; the "alias" column says how many times each block is read.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/kv_format_util.h"
#include "worker/cuda_engine.h"

namespace strata {
namespace {

#define BENCH_CHECK(expr)                                                       \
  do {                                                                          \
    const absl::Status s_ = (expr);                                             \
    if (!s_.ok()) {                                                             \
      std::fprintf(stderr, "%s failed: %s\n", #expr, s_.ToString().c_str()); \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)
#define BENCH_CUDA(expr) BENCH_CHECK(CudaStatus((expr), #expr))

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Device-to-device copy bandwidth (read + write bytes / s) on random data.
double CopyBandwidth(int64_t bytes) {
  void *a = nullptr, *b = nullptr;
  BENCH_CUDA(cudaMalloc(&a, bytes));
  BENCH_CUDA(cudaMalloc(&b, bytes));
  BENCH_CUDA(cuda_ops::FillUniform(a, cuda_ops::ActDtype::kFp32, bytes / 4, 77, -1.0f, 1.0f, nullptr));
  cudaEvent_t e0, e1;
  BENCH_CUDA(cudaEventCreate(&e0));
  BENCH_CUDA(cudaEventCreate(&e1));
  std::vector<double> t;
  for (int i = 0; i < 13; ++i) {
    BENCH_CUDA(cudaEventRecord(e0));
    BENCH_CUDA(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice));
    BENCH_CUDA(cudaEventRecord(e1));
    BENCH_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 3) t.push_back(ms * 1e-3);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / Median(t);
}

struct Row {
  std::string kv;
  int batch, ctx;
  double ms, wall_ms, roof_ms, alias, gbps;
};

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  using namespace strata;
  CLI::App app{"GPU decode step benchmark"};
  std::string model = "llama-2-7b", dtype = "fp16", batches_s = "1,16,64,128", ctxs_s = "16,1024,4096";
  std::string kvs_s = "fp16,int8,fp8_e4m3,int4", markdown;
  int iters = 20, warmup = 3;
  double util = 0.9;
  app.add_option("--model", model, "named shape or a config.json path (NamedModelShape)");
  app.add_option("--dtype", dtype, "weight dtype: fp16 or bf16");
  app.add_option("--batches", batches_s);
  app.add_option("--contexts", ctxs_s);
  app.add_option("--kv", kvs_s, "KV dtypes (default scale mode of each)");
  app.add_option("--iters", iters);
  app.add_option("--warmup", warmup);
  app.add_option("--gpu-memory-utilization", util);
  app.add_option("--markdown", markdown, "write the table here too");
  bool compare_unfused = true;
  app.add_option("--compare-unfused", compare_unfused,
                 "also time the first KV dtype with the fused small-batch GEMV off (cuBLAS path)");
  CLI11_PARSE(app, argc, argv);
  std::vector<int> batches, ctxs;
  for (auto s : absl::StrSplit(batches_s, ',')) batches.push_back(std::stoi(std::string(s)));
  for (auto s : absl::StrSplit(ctxs_s, ',')) ctxs.push_back(std::stoi(std::string(s)));

  absl::StatusOr<ModelConfig> shape = NamedModelShape(model);
  BENCH_CHECK(shape.status());
  cudaDeviceProp prop;
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  const double bw = CopyBandwidth(int64_t{2} << 30);
  std::ostringstream md;
  md << "Device: " << prop.name << " (" << prop.multiProcessorCount << " SMs, "
     << prop.totalGlobalMem / (1 << 20) << " MiB)\n";
  md << "Copy bandwidth (cudaMemcpy D2D 2 GiB, read + write): " << bw / 1e9 << " GB/s\n";
  md << "Model: " << model << " dummy weights, " << dtype << "; " << iters << " timed steps after "
     << warmup << " warm-up, median\n\n";
  md << "| kv | batch | ctx | step ms | roofline ms | step/roof | achieved GB/s | KV alias | host wall ms |\n";
  md << "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  std::printf("%s", md.str().c_str());
  std::fflush(stdout);

  std::vector<Row> rows;
  std::ostringstream profile_md;
  const std::vector<int> profile_batches = {1, 64}, profile_ctxs = {16, 4096};
  std::vector<std::pair<std::string, bool>> runs;  // (kv dtype, fused small batch)
  for (auto kv_name : absl::StrSplit(kvs_s, ',')) runs.emplace_back(std::string(kv_name), true);
  if (compare_unfused) runs.emplace_back(runs.front().first, false);
  for (const auto& [kv_name, fused] : runs) {
    std::vector<int> batches_run = batches;
    if (!fused) {  // only the sizes the fused path serves
      batches_run.clear();
      for (int b : batches) {
        if (b <= cuda_ops::kGemvMaxM) batches_run.push_back(b);
      }
      if (batches_run.empty()) continue;
    }
    absl::StatusOr<KvFormat> fmt = ParseKvFormat(kv_name, "", WeightDtype::kFp16);
    BENCH_CHECK(fmt.status());
    CudaEngineOptions o;
    o.engine.kv_format = *fmt;
    o.engine.block_size = 16;
    o.engine.num_gpu_blocks = 0;
    o.dtype = dtype == "bf16" ? WeightDtype::kBf16 : WeightDtype::kFp16;
    o.gpu_memory_utilization = util;
    o.max_num_seqs = *std::max_element(batches.begin(), batches.end());
    o.max_logit_rows = o.max_num_seqs;
    o.max_num_tokens = std::max(2048, o.max_num_seqs);
    o.fused_small_batch = fused;
    const std::string label = KvFormatName(*fmt) + (fused ? "" : " (cuBLAS)");
    auto engine = CudaEngine::CreateDummy(*shape, o, 1);
    BENCH_CHECK(engine.status());
    CudaEngine& e = **engine;
    BENCH_CHECK(e.FillKvCacheRandom(2));
    const int32_t num_blocks = e.options().num_gpu_blocks;
    const double kv_per_token = static_cast<double>(e.kv_bytes_per_block()) / o.engine.block_size;
    std::fprintf(stderr, "[%s] %d KV blocks (%.1f GiB), weights %.2f GiB, arena %.2f GiB\n",
                 KvFormatName(*fmt).c_str(), num_blocks, e.memory().kv / 1073741824.0,
                 e.memory().weights / 1073741824.0, e.memory().arena / 1073741824.0);
    cudaEvent_t e0, e1;
    BENCH_CUDA(cudaEventCreate(&e0));
    BENCH_CUDA(cudaEventCreate(&e1));
    std::mt19937 rng(5);
    // Decode step of `batch` sequences at position ctx - 1 (see the top comment).
    auto make_step = [&](int batch, int ctx) {
      const int nb = (ctx + 15) / 16;
      const int shared = num_blocks - batch;
      StepInput in;
      for (int i = 0; i < batch; ++i) {
        SeqStepInput s;
        s.tokens = {static_cast<int32_t>(rng() % shape->vocab_size)};
        s.start_pos = ctx - 1;
        for (int j = 0; j < nb - 1; ++j) s.block_table.push_back((int64_t{i} * (nb - 1) + j) % shared);
        s.block_table.push_back(shared + i);  // the written block is private
        s.logits = SeqStepInput::Logits::kNone;
        s.sample = true;
        in.seqs.push_back(std::move(s));
      }
      return in;
    };
    for (int ctx : ctxs) {
      for (int batch : batches_run) {
        const int nb = (ctx + 15) / 16;
        const int shared = num_blocks - batch;
        if (shared < nb) {
          std::fprintf(stderr, "skip batch %d ctx %d: too few blocks\n", batch, ctx);
          continue;
        }
        const StepInput in = make_step(batch, ctx);
        StepOutput out;
        for (int w = 0; w < warmup; ++w) BENCH_CHECK(e.Step(in, &out));
        std::vector<double> t, wall;
        for (int it = 0; it < iters; ++it) {
          const auto h0 = std::chrono::steady_clock::now();
          BENCH_CUDA(cudaEventRecord(e0, e.stream()));
          BENCH_CHECK(e.Step(in, &out));
          BENCH_CUDA(cudaEventRecord(e1, e.stream()));
          BENCH_CUDA(cudaEventSynchronize(e1));
          wall.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - h0).count());
          float ms = 0;
          BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
          t.push_back(ms);
          for (const auto& s : out.sampled) {
            if (s.token < 0 || s.token >= shape->vocab_size) {
              std::fprintf(stderr, "bad token %d\n", s.token);
              return 1;
            }
          }
        }
        const double bytes = static_cast<double>(e.weight_bytes_read_per_step()) +
                             static_cast<double>(batch) * ctx * kv_per_token;
        Row r{label, batch, ctx, Median(t), Median(wall), bytes / bw * 1e3,
              static_cast<double>(batch) * nb / num_blocks, 0};
        r.gbps = bytes / (r.ms * 1e-3) / 1e9;
        char line[256];
        std::snprintf(line, sizeof(line), "| %s | %d | %d | %.3f | %.3f | %.2f | %.0f | %.2f | %.3f |\n",
                      r.kv.c_str(), r.batch, r.ctx, r.ms, r.roof_ms, r.ms / r.roof_ms, r.gbps,
                      std::max(1.0, r.alias), r.wall_ms);
        md << line;
        std::printf("%s", line);
        std::fflush(stdout);
        rows.push_back(r);
      }
    }
    std::fprintf(stderr, "[%s] graphs captured %d, replays %lld\n", KvFormatName(*fmt).c_str(),
                 e.num_graphs(), static_cast<long long>(e.graph_replays()));
    // Where the time goes: eager steps with events between stages.
    for (int ctx : profile_ctxs) {
      for (int batch : profile_batches) {
        if (num_blocks - batch < (ctx + 15) / 16) continue;
        if (!fused && batch > cuda_ops::kGemvMaxM) continue;  // same path as the fused run
        const StepInput in = make_step(batch, ctx);
        StepOutput out;
        e.set_profile_stages(true);
        for (int w = 0; w < 2; ++w) BENCH_CHECK(e.Step(in, &out));
        e.ResetStageProfile();
        for (int it = 0; it < 5; ++it) BENCH_CHECK(e.Step(in, &out));
        e.set_profile_stages(false);
        std::ostringstream line;
        line << "| " << label << " | " << batch << " | " << ctx;
        double sum = 0;
        for (const auto& [stage, ms] : e.StageProfile()) {
          char buf[64];
          std::snprintf(buf, sizeof(buf), " | %s %.3f", stage.c_str(), ms);
          line << buf;
          sum += ms;
        }
        line << " | sum " << sum << " |\n";
        profile_md << line.str();
        std::printf("%s", line.str().c_str());
        std::fflush(stdout);
      }
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  }
  // int8 vs fp16 at the largest batch and context.
  const int bmax = *std::max_element(batches.begin(), batches.end());
  const int cmax = *std::max_element(ctxs.begin(), ctxs.end());
  double f16 = 0, i8 = 0;
  for (const Row& r : rows) {
    if (r.batch == bmax && r.ctx == cmax && r.kv == "fp16/none") f16 = r.ms;
    if (r.batch == bmax && r.ctx == cmax && r.kv == "int8/dynamic") i8 = r.ms;
  }
  if (f16 > 0 && i8 > 0) {
    md << "\nint8/fp16 step time at batch " << bmax << ", ctx " << cmax << ": " << i8 / f16 << "\n";
    std::printf("\nint8/fp16 step time at batch %d, ctx %d: %.3f\n", bmax, cmax, i8 / f16);
  }
  md << "\nStage breakdown (eager steps, CUDA events between stages, mean ms of 5 steps):\n\n"
     << profile_md.str();
  if (!markdown.empty()) std::ofstream(markdown) << md.str();
  return 0;
}
