// WorkerPool: N local strata-worker processes behind one RemoteEngine, for
// `strata serve --tp N` on one machine.
//
//   WorkerPoolOptions o;
//   o.worker_binary = FindWorkerBinary();             // or a --worker-binary flag
//   o.engine.world_size = 2;
//   o.engine.model_path = "models/stories15M";
//   o.engine.kv_format = {KvDtype::kInt8, KvScaleMode::kDynamic};
//   o.kv_cache_memory_bytes = 2LL << 30;              // per worker
//   ASSIGN_OR_RETURN(auto pool, WorkerPool::Start(o));  // control plane + processes
//   ASSIGN_OR_RETURN(RemoteEngine* engine, pool->WaitReady(absl::Minutes(5)));
//   SchedulerOptions so;  // so.blocks from engine->options(), bytes_per_block
//   ...                   //   from engine->kv_bytes_per_block()
//   auto loop = EngineLoop::Create(engine, so, callbacks);
//   ... pool->Health() for readiness probes ...
//   pool->Shutdown();     // or the destructor
//
// Processes: forked from one spawner thread that lives as long as the pool,
// each with PR_SET_PDEATHSIG = SIGKILL (a worker dies with the scheduler,
// even on SIGKILL) and in one process group of its own. The workers get the
// control plane's loopback address and a random secret in a 0600 file in a
// private temporary directory (removed at shutdown). Shutdown asks the
// workers to exit, waits up to shutdown_grace, then SIGKILLs the survivors by
// pid and reaps every child: no orphans, no zombies.
//
// Threading: Start/WaitReady/Shutdown from one thread; Health() from any.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "scheduler/control_plane.h"
#include "scheduler/remote_engine.h"

namespace strata {

// The strata-worker executable next to the running binary: the same
// directory (an install or bundle), then ../worker/ (the CMake build tree,
// where `strata` is build/scheduler/strata). Empty if neither exists.
std::string FindWorkerBinary();

struct WorkerPoolOptions {
  std::string worker_binary;  // the strata-worker executable (FindWorkerBinary())
  RemoteEngineOptions engine;  // world size, model, KV format, timeouts
  std::string listen_address = "127.0.0.1:0";
  // Per worker: KV budget (see strata-worker --help), swap, threads.
  int64_t kv_cache_memory_bytes = 0;
  int32_t num_kv_blocks = 0;
  double swap_space_gib = 0.0;
  int32_t num_swap_blocks = -1;
  int32_t threads_per_worker = 0;  // 0: hardware threads / world size (at least 1)
  // Extra flags per rank (tests: a smaller budget on one rank).
  std::vector<std::vector<std::string>> extra_args;
  // If set, worker r writes stdout/stderr to <log_dir>/worker-<r>.log;
  // otherwise it inherits the scheduler's.
  std::string log_dir;
  absl::Duration shutdown_grace = absl::Seconds(5);
  // External workers: nothing is spawned; world_size strata-worker processes
  // started elsewhere (other pods, other hosts) dial `listen_address` with the
  // secret read from `secret_file`, and WaitReady waits for them.
  bool external_workers = false;
  std::string secret_file;
  // The control plane's keepalive (ControlPlaneOptions).
  absl::Duration keepalive_time = absl::Seconds(10);
  absl::Duration keepalive_timeout = absl::Seconds(5);
};

struct WorkerProcessStatus {
  int32_t rank = 0;
  pid_t pid = 0;
  bool running = false;
  std::string exit;  // "exited with status 1", "killed by signal 9"; empty while running
};

struct PoolHealth {
  absl::Status status;  // OK when every worker runs and the engine is healthy
  std::vector<WorkerProcessStatus> workers;
};

class WorkerPool {
 public:
  // Starts the control plane and spawns the workers (does not wait for them);
  // with external_workers, only the control plane.
  static absl::StatusOr<std::unique_ptr<WorkerPool>> Start(const WorkerPoolOptions& options);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Waits for every worker to register, load its shard and allocate its KV
  // pools; returns the engine (owned by the pool, valid until Shutdown).
  // Fails fast, naming the worker, if a worker process exits first.
  absl::StatusOr<RemoteEngine*> WaitReady(absl::Duration timeout);
  RemoteEngine* engine() const { return engine_.get(); }

  // Reaps exited workers; UNAVAILABLE naming the first dead or unhealthy one.
  PoolHealth Health();

  // Stops the engine, the workers and the control plane. Idempotent.
  void Shutdown();

  std::vector<pid_t> pids() const;
  const std::string& control_address() const { return control_->address(); }

 private:
  WorkerPool() = default;
  absl::Status Spawn();
  // Polls children without blocking; returns the first that exited, if any.
  absl::Status CheckChildren() ABSL_LOCKS_EXCLUDED(mu_);
  void KillAndReap(absl::Duration grace);

  WorkerPoolOptions options_;
  std::string secret_dir_;
  std::string secret_path_;
  std::unique_ptr<ControlPlane> control_;
  std::unique_ptr<RemoteEngine> engine_;          // owned by the Start/WaitReady/Shutdown thread
  std::atomic<RemoteEngine*> ready_engine_{nullptr};  // what Health() reads
  std::atomic<bool> shut_down_{false};

  // The spawner thread forks the workers and then parks until shutdown:
  // PR_SET_PDEATHSIG fires when the forking *thread* exits.
  std::thread spawner_;
  absl::Mutex spawn_mu_;
  bool spawned_ ABSL_GUARDED_BY(spawn_mu_) = false;
  bool release_spawner_ ABSL_GUARDED_BY(spawn_mu_) = false;
  absl::Status spawn_status_ ABSL_GUARDED_BY(spawn_mu_);

  mutable absl::Mutex mu_;
  std::vector<WorkerProcessStatus> children_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata
