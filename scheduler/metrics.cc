#include "scheduler/metrics.h"

#include <algorithm>
#include <exception>

#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

namespace strata {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

// Latency buckets in seconds: 1 ms .. 60 s.
Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}
// Per-token and per-step buckets: 0.1 ms .. 5 s.
Histogram::BucketBoundaries StepBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5};
}

}  // namespace

absl::StatusOr<std::unique_ptr<ServingMetrics>> ServingMetrics::Create(
    const std::string& listen_address, const ModelInfoLabels& info) {
  auto m = std::unique_ptr<ServingMetrics>(new ServingMetrics());
  m->registry_ = std::make_shared<prometheus::Registry>();
  m->Declare(info);
  if (!listen_address.empty()) {
    try {
      m->exposer_ = std::make_unique<prometheus::Exposer>(listen_address);
    } catch (const std::exception& e) {
      return absl::UnavailableError(
          absl::StrCat("--metrics-port: cannot listen on ", listen_address, ": ", e.what()));
    }
    m->exposer_->RegisterCollectable(m->registry_);
  }
  return m;
}

void ServingMetrics::Declare(const ModelInfoLabels& info) {
  auto& r = *registry_;
  BuildGauge()
      .Name("strata_model_info")
      .Help("Model and cache configuration of this server (value is always 1)")
      .Register(r)
      .Add({{"model", info.model},
            {"tp_size", std::to_string(info.tp_size)},
            {"kv_dtype", info.kv_dtype},
            {"kv_scale_mode", info.kv_scale_mode},
            {"block_size", std::to_string(info.block_size)},
            {"device", info.device}})
      .Set(1);
  prompt_tokens_ = &BuildCounter().Name("strata_prompt_tokens_total")
                        .Help("Prompt tokens prefilled (recomputation included)").Register(r).Add({});
  generation_tokens_ = &BuildCounter().Name("strata_generation_tokens_total")
                            .Help("Tokens generated").Register(r).Add({});
  auto& reqs = BuildGauge().Name("strata_requests").Help("Sequences by scheduler state").Register(r);
  running_ = &reqs.Add({{"state", "running"}});
  waiting_ = &reqs.Add({{"state", "waiting"}});
  swapped_ = &reqs.Add({{"state", "swapped"}});
  auto& usage = BuildGauge().Name("strata_kv_cache_usage_ratio")
                    .Help("Fraction of KV blocks in use, per pool").Register(r);
  gpu_usage_ = &usage.Add({{"pool", "gpu"}});
  cpu_usage_ = &usage.Add({{"pool", "cpu"}});
  auto& blocks = BuildGauge().Name("strata_kv_cache_blocks")
                     .Help("KV blocks per pool: used and total").Register(r);
  gpu_used_ = &blocks.Add({{"pool", "gpu"}, {"state", "used"}});
  gpu_total_ = &blocks.Add({{"pool", "gpu"}, {"state", "total"}});
  cpu_used_ = &blocks.Add({{"pool", "cpu"}, {"state", "used"}});
  cpu_total_ = &blocks.Add({{"pool", "cpu"}, {"state", "total"}});
  bytes_per_block_ = &BuildGauge().Name("strata_kv_cache_block_size_bytes")
                          .Help("Bytes of one KV block across all layers of one worker")
                          .Register(r).Add({});
  prefix_queries_ = &BuildCounter().Name("strata_prefix_cache_queries_total")
                         .Help("Prompt tokens looked up in the prefix cache").Register(r).Add({});
  prefix_hits_ = &BuildCounter().Name("strata_prefix_cache_hits_total")
                      .Help("Prompt tokens found in the prefix cache").Register(r).Add({});
  auto& pre = BuildCounter().Name("strata_preemptions_total")
                  .Help("Sequences preempted, by mode").Register(r);
  preempt_swap_ = &pre.Add({{"mode", "swap"}});
  preempt_recompute_ = &pre.Add({{"mode", "recompute"}});
  auto& swap = BuildCounter().Name("strata_swap_bytes_total")
                   .Help("KV bytes moved between the GPU and CPU pools").Register(r);
  swap_in_bytes_ = &swap.Add({{"direction", "in"}});
  swap_out_bytes_ = &swap.Add({{"direction", "out"}});
  steps_ = &BuildCounter().Name("strata_steps_total").Help("Engine steps run").Register(r).Add({});
  ttft_ = &BuildHistogram().Name("strata_time_to_first_token_seconds")
               .Help("Arrival to first generated token").Register(r).Add({}, LatencyBuckets());
  tpot_ = &BuildHistogram().Name("strata_time_per_output_token_seconds")
               .Help("Mean time per output token after the first, per request")
               .Register(r).Add({}, StepBuckets());
  e2e_ = &BuildHistogram().Name("strata_request_duration_seconds")
              .Help("Arrival to completion, per request").Register(r).Add({}, LatencyBuckets());
  step_ = &BuildHistogram().Name("strata_step_duration_seconds")
               .Help("Wall time of one engine step").Register(r).Add({}, StepBuckets());
  outcomes_ = &BuildCounter().Name("strata_requests_total")
                   .Help("Finished requests by outcome (finish reason or status code)").Register(r);
  worker_step_ = &BuildHistogram().Name("strata_worker_step_duration_seconds")
                      .Help("Forward pass of one step on one tensor-parallel rank").Register(r);
  auto& phases = BuildCounter().Name("strata_step_phase_seconds_total")
                     .Help("Engine step time by phase, with tensor-parallel workers: scheduler (planning, "
                           "results, token delivery), control_plane (messages to and from the slowest "
                           "rank), worker (its handling around the forward pass), forward")
                     .Register(r);
  phase_scheduler_ = &phases.Add({{"phase", "scheduler"}});
  phase_control_plane_ = &phases.Add({{"phase", "control_plane"}});
  phase_worker_ = &phases.Add({{"phase", "worker"}});
  phase_forward_ = &phases.Add({{"phase", "forward"}});
  worker_memory_ = &BuildGauge().Name("strata_worker_device_memory_bytes")
                        .Help("Memory of one rank by use (device memory for cuda ranks)").Register(r);
  worker_up_ = &BuildGauge().Name("strata_worker_up")
                    .Help("1 while the rank is running and connected to the scheduler").Register(r);
}

void ServingMetrics::SetWorkerUp(int rank, bool up) {
  worker_up_->Add({{"rank", std::to_string(rank)}}).Set(up ? 1 : 0);
}

void ServingMetrics::SetWorkerMemory(int rank, const std::string& kind, int64_t bytes) {
  worker_memory_->Add({{"rank", std::to_string(rank)}, {"kind", kind}}).Set(static_cast<double>(bytes));
}

void ServingMetrics::OnWorkerStep(int rank, double forward_seconds) {
  worker_step_->Add({{"rank", std::to_string(rank)}}, StepBuckets()).Observe(forward_seconds);
}

void ServingMetrics::OnRemoteStep(double wall_seconds, double worker_seconds, double forward_seconds) {
  phase_control_plane_->Increment(std::max(0.0, wall_seconds - worker_seconds));
  phase_worker_->Increment(std::max(0.0, worker_seconds - forward_seconds));
  phase_forward_->Increment(std::max(0.0, forward_seconds));
  remote_wall_ = wall_seconds;
}

void ServingMetrics::SetPoolSizes(int32_t gpu_blocks, int32_t cpu_blocks, int64_t bytes_per_block) {
  gpu_total_->Set(gpu_blocks);
  cpu_total_->Set(cpu_blocks);
  bytes_per_block_->Set(static_cast<double>(bytes_per_block));
}

void ServingMetrics::OnStep(const SchedulerStats& s, double step_seconds, int64_t prompt_tokens,
                            int64_t generation_tokens) {
  running_->Set(s.num_running);
  waiting_->Set(s.num_waiting);
  swapped_->Set(s.num_swapped);
  gpu_used_->Set(s.blocks.gpu_used);
  cpu_used_->Set(s.blocks.cpu_used);
  gpu_usage_->Set(s.blocks.gpu_total > 0 ? double(s.blocks.gpu_used) / s.blocks.gpu_total : 0.0);
  cpu_usage_->Set(s.blocks.cpu_total > 0 ? double(s.blocks.cpu_used) / s.blocks.cpu_total : 0.0);
  auto inc = [](prometheus::Counter* c, int64_t now, int64_t before) {
    if (now > before) c->Increment(static_cast<double>(now - before));
  };
  inc(prefix_queries_, s.blocks.prefix_queried_tokens, last_.blocks.prefix_queried_tokens);
  inc(prefix_hits_, s.blocks.prefix_hit_tokens, last_.blocks.prefix_hit_tokens);
  inc(preempt_swap_, s.preemptions_swap, last_.preemptions_swap);
  inc(preempt_recompute_, s.preemptions_recompute, last_.preemptions_recompute);
  inc(swap_in_bytes_, s.blocks.bytes_swapped_in, last_.blocks.bytes_swapped_in);
  inc(swap_out_bytes_, s.blocks.bytes_swapped_out, last_.blocks.bytes_swapped_out);
  last_ = s;
  if (prompt_tokens > 0) prompt_tokens_->Increment(static_cast<double>(prompt_tokens));
  if (generation_tokens > 0) generation_tokens_->Increment(static_cast<double>(generation_tokens));
  steps_->Increment();
  step_->Observe(step_seconds);
  if (in_process_worker_) OnWorkerStep(0, step_seconds);
  if (remote_wall_ >= 0) {
    phase_scheduler_->Increment(std::max(0.0, step_seconds - remote_wall_));
    remote_wall_ = -1;
  }
}

void ServingMetrics::OnFirstToken(double seconds) { ttft_->Observe(seconds); }

void ServingMetrics::OnRequestDone(const std::string& outcome, double e2e_seconds,
                                   double seconds_per_output_token, int64_t output_tokens) {
  outcomes_->Add({{"outcome", outcome}}).Increment();
  e2e_->Observe(e2e_seconds);
  if (output_tokens > 1) tpot_->Observe(seconds_per_output_token);
}

std::string ServingMetrics::Serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace strata
