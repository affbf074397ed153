// End to end on the CPU: scheduler + block manager + CPU engine with a KV
// cache too small for the batch, so sequences are preempted (by swapping to
// the CPU pool, or by freeing and recomputing). Greedy outputs must still
// match the reference exactly, and every block must come back.
#include <map>

#include "gtest/gtest.h"
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

}  // namespace
}  // namespace strata
