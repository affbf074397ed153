#include "scheduler/scheduler_core.h"

#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "gtest/gtest.h"
#include "scheduler/sched_fake_worker.h"

namespace strata {
namespace {

#define EXPECT_OK(expr)                     \
  do {                                      \
    const absl::Status s_ = (expr);         \
    EXPECT_TRUE(s_.ok()) << s_;             \
  } while (0)

std::vector<int32_t> Tok(int n, int32_t first = 100) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

SchedulerOptions SmallOpts(int gpu_blocks, int cpu_blocks = 0) {
  SchedulerOptions o;
  o.max_num_seqs = 8;
  o.max_num_batched_tokens = 64;
  o.max_model_len = 256;
  o.watermark = 0;
  o.preemption_mode = PreemptionMode::kRecompute;
  o.blocks.num_gpu_blocks = gpu_blocks;
  o.blocks.num_cpu_blocks = cpu_blocks;
  o.blocks.block_size = 4;
  o.blocks.hash_seed = PrefixHashSeed("test", KvFormat{KvDtype::kFp16, KvScaleMode::kNone});
  return o;
}

// Runs the engine loop against a FakeWorker that checks every plan and the
// cache contents each sequence reads.
class Driver {
 public:
  explicit Driver(const SchedulerOptions& o)
      : sched(Scheduler::Create(o).value()),
        worker(o.blocks.num_gpu_blocks, o.blocks.num_cpu_blocks, o.blocks.block_size) {}

  SeqId Add(int64_t request, std::vector<int32_t> prompt, int max_tokens,
            std::vector<int32_t> stop = {}) {
    SeqMirror m;
    for (int32_t t : prompt) m.Append(t);
    auto id = sched->AddRequest({RequestId(request), std::move(prompt), max_tokens, std::move(stop)});
    EXPECT_TRUE(id.ok()) << id.status();
    mirrors[*id] = std::move(m);
    prompt_len[*id] = mirrors[*id].tokens.size();
    return *id;
  }

  // Schedule, execute, sample `sample(seq)` (default 1) for every sequence
  // that needs logits, report back.
  StepPlan Step(const std::function<int32_t(SeqId)>& sample = nullptr) {
    StepPlan plan = sched->Schedule();
    EXPECT_OK(sched->CheckInvariants());
    EXPECT_OK(worker.Execute(plan, [this](SeqId s) {
      auto it = mirrors.find(s);
      return it == mirrors.end() ? nullptr : &it->second;
    }));
    StepResult r{plan.step_id, {}};
    for (const ScheduledSeq& e : plan.seqs) {
      if (!e.needs_logits || !sched->HasSeq(e.seq_id)) continue;
      const int32_t t = sample ? sample(e.seq_id) : 1;
      r.sampled.push_back({e.seq_id, t});
      mirrors[e.seq_id].Append(t);
    }
    auto done = sched->OnStepResult(r);
    EXPECT_TRUE(done.ok()) << done.status();
    for (FinishedSeq& f : *done) {
      const std::vector<int32_t>& all = mirrors[f.seq_id].tokens;
      EXPECT_EQ(f.output_tokens, std::vector<int32_t>(all.begin() + prompt_len[f.seq_id], all.end()));
      mirrors.erase(f.seq_id);
      finished.push_back(std::move(f));
    }
    EXPECT_OK(sched->CheckInvariants());
    return plan;
  }

  // Steps until no sequence is left; returns the number of steps.
  int Drain(int max_steps = 1000) {
    int n = 0;
    while (sched->num_seqs() > 0 && n < max_steps) {
      Step();
      ++n;
    }
    EXPECT_EQ(sched->num_seqs(), 0) << "did not drain";
    return n;
  }

  const ScheduledSeq* Find(const StepPlan& p, SeqId s) {
    for (const ScheduledSeq& e : p.seqs)
      if (e.seq_id == s) return &e;
    return nullptr;
  }

  std::unique_ptr<Scheduler> sched;
  FakeWorker worker;
  absl::flat_hash_map<SeqId, SeqMirror> mirrors;
  absl::flat_hash_map<SeqId, size_t> prompt_len;
  std::vector<FinishedSeq> finished;
  // Registers a fork made outside Step(): the child mirrors its parent.
  void AdoptFork(SeqId parent, SeqId child) {
    mirrors[child] = mirrors[parent];
    prompt_len[child] = prompt_len[parent];
  }
};

// --- options and admission validation ------------------------------------------------

TEST(SchedulerTest, CreateValidatesOptionsTableDriven) {
  struct Case {
    std::string name;
    std::function<void(SchedulerOptions&)> edit;
    bool ok;
  };
  const std::vector<Case> cases = {
      {"defaults of SmallOpts", [](SchedulerOptions&) {}, true},
      {"max_num_seqs 0", [](SchedulerOptions& o) { o.max_num_seqs = 0; }, false},
      {"token budget 0", [](SchedulerOptions& o) { o.max_num_batched_tokens = 0; }, false},
      {"block size 3", [](SchedulerOptions& o) { o.blocks.block_size = 3; }, false},
      {"empty GPU pool", [](SchedulerOptions& o) { o.blocks.num_gpu_blocks = 0; }, false},
      {"watermark 1", [](SchedulerOptions& o) { o.watermark = 1.0; }, false},
      {"negative chunk", [](SchedulerOptions& o) { o.max_prefill_chunk = -1; }, false},
      {"pad multiple 0", [](SchedulerOptions& o) { o.slot_mapping_pad_multiple = 0; }, false},
      {"swap mode without swap space is allowed (falls back)",
       [](SchedulerOptions& o) { o.preemption_mode = PreemptionMode::kSwap; }, true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    SchedulerOptions o = SmallOpts(8);
    c.edit(o);
    const auto s = Scheduler::Create(o);
    EXPECT_EQ(s.ok(), c.ok) << s.status();
    if (!c.ok) { EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument); }
  }
  EXPECT_EQ(ParsePreemptionMode("swap").value(), PreemptionMode::kSwap);
  EXPECT_EQ(ParsePreemptionMode("recompute").value(), PreemptionMode::kRecompute);
  EXPECT_EQ(ParsePreemptionMode("auto").value(), PreemptionMode::kAuto);
  EXPECT_EQ(ParsePreemptionMode("SWAP").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SchedulerTest, AddRequestRejectsUpFrontTableDriven) {
  struct Case {
    std::string name;
    SchedRequest req;
    absl::StatusCode want;
    std::string message_part;
  };
  // Pool: 8 blocks of 4 tokens = 32 tokens; max_model_len 20 below.
  const std::vector<Case> cases = {
      {"fits", {RequestId(1), Tok(5), 10, {}}, absl::StatusCode::kOk, ""},
      {"duplicate id", {RequestId(0), Tok(5), 10, {}}, absl::StatusCode::kAlreadyExists, "already"},
      {"invalid id", {RequestId(), Tok(5), 10, {}}, absl::StatusCode::kInvalidArgument, "id"},
      {"empty prompt", {RequestId(2), {}, 10, {}}, absl::StatusCode::kInvalidArgument, "empty"},
      {"negative token", {RequestId(3), {1, -2}, 10, {}}, absl::StatusCode::kInvalidArgument, "negative"},
      {"max_tokens 0", {RequestId(4), Tok(5), 0, {}}, absl::StatusCode::kInvalidArgument, "max_tokens"},
      {"prompt fills max_model_len", {RequestId(5), Tok(20), 1, {}},
       absl::StatusCode::kInvalidArgument, "max_model_len"},
      {"output capped by max_model_len fits", {RequestId(6), Tok(19), 1000, {}},
       absl::StatusCode::kOk, ""},
  };
  SchedulerOptions o = SmallOpts(8);
  o.max_model_len = 20;
  auto sched = Scheduler::Create(o).value();
  ASSERT_TRUE(sched->AddRequest({RequestId(0), Tok(3), 1, {}}).ok());
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const auto r = sched->AddRequest(c.req);
    EXPECT_EQ(r.status().code(), c.want) << r.status();
    EXPECT_NE(r.status().message().find(c.message_part), std::string::npos) << r.status();
  }
  // A request larger than the whole pool can never run.
  SchedulerOptions big = SmallOpts(4);  // 16 token slots
  auto s2 = Scheduler::Create(big).value();
  EXPECT_TRUE(s2->AddRequest({RequestId(1), Tok(10), 7, {}}).ok()) << "16 tokens, 16 slots";
  const auto r = s2->AddRequest({RequestId(2), Tok(10), 8, {}});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(r.status().message().find("can never be scheduled"), std::string::npos) << r.status();
  // A full waiting queue asks the client to retry.
  SchedulerOptions q = SmallOpts(8);
  q.max_waiting = 1;
  auto s3 = Scheduler::Create(q).value();
  ASSERT_TRUE(s3->AddRequest({RequestId(1), Tok(3), 1, {}}).ok());
  EXPECT_EQ(s3->AddRequest({RequestId(2), Tok(3), 1, {}}).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(s3->Stats().rejected, 1);
}

// --- batching policy -------------------------------------------------------------------

struct FirstStepCase {
  std::string name;
  std::function<void(SchedulerOptions&)> edit;
  std::vector<int> prompt_lens;      // one request each, in arrival order
  std::vector<int> want_chunk;       // tokens scheduled per request in step 1 (0 = not admitted)
  std::vector<bool> want_logits;
};

TEST(SchedulerTest, FirstStepAdmissionTableDriven) {
  const std::vector<FirstStepCase> cases = {
      {"all fit", [](SchedulerOptions&) {}, {5, 3}, {5, 3}, {true, true}},
      {"max_num_seqs caps admission", [](SchedulerOptions& o) { o.max_num_seqs = 2; }, {2, 2, 2},
       {2, 2, 0}, {true, true, false}},
      {"token budget chunks the last admitted prefill",
       [](SchedulerOptions& o) { o.max_num_batched_tokens = 8; }, {5, 6, 2}, {5, 3, 0},
       {true, false, false}},
      {"max_prefill_chunk caps each chunk", [](SchedulerOptions& o) { o.max_prefill_chunk = 4; },
       {9, 3}, {4, 3}, {false, true}},
      {"FCFS: a head without blocks is not overtaken",
       [](SchedulerOptions& o) { o.blocks.num_gpu_blocks = 4; }, {12, 9, 1}, {12, 0, 0},
       {true, false, false}},
      {"watermark holds back admission while others run",
       [](SchedulerOptions& o) {
         o.blocks.num_gpu_blocks = 10;
         o.watermark = 0.3;  // 3 blocks
       },
       {16, 16, 3}, {16, 0, 0}, {true, false, false}},
  };
  for (const FirstStepCase& c : cases) {
    SCOPED_TRACE(c.name);
    SchedulerOptions o = SmallOpts(16);
    c.edit(o);
    Driver d(o);
    std::vector<SeqId> ids;
    for (size_t i = 0; i < c.prompt_lens.size(); ++i) {
      ids.push_back(d.Add(static_cast<int64_t>(i), Tok(c.prompt_lens[i], 1000 * (i + 1)), 4));
    }
    const StepPlan p = d.Step();
    for (size_t i = 0; i < ids.size(); ++i) {
      const ScheduledSeq* e = d.Find(p, ids[i]);
      EXPECT_EQ(e ? static_cast<int>(e->token_ids.size()) : 0, c.want_chunk[i]) << i;
      if (e) {
        EXPECT_EQ(e->needs_logits, c.want_logits[i]) << i;
        EXPECT_EQ(e->start_pos, 0);
      }
    }
    d.Drain();
  }
}

TEST(SchedulerTest, ChunkedPrefillSamplesOnlyAtTheEndAndMixesWithDecodes) {
  SchedulerOptions o = SmallOpts(16);
  o.max_num_batched_tokens = 4;
  Driver d(o);
  const SeqId a = d.Add(1, Tok(2), 10);
  d.Step();  // a: prefill 2 tokens, samples
  const SeqId b = d.Add(2, Tok(10, 500), 10);
  struct Want {
    int a_tokens, b_start, b_tokens;
    bool b_logits;
  };
  // Each step: a decodes 1 token, b's chunk gets the remaining 3.
  const std::vector<Want> wants = {{1, 0, 3, false}, {1, 3, 3, false}, {1, 6, 3, false},
                                   {1, 9, 1, true}, {1, 10, 1, true}};
  for (const Want& w : wants) {
    const StepPlan p = d.Step();
    const ScheduledSeq* ea = d.Find(p, a);
    const ScheduledSeq* eb = d.Find(p, b);
    ASSERT_TRUE(ea && eb);
    EXPECT_EQ(static_cast<int>(ea->token_ids.size()), w.a_tokens);
    EXPECT_FALSE(ea->is_prefill);
    EXPECT_EQ(eb->start_pos, w.b_start);
    EXPECT_EQ(static_cast<int>(eb->token_ids.size()), w.b_tokens);
    EXPECT_EQ(eb->needs_logits, w.b_logits);
    EXPECT_EQ(p.num_tokens, w.a_tokens + w.b_tokens);
  }
  d.Drain();
}

TEST(SchedulerTest, OlderPrefillLeavesBudgetForNewerDecodes) {
  SchedulerOptions o = SmallOpts(32);
  o.max_num_batched_tokens = 6;
  Driver d(o);
  const SeqId b = d.Add(1, Tok(2), 20);  // older, decoding
  d.Step();
  const SeqId c = d.Add(2, Tok(2, 300), 20);
  d.Step();
  // A long prompt arrives; it becomes "running prefill" between decodes.
  const SeqId a = d.Add(3, Tok(40, 600), 4);
  const StepPlan p1 = d.Step();
  EXPECT_EQ(d.Find(p1, b)->token_ids.size(), 1u);
  EXPECT_EQ(d.Find(p1, c)->token_ids.size(), 1u);
  EXPECT_EQ(d.Find(p1, a)->token_ids.size(), 4u);
  d.Drain();
}

TEST(SchedulerTest, SlotMappingIsPaddedWithMinusOne) {
  SchedulerOptions o = SmallOpts(16);
  o.slot_mapping_pad_multiple = 8;
  Driver d(o);
  d.Add(1, Tok(5), 2);
  const StepPlan p = d.Step();
  ASSERT_EQ(p.slot_mapping.size(), 8u);
  EXPECT_EQ(p.num_tokens, 5);
  for (int i = 5; i < 8; ++i) EXPECT_EQ(p.slot_mapping[i], -1);
  d.Drain();
}

// --- preemption -------------------------------------------------------------------------

struct PreemptCase {
  std::string name;
  PreemptionMode mode;
  int cpu_blocks;
  int auto_recompute_max_tokens;
  int want_swaps, want_recomputes, want_fallbacks;
};

TEST(SchedulerTest, PreemptionModeDecisionTableDriven) {
  // Pool of 4 blocks; A and B (6-token prompts) take 2 each. At position 8
  // A needs a fifth block: B, the newest, is preempted with 8 tokens computed.
  const std::vector<PreemptCase> cases = {
      {"recompute", PreemptionMode::kRecompute, 4, 0, 0, 1, 0},
      {"swap with swap space", PreemptionMode::kSwap, 4, 0, 1, 0, 0},
      {"swap without swap space falls back", PreemptionMode::kSwap, 1, 0, 0, 1, 1},
      {"auto: long sequence swaps", PreemptionMode::kAuto, 4, 4, 1, 0, 0},
      {"auto: short sequence recomputes", PreemptionMode::kAuto, 4, 100, 0, 1, 0},
      {"auto: no swap space recomputes", PreemptionMode::kAuto, 0, 0, 0, 1, 0},
  };
  for (const PreemptCase& c : cases) {
    SCOPED_TRACE(c.name);
    SchedulerOptions o = SmallOpts(4, c.cpu_blocks);
    o.preemption_mode = c.mode;
    o.auto_recompute_max_tokens = c.auto_recompute_max_tokens;
    Driver d(o);
    const SeqId a = d.Add(1, Tok(6, 100), 9);
    const SeqId b = d.Add(2, Tok(6, 200), 9);
    for (int i = 0; i < 3; ++i) d.Step();  // prefill, then decodes at 6 and 7
    EXPECT_EQ(d.sched->Stats().preemptions_swap + d.sched->Stats().preemptions_recompute, 0);
    const StepPlan p = d.Step();  // A writes position 8
    const SchedulerStats s = d.sched->Stats();
    EXPECT_EQ(s.preemptions_swap, c.want_swaps);
    EXPECT_EQ(s.preemptions_recompute, c.want_recomputes);
    EXPECT_EQ(s.swap_fallbacks, c.want_fallbacks);
    EXPECT_NE(d.Find(p, a), nullptr);
    EXPECT_EQ(d.Find(p, b), nullptr) << "the newest sequence is the victim";
    EXPECT_EQ(p.swap_out.size(), c.want_swaps ? 2u : 0u);
    EXPECT_EQ(s.num_swapped, c.want_swaps);
    EXPECT_EQ(s.num_waiting, c.want_recomputes);
    if (c.want_recomputes) { EXPECT_EQ(d.sched->SeqNumComputed(b), 0); }
    if (c.want_swaps) { EXPECT_EQ(d.sched->SeqNumComputed(b), 8) << "swap keeps progress"; }
    d.Drain();
    EXPECT_EQ(d.finished.size(), 2u);
    EXPECT_EQ(d.sched->Stats().blocks.gpu_used, 0);
    EXPECT_EQ(d.sched->Stats().blocks.cpu_used, 0);
  }
}

TEST(SchedulerTest, SwappedSequencesComeBackBeforeNewAdmissions) {
  SchedulerOptions o = SmallOpts(4, 4);
  o.preemption_mode = PreemptionMode::kSwap;
  o.blocks.enable_prefix_caching = false;  // every block travels both ways
  o.blocks.bytes_per_block = 100;
  Driver d(o);
  const SeqId a = d.Add(1, Tok(6, 100), 7);
  const SeqId b = d.Add(2, Tok(6, 200), 9);
  for (int i = 0; i < 4; ++i) d.Step();
  ASSERT_EQ(d.sched->Stats().num_swapped, 1);
  const SeqId c = d.Add(3, Tok(2, 300), 3);  // would fit right now, but b is older
  int step_b_back = -1, step_c_in = -1;
  for (int i = 0; i < 40 && d.sched->num_seqs() > 0; ++i) {
    const StepPlan p = d.Step();
    if (step_b_back < 0 && !p.swap_in.empty()) {
      step_b_back = i;
      EXPECT_NE(d.Find(p, b), nullptr);
      EXPECT_EQ(d.Find(p, b)->start_pos, 8) << "resumes where it stopped";
    }
    if (step_c_in < 0 && d.Find(p, c) != nullptr) step_c_in = i;
  }
  EXPECT_GE(step_b_back, 0);
  EXPECT_GE(step_c_in, step_b_back);
  EXPECT_EQ(d.sched->Stats().blocks.blocks_swapped_out, 2);
  EXPECT_EQ(d.sched->Stats().blocks.bytes_swapped_out, 200);
  EXPECT_EQ(d.sched->Stats().blocks.bytes_swapped_in, 200);
  EXPECT_EQ(d.finished.size(), 3u);
  (void)a;
}

TEST(SchedulerTest, RecomputedSequenceReusesItsCachedPrefix) {
  SchedulerOptions o = SmallOpts(6);
  Driver d(o);
  d.Add(1, Tok(6, 100), 12);
  const SeqId b = d.Add(2, Tok(9, 200), 12);
  StepPlan p;
  while (d.sched->Stats().preemptions_recompute == 0) p = d.Step();
  // b was freed; its full blocks stay cached. When it comes back its prefill
  // starts after the cached part.
  int64_t hits_before = d.sched->Stats().blocks.prefix_hit_tokens;
  for (int i = 0; i < 40; ++i) {
    p = d.Step();
    if (const ScheduledSeq* e = d.Find(p, b)) {
      EXPECT_GT(e->start_pos, 0);
      break;
    }
  }
  EXPECT_GT(d.sched->Stats().blocks.prefix_hit_tokens, hits_before);
  d.Drain();
}

// --- prefix caching and copy-on-write ------------------------------------------------------

TEST(SchedulerTest, LaterRequestSkipsTheCachedPrefix) {
  Driver d(SmallOpts(16));
  auto prompt = Tok(10);
  d.Add(1, prompt, 1);
  d.Drain();
  prompt.push_back(5);
  const SeqId b = d.Add(2, prompt, 2);
  const StepPlan p = d.Step();
  ASSERT_NE(d.Find(p, b), nullptr);
  EXPECT_EQ(d.Find(p, b)->start_pos, 8) << "two full blocks cached";
  EXPECT_EQ(d.Find(p, b)->token_ids.size(), 3u);
  const auto st = d.sched->Stats().blocks;
  EXPECT_EQ(st.prefix_hit_tokens, 8);
  EXPECT_EQ(st.prefix_queried_tokens, 10 + 11);
  d.Drain();
}

TEST(SchedulerTest, FullHitWhileSharedCopiesTheLastBlock) {
  Driver d(SmallOpts(16));
  const SeqId a = d.Add(1, Tok(8), 5);
  d.Step();
  const SeqId b = d.Add(2, Tok(8), 5);
  const StepPlan p = d.Step();
  const ScheduledSeq* eb = d.Find(p, b);
  ASSERT_NE(eb, nullptr);
  EXPECT_EQ(eb->start_pos, 7);
  EXPECT_TRUE(eb->needs_logits);
  ASSERT_EQ(p.copy.size(), 1u);
  EXPECT_EQ(p.copy[0].src, d.Find(p, a)->block_table[1]);
  EXPECT_EQ(p.copy[0].dst, eb->block_table[1]);
  EXPECT_EQ(eb->block_table[0], d.Find(p, a)->block_table[0]) << "first block shared";
  d.Drain();
}

TEST(SchedulerTest, ForkSharesBlocksAndCopiesOnTheNextAppend) {
  Driver d(SmallOpts(16));
  const SeqId a = d.Add(1, Tok(6), 6);
  d.Step();  // 6 computed, 1 sampled
  const int32_t other = 42;
  auto child = d.sched->Fork(a, other);
  ASSERT_TRUE(child.ok()) << child.status();
  d.AdoptFork(a, *child);
  d.mirrors[*child].ReplaceLast(other);
  EXPECT_EQ(d.sched->SeqTokens(*child).back(), other);
  EXPECT_EQ(d.sched->block_manager().BlockIds(*child), d.sched->block_manager().BlockIds(a));
  const StepPlan p = d.Step();
  ASSERT_EQ(p.copy.size(), 1u) << "the shared partial block is copied once";
  const ScheduledSeq* ea = d.Find(p, a);
  const ScheduledSeq* ec = d.Find(p, *child);
  ASSERT_TRUE(ea && ec);
  EXPECT_EQ(ea->block_table[0], ec->block_table[0]);
  EXPECT_NE(ea->block_table[1], ec->block_table[1]);
  EXPECT_EQ(ec->token_ids, std::vector<int32_t>{other});
  d.Drain();
  EXPECT_EQ(d.finished.size(), 2u);
  // Preconditions.
  const SeqId w = d.Add(5, Tok(3), 2);
  EXPECT_EQ(d.sched->Fork(w).status().code(), absl::StatusCode::kFailedPrecondition);
  d.sched->Schedule();
  EXPECT_EQ(d.sched->Fork(w).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(SchedulerTest, CopySourceFreedByALaterPreemptionIsNotReusedInTheSameStep) {
  // P1, P2 each share their partial last block with a fork (C2 forked first,
  // so C1 is the newest). Pool: 5 blocks, 4 in use. P1 copies-on-write into
  // the last free block; P2 then needs one too, preempting C1, which drops
  // P1's copy source to refcount 0. Handing that block to P2's copy would put
  // it in the same copy list as source and destination: it must stay pinned,
  // so C2 is preempted as well and P2 writes in place.
  SchedulerOptions o = SmallOpts(5);
  o.blocks.enable_prefix_caching = false;
  Driver d(o);
  const SeqId p1 = d.Add(1, Tok(6, 100), 10);
  const SeqId p2 = d.Add(2, Tok(6, 200), 10);
  d.Step();
  for (const SeqId parent : {p2, p1}) {
    auto c = d.sched->Fork(parent);
    ASSERT_TRUE(c.ok()) << c.status();
    d.AdoptFork(parent, *c);
  }
  const StepPlan p = d.Step();  // the FakeWorker rejects overlapping copy pairs
  EXPECT_EQ(p.copy.size(), 1u);
  EXPECT_EQ(d.sched->Stats().preemptions_recompute, 2);
  EXPECT_NE(d.Find(p, p1), nullptr);
  EXPECT_NE(d.Find(p, p2), nullptr);
  d.Drain();
}

// --- finishing, aborting, result validation ---------------------------------------------------

TEST(SchedulerTest, FinishReasonsTableDriven) {
  struct Case {
    std::string name;
    int max_tokens, max_model_len;
    int32_t sampled;
    std::vector<int32_t> stop;
    FinishReason want;
    size_t want_outputs;
  };
  const std::vector<Case> cases = {
      {"stop token", 10, 100, 2, {2}, FinishReason::kStop, 1},
      {"max_tokens", 3, 100, 1, {2}, FinishReason::kLength, 3},
      {"max_model_len", 100, 7, 1, {}, FinishReason::kLength, 2},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    SchedulerOptions o = SmallOpts(16);
    o.max_model_len = c.max_model_len;
    Driver d(o);
    const SeqId s = d.Add(7, Tok(5), c.max_tokens, c.stop);
    while (d.sched->num_seqs() > 0) d.Step([&](SeqId) { return c.sampled; });
    ASSERT_EQ(d.finished.size(), 1u);
    EXPECT_EQ(d.finished[0].seq_id, s);
    EXPECT_EQ(d.finished[0].request_id, RequestId(7));
    EXPECT_EQ(d.finished[0].reason, c.want);
    EXPECT_EQ(d.finished[0].output_tokens.size(), c.want_outputs);
    EXPECT_EQ(d.sched->Stats().blocks.gpu_used, 0);
  }
}

TEST(SchedulerTest, AbortFreesBlocksInEveryStateTableDriven) {
  struct Case {
    std::string name;
    int steps_before;  // steps run before the abort
    bool in_flight;    // abort between Schedule and OnStepResult
    bool by_request;
  };
  // A (oldest), B, and C; pool of 4 blocks with swap: B is swapped out after
  // 4 steps; C waits behind it.
  const std::vector<Case> cases = {
      {"waiting", 0, false, false},       {"running", 1, false, true},
      {"swapped", 4, false, false},       {"running, step in flight", 2, true, false},
      {"swapped, by request", 4, false, true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    SchedulerOptions o = SmallOpts(4, 4);
    o.preemption_mode = PreemptionMode::kSwap;
    Driver d(o);
    d.Add(1, Tok(6, 100), 9);
    const SeqId b = d.Add(2, Tok(6, 200), 9);
    for (int i = 0; i < c.steps_before; ++i) d.Step();
    if (c.name.rfind("swapped", 0) == 0) {
      ASSERT_EQ(d.sched->Stats().num_swapped, 1);
    }
    StepPlan pending;
    if (c.in_flight) {
      pending = d.sched->Schedule();
      EXPECT_OK(d.worker.Execute(pending, [&d](SeqId s) {
        auto it = d.mirrors.find(s);
        return it == d.mirrors.end() ? nullptr : &it->second;
      }));
    }
    EXPECT_OK(c.by_request ? d.sched->Abort(RequestId(2)) : d.sched->Abort(b));
    EXPECT_FALSE(d.sched->HasSeq(b));
    EXPECT_EQ(d.sched->Abort(b).code(), absl::StatusCode::kNotFound);
    d.mirrors.erase(b);
    if (c.in_flight) {
      // The aborted sequence's token may be reported or left out.
      StepResult r{pending.step_id, {}};
      for (const ScheduledSeq& e : pending.seqs) {
        if (e.needs_logits) r.sampled.push_back({e.seq_id, 1});
        if (e.needs_logits && d.mirrors.contains(e.seq_id)) d.mirrors[e.seq_id].Append(1);
      }
      EXPECT_TRUE(d.sched->OnStepResult(r).ok());
    }
    EXPECT_OK(d.sched->CheckInvariants());
    EXPECT_EQ(d.sched->Stats().blocks.cpu_used, 0);
    EXPECT_EQ(d.sched->Stats().aborted, 1);
    d.Drain();
    EXPECT_EQ(d.sched->Stats().blocks.gpu_used, 0);
  }
}

TEST(SchedulerTest, MalformedResultsAreRejectedWithoutSideEffects) {
  Driver d(SmallOpts(16));
  const SeqId a = d.Add(1, Tok(3), 5);
  const StepPlan p = d.sched->Schedule();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(d.sched->OnStepResult({p.step_id + 1, {{a, 1}}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.sched->OnStepResult({p.step_id, {}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.sched->OnStepResult({p.step_id, {{a, 1}, {a, 2}}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.sched->OnStepResult({p.step_id, {{a, 1}, {SeqId(99), 2}}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.sched->OnStepResult({p.step_id, {{a, -1}}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.sched->SeqNumComputed(a), 0);
  EXPECT_TRUE(d.sched->step_pending());
  ASSERT_TRUE(d.sched->OnStepResult({p.step_id, {{a, 1}}}).ok());
  EXPECT_EQ(d.sched->SeqNumComputed(a), 3);
  EXPECT_EQ(d.sched->SeqTokens(a).size(), 4u);
  EXPECT_EQ(d.sched->OnStepResult({p.step_id, {}}).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(SchedulerDeathTest, ScheduleTwiceWithoutResultIsABug) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Driver d(SmallOpts(16));
  d.Add(1, Tok(3), 5);
  d.sched->Schedule();
  EXPECT_DEATH(d.sched->Schedule(), "before OnStepResult");
}

TEST(SchedulerTest, StatsReportQueuesAndPools) {
  SchedulerOptions o = SmallOpts(8, 8);
  o.max_num_seqs = 1;
  Driver d(o);
  d.Add(1, Tok(5), 3);
  d.Add(2, Tok(5, 200), 3);
  d.Step();
  const SchedulerStats s = d.sched->Stats();
  EXPECT_EQ(s.num_running, 1);
  EXPECT_EQ(s.num_waiting, 1);
  EXPECT_EQ(s.num_swapped, 0);
  EXPECT_EQ(s.blocks.gpu_total, 8);
  EXPECT_EQ(s.blocks.gpu_used, 2);
  EXPECT_EQ(s.blocks.cpu_total, 8);
  EXPECT_EQ(s.steps, 1);
  EXPECT_EQ(s.scheduled_tokens, 5);
  d.Drain();
  EXPECT_EQ(d.sched->Stats().finished, 2);
}

}  // namespace
}  // namespace strata
