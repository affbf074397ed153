// Scheduler core benchmark: CPU time per schedule step at 256 and 1024
// running sequences, and KV capacity per GiB of each KV format relative to
// fp16 for a LLaMA-7B shape. Prints measured numbers; it is not a test.
//
//   scheduler_bench [--steps 300] [--seqs 256,1024]
#include <time.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "runtime/kv_capacity.h"
#include "scheduler/scheduler_core.h"

using namespace strata;

namespace {

double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

const char* FormatName(KvFormat f) {
  static const char* kDtype[] = {"fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4"};
  static const char* kScale[] = {"", "/static", "/dynamic"};
  static char buf[64];
  std::snprintf(buf, sizeof(buf), "%s%s", kDtype[static_cast<int>(f.dtype)],
                kScale[static_cast<int>(f.scale_mode)]);
  return buf;
}

enum class Scenario { kDecode, kChurn, kPreempt };
const char* ScenarioName(Scenario s) {
  switch (s) {
    case Scenario::kDecode: return "steady decode";
    case Scenario::kChurn: return "churn (arrivals, chunked prefill, finishes)";
    case Scenario::kPreempt: return "over-subscribed (swap preemption)";
  }
  return "?";
}

struct StepTimes {
  double schedule_us = 0, result_us = 0;
  double tokens_per_step = 0;
  int64_t preemptions = 0;
  int32_t running = 0;
};

StepTimes RunScenario(Scenario sc, int32_t n, int32_t steps) {
  const int32_t kBlock = 16, kPrompt = 512, kShared = 256;
  SchedulerOptions o;
  o.max_num_seqs = n;
  o.max_num_batched_tokens = n + 2048;
  o.max_model_len = 4096;
  o.preemption_mode = PreemptionMode::kSwap;
  o.blocks.block_size = kBlock;
  const int32_t per_seq_blocks = (kPrompt + steps + 64 + 512) / kBlock + 1;
  o.blocks.num_gpu_blocks = sc == Scenario::kPreempt ? n * (kPrompt / kBlock) * 6 / 10 + 64
                                                     : n * per_seq_blocks;
  o.blocks.num_cpu_blocks = n * per_seq_blocks;
  o.blocks.hash_seed = PrefixHashSeed("llama-7b", {KvDtype::kInt8, KvScaleMode::kDynamic});
  auto sched = Scheduler::Create(o).value();
  std::mt19937 rng(1);
  std::vector<int32_t> shared(kShared);
  for (auto& t : shared) t = static_cast<int32_t>(rng() % 32000) + 1;
  int64_t next_req = 0;
  auto add = [&](int32_t max_tokens) {
    SchedRequest r;
    r.request_id = RequestId(next_req++);
    r.prompt = shared;
    while (static_cast<int32_t>(r.prompt.size()) < kPrompt) {
      r.prompt.push_back(static_cast<int32_t>(rng() % 32000) + 1);
    }
    r.max_tokens = max_tokens;
    r.stop_token_ids = {0};
    (void)sched->AddRequest(std::move(r)).value();
  };
  auto step = [&](StepTimes* t) {
    const double t0 = ThreadCpuSeconds();
    StepPlan plan = sched->Schedule();
    const double t1 = ThreadCpuSeconds();
    StepResult r{plan.step_id, {}};
    r.sampled.reserve(plan.seqs.size());
    for (const ScheduledSeq& e : plan.seqs) {
      if (e.needs_logits) r.sampled.push_back({e.seq_id, static_cast<int32_t>(rng() % 31999) + 1});
    }
    const double t2 = ThreadCpuSeconds();
    (void)sched->OnStepResult(r).value();
    const double t3 = ThreadCpuSeconds();
    if (t != nullptr) {
      t->schedule_us += (t1 - t0) * 1e6;
      t->result_us += (t3 - t2) * 1e6;
      t->tokens_per_step += plan.num_tokens;
    }
  };
  const bool churn = sc == Scenario::kChurn;
  for (int32_t i = 0; i < n; ++i) add(churn ? 32 + static_cast<int32_t>(rng() % 224) : 100000);
  // Warm up: prefill everything (the preempt scenario keeps preempting).
  for (int guard = 0; guard < 400 && sched->Stats().num_waiting > 0; ++guard) step(nullptr);
  const int64_t preempt0 =
      sched->Stats().preemptions_swap + sched->Stats().preemptions_recompute;
  StepTimes t;
  for (int32_t i = 0; i < steps; ++i) {
    if (churn) {
      const SchedulerStats s = sched->Stats();
      for (int32_t k = s.num_running + s.num_waiting; k < n; ++k) add(32 + static_cast<int32_t>(rng() % 224));
    }
    step(&t);
  }
  t.schedule_us /= steps;
  t.result_us /= steps;
  t.tokens_per_step /= steps;
  t.preemptions = sched->Stats().preemptions_swap + sched->Stats().preemptions_recompute - preempt0;
  t.running = sched->Stats().num_running;
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Scheduler core benchmark"};
  int32_t steps = 300;
  std::vector<int32_t> seqs = {256, 1024};
  app.add_option("--steps", steps, "measured steps per scenario")->capture_default_str();
  app.add_option("--seqs", seqs, "running sequences")->delimiter(',')->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  std::printf("== CPU time per schedule step (block size 16, prompt 512 with a shared 256-token "
              "prefix, prefix caching on) ==\n");
  std::printf("%-44s %6s %8s %12s %14s %11s %12s\n", "scenario", "seqs", "running",
              "Schedule us", "OnStepResult us", "total ms", "tokens/step");
  bool ok = true;
  for (const Scenario sc : {Scenario::kDecode, Scenario::kChurn, Scenario::kPreempt}) {
    for (const int32_t n : seqs) {
      const StepTimes t = RunScenario(sc, n, steps);
      const double total_ms = (t.schedule_us + t.result_us) / 1000.0;
      std::printf("%-44s %6d %8d %12.1f %14.1f %11.3f %12.1f", ScenarioName(sc), n, t.running,
                  t.schedule_us, t.result_us, total_ms, t.tokens_per_step);
      if (sc == Scenario::kPreempt) std::printf("  (%lld preemptions)", (long long)t.preemptions);
      if (sc == Scenario::kDecode && n == 1024) {
        std::printf("  target <= 1 ms: %s", total_ms <= 1.0 ? "met" : "MISSED");
        ok = ok && total_ms <= 1.0;
      }
      std::printf("\n");
    }
  }

  std::printf("\n== KV capacity, LLaMA-7B shape: 32 layers, 32 kv heads, head_dim 128, block 16 "
              "(scales and zero points counted) ==\n");
  std::printf("%-18s %14s %16s %10s %10s\n", "kv format", "bytes/block", "tokens/GiB",
              "vs fp16", "target");
  const KvCacheShape fp16{{KvDtype::kFp16, KvScaleMode::kNone}, 16, 32, 128, 32};
  const double base = KvTokensPerGiB(fp16);
  for (int d = 0; d <= static_cast<int>(KvDtype::kInt4); ++d) {
    for (int m = 0; m <= static_cast<int>(KvScaleMode::kDynamic); ++m) {
      const KvFormat f{static_cast<KvDtype>(d), static_cast<KvScaleMode>(m)};
      if (!KvFormatSupported(f)) continue;
      const KvCacheShape shape{f, 16, 32, 128, 32};
      const double ratio = KvTokensPerGiB(shape) / base;
      double target = 0;
      if (KvDtypeBits(f.dtype) == 8) target = 1.94;
      if (KvDtypeBits(f.dtype) == 4) target = 3.7;
      std::printf("%-18s %14lld %16.0f %9.3fx", FormatName(f), (long long)KvBytesPerBlock(shape),
                  KvTokensPerGiB(shape), ratio);
      if (target > 0) {
        std::printf("  >= %.2fx %s", target, ratio >= target ? "met" : "MISSED");
        ok = ok && ratio >= target;
      }
      std::printf("\n");
    }
  }
  return ok ? 0 : 1;
}
