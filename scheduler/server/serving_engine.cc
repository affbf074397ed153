#include "scheduler/server/serving_engine.h"

#include <algorithm>
#include <cctype>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/check.h"
#include "runtime/status_macros.h"
#include "scheduler/server/text_util.h"
#include "spdlog/spdlog.h"

namespace strata::serving {
namespace {

// strata_requests_total's outcome label for a failed request: the status
// code's name in lower case ("cancelled", "unavailable", ...).
std::string OutcomeName(const absl::Status& status) {
  std::string name = absl::StatusCodeToString(status.code());
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

}  // namespace

// Forwards to the real engine and remembers where the rows of logits the
// EngineLoop samples from are, so the sampled token's log-probabilities can
// be computed in OnToken. Engines that sample themselves return no logits
// rows and hand OnToken their log-probs instead.
//
// Contract relied on (checked below and by tests/serving_e2e_test.cc's
// greedy-logprob check): EngineLoop::Step calls on_token once per sequence
// that asked for logits (Logits::kLast), in step order, because the loop is
// given no stop tokens (the serving engine applies stop tokens itself) and
// nothing is aborted during a step.
class ServingEngine::LogitsTap final : public Engine {
 public:
  explicit LogitsTap(Engine* inner) : inner_(inner) {}
  const ModelConfig& config() const override { return inner_->config(); }
  const EngineOptions& options() const override { return inner_->options(); }
  bool SupportsSampling() const override { return inner_->SupportsSampling(); }
  absl::Status Step(const StepInput& input, StepOutput* output) override {
    rows_.clear();
    next_ = 0;
    prefill_tokens_ = 0;
    output_ = output;
    RETURN_IF_ERROR(inner_->Step(input, output));
    for (size_t i = 0; i < input.seqs.size(); ++i) {
      const SeqStepInput& s = input.seqs[i];
      if (s.logits == SeqStepInput::Logits::kLast) rows_.push_back(output->row_begin[i]);
      const bool decode = s.tokens.size() == 1 && s.start_pos > 0 &&
                          (s.logits == SeqStepInput::Logits::kLast || s.sample);
      if (!decode) prefill_tokens_ += static_cast<int64_t>(s.tokens.size());
    }
    return absl::OkStatus();
  }
  // Logits of the next sampled row, in on_token order.
  // Tokens of the last step that were prefill (prompt or recomputation):
  // everything but decodes (one token, not at position 0, logits wanted; a
  // final prefill chunk of exactly one token is counted as a decode).
  int64_t prefill_tokens() const { return prefill_tokens_; }
  const float* NextRow() {
    STRATA_CHECK(next_ < rows_.size()) << "more sampled tokens than logits rows in a step";
    return output_->logits.data() + int64_t{rows_[next_++]} * inner_->config().vocab_size;
  }
  size_t unconsumed() const { return rows_.size() - next_; }

 private:
  Engine* inner_;
  const StepOutput* output_ = nullptr;
  std::vector<int32_t> rows_;
  size_t next_ = 0;
  int64_t prefill_tokens_ = 0;
};

struct ServingEngine::Active {
  Active(uint64_t h, ServingRequest r, std::shared_ptr<GenerationSink> s, const Tokenizer& tok,
         absl::Time arrival_time)
      : handle(h),
        arrival(arrival_time),
        request(std::move(r)),
        sink(std::move(s)),
        decoder(tok),
        matcher(request.stop_strings) {
    first_token = absl::InfinitePast();
  }
  uint64_t handle;
  absl::Time arrival;
  absl::Time first_token;  // InfinitePast until the first token
  ServingRequest request;
  std::shared_ptr<GenerationSink> sink;
  StreamDecoder decoder;
  StopStringMatcher matcher;
  int64_t seq = 0;  // SeqId value
  int32_t completion_tokens = 0;
};

absl::StatusOr<std::unique_ptr<ServingEngine>> ServingEngine::Create(
    Engine* engine, const Tokenizer* tokenizer, ServingMetrics* metrics,
    const ServingEngineOptions& options) {
  std::unique_ptr<ServingEngine> s(new ServingEngine(tokenizer, metrics, options));
  s->tap_ = std::make_unique<LogitsTap>(engine);
  LoopCallbacks callbacks;
  ServingEngine* self = s.get();
  callbacks.on_token = [self](RequestId id, int32_t token, const StepOutput::Sampled* sampled) {
    self->OnToken(id, token, sampled);
  };
  callbacks.on_finish = [self](const FinishedSeq& f) { self->OnFinish(f); };
  ASSIGN_OR_RETURN(s->loop_, EngineLoop::Create(s->tap_.get(), options.scheduler, callbacks));
  s->Publish();
  s->thread_ = std::thread([self] { self->Run(); });
  return s;
}

ServingEngine::ServingEngine(const Tokenizer* tokenizer, ServingMetrics* metrics,
                             const ServingEngineOptions& options)
    : tokenizer_(tokenizer),
      metrics_(metrics),
      options_(options),
      max_in_flight_(int64_t{options.scheduler.max_num_seqs} + options.max_queued_requests) {}

ServingEngine::~ServingEngine() { Stop(); }

absl::StatusOr<uint64_t> ServingEngine::Submit(ServingRequest request,
                                               std::shared_ptr<GenerationSink> sink) {
  absl::MutexLock lock(&mu_);
  if (!admitting_ || stop_) return absl::UnavailableError("server is shutting down");
  if (in_flight_ >= max_in_flight_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "request queue is full: ", in_flight_, " requests in flight (max_num_seqs + ",
        "--max-queued-requests = ", max_in_flight_, "); retry later"));
  }
  const uint64_t handle = next_handle_++;
  ++in_flight_;
  inbox_.push_back(
      Command{Command::Kind::kAdd, handle, std::move(request), std::move(sink), absl::Now()});
  return handle;
}

void ServingEngine::Cancel(uint64_t handle) {
  absl::MutexLock lock(&mu_);
  if (stop_) return;  // Stop() fails everything anyway
  inbox_.push_back(Command{Command::Kind::kCancel, handle, {}, nullptr, absl::Now()});
}

bool ServingEngine::Drain(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  admitting_ = false;
  return mu_.AwaitWithTimeout(absl::Condition(this, &ServingEngine::Drained), timeout);
}

void ServingEngine::Stop() {
  {
    absl::MutexLock lock(&mu_);
    admitting_ = false;
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

ServingStats ServingEngine::Stats() const {
  absl::MutexLock lock(&mu_);
  ServingStats s = published_;
  s.in_flight = in_flight_;
  return s;
}

void ServingEngine::Run() {
  for (;;) {
    const bool idle = !loop_->HasWork();
    std::deque<Command> commands;
    bool stop = false;
    {
      absl::MutexLock lock(&mu_);
      if (idle) mu_.Await(absl::Condition(this, &ServingEngine::Wakeable));
      commands.swap(inbox_);
      stop = stop_;
    }
    // Two rounds for the sinks (ServingEngineOptions::begin_round): the
    // commands' answers (cancellations, refusals) go out before the step runs.
    if (options_.begin_round) options_.begin_round();
    for (Command& c : commands) Apply(c);
    if (stop) FailAll(absl::UnavailableError("server is shutting down"));
    if (options_.end_round) options_.end_round();
    if (stop) {
      Publish();
      return;
    }
    if (options_.begin_round) options_.begin_round();
    if (loop_->HasWork()) {
      const absl::Time t0 = absl::Now();
      step_sampled_ = 0;
      const absl::Status st = loop_->Step();
      if (metrics_ != nullptr && st.ok()) {
        metrics_->OnStep(loop_->scheduler().Stats(), absl::ToDoubleSeconds(absl::Now() - t0),
                         tap_->prefill_tokens(), step_sampled_);
      }
      STRATA_CHECK(!st.ok() || tap_->unconsumed() == 0) << "a sampled row had no on_token call";
      // Requests finished by a stop token or string during the step: free
      // their blocks now (those that also hit max_tokens are already gone).
      for (uint64_t h : to_abort_) (void)loop_->Abort(RequestId(static_cast<int64_t>(h)));
      to_abort_.clear();
      if (!st.ok()) {
        // The loop aborted the step's sequences; fail their requests. A
        // failed engine (a lost worker) makes every step fail, so new
        // requests fail fast too; clients may retry elsewhere.
        spdlog::error("engine step failed: {}", st.ToString());
        engine_healthy_ = false;
        const absl::Status failure =
            absl::UnavailableError(absl::StrCat("engine failed: ", st.message()));
        std::vector<uint64_t> lost;
        for (const auto& [h, a] : active_) {
          if (!loop_->scheduler().HasSeq(SeqId(static_cast<int64_t>(a->seq)))) lost.push_back(h);
        }
        for (uint64_t h : lost) Finish(*active_.at(h), failure, {});
      } else {
        engine_healthy_ = true;
      }
    }
    Publish();
    if (options_.end_round) options_.end_round();
  }
}

void ServingEngine::Apply(Command& c) {
  if (c.kind == Command::Kind::kCancel) {
    auto it = active_.find(c.handle);
    if (it == active_.end()) return;
    (void)loop_->Abort(RequestId(static_cast<int64_t>(c.handle)));  // blocks freed here
    Finish(*it->second, absl::CancelledError("cancelled by the client"), {});
    return;
  }
  LoopRequest lr;
  lr.request_id = RequestId(static_cast<int64_t>(c.handle));
  lr.prompt = c.request.prompt;
  lr.max_tokens = c.request.max_tokens;
  lr.sampling = c.request.sampling;
  lr.num_logprobs = c.request.num_logprobs;
  // No stop tokens for the loop: they are applied in OnToken (see LogitsTap).
  absl::StatusOr<SeqId> seq = loop_->AddRequest(lr);
  if (!seq.ok()) {
    if (metrics_ != nullptr) {
      metrics_->OnRequestDone(OutcomeName(seq.status()), absl::ToDoubleSeconds(absl::Now() - c.arrival),
                              0, 0);
    }
    c.sink->OnDone(seq.status(), {});
    absl::MutexLock lock(&mu_);
    --in_flight_;
    return;
  }
  auto a = std::make_unique<Active>(c.handle, std::move(c.request), std::move(c.sink), *tokenizer_,
                                    c.arrival);
  a->seq = seq->value();
  // Prime the decoder with the prompt's last visible piece so the first
  // generated piece keeps its leading space (as in the prompt's text).
  const std::vector<int32_t>& p = a->request.prompt;
  for (auto it = p.rbegin(); it != p.rend(); ++it) {
    if (!tokenizer_->IsControl(*it) && !tokenizer_->IsByte(*it)) {
      a->decoder.Push(*it);
      break;
    }
  }
  active_.emplace(c.handle, std::move(a));
}

void ServingEngine::OnToken(RequestId id, int32_t token, const StepOutput::Sampled* sampled) {
  // Loop-sampled: the logits row, consumed for every call, in order.
  const float* row = sampled == nullptr ? tap_->NextRow() : nullptr;
  ++step_sampled_;
  auto it = active_.find(static_cast<uint64_t>(id.value()));
  if (it == active_.end()) return;
  Active& a = *it->second;
  if (a.first_token == absl::InfinitePast()) {
    a.first_token = absl::Now();
    if (metrics_ != nullptr) metrics_->OnFirstToken(absl::ToDoubleSeconds(a.first_token - a.arrival));
  }
  const ServingRequest& r = a.request;
  if (std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), token) !=
      r.stop_token_ids.end()) {
    v1::GenerateResponse last;
    StopStringMatcher::Result tail = a.matcher.Push(a.decoder.Flush());
    last.set_text(tail.text + a.matcher.Flush());
    last.set_stop_token_id(token);
    last.set_finish_reason(v1::FINISH_REASON_STOP);
    to_abort_.push_back(a.handle);
    Finish(a, absl::OkStatus(), std::move(last));
    return;
  }
  v1::GenerateResponse chunk;
  chunk.add_token_ids(token);
  ++a.completion_tokens;
  if (r.num_logprobs >= 0) {
    const int32_t vocab = tokenizer_->vocab_size();
    v1::TokenLogprobs* lp = chunk.add_logprobs();
    lp->mutable_sampled()->set_token_id(token);
    lp->mutable_sampled()->set_logprob(sampled != nullptr ? sampled->logprob : LogProbOf(row, vocab, token));
    if (r.num_logprobs > 0) {
      const std::vector<std::pair<int32_t, float>> top =
          sampled != nullptr ? sampled->top_logprobs : TopLogProbs(row, vocab, r.num_logprobs);
      for (const auto& [tid, logprob] : top) {
        v1::TokenLogprob* t = lp->add_top();
        t->set_token_id(tid);
        t->set_logprob(logprob);
      }
    }
  }
  StopStringMatcher::Result text = a.matcher.Push(a.decoder.Push(token));
  chunk.set_text(std::move(text.text));
  if (text.matched) {
    chunk.set_stop_string(r.stop_strings[*text.matched]);
    chunk.set_finish_reason(v1::FINISH_REASON_STOP);
    to_abort_.push_back(a.handle);
    Finish(a, absl::OkStatus(), std::move(chunk));
    return;
  }
  a.sink->OnChunk(std::move(chunk));
}

void ServingEngine::OnFinish(const FinishedSeq& f) {
  auto it = active_.find(static_cast<uint64_t>(f.request_id.value()));
  if (it == active_.end()) return;  // already finished by a stop token or string
  Active& a = *it->second;
  // The loop has no stop tokens, so this is max_tokens (validation keeps
  // prompt + max_tokens within the context).
  v1::GenerateResponse last;
  StopStringMatcher::Result tail = a.matcher.Push(a.decoder.Flush());
  if (tail.matched) {
    last.set_text(std::move(tail.text));
    last.set_stop_string(a.request.stop_strings[*tail.matched]);
    last.set_finish_reason(v1::FINISH_REASON_STOP);
  } else {
    last.set_text(tail.text + a.matcher.Flush());
    last.set_finish_reason(v1::FINISH_REASON_LENGTH);
  }
  Finish(a, absl::OkStatus(), std::move(last));
}

void ServingEngine::Finish(Active& a, const absl::Status& status, v1::GenerateResponse last) {
  if (status.ok()) {
    last.mutable_usage()->set_prompt_tokens(static_cast<int32_t>(a.request.prompt.size()));
    last.mutable_usage()->set_completion_tokens(a.completion_tokens);
  } else {
    last.Clear();
  }
  if (metrics_ != nullptr) {
    const absl::Time now = absl::Now();
    const double tpot = a.completion_tokens > 1
                            ? absl::ToDoubleSeconds(now - a.first_token) / (a.completion_tokens - 1)
                            : 0.0;
    std::string outcome = OutcomeName(status);
    if (status.ok()) outcome = last.finish_reason() == v1::FINISH_REASON_STOP ? "stop" : "length";
    metrics_->OnRequestDone(outcome, absl::ToDoubleSeconds(now - a.arrival), tpot,
                            a.completion_tokens);
  }
  a.sink->OnDone(status, std::move(last));
  const uint64_t handle = a.handle;
  active_.erase(handle);  // destroys `a`
  absl::MutexLock lock(&mu_);
  --in_flight_;
}

void ServingEngine::FailAll(const absl::Status& status) {
  std::vector<uint64_t> handles;
  for (const auto& [h, a] : active_) handles.push_back(h);
  std::sort(handles.begin(), handles.end());
  for (uint64_t h : handles) {
    (void)loop_->Abort(RequestId(static_cast<int64_t>(h)));
    Finish(*active_.at(h), status, {});
  }
}

void ServingEngine::Publish() {
  const SchedulerStats s = loop_->scheduler().Stats();
  absl::MutexLock lock(&mu_);
  published_.scheduler = s;
  published_.engine_healthy = engine_healthy_;
}

}  // namespace strata::serving
