#include "scheduler/metrics.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

using ::testing::HasSubstr;

TEST(ServingMetrics, ExportsCountersGaugesAndHistograms) {
  auto m = ServingMetrics::Create("", {"stories15M", 2, "int8", "dynamic", 16, "cpu"});
  ASSERT_TRUE(m.ok()) << m.status();
  (*m)->SetPoolSizes(100, 50, 4096);
  SchedulerStats s;
  s.num_running = 3;
  s.blocks.gpu_total = 100;
  s.blocks.gpu_used = 25;
  s.blocks.prefix_queried_tokens = 64;
  s.blocks.prefix_hit_tokens = 16;
  s.preemptions_swap = 2;
  s.blocks.bytes_swapped_out = 8192;
  (*m)->OnStep(s, 0.004, 10, 3);
  s.preemptions_swap = 5;
  (*m)->OnStep(s, 0.006, 0, 3);
  (*m)->OnFirstToken(0.02);
  (*m)->OnRequestDone("stop", 0.5, 0.01, 12);
  const std::string text = (*m)->Serialize();
  EXPECT_THAT(text, HasSubstr("strata_model_info{block_size=\"16\",device=\"cpu\",kv_dtype=\"int8\",kv_scale_mode=\"dynamic\",model=\"stories15M\",tp_size=\"2\"} 1"));
  EXPECT_THAT(text, HasSubstr("strata_prompt_tokens_total 10"));
  EXPECT_THAT(text, HasSubstr("strata_generation_tokens_total 6"));
  EXPECT_THAT(text, HasSubstr("strata_kv_cache_usage_ratio{pool=\"gpu\"} 0.25"));
  EXPECT_THAT(text, HasSubstr("strata_kv_cache_blocks{pool=\"gpu\",state=\"total\"} 100"));
  EXPECT_THAT(text, HasSubstr("strata_preemptions_total{mode=\"swap\"} 5"));
  EXPECT_THAT(text, HasSubstr("strata_swap_bytes_total{direction=\"out\"} 8192"));
  EXPECT_THAT(text, HasSubstr("strata_prefix_cache_hits_total 16"));
  EXPECT_THAT(text, HasSubstr("strata_requests_total{outcome=\"stop\"} 1"));
  EXPECT_THAT(text, HasSubstr("strata_step_duration_seconds_count 2"));
  EXPECT_THAT(text, HasSubstr("strata_requests{state=\"running\"} 3"));
}

TEST(ServingMetrics, WorkerSeriesPerRank) {
  auto m = ServingMetrics::Create("", {"llama-2-7b", 2, "int8", "dynamic", 16, "cuda"});
  ASSERT_TRUE(m.ok()) << m.status();
  (*m)->SetWorkerUp(0, true);
  (*m)->SetWorkerUp(1, false);
  (*m)->SetWorkerMemory(1, "weights", 6700000000);
  (*m)->OnWorkerStep(0, 0.012);
  (*m)->OnWorkerStep(0, 0.013);
  (*m)->OnWorkerStep(1, 0.020);
  SchedulerStats s;
  (*m)->OnStep(s, 0.05, 0, 0);  // not in process: no extra rank-0 observation
  std::string text = (*m)->Serialize();
  EXPECT_THAT(text, HasSubstr("strata_worker_up{rank=\"0\"} 1"));
  EXPECT_THAT(text, HasSubstr("strata_worker_up{rank=\"1\"} 0"));
  EXPECT_THAT(text, HasSubstr("strata_worker_device_memory_bytes{kind=\"weights\",rank=\"1\"} 6700000000"));
  EXPECT_THAT(text, HasSubstr("strata_worker_step_duration_seconds_count{rank=\"0\"} 2"));
  EXPECT_THAT(text, HasSubstr("strata_worker_step_duration_seconds_count{rank=\"1\"} 1"));
  // In process, every engine step is rank 0's forward pass.
  (*m)->set_in_process_worker(true);
  (*m)->OnStep(s, 0.05, 0, 0);
  text = (*m)->Serialize();
  EXPECT_THAT(text, HasSubstr("strata_worker_step_duration_seconds_count{rank=\"0\"} 3"));
}

TEST(ServingMetrics, StepPhasesWithWorkers) {
  auto m = ServingMetrics::Create("", {"llama-2-7b", 2, "int8", "dynamic", 16, "cuda"});
  ASSERT_TRUE(m.ok()) << m.status();
  SchedulerStats s;
  (*m)->OnRemoteStep(/*wall=*/0.75, /*worker=*/0.5, /*forward=*/0.25);
  (*m)->OnStep(s, 1.0, 0, 0);
  (*m)->OnStep(s, 2.0, 0, 0);  // no remote call in this step: no scheduler share either
  const std::string text = (*m)->Serialize();
  EXPECT_THAT(text, HasSubstr("strata_step_phase_seconds_total{phase=\"scheduler\"} 0.25"));
  EXPECT_THAT(text, HasSubstr("strata_step_phase_seconds_total{phase=\"control_plane\"} 0.25"));
  EXPECT_THAT(text, HasSubstr("strata_step_phase_seconds_total{phase=\"worker\"} 0.25"));
  EXPECT_THAT(text, HasSubstr("strata_step_phase_seconds_total{phase=\"forward\"} 0.25"));
}

TEST(ServingMetrics, BadListenAddressIsAnError) {
  auto m = ServingMetrics::Create("256.1.1.1:99999", {});
  EXPECT_FALSE(m.ok());
}

}  // namespace
}  // namespace strata
