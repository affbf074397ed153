// GoogleTest-side helpers shared by the serving tests that drive a `strata
// serve` subprocess with worker processes (tests/serving_tp_test.cc,
// tests/serving_gpu_test.cc). Header-only: it asserts with gtest, which only
// the test binaries link.
#pragma once

#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "proto/strata_v1_generation.grpc.pb.h"
#include "tests/serving_test_util.h"

namespace strata::testing {

inline std::chrono::system_clock::time_point In(std::chrono::milliseconds d) {
  return std::chrono::system_clock::now() + d;
}

// Greedy generation from token ids, exactly `max_tokens` long (ignore_eos).
inline v1::GenerateRequest FromIds(const std::vector<int32_t>& ids, int max_tokens) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

inline v1::ModelInfo Info(v1::Generation::Stub* stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(30)));
  v1::ModelInfo info;
  const grpc::Status s = stub->GetModelInfo(&ctx, {}, &info);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return info;
}

// SIGTERM: the server exits 0, and neither its process group nor any of
// `workers` is left.
inline void StopAndCheckNoProcessLeft(ServerProcess* server, const std::vector<pid_t>& workers) {
  server->Signal(SIGTERM);
  const int status = server->WaitExit(std::chrono::seconds(60));
  EXPECT_TRUE(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0) << server->log();
  EXPECT_TRUE(server->ProcessGroupGone());
  for (pid_t w : workers) {
    EXPECT_TRUE(WaitProcessGone(w, std::chrono::seconds(20))) << "worker " << w << " left";
  }
}

}  // namespace strata::testing
