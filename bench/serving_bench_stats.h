// strata-serving-bench: aggregates per-request measurements into the result JSON.
#pragma once

#include <vector>

#include "bench/serving_bench_runner.h"
#include "bench/serving_bench_workload.h"
#include "nlohmann/json.hpp"

namespace strata::bench {

// Linear interpolation between closest ranks (numpy's default); `sorted` ascending, non-empty.
double Percentile(const std::vector<double>& sorted, double p);

// {"mean", "p50", "p90", "p99", "min", "max", "count"} of `values` scaled by `scale`
// (e.g. 1000 for seconds -> ms); nulls when empty.
nlohmann::json Summarize(std::vector<double> values, double scale);

// The "results" object: counts, throughputs, latency percentiles (ms), failures by code, and
// one entry per request (when `per_request`).
//   ttft  = first message with token ids, from the call start
//   tpot  = (e2e - ttft) / (output_tokens - 1), requests with >= 2 output tokens
//   itl   = gaps between messages carrying token ids, all requests pooled
//   e2e   = call start to end of stream
// Throughputs count successful requests only, over `duration_s`;
// saturated_output_throughput counts the tokens received from the start of the run to the
// last request's first token (saturated_window_s), before the server only drains.
nlohmann::json BuildResults(const std::vector<RequestSpec>& specs,
                            const std::vector<RequestResult>& results, double duration_s,
                            bool per_request);

// {"mean", "p50", "min", "max", "total"} of the requested input and output lengths.
nlohmann::json WorkloadStats(const std::vector<RequestSpec>& specs);

}  // namespace strata::bench
