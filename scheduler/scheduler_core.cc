#include "scheduler/scheduler_core.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/check.h"

namespace strata {

#define STRATA_CHECK_OK(expr)                 \
  do {                                        \
    const ::absl::Status check_ok_ = (expr);  \
    STRATA_CHECK(check_ok_.ok()) << check_ok_; \
  } while (0)

absl::StatusOr<PreemptionMode> ParsePreemptionMode(std::string_view name) {
  if (name == "recompute") return PreemptionMode::kRecompute;
  if (name == "swap") return PreemptionMode::kSwap;
  if (name == "auto") return PreemptionMode::kAuto;
  return absl::InvalidArgumentError(
      absl::StrCat("preemption mode must be recompute, swap or auto, got '", std::string(name), "'"));
}

const char* PreemptionModeName(PreemptionMode mode) {
  switch (mode) {
    case PreemptionMode::kRecompute: return "recompute";
    case PreemptionMode::kSwap: return "swap";
    case PreemptionMode::kAuto: return "auto";
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const SchedulerOptions& o) {
  const int32_t bs = o.blocks.block_size;
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  if (o.max_num_seqs < 1) return bad("max_num_seqs must be >= 1, got ", o.max_num_seqs);
  if (o.max_num_batched_tokens < 1) {
    return bad("max_num_batched_tokens must be >= 1, got ", o.max_num_batched_tokens);
  }
  if (o.max_prefill_chunk < 0) return bad("max_prefill_chunk must be >= 0");
  if (o.max_model_len < 2) return bad("max_model_len must be >= 2, got ", o.max_model_len);
  if (o.max_waiting < 0) return bad("max_waiting must be >= 0");
  if (o.auto_recompute_max_tokens < 0) return bad("auto_recompute_max_tokens must be >= 0");
  if (!(o.watermark >= 0.0 && o.watermark < 1.0)) {
    return bad("watermark must be in [0, 1), got ", o.watermark);
  }
  if (o.slot_mapping_pad_multiple < 1) return bad("slot_mapping_pad_multiple must be >= 1");
  if (bs < 1 || (bs & (bs - 1)) != 0) return bad("block_size must be a power of two, got ", bs);
  if (o.blocks.num_gpu_blocks < 1) {
    return bad("the GPU KV pool has no blocks: raise --gpu-memory-utilization or lower the "
               "model's memory use");
  }
  if (o.blocks.num_cpu_blocks < 0) return bad("num_cpu_blocks must be >= 0");
  if (o.preemption_mode != PreemptionMode::kRecompute &&
      o.preemption_mode != PreemptionMode::kSwap && o.preemption_mode != PreemptionMode::kAuto) {
    return bad("unknown preemption mode");
  }
  return std::unique_ptr<Scheduler>(new Scheduler(o));
}

Scheduler::Scheduler(const SchedulerOptions& options)
    : options_(options),
      bm_(options.blocks),
      watermark_blocks_(static_cast<int32_t>(options.watermark * options.blocks.num_gpu_blocks)) {}

Scheduler::Sequence* Scheduler::Find(SeqId seq) {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? nullptr : it->second.get();
}

const Scheduler::Sequence* Scheduler::Find(SeqId seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? nullptr : it->second.get();
}

const std::vector<int32_t>& Scheduler::SeqTokens(SeqId seq) const {
  const Sequence* s = Find(seq);
  STRATA_CHECK(s != nullptr) << "unknown sequence " << seq;
  return s->tokens;
}

int32_t Scheduler::SeqNumComputed(SeqId seq) const {
  const Sequence* s = Find(seq);
  STRATA_CHECK(s != nullptr) << "unknown sequence " << seq;
  return s->num_computed;
}

// --- admission of requests -----------------------------------------------------

absl::StatusOr<SeqId> Scheduler::AddRequest(SchedRequest r) {
  auto reject = [this](absl::Status s) {
    ++stats_.rejected;
    return s;
  };
  if (options_.max_waiting > 0 && static_cast<int32_t>(waiting_.size()) >= options_.max_waiting) {
    return reject(absl::UnavailableError(
        absl::StrCat("waiting queue is full (", options_.max_waiting, " requests); retry later")));
  }
  if (!r.request_id.valid()) return reject(absl::InvalidArgumentError("request id must be >= 0"));
  if (by_request_.contains(r.request_id)) {
    return reject(absl::AlreadyExistsError(
        absl::StrCat("request ", r.request_id.value(), " is already scheduled")));
  }
  if (r.prompt.empty()) return reject(absl::InvalidArgumentError("prompt is empty"));
  for (const int32_t t : r.prompt) {
    if (t < 0) return reject(absl::InvalidArgumentError(absl::StrCat("negative token id ", t)));
  }
  if (r.max_tokens < 1) {
    return reject(absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 1, got ", r.max_tokens)));
  }
  const int64_t prompt_len = static_cast<int64_t>(r.prompt.size());
  if (prompt_len >= options_.max_model_len) {
    return reject(absl::InvalidArgumentError(
        absl::StrCat("prompt has ", prompt_len, " tokens; max_model_len ", options_.max_model_len,
                     " leaves no room for output")));
  }
  // The last sampled token never needs KV, so a sequence that can grow to L
  // tokens needs the blocks of L - 1 positions.
  const int64_t max_len = std::min<int64_t>(prompt_len + r.max_tokens, options_.max_model_len);
  const int32_t need = bm_.BlocksForTokens(max_len - 1);
  if (need > options_.blocks.num_gpu_blocks) {
    return reject(absl::ResourceExhaustedError(absl::StrCat(
        "request needs up to ", need, " KV blocks (", max_len - 1, " tokens) but the GPU KV cache has ",
        options_.blocks.num_gpu_blocks, " blocks (",
        int64_t{options_.blocks.num_gpu_blocks} * options_.blocks.block_size,
        " tokens): it can never be scheduled on this server; lower max_tokens or use a larger "
        "cache")));
  }
  auto seq = std::make_unique<Sequence>();
  seq->id = SeqId(next_seq_id_++);
  seq->request_id = r.request_id;
  seq->arrival = next_arrival_++;
  seq->prompt_len = static_cast<int32_t>(prompt_len);
  seq->tokens = std::move(r.prompt);
  seq->max_tokens = r.max_tokens;
  seq->stop_token_ids = std::move(r.stop_token_ids);
  seq->status = SeqStatus::kWaiting;  // (new) -> waiting
  waiting_.push_back(seq.get());
  const SeqId id = seq->id;
  by_request_[r.request_id].push_back(id);
  seqs_.emplace(id, std::move(seq));
  return id;
}

// --- one step ----------------------------------------------------------------------

int32_t Scheduler::ChunkFor(int32_t uncomputed, int32_t tokens_left) const {
  int32_t n = std::min(uncomputed, tokens_left);
  if (options_.max_prefill_chunk > 0) n = std::min(n, options_.max_prefill_chunk);
  return n;
}

StepPlan Scheduler::Schedule() {
  STRATA_CHECK(!step_pending_) << "Schedule() called again before OnStepResult() of step "
                               << step_id_;
  StepPlan plan;
  plan.step_id = ++step_id_;
  in_flight_.clear();
  int32_t tokens_left = options_.max_num_batched_tokens;
  bool preempted = false;
  ScheduleRunning(&plan, &tokens_left, &preempted);
  // Nothing comes back or in while sequences are being pushed out: that would
  // thrash, and it keeps swap-outs and swap-ins out of the same plan.
  if (!preempted) {
    ScheduleSwapped(&plan, &tokens_left);
    if (swapped_.empty()) ScheduleWaiting(&plan, &tokens_left);
  }
  bm_.EndStep();
  const size_t pad = static_cast<size_t>(options_.slot_mapping_pad_multiple);
  while (plan.slot_mapping.size() % pad != 0) plan.slot_mapping.push_back(-1);
  step_pending_ = true;
  ++stats_.steps;
  stats_.scheduled_tokens += plan.num_tokens;
  return plan;
}

void Scheduler::ScheduleRunning(StepPlan* plan, int32_t* tokens_left, bool* preempted) {
  int32_t decodes_left = 0;  // decodes after the current position: prefills leave them budget
  for (const Sequence* s : running_) decodes_left += s->uncomputed() == 1;
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence* s = running_[i];
    const bool decode = s->uncomputed() == 1;
    if (decode) --decodes_left;
    int32_t room = decode ? *tokens_left : *tokens_left - decodes_left;
    // The oldest sequence always runs (progress; and a plan that moves blocks
    // always schedules a sequence).
    if (i == 0) room = std::max(room, std::min(*tokens_left, 1));
    const int32_t n = ChunkFor(s->uncomputed(), room);
    if (n <= 0) continue;  // no budget this step; it keeps its blocks
    const int32_t start = s->num_computed;
    bool self_preempted = false;
    while (bm_.AppendCost(s->id, start, start + n) > bm_.gpu().num_allocatable()) {
      *preempted = true;
      if (running_.size() > i + 1) {
        Sequence* victim = running_.back();  // newest not yet scheduled this step
        running_.pop_back();
        if (victim->uncomputed() == 1) --decodes_left;
        Preempt(victim, plan);
      } else {
        running_.pop_back();  // s is the newest left: it yields its own blocks
        Preempt(s, plan);
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;
    STRATA_CHECK_OK(bm_.AppendSlots(s->id, start, start + n, &plan->copy));
    AddToPlan(s, n, plan);
    *tokens_left -= n;
  }
}

void Scheduler::Preempt(Sequence* s, StepPlan* plan) {
  const PreemptionMode mode = options_.preemption_mode;
  const bool swap = mode != PreemptionMode::kRecompute && bm_.CanSwapOut(s->id) &&
                    (mode == PreemptionMode::kSwap ||
                     s->num_computed > options_.auto_recompute_max_tokens);
  if (swap) {
    // running -> swapped: its blocks move to CPU swap space, progress is kept.
    STRATA_CHECK_OK(bm_.SwapOut(s->id, &plan->swap_out));
    s->status = SeqStatus::kSwapped;
    InsertByArrival(&swapped_, s);
    ++stats_.preemptions_swap;
  } else {
    // running -> waiting: blocks freed (full ones stay cached), prefilled again later.
    if (mode == PreemptionMode::kSwap) ++stats_.swap_fallbacks;
    bm_.Free(s->id);
    s->num_computed = 0;
    s->status = SeqStatus::kWaiting;
    InsertByArrival(&waiting_, s);
    ++stats_.preemptions_recompute;
  }
}

void Scheduler::ScheduleSwapped(StepPlan* plan, int32_t* tokens_left) {
  while (!swapped_.empty()) {
    Sequence* s = swapped_.front();
    if (static_cast<int32_t>(running_.size()) >= options_.max_num_seqs) break;
    const int32_t n = ChunkFor(s->uncomputed(), *tokens_left);
    if (n <= 0) break;
    // The write position is past every block a swap-in can re-find in the
    // prefix cache (those are full computed blocks), so no copy-on-write.
    const int32_t cost = bm_.SwapInCost(s->id, s->tokens) +
                         std::max(0, bm_.BlocksForTokens(s->num_computed + n) -
                                         bm_.NumSeqBlocks(s->id));
    const int32_t reserve = running_.empty() ? 0 : watermark_blocks_;
    if (cost + reserve > bm_.gpu().num_allocatable()) break;  // FCFS: nobody overtakes
    swapped_.pop_front();
    // swapped -> running
    STRATA_CHECK_OK(bm_.SwapIn(s->id, s->tokens, &plan->swap_in));
    STRATA_CHECK_OK(bm_.AppendSlots(s->id, s->num_computed, s->num_computed + n, &plan->copy));
    s->status = SeqStatus::kRunning;
    InsertRunning(s);
    AddToPlan(s, n, plan);
    *tokens_left -= n;
  }
}

void Scheduler::ScheduleWaiting(StepPlan* plan, int32_t* tokens_left) {
  while (!waiting_.empty()) {
    Sequence* s = waiting_.front();
    if (static_cast<int32_t>(running_.size()) >= options_.max_num_seqs || *tokens_left <= 0) break;
    const PrefixMatch m = bm_.MatchPrefix(s->tokens);
    const int32_t len = static_cast<int32_t>(s->tokens.size());
    // Even a full hit recomputes the last token: its logits are needed.
    const int32_t computed = std::min(m.num_tokens(), len - 1);
    const int32_t n = ChunkFor(len - computed, *tokens_left);
    const int32_t cost = bm_.AdmissionCost(m, computed, computed + n);
    const int32_t reserve = running_.empty() ? 0 : watermark_blocks_;
    if (cost + reserve > bm_.gpu().num_allocatable()) break;  // FCFS: nobody overtakes
    waiting_.pop_front();
    // waiting -> running
    bm_.Admit(s->id, m, len);
    s->num_computed = computed;
    STRATA_CHECK_OK(bm_.AppendSlots(s->id, computed, computed + n, &plan->copy));
    s->status = SeqStatus::kRunning;
    InsertRunning(s);
    AddToPlan(s, n, plan);
    *tokens_left -= n;
  }
}

void Scheduler::AddToPlan(Sequence* s, int32_t n, StepPlan* plan) {
  const int32_t start = s->num_computed;
  const int32_t bs = bm_.block_size();
  ScheduledSeq& e = plan->seqs.emplace_back();
  e.seq_id = s->id;
  e.request_id = s->request_id;
  e.start_pos = start;
  e.token_ids.assign(s->tokens.begin() + start, s->tokens.begin() + start + n);
  bm_.AppendBlockIds(s->id, &e.block_table);
  e.needs_logits = start + n == static_cast<int32_t>(s->tokens.size());
  e.is_prefill = !(n == 1 && e.needs_logits);
  for (int32_t p = start; p < start + n; ++p) {
    plan->slot_mapping.push_back(int64_t{e.block_table[p / bs].value()} * bs + p % bs);
  }
  plan->num_tokens += n;
  if (e.is_prefill) plan->num_prefill_tokens += n;
  in_flight_.push_back({s->id, n, e.needs_logits});
}

// --- results, aborts, forks ------------------------------------------------------

absl::StatusOr<std::vector<FinishedSeq>> Scheduler::OnStepResult(const StepResult& result) {
  if (!step_pending_) return absl::FailedPreconditionError("OnStepResult() without a pending step");
  if (result.step_id != step_id_) {
    return absl::InvalidArgumentError(absl::StrCat("result of step ", result.step_id,
                                                   " but step ", step_id_, " is pending"));
  }
  // Validate everything before changing anything.
  absl::flat_hash_map<SeqId, int32_t> sampled;
  sampled.reserve(result.sampled.size());
  for (const SampledToken& t : result.sampled) {
    if (t.token < 0) {
      return absl::InvalidArgumentError(absl::StrCat("negative token for sequence ", t.seq_id.value()));
    }
    if (!sampled.emplace(t.seq_id, t.token).second) {
      return absl::InvalidArgumentError(absl::StrCat("two tokens for sequence ", t.seq_id.value()));
    }
  }
  size_t matched = 0;
  for (const InFlight& f : in_flight_) {
    if (!f.needs_logits) continue;
    const bool has = sampled.contains(f.seq);
    matched += has;
    if (!has && seqs_.contains(f.seq)) {
      return absl::InvalidArgumentError(
          absl::StrCat("no sampled token for sequence ", f.seq.value()));
    }
  }
  if (matched != sampled.size()) {
    return absl::InvalidArgumentError("a token was reported for a sequence that needed none");
  }
  std::vector<FinishedSeq> finished;
  for (const InFlight& f : in_flight_) {
    Sequence* s = Find(f.seq);
    if (s == nullptr) continue;  // aborted while the step ran
    s->num_computed += f.num_tokens;
    bm_.CommitComputed(s->id, s->tokens, s->num_computed);
    if (!f.needs_logits) continue;
    const int32_t tok = sampled.at(s->id);
    s->tokens.push_back(tok);
    FinishReason reason;
    if (std::find(s->stop_token_ids.begin(), s->stop_token_ids.end(), tok) !=
        s->stop_token_ids.end()) {
      reason = FinishReason::kStop;
    } else if (s->num_outputs() >= s->max_tokens ||
               static_cast<int32_t>(s->tokens.size()) >= options_.max_model_len) {
      reason = FinishReason::kLength;
    } else {
      continue;
    }
    FinishedSeq& done = finished.emplace_back();
    done.seq_id = s->id;
    done.request_id = s->request_id;
    done.reason = reason;
    done.output_tokens.assign(s->tokens.begin() + s->prompt_len, s->tokens.end());
    bm_.Free(s->id);
    s->status = SeqStatus::kFinished;  // running -> (gone)
  }
  if (!finished.empty()) {
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const Sequence* s) { return s->status == SeqStatus::kFinished; }),
                   running_.end());
    for (const FinishedSeq& done : finished) {
      auto it = by_request_.find(done.request_id);
      auto& ids = it->second;
      ids.erase(std::find(ids.begin(), ids.end(), done.seq_id));
      if (ids.empty()) by_request_.erase(it);
      seqs_.erase(done.seq_id);
    }
    stats_.finished += static_cast<int64_t>(finished.size());
  }
  step_pending_ = false;
  return finished;
}

void Scheduler::Remove(Sequence* s) {
  auto erase_from = [s](auto& q) { q.erase(std::find(q.begin(), q.end(), s)); };
  switch (s->status) {
    case SeqStatus::kWaiting: erase_from(waiting_); break;
    case SeqStatus::kRunning: erase_from(running_); break;
    case SeqStatus::kSwapped: erase_from(swapped_); break;
    case SeqStatus::kFinished: break;
  }
  if (bm_.HasSeq(s->id)) bm_.Free(s->id);
  auto it = by_request_.find(s->request_id);
  auto& ids = it->second;
  ids.erase(std::find(ids.begin(), ids.end(), s->id));
  if (ids.empty()) by_request_.erase(it);
  seqs_.erase(s->id);  // destroys *s
}

absl::Status Scheduler::Abort(SeqId seq) {
  Sequence* s = Find(seq);
  if (s == nullptr) {
    return absl::NotFoundError(absl::StrCat("sequence ", seq.value(), " is not scheduled"));
  }
  Remove(s);  // waiting / running / swapped -> (gone), blocks freed now
  ++stats_.aborted;
  return absl::OkStatus();
}

absl::Status Scheduler::Abort(RequestId request) {
  auto it = by_request_.find(request);
  if (it == by_request_.end()) {
    return absl::NotFoundError(absl::StrCat("request ", request.value(), " is not scheduled"));
  }
  const absl::InlinedVector<SeqId, 1> ids = it->second;
  for (const SeqId id : ids) STRATA_CHECK_OK(Abort(id));
  return absl::OkStatus();
}

absl::StatusOr<SeqId> Scheduler::Fork(SeqId parent, std::optional<int32_t> replace_last_token) {
  if (step_pending_) return absl::FailedPreconditionError("Fork() while a step is pending");
  const Sequence* p = Find(parent);
  if (p == nullptr) return absl::NotFoundError(absl::StrCat("sequence ", parent.value(), " is not scheduled"));
  if (p->status != SeqStatus::kRunning) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence ", parent.value(), " is not running"));
  }
  if (static_cast<int32_t>(running_.size()) >= options_.max_num_seqs) {
    return absl::ResourceExhaustedError("max_num_seqs sequences are already running");
  }
  if (replace_last_token.has_value()) {
    const int32_t t = *replace_last_token;
    if (t < 0 || p->num_outputs() < 1 ||
        std::find(p->stop_token_ids.begin(), p->stop_token_ids.end(), t) != p->stop_token_ids.end()) {
      return absl::InvalidArgumentError(
          "replace_last_token must be a non-stop token replacing a sampled one");
    }
  }
  auto child = std::make_unique<Sequence>(*p);
  child->id = SeqId(next_seq_id_++);
  child->arrival = next_arrival_++;
  if (replace_last_token.has_value()) child->tokens.back() = *replace_last_token;
  if (absl::Status st = bm_.Fork(parent, child->id); !st.ok()) return st;
  const SeqId id = child->id;
  InsertRunning(child.get());  // (new) -> running, sharing the parent's blocks
  by_request_[child->request_id].push_back(id);
  seqs_.emplace(id, std::move(child));
  return id;
}

// --- queues --------------------------------------------------------------------------

void Scheduler::InsertRunning(Sequence* s) {
  auto pos = std::upper_bound(running_.begin(), running_.end(), s->arrival,
                              [](int64_t a, const Sequence* x) { return a < x->arrival; });
  running_.insert(pos, s);
}

void Scheduler::InsertByArrival(Queue* q, Sequence* s) {
  auto pos = std::upper_bound(q->begin(), q->end(), s->arrival,
                              [](int64_t a, const Sequence* x) { return a < x->arrival; });
  q->insert(pos, s);
}

SchedulerStats Scheduler::Stats() const {
  SchedulerStats s = stats_;
  s.num_running = static_cast<int32_t>(running_.size());
  s.num_waiting = static_cast<int32_t>(waiting_.size());
  s.num_swapped = static_cast<int32_t>(swapped_.size());
  s.blocks = bm_.Stats();
  return s;
}

}  // namespace strata
