// NCCL collectives (GPU). Built only when CUDA is found (STRATA_HAVE_CUDA);
// it includes CUDA headers, so only GPU code includes this file.
//
// Rendezvous: rank 0 creates the ncclUniqueId and publishes it under
// "<key_prefix>nccl_id" in the KvStore (the scheduler's Rendezvous service);
// the other ranks wait for it. The communicator is non-blocking
// (ncclConfig_t::blocking = 0), so initialization and every wait poll
// ncclCommGetAsyncError against options.timeout; a peer that died or hangs
// ends in ncclCommAbort and DEADLINE_EXCEEDED / UNAVAILABLE instead of a hang.
//
// AllReduceSum / Broadcast take device pointers and are enqueued on stream()
// (ordered with the engine's kernels when the engine uses the same stream);
// they return once enqueued. Barrier() waits, with the timeout, until the
// stream has drained. Keep NCCL_NVLS_ENABLE=0 on shared hosts (see
// shared/BUILD-NOTES.md).
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "absl/status/statusor.h"
#include "worker/collectives.h"

namespace strata {

class NcclCollectives : public Collectives {
 public:
  ~NcclCollectives() override = default;
  // The stream collectives run on (options.cuda_stream, or one created by
  // Create on options.cuda_device).
  virtual cudaStream_t stream() const = 0;
  // Waits until work enqueued so far has finished, polling for NCCL errors.
  virtual absl::Status Synchronize() = 0;
};

// Sets options.cuda_device, creates the stream and the communicator.
absl::StatusOr<std::unique_ptr<NcclCollectives>> CreateNcclCollectives(
    const CollectivesOptions& options, KvStore* store);

}  // namespace strata
