#include "bench/serving_bench_http.h"

#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace strata::bench {
namespace {

constexpr size_t kMaxBody = 32 << 20;

// Closes the descriptor on every path.
class Socket {
 public:
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() {
    if (fd_ >= 0) close(fd_);
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  int fd() const { return fd_; }

 private:
  int fd_;
};

absl::StatusOr<std::string> Dechunk(const std::string& body) {
  std::string out;
  size_t pos = 0;
  for (;;) {
    const size_t eol = body.find("\r\n", pos);
    if (eol == std::string::npos) return absl::InternalError("truncated chunked body");
    const size_t size = std::strtoul(body.substr(pos, eol - pos).c_str(), nullptr, 16);
    pos = eol + 2;
    if (size == 0) return out;
    if (pos + size > body.size()) return absl::InternalError("truncated chunk");
    out.append(body, pos, size);
    pos += size + 2;
  }
}

}  // namespace

absl::StatusOr<HttpUrl> ParseHttpUrl(const std::string& url) {
  constexpr absl::string_view kScheme = "http://";
  if (!absl::StartsWith(url, kScheme)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-url must start with http:// (https is not supported), got '",
                     url, "'"));
  }
  HttpUrl out;
  std::string rest = url.substr(kScheme.size());
  const size_t slash = rest.find('/');
  if (slash != std::string::npos) {
    out.path = rest.substr(slash);
    rest.resize(slash);
  }
  if (!rest.empty() && rest[0] == '[') {  // [v6]:port
    const size_t close = rest.find(']');
    if (close == std::string::npos) return absl::InvalidArgumentError("--metrics-url: unclosed '['");
    out.host = rest.substr(1, close - 1);
    rest = rest.substr(close + 1);
    if (!rest.empty() && rest[0] != ':') return absl::InvalidArgumentError("--metrics-url: bad host");
    if (!rest.empty()) out.port = rest.substr(1);
  } else {
    const size_t colon = rest.rfind(':');
    out.host = rest.substr(0, colon);
    if (colon != std::string::npos) out.port = rest.substr(colon + 1);
  }
  int port = 0;
  if (out.host.empty() || !absl::SimpleAtoi(out.port, &port) || port <= 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-url needs http://HOST:PORT/PATH, got '", url, "'"));
  }
  return out;
}

absl::StatusOr<std::string> HttpGet(const HttpUrl& url, double timeout_s) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (const int rc = getaddrinfo(url.host.c_str(), url.port.c_str(), &hints, &res); rc != 0) {
    return absl::UnavailableError(absl::StrCat(url.host, ": ", gai_strerror(rc)));
  }
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout_s);
  tv.tv_usec = static_cast<suseconds_t>((timeout_s - static_cast<double>(tv.tv_sec)) * 1e6);
  int fd = -1;
  std::string error = "no address";
  for (addrinfo* a = res; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    // On Linux SO_SNDTIMEO also bounds connect().
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      error = std::strerror(errno);
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(res);
  if (fd < 0) return absl::UnavailableError(absl::StrCat(url.host, ":", url.port, ": ", error));
  Socket sock(fd);
  // HTTP/1.0: the server closes the connection after the body and does not chunk it.
  const std::string request = absl::StrCat("GET ", url.path, " HTTP/1.0\r\nHost: ", url.host,
                                           "\r\nAccept: text/plain\r\n\r\n");
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return absl::UnavailableError(absl::StrCat("send: ", std::strerror(errno)));
    sent += static_cast<size_t>(n);
  }
  std::string answer;
  char buf[16384];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(absl::StrCat("recv: ", std::strerror(errno)));
    }
    answer.append(buf, static_cast<size_t>(n));
    if (answer.size() > kMaxBody) return absl::InternalError("answer over 32 MiB");
  }
  const size_t header_end = answer.find("\r\n\r\n");
  if (header_end == std::string::npos || !absl::StartsWith(answer, "HTTP/")) {
    return absl::InternalError("malformed HTTP answer");
  }
  const std::string headers = absl::AsciiStrToLower(answer.substr(0, header_end));
  const size_t sp = headers.find(' ');
  if (sp == std::string::npos || headers.compare(sp + 1, 3, "200") != 0) {
    return absl::InternalError(
        absl::StrCat("HTTP status: ", answer.substr(0, answer.find("\r\n"))));
  }
  std::string body = answer.substr(header_end + 4);
  if (absl::StrContains(headers, "transfer-encoding: chunked")) return Dechunk(body);
  return body;
}

std::map<std::string, double> ParsePrometheusText(const std::string& text) {
  std::map<std::string, double> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    const std::string line(absl::StripAsciiWhitespace(text.substr(pos, eol - pos)));
    pos = eol + 1;
    if (line.empty() || line[0] == '#') continue;
    // The series ends at the first space outside the label set (label values may hold spaces).
    size_t end = 0;
    bool in_labels = false, in_quotes = false;
    for (; end < line.size(); ++end) {
      const char c = line[end];
      if (in_quotes) {
        if (c == '\\') ++end;
        else if (c == '"') in_quotes = false;
      } else if (c == '"') {
        in_quotes = in_labels;
      } else if (c == '{') {
        in_labels = true;
      } else if (c == '}') {
        in_labels = false;
      } else if (c == ' ' && !in_labels) {
        break;
      }
    }
    if (end >= line.size()) continue;
    const std::string value_text(absl::StripAsciiWhitespace(line.substr(end + 1)));
    const std::string first = value_text.substr(0, value_text.find(' '));  // drop a timestamp
    char* parse_end = nullptr;
    const double value = std::strtod(first.c_str(), &parse_end);
    if (parse_end == first.c_str()) continue;
    out[line.substr(0, end)] = value;
  }
  return out;
}

std::string SeriesName(const std::string& series) { return series.substr(0, series.find('{')); }

std::string SeriesLabel(const std::string& series, const std::string& label) {
  const std::string key = absl::StrCat(label, "=\"");
  size_t at = series.find('{');
  while (at != std::string::npos) {
    at = series.find(key, at);
    if (at == std::string::npos) return "";
    const char before = series[at - 1];
    if (before == '{' || before == ',') break;
    at += key.size();
  }
  if (at == std::string::npos) return "";
  const size_t start = at + key.size();
  std::string out;
  for (size_t i = start; i < series.size() && series[i] != '"'; ++i) {
    if (series[i] == '\\' && i + 1 < series.size()) ++i;
    out.push_back(series[i]);
  }
  return out;
}

}  // namespace strata::bench
