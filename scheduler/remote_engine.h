// RemoteEngine: the Engine interface (worker/engine.h) over the control-plane
// streams of tensor-parallel workers, so EngineLoop drives remote workers
// unchanged.
//
// Connect() runs the handshake: every worker gets Init (model, KV format,
// rendezvous prefix) and answers Ready with what its shard's KV budget holds;
// the engine takes the minimum over ranks (capped by the options) and sends
// Allocate; the workers allocate their pools and join their collectives.
//
// Step() sends the same Step message (tokens, positions, block tables,
// swap/copy lists, sampling parameters) to every rank over its stream, and
// waits for every rank's StepResult; rank 0's carries the logits asked for
// and the sampled tokens (SupportsSampling() is true). Failure handling:
//   - a worker whose stream breaks (process died) or that does not answer
//     within step_timeout (hung), or that reports a collective failure, makes
//     the engine unhealthy for good: that Step and every later one return
//     UNAVAILABLE naming the worker, and all streams are closed so the other
//     workers exit. Nothing blocks past step_timeout.
//   - a step every rank rejects with INVALID_ARGUMENT (validation) comes back
//     as that error; the engine stays healthy.
//
// Threading: Connect/Step/Shutdown on the engine thread; health() and
// timings() from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "scheduler/control_plane.h"
#include "worker/engine.h"

namespace strata {

struct RemoteEngineOptions {
  int32_t world_size = 1;
  // What every worker loads: "auto" (model_path: HF directory or llama2.c
  // .bin) or "dummy" (random weights of the NamedModelShape dummy_shape).
  std::string load_format = "auto";
  std::string model_path;
  std::string dummy_shape;
  uint64_t dummy_seed = 0;
  KvFormat kv_format;
  int32_t block_size = 16;
  std::string kv_quant_params_path;  // static scale modes
  // Caps on the pools the workers report (0 / -1: no cap).
  int32_t max_gpu_blocks = 0;
  int32_t max_cpu_blocks = -1;
  absl::Duration step_timeout = absl::Seconds(60);
  absl::Duration collective_timeout = absl::Seconds(60);
  // The workers' engine: "cpu" or "cuda" (worker.proto's Init says what the
  // cuda fields mean; 0 / "" leave the engine defaults).
  std::string device = "cpu";
  std::string dtype;
  double gpu_memory_utilization = 0.0;
  int32_t max_num_seqs = 0;
  int32_t max_num_tokens = 0;
  bool enforce_eager = false;
  bool serialize_mixed_attention = false;
};

// What one rank reported.
struct RankMemory {
  std::string device;  // "cpu", "cuda:0 NVIDIA H100 80GB HBM3"
  int64_t total = 0, weights = 0, activations = 0, kv_cache = 0, swap = 0, free = 0;
};

// Per-step timing, microseconds.
struct RemoteStepTimings {
  int64_t steps = 0;
  int64_t wall_us = 0;    // Step() on the scheduler: encode, send, wait, decode
  int64_t worker_us = 0;  // slowest rank: step message in -> reply out
  int64_t engine_us = 0;  // slowest rank: the forward pass alone
  // wall_us - worker_us: transport, scheduling and (de)serialization on the
  // scheduler's side; worker_us - engine_us: the worker's own overhead.
};

class RemoteEngine final : public Engine {
 public:
  // Waits (until `deadline`) for world_size workers on `control_plane`, then
  // runs the handshake. `abort_check` runs about every 100 ms while waiting
  // (WorkerPool uses it to notice a worker process that exited). On failure,
  // the workers' streams are closed.
  static absl::StatusOr<std::unique_ptr<RemoteEngine>> Connect(
      ControlPlane* control_plane, const RemoteEngineOptions& options, absl::Time deadline,
      const std::function<absl::Status()>& abort_check = {});
  ~RemoteEngine() override;

  const ModelConfig& config() const override { return config_; }
  const EngineOptions& options() const override { return engine_options_; }
  absl::Status Step(const StepInput& input, StepOutput* output) override;
  bool SupportsSampling() const override { return true; }

  // Bytes of one KV block on one rank, all layers (for SchedulerOptions).
  int64_t kv_bytes_per_block() const { return kv_bytes_per_block_; }
  // OK, or why the engine failed (UNAVAILABLE). Also notices a worker whose
  // stream closed while idle.
  absl::Status health() const;
  RemoteStepTimings timings() const;  // totals since Connect
  RemoteStepTimings last_timings() const;
  // Each rank's memory report from the handshake (index = rank).
  const std::vector<RankMemory>& memory() const { return memory_; }
  // Called on the engine thread after every successful step with each rank's
  // times (microseconds): step message in -> reply out, and the forward pass.
  using RankStepObserver = std::function<void(int rank, int64_t worker_us, int64_t engine_us)>;
  void set_rank_step_observer(RankStepObserver observer) { rank_observer_ = std::move(observer); }
  // Called on the engine thread after every successful step with its timings
  // (steps = 1), after the rank observer.
  using StepObserver = std::function<void(const RemoteStepTimings& step)>;
  void set_step_observer(StepObserver observer) { step_observer_ = std::move(observer); }
  // Sends Shutdown to every worker and closes the streams. Idempotent.
  void Shutdown(const std::string& reason);

 private:
  RemoteEngine() = default;
  // Marks the engine failed (first failure wins), closes every stream, and
  // returns the UNAVAILABLE status to hand back.
  absl::Status Fail(const absl::Status& why);
  absl::StatusOr<worker::v1::WorkerMessage> ReceiveFrom(
      int rank, absl::Time deadline, const std::function<absl::Status()>& abort_check);
  absl::Status Handshake(const RemoteEngineOptions& o, absl::Time deadline,
                         const std::function<absl::Status()>& abort_check);

  std::vector<std::shared_ptr<WorkerConnection>> workers_;  // index = rank
  ModelConfig config_;
  EngineOptions engine_options_;
  int64_t kv_bytes_per_block_ = 0;
  std::vector<RankMemory> memory_;
  RankStepObserver rank_observer_;
  StepObserver step_observer_;
  std::vector<int64_t> rank_us_;  // this step: (worker_us, engine_us) per rank
  absl::Duration step_timeout_;
  int64_t next_step_id_ = 1;
  worker::v1::Step step_proto_;  // the step being sent (engine thread), reused
  bool shut_down_ = false;

  mutable absl::Mutex mu_;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  RemoteStepTimings total_ ABSL_GUARDED_BY(mu_), last_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata
