// The serving engine: one thread that owns the EngineLoop (scheduler +
// Engine + sampling) and turns sampled tokens into response chunks for the
// RPC layer. gRPC handlers never touch the scheduler: they validate a request
// (request_validation.h), Submit() it with a sink, and Cancel() it; the engine
// thread applies those commands between steps, runs steps while there is
// work, and calls the sinks.
//
//   handler thread:  Submit(req, sink) ──> inbox ──> engine thread: AddRequest
//                    Cancel(handle)    ──> inbox ──> engine thread: Abort (blocks freed)
//   engine thread:   Step() -> on_token -> detokenize, stop strings, logprobs
//                    -> sink->OnChunk(...) ... sink->OnDone(status, last chunk)
//
// Every submitted request gets exactly one OnDone, on the engine thread:
// OK (finished: stop or length), CANCELLED (Cancel), UNAVAILABLE (shutting
// down, or the engine failed with UNAVAILABLE: a lost worker), or the
// scheduler's admission error (INVALID_ARGUMENT, RESOURCE_EXHAUSTED).
//
// Ownership: the ServingEngine owns its thread, the EngineLoop and the
// per-request state; it borrows the Engine and Tokenizer (they must outlive
// it). Sinks are shared with the RPC layer and must not block.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/strata_v1_generation.pb.h"
#include "runtime/sampling.h"
#include "runtime/tokenizer.h"
#include "scheduler/engine_loop.h"
#include "scheduler/metrics.h"
#include "worker/engine.h"

namespace strata::serving {

// A validated request, in tokens.
struct ServingRequest {
  std::vector<int32_t> prompt;  // non-empty, inside the vocabulary
  int32_t max_tokens = 16;      // prompt + max_tokens <= context
  SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;  // sampled -> finish (not reported); EOS/BOS by default
  std::vector<std::string> stop_strings;
  int32_t num_logprobs = -1;  // -1 none, 0 sampled token only, n top n
  std::string label;          // client's request_id, for logs
};

// Receives one request's output. Called on the engine thread only; must not
// block (queue and return).
class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  // New tokens and/or text (finish_reason and usage unset).
  virtual void OnChunk(v1::GenerateResponse chunk) = 0;
  // Exactly once. On OK, `last` carries finish_reason, usage and any final
  // tokens/text; otherwise it is empty.
  virtual void OnDone(const absl::Status& status, v1::GenerateResponse last) = 0;
};

struct ServingEngineOptions {
  SchedulerOptions scheduler;
  // Requests accepted but not finished, at most max_num_seqs + this many;
  // beyond that Submit() answers RESOURCE_EXHAUSTED.
  int32_t max_queued_requests = 1024;
  // Optional, called on the engine thread around each round of work: the
  // commands taken between steps (so their answers, e.g. cancellations, do
  // not wait for the step), then the step; never across an idle wait. Sinks
  // that batch what they hand to another thread per step (the gRPC stream
  // writer, StreamWriter::BeginBatch / EndBatch) hook in here.
  std::function<void()> begin_round;
  std::function<void()> end_round;
};

// A copy of the engine thread's counters, published after every step and
// command batch.
struct ServingStats {
  SchedulerStats scheduler;
  int64_t in_flight = 0;      // submitted, not yet done
  bool engine_healthy = true;  // false after an engine step failed, until one succeeds
};

class ServingEngine {
 public:
  // Starts the engine thread. `engine`, `tokenizer` and `metrics` (may be
  // null) must outlive the returned object; metrics are updated on the
  // engine thread. Errors: the scheduler options do not fit the engine.
  static absl::StatusOr<std::unique_ptr<ServingEngine>> Create(Engine* engine,
                                                               const Tokenizer* tokenizer,
                                                               ServingMetrics* metrics,
                                                               const ServingEngineOptions& options);
  ~ServingEngine();  // Stop()
  ServingEngine(const ServingEngine&) = delete;
  ServingEngine& operator=(const ServingEngine&) = delete;

  // Thread-safe. Returns a handle for Cancel(). RESOURCE_EXHAUSTED when the
  // queue is full, UNAVAILABLE while draining or stopped; the sink is then
  // never called.
  absl::StatusOr<uint64_t> Submit(ServingRequest request, std::shared_ptr<GenerationSink> sink);
  // Thread-safe; unknown or finished handles are ignored. The request's
  // blocks are freed when the engine thread picks the command up (between
  // steps), and its sink gets OnDone(CANCELLED).
  void Cancel(uint64_t handle);

  // Stops admitting (Submit -> UNAVAILABLE) and waits up to `timeout` for
  // the requests in flight to finish. True if none is left.
  bool Drain(absl::Duration timeout);
  // Fails whatever is still in flight with UNAVAILABLE, frees its blocks and
  // joins the engine thread. Idempotent.
  void Stop();

  ServingStats Stats() const;

 private:
  struct Command {
    enum class Kind { kAdd, kCancel } kind;
    uint64_t handle = 0;
    ServingRequest request;
    std::shared_ptr<GenerationSink> sink;
    absl::Time arrival;
  };
  struct Active;  // per-request state, engine thread only
  class LogitsTap;

  ServingEngine(const Tokenizer* tokenizer, ServingMetrics* metrics,
                const ServingEngineOptions& options);
  void Run();  // the engine thread
  void Apply(Command& command);
  void OnToken(RequestId id, int32_t token, const StepOutput::Sampled* sampled);
  void OnFinish(const FinishedSeq& finished);
  void Finish(Active& a, const absl::Status& status, v1::GenerateResponse last);
  void FailAll(const absl::Status& status);
  void Publish();
  bool Wakeable() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !inbox_.empty() || stop_; }
  bool Drained() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return in_flight_ == 0; }

  const Tokenizer* tokenizer_;
  ServingMetrics* const metrics_;
  const ServingEngineOptions options_;
  std::unique_ptr<LogitsTap> tap_;
  std::unique_ptr<EngineLoop> loop_;
  const int64_t max_in_flight_;

  // --- engine thread only ---
  absl::flat_hash_map<uint64_t, std::unique_ptr<Active>> active_;
  std::vector<uint64_t> to_abort_;  // finished by a stop token/string during a step
  bool engine_healthy_ = true;
  int64_t step_sampled_ = 0;  // tokens sampled in the current step (metrics)

  // --- shared ---
  mutable absl::Mutex mu_;
  std::deque<Command> inbox_ ABSL_GUARDED_BY(mu_);
  bool admitting_ ABSL_GUARDED_BY(mu_) = true;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_handle_ ABSL_GUARDED_BY(mu_) = 1;
  ServingStats published_ ABSL_GUARDED_BY(mu_);

  std::thread thread_;
};

}  // namespace strata::serving
