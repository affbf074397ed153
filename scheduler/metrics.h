// Every Prometheus metric the scheduler exports, declared in one place.
// Names are a public interface (dashboards and alerts use them): never rename
// one; add a new one instead. Base units, `strata_` prefix, `_total` for
// counters, `_seconds` / `_bytes` for units. The list is documented in
// deploy/METRICS.md.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "scheduler/sched_types.h"

namespace strata {

struct ModelInfoLabels {
  std::string model;
  int32_t tp_size = 1;
  std::string kv_dtype;
  std::string kv_scale_mode;
  int32_t block_size = 16;
  std::string device;  // "cpu" or "cuda"
};

class ServingMetrics {
 public:
  // `listen_address` "host:port" starts the pull exposer (/metrics); empty
  // keeps the registry only (tests read Serialize()). UNAVAILABLE if the port
  // cannot be bound.
  static absl::StatusOr<std::unique_ptr<ServingMetrics>> Create(const std::string& listen_address,
                                                                const ModelInfoLabels& info);

  // Pool sizes, known at start-up.
  void SetPoolSizes(int32_t gpu_blocks, int32_t cpu_blocks, int64_t bytes_per_block);
  // After every step: gauges from the scheduler's stats, counters from the
  // step's work. Counter deltas come from the monotonic stats.
  void OnStep(const SchedulerStats& stats, double step_seconds, int64_t prompt_tokens,
              int64_t generation_tokens);
  void OnFirstToken(double seconds_since_arrival);
  // outcome: a finish reason ("stop", "length") or a status code name
  // ("cancelled", "invalid_argument", "unavailable", ...).
  void OnRequestDone(const std::string& outcome, double e2e_seconds, double seconds_per_output_token,
                     int64_t output_tokens);

  // Workers (tensor-parallel ranks; rank 0 alone for an in-process engine).
  // Thread-safe.
  void SetWorkerUp(int rank, bool up);
  // kind: weights, kv_cache, activations, swap, free, total.
  void SetWorkerMemory(int rank, const std::string& kind, int64_t bytes);
  void OnWorkerStep(int rank, double forward_seconds);
  // Tensor-parallel workers: where one step's time went (seconds; the slowest
  // rank's). wall = the scheduler's call to the workers, worker = step message
  // in -> reply out on the rank, forward = the rank's engine step. Call on the
  // engine thread before that step's OnStep, which adds the scheduler's own
  // part (step - wall) to strata_step_phase_seconds_total.
  void OnRemoteStep(double wall_seconds, double worker_seconds, double forward_seconds);
  // In-process engine: every OnStep also counts as rank 0's forward pass.
  void set_in_process_worker(bool on) { in_process_worker_ = on; }

  prometheus::Registry& registry() { return *registry_; }
  std::string Serialize() const;  // text exposition format

 private:
  ServingMetrics() = default;
  void Declare(const ModelInfoLabels& info);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;

  prometheus::Counter* prompt_tokens_ = nullptr;
  prometheus::Counter* generation_tokens_ = nullptr;
  prometheus::Gauge* running_ = nullptr;
  prometheus::Gauge* waiting_ = nullptr;
  prometheus::Gauge* swapped_ = nullptr;
  prometheus::Gauge* gpu_usage_ = nullptr;
  prometheus::Gauge* cpu_usage_ = nullptr;
  prometheus::Gauge* gpu_used_ = nullptr;
  prometheus::Gauge* gpu_total_ = nullptr;
  prometheus::Gauge* cpu_used_ = nullptr;
  prometheus::Gauge* cpu_total_ = nullptr;
  prometheus::Gauge* bytes_per_block_ = nullptr;
  prometheus::Counter* prefix_queries_ = nullptr;
  prometheus::Counter* prefix_hits_ = nullptr;
  prometheus::Counter* preempt_swap_ = nullptr;
  prometheus::Counter* preempt_recompute_ = nullptr;
  prometheus::Counter* swap_in_bytes_ = nullptr;
  prometheus::Counter* swap_out_bytes_ = nullptr;
  prometheus::Counter* steps_ = nullptr;
  prometheus::Histogram* ttft_ = nullptr;
  prometheus::Histogram* tpot_ = nullptr;
  prometheus::Histogram* e2e_ = nullptr;
  prometheus::Histogram* step_ = nullptr;
  prometheus::Family<prometheus::Counter>* outcomes_ = nullptr;
  prometheus::Family<prometheus::Histogram>* worker_step_ = nullptr;
  prometheus::Family<prometheus::Gauge>* worker_memory_ = nullptr;
  prometheus::Family<prometheus::Gauge>* worker_up_ = nullptr;
  prometheus::Counter* phase_scheduler_ = nullptr;
  prometheus::Counter* phase_control_plane_ = nullptr;
  prometheus::Counter* phase_worker_ = nullptr;
  prometheus::Counter* phase_forward_ = nullptr;
  double remote_wall_ = -1;  // OnRemoteStep -> OnStep, engine thread only
  bool in_process_worker_ = false;
  SchedulerStats last_;  // for counter deltas
};

}  // namespace strata
