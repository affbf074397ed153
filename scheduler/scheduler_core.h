// Scheduler core: iteration-level (continuous) batching over the block
// manager. Pure host code; see scheduler/DESIGN.md.
//
// Engine loop (one thread owns the Scheduler and calls everything on it):
//
//   ASSIGN_OR_RETURN(SeqId id, sched.AddRequest(req));   // any time
//   StepPlan plan = sched.Schedule();                     // then, strictly alternating:
//   StepResult r = worker.Execute(plan);                  //   (even for an empty plan)
//   ASSIGN_OR_RETURN(auto finished, sched.OnStepResult(r));
//   sched.Abort(id or request id);                        // any time, frees blocks at once
//
// Sequence states: waiting (no blocks) -> running (GPU table) <-> swapped
// (CPU table); running -> waiting on recompute preemption; any -> gone on
// finish or abort. Each Schedule():
//   1. running sequences, oldest first: a decode gets 1 token, a prefill a
//      chunk (leaving budget for the decodes behind it); if blocks run out,
//      the newest running sequences not yet scheduled this step are
//      preempted (swap or recompute, PreemptionMode), the sequence itself
//      last;
//   2. if nothing was preempted: swapped sequences come back, oldest first;
//   3. if nothing was preempted and none is swapped: waiting sequences are
//      admitted oldest first (prefix-cache hits reduce their prefill) while
//      max_num_seqs, the token budget and the free blocks (above the
//      watermark) allow.
// The oldest running sequence is never a victim while others run, and a
// request admitted at all fits the whole GPU pool alone, so it always makes
// progress.
//
// Status codes (AddRequest): INVALID_ARGUMENT, permanent (malformed request,
// longer than max_model_len); RESOURCE_EXHAUSTED, permanent for this server
// configuration (the request alone needs more KV blocks than the GPU pool has:
// retry on a server with a larger cache); UNAVAILABLE, retry later (waiting
// queue full); ALREADY_EXISTS (request id in use).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/block_manager.h"
#include "runtime/ids.h"
#include "scheduler/sched_types.h"

namespace strata {

class Scheduler {
 public:
  // INVALID_ARGUMENT for inconsistent options (non-positive limits, block
  // size not a power of two, empty GPU pool, watermark outside [0, 1), a
  // max_model_len the pool cannot hold is allowed: such requests are
  // rejected one by one).
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(const SchedulerOptions& options);

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Validates and enqueues a request as one new sequence. Codes: see above.
  absl::StatusOr<SeqId> AddRequest(SchedRequest request);

  // Plans one step. CHECK-fails if the previous plan's OnStepResult is missing.
  StepPlan Schedule();

  // Applies a step's outcome: computed tokens are committed (full blocks enter
  // the prefix cache), sampled tokens appended, and sequences that sampled a
  // stop token or reached max_tokens / max_model_len are finished and their
  // blocks freed. INVALID_ARGUMENT (state unchanged, the step stays pending)
  // if step_id is not the pending step, a token is reported for a sequence
  // that did not need one, or a live sequence that needed one has none.
  absl::StatusOr<std::vector<FinishedSeq>> OnStepResult(const StepResult& result);

  // Cancels a sequence / every sequence of a request, in any state; its blocks
  // are freed at once. NOT_FOUND if unknown (or already finished).
  absl::Status Abort(SeqId seq);
  absl::Status Abort(RequestId request);

  // Parallel sampling: a new running sequence of the same request sharing all
  // of `parent`'s blocks (copy-on-write on the next append). If
  // `replace_last_token` is set, the child's last token (which must not be
  // computed yet, i.e. a freshly sampled one) is replaced by it.
  // FAILED_PRECONDITION unless parent is running and no step is pending;
  // RESOURCE_EXHAUSTED at max_num_seqs.
  // INVALID_ARGUMENT if the replacement is negative or a stop token.
  absl::StatusOr<SeqId> Fork(SeqId parent, std::optional<int32_t> replace_last_token = {});

  // --- queries (metrics, tests) ---
  SchedulerStats Stats() const;
  const SchedulerOptions& options() const { return options_; }
  const BlockManager& block_manager() const { return bm_; }
  bool step_pending() const { return step_pending_; }
  bool HasSeq(SeqId seq) const { return seqs_.contains(seq); }
  int32_t num_seqs() const { return static_cast<int32_t>(seqs_.size()); }
  // Tokens (prompt + output so far) and computed count of a live sequence.
  const std::vector<int32_t>& SeqTokens(SeqId seq) const;
  int32_t SeqNumComputed(SeqId seq) const;

  // Checks queue membership and order, per-state block tables, token counts,
  // and the block manager's invariants. Call between steps.
  absl::Status CheckInvariants() const;

 private:
  enum class SeqStatus : uint8_t { kWaiting, kRunning, kSwapped, kFinished };
  struct Sequence {
    SeqId id;
    RequestId request_id;
    int64_t arrival = 0;  // FCFS order; a fork is newer than its parent
    std::vector<int32_t> tokens;
    int32_t prompt_len = 0;
    int32_t num_computed = 0;
    int32_t max_tokens = 0;
    std::vector<int32_t> stop_token_ids;
    SeqStatus status = SeqStatus::kWaiting;
    int32_t num_outputs() const { return static_cast<int32_t>(tokens.size()) - prompt_len; }
    int32_t uncomputed() const { return static_cast<int32_t>(tokens.size()) - num_computed; }
  };
  struct InFlight {
    SeqId seq;
    int32_t num_tokens;
    bool needs_logits;
  };
  using Queue = std::deque<Sequence*>;  // sorted by arrival

  explicit Scheduler(const SchedulerOptions& options);

  Sequence* Find(SeqId seq);
  const Sequence* Find(SeqId seq) const;
  int32_t ChunkFor(int32_t uncomputed, int32_t tokens_left) const;
  void ScheduleRunning(StepPlan* plan, int32_t* tokens_left, bool* preempted);
  void ScheduleSwapped(StepPlan* plan, int32_t* tokens_left);
  void ScheduleWaiting(StepPlan* plan, int32_t* tokens_left);
  void Preempt(Sequence* s, StepPlan* plan);
  void AddToPlan(Sequence* s, int32_t n, StepPlan* plan);
  void InsertRunning(Sequence* s);
  static void InsertByArrival(Queue* q, Sequence* s);
  void Remove(Sequence* s);  // from its queue, its table, the maps

  SchedulerOptions options_;
  BlockManager bm_;
  int32_t watermark_blocks_ = 0;
  // Mutable state below is owned by the engine thread.
  absl::flat_hash_map<SeqId, std::unique_ptr<Sequence>> seqs_;
  absl::flat_hash_map<RequestId, absl::InlinedVector<SeqId, 1>> by_request_;
  std::vector<Sequence*> running_;  // sorted by arrival; back = newest = first victim
  Queue waiting_;
  Queue swapped_;
  std::vector<InFlight> in_flight_;
  bool step_pending_ = false;
  int64_t step_id_ = 0;
  int64_t next_seq_id_ = 0;
  int64_t next_arrival_ = 0;
  SchedulerStats stats_;
};

}  // namespace strata
