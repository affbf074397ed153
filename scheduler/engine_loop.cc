#include "scheduler/engine_loop.h"

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "runtime/status_macros.h"

namespace strata {

absl::StatusOr<std::unique_ptr<EngineLoop>> EngineLoop::Create(Engine* engine,
                                                                const SchedulerOptions& options,
                                                                LoopCallbacks callbacks) {
  const EngineOptions& eo = engine->options();
  if (options.blocks.block_size != eo.block_size ||
      options.blocks.num_gpu_blocks > eo.num_gpu_blocks ||
      options.blocks.num_cpu_blocks > eo.num_cpu_blocks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler pools (block size ", options.blocks.block_size, ", ",
        options.blocks.num_gpu_blocks, " GPU / ", options.blocks.num_cpu_blocks,
        " CPU blocks) do not fit the engine's (block size ", eo.block_size, ", ",
        eo.num_gpu_blocks, " / ", eo.num_cpu_blocks, ")"));
  }
  if (options.max_model_len > engine->config().max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("max_model_len ", options.max_model_len,
                                                   " exceeds the model context ",
                                                   engine->config().max_position_embeddings));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Scheduler> s, Scheduler::Create(options));
  return std::unique_ptr<EngineLoop>(new EngineLoop(engine, std::move(s), std::move(callbacks)));
}

EngineLoop::EngineLoop(Engine* engine, std::unique_ptr<Scheduler> scheduler,
                       LoopCallbacks callbacks)
    : engine_(engine), scheduler_(std::move(scheduler)), callbacks_(std::move(callbacks)) {}

absl::StatusOr<SeqId> EngineLoop::AddRequest(const LoopRequest& request) {
  const int32_t vocab = engine_->config().vocab_size;
  RETURN_IF_ERROR(ValidateSamplingParams(request.sampling, vocab));
  for (int32_t t : request.prompt) {
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token id ", t, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  for (int32_t t : request.stop_token_ids) {
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("stop token id ", t, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  SchedRequest r;
  r.request_id = request.request_id;
  r.prompt = request.prompt;
  r.max_tokens = request.max_tokens;
  r.stop_token_ids = request.stop_token_ids;
  ASSIGN_OR_RETURN(SeqId id, scheduler_->AddRequest(std::move(r)));
  sampling_.emplace(id, SeqSampling{request.sampling, request.num_logprobs});
  return id;
}

absl::Status EngineLoop::Abort(RequestId request) { return scheduler_->Abort(request); }

bool EngineLoop::HasWork() const {
  const SchedulerStats s = scheduler_->Stats();
  return s.num_running + s.num_waiting + s.num_swapped > 0;
}

absl::Status EngineLoop::Step() {
  StepPlan plan = scheduler_->Schedule();
  StepResult result;
  sampled_index_.clear();
  result.step_id = plan.step_id;
  if (!plan.seqs.empty() || !plan.swap_in.empty() || !plan.swap_out.empty() || !plan.copy.empty()) {
    // The step input is rebuilt in place: its per-sequence vectors keep
    // their capacity from step to step, so a decode step of a thousand
    // sequences allocates nothing here.
    StepInput& in = input_;
    in.seqs.resize(plan.seqs.size());
    in.swap_out.clear();
    in.swap_in.clear();
    in.copies.clear();
    const bool engine_samples = engine_->SupportsSampling();
    for (size_t i = 0; i < plan.seqs.size(); ++i) {
      const ScheduledSeq& s = plan.seqs[i];
      SeqStepInput& x = in.seqs[i];
      x.tokens.assign(s.token_ids.begin(), s.token_ids.end());
      x.start_pos = s.start_pos;
      x.block_table.resize(s.block_table.size());
      for (size_t k = 0; k < s.block_table.size(); ++k) x.block_table[k] = s.block_table[k].value();
      x.logits = s.needs_logits && !engine_samples ? SeqStepInput::Logits::kLast
                                                   : SeqStepInput::Logits::kNone;
      x.sample = false;
      x.sampling = SamplingParams{};
      x.num_logprobs = -1;
      if (s.needs_logits && engine_samples) {
        const SeqSampling& sp = sampling_.at(s.seq_id);
        x.sample = true;
        x.sampling = sp.params;
        x.num_logprobs = sp.num_logprobs;
      }
    }
    auto moves = [](const std::vector<BlockCopy>& from, std::vector<KvBlockMove>* to) {
      for (const BlockCopy& c : from) to->push_back({c.src.value(), c.dst.value()});
    };
    moves(plan.swap_out, &in.swap_out);
    moves(plan.swap_in, &in.swap_in);
    moves(plan.copy, &in.copies);
    if (in.seqs.empty()) {
      // Block moves only: nothing to forward. Engines require a sequence, so
      // the moves ride on the next step (the scheduler never plans moves
      // without sequences today; this keeps the loop honest if it does).
      return absl::InternalError("step plan with block moves but no sequences");
    }
    const absl::Status st = engine_->Step(in, &output_);
    if (!st.ok()) {
      for (const ScheduledSeq& s : plan.seqs) (void)scheduler_->Abort(s.seq_id);
      (void)scheduler_->OnStepResult(result);
      return st;
    }
    const int32_t vocab = engine_->config().vocab_size;
    // Engines return one sample slot per sequence when any sequence sampled
    // (a step of prefill chunks only samples nothing and returns none).
    bool any_sample = false;
    for (const ScheduledSeq& s : plan.seqs) any_sample |= s.needs_logits;
    if (engine_samples && any_sample && output_.sampled.size() != plan.seqs.size()) {
      for (const ScheduledSeq& s : plan.seqs) (void)scheduler_->Abort(s.seq_id);
      (void)scheduler_->OnStepResult(result);
      return absl::InternalError(absl::StrCat("the engine returned ", output_.sampled.size(),
                                              " samples for ", plan.seqs.size(), " sequences"));
    }
    for (size_t i = 0; i < plan.seqs.size(); ++i) {
      const ScheduledSeq& s = plan.seqs[i];
      if (!s.needs_logits) continue;
      int32_t tok;
      if (engine_samples) {
        tok = output_.sampled[i].token;
      } else {
        const float* logits = output_.logits.data() + int64_t{output_.row_begin[i]} * vocab;
        SamplingParams sp = sampling_.at(s.seq_id).params;
        const uint64_t pos = static_cast<uint64_t>(s.start_pos) + s.token_ids.size() - 1;
        sp.seed = SeedForPosition(sp.seed, pos);
        tok = Sampler(sp).Sample(logits, vocab);
      }
      result.sampled.push_back({s.seq_id, tok});
      sampled_index_.push_back(static_cast<int32_t>(i));
    }
  }
  ASSIGN_OR_RETURN(std::vector<FinishedSeq> finished, scheduler_->OnStepResult(result));
  if (callbacks_.on_token) {
    // Tokens of finished sequences that hit a stop token are not emitted.
    absl::flat_hash_set<SeqId> stopped;
    for (const FinishedSeq& f : finished) {
      if (f.reason == FinishReason::kStop) stopped.insert(f.seq_id);
    }
    for (size_t k = 0; k < result.sampled.size(); ++k) {
      const SampledToken& t = result.sampled[k];
      if (stopped.contains(t.seq_id)) continue;
      const ScheduledSeq& s = plan.seqs[sampled_index_[k]];  // row k came from this sequence
      const StepOutput::Sampled* sampled =
          engine_->SupportsSampling() ? &output_.sampled[sampled_index_[k]] : nullptr;
      callbacks_.on_token(s.request_id, t.token, sampled);
    }
  }
  for (const FinishedSeq& f : finished) {
    sampling_.erase(f.seq_id);
    if (callbacks_.on_finish) callbacks_.on_finish(f);
  }
  return absl::OkStatus();
}

absl::Status EngineLoop::RunToCompletion() {
  while (HasWork()) RETURN_IF_ERROR(Step());
  return absl::OkStatus();
}

}  // namespace strata
