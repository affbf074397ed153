// strata-serving-bench: a load generator for `strata serve` over the public gRPC API
// (strata.v1.Generation/Generate), in the manner of vLLM's benchmark_serving: a seeded stream
// of token-id prompts with exact output lengths (ignore_eos + max_tokens), Poisson arrivals or
// a fixed concurrency, per-request TTFT / TPOT / ITL / end-to-end latency, server-side KV usage
// and preemptions, and a JSON result file. Usage and workloads: bench/WORKLOADS.md.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "bench/serving_bench_http.h"
#include "bench/serving_bench_monitor.h"
#include "bench/serving_bench_runner.h"
#include "bench/serving_bench_stats.h"
#include "bench/serving_bench_workload.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "proto/strata_v1_generation.grpc.pb.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace strata::bench {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitSetup = 1;     // server unreachable, unreadable file, bad server answer
constexpr int kExitUsage = 2;     // bad flags
constexpr int kExitFailures = 3;  // the run finished, some requests failed

struct Flags {
  std::string server;
  std::string workload = "sharegpt";
  int input_len = 0;
  int output_len = 0;
  int num_prompts = 1000;
  std::string request_rate = "inf";
  int concurrency = 0;
  uint64_t seed = 0;
  std::string metrics_url;
  double metrics_interval_s = 0.5;
  std::string output;
  std::string label;
  double request_timeout_s = 3600;
  double wait_ready_s = 60;
  double progress_interval_s = 10;
  bool no_request_details = false;
  std::string auth_token_file;
  bool tls = false;
  std::string tls_ca_file;
};

// The flags' meaning, validated together; returns an error message or "".
struct Plan {
  Workload workload = Workload::kShareGpt;
  double rate = INFINITY;
  std::optional<HttpUrl> metrics_url;
};

std::string Validate(const Flags& f, Plan* plan) {
  if (!ParseWorkload(f.workload, &plan->workload)) {
    return "--workload must be sharegpt, long4k, long16k or fixed, got '" + f.workload + "'";
  }
  const bool fixed = plan->workload == Workload::kFixed;
  if (fixed && (f.input_len <= 0 || f.output_len <= 0)) {
    return "--workload fixed needs --input-len and --output-len (both >= 1)";
  }
  if (!fixed && (f.input_len != 0 || f.output_len != 0)) {
    return "--input-len/--output-len only apply to --workload fixed (" + f.workload +
           " has its own lengths)";
  }
  if (f.num_prompts <= 0) return "--num-prompts must be >= 1";
  if (f.concurrency < 0) return "--concurrency must be >= 0 (0 = no limit)";
  double rate = 0;
  if (!absl::SimpleAtod(f.request_rate, &rate) || std::isnan(rate) || rate <= 0) {
    return "--request-rate must be a positive number of requests/s or 'inf', got '" +
           f.request_rate + "'";
  }
  plan->rate = rate;
  if (f.metrics_interval_s <= 0) return "--metrics-interval must be > 0";
  if (f.request_timeout_s <= 0) return "--request-timeout must be > 0";
  if (!f.metrics_url.empty()) {
    absl::StatusOr<HttpUrl> url = ParseHttpUrl(f.metrics_url);
    if (!url.ok()) return std::string(url.status().message());
    plan->metrics_url = *url;
  }
  return "";
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError("cannot read " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string UtcNow() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

nlohmann::json ModelInfoJson(const v1::ModelInfo& info) {
  google::protobuf::util::JsonPrintOptions opts;
  opts.always_print_primitive_fields = true;
  opts.preserve_proto_field_names = true;
  std::string text;
  (void)google::protobuf::util::MessageToJsonString(info, &text, opts);
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return nullptr;
  j["kv_bytes_per_block"] = info.kv_bytes_per_block();  // proto JSON writes int64 as a string
  return j;
}

std::string Ms(const nlohmann::json& summary, const char* key) {
  const nlohmann::json& v = summary[key];
  return v.is_number() ? absl::StrFormat("%.2f", v.get<double>()) : "-";
}

void PrintSummary(const nlohmann::json& r) {
  const nlohmann::json& b = r["benchmark"];
  const nlohmann::json& res = r["results"];
  const nlohmann::json& info = r["server"]["model_info"];
  const nlohmann::json& mon = r["server"]["monitor"];
  auto line = [](const std::string& k, const std::string& v) {
    std::printf("%-40s %s\n", k.c_str(), v.c_str());
  };
  std::printf("============ Strata Serving Benchmark ============\n");
  line("Label:", b["label"].get<std::string>());
  line("Server:", absl::StrCat(r["server"]["address"].get<std::string>(), " (",
                               info["model"].get<std::string>(), ", kv ",
                               info["kv_cache_dtype"].get<std::string>(), "/",
                               info["kv_scale_mode"].get<std::string>(), ", tp ",
                               info["tp_size"].get<int>(), ")"));
  line("Workload:", absl::StrCat(b["workload"].get<std::string>(), ", ",
                                 b["num_prompts"].get<int>(), " prompts, ",
                                 b["clipped_requests"].get<int>(), " clipped to context ",
                                 b["max_context"].get<int>()));
  line("Request rate / concurrency:",
       absl::StrCat(b["request_rate"].is_string() ? b["request_rate"].get<std::string>()
                                                   : absl::StrFormat("%g", b["request_rate"].get<double>()),
                    " req/s / ",
                    b["concurrency"].get<int>() > 0 ? std::to_string(b["concurrency"].get<int>())
                                                    : std::string("unlimited")));
  line("Successful requests:", std::to_string(res["completed"].get<int>()));
  std::string failures;
  for (const auto& [code, n] : res["failures"].items()) {
    failures += absl::StrCat(failures.empty() ? "" : ", ", code, " ", n.get<int>());
  }
  line("Failed requests:",
       absl::StrCat(res["failed"].get<int>(), failures.empty() ? "" : " (" + failures + ")"));
  line("Benchmark duration (s):", absl::StrFormat("%.2f", res["duration_s"].get<double>()));
  line("Total input tokens:", std::to_string(res["total_input_tokens"].get<int64_t>()));
  line("Total generated tokens:", std::to_string(res["total_output_tokens"].get<int64_t>()));
  line("Request throughput (req/s):",
       absl::StrFormat("%.2f", res["request_throughput"].get<double>()));
  line("Output token throughput (tok/s):",
       absl::StrFormat("%.2f", res["output_throughput"].get<double>()));
  line("Total token throughput (tok/s):",
       absl::StrFormat("%.2f", res["total_token_throughput"].get<double>()));
  if (!res["saturated_output_throughput"].is_null()) {
    line("Output tok/s until the last admission:",
         absl::StrFormat("%.2f (first %.2f s)", res["saturated_output_throughput"].get<double>(),
                         res["saturated_window_s"].get<double>()));
  }
  for (const auto& [key, title] : {std::pair{"ttft_ms", "Time to first token"},
                                   std::pair{"tpot_ms", "Time per output token (excl. 1st)"},
                                   std::pair{"itl_ms", "Inter-token latency"},
                                   std::pair{"e2e_ms", "End-to-end latency"}}) {
    const nlohmann::json& s = res[key];
    std::printf("%-40s mean %s  p50 %s  p90 %s  p99 %s\n", absl::StrCat(title, " (ms):").c_str(),
                Ms(s, "mean").c_str(), Ms(s, "p50").c_str(), Ms(s, "p90").c_str(),
                Ms(s, "p99").c_str());
  }
  line("Peak KV usage (engine pool / swap):",
       absl::StrFormat("%.1f%% / %.1f%%", 100 * mon["peak_kv_usage_gpu"].get<double>(),
                       100 * mon["peak_kv_usage_cpu"].get<double>()));
  line("Peak running / waiting / swapped:",
       absl::StrCat(mon["peak_num_running"].get<int>(), " / ", mon["peak_num_waiting"].get<int>(),
                    " / ", mon["peak_num_swapped"].get<int>()));
  line("Preemptions:", mon["preemptions"].is_null()
                           ? std::string("unknown (no --metrics-url)")
                           : absl::StrCat(mon["preemptions"].get<double>(), " ",
                                          mon["preemptions_by_mode"].dump()));
  std::printf("==================================================\n");
  std::fflush(stdout);
}

int Run(const Flags& f, const Plan& plan, const std::vector<std::string>& argv) {
  std::string authorization;
  if (!f.auth_token_file.empty()) {
    absl::StatusOr<std::string> token = ReadFile(f.auth_token_file);
    if (!token.ok()) {
      spdlog::error("--auth-token-file: {}", token.status().ToString());
      return kExitSetup;
    }
    authorization = absl::StrCat("Bearer ", absl::StripAsciiWhitespace(*token));
  }
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (f.tls || !f.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (!f.tls_ca_file.empty()) {
      absl::StatusOr<std::string> ca = ReadFile(f.tls_ca_file);
      if (!ca.ok()) {
        spdlog::error("--tls-ca-file: {}", ca.status().ToString());
        return kExitSetup;
      }
      ssl.pem_root_certs = *ca;
    }
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(f.server, creds, args);
  std::unique_ptr<v1::Generation::Stub> stub = v1::Generation::NewStub(channel);

  // The server's configuration; UNAVAILABLE while it loads, so poll up to --wait-ready.
  v1::ModelInfo info;
  const auto ready_deadline = std::chrono::steady_clock::now() +
                              std::chrono::milliseconds(static_cast<int64_t>(f.wait_ready_s * 1e3));
  for (;;) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
    const grpc::Status s = stub->GetModelInfo(&ctx, {}, &info);
    if (s.ok()) break;
    const bool retry = s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                       s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!retry || std::chrono::steady_clock::now() >= ready_deadline) {
      spdlog::error("GetModelInfo on {}: {}: {}", f.server, StatusCodeName(s.error_code()),
                    s.error_message());
      return kExitSetup;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  if (info.vocab_size() <= 2 || info.max_context() < 2) {
    spdlog::error("server reports vocab_size {} and max_context {}: cannot build prompts",
                  info.vocab_size(), info.max_context());
    return kExitSetup;
  }

  WorkloadOptions wo;
  wo.workload = plan.workload;
  wo.num_prompts = f.num_prompts;
  wo.input_len = f.input_len;
  wo.output_len = f.output_len;
  wo.seed = f.seed;
  std::vector<RequestSpec> specs = SampleLengths(wo);
  const int clipped = ClipToContext(info.max_context(), &specs);
  if (clipped > 0) {
    spdlog::warn("{} of {} requests clipped to the server's context of {} tokens", clipped,
                 specs.size(), info.max_context());
  }
  AssignArrivals(plan.rate, f.seed, &specs);

  ServerMonitor monitor(stub.get(), authorization, plan.metrics_url, f.metrics_interval_s);
  if (absl::Status s = monitor.Baseline(); !s.ok()) {
    spdlog::error("--metrics-url {}: {}", f.metrics_url, s.ToString());
    return kExitSetup;
  }

  RunOptions ro;
  ro.request_rate = plan.rate;
  ro.concurrency = f.concurrency;
  ro.request_timeout_s = f.request_timeout_s;
  ro.seed = f.seed;
  ro.vocab_size = info.vocab_size();
  ro.bos_token_id = info.bos_token_id();
  ro.eos_token_id = info.eos_token_id();
  ro.authorization = authorization;
  spdlog::info("sending {} {} requests to {} (rate {}, concurrency {})", specs.size(), f.workload,
               f.server, f.request_rate, f.concurrency > 0 ? std::to_string(f.concurrency) : "unlimited");
  RunProgress progress;
  std::atomic<bool> running{true};
  std::thread reporter([&] {
    if (f.progress_interval_s <= 0) return;
    auto next = std::chrono::steady_clock::now();
    while (running) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (std::chrono::steady_clock::now() < next) continue;
      next += std::chrono::milliseconds(static_cast<int64_t>(f.progress_interval_s * 1e3));
      if (progress.finished > 0) {
        spdlog::info("{}/{} finished ({} failed), {} sent", progress.finished.load(), specs.size(),
                     progress.failed.load(), progress.sent.load());
      }
    }
  });
  std::vector<RequestResult> results;
  double duration_s = 0;
  monitor.Start();
  RunRequests(stub.get(), ro, specs, &progress, &results, &duration_s);
  monitor.Stop();
  running = false;
  reporter.join();

  nlohmann::json out;
  out["command"] = argv;
  out["date"] = UtcNow();
  out["benchmark"] = {
      {"label", f.label.empty() ? absl::StrCat(info.kv_cache_dtype(), "-", f.workload) : f.label},
      {"workload", f.workload},
      {"num_prompts", f.num_prompts},
      {"request_rate", std::isinf(plan.rate) ? nlohmann::json("inf") : nlohmann::json(plan.rate)},
      {"concurrency", f.concurrency},
      {"seed", f.seed},
      {"input_len", plan.workload == Workload::kFixed ? nlohmann::json(f.input_len) : nullptr},
      {"output_len", plan.workload == Workload::kFixed ? nlohmann::json(f.output_len) : nullptr},
      {"max_context", info.max_context()},
      {"clipped_requests", clipped},
      {"lengths", WorkloadStats(specs)},
  };
  out["server"] = {{"address", f.server},
                   {"model_info", ModelInfoJson(info)},
                   {"monitor", monitor.Report()}};
  out["results"] = BuildResults(specs, results, duration_s, !f.no_request_details);
  PrintSummary(out);
  if (!f.output.empty()) {
    std::ofstream file(f.output);
    file << out.dump(2) << "\n";
    if (!file) {
      spdlog::error("--output: cannot write {}", f.output);
      return kExitSetup;
    }
    spdlog::info("results written to {}", f.output);
  }
  return out["results"]["failed"].get<int>() > 0 ? kExitFailures : kExitOk;
}

}  // namespace
}  // namespace strata::bench

int main(int argc, char** argv) {
  using strata::bench::Flags;
  Flags f;
  CLI::App app{"Load generator for `strata serve` (strata.v1.Generation over gRPC). "
               "Exit codes: 0 all requests succeeded, 1 setup error, 2 bad flags, "
               "3 some requests failed (results still written). See bench/WORKLOADS.md."};
  app.add_option("--server", f.server, "host:port of a running `strata serve`")->required();
  app.add_option("--workload", f.workload, "sharegpt, long4k (4096 in / 512 out), "
                 "long16k (16384 in / 256 out) or fixed (--input-len/--output-len)")
      ->capture_default_str();
  app.add_option("--input-len", f.input_len, "Prompt tokens per request (--workload fixed)");
  app.add_option("--output-len", f.output_len, "Output tokens per request (--workload fixed)");
  app.add_option("--num-prompts", f.num_prompts, "Requests to send")->capture_default_str();
  app.add_option("--request-rate", f.request_rate,
                 "Poisson arrival rate in requests/s; inf = all at once")->capture_default_str();
  app.add_option("--concurrency", f.concurrency, "Most requests in flight (0 = no limit)")
      ->capture_default_str();
  app.add_option("--seed", f.seed, "Seed of lengths, prompts and arrivals")->capture_default_str();
  app.add_option("--metrics-url", f.metrics_url,
                 "Server's Prometheus endpoint, http://HOST:PORT/metrics (for KV usage and "
                 "preemption counts)");
  app.add_option("--metrics-interval", f.metrics_interval_s,
                 "Seconds between polls of GetModelInfo and the metrics endpoint")
      ->capture_default_str();
  app.add_option("--output", f.output, "Write the result JSON here");
  app.add_option("--label", f.label, "Name of this run in the JSON and reports "
                 "(default KVDTYPE-WORKLOAD)");
  app.add_option("--request-timeout", f.request_timeout_s, "Deadline of each request, seconds")
      ->capture_default_str();
  app.add_option("--wait-ready", f.wait_ready_s,
                 "Seconds to wait for the server to answer GetModelInfo")->capture_default_str();
  app.add_option("--progress-interval", f.progress_interval_s,
                 "Seconds between progress lines on stderr (0 = none)")->capture_default_str();
  app.add_flag("--no-request-details", f.no_request_details,
               "Leave the per-request list out of the JSON");
  app.add_option("--auth-token-file", f.auth_token_file, "File with the server's bearer token");
  app.add_flag("--tls", f.tls, "Use TLS with the system roots");
  app.add_option("--tls-ca-file", f.tls_ca_file, "PEM root certificate(s) to trust (implies --tls)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : strata::bench::kExitUsage;
  }
  strata::bench::Plan plan;
  if (const std::string error = strata::bench::Validate(f, &plan); !error.empty()) {
    std::fprintf(stderr, "strata-serving-bench: %s\n", error.c_str());
    return strata::bench::kExitUsage;
  }
  // Log lines go to stderr; stdout carries only the summary.
  spdlog::set_default_logger(spdlog::stderr_color_mt("strata-serving-bench"));
  return strata::bench::Run(f, plan, std::vector<std::string>(argv, argv + argc));
}
