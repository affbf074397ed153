// The one place where the CUDA kernels' cudaError_t becomes an absl::Status
// (host code only; kernels themselves stay free of absl).
//   cudaErrorNotSupported     -> UNIMPLEMENTED     (no kernel for this format/head_dim; permanent)
//   cudaErrorInvalidValue     -> INVALID_ARGUMENT  (malformed launch arguments; permanent)
//   cudaErrorMemoryAllocation -> RESOURCE_EXHAUSTED (retry after freeing memory)
//   anything else             -> INTERNAL          (sticky device errors: the worker is unhealthy)
#pragma once

#include <cuda_runtime_api.h>

#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace strata::cuda {

inline absl::Status CudaToStatus(cudaError_t err, std::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": ", cudaGetErrorName(err), " (",
                                       cudaGetErrorString(err), ")");
  switch (err) {
    case cudaErrorNotSupported: return absl::UnimplementedError(msg);
    case cudaErrorInvalidValue: return absl::InvalidArgumentError(msg);
    case cudaErrorMemoryAllocation: return absl::ResourceExhaustedError(msg);
    default: return absl::InternalError(msg);
  }
}

}  // namespace strata::cuda
