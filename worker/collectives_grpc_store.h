// KvStore client for the scheduler's Rendezvous service (proto/worker.proto).
// Every call carries the shared secret; Wait long-polls on the server.
#pragma once

#include <memory>
#include <string>

#include "grpcpp/channel.h"
#include "proto/worker.grpc.pb.h"
#include "worker/collectives.h"

namespace strata {

class GrpcKvStore final : public KvStore {
 public:
  GrpcKvStore(std::shared_ptr<grpc::Channel> channel, std::string secret);

  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) override;
  absl::Status Wait(const std::vector<std::string>& keys, absl::Duration timeout) override;

 private:
  std::unique_ptr<worker::v1::Rendezvous::Stub> stub_;
  std::string secret_;
};

}  // namespace strata
