#include "worker/collectives_nccl.h"

#include <nccl.h>

#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "runtime/status_macros.h"

namespace strata {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

class NcclImpl final : public NcclCollectives {
 public:
  NcclImpl(int rank, int size, absl::Duration timeout) : rank_(rank), size_(size), timeout_(timeout) {}
  ~NcclImpl() override {
    if (comm_ != nullptr) {
      // Abort rather than destroy: destroy may block on peers that are gone.
      ncclCommAbort(comm_);
    }
    if (barrier_buf_ != nullptr) cudaFree(barrier_buf_);
    if (stream_ != nullptr && owns_stream_) cudaStreamDestroy(stream_);
  }

  absl::Status Init(const CollectivesOptions& o, KvStore* store) {
    RETURN_IF_ERROR(CudaStatus(cudaSetDevice(o.cuda_device), "cudaSetDevice"));
    if (o.cuda_stream != nullptr) {
      stream_ = static_cast<cudaStream_t>(o.cuda_stream);
      owns_stream_ = false;
    } else {
      RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                                 "cudaStreamCreate"));
    }
    const std::string key = o.key_prefix + "nccl_id";
    ncclUniqueId id;
    if (rank_ == 0) {
      RETURN_IF_ERROR(Check(ncclGetUniqueId(&id), "ncclGetUniqueId"));
      RETURN_IF_ERROR(store->Set(key, std::string(reinterpret_cast<const char*>(&id), sizeof(id))));
    } else {
      ASSIGN_OR_RETURN(std::string v, store->Get(key, timeout_));
      if (v.size() != sizeof(id)) {
        return absl::DataLossError(absl::StrCat("rendezvous key ", key, " has ", v.size(),
                                                " bytes, an ncclUniqueId has ", sizeof(id)));
      }
      std::memcpy(&id, v.data(), sizeof(id));
    }
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&comm_, size_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) return Check(r, "ncclCommInitRankConfig");
    return WaitComm("ncclCommInitRankConfig");
  }

  int rank() const override { return rank_; }
  int world_size() const override { return size_; }
  cudaStream_t stream() const override { return stream_; }

  absl::Status AllReduceSum(float* data, int64_t n) override {
    if (comm_ == nullptr) return absl::UnavailableError("NCCL communicator was aborted");
    ncclResult_t r = ncclAllReduce(data, data, static_cast<size_t>(n), ncclFloat32, ncclSum, comm_, stream_);
    if (r != ncclSuccess && r != ncclInProgress) return Check(r, "ncclAllReduce");
    return r == ncclInProgress ? WaitComm("ncclAllReduce") : absl::OkStatus();
  }

  absl::Status AllReduceSumHalf(void* data, int64_t n, bool bf16) override {
    if (comm_ == nullptr) return absl::UnavailableError("NCCL communicator was aborted");
    ncclResult_t r = ncclAllReduce(data, data, static_cast<size_t>(n), bf16 ? ncclBfloat16 : ncclFloat16,
                                   ncclSum, comm_, stream_);
    if (r != ncclSuccess && r != ncclInProgress) return Check(r, "ncclAllReduce");
    return r == ncclInProgress ? WaitComm("ncclAllReduce") : absl::OkStatus();
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    if (root < 0 || root >= size_) {
      return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root, " of ", size_, " ranks"));
    }
    if (comm_ == nullptr) return absl::UnavailableError("NCCL communicator was aborted");
    ncclResult_t r = ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm_, stream_);
    if (r != ncclSuccess && r != ncclInProgress) return Check(r, "ncclBroadcast");
    return r == ncclInProgress ? WaitComm("ncclBroadcast") : absl::OkStatus();
  }

  absl::Status Barrier() override {
    if (comm_ == nullptr) return absl::UnavailableError("NCCL communicator was aborted");
    if (barrier_buf_ == nullptr) {
      RETURN_IF_ERROR(CudaStatus(cudaMalloc(&barrier_buf_, sizeof(float)), "cudaMalloc"));
    }
    RETURN_IF_ERROR(AllReduceSum(barrier_buf_, 1));
    return Synchronize();
  }

  absl::Status Synchronize() override {
    const absl::Time deadline = absl::Now() + timeout_;
    for (;;) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) return CudaStatus(e, "cudaStreamQuery");
      RETURN_IF_ERROR(AsyncError("collective"));
      if (absl::Now() > deadline) return Abort("collective did not finish");
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  absl::Status Check(ncclResult_t r, const char* what) {
    if (r == ncclSuccess) return absl::OkStatus();
    const char* last = comm_ != nullptr ? ncclGetLastError(comm_) : nullptr;
    return absl::UnavailableError(absl::StrCat(what, " failed: ", ncclGetErrorString(r),
                                               last != nullptr && *last ? absl::StrCat(" (", last, ")") : ""));
  }

  absl::Status AsyncError(const char* what) {
    ncclResult_t async = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
    if (r != ncclSuccess) return Check(r, "ncclCommGetAsyncError");
    if (async != ncclSuccess && async != ncclInProgress) {
      absl::Status s = Check(async, what);
      ncclCommAbort(comm_);
      comm_ = nullptr;
      return s;
    }
    return absl::OkStatus();
  }

  // Polls a non-blocking communicator until its pending call completes.
  absl::Status WaitComm(const char* what) {
    const absl::Time deadline = absl::Now() + timeout_;
    for (;;) {
      ncclResult_t async = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess) return Check(r, "ncclCommGetAsyncError");
      if (async == ncclSuccess) return absl::OkStatus();
      if (async != ncclInProgress) {
        absl::Status s = Check(async, what);
        ncclCommAbort(comm_);
        comm_ = nullptr;
        return s;
      }
      if (absl::Now() > deadline) return Abort(absl::StrCat(what, " did not complete").c_str());
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  absl::Status Abort(const std::string& why) {
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
    return absl::DeadlineExceededError(absl::StrCat(
        "NCCL rank ", rank_, "/", size_, ": ", why, " within ", absl::FormatDuration(timeout_),
        " (a peer died or hangs); communicator aborted"));
  }

  int rank_, size_;
  absl::Duration timeout_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = true;
  float* barrier_buf_ = nullptr;
};

}  // namespace

absl::StatusOr<std::unique_ptr<NcclCollectives>> CreateNcclCollectives(
    const CollectivesOptions& options, KvStore* store) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", options.rank, " outside world size ", options.world_size));
  }
  auto c = std::make_unique<NcclImpl>(options.rank, options.world_size, options.timeout);
  RETURN_IF_ERROR(c->Init(options, store));
  return std::unique_ptr<NcclCollectives>(std::move(c));
}

}  // namespace strata
