// The one place where absl::Status becomes grpc::Status (STYLE.md rule 2).
//
// Both use the canonical status codes with the same numbers, so the code is
// carried over unchanged and the message verbatim. Callers may retry
// RESOURCE_EXHAUSTED (queue full) and UNAVAILABLE (shutting down, worker lost);
// INVALID_ARGUMENT and UNAUTHENTICATED are permanent for the same request.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace strata::serving {

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

}  // namespace strata::serving
