// Control-plane overhead per step: decode steps through RemoteEngine over real
// strata-worker processes (loopback gRPC streams, Gloo between ranks), next to
// the same steps on an in-process CpuEngine.
//
//   build/scheduler/... control_plane_bench [--tp 1,2] [--batch 1,8] [--steps 40]
//
// Per configuration it prints medians over the decode steps:
//   in-proc   CpuEngine::Step in this process (tp=1, same total threads)
//   wall      RemoteEngine::Step on the scheduler
//   worker    slowest rank, from the step message's arrival to its reply
//   engine    slowest rank, the forward pass alone (all-reduces included)
//   control   wall - worker: transport, (de)serialization and thread wake-ups,
//             i.e. what the control plane adds to a step
// in two reply modes: "logits" (rank 0 returns the last row's logits, as
// EngineLoop samples on the scheduler today) and "sampled" (rank 0 samples and
// returns token ids only).
//
//   control_plane_bench --codec [--batch 256,1024] [--context 600] [--steps 40]
// times only the step's wire form on this machine, no workers: building the
// Step message (StepToProto), its one serialization, a worker's parse and
// StepFromProto, for a decode step of each batch size whose sequences hold
// --context tokens (block tables of 16-token blocks); medians over --steps.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "runtime/model_config.h"
#include "runtime/weights.h"
#include "scheduler/worker_pool.h"
#include "worker/cpu_engine.h"
#include "worker/worker_wire.h"

extern "C" void openblas_set_num_threads(int num_threads);

namespace strata {
namespace {

struct Config {
  std::string worker_binary = STRATA_WORKER_BINARY;
  std::string shape = "stories15m";
  std::vector<int> tps = {1, 2};
  std::vector<int> batches = {1, 8};
  int steps = 40;
  int context = 64;
  int threads = 1;  // per worker; the in-process engine gets threads * tp
};

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// B sequences with `context` cached tokens, then decode steps.
struct Workload {
  StepInput prefill;
  std::vector<StepInput> decodes;
};

Workload MakeWorkload(int batch, int context, int steps, int block_size, bool sample, int vocab) {
  Workload w;
  const int blocks_per_seq = (context + steps + block_size - 1) / block_size;
  for (int b = 0; b < batch; ++b) {
    SeqStepInput s;
    for (int t = 0; t < context; ++t) s.tokens.push_back((17 * b + 31 * t) % vocab);
    s.start_pos = 0;
    for (int k = 0; k < blocks_per_seq; ++k) s.block_table.push_back(b * blocks_per_seq + k);
    s.logits = SeqStepInput::Logits::kNone;
    w.prefill.seqs.push_back(s);
  }
  for (int i = 0; i < steps; ++i) {
    StepInput in;
    for (int b = 0; b < batch; ++b) {
      SeqStepInput s;
      s.tokens = {(7 * i + b) % vocab};
      s.start_pos = context + i;
      s.block_table = w.prefill.seqs[b].block_table;
      s.logits = sample ? SeqStepInput::Logits::kNone : SeqStepInput::Logits::kLast;
      s.sample = sample;
      in.seqs.push_back(std::move(s));
    }
    w.decodes.push_back(std::move(in));
  }
  return w;
}

int Run(const Config& cfg) {
  auto shape = NamedModelShape(cfg.shape);
  if (!shape.ok()) {
    std::fprintf(stderr, "%s\n", shape.status().ToString().c_str());
    return 2;
  }
  if (cfg.context + cfg.steps > shape->max_position_embeddings) {
    std::fprintf(stderr, "--context + --steps must stay within the model's %d positions\n",
                 shape->max_position_embeddings);
    return 2;
  }
  const int block_size = 16;
  const int max_batch = *std::max_element(cfg.batches.begin(), cfg.batches.end());
  const int blocks = max_batch * ((cfg.context + cfg.steps + block_size - 1) / block_size);
  std::printf("control-plane overhead per decode step: model shape %s (dummy weights), context %d, %d steps, "
              "%d thread(s) per worker, medians in microseconds\n",
              cfg.shape.c_str(), cfg.context, cfg.steps, cfg.threads);
  std::printf("%-3s %-6s %-8s %10s %10s %10s %10s %10s %12s\n", "tp", "batch", "reply", "in-proc", "wall", "worker",
              "engine", "control", "reply bytes");
  for (int tp : cfg.tps) {
    // The in-process reference with the same total threads.
    omp_set_num_threads(cfg.threads * tp);
    openblas_set_num_threads(cfg.threads * tp);
    EngineOptions eo;
    eo.block_size = block_size;
    eo.num_gpu_blocks = blocks;
    auto local = CpuEngine::Create(RandomWeights(*shape, 1), eo);
    if (!local.ok()) {
      std::fprintf(stderr, "%s\n", local.status().ToString().c_str());
      return 1;
    }
    WorkerPoolOptions o;
    o.worker_binary = cfg.worker_binary;
    o.engine.world_size = tp;
    o.engine.load_format = "dummy";
    o.engine.dummy_shape = cfg.shape;
    o.engine.dummy_seed = 1;
    o.engine.block_size = block_size;
    // The setup step prefills batch x context tokens at once (minutes on a
    // small CPU at long contexts); the decode steps measured are short.
    o.engine.step_timeout = absl::Minutes(30);
    o.num_kv_blocks = blocks;
    o.num_swap_blocks = 0;
    o.threads_per_worker = cfg.threads;
    auto pool = WorkerPool::Start(o);
    if (!pool.ok()) {
      std::fprintf(stderr, "%s\n", pool.status().ToString().c_str());
      return 1;
    }
    auto engine = (*pool)->WaitReady(absl::Seconds(120));
    if (!engine.ok()) {
      std::fprintf(stderr, "%s\n", engine.status().ToString().c_str());
      return 1;
    }
    for (int batch : cfg.batches) {
      for (bool sample : {false, true}) {
        const Workload w = MakeWorkload(batch, cfg.context, cfg.steps, block_size, sample, shape->vocab_size);
        StepOutput out;
        std::vector<double> in_proc, wall, worker, engine_us, control;
        size_t reply_bytes = 0;
        // In process (sampling is not the engine's: it returns logits either way).
        absl::Status s = (*local)->Step(w.prefill, &out);
        if (!s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          return 1;
        }
        for (const StepInput& in : w.decodes) {
          StepInput x = in;
          for (auto& s : x.seqs) s.logits = SeqStepInput::Logits::kLast;
          const auto t0 = std::chrono::steady_clock::now();
          if (!(*local)->Step(x, &out).ok()) return 1;  // the same steps passed above
          in_proc.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
        }
        // Remote.
        s = (*engine)->Step(w.prefill, &out);
        if (!s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          return 1;
        }
        for (const StepInput& in : w.decodes) {
          s = (*engine)->Step(in, &out);
          if (!s.ok()) {
            std::fprintf(stderr, "%s\n", s.ToString().c_str());
            return 1;
          }
          const RemoteStepTimings t = (*engine)->last_timings();
          wall.push_back(t.wall_us);
          worker.push_back(t.worker_us);
          engine_us.push_back(t.engine_us);
          control.push_back(t.wall_us - t.worker_us);
          reply_bytes = out.logits.size() * sizeof(float) + out.sampled.size() * 8;
        }
        std::printf("%-3d %-6d %-8s %10.0f %10.0f %10.0f %10.0f %10.0f %12zu\n", tp, batch,
                    sample ? "sampled" : "logits", Median(in_proc), Median(wall), Median(worker),
                    Median(engine_us), Median(control), reply_bytes);
        std::fflush(stdout);
      }
    }
    (*pool)->Shutdown();
  }
  return 0;
}

int RunCodec(const Config& cfg) {
  std::printf("step wire form: decode steps, %d cached tokens per sequence (16-token blocks), "
              "median of %d, microseconds\n\n", cfg.context, cfg.steps);
  std::printf("| batch | bytes | build | serialize | parse | StepFromProto | total |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|\n");
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto us = [](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count(); };
  for (int batch : cfg.batches) {
    const Workload w = MakeWorkload(batch, cfg.context, 1, 16, /*sample=*/true, 32000);
    const StepInput& in = w.decodes[0];
    worker::v1::Step step, parsed;  // reused, as RemoteEngine and the worker do
    StepInput out;
    std::string bytes;
    std::vector<double> build, ser, parse, from, total;
    for (int i = 0; i < cfg.steps; ++i) {
      const auto t0 = now();
      step.Clear();
      StepToProto(i, in, &step);
      const auto t1 = now();
      bytes.clear();
      if (!step.SerializeToString(&bytes)) return 1;
      const auto t2 = now();
      if (!parsed.ParseFromString(bytes)) return 1;
      const auto t3 = now();
      const absl::Status st = StepFromProto(parsed, &out);
      const auto t4 = now();
      if (!st.ok() || out.seqs.size() != in.seqs.size()) {
        std::fprintf(stderr, "round trip failed: %s\n", st.ToString().c_str());
        return 1;
      }
      build.push_back(us(t0, t1)), ser.push_back(us(t1, t2)), parse.push_back(us(t2, t3));
      from.push_back(us(t3, t4)), total.push_back(us(t0, t4));
    }
    std::printf("| %d | %zu | %.0f | %.0f | %.0f | %.0f | %.0f |\n", batch, bytes.size(), Median(build),
                Median(ser), Median(parse), Median(from), Median(total));
  }
  return 0;
}

std::vector<int> ParseList(const std::string& s) {
  std::vector<int> out;
  for (absl::string_view p : absl::StrSplit(s, ',')) {
    int v = 0;
    if (absl::SimpleAtoi(p, &v) && v > 0) out.push_back(v);
  }
  return out;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::Config cfg;
  std::string tps = "1,2", batches = "1,8";
  CLI::App app{"control-plane overhead per step (RemoteEngine over strata-worker processes)"};
  app.add_option("--worker-binary", cfg.worker_binary, "strata-worker executable");
  app.add_option("--shape", cfg.shape, "named model shape with dummy weights (stories15m, llama-2-7b, ...)");
  app.add_option("--tp", tps, "comma-separated tensor-parallel sizes");
  app.add_option("--batch", batches, "comma-separated decode batch sizes");
  app.add_option("--steps", cfg.steps, "decode steps per configuration")->check(CLI::PositiveNumber);
  app.add_option("--context", cfg.context, "tokens cached per sequence before decoding")->check(CLI::PositiveNumber);
  app.add_option("--threads", cfg.threads, "threads per worker")->check(CLI::PositiveNumber);
  bool codec = false;
  app.add_flag("--codec", codec, "only the step's wire form: build, serialize, parse, convert (no workers)");
  CLI11_PARSE(app, argc, argv);
  cfg.tps = strata::ParseList(tps);
  cfg.batches = strata::ParseList(batches);
  if (cfg.tps.empty() || cfg.batches.empty()) {
    std::fprintf(stderr, "--tp and --batch need positive integers\n");
    return 2;
  }
  return codec ? strata::RunCodec(cfg) : strata::Run(cfg);
}
