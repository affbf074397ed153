// Test helper: a fake worker that executes StepPlans against a shadow of the
// KV cache. Every slot holds a "content tag", the hash of the token prefix
// that ends at that position (what real KV depends on). The worker checks a
// plan the way a real worker would depend on it: lists well-formed, tokens and
// positions as the test's own mirror of each sequence says, slot mapping
// consistent with the block table, and every position a sequence attends to
// holding the tag of that sequence's own prefix. A misrouted swap, a missing
// copy-on-write or a block shared by sequences with different prefixes shows
// up as a wrong tag.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "scheduler/sched_types.h"

namespace strata {

// The test's view of one sequence: its tokens and their prefix tags.
struct SeqMirror {
  std::vector<int32_t> tokens;
  std::vector<uint64_t> tags;  // tags[p] = ContentTag(tags[p - 1], tokens[p])
  void Append(int32_t token);
  void ReplaceLast(int32_t token);
};

uint64_t ContentTag(uint64_t prev, int32_t token);

class FakeWorker {
 public:
  FakeWorker(int32_t num_gpu_blocks, int32_t num_cpu_blocks, int32_t block_size);

  // Executes swap_out, swap_in, copy, then writes the new tokens' tags and
  // verifies what each sequence reads. `mirror(seq)` returns the test's view
  // of a scheduled sequence (nullptr: unknown, an error).
  absl::Status Execute(const StepPlan& plan,
                       const std::function<const SeqMirror*(SeqId)>& mirror);

  int64_t slots_verified() const { return slots_verified_; }

 private:
  absl::Status RunList(const std::vector<BlockCopy>& list, std::vector<uint64_t>& from,
                       std::vector<uint64_t>& to, const char* name);

  int32_t block_size_;
  std::vector<uint64_t> gpu_;  // [num_gpu_blocks * block_size] tags, 0 = never written
  std::vector<uint64_t> cpu_;
  std::vector<uint64_t> scratch_;
  std::vector<uint32_t> written_epoch_;  // per GPU slot: step that last wrote it
  uint32_t epoch_ = 0;
  int64_t slots_verified_ = 0;
};

}  // namespace strata
