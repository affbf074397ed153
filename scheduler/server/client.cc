#include "scheduler/server/client.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "google/protobuf/util/json_util.h"

namespace strata::serving {
namespace {

std::chrono::system_clock::time_point After(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

int Fail(const char* what, const grpc::Status& s) {
  static const char* kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                                 "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                 "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                 "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int code = s.error_code();
  std::fflush(stdout);
  std::fprintf(stderr, "strata %s: %s: %s\n", what, code >= 0 && code <= 16 ? kNames[code] : "?",
               s.error_message().c_str());
  return 1;
}

}  // namespace

absl::StatusOr<std::unique_ptr<GenerationClient>> GenerationClient::Create(const ClientOptions& o) {
  auto c = std::make_unique<GenerationClient>();
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (o.tls || !o.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (!o.tls_ca_file.empty()) {
      absl::StatusOr<std::string> ca = ReadFile(o.tls_ca_file, "--tls-ca-file");
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *ca;
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  if (!o.auth_token_file.empty()) {
    absl::StatusOr<std::string> token = ReadFile(o.auth_token_file, "--auth-token-file");
    if (!token.ok()) return token.status();
    c->bearer_ = absl::StrCat("Bearer ", absl::StripAsciiWhitespace(*token));
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  c->channel_ = grpc::CreateCustomChannel(o.server, creds, args);
  c->stub_ = v1::Generation::NewStub(c->channel_);
  return c;
}

std::unique_ptr<grpc::ClientContext> GenerationClient::NewContext(double timeout_s) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(After(timeout_s));
  if (!bearer_.empty()) ctx->AddMetadata("authorization", bearer_);
  return ctx;
}

absl::StatusOr<v1::ModelInfo> GenerationClient::WaitReady(double timeout_s) const {
  const auto deadline = After(timeout_s);
  for (;;) {
    std::unique_ptr<grpc::ClientContext> ctx = NewContext(5);
    v1::ModelInfo info;
    const grpc::Status s = stub_->GetModelInfo(ctx.get(), {}, &info);
    if (s.ok()) return info;
    const bool retry = s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                       s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!retry || std::chrono::system_clock::now() >= deadline) {
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

int RunRemoteGenerate(const ClientOptions& o, const v1::GenerateRequest& request) {
  absl::StatusOr<std::unique_ptr<GenerationClient>> client = GenerationClient::Create(o);
  if (!client.ok()) {
    std::fprintf(stderr, "strata generate: %s\n", client.status().ToString().c_str());
    return 2;
  }
  if (o.wait_ready_s > 0) {
    absl::StatusOr<v1::ModelInfo> ready = (*client)->WaitReady(o.wait_ready_s);
    if (!ready.ok()) {
      std::fprintf(stderr, "strata generate: server %s not ready: %s\n", o.server.c_str(),
                   ready.status().ToString().c_str());
      return 1;
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<grpc::ClientContext> ctx = (*client)->NewContext(o.timeout_s);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      (*client)->stub().Generate(ctx.get(), request);
  // The prompt is echoed with the first chunk, so a refused request prints
  // only the error.
  bool echoed = !request.has_text();
  auto echo = [&] {
    if (!echoed) std::fputs(request.text().c_str(), stdout);
    echoed = true;
  };
  v1::GenerateResponse chunk, last;
  int64_t tokens = 0;
  double first_token_s = -1;
  while (reader->Read(&chunk)) {
    if (first_token_s < 0 && chunk.token_ids_size() > 0) {
      first_token_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    tokens += chunk.token_ids_size();
    echo();
    std::fputs(chunk.text().c_str(), stdout);
    std::fflush(stdout);
    if (chunk.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) last = chunk;
  }
  const grpc::Status s = reader->Finish();
  if (!s.ok()) return Fail("generate", s);
  echo();
  std::fputs("\n", stdout);
  std::fflush(stdout);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "[%s: %d prompt + %d generated tokens in %.3f s, first token after %.3f s]\n",
               v1::FinishReason_Name(last.finish_reason()).c_str(), last.usage().prompt_tokens(),
               last.usage().completion_tokens(), secs, first_token_s);
  return 0;
}

int RunRemoteInfo(const ClientOptions& o) {
  absl::StatusOr<std::unique_ptr<GenerationClient>> client = GenerationClient::Create(o);
  if (!client.ok()) {
    std::fprintf(stderr, "strata info: %s\n", client.status().ToString().c_str());
    return 2;
  }
  v1::ModelInfo info;
  if (o.wait_ready_s > 0) {
    absl::StatusOr<v1::ModelInfo> ready = (*client)->WaitReady(o.wait_ready_s);
    if (!ready.ok()) {
      std::fprintf(stderr, "strata info: %s\n", ready.status().ToString().c_str());
      return 1;
    }
    info = *ready;
  } else {
    std::unique_ptr<grpc::ClientContext> ctx = (*client)->NewContext(o.timeout_s);
    const grpc::Status s = (*client)->stub().GetModelInfo(ctx.get(), {}, &info);
    if (!s.ok()) return Fail("info", s);
  }
  std::string json;
  google::protobuf::util::JsonPrintOptions opts;
  opts.add_whitespace = true;
  opts.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(info, &json, opts);
  std::fputs(json.c_str(), stdout);
  return 0;
}

}  // namespace strata::serving
