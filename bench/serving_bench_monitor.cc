#include "bench/serving_bench_monitor.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace strata::bench {
namespace {

constexpr double kScrapeTimeoutS = 2.0;
constexpr size_t kMaxTimeline = 20000;

double Ratio(const v1::BlockPoolInfo& pool) {
  return pool.total() > 0 ? static_cast<double>(pool.used()) / pool.total() : 0.0;
}

}  // namespace

ServerMonitor::ServerMonitor(v1::Generation::Stub* stub, std::string authorization,
                             std::optional<HttpUrl> metrics_url, double interval_s)
    : stub_(stub),
      authorization_(std::move(authorization)),
      metrics_url_(std::move(metrics_url)),
      interval_s_(interval_s) {}

ServerMonitor::~ServerMonitor() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

absl::Status ServerMonitor::Baseline() {
  if (!metrics_url_) return absl::OkStatus();
  absl::StatusOr<std::string> body = HttpGet(*metrics_url_, kScrapeTimeoutS);
  if (!body.ok()) return body.status();
  baseline_ = ParsePrometheusText(*body);
  bool strata = false;
  for (const auto& [series, value] : baseline_) strata |= absl::StartsWith(series, "strata_");
  if (!strata) return absl::NotFoundError("no strata_* series at the metrics URL");
  return absl::OkStatus();
}

void ServerMonitor::Start() {
  start_ = std::chrono::steady_clock::now();
  thread_ = std::thread([this] { Loop(); });
}

void ServerMonitor::Stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  PollModelInfo();
  if (!metrics_url_) return;
  absl::StatusOr<std::string> body = HttpGet(*metrics_url_, kScrapeTimeoutS);
  if (body.ok()) {
    final_ = ParsePrometheusText(*body);
  } else {
    ++scrape_errors_;
    last_scrape_error_ = body.status().ToString();
  }
}

double ServerMonitor::Elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void ServerMonitor::Loop() {
  const auto interval = std::chrono::duration<double>(interval_s_);
  auto next = std::chrono::steady_clock::now();
  while (!stop_) {
    PollModelInfo();
    PollMetrics();
    next += std::chrono::duration_cast<std::chrono::steady_clock::duration>(interval);
    // Sleep in short steps so Stop() is quick.
    while (!stop_ && std::chrono::steady_clock::now() < next) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
}

void ServerMonitor::PollModelInfo() {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (!authorization_.empty()) ctx.AddMetadata("authorization", authorization_);
  v1::ModelInfo info;
  ++info_polls_;
  if (!stub_->GetModelInfo(&ctx, {}, &info).ok()) {
    ++info_errors_;
    return;
  }
  peak_gpu_ratio_ = std::max(peak_gpu_ratio_, Ratio(info.gpu_blocks()));
  peak_cpu_ratio_ = std::max(peak_cpu_ratio_, Ratio(info.cpu_blocks()));
  peak_gpu_blocks_used_ = std::max(peak_gpu_blocks_used_, info.gpu_blocks().used());
  peak_running_ = std::max(peak_running_, info.num_running());
  peak_waiting_ = std::max(peak_waiting_, info.num_waiting());
  peak_swapped_ = std::max(peak_swapped_, info.num_swapped());
  if (timeline_.size() < kMaxTimeline) {
    timeline_.push_back({Elapsed(), Ratio(info.gpu_blocks()), info.num_running(),
                         info.num_waiting(), info.num_swapped()});
  }
}

void ServerMonitor::PollMetrics() {
  if (!metrics_url_) return;
  absl::StatusOr<std::string> body = HttpGet(*metrics_url_, kScrapeTimeoutS);
  ++scrapes_;
  if (!body.ok()) {
    ++scrape_errors_;
    last_scrape_error_ = body.status().ToString();
    return;
  }
  for (const auto& [series, value] : ParsePrometheusText(*body)) {
    const std::string name = SeriesName(series);
    if (name == "strata_kv_cache_usage_ratio") {
      const std::string pool = SeriesLabel(series, "pool");
      if (pool == "gpu") peak_gpu_ratio_ = std::max(peak_gpu_ratio_, value);
      if (pool == "cpu") peak_cpu_ratio_ = std::max(peak_cpu_ratio_, value);
    } else if (name == "strata_requests") {
      const std::string state = SeriesLabel(series, "state");
      const int n = static_cast<int>(value);
      if (state == "running") peak_running_ = std::max(peak_running_, n);
      if (state == "waiting") peak_waiting_ = std::max(peak_waiting_, n);
      if (state == "swapped") peak_swapped_ = std::max(peak_swapped_, n);
    }
  }
}

nlohmann::json ServerMonitor::Report() const {
  nlohmann::json out = {
      {"peak_kv_usage_gpu", peak_gpu_ratio_},
      {"peak_kv_usage_cpu", peak_cpu_ratio_},
      {"peak_gpu_blocks_used", peak_gpu_blocks_used_},
      {"peak_num_running", peak_running_},
      {"peak_num_waiting", peak_waiting_},
      {"peak_num_swapped", peak_swapped_},
      {"poll_interval_s", interval_s_},
      {"model_info_polls", info_polls_},
      {"model_info_errors", info_errors_},
      {"timeline_columns", {"t_s", "kv_usage_gpu", "running", "waiting", "swapped"}},
      {"timeline", timeline_},
  };
  if (!metrics_url_) {
    out["metrics_url"] = nullptr;
    out["preemptions"] = nullptr;  // unknown without the metrics endpoint
    return out;
  }
  out["metrics_url"] = absl::StrCat("http://", metrics_url_->host, ":", metrics_url_->port,
                                    metrics_url_->path);
  out["scrapes"] = scrapes_;
  out["scrape_errors"] = scrape_errors_;
  if (!last_scrape_error_.empty()) out["last_scrape_error"] = last_scrape_error_;
  if (final_.empty()) {
    out["preemptions"] = nullptr;
    return out;
  }
  // Counters: after - before (a series that appeared during the run started at 0).
  nlohmann::json deltas = nlohmann::json::object(), by_mode = nlohmann::json::object();
  double preemptions = 0;
  for (const auto& [series, value] : final_) {
    const std::string name = SeriesName(series);
    if (!absl::StartsWith(name, "strata_") || !absl::EndsWith(name, "_total")) continue;
    const auto before = baseline_.find(series);
    const double delta = value - (before == baseline_.end() ? 0.0 : before->second);
    deltas[series] = delta;
    if (name == "strata_preemptions_total") {
      preemptions += delta;
      by_mode[SeriesLabel(series, "mode")] = delta;
    }
  }
  out["preemptions"] = preemptions;
  out["preemptions_by_mode"] = by_mode;
  out["counter_deltas"] = deltas;
  return out;
}

}  // namespace strata::bench
