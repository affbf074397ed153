// `strata serve`: the gRPC generation server.
//
// Start-up: listen at once (health NOT_SERVING, RPCs UNAVAILABLE "model is
// loading"), load the model with progress on stderr, start the engine
// thread, then flip health to SERVING and print
//   strata serve: ready on <host>:<port>
// on stdout. --port 0 picks a free port (the line says which).
//
// Shutdown on SIGINT/SIGTERM: health NOT_SERVING, new requests UNAVAILABLE,
// in-flight requests get --shutdown-grace seconds to finish, the rest fail
// with UNAVAILABLE and their blocks are freed; then the gRPC and metrics
// servers stop and the process exits 0. A second signal skips the grace
// period. The server starts no child processes.
#pragma once

#include <cstdint>
#include <string>

#include "scheduler/sched_types.h"
#include "scheduler/server/model_loader.h"

namespace strata::serving {

struct ServeOptions {
  EngineConfig engine;
  // Scheduler.
  int32_t max_num_batched_tokens = 2048;
  std::string preemption_mode = "auto";
  bool enable_prefix_caching = true;
  int32_t max_queued_requests = 1024;
  // Network.
  std::string host = "0.0.0.0";
  int32_t port = 50051;
  int32_t metrics_port = 0;  // 0 = no metrics endpoint
  std::string tls_cert_file, tls_key_file;  // both or neither
  std::string auth_token_file;              // bearer token, whitespace trimmed
  int64_t max_request_bytes = 1 << 20;
  double shutdown_grace_s = 30.0;
};

// Runs until SIGINT/SIGTERM. Returns the process exit code (0 after a clean
// shutdown, 2 for bad flags or a model that does not load, 1 otherwise).
int RunServe(const ServeOptions& options);

}  // namespace strata::serving
