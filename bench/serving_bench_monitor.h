// strata-serving-bench: watches the server while the benchmark runs.
//
// Every interval it calls GetModelInfo (KV block pools, queue sizes) and, with a metrics URL,
// scrapes the Prometheus endpoint (deploy/METRICS.md names). It keeps the peaks, a short
// timeline, and the counter deltas between a scrape before the run and one after it.
#pragma once

#include <atomic>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "bench/serving_bench_http.h"
#include "nlohmann/json.hpp"
#include "proto/strata_v1_generation.grpc.pb.h"

namespace strata::bench {

class ServerMonitor {
 public:
  ServerMonitor(v1::Generation::Stub* stub, std::string authorization,
                std::optional<HttpUrl> metrics_url, double interval_s);
  ~ServerMonitor();  // stops the thread if still running
  ServerMonitor(const ServerMonitor&) = delete;
  ServerMonitor& operator=(const ServerMonitor&) = delete;

  // Scrapes the metrics once before the run; an unreachable or non-Strata endpoint is an
  // error here (the run has not started, so the user can fix the URL).
  absl::Status Baseline();
  void Start();
  // Stops polling, then scrapes once more for the counter deltas.
  void Stop();
  // After Stop(): {"peak_kv_usage_gpu", "peak_kv_usage_cpu", "peak_gpu_blocks_used",
  // "peak_num_running", "peak_num_waiting", "peak_num_swapped", "preemptions",
  // "preemptions_by_mode", "counter_deltas", "timeline", "polls", "poll_errors", ...}.
  nlohmann::json Report() const;

 private:
  void Loop();
  void PollModelInfo();
  void PollMetrics();
  double Elapsed() const;

  v1::Generation::Stub* stub_;
  const std::string authorization_;
  const std::optional<HttpUrl> metrics_url_;
  const double interval_s_;
  std::thread thread_;
  std::atomic<bool> stop_{false};

  // Written by the polling thread between Start() and Stop(), by the caller otherwise
  // (Stop() joins the thread before reading or writing them again).
  std::chrono::steady_clock::time_point start_;
  std::map<std::string, double> baseline_, final_;
  double peak_gpu_ratio_ = 0, peak_cpu_ratio_ = 0;  // from ModelInfo and metrics, whichever higher
  int peak_gpu_blocks_used_ = 0, peak_running_ = 0, peak_waiting_ = 0, peak_swapped_ = 0;
  int info_polls_ = 0, info_errors_ = 0, scrapes_ = 0, scrape_errors_ = 0;
  std::string last_scrape_error_;
  nlohmann::json timeline_ = nlohmann::json::array();  // [t_s, gpu_ratio, running, waiting, swapped]
};

}  // namespace strata::bench
