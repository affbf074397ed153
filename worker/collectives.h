// Collectives between the tensor-parallel ranks of one model, behind one small
// interface: Gloo over TCP on CPU (collectives_gloo.h), NCCL on GPU
// (collectives_nccl.h). Ranks bootstrap through a KvStore, which in a real
// deployment is the scheduler's Rendezvous service (collectives_grpc_store.h),
// so no shared filesystem or extra port is needed.
//
// Threading: one Collectives object is used by one thread at a time (the
// worker's engine thread); every rank must issue the same calls in the same
// order. Errors: UNAVAILABLE when a peer is gone or the transport broke,
// DEADLINE_EXCEEDED when a peer did not show up in time. Either is fatal for
// the group (ranks are out of lockstep): the worker reports it and exits.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace strata {

class Collectives {
 public:
  virtual ~Collectives() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // In-place sum over all ranks; afterwards every rank holds the same bits.
  // Pointers live in the backend's memory: host for Gloo, device for NCCL
  // (where the call is enqueued on the backend's stream and returns before
  // the data is ready; Barrier() or the engine's own stream sync waits).
  virtual absl::Status AllReduceSum(float* data, int64_t n) = 0;
  // The same over 16-bit floats (IEEE fp16, or bf16 when `bf16`); backends
  // without it answer UNIMPLEMENTED.
  virtual absl::Status AllReduceSumHalf(void* data, int64_t n, bool bf16) {
    (void)data, (void)n, (void)bf16;
    return absl::UnimplementedError("16-bit all-reduce is not supported by this backend");
  }
  // Copies `bytes` from `root`'s buffer into every rank's buffer.
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root) = 0;
  // Returns once every rank has entered the barrier (and, for NCCL, once the
  // work enqueued before it has finished).
  virtual absl::Status Barrier() = 0;
};

// Rendezvous key-value store (the scheduler's control plane in production).
class KvStore {
 public:
  virtual ~KvStore() = default;
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // Waits up to `timeout` for the key; DEADLINE_EXCEEDED if it never appears.
  virtual absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) = 0;
  // Waits for all keys; DEADLINE_EXCEEDED if some never appear.
  virtual absl::Status Wait(const std::vector<std::string>& keys, absl::Duration timeout) = 0;
};

// In-process store for tests and single-process groups. Thread-safe.
class InMemoryKvStore final : public KvStore {
 public:
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) override;
  absl::Status Wait(const std::vector<std::string>& keys, absl::Duration timeout) override;

 private:
  absl::Mutex mu_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
};

// Which collectives a worker uses.
enum class CollectivesBackend { kNone, kGloo, kNccl };

struct CollectivesOptions {
  int rank = 0;
  int world_size = 1;
  std::string key_prefix;  // namespaces this group's keys in the store
  absl::Duration timeout = absl::Seconds(60);  // rendezvous and every operation
  // Gloo: the address this rank's TCP endpoint binds to and peers dial
  // ("127.0.0.1" on one host; the pod IP across hosts).
  std::string gloo_hostname = "127.0.0.1";
  int cuda_device = 0;  // NCCL
  // NCCL: enqueue on this cudaStream_t (borrowed; e.g. the engine's, so the
  // collectives are ordered with its kernels and captured into its graphs)
  // instead of a stream of the backend's own.
  void* cuda_stream = nullptr;
};

// A single-rank group: every operation is a no-op (tp = 1).
std::unique_ptr<Collectives> MakeSingleRankCollectives();

}  // namespace strata
