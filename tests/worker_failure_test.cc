// Worker failures with real strata-worker processes over loopback: a worker
// killed or hung during generation makes the in-flight step fail with
// UNAVAILABLE within seconds, the pool reports unhealthy, nothing hangs, and
// no process outlives the pool. Also: startup failures are reported fast and
// by name, and the control plane rejects callers without the secret.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/worker.grpc.pb.h"
#include "scheduler/engine_loop.h"
#include "scheduler/worker_pool.h"
#include "tests/test_data.h"
#include "worker/worker_service.h"

namespace strata {
namespace {

WorkerPoolOptions PoolOptions() {
  WorkerPoolOptions o;
  o.worker_binary = STRATA_WORKER_BINARY;
  o.engine.world_size = 2;
  o.engine.model_path = testing::DataPath("models/stories15M");
  o.engine.kv_format = {KvDtype::kFp32, KvScaleMode::kNone};
  o.engine.step_timeout = absl::Seconds(20);
  o.engine.collective_timeout = absl::Seconds(20);
  o.num_kv_blocks = 128;
  o.num_swap_blocks = 0;
  o.threads_per_worker = 1;
  o.shutdown_grace = absl::Seconds(2);
  return o;
}

struct Generation {
  std::unique_ptr<EngineLoop> loop;
  std::map<int64_t, int> tokens;  // per request
  std::set<int64_t> finished;
};

// Starts the 8 golden prompts.
void StartGeneration(RemoteEngine* engine, Generation* g) {
  SchedulerOptions so;
  so.max_num_seqs = 8;
  so.max_model_len = 256;
  so.blocks.num_gpu_blocks = engine->options().num_gpu_blocks;
  so.blocks.block_size = engine->options().block_size;
  so.blocks.bytes_per_block = engine->kv_bytes_per_block();
  LoopCallbacks cb;
  cb.on_token = [g](RequestId r, int32_t, const StepOutput::Sampled*) { g->tokens[r.value()]++; };
  cb.on_finish = [g](const FinishedSeq& f) { g->finished.insert(f.request_id.value()); };
  auto loop = EngineLoop::Create(engine, so, cb);
  ASSERT_TRUE(loop.ok()) << loop.status();
  g->loop = std::move(*loop);
  const nlohmann::json golden = testing::LoadJson("golden/stories15M_greedy.json");
  int64_t i = 0;
  for (const auto& c : golden["cases"]) {
    LoopRequest r;
    r.request_id = RequestId(i++);
    r.prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    r.max_tokens = 200;
    ASSERT_TRUE(g->loop->AddRequest(r).ok());
  }
  for (int s = 0; s < 10; ++s) ASSERT_TRUE(g->loop->Step().ok()) << "step " << s;
  ASSERT_FALSE(g->tokens.empty());
}

// Steps until a step fails (the failure under test); returns its status and
// how long it took from `since`.
absl::Status StepUntilFailure(Generation* g, absl::Time since, absl::Duration* took) {
  absl::Status s;
  while (g->loop->HasWork() && s.ok() && absl::Now() - since < absl::Seconds(60)) s = g->loop->Step();
  *took = absl::Now() - since;
  return s;
}

bool ProcessGone(pid_t pid) { return ::kill(pid, 0) == -1 && errno == ESRCH; }

void ExpectNoChildren() {
  int st = 0;
  errno = 0;
  EXPECT_EQ(::waitpid(-1, &st, WNOHANG), -1) << "a child process was left behind";
  EXPECT_EQ(errno, ECHILD);
}

TEST(WorkerFailure, KilledWorkerFailsStepWithUnavailable) {
  auto pool = WorkerPool::Start(PoolOptions());
  ASSERT_TRUE(pool.ok()) << pool.status();
  const std::vector<pid_t> pids = (*pool)->pids();
  auto engine = (*pool)->WaitReady(absl::Seconds(60));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Generation g;
  ASSERT_NO_FATAL_FAILURE(StartGeneration(*engine, &g));

  const absl::Time killed = absl::Now();
  ASSERT_EQ(::kill(pids[1], SIGKILL), 0);
  absl::Duration took;
  const absl::Status s = StepUntilFailure(&g, killed, &took);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("rank 1"), absl::string_view::npos) << s;
  EXPECT_LT(took, absl::Seconds(5)) << "failure detected after " << absl::FormatDuration(took);
  std::printf("[ info     ] killed worker detected after %s: %s\n", absl::FormatDuration(took).c_str(),
              s.ToString().c_str());
  // Unfinished requests: later steps fail at once with the same status.
  EXPECT_LT(g.finished.size(), 8u);
  if (g.loop->HasWork()) {
    const absl::Time t = absl::Now();
    EXPECT_EQ(g.loop->Step().code(), absl::StatusCode::kUnavailable);
    EXPECT_LT(absl::Now() - t, absl::Milliseconds(100));
  }
  const PoolHealth h = (*pool)->Health();
  EXPECT_EQ(h.status.code(), absl::StatusCode::kUnavailable) << h.status;
  // The surviving rank notices (its collective and its stream break) and
  // exits by itself, before any kill.
  const absl::Time wait_until = absl::Now() + absl::Seconds(10);
  bool rank0_exited = false;
  while (!rank0_exited && absl::Now() < wait_until) {
    for (const auto& w : (*pool)->Health().workers) rank0_exited |= w.rank == 0 && !w.running;
    if (!rank0_exited) absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(rank0_exited) << "rank 0 kept running after its peer died";
  (*pool)->Shutdown();
  for (pid_t p : pids) EXPECT_TRUE(ProcessGone(p)) << "pid " << p;
  ExpectNoChildren();
}

TEST(WorkerFailure, HungWorkerHitsTheStepDeadline) {
  WorkerPoolOptions o = PoolOptions();
  o.engine.step_timeout = absl::Seconds(3);
  o.engine.collective_timeout = absl::Seconds(5);
  auto pool = WorkerPool::Start(o);
  ASSERT_TRUE(pool.ok()) << pool.status();
  const std::vector<pid_t> pids = (*pool)->pids();
  auto engine = (*pool)->WaitReady(absl::Seconds(60));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Generation g;
  ASSERT_NO_FATAL_FAILURE(StartGeneration(*engine, &g));

  const absl::Time stopped = absl::Now();
  ASSERT_EQ(::kill(pids[1], SIGSTOP), 0);
  absl::Duration took;
  const absl::Status s = StepUntilFailure(&g, stopped, &took);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("did not finish step"), absl::string_view::npos) << s;
  EXPECT_LT(took, absl::Seconds(8)) << absl::FormatDuration(took);
  std::printf("[ info     ] hung worker detected after %s: %s\n", absl::FormatDuration(took).c_str(),
              s.ToString().c_str());
  EXPECT_FALSE((*pool)->Health().status.ok());
  const absl::Time t = absl::Now();
  (*pool)->Shutdown();  // SIGKILL reaches a stopped process
  EXPECT_LT(absl::Now() - t, absl::Seconds(10));
  for (pid_t p : pids) EXPECT_TRUE(ProcessGone(p)) << "pid " << p;
  ExpectNoChildren();
}

// A worker busy in one long step (a long CPU prefill, a slow load) keeps
// answering the control plane's keepalive pings: its session reads on another
// thread. Here the keepalive is 0.5 s with a 0.5 s timeout and rank 1's first
// step takes 3 s; without that reader the scheduler dropped the rank
// ("closed its control stream") after about keepalive time + timeout.
TEST(WorkerFailure, BusyWorkerKeepsItsControlStream) {
  WorkerPoolOptions o = PoolOptions();
  o.keepalive_time = absl::Milliseconds(500);
  o.keepalive_timeout = absl::Milliseconds(500);
  o.extra_args = {{}, {"--fault-slow-first-step", "3000"}};
  auto pool = WorkerPool::Start(o);
  ASSERT_TRUE(pool.ok()) << pool.status();
  auto engine = (*pool)->WaitReady(absl::Seconds(60));
  ASSERT_TRUE(engine.ok()) << engine.status();
  const absl::Time t0 = absl::Now();
  Generation g;
  ASSERT_NO_FATAL_FAILURE(StartGeneration(*engine, &g));  // its first step is the slow one
  EXPECT_GE(absl::Now() - t0, absl::Seconds(3)) << "the fault did not slow the first step";
  absl::Status s;
  while (g.loop->HasWork() && s.ok()) s = g.loop->Step();
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(g.finished.size(), 8u);
  EXPECT_TRUE((*pool)->Health().status.ok()) << (*pool)->Health().status;
  (*pool)->Shutdown();
  ExpectNoChildren();
}

TEST(WorkerFailure, StartupFailuresAreFastAndNamed) {
  {
    // Rank 1 exits on a bad flag before registering.
    WorkerPoolOptions o = PoolOptions();
    o.extra_args = {{}, {"--no-such-flag"}};
    auto pool = WorkerPool::Start(o);
    ASSERT_TRUE(pool.ok()) << pool.status();
    const absl::Time t = absl::Now();
    auto engine = (*pool)->WaitReady(absl::Seconds(60));
    EXPECT_FALSE(engine.ok());
    EXPECT_NE(engine.status().message().find("rank 1"), absl::string_view::npos) << engine.status();
    EXPECT_NE(engine.status().message().find("exited with status 2"), absl::string_view::npos)
        << engine.status();
    EXPECT_LT(absl::Now() - t, absl::Seconds(10));
  }
  {
    // A model path that does not exist: every worker reports it in Ready.
    WorkerPoolOptions o = PoolOptions();
    o.engine.model_path = "/nonexistent/model";
    auto pool = WorkerPool::Start(o);
    ASSERT_TRUE(pool.ok()) << pool.status();
    auto engine = (*pool)->WaitReady(absl::Seconds(60));
    EXPECT_EQ(engine.status().code(), absl::StatusCode::kNotFound) << engine.status();
    EXPECT_NE(engine.status().message().find("/nonexistent/model"), absl::string_view::npos);
  }
  ExpectNoChildren();
}

TEST(WorkerPoolApi, FindsTheWorkerBinaryInTheBuildTree) {
  // This test binary is build/scheduler/<name>; the worker build/worker/strata-worker.
  EXPECT_EQ(std::filesystem::canonical(FindWorkerBinary()), std::filesystem::canonical(STRATA_WORKER_BINARY));
}

TEST(WorkerFailure, ControlPlaneRequiresTheSecret) {
  ControlPlaneOptions co;
  co.secret = "right-secret";
  co.world_size = 1;
  auto cp = ControlPlane::Start(co);
  ASSERT_TRUE(cp.ok()) << cp.status();
  EXPECT_EQ((*cp)->address().rfind("127.0.0.1:", 0), 0u) << "loopback by default";
  auto channel = grpc::CreateChannel((*cp)->address(), grpc::InsecureChannelCredentials());
  auto stub = worker::v1::WorkerControl::NewStub(channel);
  for (const char* secret : {"", "wrong-secret", "right-secre"}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (*secret) ctx.AddMetadata(kSecretMetadataKey, secret);
    auto stream = stub->Connect(&ctx);
    worker::v1::WorkerMessage hello;
    hello.mutable_hello()->set_protocol_version(kWorkerProtocolVersion);
    hello.mutable_hello()->set_world_size(1);
    stream->Write(hello);
    worker::v1::SchedulerMessage m;
    EXPECT_FALSE(stream->Read(&m));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED) << "secret '" << secret << "'";
  }
  // A real worker with the wrong secret exits with status 3.
  char dir[] = "/tmp/strata-secret-test-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string file = std::string(dir) + "/secret";
  std::ofstream(file) << "wrong-secret\n";
  ::chmod(file.c_str(), 0600);
  const std::string addr = (*cp)->address();  // built before fork: the child may not allocate
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::execl(STRATA_WORKER_BINARY, STRATA_WORKER_BINARY, "--rank", "0", "--world-size", "1", "--scheduler",
            addr.c_str(), "--secret-file", file.c_str(), "--connect-timeout", "10", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int st = 0;
  const absl::Time limit = absl::Now() + absl::Seconds(20);
  pid_t r = 0;
  while ((r = ::waitpid(pid, &st, WNOHANG)) == 0 && absl::Now() < limit) absl::SleepFor(absl::Milliseconds(20));
  if (r == 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &st, 0);
    FAIL() << "the worker with a wrong secret did not exit";
  }
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 3) << "wait status " << st;
  std::remove(file.c_str());
  ::rmdir(dir);
}

}  // namespace
}  // namespace strata
