// The engine loop: the scheduler core driving an Engine (in-process CPU or
// CUDA engine, or remote workers behind the same interface). One thread owns
// an EngineLoop; it alternates Schedule() -> Engine::Step() -> sampling ->
// OnStepResult(). Requests are added and aborted between steps.
//
// Sampling: engines that sample on their side (the CUDA engine, remote
// workers) get each sequence's parameters and return only token ids (and
// asked-for log-probs), so logits never cross to the host; for the others the
// loop samples from the returned logits. Either way a seeded request's random
// stream is keyed by (seed, position of the sampled token), so its tokens do
// not depend on the batch, on preemption or on which engine runs it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "runtime/sampling.h"
#include "scheduler/scheduler_core.h"
#include "worker/engine.h"

namespace strata {

struct LoopRequest {
  RequestId request_id;
  std::vector<int32_t> prompt;
  int32_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;
  // Log-probabilities of each sampled token: -1 none, 0 the sampled token's,
  // n also the top n. Engines that sample (SupportsSampling) compute them;
  // otherwise the caller reads them off the logits (LoopCallbacks).
  int32_t num_logprobs = -1;
};

// Called for every token a sequence emits, and once when it finishes.
struct LoopCallbacks {
  // `sampled` is the engine's sample (token, log-probs when asked) when the
  // engine samples (Engine::SupportsSampling), else null: the loop sampled
  // from the logits the engine returned.
  std::function<void(RequestId, int32_t token, const StepOutput::Sampled* sampled)> on_token;
  std::function<void(const FinishedSeq&)> on_finish;
};

class EngineLoop {
 public:
  // `engine` must outlive the loop. Scheduler options' pool sizes and block
  // size must match the engine's.
  static absl::StatusOr<std::unique_ptr<EngineLoop>> Create(Engine* engine,
                                                            const SchedulerOptions& options,
                                                            LoopCallbacks callbacks = {});

  // Validates sampling and token ids, then enqueues. Codes as Scheduler::AddRequest.
  absl::StatusOr<SeqId> AddRequest(const LoopRequest& request);
  absl::Status Abort(RequestId request);

  // Runs one step (no-op when idle). Engine failures come back as its status;
  // the step's sequences are then aborted and reported as failed.
  absl::Status Step();
  bool HasWork() const;
  // Steps until idle.
  absl::Status RunToCompletion();

  const Scheduler& scheduler() const { return *scheduler_; }

 private:
  EngineLoop(Engine* engine, std::unique_ptr<Scheduler> scheduler, LoopCallbacks callbacks);

  Engine* engine_;
  std::unique_ptr<Scheduler> scheduler_;
  LoopCallbacks callbacks_;
  struct SeqSampling {
    SamplingParams params;
    int32_t num_logprobs = -1;
  };
  absl::flat_hash_map<SeqId, SeqSampling> sampling_;
  StepInput input_;    // reused across steps (Step rebuilds it in place)
  StepOutput output_;  // reused across steps
  std::vector<int32_t> sampled_index_;  // this step's result.sampled[k] -> plan/output index
};

}  // namespace strata
