// Randomized soak of the scheduler + block manager against a fake worker that
// shadows cache contents. Fixed seeds; every step checks the invariants and
// what each sequence reads. Also proves the checks can fail: deliberate
// accounting bugs (fault injection) and a corrupted plan must be caught.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/kv_capacity.h"
#include "runtime/status_macros.h"
#include "scheduler/sched_fake_worker.h"
#include "scheduler/scheduler_core.h"

namespace strata {
namespace {

struct SoakConfig {
  uint64_t seed = 1;
  KvFormat format{KvDtype::kFp16, KvScaleMode::kNone};
  int32_t block_size = 4;
  PreemptionMode mode = PreemptionMode::kAuto;
  bool prefix_caching = true;
  int64_t steps = 2000;             // steps with arrivals; then the queue drains
  int32_t gpu_budget_fp16_blocks = 20;  // byte budgets, in fp16 blocks of this shape
  int32_t cpu_budget_fp16_blocks = 10;
  BlockFault fault;
  std::function<void(StepPlan*)> corrupt_plan;  // breaks plans to prove the worker notices
};

struct SoakOutcome {
  absl::Status status;  // first failure, OK if none
  int64_t steps = 0, seqs_created = 0, finished = 0, aborted = 0, rejected = 0, forks = 0;
  int32_t num_gpu_blocks = 0;
  SchedulerStats stats;
  int64_t slots_verified = 0;
};

struct SeqInfo {
  SeqMirror mirror;
  RequestId request;
  int32_t prompt_len = 0, max_tokens = 0;
  std::vector<int32_t> stop;
};

constexpr int32_t kVocab = 24;  // token 0 is the stop token of requests that have one

SoakOutcome RunSoak(const SoakConfig& c) {
  SoakOutcome out;
  std::mt19937_64 rng(c.seed);
  auto uniform = [&rng](int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  auto chance = [&rng](double p) { return std::bernoulli_distribution(p)(rng); };

  const KvCacheShape shape{c.format, c.block_size, 2, 16, 2};
  const KvCacheShape fp16{{KvDtype::kFp16, KvScaleMode::kNone}, c.block_size, 2, 16, 2};
  const KvPoolPlan pools =
      PlanKvPools({KvBytesPerBlock(fp16) * c.gpu_budget_fp16_blocks,
                   KvBytesPerBlock(fp16) * c.cpu_budget_fp16_blocks},
                  shape)
          .value();
  SchedulerOptions o;
  o.max_num_seqs = static_cast<int32_t>(uniform(2, 12));
  o.max_num_batched_tokens = static_cast<int32_t>(uniform(c.block_size, 48));
  o.max_prefill_chunk = chance(0.3) ? static_cast<int32_t>(uniform(1, 8)) : 0;
  o.max_model_len = 72;
  o.preemption_mode = c.mode;
  o.auto_recompute_max_tokens = static_cast<int32_t>(uniform(0, 24));
  o.watermark = chance(0.5) ? 0.0 : 0.05;
  o.slot_mapping_pad_multiple = chance(0.5) ? 1 : 8;
  o.blocks.num_gpu_blocks = pools.num_gpu_blocks;
  o.blocks.num_cpu_blocks = pools.num_cpu_blocks;
  o.blocks.block_size = c.block_size;
  o.blocks.enable_prefix_caching = c.prefix_caching;
  o.blocks.hash_seed = PrefixHashSeed("soak-model", c.format);
  o.blocks.bytes_per_block = pools.bytes_per_block;
  o.blocks.fault = c.fault;
  out.num_gpu_blocks = pools.num_gpu_blocks;
  auto created = Scheduler::Create(o);
  if (!created.ok()) {
    out.status = created.status();
    return out;
  }
  Scheduler& sched = **created;
  FakeWorker worker(pools.num_gpu_blocks, pools.num_cpu_blocks, c.block_size);
  absl::flat_hash_map<SeqId, SeqInfo> seqs;
  std::vector<SeqId> live;  // for random picks; rebuilt lazily
  auto lookup = [&seqs](SeqId s) -> const SeqMirror* {
    auto it = seqs.find(s);
    return it == seqs.end() ? nullptr : &it->second.mirror;
  };
  auto pick_live = [&]() -> SeqId {
    live.clear();
    for (const auto& [id, info] : seqs) live.push_back(id);
    std::sort(live.begin(), live.end());  // hash-map order is not deterministic
    return live.empty() ? SeqId() : live[uniform(0, static_cast<int64_t>(live.size()) - 1)];
  };
  auto fail = [&out](int64_t step, auto... parts) {
    out.status = absl::InternalError(absl::StrCat("step ", step, ": ", parts...));
    return out;
  };
  auto abort_random = [&](int64_t step) -> absl::Status {
    const SeqId victim = pick_live();
    if (!victim.valid()) return absl::OkStatus();
    const RequestId req = seqs[victim].request;
    if (chance(0.5)) {
      RETURN_IF_ERROR(sched.Abort(victim));
      seqs.erase(victim);
      ++out.aborted;
    } else {
      RETURN_IF_ERROR(sched.Abort(req));
      for (auto it = seqs.begin(); it != seqs.end();) {
        if (it->second.request == req) {
          seqs.erase(it++);
          ++out.aborted;
        } else {
          ++it;
        }
      }
    }
    if (sched.HasSeq(victim)) return absl::InternalError("aborted sequence still scheduled");
    return absl::OkStatus();
  };

  // Shared system prompts give prefix-cache hits (and full hits).
  std::vector<std::vector<int32_t>> prefixes(4);
  for (auto& p : prefixes) {
    p.resize(uniform(c.block_size, 3 * c.block_size));
    for (auto& t : p) t = static_cast<int32_t>(uniform(1, kVocab - 1));
  }
  int64_t next_request = 0;
  const int64_t max_steps = c.steps + 20000;
  int64_t step = 0;
  for (; step < max_steps; ++step) {
    const bool arriving = step < c.steps;
    // Arrivals, while the queue is not too long.
    const int n_new = arriving && sched.Stats().num_waiting < 6 ? (chance(0.35) ? 1 : 0) + (chance(0.05) ? 2 : 0) : 0;
    for (int k = 0; k < n_new; ++k) {
      SchedRequest r;
      r.request_id = RequestId(next_request++);
      if (chance(0.6)) r.prompt = prefixes[uniform(0, 3)];
      const int64_t tail = chance(0.2) ? 0 : uniform(1, 3 * c.block_size);
      for (int64_t i = 0; i < tail || r.prompt.empty(); ++i) {
        r.prompt.push_back(static_cast<int32_t>(uniform(1, kVocab - 1)));
      }
      r.max_tokens = static_cast<int32_t>(chance(0.03) ? uniform(1, 400) : uniform(1, 40));
      if (chance(0.5)) r.stop_token_ids = {0};
      // The test's own prediction of the admission decision.
      const int64_t plen = static_cast<int64_t>(r.prompt.size());
      const int64_t max_len = std::min<int64_t>(plen + r.max_tokens, o.max_model_len);
      absl::StatusCode want = absl::StatusCode::kOk;
      if (plen >= o.max_model_len) {
        want = absl::StatusCode::kInvalidArgument;
      } else if ((max_len - 1 + c.block_size - 1) / c.block_size > pools.num_gpu_blocks) {
        want = absl::StatusCode::kResourceExhausted;
      }
      SeqInfo info;
      for (int32_t t : r.prompt) info.mirror.Append(t);
      info.request = r.request_id;
      info.prompt_len = static_cast<int32_t>(plen);
      info.max_tokens = r.max_tokens;
      info.stop = r.stop_token_ids;
      auto id = sched.AddRequest(std::move(r));
      if (id.status().code() != want) return fail(step, "admission: got ", id.status().ToString());
      if (!id.ok()) {
        ++out.rejected;
        continue;
      }
      seqs[*id] = std::move(info);
      ++out.seqs_created;
    }
    if (chance(0.01)) {
      if (absl::Status s = abort_random(step); !s.ok()) return fail(step, s.ToString());
    }
    if (chance(0.02)) {  // parallel sampling: fork a random sequence
      const SeqId parent = pick_live();
      if (parent.valid()) {
        const SeqInfo& p = seqs[parent];
        std::optional<int32_t> replace;
        if (static_cast<int32_t>(p.mirror.tokens.size()) > p.prompt_len && chance(0.7)) {
          replace = static_cast<int32_t>(uniform(1, kVocab - 1));
        }
        auto child = sched.Fork(parent, replace);
        if (child.ok()) {
          SeqInfo ci = p;
          if (replace) ci.mirror.ReplaceLast(*replace);
          seqs[*child] = std::move(ci);
          ++out.forks;
          ++out.seqs_created;
        } else if (child.status().code() != absl::StatusCode::kFailedPrecondition &&
                   child.status().code() != absl::StatusCode::kResourceExhausted) {
          return fail(step, "fork: ", child.status().ToString());
        }
      }
    }

    StepPlan plan = sched.Schedule();
    if (!plan.swap_out.empty() && !plan.swap_in.empty()) return fail(step, "swap-in while preempting");
    if (!plan.empty() && plan.seqs.empty()) return fail(step, "block moves without a sequence");
    if (c.corrupt_plan) c.corrupt_plan(&plan);
    if (absl::Status s = sched.CheckInvariants(); !s.ok()) return fail(step, "after Schedule: ", s.ToString());
    if (absl::Status s = worker.Execute(plan, lookup); !s.ok()) return fail(step, s.ToString());
    if (chance(0.01)) {  // cancellation while the step runs
      if (absl::Status s = abort_random(step); !s.ok()) return fail(step, s.ToString());
    }
    StepResult result{plan.step_id, {}};
    std::vector<SeqId> sampled_seqs;
    for (const ScheduledSeq& e : plan.seqs) {
      if (!e.needs_logits) continue;
      const int32_t tok = static_cast<int32_t>(uniform(0, kVocab - 1));
      auto it = seqs.find(e.seq_id);
      if (it == seqs.end()) {
        if (chance(0.5)) result.sampled.push_back({e.seq_id, tok});  // aborted: optional
        continue;
      }
      result.sampled.push_back({e.seq_id, tok});
      it->second.mirror.Append(tok);
      sampled_seqs.push_back(e.seq_id);
    }
    auto finished = sched.OnStepResult(result);
    if (!finished.ok()) return fail(step, "OnStepResult: ", finished.status().ToString());
    for (const FinishedSeq& f : *finished) {
      auto it = seqs.find(f.seq_id);
      if (it == seqs.end()) return fail(step, "unknown sequence finished");
      const SeqInfo& info = it->second;
      const auto& toks = info.mirror.tokens;
      const bool stopped = std::count(info.stop.begin(), info.stop.end(), toks.back()) > 0;
      const int32_t outputs = static_cast<int32_t>(toks.size()) - info.prompt_len;
      const bool length = outputs >= info.max_tokens || static_cast<int32_t>(toks.size()) >= o.max_model_len;
      if ((f.reason == FinishReason::kStop) != stopped || (!stopped && !length)) {
        return fail(step, "sequence ", f.seq_id.value(), " finished for the wrong reason");
      }
      if (!std::equal(f.output_tokens.begin(), f.output_tokens.end(), toks.begin() + info.prompt_len,
                      toks.end())) {
        return fail(step, "sequence ", f.seq_id.value(), " reports other output tokens");
      }
      seqs.erase(it);
      ++out.finished;
    }
    for (const SeqId s : sampled_seqs) {  // whatever should have finished did
      auto it = seqs.find(s);
      if (it == seqs.end()) continue;
      const SeqInfo& info = it->second;
      const auto& toks = info.mirror.tokens;
      if (std::count(info.stop.begin(), info.stop.end(), toks.back()) ||
          static_cast<int32_t>(toks.size()) - info.prompt_len >= info.max_tokens ||
          static_cast<int32_t>(toks.size()) >= o.max_model_len) {
        return fail(step, "sequence ", s.value(), " should have finished");
      }
    }
    if (sched.num_seqs() != static_cast<int32_t>(seqs.size())) {
      return fail(step, "scheduler has ", sched.num_seqs(), " sequences, test expects ", seqs.size());
    }
    if (absl::Status s = sched.CheckInvariants(); !s.ok()) return fail(step, s.ToString());
    if (!arriving && seqs.empty()) break;
  }
  out.steps = step + 1;
  out.stats = sched.Stats();
  out.slots_verified = worker.slots_verified();
  if (!seqs.empty()) return fail(step, seqs.size(), " sequences never finished (livelock)");
  if (out.stats.blocks.gpu_used != 0 || out.stats.blocks.cpu_used != 0) {
    return fail(step, "blocks still in use after drain: gpu ", out.stats.blocks.gpu_used, " cpu ",
                out.stats.blocks.cpu_used);
  }
  if (out.finished + out.aborted != out.seqs_created) {
    return fail(step, "created ", out.seqs_created, " sequences, finished ", out.finished,
                " + aborted ", out.aborted);
  }
  return out;
}

std::vector<KvFormat> SupportedFormats() {
  std::vector<KvFormat> f;
  for (int d = 0; d <= static_cast<int>(KvDtype::kInt4); ++d) {
    for (int m = 0; m <= static_cast<int>(KvScaleMode::kDynamic); ++m) {
      const KvFormat k{static_cast<KvDtype>(d), static_cast<KvScaleMode>(m)};
      if (KvFormatSupported(k)) f.push_back(k);
    }
  }
  return f;
}

TEST(SchedulerSoakTest, AllKvFormatsAllPreemptionModes) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<KvFormat> formats = SupportedFormats();
  ASSERT_EQ(formats.size(), 10u);
  int64_t total_steps = 0, swaps = 0, recomputes = 0, cow = 0, hits = 0, aborted = 0, forks = 0,
          finished = 0, rejected = 0, evictions = 0, verified = 0, swap_ins = 0;
  uint64_t seed = 1000;
  for (const KvFormat f : formats) {
    for (const PreemptionMode mode :
         {PreemptionMode::kRecompute, PreemptionMode::kSwap, PreemptionMode::kAuto}) {
      for (const int32_t bs : {4, 8}) {
        SoakConfig c;
        c.seed = ++seed;
        c.format = f;
        c.mode = mode;
        c.block_size = bs;
        c.prefix_caching = seed % 4 != 0;
        c.steps = 5000;
        c.gpu_budget_fp16_blocks = bs == 4 ? 24 : 12;
        c.cpu_budget_fp16_blocks = static_cast<int32_t>(seed % 3) * 6;
        SCOPED_TRACE(absl::StrCat("dtype ", static_cast<int>(f.dtype), " scale ",
                                  static_cast<int>(f.scale_mode), " mode ",
                                  PreemptionModeName(mode), " bs ", bs, " seed ", c.seed));
        const SoakOutcome o = RunSoak(c);
        ASSERT_TRUE(o.status.ok()) << o.status;
        total_steps += o.steps;
        swaps += o.stats.preemptions_swap;
        recomputes += o.stats.preemptions_recompute;
        cow += o.stats.blocks.cow_copies;
        hits += o.stats.blocks.prefix_hit_tokens;
        evictions += o.stats.blocks.evictions;
        swap_ins += o.stats.blocks.blocks_swapped_in;
        aborted += o.aborted;
        forks += o.forks;
        finished += o.finished;
        rejected += o.rejected;
        verified += o.slots_verified;
      }
    }
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "soak: %lld steps in %.1f s; finished %lld, aborted %lld, rejected %lld, forks %lld; "
      "preemptions swap %lld / recompute %lld; blocks swapped in %lld; cow copies %lld; prefix "
      "hit tokens %lld; evictions %lld; slots verified %lld\n",
      (long long)total_steps, secs, (long long)finished, (long long)aborted, (long long)rejected,
      (long long)forks, (long long)swaps, (long long)recomputes, (long long)swap_ins,
      (long long)cow, (long long)hits, (long long)evictions, (long long)verified);
  EXPECT_GE(total_steps, 100000);
  // The random mix must actually exercise every path.
  EXPECT_GT(swaps, 100);
  EXPECT_GT(recomputes, 100);
  EXPECT_GT(swap_ins, 100);
  EXPECT_GT(cow, 100);
  EXPECT_GT(hits, 1000);
  EXPECT_GT(aborted, 100);
  EXPECT_GT(forks, 100);
  EXPECT_GT(rejected, 10);
  EXPECT_GT(evictions, 100);
}

SoakConfig FaultConfig() {
  SoakConfig c;
  c.seed = 77;
  c.format = {KvDtype::kInt8, KvScaleMode::kDynamic};
  c.mode = PreemptionMode::kAuto;
  c.steps = 3000;
  c.cpu_budget_fp16_blocks = 10;
  return c;
}

TEST(SchedulerSoakTest, FaultFreeControlRunPasses) {
  const SoakOutcome o = RunSoak(FaultConfig());
  EXPECT_TRUE(o.status.ok()) << o.status;
}

TEST(SchedulerSoakTest, DetectsASkippedDecref) {
  SoakConfig c = FaultConfig();
  c.fault = BlockFault{BlockFault::Kind::kSkipDecref, 2000};
  const SoakOutcome o = RunSoak(c);
  ASSERT_FALSE(o.status.ok()) << "a leaked reference went unnoticed";
  EXPECT_NE(o.status.message().find("leaked/orphaned reference"), std::string::npos) << o.status;
  std::printf("skip-decref fault detected: %s\n", std::string(o.status.message()).c_str());
}

TEST(SchedulerSoakTest, DetectsAnExtraDecref) {
  SoakConfig c = FaultConfig();
  c.fault = BlockFault{BlockFault::Kind::kExtraDecref, 2000};
  const SoakOutcome o = RunSoak(c);
  ASSERT_FALSE(o.status.ok()) << "a block freed while referenced went unnoticed";
  const bool caught = o.status.message().find("freed while still referenced") != std::string::npos ||
                      o.status.message().find("double free") != std::string::npos;
  EXPECT_TRUE(caught) << o.status;
  std::printf("extra-decref fault detected: %s\n", std::string(o.status.message()).c_str());
}

TEST(SchedulerSoakTest, ContentShadowDetectsAMisroutedSwapIn) {
  SoakConfig c = FaultConfig();
  c.mode = PreemptionMode::kSwap;
  c.prefix_caching = false;  // every swapped block travels
  c.corrupt_plan = [](StepPlan* p) {
    if (p->swap_in.size() >= 2) std::swap(p->swap_in[0].dst, p->swap_in[1].dst);
  };
  const SoakOutcome o = RunSoak(c);
  ASSERT_FALSE(o.status.ok());
  EXPECT_NE(o.status.message().find("another sequence's content"), std::string::npos) << o.status;
}

TEST(SchedulerSoakTest, ContentShadowDetectsADroppedCopyOnWrite) {
  SoakConfig c = FaultConfig();
  c.corrupt_plan = [](StepPlan* p) { p->copy.clear(); };
  const SoakOutcome o = RunSoak(c);
  ASSERT_FALSE(o.status.ok());
  EXPECT_NE(o.status.message().find("reads position"), std::string::npos) << o.status;
}

}  // namespace
}  // namespace strata
