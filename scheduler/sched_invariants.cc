// Scheduler::CheckInvariants, kept apart from the scheduling logic.
#include <string>

#include "absl/strings/str_cat.h"
#include "scheduler/scheduler_core.h"

namespace strata {

absl::Status Scheduler::CheckInvariants() const {
  auto fail = [](auto... parts) { return absl::InternalError(absl::StrCat(parts...)); };
  absl::flat_hash_map<SeqId, int> membership;
  auto check_queue = [&](const auto& q, SeqStatus want, const char* name) -> absl::Status {
    int64_t last_arrival = -1;
    for (const Sequence* s : q) {
      if (s->status != want) return fail("sequence ", s->id.value(), " in ", name, " has another status");
      if (s->arrival <= last_arrival) return fail(name, " is not in arrival order at ", s->id.value());
      last_arrival = s->arrival;
      if (++membership[s->id] != 1) return fail("sequence ", s->id.value(), " is queued twice");
      const auto it = seqs_.find(s->id);
      if (it == seqs_.end() || it->second.get() != s) return fail(name, " holds an unknown sequence");
    }
    return absl::OkStatus();
  };
  if (absl::Status st = check_queue(running_, SeqStatus::kRunning, "running"); !st.ok()) return st;
  if (absl::Status st = check_queue(waiting_, SeqStatus::kWaiting, "waiting"); !st.ok()) return st;
  if (absl::Status st = check_queue(swapped_, SeqStatus::kSwapped, "swapped"); !st.ok()) return st;
  if (membership.size() != seqs_.size()) {
    return fail(seqs_.size() - membership.size(), " sequence(s) are in no queue (orphaned)");
  }
  if (static_cast<int32_t>(running_.size()) > options_.max_num_seqs) {
    return fail(running_.size(), " sequences running, max_num_seqs ", options_.max_num_seqs);
  }
  size_t by_request_count = 0;
  for (const auto& [req, ids] : by_request_) {
    if (ids.empty()) return fail("request ", req.value(), " has no sequence");
    for (const SeqId id : ids) {
      const Sequence* s = Find(id);
      if (s == nullptr || s->request_id != req) return fail("request map is stale for ", id.value());
    }
    by_request_count += ids.size();
  }
  if (by_request_count != seqs_.size()) return fail("request map does not cover every sequence");
  int32_t with_table = 0;
  for (const auto& [id, s] : seqs_) {
    const int32_t len = static_cast<int32_t>(s->tokens.size());
    if (s->prompt_len < 1 || len < s->prompt_len || len >= options_.max_model_len ||
        s->num_outputs() >= s->max_tokens) {
      return fail("sequence ", id.value(), " should have finished: ", len, " tokens, ",
                  s->num_outputs(), " outputs");
    }
    if (s->num_computed < 0 || s->num_computed >= len) {
      return fail("sequence ", id.value(), " has ", s->num_computed, " computed of ", len, " tokens");
    }
    const bool has_table = bm_.HasSeq(id);
    with_table += has_table;
    if (s->status == SeqStatus::kWaiting) {
      if (has_table || s->num_computed != 0) {
        return fail("waiting sequence ", id.value(), " holds blocks or computed tokens");
      }
      continue;
    }
    const Device want = s->status == SeqStatus::kRunning ? Device::kGpu : Device::kCpu;
    if (!has_table || bm_.SeqDevice(id) != want) {
      return fail("sequence ", id.value(), " has no block table on the ", DeviceName(want));
    }
    const int32_t blocks = bm_.NumSeqBlocks(id);
    if (blocks < bm_.BlocksForTokens(s->num_computed) || blocks > bm_.BlocksForTokens(len)) {
      return fail("sequence ", id.value(), " holds ", blocks, " blocks for ", s->num_computed,
                  " computed / ", len, " tokens");
    }
  }
  if (with_table != bm_.num_seqs()) {
    return fail(bm_.num_seqs() - with_table, " block table(s) belong to no live sequence");
  }
  return bm_.CheckInvariants();
}

}  // namespace strata
