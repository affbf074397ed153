// Unit tests of strata-serving-bench's host-side pieces: the workload sampler, clipping,
// arrivals, prompt ids, statistics, URL and Prometheus text parsing. The end-to-end test
// against a real server is bench/serving_bench_test.sh.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "bench/serving_bench_http.h"
#include "bench/serving_bench_stats.h"
#include "bench/serving_bench_workload.h"
#include "gtest/gtest.h"

namespace strata::bench {
namespace {

double Mean(const std::vector<double>& v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

TEST(ServingBenchWorkload, ShareGptMatchesTheDocumentedFit) {
  WorkloadOptions o;
  o.num_prompts = 50000;
  o.seed = 3;
  const std::vector<RequestSpec> specs = SampleLengths(o);
  std::vector<double> in, out;
  for (const RequestSpec& s : specs) {
    // vLLM's ShareGPT filter.
    ASSERT_GE(s.input_len, 4);
    ASSERT_LE(s.input_len, 1024);
    ASSERT_GE(s.output_len, 4);
    ASSERT_LE(s.input_len + s.output_len, 2048);
    in.push_back(s.input_len);
    out.push_back(s.output_len);
  }
  // bench/WORKLOADS.md: filtered means 227 / 200, medians 150 / 127.
  EXPECT_NEAR(Mean(in), 227, 4);
  EXPECT_NEAR(Mean(out), 200, 4);
  std::sort(in.begin(), in.end());
  std::sort(out.begin(), out.end());
  EXPECT_NEAR(Percentile(in, 50), 150, 5);
  EXPECT_NEAR(Percentile(out, 50), 127, 5);
}

TEST(ServingBenchWorkload, SameSeedSameStreamOtherSeedOther) {
  WorkloadOptions o;
  o.num_prompts = 100;
  o.seed = 11;
  const auto a = SampleLengths(o), b = SampleLengths(o);
  o.seed = 12;
  const auto c = SampleLengths(o);
  int same_ab = 0, same_ac = 0;
  for (int i = 0; i < 100; ++i) {
    same_ab += a[i].input_len == b[i].input_len && a[i].output_len == b[i].output_len;
    same_ac += a[i].input_len == c[i].input_len && a[i].output_len == c[i].output_len;
  }
  EXPECT_EQ(same_ab, 100);
  EXPECT_LT(same_ac, 10);
}

TEST(ServingBenchWorkload, FixedShapes) {
  WorkloadOptions o;
  o.num_prompts = 3;
  for (auto [w, in, out] : {std::tuple{Workload::kLong4k, 4096, 512},
                            std::tuple{Workload::kLong16k, 16384, 256}}) {
    o.workload = w;
    for (const RequestSpec& s : SampleLengths(o)) {
      EXPECT_EQ(s.input_len, in);
      EXPECT_EQ(s.output_len, out);
    }
  }
  o.workload = Workload::kFixed;
  o.input_len = 32;
  o.output_len = 8;
  for (const RequestSpec& s : SampleLengths(o)) EXPECT_EQ(s.input_len + s.output_len, 40);
  Workload parsed;
  EXPECT_TRUE(ParseWorkload("long16k", &parsed));
  EXPECT_EQ(parsed, Workload::kLong16k);
  EXPECT_FALSE(ParseWorkload("long8k", &parsed));
}

TEST(ServingBenchWorkload, ClipKeepsOutputWhenItFitsHalfTheContext) {
  std::vector<RequestSpec> r(4);
  r[0] = {.input_len = 4096, .output_len = 512};   // 7B, 4096 context: 3584 / 512
  r[1] = {.input_len = 16384, .output_len = 256};  // 3840 / 256
  r[2] = {.input_len = 1500, .output_len = 3000};  // output over half: 1500 / 2048
  r[3] = {.input_len = 100, .output_len = 100};    // fits: unchanged
  EXPECT_EQ(ClipToContext(4096, &r), 3);
  EXPECT_EQ(r[0].input_len, 3584);
  EXPECT_EQ(r[0].output_len, 512);
  EXPECT_EQ(r[1].input_len, 3840);
  EXPECT_EQ(r[1].output_len, 256);
  EXPECT_EQ(r[2].input_len, 1500);
  EXPECT_EQ(r[2].output_len, 2048);
  EXPECT_FALSE(r[3].clipped);
  for (const RequestSpec& s : r) EXPECT_LE(s.input_len + s.output_len, 4096);
  EXPECT_TRUE(r[0].clipped && r[1].clipped && r[2].clipped);
}

TEST(ServingBenchWorkload, PoissonArrivals) {
  std::vector<RequestSpec> r(20000);
  AssignArrivals(5.0, 1, &r);
  EXPECT_EQ(r[0].arrival_s, 0);
  for (size_t i = 1; i < r.size(); ++i) ASSERT_GE(r[i].arrival_s, r[i - 1].arrival_s);
  EXPECT_NEAR(r.back().arrival_s / (r.size() - 1), 0.2, 0.01);  // mean gap 1/rate
  AssignArrivals(INFINITY, 1, &r);
  for (const RequestSpec& s : r) ASSERT_EQ(s.arrival_s, 0);
}

TEST(ServingBenchWorkload, PromptIdsAvoidBosEosAndStayInVocab) {
  const std::vector<int32_t> ids = PromptTokenIds(5, 7, 20000, 32, 1, 2);
  ASSERT_EQ(ids.size(), 20000u);
  for (int32_t t : ids) {
    ASSERT_GE(t, 0);
    ASSERT_LT(t, 32);
    ASSERT_NE(t, 1);
    ASSERT_NE(t, 2);
  }
  EXPECT_EQ(ids, PromptTokenIds(5, 7, 20000, 32, 1, 2));
  EXPECT_NE(ids, PromptTokenIds(5, 8, 20000, 32, 1, 2));  // per request
}

TEST(ServingBenchStats, PercentilesInterpolateLikeNumpy) {
  const std::vector<double> v = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(Percentile(v, 50), 2.5);
  EXPECT_DOUBLE_EQ(Percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(v, 100), 4);
  EXPECT_DOUBLE_EQ(Percentile(v, 90), 3.7);
  const nlohmann::json s = Summarize({0.004, 0.001, 0.002, 0.003}, 1e3);
  EXPECT_DOUBLE_EQ(s["mean"].get<double>(), 2.5);
  EXPECT_DOUBLE_EQ(s["max"].get<double>(), 4);
  EXPECT_TRUE(Summarize({}, 1)["p50"].is_null());
}

TEST(ServingBenchStats, ResultsCountOnlySuccessfulRequests) {
  std::vector<RequestSpec> specs(3, RequestSpec{.input_len = 10, .output_len = 3});
  std::vector<RequestResult> res(3);
  for (int i = 0; i < 2; ++i) {
    res[i].code = grpc::StatusCode::OK;
    res[i].ttft_s = 0.1;
    res[i].e2e_s = 0.3;
    res[i].output_tokens = 3;
    res[i].usage_output_tokens = 3;
    res[i].itl_s = {0.1, 0.1};
  }
  res[2].code = grpc::StatusCode::RESOURCE_EXHAUSTED;
  res[2].error = "queue full";
  const nlohmann::json j = BuildResults(specs, res, 2.0, true);
  EXPECT_EQ(j["completed"], 2);
  EXPECT_EQ(j["failed"], 1);
  EXPECT_EQ(j["failures"]["RESOURCE_EXHAUSTED"], 1);
  EXPECT_EQ(j["total_output_tokens"], 6);
  EXPECT_DOUBLE_EQ(j["output_throughput"].get<double>(), 3.0);
  EXPECT_DOUBLE_EQ(j["total_token_throughput"].get<double>(), 13.0);
  EXPECT_NEAR(j["tpot_ms"]["p50"].get<double>(), 100.0, 1e-9);  // (300 - 100) / 2
  EXPECT_EQ(j["output_length_mismatches"], 0);
  EXPECT_EQ(j["requests"].size(), 3u);
  EXPECT_EQ(j["requests"][2]["status"], "RESOURCE_EXHAUSTED");
}

TEST(ServingBenchStats, SaturatedThroughputStopsAtTheLastFirstToken) {
  std::vector<RequestSpec> specs(2, RequestSpec{.input_len = 4, .output_len = 4});
  std::vector<RequestResult> res(2);
  for (RequestResult& r : res) {
    r.code = grpc::StatusCode::OK;
    r.output_tokens = r.usage_output_tokens = 4;
    r.e2e_s = 4;
  }
  // Request 0: tokens at 1, 2, 3, 4 s; request 1 sent at 1 s, first token at 2 s, then 5, 6, 7.
  res[0].send_s = 0, res[0].ttft_s = 1;
  res[0].token_times = {{1, 1}, {2, 1}, {3, 1}, {4, 1}};
  res[1].send_s = 1, res[1].ttft_s = 1;
  res[1].token_times = {{2, 1}, {5, 1}, {6, 1}, {7, 1}};
  const nlohmann::json j = BuildResults(specs, res, 7.0, false);
  EXPECT_DOUBLE_EQ(j["saturated_window_s"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(j["saturated_output_throughput"].get<double>(), 1.5);  // 3 tokens by 2 s
  EXPECT_DOUBLE_EQ(j["output_throughput"].get<double>(), 8.0 / 7.0);
  res[1].code = grpc::StatusCode::UNAVAILABLE;  // failed requests count for neither
  const nlohmann::json k = BuildResults(specs, res, 7.0, false);
  EXPECT_DOUBLE_EQ(k["saturated_window_s"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(k["saturated_output_throughput"].get<double>(), 1.0);
}

TEST(ServingBenchHttp, ParsesUrls) {
  absl::StatusOr<HttpUrl> u = ParseHttpUrl("http://localhost:9400/metrics");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->host, "localhost");
  EXPECT_EQ(u->port, "9400");
  EXPECT_EQ(u->path, "/metrics");
  u = ParseHttpUrl("http://[::1]:81");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->host, "::1");
  EXPECT_EQ(u->port, "81");
  EXPECT_EQ(u->path, "/");
  EXPECT_FALSE(ParseHttpUrl("https://x:1/metrics").ok());
  EXPECT_FALSE(ParseHttpUrl("localhost:9400").ok());
  EXPECT_FALSE(ParseHttpUrl("http://:9400/").ok());
  EXPECT_FALSE(ParseHttpUrl("http://x:99999/").ok());
}

TEST(ServingBenchHttp, ParsesPrometheusText) {
  const std::string text =
      "# HELP strata_preemptions_total Sequences preempted\n"
      "# TYPE strata_preemptions_total counter\n"
      "strata_preemptions_total{mode=\"swap\"} 3\n"
      "strata_preemptions_total{mode=\"recompute\"} 4 1700000000000\n"
      "strata_model_info{model=\"/m/a b{c}\",kv_dtype=\"int8\"} 1\n"
      "strata_kv_cache_usage_ratio{pool=\"gpu\"} 0.25\n"
      "strata_steps_total 12\n"
      "garbage\n";
  const std::map<std::string, double> m = ParsePrometheusText(text);
  EXPECT_EQ(m.at("strata_preemptions_total{mode=\"swap\"}"), 3);
  EXPECT_EQ(m.at("strata_preemptions_total{mode=\"recompute\"}"), 4);
  EXPECT_EQ(m.at("strata_steps_total"), 12);
  const std::string info = "strata_model_info{model=\"/m/a b{c}\",kv_dtype=\"int8\"}";
  ASSERT_EQ(m.count(info), 1u);
  EXPECT_EQ(SeriesName(info), "strata_model_info");
  EXPECT_EQ(SeriesLabel(info, "kv_dtype"), "int8");
  EXPECT_EQ(SeriesLabel(info, "model"), "/m/a b{c}");
  EXPECT_EQ(SeriesLabel(info, "dtype"), "");  // not a suffix match
  EXPECT_EQ(m.size(), 5u);
}

}  // namespace
}  // namespace strata::bench
