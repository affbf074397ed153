// The worker side of the control plane (proto/worker.proto); the wire
// conversions both sides share are in worker_wire.h.
//
// A worker process (worker_main.cc) runs one WorkerSession: it dials the
// scheduler, opens the WorkerControl.Connect stream with the shared secret,
// says Hello, and then answers the scheduler's messages in order on one
// thread:
//   Init      load this rank's shard (CPU engine: host memory; CUDA engine:
//             uploaded to its GPU), measure the KV budget -> Ready
//   Allocate  allocate the KV pools (the minimum over ranks), join the
//             collectives (Gloo on CPU, NCCL on GPU) through the Rendezvous
//             service -> Allocated (with a memory report)
//   Step      apply swap/copy, run the forward pass in lockstep with the
//             other ranks, sample (rank 0) -> StepResult
//   Shutdown  (or the stream ending) -> exit
// A failed collective leaves the ranks out of lockstep, so after reporting it
// the worker exits; a step rejected by validation (INVALID_ARGUMENT, the same
// on every rank) does not.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/support/status.h"
#include "proto/worker.pb.h"
#include "runtime/model_config.h"
#include "worker/collectives.h"
#include "worker/engine.h"
#include "worker/worker_wire.h"

namespace strata {

// Constant-time comparison of secrets.
bool SecretsEqual(std::string_view a, std::string_view b);
// Reads a secret file (trailing whitespace stripped). INVALID_ARGUMENT if it
// is empty, NOT_FOUND if unreadable; logs a warning if others can read it.
absl::StatusOr<std::string> ReadSecretFile(const std::string& path);

// ---- the worker session ---------------------------------------------------------
struct WorkerOptions {
  int32_t rank = 0;
  int32_t world_size = 1;
  std::string scheduler_address;  // host:port of the scheduler's control plane
  std::string secret;
  // KV budget for the device pool (the CPU engine's main-memory pool): a block
  // count, or bytes. With neither, kDefaultKvCacheMemory, capped at half of
  // MemAvailable.
  int32_t num_kv_blocks = 0;
  int64_t kv_cache_memory_bytes = 0;
  // Swap pool: a block count (>= 0), or GiB when num_swap_blocks < 0.
  int32_t num_swap_blocks = -1;
  double swap_space_gib = 0.0;
  std::string gloo_hostname = "127.0.0.1";
  absl::Duration connect_timeout = absl::Seconds(30);
  // --device cuda (chosen by the scheduler's Init): the GPU of this rank;
  // -1 = rank modulo the visible devices (GPU i for rank i).
  int cuda_device = -1;
  // Fault injection for tests: the first Step sleeps this long on the
  // session's thread before it runs (a worker busy in a long step).
  absl::Duration fault_slow_first_step = absl::ZeroDuration();
};
inline constexpr int64_t kDefaultKvCacheMemory = int64_t{1} << 30;

class WorkerSession {
 public:
  explicit WorkerSession(WorkerOptions options);
  ~WorkerSession();
  // Serves until the scheduler says Shutdown (OK) or goes away (UNAVAILABLE),
  // or a fatal error (collectives broke, UNAUTHENTICATED, ...).
  absl::Status Run();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata
