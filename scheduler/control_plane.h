// The scheduler's control plane: a gRPC server (proto/worker.proto) that
// workers dial. It hosts
//   - WorkerControl.Connect: one long-lived bidirectional stream per worker
//     (callback API: no thread per stream); each becomes a WorkerConnection
//     once the worker's Hello is accepted;
//   - Rendezvous: a key-value store (Set/Get/Wait) the ranks use to
//     bootstrap their collectives (Gloo store keys, the NCCL unique id).
// Every call must carry the shared secret in "x-strata-secret" metadata;
// otherwise it fails with UNAUTHENTICATED. The server listens on loopback
// unless told otherwise; on any other address the secret travels in clear
// text (no TLS yet), which is logged as a warning at start-up.
//
// Threading: gRPC callbacks only move messages in and out of a connection's
// queues; the RemoteEngine (engine thread) sends and receives. Every queue is
// guarded by its connection's mutex.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "grpcpp/support/server_callback.h"
#include "proto/worker.grpc.pb.h"

namespace strata {

class ControlPlane;

// One worker's stream. Created by the server when a worker connects; shared
// by the server (until the stream ends) and the RemoteEngine.
class WorkerConnection final
    : public grpc::ServerBidiReactor<worker::v1::WorkerMessage, worker::v1::SchedulerMessage> {
 public:
  int32_t rank() const { return rank_; }
  int64_t pid() const { return pid_; }
  const std::string& hostname() const { return hostname_; }
  std::string Describe() const;  // "rank 1 (pid 1234 on host)"

  // Queues a message; never blocks. UNAVAILABLE (the reason) once closed.
  absl::Status Send(worker::v1::SchedulerMessage message);
  // The next message from the worker. Messages that arrived before the stream
  // closed are still delivered; then UNAVAILABLE with the reason, or
  // DEADLINE_EXCEEDED if nothing arrives by `deadline`.
  absl::StatusOr<worker::v1::WorkerMessage> Receive(absl::Time deadline);
  // Ends the stream: queued messages are written first unless `cancel`
  // (which also aborts a write stuck on an unresponsive worker).
  void Close(const absl::Status& reason, bool cancel);
  // OK while open; otherwise why it closed.
  absl::Status closed_reason() const;

  // grpc reactions.
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  friend class ControlPlane;
  WorkerConnection(ControlPlane* owner, grpc::CallbackServerContext* ctx);
  void SetClosedLocked(const absl::Status& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  ControlPlane* const owner_;
  grpc::CallbackServerContext* const ctx_;
  std::shared_ptr<WorkerConnection> self_;  // keeps this alive until OnDone
  worker::v1::WorkerMessage incoming_;      // the read in flight (gRPC threads only)
  bool hello_done_ = false;                 // gRPC threads only
  int32_t rank_ = -1;
  int64_t pid_ = 0;
  std::string hostname_;

  mutable absl::Mutex mu_;
  std::deque<worker::v1::WorkerMessage> inbox_ ABSL_GUARDED_BY(mu_);
  std::deque<worker::v1::SchedulerMessage> outbox_ ABSL_GUARDED_BY(mu_);  // front is being written
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool read_closed_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_requested_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status closed_ ABSL_GUARDED_BY(mu_);
};

struct ControlPlaneOptions {
  // host:port; port 0 picks a free one. Loopback by default.
  std::string listen_address = "127.0.0.1:0";
  std::string secret;      // required
  int32_t world_size = 1;  // Hellos for other sizes or ranks are rejected
  // The server pings an idle worker connection every keepalive_time and drops
  // it when a ping goes unanswered for keepalive_timeout (a dead host, a cut
  // network). A worker busy in a long step still answers: its session keeps a
  // read pending on another thread (worker/worker_service.cc).
  absl::Duration keepalive_time = absl::Seconds(10);
  absl::Duration keepalive_timeout = absl::Seconds(5);
};

class ControlPlane {
 public:
  static absl::StatusOr<std::unique_ptr<ControlPlane>> Start(const ControlPlaneOptions& options);
  ~ControlPlane();
  ControlPlane(const ControlPlane&) = delete;
  ControlPlane& operator=(const ControlPlane&) = delete;

  // host:port workers dial (the bound port).
  const std::string& address() const { return address_; }
  int32_t world_size() const { return options_.world_size; }

  // Waits until every rank has connected and said Hello, then hands the
  // connections (index = rank) to the caller; later Hellos are rejected.
  // `abort_check` runs about every 100 ms; a non-OK result ends the wait with
  // it. DEADLINE_EXCEEDED names the missing ranks.
  absl::StatusOr<std::vector<std::shared_ptr<WorkerConnection>>> WaitForWorkers(
      absl::Time deadline, const std::function<absl::Status()>& abort_check = {});

  // Closes every worker stream (workers exit when theirs ends) and rejects
  // workers that connect later; the server keeps running.
  void CloseAll(const absl::Status& reason);
  // Closes every stream and stops the server (bounded by `grace`). Idempotent.
  void Shutdown(absl::Duration grace = absl::Seconds(2));

  // The Rendezvous store's value for `key`, for tests.
  std::optional<std::string> StoreValue(const std::string& key) const;

 private:
  friend class WorkerConnection;
  class ControlService;
  class RendezvousService;
  explicit ControlPlane(const ControlPlaneOptions& options);
  // Accepts or rejects a worker's Hello (called on a gRPC thread).
  absl::Status OnHello(const std::shared_ptr<WorkerConnection>& c, const worker::v1::Hello& hello);
  bool Authorized(const grpc::ServerContextBase& ctx) const;

  ControlPlaneOptions options_;
  std::string address_;
  std::unique_ptr<ControlService> control_;
  std::unique_ptr<RendezvousService> rendezvous_;
  std::unique_ptr<grpc::Server> server_;

  mutable absl::Mutex mu_;
  std::vector<std::shared_ptr<WorkerConnection>> by_rank_ ABSL_GUARDED_BY(mu_);
  std::vector<std::weak_ptr<WorkerConnection>> all_ ABSL_GUARDED_BY(mu_);  // for Shutdown
  bool claimed_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;  // CloseAll: no new workers
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace strata
