// Plain data exchanged between the scheduler core and the engine loop:
// requests in, step plans out, sampled tokens back.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/block_manager.h"
#include "runtime/ids.h"

namespace strata {

// What to do with a running sequence when the GPU pool runs out of blocks.
enum class PreemptionMode : uint8_t {
  kRecompute = 0,  // free its blocks; it re-enters the waiting queue and is prefilled again
  kSwap = 1,       // copy its blocks to CPU swap space; falls back to recompute
                   // (counted in swap_fallbacks) when swap space is short
  kAuto = 2,       // swap when swap space allows and the sequence has more than
                   // auto_recompute_max_tokens computed tokens, else recompute
};
// "recompute" | "swap" | "auto" (the --preemption-mode flag); INVALID_ARGUMENT otherwise.
absl::StatusOr<PreemptionMode> ParsePreemptionMode(std::string_view name);
const char* PreemptionModeName(PreemptionMode mode);

struct SchedulerOptions {
  int32_t max_num_seqs = 256;             // sequences resident on the GPU at once
  int32_t max_num_batched_tokens = 2048;  // tokens per step (prefill chunks + decodes)
  int32_t max_prefill_chunk = 0;          // cap on one sequence's chunk per step; 0 = none
  int32_t max_model_len = 4096;           // prompt + output tokens
  int32_t max_waiting = 0;                // waiting-queue bound for AddRequest; 0 = none
  PreemptionMode preemption_mode = PreemptionMode::kAuto;
  int32_t auto_recompute_max_tokens = 256;  // kAuto: recompute sequences this short
  double watermark = 0.01;  // fraction of GPU blocks kept free when admitting/swapping in
  int32_t slot_mapping_pad_multiple = 1;  // pad StepPlan::slot_mapping with -1 to a multiple
  BlockManagerOptions blocks;             // pool sizes (PlanKvPools), block size, prefix cache
};

struct SchedRequest {
  RequestId request_id;
  std::vector<int32_t> prompt;          // token ids, non-empty
  int32_t max_tokens = 16;              // output tokens, >= 1
  std::vector<int32_t> stop_token_ids;  // sampling one of these finishes the sequence (e.g. EOS)
};

// One sequence's share of a step.
struct ScheduledSeq {
  SeqId seq_id;
  RequestId request_id;
  std::vector<int32_t> token_ids;  // tokens whose KV is computed this step
  int32_t start_pos = 0;           // position of token_ids[0] = tokens already in the cache
  std::vector<BlockId> block_table;  // GPU blocks, position p in block_table[p / block_size]
  bool needs_logits = false;  // the chunk reaches the last known token: sample one token
  bool is_prefill = false;    // false only for a decode: one token, the last known one
};

// Everything a worker executes for one step, in this order:
//   1. swap_out (GPU -> CPU), 2. swap_in (CPU -> GPU), 3. copy (GPU -> GPU,
//   copy-on-write), 4. the forward pass over `seqs`, writing KV at
//   slot_mapping. Within one list no dst is a src of the same list and dsts
//   are distinct, so the pairs of a list may run in parallel. A plan never
//   has both swap_out and swap_in, and a plan with any block pair schedules at
//   least one sequence (the oldest running one always runs).
struct StepPlan {
  int64_t step_id = 0;
  std::vector<ScheduledSeq> seqs;
  // One slot per token of seqs (concatenated in order), then -1 padding:
  // slot = block_id * block_size + offset.
  std::vector<int64_t> slot_mapping;
  std::vector<BlockCopy> swap_out;  // (gpu src, cpu dst)
  std::vector<BlockCopy> swap_in;   // (cpu src, gpu dst)
  std::vector<BlockCopy> copy;      // (gpu src, gpu dst)
  int32_t num_tokens = 0;           // scheduled tokens (without padding)
  int32_t num_prefill_tokens = 0;
  bool empty() const {
    return seqs.empty() && swap_out.empty() && swap_in.empty() && copy.empty();
  }
};

struct SampledToken {
  SeqId seq_id;
  int32_t token = 0;
};

// What the engine reports after executing a plan: one token for every
// scheduled sequence with needs_logits (aborted ones may be left out).
struct StepResult {
  int64_t step_id = 0;
  std::vector<SampledToken> sampled;
};

enum class FinishReason : uint8_t { kStop = 0, kLength = 1 };

struct FinishedSeq {
  SeqId seq_id;
  RequestId request_id;
  FinishReason reason = FinishReason::kLength;
  std::vector<int32_t> output_tokens;
};

struct SchedulerStats {
  int32_t num_running = 0, num_waiting = 0, num_swapped = 0;
  BlockManagerStats blocks;  // pool usage, prefix cache queries/hits, swap bytes
  int64_t preemptions_swap = 0, preemptions_recompute = 0;
  int64_t swap_fallbacks = 0;  // kSwap victims recomputed for lack of swap space
  int64_t steps = 0, scheduled_tokens = 0;
  int64_t finished = 0, aborted = 0, rejected = 0;
};

}  // namespace strata
