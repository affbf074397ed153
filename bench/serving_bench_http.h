// strata-serving-bench: reading the server's Prometheus endpoint.
//
// A plain-HTTP GET over a socket rather than libcurl: the benchmark needs one request to an
// http:// URL (`strata serve --metrics-port`, served by prometheus-cpp's civetweb), and a new
// library dependency would have to be added to tools/setup.sh and the Bazel system
// repositories for that. HTTPS, redirects and proxies are deliberately not supported.
#pragma once

#include <map>
#include <string>

#include "absl/status/statusor.h"

namespace strata::bench {

struct HttpUrl {
  std::string host;  // name, IPv4 or IPv6 (without brackets)
  std::string port = "80";
  std::string path = "/";
};

// "http://host[:port][/path]"; INVALID_ARGUMENT naming the problem otherwise.
absl::StatusOr<HttpUrl> ParseHttpUrl(const std::string& url);

// The body of a 200 answer. UNAVAILABLE when the server cannot be reached or times out;
// INTERNAL on a non-200 status or a malformed answer.
absl::StatusOr<std::string> HttpGet(const HttpUrl& url, double timeout_s);

// Prometheus text exposition format -> {series -> value}, where series is the name with its
// label set as written, e.g. `strata_preemptions_total{mode="swap"}`. Comments are skipped;
// unparsable lines are ignored.
std::map<std::string, double> ParsePrometheusText(const std::string& text);

// The series' metric name (before '{').
std::string SeriesName(const std::string& series);
// The value of label `label` in `series`, or "" when absent.
std::string SeriesLabel(const std::string& series, const std::string& label);

}  // namespace strata::bench
