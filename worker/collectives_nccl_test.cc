// NCCL collectives between two processes on two GPUs, bootstrapped through
// the scheduler's Rendezvous service (gRPC, shared secret), as the workers do.
// Skips without two GPUs. Run by worker/tp_gpu_check.sh on a GPU machine.
//
// Each rank is a fresh process: the test forks and re-executes its own binary
// with the rank in the environment (CUDA and gRPC do not survive a plain
// fork), selecting the one test that runs the rank (NcclCollectivesChild).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <string>
#include <vector>

#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "scheduler/control_plane.h"
#include "worker/collectives_grpc_store.h"
#include "worker/collectives_nccl.h"

namespace strata {
namespace {

constexpr int kSkip = 77;
constexpr char kSecret[] = "nccl-test-secret";

#define CHILD_CHECK(cond, ...)                                \
  do {                                                        \
    if (!(cond)) {                                            \
      std::fprintf(stderr, "rank %d: ", rank);                \
      std::fprintf(stderr, __VA_ARGS__);                      \
      std::fprintf(stderr, " (%s:%d)\n", __FILE__, __LINE__); \
      return 1;                                               \
    }                                                         \
  } while (0)

// One rank; returns the process exit code. Scenario "basic": all-reduce
// (small and 256 MiB, with bus bandwidth), broadcast, barrier. Scenario
// "dead_peer": rank 1 leaves after one all-reduce; rank 0's next one must
// fail within the timeout instead of hanging.
int RankMain(int rank, const std::string& address, const std::string& scenario) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 2) return kSkip;
  GrpcKvStore store(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()), kSecret);
  CollectivesOptions o;
  o.rank = rank;
  o.world_size = 2;
  o.key_prefix = "nccl-test/" + scenario + "/";
  o.timeout = absl::Seconds(scenario == "dead_peer" ? 10 : 60);
  o.cuda_device = rank;
  auto c = CreateNcclCollectives(o, &store);
  CHILD_CHECK(c.ok(), "create: %s", c.status().ToString().c_str());
  NcclCollectives& nccl = **c;
  const int64_t n = 1000;
  std::vector<float> host(n);
  for (int64_t i = 0; i < n; ++i) host[i] = (rank + 1) * 1.0f + i;
  float* dev = nullptr;
  CHILD_CHECK(cudaMalloc(&dev, n * sizeof(float)) == cudaSuccess, "cudaMalloc");
  CHILD_CHECK(cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess, "copy");
  absl::Status s = nccl.AllReduceSum(dev, n);
  CHILD_CHECK(s.ok(), "allreduce: %s", s.ToString().c_str());
  s = nccl.Synchronize();
  CHILD_CHECK(s.ok(), "sync: %s", s.ToString().c_str());
  CHILD_CHECK(cudaMemcpy(host.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess, "copy");
  for (int64_t i = 0; i < n; ++i) CHILD_CHECK(host[i] == 3.0f + 2 * i, "sum[%ld] = %f", long(i), host[i]);

  if (scenario == "dead_peer") {
    if (rank == 1) return 0;  // leaves; its communicator goes away with the process
    const auto t0 = std::chrono::steady_clock::now();
    s = nccl.AllReduceSum(dev, n);
    if (s.ok()) s = nccl.Synchronize();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHILD_CHECK(!s.ok(), "an all-reduce without its peer succeeded");
    CHILD_CHECK(secs < 30, "the failure took %.1f s", secs);
    std::fprintf(stderr, "rank 0: dead peer detected after %.2f s: %s\n", secs, s.ToString().c_str());
    return 0;
  }

  // 16-bit all-reduce (fp16 and bf16 bit patterns of small integers: exact sums).
  for (bool bf16 : {false, true}) {
    std::vector<uint16_t> h16(n);
    auto bits = [&](float v) {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      if (bf16) return static_cast<uint16_t>(u >> 16);  // exact for these values
      const __half hv = __float2half(v);
      uint16_t r;
      std::memcpy(&r, &hv, 2);
      return r;
    };
    for (int64_t i = 0; i < n; ++i) h16[i] = bits(static_cast<float>((rank + 1) * (i % 64)));
    uint16_t* d16 = nullptr;
    CHILD_CHECK(cudaMalloc(&d16, n * 2) == cudaSuccess, "cudaMalloc");
    CHILD_CHECK(cudaMemcpy(d16, h16.data(), n * 2, cudaMemcpyHostToDevice) == cudaSuccess, "copy");
    s = nccl.AllReduceSumHalf(d16, n, bf16);
    CHILD_CHECK(s.ok(), "allreduce half: %s", s.ToString().c_str());
    s = nccl.Synchronize();
    CHILD_CHECK(s.ok(), "sync: %s", s.ToString().c_str());
    CHILD_CHECK(cudaMemcpy(h16.data(), d16, n * 2, cudaMemcpyDeviceToHost) == cudaSuccess, "copy");
    for (int64_t i = 0; i < n; ++i) {
      CHILD_CHECK(h16[i] == bits(static_cast<float>(3 * (i % 64))), "%s sum[%ld]", bf16 ? "bf16" : "fp16",
                  long(i));
    }
    cudaFree(d16);
  }

  int32_t* b = nullptr;
  CHILD_CHECK(cudaMalloc(&b, 4 * sizeof(int32_t)) == cudaSuccess, "cudaMalloc");
  std::vector<int32_t> hb(4, rank == 1 ? 42 : -1);
  CHILD_CHECK(cudaMemcpy(b, hb.data(), 16, cudaMemcpyHostToDevice) == cudaSuccess, "copy");
  s = nccl.Broadcast(b, 16, 1);
  CHILD_CHECK(s.ok(), "broadcast: %s", s.ToString().c_str());
  s = nccl.Barrier();
  CHILD_CHECK(s.ok(), "barrier: %s", s.ToString().c_str());
  CHILD_CHECK(cudaMemcpy(hb.data(), b, 16, cudaMemcpyDeviceToHost) == cudaSuccess, "copy");
  CHILD_CHECK(hb == std::vector<int32_t>(4, 42), "broadcast result %d", hb[0]);

  // Bandwidth: 256 MiB, as in shared/BUILD-NOTES.md (~286 GB/s bus on H100 NVLink).
  const int64_t big = int64_t{64} << 20;
  float* buf = nullptr;
  CHILD_CHECK(cudaMalloc(&buf, big * sizeof(float)) == cudaSuccess, "cudaMalloc big");
  CHILD_CHECK(cudaMemset(buf, 0, big * sizeof(float)) == cudaSuccess, "memset");
  for (int warm = 0; warm < 3; ++warm) CHILD_CHECK(nccl.AllReduceSum(buf, big).ok(), "warmup");
  CHILD_CHECK(nccl.Synchronize().ok(), "sync");
  const int iters = 10;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) CHILD_CHECK(nccl.AllReduceSum(buf, big).ok(), "allreduce big");
  CHILD_CHECK(nccl.Synchronize().ok(), "sync");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
  // Bus bandwidth of an all-reduce: 2 (n-1)/n * bytes / time.
  if (rank == 0) {
    std::fprintf(stderr, "rank 0: all-reduce 256 MiB: %.3f ms, bus bandwidth %.1f GB/s\n", secs * 1e3,
                 2.0 * 0.5 * big * sizeof(float) / secs / 1e9);
  }
  return 0;
}

// Child mode: RunTwoRanks re-executes this binary with the rank in the
// environment and only this test selected. (A test rather than a static
// initializer running before main(): the CUDA kernels of linked static
// libraries are registered by static initializers too, in no defined order,
// so a rank that launched one of them from a static initializer could find
// it unregistered.)
TEST(NcclCollectivesChild, RunsOneRank) {
  const char* rank = std::getenv("STRATA_NCCL_TEST_RANK");
  const char* addr = std::getenv("STRATA_NCCL_TEST_ADDRESS");
  const char* scenario = std::getenv("STRATA_NCCL_TEST_SCENARIO");
  if (rank == nullptr || addr == nullptr || scenario == nullptr) {
    GTEST_SKIP() << "runs only in the rank processes the other tests start";
  }
  std::fflush(stdout);
  ::_exit(RankMain(std::atoi(rank), addr, scenario));
}

// Starts the rendezvous, runs the two ranks, returns their exit codes.
std::vector<int> RunTwoRanks(const std::string& scenario) {
  ControlPlaneOptions co;
  co.secret = kSecret;
  co.world_size = 2;
  auto cp = ControlPlane::Start(co);
  if (!cp.ok()) return {};
  // Everything the children need is built before fork.
  std::vector<std::vector<std::string>> env(2);
  std::vector<std::vector<char*>> envp(2);
  for (int r = 0; r < 2; ++r) {
    for (char** e = environ; *e != nullptr; ++e) env[r].push_back(*e);
    env[r].push_back("STRATA_NCCL_TEST_RANK=" + std::to_string(r));
    env[r].push_back("STRATA_NCCL_TEST_ADDRESS=" + (*cp)->address());
    env[r].push_back("STRATA_NCCL_TEST_SCENARIO=" + scenario);
    env[r].push_back("NCCL_NVLS_ENABLE=0");  // no NVLink multicast on shared hosts
    for (auto& v : env[r]) envp[r].push_back(v.data());
    envp[r].push_back(nullptr);
  }
  char self[] = "/proc/self/exe";
  char filter[] = "--gtest_filter=NcclCollectivesChild.RunsOneRank";
  char* argv[] = {self, filter, nullptr};
  pid_t pids[2];
  for (int r = 0; r < 2; ++r) {
    pids[r] = ::fork();
    if (pids[r] == 0) {
      ::execve(self, argv, envp[r].data());
      ::_exit(127);
    }
  }
  std::vector<int> codes(2, -1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(180);
  for (int r = 0; r < 2; ++r) {
    int st = 0;
    pid_t w = 0;
    while ((w = ::waitpid(pids[r], &st, WNOHANG)) == 0 && std::chrono::steady_clock::now() < deadline) {
      ::usleep(20000);
    }
    if (w == 0) {
      ::kill(pids[r], SIGKILL);
      ::waitpid(pids[r], &st, 0);
    }
    codes[r] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  return codes;
}

TEST(NcclCollectives, TwoGpusAllReduceBroadcastBarrier) {
  const std::vector<int> codes = RunTwoRanks("basic");
  ASSERT_EQ(codes.size(), 2u);
  if (codes[0] == kSkip || codes[1] == kSkip) GTEST_SKIP() << "needs 2 GPUs";
  EXPECT_EQ(codes[0], 0);
  EXPECT_EQ(codes[1], 0);
}

TEST(NcclCollectives, DeadPeerFailsWithinTheTimeout) {
  const std::vector<int> codes = RunTwoRanks("dead_peer");
  ASSERT_EQ(codes.size(), 2u);
  if (codes[0] == kSkip || codes[1] == kSkip) GTEST_SKIP() << "needs 2 GPUs";
  EXPECT_EQ(codes[0], 0);
  EXPECT_EQ(codes[1], 0);
}

}  // namespace
}  // namespace strata
