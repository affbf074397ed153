// `strata serve` as a process: authentication, TLS, a full queue, SIGTERM
// with requests in flight, flags it must refuse, and the CLI and Python
// clients. Each test starts its own server on a free loopback port.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "gtest/gtest.h"
#include "proto/strata_v1_generation.grpc.pb.h"
#include "tests/serving_test_util.h"
#include "tests/test_data.h"

namespace strata {
namespace {

using testing::LoopbackChannel;
using testing::RunCommand;
using testing::ServerProcess;

std::chrono::system_clock::time_point In(std::chrono::milliseconds d) {
  return std::chrono::system_clock::now() + d;
}

std::vector<std::string> ServeArgs(std::vector<std::string> extra = {}) {
  std::vector<std::string> a = {"--model", testing::DataPath("models/stories15M"),
                                "--kv-cache-memory", "0.125", "--swap-space", "0.0625"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

v1::GenerateRequest Prompt(const std::string& text, int max_tokens) {
  v1::GenerateRequest r;
  r.set_text(text);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

grpc::Status Drain(grpc::ClientReader<v1::GenerateResponse>* reader, int* tokens = nullptr) {
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    if (tokens != nullptr) *tokens += m.token_ids_size();
  }
  return reader->Finish();
}

bool ExitedCleanly(int status) { return status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0; }

TEST(ServingProcessTest, BearerTokenAuthentication) {
  const std::string dir = testing::MakeTempDir();
  std::ofstream(dir + "/token") << "s3cret-token\n";
  ServerProcess server;
  ASSERT_TRUE(server.Start(ServeArgs({"--auth-token-file", dir + "/token"}))) << server.log();
  auto channel = LoopbackChannel(server.address());
  auto stub = v1::Generation::NewStub(channel);
  auto call = [&](const char* auth) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(120)));
    if (auth != nullptr) ctx.AddMetadata("authorization", auth);
    auto reader = stub->Generate(&ctx, Prompt("Once upon a time", 4));
    return Drain(reader.get());
  };
  EXPECT_EQ(call(nullptr).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call("Bearer wrong-token!").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call("s3cret-token").error_code(), grpc::StatusCode::UNAUTHENTICATED) << "no Bearer";
  EXPECT_TRUE(call("Bearer s3cret-token").ok());
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(10)));
    v1::ModelInfo info;
    EXPECT_EQ(stub->GetModelInfo(&ctx, {}, &info).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  // Health checks need no token (load balancers, kubelet).
  EXPECT_EQ(testing::HealthStatus(channel.get(), "strata.v1.Generation"), 1);
  // The CLI client sends the token from a file.
  const auto cli = RunCommand({testing::StrataCli(), "generate", "--server", server.address(),
                               "--auth-token-file", dir + "/token", "--max-tokens", "5"},
                              std::chrono::seconds(120));
  EXPECT_EQ(cli.exit_code, 0) << cli.err;
  server.Signal(SIGTERM);
  EXPECT_TRUE(ExitedCleanly(server.WaitExit(std::chrono::seconds(20)))) << server.log();
  std::filesystem::remove_all(dir);
}

TEST(ServingProcessTest, FullQueueIsResourceExhaustedAndServerRecovers) {
  ServerProcess server;
  ASSERT_TRUE(server.Start(ServeArgs({"--max-num-seqs", "1", "--max-queued-requests", "1"})))
      << server.log();
  auto stub = v1::Generation::NewStub(LoopbackChannel(server.address()));
  constexpr int kClients = 8;
  std::vector<grpc::StatusCode> codes(kClients);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext ctx;
      ctx.set_deadline(In(std::chrono::seconds(120)));
      auto reader = stub->Generate(&ctx, Prompt("Once upon a time", 40));
      codes[i] = Drain(reader.get()).error_code();
    });
  }
  for (auto& t : threads) t.join();
  int ok = 0, exhausted = 0;
  for (grpc::StatusCode c : codes) {
    ok += c == grpc::StatusCode::OK;
    exhausted += c == grpc::StatusCode::RESOURCE_EXHAUSTED;
  }
  EXPECT_EQ(ok + exhausted, kClients) << "only OK or RESOURCE_EXHAUSTED";
  EXPECT_GE(exhausted, 1);
  EXPECT_GE(ok, 2) << "one running + one queued are accepted";
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  auto reader = stub->Generate(&ctx, Prompt("Once upon a time", 4));
  EXPECT_TRUE(Drain(reader.get()).ok()) << "accepts again once the queue drains";
  server.Signal(SIGTERM);
  EXPECT_TRUE(ExitedCleanly(server.WaitExit(std::chrono::seconds(20)))) << server.log();
}

// SIGTERM with a request in flight: the request fails cleanly with
// UNAVAILABLE once the grace period ends, new requests are refused, the
// process exits 0 and leaves no process behind.
TEST(ServingProcessTest, SigtermShutsDownCleanly) {
  ServerProcess server;
  ASSERT_TRUE(server.Start(ServeArgs({"--shutdown-grace", "0.5"}))) << server.log();
  auto stub = v1::Generation::NewStub(LoopbackChannel(server.address()));
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  v1::GenerateRequest req = Prompt("Once upon a time", 250);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m)) << "first tokens arrive";
  server.Signal(SIGTERM);
  int tokens = m.token_ids_size();
  const grpc::Status s = Drain(reader.get(), &tokens);
  EXPECT_TRUE(s.ok() || s.error_code() == grpc::StatusCode::UNAVAILABLE)
      << s.error_code() << ": " << s.error_message();
  if (s.ok()) {
    EXPECT_EQ(tokens, 250);
  } else {
    EXPECT_LT(tokens, 250);
  }
  // Refused while draining or stopped (connection refused is UNAVAILABLE too).
  grpc::ClientContext ctx2;
  ctx2.set_deadline(In(std::chrono::seconds(10)));
  auto late = stub->Generate(&ctx2, Prompt("Once upon a time", 4));
  EXPECT_EQ(Drain(late.get()).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(ExitedCleanly(server.WaitExit(std::chrono::seconds(20)))) << server.log();
  EXPECT_TRUE(server.ProcessGroupGone()) << "no process of the server's group is left";
  EXPECT_NE(server.log().find("stopped"), std::string::npos) << server.log();
}

TEST(ServingProcessTest, RefusesUnsupportedFlags) {
  const auto tp = RunCommand({testing::StrataCli(), "serve", "--port", "0", "--tp", "0"},
                             std::chrono::seconds(120));
  EXPECT_EQ(tp.exit_code, 2);
  EXPECT_NE(tp.err.find("INVALID_ARGUMENT: --tp must be >= 1"), std::string::npos) << tp.err;
  const auto step = RunCommand({testing::StrataCli(), "serve", "--port", "0", "--tp", "2", "--worker-step-timeout", "0"},
                               std::chrono::seconds(120));
  EXPECT_EQ(step.exit_code, 2);
  EXPECT_NE(step.err.find("--worker-step-timeout and --worker-ready-timeout must be > 0"), std::string::npos)
      << step.err;
  // No GPU here (CI): the worker says why, the server exits 2 (on a GPU
  // machine this starts; tests/serving_gpu_test.cc covers it there).
  if (testing::RunCommand({"/bin/sh", "-c", "nvidia-smi -L"}, std::chrono::seconds(30)).exit_code != 0) {
    const auto cuda = RunCommand({testing::StrataCli(), "serve", "--host", "127.0.0.1", "--port", "0",
                                  "--model", testing::DataPath("models/stories15M"), "--device", "cuda",
                                  "--worker-binary", STRATA_WORKER_PATH},
                                 std::chrono::seconds(120));
    EXPECT_EQ(cuda.exit_code, 2);
    EXPECT_NE(cuda.err.find("--device cuda"), std::string::npos) << cuda.err;
  }
  const auto external = RunCommand({testing::StrataCli(), "serve", "--port", "0", "--external-workers", "--tp", "2"},
                                   std::chrono::seconds(120));
  EXPECT_EQ(external.exit_code, 2);
  EXPECT_NE(external.err.find("--control-plane-secret-file"), std::string::npos) << external.err;
  const auto dummy = RunCommand({testing::StrataCli(), "serve", "--port", "0", "--load-format", "dummy",
                                 "--model", "llama-2-7b"},
                                std::chrono::seconds(120));
  EXPECT_EQ(dummy.exit_code, 2);
  EXPECT_NE(dummy.err.find("--load-format dummy needs --tokenizer"), std::string::npos) << dummy.err;
  const auto shape = RunCommand({testing::StrataCli(), "serve", "--host", "127.0.0.1", "--port", "0",
                                 "--load-format", "dummy", "--model", "llama-9", "--tokenizer",
                                 testing::DataPath("models/stories15M")},
                                std::chrono::seconds(120));
  EXPECT_EQ(shape.exit_code, 2);
  EXPECT_NE(shape.err.find("llama-9"), std::string::npos) << shape.err;
  const auto dev = RunCommand({testing::StrataCli(), "serve", "--port", "0", "--device", "tpu"},
                              std::chrono::seconds(120));
  EXPECT_EQ(dev.exit_code, 2);
  EXPECT_NE(dev.err.find("--device"), std::string::npos) << dev.err;
  const auto model = RunCommand(
      {testing::StrataCli(), "serve", "--host", "127.0.0.1", "--port", "0", "--model", "/nonexistent"},
      std::chrono::seconds(120));
  EXPECT_EQ(model.exit_code, 2);
  EXPECT_NE(model.err.find("/nonexistent"), std::string::npos) << model.err;
}

TEST(ServingProcessTest, CliAndPythonClientsStream) {
  ServerProcess server;
  ASSERT_TRUE(server.Start(ServeArgs())) << server.log();
  const auto cli = RunCommand({testing::StrataCli(), "generate", "--server", server.address(),
                               "--prompt", "Once upon a time", "--max-tokens", "12"},
                              std::chrono::seconds(120));
  EXPECT_EQ(cli.exit_code, 0) << cli.err;
  EXPECT_EQ(cli.out, "Once upon a time, there was a little girl named Lily. She loved\n");
  EXPECT_NE(cli.err.find("FINISH_REASON_LENGTH"), std::string::npos) << cli.err;
  const auto info = RunCommand({testing::StrataCli(), "info", "--server", server.address()},
                               std::chrono::seconds(120));
  EXPECT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("\"kvCacheDtype\": \"fp32\""), std::string::npos) << info.out;
  const auto bad = RunCommand({testing::StrataCli(), "generate", "--server", server.address(),
                               "--max-tokens", "300"},
                              std::chrono::seconds(120));
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("INVALID_ARGUMENT: sampling.max_tokens"), std::string::npos) << bad.err;

  const char* python = "/usr/bin/python3";
  if (access(python, X_OK) != 0 ||
      RunCommand({python, "-c", "import grpc, grpc_tools"}, std::chrono::seconds(120)).exit_code != 0) {
    GTEST_SKIP() << "no grpcio for /usr/bin/python3";
  }
  const auto py = RunCommand({python, testing::StrataSourceDir() + "/examples/python_client.py", "--server",
                              server.address(), "--max-tokens", "12"},
                             std::chrono::seconds(90));
  EXPECT_EQ(py.exit_code, 0) << py.err;
  EXPECT_EQ(py.out, "Once upon a time, there was a little girl named Lily. She loved\n");
  server.Signal(SIGTERM);
  EXPECT_TRUE(ExitedCleanly(server.WaitExit(std::chrono::seconds(20)))) << server.log();
}

TEST(ServingProcessTest, Tls) {
  if (RunCommand({"/usr/bin/openssl", "version"}, std::chrono::seconds(10)).exit_code != 0) {
    GTEST_SKIP() << "no openssl to make a test certificate";
  }
  const std::string dir = testing::MakeTempDir();
  const auto gen = RunCommand({"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                               "-keyout", dir + "/key.pem", "-out", dir + "/cert.pem", "-days", "1",
                               "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"},
                              std::chrono::seconds(120));
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  ServerProcess server;
  ASSERT_TRUE(server.Start(ServeArgs({"--tls-cert-file", dir + "/cert.pem", "--tls-key-file",
                                      dir + "/key.pem"})))
      << server.log();
  std::ifstream in(dir + "/cert.pem");
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs.assign(std::istreambuf_iterator<char>(in), {});
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  auto tls = v1::Generation::NewStub(
      grpc::CreateCustomChannel(server.address(), grpc::SslCredentials(ssl), args));
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  auto reader = tls->Generate(&ctx, Prompt("Once upon a time", 4));
  int tokens = 0;
  const grpc::Status s = Drain(reader.get(), &tokens);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(tokens, 4);
  // A plaintext client cannot talk to it.
  auto plain = v1::Generation::NewStub(LoopbackChannel(server.address()));
  grpc::ClientContext ctx2;
  ctx2.set_deadline(In(std::chrono::seconds(5)));
  v1::ModelInfo info;
  EXPECT_FALSE(plain->GetModelInfo(&ctx2, {}, &info).ok());
  server.Signal(SIGTERM);
  EXPECT_TRUE(ExitedCleanly(server.WaitExit(std::chrono::seconds(20)))) << server.log();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace strata
