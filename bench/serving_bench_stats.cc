#include "bench/serving_bench_stats.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

namespace strata::bench {
namespace {

nlohmann::json LengthStats(std::vector<double> v) {
  if (v.empty()) return nullptr;
  std::sort(v.begin(), v.end());
  const double total = std::accumulate(v.begin(), v.end(), 0.0);
  return {{"mean", total / static_cast<double>(v.size())},
          {"p50", Percentile(v, 50)},
          {"min", v.front()},
          {"max", v.back()},
          {"total", total}};
}

}  // namespace

double Percentile(const std::vector<double>& sorted, double p) {
  const double rank = p / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - static_cast<double>(lo));
}

nlohmann::json Summarize(std::vector<double> values, double scale) {
  nlohmann::json out = {{"count", values.size()}};
  if (values.empty()) {
    for (const char* k : {"mean", "p50", "p90", "p99", "min", "max"}) out[k] = nullptr;
    return out;
  }
  for (double& v : values) v *= scale;
  std::sort(values.begin(), values.end());
  out["mean"] = std::accumulate(values.begin(), values.end(), 0.0) /
                static_cast<double>(values.size());
  out["p50"] = Percentile(values, 50);
  out["p90"] = Percentile(values, 90);
  out["p99"] = Percentile(values, 99);
  out["min"] = values.front();
  out["max"] = values.back();
  return out;
}

nlohmann::json BuildResults(const std::vector<RequestSpec>& specs,
                            const std::vector<RequestResult>& results, double duration_s,
                            bool per_request) {
  std::vector<double> ttft, tpot, itl, e2e;
  std::map<std::string, int> failures;
  std::map<std::string, std::string> failure_examples;
  int64_t input_tokens = 0, output_tokens = 0;
  int completed = 0, length_mismatch = 0;
  nlohmann::json requests = nlohmann::json::array();
  for (size_t i = 0; i < results.size(); ++i) {
    const RequestResult& r = results[i];
    const bool ok = r.code == grpc::StatusCode::OK;
    if (per_request) {
      nlohmann::json q = {{"input_len", specs[i].input_len},
                          {"max_tokens", specs[i].output_len},
                          {"output_tokens", r.output_tokens},
                          {"send_s", r.send_s},
                          {"ttft_ms", r.ttft_s >= 0 ? nlohmann::json(r.ttft_s * 1e3) : nullptr},
                          {"e2e_ms", r.e2e_s * 1e3},
                          {"status", StatusCodeName(r.code)}};
      if (!ok) q["error"] = r.error;
      requests.push_back(std::move(q));
    }
    if (!ok) {
      const std::string code = StatusCodeName(r.code);
      ++failures[code];
      failure_examples.emplace(code, r.error);
      continue;
    }
    ++completed;
    input_tokens += specs[i].input_len;
    output_tokens += r.output_tokens;
    if (r.output_tokens != specs[i].output_len || r.usage_output_tokens != r.output_tokens) {
      ++length_mismatch;
    }
    if (r.ttft_s >= 0) ttft.push_back(r.ttft_s);
    e2e.push_back(r.e2e_s);
    if (r.output_tokens >= 2 && r.ttft_s >= 0) {
      tpot.push_back((r.e2e_s - r.ttft_s) / (r.output_tokens - 1));
    }
    itl.insert(itl.end(), r.itl_s.begin(), r.itl_s.end());
  }
  // Saturated phase: from the start of the run to the last request's first
  // token. Until then the server still has requests to admit; afterwards it
  // only drains (fewer and fewer sequences, the longest outputs last), a tail
  // that is the same length for any KV format and dilutes the full-run rate.
  double t_last_first = -1;
  for (size_t i = 0; i < results.size(); ++i) {
    const RequestResult& r = results[i];
    if (r.code == grpc::StatusCode::OK && r.ttft_s >= 0) {
      t_last_first = std::max(t_last_first, r.send_s + r.ttft_s);
    }
  }
  int64_t saturated_tokens = 0;
  for (const RequestResult& r : results) {
    if (r.code != grpc::StatusCode::OK) continue;
    for (const auto& [t, n] : r.token_times) saturated_tokens += t <= t_last_first ? n : 0;
  }
  const double d = duration_s > 0 ? duration_s : 1e-9;
  nlohmann::json out = {
      {"num_requests", results.size()},
      {"completed", completed},
      {"failed", static_cast<int>(results.size()) - completed},
      {"failures", failures},
      {"failure_examples", failure_examples},
      // Completed requests whose output was not exactly max_tokens (should be 0: ignore_eos).
      {"output_length_mismatches", length_mismatch},
      {"duration_s", duration_s},
      {"total_input_tokens", input_tokens},
      {"total_output_tokens", output_tokens},
      {"request_throughput", completed / d},
      {"output_throughput", static_cast<double>(output_tokens) / d},
      {"total_token_throughput", static_cast<double>(input_tokens + output_tokens) / d},
      {"saturated_window_s", t_last_first > 0 ? nlohmann::json(t_last_first) : nullptr},
      {"saturated_output_throughput",
       t_last_first > 0 ? nlohmann::json(static_cast<double>(saturated_tokens) / t_last_first)
                        : nullptr},
      {"ttft_ms", Summarize(ttft, 1e3)},
      {"tpot_ms", Summarize(tpot, 1e3)},
      {"itl_ms", Summarize(itl, 1e3)},
      {"e2e_ms", Summarize(e2e, 1e3)},
  };
  if (per_request) out["requests"] = std::move(requests);
  return out;
}

nlohmann::json WorkloadStats(const std::vector<RequestSpec>& specs) {
  std::vector<double> in, len;
  for (const RequestSpec& s : specs) {
    in.push_back(s.input_len);
    len.push_back(s.output_len);
  }
  return {{"input_len", LengthStats(in)}, {"output_len", LengthStats(len)}};
}

}  // namespace strata::bench
