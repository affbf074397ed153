#include "scheduler/remote_engine.h"

#include <optional>

#include <chrono>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/status_macros.h"
#include "spdlog/spdlog.h"
#include "worker/worker_service.h"

namespace strata {

namespace v1 = worker::v1;

namespace {

bool SameModel(const ModelConfig& a, const ModelConfig& b) {
  return a.hidden_size == b.hidden_size && a.intermediate_size == b.intermediate_size &&
         a.num_layers == b.num_layers && a.num_heads == b.num_heads && a.num_kv_heads == b.num_kv_heads &&
         a.head_dim == b.head_dim && a.vocab_size == b.vocab_size &&
         a.max_position_embeddings == b.max_position_embeddings;
}

std::string RandomPrefix() {
  std::random_device rd;
  return absl::StrFormat("strata/%08x%08x/", rd(), rd());
}

}  // namespace

absl::StatusOr<std::unique_ptr<RemoteEngine>> RemoteEngine::Connect(
    ControlPlane* cp, const RemoteEngineOptions& o, absl::Time deadline,
    const std::function<absl::Status()>& abort_check) {
  if (o.world_size != cp->world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("engine world size ", o.world_size,
                                                   " differs from the control plane's ", cp->world_size()));
  }
  if (o.step_timeout <= absl::ZeroDuration()) return absl::InvalidArgumentError("step_timeout must be positive");
  auto e = std::unique_ptr<RemoteEngine>(new RemoteEngine());
  e->step_timeout_ = o.step_timeout;
  ASSIGN_OR_RETURN(e->workers_, cp->WaitForWorkers(deadline, abort_check));
  absl::Status s = e->Handshake(o, deadline, abort_check);
  if (!s.ok()) {
    for (const auto& w : e->workers_) w->Close(s, /*cancel=*/true);
    return s;
  }
  return e;
}

RemoteEngine::~RemoteEngine() { Shutdown("the scheduler's engine was destroyed"); }

absl::StatusOr<v1::WorkerMessage> RemoteEngine::ReceiveFrom(int rank, absl::Time deadline,
                                                           const std::function<absl::Status()>& abort_check) {
  for (;;) {
    const absl::Time slice = abort_check ? std::min(deadline, absl::Now() + absl::Milliseconds(100)) : deadline;
    absl::StatusOr<v1::WorkerMessage> m = workers_[rank]->Receive(slice);
    if (m.ok() || m.status().code() != absl::StatusCode::kDeadlineExceeded) return m;
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("worker ", workers_[rank]->Describe(),
                                                      " did not answer in time"));
    }
    if (abort_check) RETURN_IF_ERROR(abort_check());
  }
}

absl::Status RemoteEngine::Handshake(const RemoteEngineOptions& o, absl::Time deadline,
                                     const std::function<absl::Status()>& abort_check) {
  const int n = static_cast<int>(workers_.size());
  v1::SchedulerMessage init;
  v1::Init* i = init.mutable_init();
  i->set_load_format(o.load_format);
  i->set_model_path(o.model_path);
  i->set_dummy_shape(o.dummy_shape);
  i->set_dummy_seed(o.dummy_seed);
  i->set_kv_dtype(static_cast<int32_t>(o.kv_format.dtype));
  i->set_kv_scale_mode(static_cast<int32_t>(o.kv_format.scale_mode));
  i->set_block_size(o.block_size);
  i->set_kv_quant_params_path(o.kv_quant_params_path);
  i->set_rendezvous_prefix(RandomPrefix());
  i->set_collective_timeout_ms(absl::ToInt64Milliseconds(o.collective_timeout));
  i->set_device(o.device);
  i->set_dtype(o.dtype);
  i->set_gpu_memory_utilization(o.gpu_memory_utilization);
  i->set_max_num_seqs(o.max_num_seqs);
  i->set_max_num_tokens(o.max_num_tokens);
  i->set_enforce_eager(o.enforce_eager);
  i->set_serialize_mixed_attention(o.serialize_mixed_attention);
  for (const auto& w : workers_) RETURN_IF_ERROR(w->Send(init));
  int64_t gpu_blocks = INT32_MAX, cpu_blocks = INT32_MAX;
  for (int r = 0; r < n; ++r) {
    ASSIGN_OR_RETURN(v1::WorkerMessage m, ReceiveFrom(r, deadline, abort_check));
    if (!m.has_ready()) return absl::InternalError(absl::StrCat("worker ", workers_[r]->Describe(), " did not answer Init with Ready"));
    const v1::Ready& ready = m.ready();
    const absl::Status s = StatusFromProto(ready.status());
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat("worker ", workers_[r]->Describe(), " failed to start: ", s.message()));
    }
    const ModelConfig c = ConfigFromProto(ready.config());
    if (r == 0) {
      config_ = c;
      kv_bytes_per_block_ = ready.kv_bytes_per_block();
    } else if (!SameModel(c, config_)) {
      return absl::FailedPreconditionError(absl::StrCat("worker ", workers_[r]->Describe(),
                                                        " loaded a different model than rank 0"));
    }
    kv_bytes_per_block_ = std::max(kv_bytes_per_block_, ready.kv_bytes_per_block());
    gpu_blocks = std::min<int64_t>(gpu_blocks, ready.max_gpu_blocks());
    cpu_blocks = std::min<int64_t>(cpu_blocks, ready.max_cpu_blocks());
  }
  if (o.max_gpu_blocks > 0) gpu_blocks = std::min<int64_t>(gpu_blocks, o.max_gpu_blocks);
  if (o.max_cpu_blocks >= 0) cpu_blocks = std::min<int64_t>(cpu_blocks, o.max_cpu_blocks);
  if (gpu_blocks < 1) return absl::ResourceExhaustedError("a worker's KV budget holds no block");
  v1::SchedulerMessage alloc;
  alloc.mutable_allocate()->set_num_gpu_blocks(static_cast<int32_t>(gpu_blocks));
  alloc.mutable_allocate()->set_num_cpu_blocks(static_cast<int32_t>(cpu_blocks));
  for (const auto& w : workers_) RETURN_IF_ERROR(w->Send(alloc));
  for (int r = 0; r < n; ++r) {
    ASSIGN_OR_RETURN(v1::WorkerMessage m, ReceiveFrom(r, deadline, abort_check));
    if (!m.has_allocated()) return absl::InternalError(absl::StrCat("worker ", workers_[r]->Describe(), " did not answer Allocate"));
    const absl::Status s = StatusFromProto(m.allocated().status());
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat("worker ", workers_[r]->Describe(), " failed to allocate: ", s.message()));
    }
    const v1::MemoryReport& mr = m.allocated().memory();
    memory_.push_back({mr.device(), mr.total(), mr.weights(), mr.activations(), mr.kv_cache(), mr.swap(),
                       mr.free()});
  }
  engine_options_.kv_format = o.kv_format;
  engine_options_.block_size = o.block_size;
  engine_options_.num_gpu_blocks = static_cast<int32_t>(gpu_blocks);
  engine_options_.num_cpu_blocks = static_cast<int32_t>(cpu_blocks);
  spdlog::info("remote engine: {} worker(s) ready, {} KV blocks + {} swap blocks per rank ({} bytes each)",
               n, gpu_blocks, cpu_blocks, kv_bytes_per_block_);
  return absl::OkStatus();
}

absl::Status RemoteEngine::Fail(const absl::Status& why) {
  absl::Status first;
  {
    absl::MutexLock lock(&mu_);
    if (failure_.ok()) failure_ = absl::UnavailableError(why.message());
    first = failure_;
  }
  spdlog::error("remote engine: {}", std::string(first.message()));
  for (const auto& w : workers_) w->Close(first, /*cancel=*/true);
  return first;
}

absl::Status RemoteEngine::health() const {
  {
    absl::MutexLock lock(&mu_);
    if (!failure_.ok()) return failure_;
  }
  for (const auto& w : workers_) {
    absl::Status s = w->closed_reason();
    if (!s.ok()) return absl::UnavailableError(s.message());
  }
  return absl::OkStatus();
}

RemoteStepTimings RemoteEngine::timings() const {
  absl::MutexLock lock(&mu_);
  return total_;
}

RemoteStepTimings RemoteEngine::last_timings() const {
  absl::MutexLock lock(&mu_);
  return last_;
}

absl::Status RemoteEngine::Step(const StepInput& input, StepOutput* output) {
  {
    absl::MutexLock lock(&mu_);
    if (!failure_.ok()) return failure_;
  }
  if (shut_down_) return absl::UnavailableError("the remote engine was shut down");
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t step_id = next_step_id_++;
  // Serialized once for every rank (Send would copy and serialize the message
  // per rank, one rank after the other); step_proto_ keeps its sequences'
  // allocations from step to step.
  step_proto_.Clear();
  StepToProto(step_id, input, &step_proto_);
  std::string bytes;
  if (!step_proto_.SerializeToString(&bytes)) {
    return Fail(absl::InternalError(absl::StrCat("step ", step_id, " could not be serialized")));
  }
  const int n = static_cast<int>(workers_.size());
  for (int r = 0; r < n; ++r) {
    v1::SchedulerMessage msg;
    if (r + 1 < n) {
      msg.set_step_serialized(bytes);
    } else {
      msg.set_step_serialized(std::move(bytes));
    }
    absl::Status s = workers_[r]->Send(std::move(msg));
    if (!s.ok()) {
      return Fail(absl::UnavailableError(absl::StrCat("tensor-parallel worker ", workers_[r]->Describe(),
                                                      " is gone before step ", step_id, ": ", s.message())));
    }
  }
  // Collect every rank's answer. After the first failure, the others get a
  // short grace to report too, so the message names the root cause (a dead
  // rank) rather than the rank whose collective noticed it first.
  const absl::Time deadline = absl::Now() + step_timeout_;
  absl::Time wait_until = deadline;
  std::vector<std::string> closed, failed, silent, quiet;
  absl::Status rejected;  // INVALID_ARGUMENT from every rank: the step, not the group, is bad
  std::string disagreement;
  int64_t worker_us = 0, engine_us = 0;
  rank_us_.assign(2 * n, 0);
  // Poll every rank in turn (not rank by rank to the deadline): a rank whose
  // process died closes its stream at once, while its peers may sit in a
  // collective until that times out; the dead rank is the news.
  std::vector<bool> answered(n, false);
  std::vector<std::optional<absl::StatusOr<v1::WorkerMessage>>> got(n);
  int pending = n;
  while (pending > 0) {
    const bool any_failure = !closed.empty() || !failed.empty();
    const absl::Time now = absl::Now();
    if (now >= wait_until) {
      for (int r = 0; r < n; ++r) {
        if (!answered[r]) (wait_until < deadline ? quiet : silent).push_back(workers_[r]->Describe());
      }
      break;
    }
    // Block (briefly) on the first rank still pending -- its answer is needed
    // anyway, so this adds no latency -- and only peek at the others.
    const absl::Time slice = std::min(wait_until, now + absl::Milliseconds(5));
    bool blocked = false;
    for (int r = 0; r < n; ++r) {
      if (answered[r]) continue;
      absl::StatusOr<v1::WorkerMessage> m = workers_[r]->Receive(blocked ? absl::InfinitePast() : slice);
      blocked = true;
      if (!m.ok() && m.status().code() == absl::StatusCode::kDeadlineExceeded) continue;
      answered[r] = true;
      --pending;
      if (!m.ok()) {
        closed.push_back(std::string(m.status().message()));
      } else if (!m->has_step_result() || m->step_result().step_id() != step_id) {
        failed.push_back(absl::StrCat(workers_[r]->Describe(), " answered out of order"));
      } else {
        got[r] = std::move(m);
      }
    }
    if (!any_failure && (!closed.empty() || !failed.empty())) {
      wait_until = std::min(deadline, absl::Now() + absl::Milliseconds(500));
    }
  }
  // Results in rank order (rank 0 first: it carries the output).
  for (int r = 0; r < n; ++r) {
    if (!got[r].has_value()) continue;
    v1::StepResult* res = (*got[r])->mutable_step_result();
    const absl::Status st = StatusFromProto(res->status());
    if (st.code() == absl::StatusCode::kInvalidArgument) {
      if (r == 0) rejected = st;
      else if (rejected.ok()) disagreement = absl::StrCat("rank ", r, " rejected the step (", st.message(), "), rank 0 ran it");
    } else if (!st.ok()) {
      failed.push_back(absl::StrCat(workers_[r]->Describe(), " reported ", st.ToString()));
    } else if (!rejected.ok()) {
      disagreement = absl::StrCat("rank 0 rejected the step (", rejected.message(), "), rank ", r, " ran it");
    } else {
      worker_us = std::max<int64_t>(worker_us, res->worker_us());
      engine_us = std::max<int64_t>(engine_us, res->engine_us());
      rank_us_[2 * r] = res->worker_us(), rank_us_[2 * r + 1] = res->engine_us();
      if (r == 0) {
        absl::Status d = OutputFromProto(*res, config_.vocab_size, output);
        if (!d.ok()) failed.push_back(absl::StrCat(workers_[r]->Describe(), ": ", d.message()));
      }
    }
  }
  if (!closed.empty() || !failed.empty() || !silent.empty() || !quiet.empty() || !disagreement.empty()) {
    std::vector<std::string> parts = closed;  // root causes first
    if (!silent.empty()) {
      parts.push_back(absl::StrCat("worker ", absl::StrJoin(silent, ", worker "), " did not finish step ", step_id,
                                   " within ", absl::FormatDuration(step_timeout_), " (hung or overloaded)"));
    }
    parts.insert(parts.end(), failed.begin(), failed.end());
    if (!quiet.empty()) parts.push_back(absl::StrCat("worker ", absl::StrJoin(quiet, ", worker "), " gave no answer"));
    if (!disagreement.empty()) parts.push_back(absl::StrCat("ranks disagree: ", disagreement));
    return Fail(absl::UnavailableError(absl::StrCat("tensor-parallel step ", step_id, " failed: ",
                                                    absl::StrJoin(parts, "; "),
                                                    "; the worker group is stopped")));
  }
  if (!rejected.ok()) return rejected;
  if (rank_observer_) {
    for (int r = 0; r < n; ++r) rank_observer_(r, rank_us_[2 * r], rank_us_[2 * r + 1]);
  }
  const int64_t wall_us =
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
  const RemoteStepTimings step{1, wall_us, worker_us, engine_us};
  {
    absl::MutexLock lock(&mu_);
    last_ = step;
    total_.steps += 1;
    total_.wall_us += wall_us;
    total_.worker_us += worker_us;
    total_.engine_us += engine_us;
  }
  if (step_observer_) step_observer_(step);
  return absl::OkStatus();
}

void RemoteEngine::Shutdown(const std::string& reason) {
  if (shut_down_) return;
  shut_down_ = true;
  v1::SchedulerMessage m;
  m.mutable_shutdown()->set_reason(reason);
  for (const auto& w : workers_) {
    if (w->Send(m).ok()) w->Close(absl::UnavailableError(absl::StrCat("shut down: ", reason)), /*cancel=*/false);
  }
}

}  // namespace strata
