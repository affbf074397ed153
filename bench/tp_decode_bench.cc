// Tensor-parallel decode step time of the CUDA engine: one thread per rank,
// rank r on GPU r, each a sharded CudaEngine (worker/shard.h) with NCCL
// between them (bootstrapped through an in-process store; the collectives
// and the engine are exactly what strata-worker runs). Dummy weights of a
// named shape, random KV contents, decode steps of `batch` sequences at
// context `ctx` (sequences share physical blocks when the pool is too small,
// as in gpu_decode_bench; each block read counts).
//
// Reports, per tp and KV dtype: the median step time on rank 0 (CUDA events
// around Engine::Step, graphs on), the ratio to tp=1, and the all-reduce share
// of an eager step (CUDA events between stages; the all-reduce stage includes
// waiting for the slowest rank).
//
// Caveat: NCCL between threads of one process is slower than between the
// server's worker processes (4 x H200, 64 decodes + 200 prompt tokens at
// tp=4: 18.7 ms here against 12.5 ms per step in the server, where a faster
// all-reduce changed nothing; bench/RESULTS.md, late night). Read the
// all-reduce share as an upper bound; measure serving with the server.
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/kv_format_util.h"
#include "worker/collectives_nccl.h"
#include "worker/cuda_engine.h"

namespace strata {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct Result {
  int tp = 0;
  std::string kv;
  double step_ms = 0, wall_ms = 0, allreduce_ms = 0, eager_ms = 0;
  std::vector<std::pair<std::string, double>> stages;  // eager step on rank 0, ms per stage
  int32_t blocks = 0;
  double alias = 1;
};

// One measurement: tp ranks, one KV format. Empty `error` on success.
Result RunOne(const ModelConfig& shape, int tp, const KvFormat& fmt, int batch, int ctx, int iters,
              int warmup, double util, int prefill, bool serialize_attention, std::string* error) {
  Result res;
  res.tp = tp;
  res.kv = KvFormatName(fmt);
  InMemoryKvStore store;
  std::vector<std::unique_ptr<CudaEngine>> engines(tp);
  std::vector<std::unique_ptr<NcclCollectives>> comms(tp);
  std::vector<int32_t> max_blocks(tp, 0);
  std::vector<std::string> errors(tp);
  std::barrier sync(tp);
  std::vector<double> step_ms, wall_ms;
  const int nb = (ctx + 15) / 16;
  auto rank_main = [&](int r) {
    // A failed rank leaves the barrier so the others do not wait for it (their
    // collectives then fail within the timeout).
    auto fail = [&](const absl::Status& s) {
      errors[r] = absl::StrCat("rank ", r, ": ", s.ToString());
      sync.arrive_and_drop();
    };
    if (cudaSetDevice(r) != cudaSuccess) return fail(absl::InternalError("cudaSetDevice"));
    CudaEngineOptions o;
    o.engine.kv_format = fmt;
    o.engine.block_size = 16;
    o.dtype = WeightDtype::kFp16;
    o.gpu_memory_utilization = util;
    o.max_num_seqs = batch + 1;
    o.max_logit_rows = batch + 1;
    o.max_num_tokens = std::max(2048, batch);
    o.device = r;
    o.shard = {r, tp};
    o.compute_logits = r == 0;
    o.defer_kv_allocation = true;
    o.overlap_mixed_attention = !serialize_attention;
    auto e = CudaEngine::CreateDummy(shape, o, 1);
    if (!e.ok()) return fail(e.status());
    engines[r] = std::move(*e);
    max_blocks[r] = engines[r]->max_gpu_blocks();
    if (tp > 1) {
      CollectivesOptions co;
      co.rank = r;
      co.world_size = tp;
      co.key_prefix = "bench/";
      co.timeout = absl::Seconds(30);
      co.cuda_device = r;
      co.cuda_stream = engines[r]->stream();
      auto c = CreateNcclCollectives(co, &store);
      if (!c.ok()) return fail(c.status());
      comms[r] = std::move(*c);
      engines[r]->set_collectives(comms[r].get());
    }
    sync.arrive_and_wait();
    const int32_t blocks = *std::min_element(max_blocks.begin(), max_blocks.end());
    if (blocks < batch + nb) return fail(absl::ResourceExhaustedError(absl::StrCat("only ", blocks, " KV blocks")));
    if (absl::Status s = engines[r]->AllocateKv(blocks, 0); !s.ok()) return fail(s);
    if (absl::Status s = engines[r]->FillKvCacheRandom(2); !s.ok()) return fail(s);
    if (r == 0) res.blocks = blocks, res.alias = std::max(1.0, static_cast<double>(batch) * nb / blocks);
    // The same step on every rank.
    std::mt19937 rng(5);
    const int shared = blocks - batch;
    StepInput in;
    for (int i = 0; i < batch; ++i) {
      SeqStepInput s;
      s.tokens = {static_cast<int32_t>(rng() % shape.vocab_size)};
      s.start_pos = ctx - 1;
      for (int j = 0; j < nb - 1; ++j) s.block_table.push_back((int64_t{i} * (nb - 1) + j) % shared);
      s.block_table.push_back(shared + i);
      s.sample = true;
      s.logits = SeqStepInput::Logits::kNone;
      in.seqs.push_back(std::move(s));
    }
    if (prefill > 0) {  // a mixed step: one more sequence with a prompt chunk
      SeqStepInput s;
      for (int j = 0; j < prefill; ++j) s.tokens.push_back(static_cast<int32_t>(rng() % shape.vocab_size));
      s.start_pos = 0;
      for (int j = 0; j < (prefill + 15) / 16; ++j) s.block_table.push_back(j % shared);
      s.sample = true;
      s.logits = SeqStepInput::Logits::kNone;
      in.seqs.push_back(std::move(s));
    }
    CudaEngine& eng = *engines[r];
    StepOutput out;
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int w = 0; w < warmup; ++w) {
      if (absl::Status s = eng.Step(in, &out); !s.ok()) return fail(s);
    }
    for (int it = 0; it < iters; ++it) {
      sync.arrive_and_wait();
      const auto h0 = std::chrono::steady_clock::now();
      cudaEventRecord(e0, eng.stream());
      if (absl::Status s = eng.Step(in, &out); !s.ok()) return fail(s);
      cudaEventRecord(e1, eng.stream());
      cudaEventSynchronize(e1);
      if (r == 0) {
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        step_ms.push_back(ms);
        wall_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - h0).count());
      }
    }
    // Eager steps with stage events: the all-reduce share.
    eng.set_profile_stages(true);
    for (int w = 0; w < 2; ++w) {
      if (absl::Status s = eng.Step(in, &out); !s.ok()) return fail(s);
    }
    eng.ResetStageProfile();
    for (int it = 0; it < 5; ++it) {
      sync.arrive_and_wait();
      if (absl::Status s = eng.Step(in, &out); !s.ok()) return fail(s);
    }
    if (r == 0) {
      res.stages = eng.StageProfile();
      for (const auto& [stage, ms] : res.stages) {
        res.eager_ms += ms;
        if (stage == "all_reduce") res.allreduce_ms += ms;
      }
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    sync.arrive_and_wait();
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < tp; ++r) threads.emplace_back(rank_main, r);
  for (auto& t : threads) t.join();
  for (const std::string& e : errors) {
    if (!e.empty()) *error = e;
  }
  engines.clear();  // engines before their communicators' streams go
  comms.clear();
  res.step_ms = Median(step_ms);
  res.wall_ms = Median(wall_ms);
  return res;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  using namespace strata;
  CLI::App app{"Tensor-parallel decode step benchmark (one process, one thread per GPU)"};
  std::string model = "llama-2-13b", tps_s = "1,2,4", kvs_s = "fp16,int8", markdown;
  int batch = 64, ctx = 2048, iters = 20, warmup = 3, layers = 0, prefill = 0;
  bool serialize_attention = false;
  double util = 0.9;
  app.add_option("--model", model, "named shape (NamedModelShape)");
  app.add_option("--tp", tps_s, "tensor-parallel sizes");
  app.add_option("--kv", kvs_s, "KV dtypes (default scale mode of each)");
  app.add_option("--batch", batch);
  app.add_option("--context", ctx);
  app.add_option("--iters", iters);
  app.add_option("--warmup", warmup);
  app.add_option("--gpu-memory-utilization", util);
  app.add_option("--layers", layers, "keep only this many decoder layers of the shape (0: all), to fit a "
                                     "large shape on fewer GPUs; the table says so");
  app.add_option("--prefill-tokens", prefill, "add a sequence with this many prompt tokens (a mixed "
                                             "step, which the engine runs eagerly: no CUDA graph)");
  app.add_flag("--serialize-mixed-attention", serialize_attention,
               "mixed steps: the prefill and the decode attention one after the other (default: side by "
               "side on two streams)");
  app.add_option("--markdown", markdown, "write the table here too");
  CLI11_PARSE(app, argc, argv);
  absl::StatusOr<ModelConfig> shape = NamedModelShape(model);
  if (!shape.ok()) {
    std::fprintf(stderr, "%s\n", shape.status().ToString().c_str());
    return 2;
  }
  const int all_layers = shape->num_layers;
  if (layers > 0) shape->num_layers = std::min(layers, all_layers);
  int gpus = 0;
  cudaGetDeviceCount(&gpus);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::ostringstream md;
  md << "Device: " << gpus << " x " << prop.name << "; model " << model
     << (shape->num_layers < all_layers ? absl::StrCat(" with ", shape->num_layers, " of ", all_layers, " layers")
                                        : std::string())
     << " (dummy fp16 weights), batch "
     << batch << ", context " << ctx
     << (prefill > 0 ? absl::StrCat(" + one sequence prefilling ", prefill, " tokens (mixed step, run eagerly; "
                                    "attention kernels ", serialize_attention ? "serialized" : "side by side", ")")
                     : std::string())
     << "; median of " << iters << " steps on rank 0" << (prefill > 0 ? "" : " (CUDA graphs)") << ", "
     << "all-reduce share from 5 eager steps\n\n";
  md << "| tp | kv | step ms | vs tp=1 | eager step ms | all-reduce ms (eager) | all-reduce share | KV blocks/rank | alias | host wall ms |\n";
  md << "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  std::printf("%s", md.str().c_str());
  std::fflush(stdout);
  int rc = 0;
  for (auto kv_name : absl::StrSplit(kvs_s, ',')) {
    absl::StatusOr<KvFormat> fmt = ParseKvFormat(std::string(kv_name), "", WeightDtype::kFp16);
    if (!fmt.ok()) {
      std::fprintf(stderr, "%s\n", fmt.status().ToString().c_str());
      return 2;
    }
    double base = 0;
    std::vector<Result> done;
    for (auto tp_s : absl::StrSplit(tps_s, ',')) {
      const int tp = std::stoi(std::string(tp_s));
      if (tp > gpus) {
        std::fprintf(stderr, "skip tp=%d: %d GPU(s)\n", tp, gpus);
        continue;
      }
      std::string error;
      const Result r = RunOne(*shape, tp, *fmt, batch, ctx, iters, warmup, util, prefill,
                                serialize_attention, &error);
      if (!error.empty()) {
        std::fprintf(stderr, "tp=%d %s: %s\n", tp, r.kv.c_str(), error.c_str());
        rc = 1;
        continue;
      }
      if (tp == 1) base = r.step_ms;
      char line[320];
      std::snprintf(line, sizeof(line), "| %d | %s | %.3f | %s | %.3f | %.3f | %.1f%% | %d | %.2f | %.3f |\n", tp,
                    r.kv.c_str(), r.step_ms, base > 0 ? absl::StrCat(r.step_ms / base).substr(0, 5).c_str() : "-",
                    r.eager_ms, r.allreduce_ms, r.eager_ms > 0 ? 100.0 * r.allreduce_ms / r.eager_ms : 0.0, r.blocks, r.alias,
                    r.wall_ms);
      md << line;
      std::printf("%s", line);
      std::fflush(stdout);
      done.push_back(r);
    }
    // Where the eager step's time goes, per tp: which stages shrink with the shards.
    if (!done.empty()) {
      std::ostringstream t;
      t << "\n| " << kv_name << " eager step, ms per stage (rank 0) |";
      for (const Result& r : done) t << " tp=" << r.tp << " |";
      t << "\n|---|";
      for (size_t i = 0; i < done.size(); ++i) t << "---:|";
      t << "\n";
      std::vector<std::string> names;  // every stage, in the order the ranks run them
      for (const Result& r : done) {
        for (const auto& st : r.stages) {
          if (std::find(names.begin(), names.end(), st.first) == names.end()) names.push_back(st.first);
        }
      }
      for (const std::string& name : names) {
        t << "| " << name << " |";
        for (const Result& r : done) {
          double ms = 0;
          for (const auto& st : r.stages) {
            if (st.first == name) ms += st.second;
          }
          char v[32];
          std::snprintf(v, sizeof(v), " %.3f |", ms);
          t << v;
        }
        t << "\n";
      }
      md << t.str();
      std::printf("%s", t.str().c_str());
      std::fflush(stdout);
    }
  }
  if (!markdown.empty()) std::ofstream(markdown) << md.str();
  return rc;
}
