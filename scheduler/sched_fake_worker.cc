#include "scheduler/sched_fake_worker.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace strata {

uint64_t ContentTag(uint64_t prev, int32_t token) {
  uint64_t x = prev * 0x100000001b3ull + static_cast<uint32_t>(token) + 0x9e3779b97f4a7c15ull;
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x | 1;  // never 0, which marks an unwritten slot
}

void SeqMirror::Append(int32_t token) {
  tags.push_back(ContentTag(tags.empty() ? 0 : tags.back(), token));
  tokens.push_back(token);
}

void SeqMirror::ReplaceLast(int32_t token) {
  tokens.pop_back();
  tags.pop_back();
  Append(token);
}

FakeWorker::FakeWorker(int32_t num_gpu_blocks, int32_t num_cpu_blocks, int32_t block_size)
    : block_size_(block_size),
      gpu_(static_cast<size_t>(num_gpu_blocks) * block_size, 0),
      cpu_(static_cast<size_t>(num_cpu_blocks) * block_size, 0),
      written_epoch_(gpu_.size(), 0) {}

absl::Status FakeWorker::RunList(const std::vector<BlockCopy>& list, std::vector<uint64_t>& from,
                                 std::vector<uint64_t>& to, const char* name) {
  const int64_t bs = block_size_;
  absl::flat_hash_set<int32_t> srcs, dsts;
  for (const BlockCopy& c : list) {
    if (!c.src.valid() || (c.src.value() + 1) * bs > static_cast<int64_t>(from.size()) ||
        !c.dst.valid() || (c.dst.value() + 1) * bs > static_cast<int64_t>(to.size())) {
      return absl::InternalError(absl::StrCat(name, " pair (", c.src.value(), ",", c.dst.value(),
                                              ") out of range"));
    }
    srcs.insert(c.src.value());
    if (!dsts.insert(c.dst.value()).second) {
      return absl::InternalError(absl::StrCat(name, " writes block ", c.dst.value(), " twice"));
    }
  }
  if (&from == &to) {
    for (const int32_t d : dsts) {
      if (srcs.contains(d)) {
        return absl::InternalError(absl::StrCat(name, " block ", d, " is both a source and a destination"));
      }
    }
  }
  // Read every source before writing any destination: pairs of a list run in parallel.
  scratch_.resize(list.size() * bs);
  for (size_t i = 0; i < list.size(); ++i) {
    std::copy_n(from.begin() + list[i].src.value() * bs, bs, scratch_.begin() + i * bs);
  }
  for (size_t i = 0; i < list.size(); ++i) {
    std::copy_n(scratch_.begin() + i * bs, bs, to.begin() + list[i].dst.value() * bs);
  }
  return absl::OkStatus();
}

absl::Status FakeWorker::Execute(const StepPlan& plan,
                                 const std::function<const SeqMirror*(SeqId)>& mirror) {
  ++epoch_;
  if (absl::Status s = RunList(plan.swap_out, gpu_, cpu_, "swap_out"); !s.ok()) return s;
  if (absl::Status s = RunList(plan.swap_in, cpu_, gpu_, "swap_in"); !s.ok()) return s;
  if (absl::Status s = RunList(plan.copy, gpu_, gpu_, "copy"); !s.ok()) return s;
  const int64_t bs = block_size_;
  auto fail = [&plan](auto... parts) {
    return absl::InternalError(absl::StrCat("step ", plan.step_id, ": ", parts...));
  };
  // Pass 1: validate and write this step's KV (all writes precede attention reads,
  // as in a layer's forward pass).
  size_t slot_index = 0;
  for (const ScheduledSeq& e : plan.seqs) {
    const SeqMirror* m = mirror(e.seq_id);
    if (m == nullptr) return fail("unknown sequence ", e.seq_id.value());
    const int64_t n = static_cast<int64_t>(e.token_ids.size());
    const int64_t len = static_cast<int64_t>(m->tokens.size());
    if (n < 1 || e.start_pos < 0 || e.start_pos + n > len) {
      return fail("sequence ", e.seq_id.value(), " runs [", e.start_pos, ", ", e.start_pos + n,
                  ") of ", len, " tokens");
    }
    if (!std::equal(e.token_ids.begin(), e.token_ids.end(), m->tokens.begin() + e.start_pos)) {
      return fail("sequence ", e.seq_id.value(), " is given tokens that are not its own");
    }
    if (e.needs_logits != (e.start_pos + n == len)) {
      return fail("sequence ", e.seq_id.value(), " needs_logits is wrong");
    }
    if (static_cast<int64_t>(e.block_table.size()) * bs < e.start_pos + n) {
      return fail("sequence ", e.seq_id.value(), " block table too short");
    }
    for (int64_t p = e.start_pos; p < e.start_pos + n; ++p, ++slot_index) {
      const BlockId b = e.block_table[p / bs];
      const int64_t slot = int64_t{b.value()} * bs + p % bs;
      if (slot_index >= plan.slot_mapping.size() || plan.slot_mapping[slot_index] != slot) {
        return fail("slot mapping of sequence ", e.seq_id.value(), " position ", p, " is wrong");
      }
      if (slot < 0 || slot >= static_cast<int64_t>(gpu_.size())) return fail("slot out of range");
      if (written_epoch_[slot] == epoch_) return fail("slot ", slot, " written twice in one step");
      written_epoch_[slot] = epoch_;
      gpu_[slot] = m->tags[p];
    }
  }
  if (slot_index != static_cast<size_t>(plan.num_tokens)) return fail("num_tokens is wrong");
  for (size_t i = slot_index; i < plan.slot_mapping.size(); ++i) {
    if (plan.slot_mapping[i] != -1) return fail("padding slot is not -1");
  }
  // Pass 2: attention reads every earlier position from the block table.
  for (const ScheduledSeq& e : plan.seqs) {
    const SeqMirror* m = mirror(e.seq_id);
    for (int64_t p = 0; p < e.start_pos; ++p) {
      const int64_t slot = int64_t{e.block_table[p / bs].value()} * bs + p % bs;
      if (gpu_[slot] != m->tags[p]) {
        return fail("sequence ", e.seq_id.value(), " reads position ", p, " from block ",
                    e.block_table[p / bs].value(), " and finds ",
                    gpu_[slot] == 0 ? "nothing" : "another sequence's content");
      }
    }
    slots_verified_ += e.start_pos;
  }
  return absl::OkStatus();
}

}  // namespace strata
