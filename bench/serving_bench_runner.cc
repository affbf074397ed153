#include "bench/serving_bench_runner.h"

#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace strata::bench {
namespace {

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Counts calls in flight and finished. Shared by the dispatching thread (RunRequests) and
// gRPC's callback threads (GenerateCall::OnDone).
class Tracker {
 public:
  explicit Tracker(RunProgress* progress) : progress_(progress) {}

  void Sent() {
    absl::MutexLock l(&mu_);
    ++in_flight_;
    progress_->sent.fetch_add(1, std::memory_order_relaxed);
  }
  void Done(bool ok) {
    absl::MutexLock l(&mu_);
    --in_flight_;
    ++finished_;
    progress_->finished.fetch_add(1, std::memory_order_relaxed);
    if (!ok) progress_->failed.fetch_add(1, std::memory_order_relaxed);
  }
  // Blocks until fewer than `limit` calls are in flight.
  void WaitForSlot(int limit) {
    absl::MutexLock l(&mu_);
    slot_limit_ = limit;
    mu_.Await(absl::Condition(this, &Tracker::HasSlot));
  }
  // Blocks until `n` calls have finished.
  void WaitForFinished(int n) {
    absl::MutexLock l(&mu_);
    finish_target_ = n;
    mu_.Await(absl::Condition(this, &Tracker::AllFinished));
  }

 private:
  bool HasSlot() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return in_flight_ < slot_limit_; }
  bool AllFinished() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return finished_ >= finish_target_;
  }

  RunProgress* progress_;
  absl::Mutex mu_;
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int finished_ ABSL_GUARDED_BY(mu_) = 0;
  int slot_limit_ ABSL_GUARDED_BY(mu_) = 0;
  int finish_target_ ABSL_GUARDED_BY(mu_) = 0;
};

// One streaming call. Owns itself from Start() until OnDone, where it writes its result slot
// (read by RunRequests only after every call is done) and deletes itself.
class GenerateCall : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  GenerateCall(Tracker* tracker, RequestResult* result, Clock::time_point run_start)
      : tracker_(tracker), result_(result), run_start_(run_start) {}

  void Start(v1::Generation::Stub* stub, v1::GenerateRequest request, double timeout_s,
             const std::string& authorization) {
    request_ = std::move(request);
    ctx_.set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    if (!authorization.empty()) ctx_.AddMetadata("authorization", authorization);
    stub->async()->Generate(&ctx_, &request_, this);
    StartRead(&chunk_);
    start_ = last_ = Clock::now();
    result_->send_s = Seconds(start_ - run_start_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // end of stream or error: OnDone follows
    const Clock::time_point now = Clock::now();
    if (chunk_.token_ids_size() > 0) {
      if (result_->ttft_s < 0) {
        result_->ttft_s = Seconds(now - start_);
      } else {
        result_->itl_s.push_back(Seconds(now - last_));
      }
      last_ = now;
      result_->output_tokens += chunk_.token_ids_size();
      result_->token_times.emplace_back(Seconds(now - run_start_), chunk_.token_ids_size());
    }
    if (chunk_.has_usage()) {
      result_->prompt_tokens = chunk_.usage().prompt_tokens();
      result_->usage_output_tokens = chunk_.usage().completion_tokens();
    }
    StartRead(&chunk_);
  }

  void OnDone(const grpc::Status& status) override {
    result_->e2e_s = Seconds(Clock::now() - start_);
    result_->code = status.error_code();
    if (!status.ok()) result_->error = status.error_message();
    tracker_->Done(status.ok());
    delete this;
  }

 private:
  Tracker* tracker_;
  RequestResult* result_;
  Clock::time_point run_start_, start_, last_;
  grpc::ClientContext ctx_;
  v1::GenerateRequest request_;
  v1::GenerateResponse chunk_;
};

}  // namespace

void RunRequests(v1::Generation::Stub* stub, const RunOptions& o,
                 const std::vector<RequestSpec>& specs, RunProgress* progress,
                 std::vector<RequestResult>* results, double* duration_s) {
  results->assign(specs.size(), RequestResult{});
  Tracker tracker(progress);
  const Clock::time_point start = Clock::now();
  for (size_t i = 0; i < specs.size(); ++i) {
    const RequestSpec& spec = specs[i];
    v1::GenerateRequest request;
    const std::vector<int32_t> ids = PromptTokenIds(o.seed, static_cast<int>(i), spec.input_len,
                                                    o.vocab_size, o.bos_token_id, o.eos_token_id);
    request.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
    request.mutable_sampling()->set_max_tokens(spec.output_len);
    request.mutable_sampling()->set_ignore_eos(true);
    request.mutable_sampling()->set_temperature(0);
    request.set_request_id("bench-" + std::to_string(i));
    std::this_thread::sleep_until(start + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(spec.arrival_s)));
    if (o.concurrency > 0) tracker.WaitForSlot(o.concurrency);
    tracker.Sent();
    (new GenerateCall(&tracker, &(*results)[i], start))
        ->Start(stub, std::move(request), o.request_timeout_s, o.authorization);
  }
  tracker.WaitForFinished(static_cast<int>(specs.size()));
  *duration_s = Seconds(Clock::now() - start);
}

const char* StatusCodeName(grpc::StatusCode code) {
  static const char* kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                                 "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                 "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                 "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int c = static_cast<int>(code);
  return c >= 0 && c <= 16 ? kNames[c] : "UNKNOWN_CODE";
}

}  // namespace strata::bench
