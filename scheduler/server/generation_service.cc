#include "scheduler/server/generation_service.h"

#include <cctype>
#include <deque>
#include <utility>

#include "absl/synchronization/mutex.h"
#include "scheduler/server/status_convert.h"
#include "spdlog/spdlog.h"

namespace strata::serving {
namespace {

// Constant-time comparison, so the token cannot be guessed byte by byte from
// response times.
bool SameSecret(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

grpc::ServerUnaryReactor* Answer(grpc::CallbackServerContext* context, const absl::Status& s) {
  grpc::ServerUnaryReactor* r = context->DefaultReactor();
  r->Finish(ToGrpcStatus(s));
  return r;
}

// --- Generate (server streaming) -------------------------------------------
//
// One write in flight at a time. State changes and the decision to write or
// finish happen under the mutex; the gRPC call itself is made outside it
// (gRPC may run reactions inline). The engine thread's tokens and final
// answers are written by the service's StreamWriter thread, so a step's
// hundreds of streams cost the engine a lock and a queue push each; writes
// that follow a completed write, cancellations and rejections run where they
// happen. At most one decided action per stream is pending at a time (a
// decided write keeps the others waiting until it completes), so deferring
// one keeps their order. After Finish is issued the reactor is never touched
// again: gRPC deletes it (OnDone) once Finish completes, while the engine may
// still hold this sink.
class StreamCall;

class StreamSink final : public GenerationSink, public std::enable_shared_from_this<StreamSink> {
 public:
  StreamSink(StreamCall* call, ServingEngine* engine, StreamWriter* writer)
      : call_(call), engine_(engine), writer_(writer) {}
  void set_handle(uint64_t h) { handle_.store(h); }

  void OnChunk(v1::GenerateResponse chunk) override {
    Action a;
    {
      absl::MutexLock lock(&mu_);
      if (finish_issued_ || cancelled_) return;
      if (queue_.empty()) {
        queue_.push_back(std::move(chunk));
      } else {
        MergeChunk(&queue_.back(), std::move(chunk));
      }
      a = NextLocked();
    }
    DoFromEngine(a);
  }
  void OnDone(const absl::Status& status, v1::GenerateResponse last) override {
    Action a;
    {
      absl::MutexLock lock(&mu_);
      if (finish_issued_) return;
      if (status.ok()) {
        if (queue_.empty()) {
          queue_.push_back(std::move(last));
        } else {
          MergeChunk(&queue_.back(), std::move(last));
        }
      }
      final_ = ToGrpcStatus(status);
      done_ = true;
      a = NextLocked();
    }
    DoFromEngine(a);
  }
  void WriteDone(bool ok) {
    Action a;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) cancelled_ = true;  // the stream is gone
      a = NextLocked();
    }
    Do(a);
    if (!ok) CancelRequest();
  }
  void Cancelled() {
    Action a;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      a = NextLocked();
    }
    Do(a);
    CancelRequest();  // frees the request's blocks
  }
  // Answers at once (request refused before reaching the engine).
  void Reject(const grpc::Status& status) {
    Action a;
    {
      absl::MutexLock lock(&mu_);
      final_ = status;
      done_ = true;
      a = NextLocked();
    }
    Do(a);
  }

 private:
  enum class Action { kNone, kWrite, kFinish };
  Action NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finish_issued_) return Action::kNone;
    if (cancelled_) {
      finish_issued_ = true;
      final_ = ToGrpcStatus(absl::CancelledError("cancelled"));
      return Action::kFinish;
    }
    if (!queue_.empty()) {
      in_flight_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      return Action::kWrite;
    }
    if (done_) {
      finish_issued_ = true;
      return Action::kFinish;
    }
    return Action::kNone;
  }
  void Do(Action a);
  // OnChunk and OnDone: called by the engine thread (and, before a request
  // reaches the engine, by a handler), so the gRPC call goes to the writer.
  void DoFromEngine(Action a) {
    if (a == Action::kNone) return;
    if (writer_ == nullptr) return Do(a);
    writer_->Post([self = shared_from_this(), a] { self->Do(a); });
  }
  void CancelRequest() {
    if (engine_ != nullptr && handle_.load() != 0) engine_->Cancel(handle_.load());
  }

  StreamCall* const call_;
  ServingEngine* const engine_;
  StreamWriter* const writer_;  // null: write inline
  std::atomic<uint64_t> handle_{0};
  absl::Mutex mu_;
  std::deque<v1::GenerateResponse> queue_ ABSL_GUARDED_BY(mu_);
  // The message being written; gRPC reads it until OnWriteDone.
  v1::GenerateResponse in_flight_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_issued_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_;  // read after finish_issued_ is set; never written again
};

class StreamCall final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  StreamCall(ServingEngine* engine, StreamWriter* writer)
      : sink_(std::make_shared<StreamSink>(this, engine, writer)) {}
  const std::shared_ptr<StreamSink>& sink() const { return sink_; }
  void OnWriteDone(bool ok) override { sink_->WriteDone(ok); }
  void OnCancel() override { sink_->Cancelled(); }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<StreamSink> sink_;
};

void StreamSink::Do(Action a) {
  if (a == Action::kWrite) call_->StartWrite(&in_flight_);
  if (a == Action::kFinish) call_->Finish(final_);
}

// --- GenerateUnary ---------------------------------------------------------

class UnaryCall;

class UnarySink final : public GenerationSink {
 public:
  UnarySink(UnaryCall* call, v1::GenerateResponse* response, ServingEngine* engine)
      : call_(call), response_(response), engine_(engine) {}
  void set_handle(uint64_t h) { handle_.store(h); }
  void OnChunk(v1::GenerateResponse chunk) override {
    absl::MutexLock lock(&mu_);
    if (!finished_) MergeChunk(response_, std::move(chunk));
  }
  void OnDone(const absl::Status& status, v1::GenerateResponse last) override {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      finished_ = true;
      if (status.ok()) MergeChunk(response_, std::move(last));
    }
    FinishCall(ToGrpcStatus(status));
  }
  void Cancelled() {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      finished_ = true;
    }
    FinishCall(ToGrpcStatus(absl::CancelledError("cancelled")));
    engine_->Cancel(handle_.load());
  }

 private:
  void FinishCall(const grpc::Status& s);
  UnaryCall* const call_;
  v1::GenerateResponse* const response_;
  ServingEngine* const engine_;
  std::atomic<uint64_t> handle_{0};
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  UnaryCall(v1::GenerateResponse* response, ServingEngine* engine)
      : sink_(std::make_shared<UnarySink>(this, response, engine)) {}
  const std::shared_ptr<UnarySink>& sink() const { return sink_; }
  void OnCancel() override { sink_->Cancelled(); }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<UnarySink> sink_;
};

void UnarySink::FinishCall(const grpc::Status& s) { call_->Finish(s); }

}  // namespace

void MergeChunk(v1::GenerateResponse* dst, v1::GenerateResponse&& src) {
  dst->mutable_token_ids()->Add(src.token_ids().begin(), src.token_ids().end());
  dst->mutable_text()->append(src.text());
  for (v1::TokenLogprobs& lp : *src.mutable_logprobs()) *dst->add_logprobs() = std::move(lp);
  if (src.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
    dst->set_finish_reason(src.finish_reason());
  }
  if (src.has_usage()) *dst->mutable_usage() = src.usage();
  if (src.has_stop_token_id()) dst->set_stop_token_id(src.stop_token_id());
  if (src.has_stop_string()) dst->set_stop_string(src.stop_string());
}

void GenerationService::SetReady(ServingEngine* engine, const Tokenizer* tokenizer,
                                 ServingMetrics* metrics, const RequestLimits& limits,
                                 const v1::ModelInfo& info) {
  tokenizer_ = tokenizer;
  metrics_ = metrics;
  limits_ = limits;
  info_ = info;
  engine_.store(engine, std::memory_order_release);
}

void GenerationService::CountRejected(const absl::Status& status) const {
  if (metrics_ == nullptr || engine_.load(std::memory_order_acquire) == nullptr) return;
  std::string name = absl::StatusCodeToString(status.code());
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  metrics_->OnRequestDone(name, 0.0, 0.0, 0);
}

absl::StatusOr<ServingEngine*> GenerationService::Admit(
    grpc::CallbackServerContext* context) const {
  if (auth_token_.has_value()) {
    const auto& md = context->client_metadata();
    const auto it = md.find("authorization");
    if (it == md.end()) {
      return absl::UnauthenticatedError("missing `authorization: Bearer <token>` metadata");
    }
    const std::string_view value(it->second.data(), it->second.size());
    constexpr std::string_view kBearer = "Bearer ";
    if (value.substr(0, kBearer.size()) != kBearer ||
        !SameSecret(value.substr(kBearer.size()), *auth_token_)) {
      return absl::UnauthenticatedError("invalid bearer token");
    }
  }
  ServingEngine* engine = engine_.load(std::memory_order_acquire);
  if (engine == nullptr) return absl::UnavailableError("model is loading; retry shortly");
  return engine;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerationService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  absl::StatusOr<ServingEngine*> engine = Admit(context);
  auto* call = new StreamCall(engine.ok() ? *engine : nullptr, &writer_);
  if (!engine.ok()) {
    call->sink()->Reject(ToGrpcStatus(engine.status()));
    return call;
  }
  absl::StatusOr<ServingRequest> req = ValidateGenerateRequest(*request, *tokenizer_, limits_);
  if (!req.ok()) {
    CountRejected(req.status());
    call->sink()->Reject(ToGrpcStatus(req.status()));
    return call;
  }
  absl::StatusOr<uint64_t> handle = (*engine)->Submit(std::move(*req), call->sink());
  if (!handle.ok()) {
    CountRejected(handle.status());
    call->sink()->Reject(ToGrpcStatus(handle.status()));
    return call;
  }
  call->sink()->set_handle(*handle);
  return call;
}

grpc::ServerUnaryReactor* GenerationService::GenerateUnary(grpc::CallbackServerContext* context,
                                                           const v1::GenerateRequest* request,
                                                           v1::GenerateResponse* response) {
  absl::StatusOr<ServingEngine*> engine = Admit(context);
  if (!engine.ok()) return Answer(context, engine.status());
  absl::StatusOr<ServingRequest> req = ValidateGenerateRequest(*request, *tokenizer_, limits_);
  if (!req.ok()) {
    CountRejected(req.status());
    return Answer(context, req.status());
  }
  auto* call = new UnaryCall(response, *engine);
  absl::StatusOr<uint64_t> handle = (*engine)->Submit(std::move(*req), call->sink());
  if (!handle.ok()) {
    CountRejected(handle.status());
    call->sink()->OnDone(handle.status(), {});
    return call;
  }
  call->sink()->set_handle(*handle);
  return call;
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                      const v1::TokenizeRequest* request,
                                                      v1::TokenizeResponse* response) {
  absl::StatusOr<ServingEngine*> engine = Admit(context);
  if (!engine.ok()) return Answer(context, engine.status());
  absl::StatusOr<std::vector<int32_t>> ids = ValidateTokenizeRequest(*request, *tokenizer_, limits_);
  if (!ids.ok()) return Answer(context, ids.status());
  response->mutable_token_ids()->Add(ids->begin(), ids->end());
  return Answer(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* GenerationService::Detokenize(grpc::CallbackServerContext* context,
                                                        const v1::DetokenizeRequest* request,
                                                        v1::DetokenizeResponse* response) {
  absl::StatusOr<ServingEngine*> engine = Admit(context);
  if (!engine.ok()) return Answer(context, engine.status());
  if (absl::Status s = ValidateDetokenizeRequest(*request, limits_); !s.ok()) {
    return Answer(context, s);
  }
  response->set_text(tokenizer_->Decode({request->token_ids().begin(), request->token_ids().end()}));
  return Answer(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(grpc::CallbackServerContext* context,
                                                          const v1::GetModelInfoRequest*,
                                                          v1::ModelInfo* response) {
  absl::StatusOr<ServingEngine*> engine = Admit(context);
  if (!engine.ok()) return Answer(context, engine.status());
  const ServingStats s = (*engine)->Stats();
  const BlockManagerStats& b = s.scheduler.blocks;
  *response = info_;
  v1::BlockPoolInfo* gpu = response->mutable_gpu_blocks();
  gpu->set_total(b.gpu_total);
  gpu->set_used(b.gpu_used);
  gpu->set_cached(b.gpu_cached);
  gpu->set_free(b.gpu_free);
  v1::BlockPoolInfo* cpu = response->mutable_cpu_blocks();
  cpu->set_total(b.cpu_total);
  cpu->set_used(b.cpu_used);
  cpu->set_free(b.cpu_total - b.cpu_used);
  response->set_num_running(s.scheduler.num_running);
  response->set_num_waiting(s.scheduler.num_waiting);
  response->set_num_swapped(s.scheduler.num_swapped);
  return Answer(context, absl::OkStatus());
}

}  // namespace strata::serving
