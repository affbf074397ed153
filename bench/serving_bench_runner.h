// strata-serving-bench: sends the request stream over strata.v1.Generation/Generate (gRPC
// callback API, one reactor per request, no thread per request) and times every stream.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "bench/serving_bench_workload.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata_v1_generation.grpc.pb.h"

namespace strata::bench {

using Clock = std::chrono::steady_clock;

// What one request measured. Times are seconds; -1 = not reached.
struct RequestResult {
  double send_s = -1;  // when the call started, from the start of the run
  double ttft_s = -1;  // call start -> first message carrying token ids
  double e2e_s = -1;   // call start -> end of the stream
  int prompt_tokens = 0;      // usage.prompt_tokens from the last message
  int output_tokens = 0;      // token ids received
  int usage_output_tokens = -1;  // usage.completion_tokens from the last message
  std::vector<double> itl_s;  // gaps between consecutive messages carrying token ids
  // (seconds from the start of the run, token ids) of each message carrying token ids.
  std::vector<std::pair<double, int>> token_times;
  grpc::StatusCode code = grpc::StatusCode::UNKNOWN;
  std::string error;  // the status message when code != OK
};

struct RunOptions {
  double request_rate = 0;  // requests/s (inf = all at once); arrivals already in the specs
  int concurrency = 0;      // most calls in flight; 0 = no limit
  double request_timeout_s = 3600;
  uint64_t seed = 0;
  int vocab_size = 0;
  int bos_token_id = -1;
  int eos_token_id = -1;
  std::string authorization;  // "Bearer ..." or empty
};

// Progress the caller may read from another thread while the run goes on.
struct RunProgress {
  std::atomic<int> sent{0};
  std::atomic<int> finished{0};
  std::atomic<int> failed{0};
};

// Sends every request at its arrival time (waiting for a free slot when `concurrency` is
// reached) and returns when all have finished. `results` gets one entry per spec, in order;
// `duration_s` is the time from the first send to the last completion.
void RunRequests(v1::Generation::Stub* stub, const RunOptions& options,
                 const std::vector<RequestSpec>& specs, RunProgress* progress,
                 std::vector<RequestResult>* results, double* duration_s);

// "OK", "UNAVAILABLE", ...
const char* StatusCodeName(grpc::StatusCode code);

}  // namespace strata::bench
