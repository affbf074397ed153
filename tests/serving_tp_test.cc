// `strata serve --tp 2`: the server starts two strata-worker processes
// (WorkerPool + RemoteEngine) and serves through them. Greedy outputs match
// the golden reference, cancellation frees blocks, a killed worker turns
// into UNAVAILABLE (and NOT_SERVING) rather than a hang, and SIGTERM leaves
// neither the server nor any worker behind.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>

#include <thread>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "proto/strata_v1_generation.grpc.pb.h"
#include "tests/serving_rpc_helpers.h"
#include "tests/serving_test_util.h"
#include "tests/test_data.h"

namespace strata {
namespace {

using testing::FromIds;
using testing::In;
using testing::Info;
using testing::LoopbackChannel;
using testing::ServerProcess;
using testing::StopAndCheckNoProcessLeft;

bool StartTp2(ServerProcess* server) {
  return server->Start({"--model", testing::DataPath("models/stories15M"), "--tp", "2",
                        "--worker-binary", STRATA_WORKER_PATH, "--kv-cache-memory", "0.125",
                        // Small step budget: prompts are prefilled in chunks, and
                        // steps of chunks alone sample nothing.
                        "--max-num-batched-tokens", "24",
                        "--swap-space", "0.0625", "--shutdown-grace", "2"});
}

TEST(ServingTpTest, GreedyGoldenCancellationAndCleanShutdown) {
  ServerProcess server;
  ASSERT_TRUE(StartTp2(&server)) << server.log();
  const std::vector<pid_t> workers = testing::ChildPids(server.pid());
  ASSERT_EQ(workers.size(), 2u) << "two strata-worker children";
  auto stub = v1::Generation::NewStub(LoopbackChannel(server.address()));
  {
    const v1::ModelInfo info = Info(stub.get());
    EXPECT_EQ(info.tp_size(), 2);
    EXPECT_EQ(info.kv_cache_dtype(), "fp32");
    EXPECT_GT(info.gpu_blocks().total(), 0);
  }

  const nlohmann::json golden = testing::LoadJson("golden/stories15M_greedy.json");
  std::vector<nlohmann::json> cases;
  for (const auto& c : golden["cases"]) {
    const std::string id = c["id"];
    if (id == "once_upon_a_time" || id == "lily_and_tom" || id == "dialogue_long" ||
        id == "unicode_byte_fallback") {
      cases.push_back(c);
    }
  }
  ASSERT_EQ(cases.size(), 4u);
  const testing::GoldenRun run =
      testing::GenerateAllAtOnce(stub.get(), cases, std::chrono::seconds(300));
  const auto& got = run.tokens;
  const auto& status = run.status;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string id = cases[i]["id"];
    ASSERT_TRUE(status[i].ok()) << id << ": " << status[i].error_message();
    const auto expected = cases[i]["output_ids_ignore_bos"].get<std::vector<int32_t>>();
    const size_t prompt_len = cases[i]["prompt_ids"].size();
    const size_t n = std::min<size_t>(cases[i]["stable_prefix_len"]["margin_1e-3"].get<size_t>(),
                                      256 - prompt_len);
    ASSERT_EQ(got[i].size(), 256 - prompt_len) << id;
    for (size_t k = 0; k < n; ++k) ASSERT_EQ(got[i][k], expected[k]) << id << " token " << k;
  }

  // Alone, the longest prompt (43 tokens) takes two steps of chunked prefill,
  // the first of which samples nothing; the output still matches.
  {
    const nlohmann::json& c = cases[2];
    ASSERT_EQ(c["id"], "dialogue_long");
    const auto prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    ASSERT_GT(prompt.size(), 24u);
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(120)));
    v1::GenerateResponse all;
    ASSERT_TRUE(stub->GenerateUnary(&ctx, FromIds(prompt, 16), &all).ok());
    const auto expected = c["output_ids_ignore_bos"].get<std::vector<int32_t>>();
    ASSERT_EQ(all.token_ids_size(), 16);
    for (int k = 0; k < 16; ++k) EXPECT_EQ(all.token_ids(k), expected[k]) << "token " << k;
  }

  // Cancellation frees the blocks (on every rank: the scheduler's tables are
  // the ranks' tables).
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(120)));
    auto reader = stub->Generate(&ctx, FromIds(cases[1]["prompt_ids"], 240));
    v1::GenerateResponse m;
    int tokens = 0;
    while (tokens < 40 && reader->Read(&m)) tokens += m.token_ids_size();
    ASSERT_GE(tokens, 40);
    EXPECT_GE(Info(stub.get()).gpu_blocks().used(), 3);
    ctx.TryCancel();
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  v1::ModelInfo info = Info(stub.get());
  while (info.gpu_blocks().used() != 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    info = Info(stub.get());
  }
  EXPECT_EQ(info.gpu_blocks().used(), 0);
  EXPECT_EQ(info.num_running(), 0);

  StopAndCheckNoProcessLeft(&server, workers);
}

TEST(ServingTpTest, LostWorkerIsUnavailableNotAHang) {
  ServerProcess server;
  ASSERT_TRUE(StartTp2(&server)) << server.log();
  const std::vector<pid_t> workers = testing::ChildPids(server.pid());
  ASSERT_EQ(workers.size(), 2u);
  auto channel = LoopbackChannel(server.address());
  auto stub = v1::Generation::NewStub(channel);

  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  v1::GenerateRequest req;
  req.set_text("Once upon a time");
  req.mutable_sampling()->set_ignore_eos(true);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m));
  kill(workers[1], SIGKILL);
  while (reader->Read(&m)) {
  }
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  // New requests fail fast with UNAVAILABLE; health turns NOT_SERVING.
  grpc::ClientContext ctx2;
  ctx2.set_deadline(In(std::chrono::seconds(60)));
  req.mutable_sampling()->set_max_tokens(4);
  auto again = stub->Generate(&ctx2, req);
  while (again->Read(&m)) {
  }
  EXPECT_EQ(again->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  int health = testing::HealthStatus(channel.get(), "strata.v1.Generation");
  while (health != 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    health = testing::HealthStatus(channel.get(), "strata.v1.Generation");
  }
  EXPECT_EQ(health, 2) << "NOT_SERVING";

  StopAndCheckNoProcessLeft(&server, workers);
}

// A free TCP port on loopback (bound, read, released).
int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  ::close(fd);
  return port;
}

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) ::dup2(fd, 1), ::dup2(fd, 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Kubernetes layout: the scheduler spawns nothing; two strata-worker
// processes started on their own dial its control plane with the shared
// secret. Same golden tokens; a worker with the wrong secret is refused
// (exit 3); SIGTERM on the scheduler makes the workers exit cleanly.
TEST(ServingTpTest, ExternalWorkersDialTheScheduler) {
  const std::string dir = testing::MakeTempDir();
  const std::string secret = dir + "/secret";
  {
    std::ofstream(secret) << "s3cret-for-the-test\n";
    ::chmod(secret.c_str(), 0600);
    std::ofstream(dir + "/wrong") << "not-the-secret\n";
    ::chmod((dir + "/wrong").c_str(), 0600);
  }
  const int port = FreePort();
  ASSERT_GT(port, 0);
  const std::string address = "127.0.0.1:" + std::to_string(port);
  std::vector<pid_t> workers;
  for (int r = 0; r < 2; ++r) {
    workers.push_back(Spawn({STRATA_WORKER_PATH, "--rank", std::to_string(r), "--world-size", "2",
                             "--scheduler", address, "--secret-file", secret, "--kv-cache-memory",
                             "128MiB", "--threads", "1", "--connect-timeout", "60"},
                            dir + "/worker" + std::to_string(r) + ".log"));
  }
  ServerProcess server;
  ASSERT_TRUE(server.Start({"--model", testing::DataPath("models/stories15M"), "--tp", "2", "--external-workers",
                            "--control-plane-address", address, "--control-plane-secret-file", secret,
                            "--shutdown-grace", "2"}))
      << server.log() << ReadAll(dir + "/worker0.log");
  EXPECT_TRUE(testing::ChildPids(server.pid()).empty()) << "nothing spawned";
  auto stub = v1::Generation::NewStub(LoopbackChannel(server.address()));
  EXPECT_EQ(Info(stub.get()).tp_size(), 2);

  const nlohmann::json golden = testing::LoadJson("golden/stories15M_greedy.json");
  const nlohmann::json& c = golden["cases"][0];
  const auto prompt = c["prompt_ids"].get<std::vector<int32_t>>();
  const auto expected = c["output_ids_ignore_bos"].get<std::vector<int32_t>>();
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  v1::GenerateResponse all;
  ASSERT_TRUE(stub->GenerateUnary(&ctx, FromIds(prompt, 32), &all).ok());
  ASSERT_EQ(all.token_ids_size(), 32);
  for (int k = 0; k < 32; ++k) EXPECT_EQ(all.token_ids(k), expected[k]) << "token " << k;

  // A third process with the wrong secret is refused.
  const pid_t intruder = Spawn({STRATA_WORKER_PATH, "--rank", "0", "--world-size", "2", "--scheduler", address,
                                "--secret-file", dir + "/wrong", "--connect-timeout", "10"},
                               dir + "/intruder.log");
  int ws = 0;
  ASSERT_EQ(::waitpid(intruder, &ws, 0), intruder);
  EXPECT_TRUE(WIFEXITED(ws) && WEXITSTATUS(ws) == 3) << ReadAll(dir + "/intruder.log");

  server.Signal(SIGTERM);
  const int status = server.WaitExit(std::chrono::seconds(30));
  EXPECT_TRUE(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0) << server.log();
  for (pid_t w : workers) {
    int wst = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    pid_t got = 0;
    while ((got = ::waitpid(w, &wst, WNOHANG)) == 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (got != w) ::kill(w, SIGKILL), ::waitpid(w, &wst, 0);
    EXPECT_EQ(got, w) << "worker " << w << " did not exit after the scheduler stopped";
    EXPECT_TRUE(WIFEXITED(wst) && WEXITSTATUS(wst) == 0) << "worker exit status " << wst;
  }
}

}  // namespace
}  // namespace strata
