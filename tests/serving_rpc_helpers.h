// GoogleTest-side helpers shared by the serving tests that drive a `strata
// serve` subprocess with worker processes (tests/serving_tp_test.cc,
// tests/serving_gpu_test.cc). Header-only: it asserts with gtest, which only
// the test binaries link.
#pragma once

#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdint>
#include <thread>
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

// Every case's prompt ("prompt_ids") as its own concurrent request (so the
// server batches them), greedy to the 256-token context; the tokens and the
// final status of each.
struct GoldenRun {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<grpc::Status> status;
};
template <class Cases>
GoldenRun GenerateAllAtOnce(v1::Generation::Stub* stub, const Cases& cases,
                            std::chrono::seconds deadline) {
  GoldenRun run;
  run.tokens.resize(cases.size());
  run.status.resize(cases.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < cases.size(); ++i) {
    threads.emplace_back([&, i] {
      const auto prompt = cases[i]["prompt_ids"].template get<std::vector<int32_t>>();
      grpc::ClientContext ctx;
      ctx.set_deadline(In(deadline));
      auto reader = stub->Generate(&ctx, FromIds(prompt, 256 - static_cast<int>(prompt.size())));
      v1::GenerateResponse m;
      std::vector<int32_t>& got = run.tokens[i];
      while (reader->Read(&m)) got.insert(got.end(), m.token_ids().begin(), m.token_ids().end());
      run.status[i] = reader->Finish();
    });
  }
  for (auto& t : threads) t.join();
  return run;
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
