// End to end on the CPU: scheduler + block manager + CPU engine with a KV
// cache too small for the batch, so sequences are preempted (by swapping to
// the CPU pool, or by freeing and recomputing). Greedy outputs must still
// match the reference exactly, and every block must come back.
#include <map>

#include "gtest/gtest.h"
#include "runtime/sampling.h"
#include "runtime/status_macros.h"
#include "runtime/weights.h"
#include "scheduler/engine_loop.h"
#include "tests/test_data.h"
#include "worker/cpu_engine.h"

namespace strata {
namespace {

struct Case {
  const char* name;
  PreemptionMode mode;
  int32_t cpu_blocks;
  int32_t chunk;  // max prefill chunk (0 = none)
};

class PreemptionGoldenTest : public ::testing::TestWithParam<Case> {};

TEST_P(PreemptionGoldenTest, GreedyOutputsMatchReference) {
  const Case& c = GetParam();
  auto weights = LoadModelWeights(testing::DataPath("models/stories15M"));
  ASSERT_TRUE(weights.ok()) << weights.status();
  EngineOptions eo;
  eo.kv_format = {KvDtype::kFp32, KvScaleMode::kNone};
  eo.block_size = 16;
  eo.num_gpu_blocks = 40;  // 8 sequences of up to 256 tokens need 128
  eo.num_cpu_blocks = c.cpu_blocks;
  auto engine = CpuEngine::Create(std::move(*weights), eo);
  ASSERT_TRUE(engine.ok()) << engine.status();

  SchedulerOptions so;
  so.max_num_seqs = 8;
  so.max_num_batched_tokens = 256;
  so.max_prefill_chunk = c.chunk;
  so.max_model_len = 256;
  so.preemption_mode = c.mode;
  so.blocks.num_gpu_blocks = eo.num_gpu_blocks;
  so.blocks.num_cpu_blocks = eo.num_cpu_blocks;
  so.blocks.block_size = eo.block_size;
  so.blocks.bytes_per_block = (*engine)->kv_bytes_per_block();
  std::map<int64_t, FinishedSeq> done;
  LoopCallbacks cb;
  cb.on_finish = [&](const FinishedSeq& f) { done[f.request_id.value()] = f; };
  auto loop = EngineLoop::Create(engine->get(), so, cb);
  ASSERT_TRUE(loop.ok()) << loop.status();

  const nlohmann::json golden = testing::LoadJson("golden/stories15M_greedy.json");
  std::vector<nlohmann::json> cases(golden["cases"].begin(), golden["cases"].end());
  for (size_t i = 0; i < cases.size(); ++i) {
    LoopRequest r;
    r.request_id = RequestId(i);
    r.prompt = cases[i]["prompt_ids"].get<std::vector<int32_t>>();
    r.max_tokens = 256;
    ASSERT_TRUE((*loop)->AddRequest(r).ok());
  }
  int steps = 0;
  while ((*loop)->HasWork()) {
    ASSERT_TRUE((*loop)->Step().ok());
    ASSERT_TRUE((*loop)->scheduler().CheckInvariants().ok()) << "after step " << steps;
    ++steps;
  }
  const SchedulerStats stats = (*loop)->scheduler().Stats();
  if (c.mode == PreemptionMode::kSwap) {
    EXPECT_GT(stats.preemptions_swap, 0) << "the test must force swapping";
    EXPECT_GT(stats.blocks.blocks_swapped_in, 0);
  } else {
    EXPECT_GT(stats.preemptions_recompute, 0) << "the test must force recomputation";
  }
  EXPECT_EQ(stats.blocks.gpu_used, 0);
  EXPECT_EQ(stats.blocks.cpu_used, 0);
  ASSERT_EQ(done.size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto expected = cases[i]["output_ids_ignore_bos"].get<std::vector<int32_t>>();
    const size_t prompt_len = cases[i]["prompt_ids"].size();
    const size_t n = std::min<size_t>(cases[i]["stable_prefix_len"]["margin_1e-3"].get<size_t>(),
                                      256 - prompt_len);
    const auto& got = done[i].output_tokens;
    ASSERT_GE(got.size(), n);
    for (size_t k = 0; k < n; ++k) {
      ASSERT_EQ(got[k], expected[k]) << c.name << " case " << cases[i]["id"] << " token " << k;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Modes, PreemptionGoldenTest,
    ::testing::Values(Case{"swap", PreemptionMode::kSwap, 256, 0},
                      Case{"recompute", PreemptionMode::kRecompute, 0, 0},
                      Case{"swap_chunked_prefill", PreemptionMode::kSwap, 256, 7}),
    [](const auto& info) { return std::string(info.param.name); });

// An engine that samples on its side (as the CUDA engine and remote workers
// do), built on the CPU engine: greedy tokens for the sequences that ask,
// no logits back, and -- the Engine contract -- no sample slots at all in a
// step where no sequence samples (prefill chunks only).
class SamplingCpuEngine final : public Engine {
 public:
  explicit SamplingCpuEngine(Engine* inner) : inner_(inner) {}
  const ModelConfig& config() const override { return inner_->config(); }
  const EngineOptions& options() const override { return inner_->options(); }
  bool SupportsSampling() const override { return true; }
  absl::Status Step(const StepInput& input, StepOutput* output) override {
    StepInput in = input;
    bool any = false;
    for (SeqStepInput& s : in.seqs) {
      EXPECT_EQ(s.logits, SeqStepInput::Logits::kNone) << "an engine that samples is not asked for logits";
      if (s.sample) s.logits = SeqStepInput::Logits::kLast, any = true;
    }
    StepOutput inner;
    RETURN_IF_ERROR(inner_->Step(in, &inner));
    output->logits.clear();
    output->row_begin.assign(in.seqs.size() + 1, 0);
    output->sampled.clear();
    if (!any) {
      ++steps_without_samples;
      return absl::OkStatus();
    }
    output->sampled.resize(in.seqs.size());
    const int32_t vocab = config().vocab_size;
    for (size_t i = 0; i < in.seqs.size(); ++i) {
      if (!in.seqs[i].sample) continue;
      output->sampled[i].token = ArgMax(inner.logits.data() + int64_t{inner.row_begin[i]} * vocab, vocab);
    }
    return absl::OkStatus();
  }
  int steps_without_samples = 0;

 private:
  Engine* inner_;
};

TEST(EngineSamplingLoop, ChunkOnlyStepsAndGoldenTokens) {
  auto weights = LoadModelWeights(testing::DataPath("models/stories15M"));
  ASSERT_TRUE(weights.ok()) << weights.status();
  EngineOptions eo;
  eo.kv_format = {KvDtype::kFp32, KvScaleMode::kNone};
  eo.block_size = 16;
  eo.num_gpu_blocks = 64;
  auto cpu = CpuEngine::Create(std::move(*weights), eo);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  SamplingCpuEngine engine(cpu->get());
  SchedulerOptions so;
  so.max_num_seqs = 8;
  so.max_num_batched_tokens = 256;
  so.max_prefill_chunk = 16;  // the 43-token prompt takes three steps
  so.max_model_len = 256;
  so.blocks.num_gpu_blocks = eo.num_gpu_blocks;
  so.blocks.block_size = eo.block_size;
  so.blocks.bytes_per_block = (*cpu)->kv_bytes_per_block();
  std::map<int64_t, FinishedSeq> done;
  LoopCallbacks cb;
  cb.on_finish = [&](const FinishedSeq& f) { done[f.request_id.value()] = f; };
  auto loop = EngineLoop::Create(&engine, so, cb);
  ASSERT_TRUE(loop.ok()) << loop.status();
  const nlohmann::json golden = testing::LoadJson("golden/stories15M_greedy.json");
  std::map<std::string, nlohmann::json> cases;
  for (const auto& c : golden["cases"]) cases[c["id"].get<std::string>()] = c;
  ASSERT_TRUE(cases.count("dialogue_long") && cases.count("once_upon_a_time"));
  // The 43-token prompt alone first (its first two steps are chunks only),
  // then together with a short one.
  const std::vector<std::pair<int64_t, std::string>> rounds[2] = {
      {{0, "dialogue_long"}}, {{10, "dialogue_long"}, {11, "once_upon_a_time"}}};
  for (const auto& round : rounds) {
    for (const auto& [id, name] : round) {
      LoopRequest r;
      r.request_id = RequestId(id);
      r.prompt = cases[name]["prompt_ids"].get<std::vector<int32_t>>();
      r.max_tokens = 40;
      ASSERT_TRUE((*loop)->AddRequest(r).ok());
    }
    while ((*loop)->HasWork()) ASSERT_TRUE((*loop)->Step().ok());
  }
  EXPECT_GE(engine.steps_without_samples, 2);
  ASSERT_EQ(done.size(), 3u);
  for (const auto& [id, f] : done) {
    const std::string name = id == 11 ? "once_upon_a_time" : "dialogue_long";
    const auto expected = cases[name]["output_ids_ignore_bos"].get<std::vector<int32_t>>();
    ASSERT_EQ(f.output_tokens.size(), 40u) << name;
    for (size_t k = 0; k < 40; ++k) ASSERT_EQ(f.output_tokens[k], expected[k]) << name << " token " << k;
  }
  EXPECT_EQ((*loop)->scheduler().Stats().blocks.gpu_used, 0);
}

}  // namespace
}  // namespace strata
