// Gloo collectives between threads of one process over loopback TCP, with
// rendezvous through the in-memory store and through the scheduler's real
// Rendezvous service (gRPC, shared secret). A dead peer must turn into an
// error within the timeout, never a hang.
#include "worker/collectives.h"

#include <thread>

#include "gtest/gtest.h"
#include "grpcpp/create_channel.h"
#include "scheduler/control_plane.h"
#include "worker/collectives_gloo.h"
#include "worker/collectives_grpc_store.h"

namespace strata {
namespace {

// Runs fn(rank, collectives) on `n` threads; returns each rank's status.
std::vector<absl::Status> RunRanks(int n, const std::function<KvStore*(int)>& store_for,
                                   const std::function<absl::Status(int, Collectives&)>& fn,
                                   absl::Duration timeout = absl::Seconds(20)) {
  std::vector<absl::Status> status(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      CollectivesOptions o;
      o.rank = r;
      o.world_size = n;
      o.key_prefix = "test/";
      o.timeout = timeout;
      auto c = CreateGlooCollectives(o, store_for(r));
      status[r] = c.ok() ? fn(r, **c) : c.status();
    });
  }
  for (auto& t : threads) t.join();
  return status;
}

TEST(InMemoryKvStore, WaitsAndTimesOut) {
  InMemoryKvStore s;
  EXPECT_EQ(s.Get("a", absl::Milliseconds(20)).status().code(), absl::StatusCode::kDeadlineExceeded);
  std::thread t([&] {
    absl::SleepFor(absl::Milliseconds(50));
    ASSERT_TRUE(s.Set("a", "x").ok());
  });
  auto v = s.Get("a", absl::Seconds(5));
  t.join();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, "x");
}

class GlooCollectivesTest : public ::testing::TestWithParam<int> {};

TEST_P(GlooCollectivesTest, AllReduceBroadcastBarrier) {
  const int n = GetParam();
  InMemoryKvStore store;
  std::vector<std::vector<float>> results(n);
  auto status = RunRanks(n, [&](int) { return &store; }, [&](int r, Collectives& c) -> absl::Status {
    EXPECT_EQ(c.rank(), r);
    EXPECT_EQ(c.world_size(), n);
    // Several sizes: the exchange path (up to 4 MiB) and Gloo's ring (above).
    for (int64_t len : {1, 7, 1000, 300000, 1200000}) {
      std::vector<float> v(len);
      for (int64_t i = 0; i < len; ++i) v[i] = 0.1f * (r + 1) + 1e-3f * (i % 97);
      absl::Status s = c.AllReduceSum(v.data(), len);
      if (!s.ok()) return s;
      for (int64_t i = 0; i < len; ++i) {
        float want = 0.0f;
        for (int k = 0; k < n; ++k) want += 0.1f * (k + 1) + 1e-3f * (i % 97);
        if (std::fabs(v[i] - want) > 1e-5f) return absl::InternalError("wrong sum");
      }
      if (len >= 300000) results[r].insert(results[r].end(), v.begin(), v.end());
    }
    std::vector<int32_t> b(5, r == n - 1 ? 42 : -1);
    absl::Status s = c.Broadcast(b.data(), b.size() * sizeof(int32_t), n - 1);
    if (!s.ok()) return s;
    if (b != std::vector<int32_t>(5, 42)) return absl::InternalError("wrong broadcast");
    return c.Barrier();
  });
  for (int r = 0; r < n; ++r) ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r];
  // Every rank holds the same bits, so replicated state stays identical.
  for (int r = 1; r < n; ++r) EXPECT_EQ(std::memcmp(results[r].data(), results[0].data(), 4 * results[0].size()), 0);
}

INSTANTIATE_TEST_SUITE_P(Ranks, GlooCollectivesTest, ::testing::Values(2, 3));

TEST(GlooCollectives, DeadPeerIsAnErrorNotAHang) {
  InMemoryKvStore store;
  const absl::Time start = absl::Now();
  auto status = RunRanks(2, [&](int) { return &store; }, [&](int r, Collectives& c) -> absl::Status {
    float x = 1.0f;
    absl::Status s = c.AllReduceSum(&x, 1);
    if (!s.ok()) return s;
    if (r == 1) return absl::OkStatus();  // leaves: its context (and sockets) go away
    absl::SleepFor(absl::Milliseconds(200));
    return c.AllReduceSum(&x, 1);
  }, absl::Seconds(3));
  EXPECT_TRUE(status[1].ok()) << status[1];
  EXPECT_EQ(status[0].code(), absl::StatusCode::kUnavailable) << status[0];
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

TEST(GlooCollectives, RendezvousThroughTheControlPlane) {
  ControlPlaneOptions o;
  o.secret = "s3cret";
  o.world_size = 2;
  auto cp = ControlPlane::Start(o);
  ASSERT_TRUE(cp.ok()) << cp.status();
  auto channel = grpc::CreateChannel((*cp)->address(), grpc::InsecureChannelCredentials());
  GrpcKvStore good(channel, "s3cret"), bad(channel, "wrong"), none(channel, "");
  EXPECT_EQ(bad.Set("k", "v").code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(none.Wait({"k"}, absl::Milliseconds(10)).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(good.Wait({"missing"}, absl::Milliseconds(50)).code(), absl::StatusCode::kDeadlineExceeded);
  auto status = RunRanks(2, [&](int) { return &good; }, [&](int r, Collectives& c) -> absl::Status {
    float x = static_cast<float>(r + 1);
    absl::Status s = c.AllReduceSum(&x, 1);
    if (s.ok() && x != 3.0f) return absl::InternalError("wrong sum");
    return s;
  });
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r];
  EXPECT_TRUE((*cp)->StoreValue("test/gloo/rank_0").has_value() ||
              (*cp)->StoreValue("test/gloo/0").has_value())
      << "Gloo's keys should be in the scheduler's store";
}

}  // namespace
}  // namespace strata
