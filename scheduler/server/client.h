// `strata generate --server ADDR` and `strata info --server ADDR`: small
// gRPC clients of strata.v1.Generation.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata_v1_generation.grpc.pb.h"

namespace strata::serving {

struct ClientOptions {
  std::string server;           // host:port
  std::string auth_token_file;  // sent as `authorization: Bearer <token>`
  bool tls = false;             // TLS with the system roots (or --tls-ca-file)
  std::string tls_ca_file;      // implies tls
  double wait_ready_s = 0;      // poll until the model is loaded, up to this long
  double timeout_s = 600;       // deadline of the call
};

class GenerationClient {
 public:
  static absl::StatusOr<std::unique_ptr<GenerationClient>> Create(const ClientOptions& options);
  // A context with the deadline and the bearer token.
  std::unique_ptr<grpc::ClientContext> NewContext(double timeout_s) const;
  // Polls GetModelInfo until OK (UNAVAILABLE while loading or not yet
  // listening) or `timeout_s` passes.
  absl::StatusOr<v1::ModelInfo> WaitReady(double timeout_s) const;
  v1::Generation::Stub& stub() const { return *stub_; }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Generation::Stub> stub_;
  std::string bearer_;
};

// Streams one generation to stdout (the prompt text, then the text as it
// arrives); a summary goes to stderr. Returns the exit code: 0, or 1 with
// "strata generate: CODE: message" on stderr.
int RunRemoteGenerate(const ClientOptions& options, const v1::GenerateRequest& request);
// Prints GetModelInfo as JSON.
int RunRemoteInfo(const ClientOptions& options);

}  // namespace strata::serving
