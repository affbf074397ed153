#include "scheduler/control_plane.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "spdlog/spdlog.h"
#include "worker/worker_service.h"

namespace strata {

namespace v1 = worker::v1;

namespace {

// Ends a call that failed authentication.
class RejectReactor final : public grpc::ServerBidiReactor<v1::WorkerMessage, v1::SchedulerMessage> {
 public:
  explicit RejectReactor(const grpc::Status& s) { Finish(s); }
  void OnDone() override { delete this; }
};

bool IsLoopback(const std::string& address) {
  return absl::StartsWith(address, "127.") || absl::StartsWith(address, "localhost:") ||
         absl::StartsWith(address, "[::1]:") || absl::StartsWith(address, "unix:");
}

// Longest a Rendezvous.Wait may block on the server.
constexpr absl::Duration kMaxRendezvousWait = absl::Minutes(10);

}  // namespace

// ---- WorkerConnection --------------------------------------------------------------

WorkerConnection::WorkerConnection(ControlPlane* owner, grpc::CallbackServerContext* ctx)
    : owner_(owner), ctx_(ctx) {}

std::string WorkerConnection::Describe() const {
  return absl::StrCat("rank ", rank_, " (pid ", pid_, " on ", hostname_, ")");
}

absl::Status WorkerConnection::Send(v1::SchedulerMessage message) {
  absl::MutexLock lock(&mu_);
  if (!closed_.ok()) return closed_;
  if (finish_requested_) return absl::UnavailableError("control stream is closing");
  outbox_.push_back(std::move(message));
  if (!writing_) {
    writing_ = true;
    StartWrite(&outbox_.front());  // reactions never run inline, so holding mu_ is safe
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::WorkerMessage> WorkerConnection::Receive(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return !inbox_.empty() || !closed_.ok(); };
  mu_.AwaitWithDeadline(absl::Condition(&ready), deadline);
  if (!inbox_.empty()) {
    v1::WorkerMessage m = std::move(inbox_.front());
    inbox_.pop_front();
    return m;
  }
  if (!closed_.ok()) return closed_;
  return absl::DeadlineExceededError("no message before the deadline");
}

void WorkerConnection::Close(const absl::Status& reason, bool cancel) {
  absl::MutexLock lock(&mu_);
  SetClosedLocked(reason.ok() ? absl::UnavailableError("control stream closed by the scheduler") : reason);
  finish_requested_ = true;
  if (cancel) {
    outbox_.erase(outbox_.begin() + (writing_ ? 1 : 0), outbox_.end());
    if (!done_ && !finished_) ctx_->TryCancel();
  }
  MaybeFinishLocked();
}

absl::Status WorkerConnection::closed_reason() const {
  absl::MutexLock lock(&mu_);
  return closed_;
}

void WorkerConnection::SetClosedLocked(const absl::Status& reason) {
  if (closed_.ok()) closed_ = reason;  // the first reason wins
}

void WorkerConnection::MaybeFinishLocked() {
  // Finish once nothing is being written and either side ended the stream.
  if (finished_ || writing_ || !(finish_requested_ || read_closed_)) return;
  finished_ = true;
  Finish(grpc::Status::OK);
}

void WorkerConnection::OnReadDone(bool ok) {
  if (!ok) {
    absl::MutexLock lock(&mu_);
    read_closed_ = true;
    SetClosedLocked(absl::UnavailableError(absl::StrCat(
        "worker ", Describe(), " closed its control stream (exited, crashed or lost the connection)")));
    MaybeFinishLocked();
    return;
  }
  if (!hello_done_) {
    absl::Status s = incoming_.has_hello() ? owner_->OnHello(self_, incoming_.hello())
                                           : absl::InvalidArgumentError("the first message must be Hello");
    if (!s.ok()) {
      spdlog::warn("control plane: rejected a worker: {}", s.ToString());
      absl::MutexLock lock(&mu_);
      SetClosedLocked(s);
      finish_requested_ = true;
      if (!finished_) {
        finished_ = true;
        Finish(ToGrpcStatus(s));
      }
      return;
    }
    hello_done_ = true;
  } else {
    absl::MutexLock lock(&mu_);
    inbox_.push_back(std::move(incoming_));
  }
  incoming_.Clear();
  StartRead(&incoming_);
}

void WorkerConnection::OnWriteDone(bool ok) {
  absl::MutexLock lock(&mu_);
  outbox_.pop_front();
  writing_ = false;
  if (!ok) {
    SetClosedLocked(absl::UnavailableError(absl::StrCat("cannot write to worker ", Describe(),
                                                        ": control stream broken")));
    outbox_.clear();
    finish_requested_ = true;
  } else if (!outbox_.empty()) {
    writing_ = true;
    StartWrite(&outbox_.front());
  }
  MaybeFinishLocked();
}

void WorkerConnection::OnCancel() {
  absl::MutexLock lock(&mu_);
  SetClosedLocked(absl::UnavailableError(absl::StrCat("control stream of worker ", Describe(),
                                                      " was cancelled")));
  finish_requested_ = true;
  MaybeFinishLocked();
}

void WorkerConnection::OnDone() {
  std::shared_ptr<WorkerConnection> keep;
  {
    absl::MutexLock lock(&mu_);
    done_ = true;
    SetClosedLocked(absl::UnavailableError(absl::StrCat("control stream of worker ", Describe(), " ended")));
    keep = std::move(self_);
  }
  // `keep` may hold the last reference: `this` dies on return.
}

// ---- services ----------------------------------------------------------------------

class ControlPlane::ControlService final : public v1::WorkerControl::CallbackService {
 public:
  explicit ControlService(ControlPlane* owner) : owner_(owner) {}
  grpc::ServerBidiReactor<v1::WorkerMessage, v1::SchedulerMessage>* Connect(
      grpc::CallbackServerContext* ctx) override {
    if (!owner_->Authorized(*ctx)) {
      return new RejectReactor(grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                            "missing or wrong control-plane secret"));
    }
    std::shared_ptr<WorkerConnection> c(new WorkerConnection(owner_, ctx));
    c->self_ = c;
    {
      absl::MutexLock lock(&owner_->mu_);
      if (owner_->closing_ || owner_->shut_down_) {
        c->self_.reset();
        return new RejectReactor(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the scheduler is shutting down"));
      }
      owner_->all_.push_back(c);
    }
    c->StartRead(&c->incoming_);
    return c.get();
  }

 private:
  ControlPlane* owner_;
};

class ControlPlane::RendezvousService final : public v1::Rendezvous::Service {
 public:
  explicit RendezvousService(ControlPlane* owner) : owner_(owner) {}

  grpc::Status Set(grpc::ServerContext* ctx, const v1::SetRequest* req, v1::SetResponse*) override {
    if (!owner_->Authorized(*ctx)) return Unauthenticated();
    absl::MutexLock lock(&mu_);
    values_[req->key()] = req->value();
    return grpc::Status::OK;
  }

  grpc::Status Get(grpc::ServerContext* ctx, const v1::GetRequest* req, v1::GetResponse* resp) override {
    if (!owner_->Authorized(*ctx)) return Unauthenticated();
    absl::MutexLock lock(&mu_);
    auto it = values_.find(req->key());
    if (it == values_.end()) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("no rendezvous key ", req->key()));
    }
    resp->set_value(it->second);
    return grpc::Status::OK;
  }

  grpc::Status Wait(grpc::ServerContext* ctx, const v1::WaitRequest* req, v1::WaitResponse*) override {
    if (!owner_->Authorized(*ctx)) return Unauthenticated();
    const absl::Time deadline =
        absl::Now() + std::min(absl::Milliseconds(std::max<int64_t>(req->timeout_ms(), 0)), kMaxRendezvousWait);
    absl::MutexLock lock(&mu_);
    auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      if (stopping_ || ctx->IsCancelled()) return true;
      for (const auto& k : req->keys()) {
        if (values_.count(k) == 0) return false;
      }
      return true;
    };
    // Re-check cancellation now and then: a cancelled client stops waiting.
    while (!ready() && absl::Now() < deadline) {
      mu_.AwaitWithDeadline(absl::Condition(&ready), std::min(deadline, absl::Now() + absl::Milliseconds(200)));
    }
    for (const auto& k : req->keys()) {
      if (values_.count(k) == 0) {
        return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                            absl::StrCat("rendezvous key ", k, " did not appear in time"));
      }
    }
    return grpc::Status::OK;
  }

  void Stop() {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }

  std::optional<std::string> Value(const std::string& key) const {
    absl::MutexLock lock(&mu_);
    auto it = values_.find(key);
    if (it == values_.end()) return std::nullopt;
    return it->second;
  }

 private:
  static grpc::Status Unauthenticated() {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing or wrong control-plane secret");
  }
  ControlPlane* owner_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

// ---- ControlPlane --------------------------------------------------------------------

ControlPlane::ControlPlane(const ControlPlaneOptions& options) : options_(options) {}

absl::StatusOr<std::unique_ptr<ControlPlane>> ControlPlane::Start(const ControlPlaneOptions& options) {
  if (options.secret.empty()) return absl::InvalidArgumentError("the control plane needs a secret");
  if (options.world_size < 1) return absl::InvalidArgumentError("world size must be at least 1");
  std::unique_ptr<ControlPlane> cp(new ControlPlane(options));
  cp->by_rank_.resize(options.world_size);
  cp->control_ = std::make_unique<ControlService>(cp.get());
  cp->rendezvous_ = std::make_unique<RendezvousService>(cp.get());
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort(options.listen_address, grpc::InsecureServerCredentials(), &port);
  b.RegisterService(cp->control_.get());
  b.RegisterService(cp->rendezvous_.get());
  b.SetMaxReceiveMessageSize(-1);
  b.SetMaxSendMessageSize(-1);
  // Detect dead peers on idle streams; accept the workers' keepalive pings.
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                       static_cast<int>(absl::ToInt64Milliseconds(options.keepalive_time)));
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                       static_cast<int>(absl::ToInt64Milliseconds(options.keepalive_timeout)));
  b.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  b.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);  // large logits replies
  cp->server_ = b.BuildAndStart();
  if (cp->server_ == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("control plane cannot listen on ", options.listen_address));
  }
  const size_t colon = options.listen_address.rfind(':');
  cp->address_ = absl::StrCat(options.listen_address.substr(0, colon), ":", port);
  if (!IsLoopback(options.listen_address)) {
    spdlog::warn("control plane listens on {} (not loopback) without TLS: the shared secret and the "
                 "steps travel in clear text; keep this network private",
                 options.listen_address);
  }
  return cp;
}

ControlPlane::~ControlPlane() { Shutdown(); }

bool ControlPlane::Authorized(const grpc::ServerContextBase& ctx) const {
  const auto& md = ctx.client_metadata();
  auto it = md.find(kSecretMetadataKey);
  if (it == md.end()) return false;
  return SecretsEqual(std::string_view(it->second.data(), it->second.size()), options_.secret);
}

absl::Status ControlPlane::OnHello(const std::shared_ptr<WorkerConnection>& c, const v1::Hello& h) {
  if (h.protocol_version() != kWorkerProtocolVersion) {
    return absl::FailedPreconditionError(absl::StrCat("worker speaks control protocol ", h.protocol_version(),
                                                      ", the scheduler ", kWorkerProtocolVersion));
  }
  if (h.world_size() != options_.world_size || h.rank() < 0 || h.rank() >= options_.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("worker says rank ", h.rank(), " of ", h.world_size(),
                                                   "; this scheduler runs ", options_.world_size, " ranks"));
  }
  c->rank_ = h.rank();
  c->pid_ = h.pid();
  c->hostname_ = h.hostname();
  absl::MutexLock lock(&mu_);
  if (shut_down_ || closing_) return absl::UnavailableError("the control plane is shutting down");
  std::shared_ptr<WorkerConnection>& slot = by_rank_[h.rank()];
  if (slot != nullptr && (claimed_ || slot->closed_reason().ok())) {
    return absl::AlreadyExistsError(absl::StrCat(
        "rank ", h.rank(), " is already registered (", slot->Describe(),
        "); a worker group cannot take a replacement rank: restart the group"));
  }
  slot = c;
  spdlog::info("control plane: worker {} registered", c->Describe());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::shared_ptr<WorkerConnection>>> ControlPlane::WaitForWorkers(
    absl::Time deadline, const std::function<absl::Status()>& abort_check) {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      auto all_here = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        if (shut_down_) return true;
        for (const auto& c : by_rank_) {
          if (c == nullptr) return false;
        }
        return true;
      };
      mu_.AwaitWithDeadline(absl::Condition(&all_here),
                            std::min(deadline, absl::Now() + absl::Milliseconds(100)));
      if (shut_down_) return absl::UnavailableError("the control plane was shut down");
      // A worker that went away before the group formed may be replaced.
      for (auto& c : by_rank_) {
        if (c != nullptr && !c->closed_reason().ok()) c = nullptr;
      }
      if (all_here()) {
        claimed_ = true;
        return by_rank_;
      }
      if (absl::Now() >= deadline) {
        std::vector<int> missing;
        for (size_t r = 0; r < by_rank_.size(); ++r) {
          if (by_rank_[r] == nullptr) missing.push_back(static_cast<int>(r));
        }
        return absl::DeadlineExceededError(absl::StrCat("workers of rank ", absl::StrJoin(missing, ", "),
                                                        " did not connect to ", address_, " in time"));
      }
    }
    if (abort_check) {
      absl::Status s = abort_check();
      if (!s.ok()) return s;
    }
  }
}

void ControlPlane::CloseAll(const absl::Status& reason) {
  std::vector<std::shared_ptr<WorkerConnection>> conns;
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
    for (const auto& w : all_) {
      if (auto c = w.lock()) conns.push_back(std::move(c));
    }
  }
  for (const auto& c : conns) c->Close(reason, /*cancel=*/false);
}

void ControlPlane::Shutdown(absl::Duration grace) {
  std::vector<std::shared_ptr<WorkerConnection>> conns;
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    for (const auto& w : all_) {
      if (auto c = w.lock()) conns.push_back(std::move(c));
    }
  }
  for (const auto& c : conns) c->Close(absl::UnavailableError("the scheduler shut down"), /*cancel=*/false);
  rendezvous_->Stop();
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(absl::ToInt64Milliseconds(grace)));
  server_->Wait();
}

std::optional<std::string> ControlPlane::StoreValue(const std::string& key) const {
  return rendezvous_->Value(key);
}

}  // namespace strata
