#include "runtime/block_pool.h"

#include <functional>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

std::vector<int32_t> Tok(int32_t first, int n) {
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = first + i;
  return t;
}

// A pool plus the references a test holds, so that the expected refcounts for
// CheckInvariants can be computed from what the test owns.
struct Env {
  explicit Env(int n, BlockFault fault = {}) : pool(Device::kGpu, n, 4, fault) {}
  BlockPool pool;
  std::vector<BlockRef> refs;
  std::vector<int32_t> ExpectedRefs() const {
    std::vector<int32_t> e(pool.num_blocks(), 0);
    for (const BlockRef& r : refs)
      if (r.valid()) ++e[r.id().value()];
    return e;
  }
  absl::Status Check() const { return pool.CheckInvariants(ExpectedRefs()); }
  void Hash(int i, BlockHash h) {
    ASSERT_TRUE(pool.Register(refs[i].id(), h, 0, Tok(static_cast<int32_t>(h), 4)));
  }
};

struct TransitionCase {
  std::string name;
  std::function<void(Env&)> run;  // leaves the block under test as block 0
  BlockState want_state;
  int want_refcount;
  int want_free, want_cached, want_pinned;
};

TEST(BlockPoolTest, EveryTransitionTableDriven) {
  const std::vector<TransitionCase> cases = {
      {"free -> active (allocate)", [](Env& e) { e.refs.push_back(e.pool.Allocate()); },
       BlockState::kActive, 1, 2, 0, 0},
      {"active -> active (acquire)",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.refs.push_back(e.pool.Acquire(e.refs[0].id()));
       },
       BlockState::kActive, 2, 2, 0, 0},
      {"active -> active (release one of two sharers)",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.refs.push_back(e.pool.Acquire(e.refs[0].id()));
         e.refs.pop_back();
       },
       BlockState::kActive, 1, 2, 0, 0},
      {"active -> free (last release, no hash)",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.refs.clear();
       },
       BlockState::kFree, 0, 3, 0, 0},
      {"active -> cached (last release, hashed)",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.Hash(0, 7);
         e.refs.clear();
       },
       BlockState::kCached, 0, 2, 1, 0},
      {"cached -> active (prefix hit)",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.Hash(0, 7);
         e.refs.clear();
         const BlockId b = e.pool.Lookup(7, 0, Tok(7, 4));
         ASSERT_TRUE(b.valid());
         e.refs.push_back(e.pool.Acquire(b));
       },
       BlockState::kActive, 1, 2, 0, 0},
      {"cached -> free (evicted) -> active",
       [](Env& e) {
         for (int i = 0; i < 3; ++i) e.refs.push_back(e.pool.Allocate());
         e.Hash(0, 7);
         e.refs.clear();  // block 0 cached, 1 and 2 free
         e.refs.push_back(e.pool.Allocate());
         e.refs.push_back(e.pool.Allocate());
         e.refs.push_back(e.pool.Allocate());  // free list empty: evicts block 0
         EXPECT_EQ(e.pool.num_evictions(), 1);
         EXPECT_FALSE(e.pool.Lookup(7, 0, Tok(7, 4)).valid());
         e.refs.erase(e.refs.begin(), e.refs.begin() + 2);  // keep the evicted one
         ASSERT_EQ(e.refs[0].id(), BlockId(0));
       },
       BlockState::kActive, 1, 2, 0, 0},
      {"active -> pinned (copy source released mid-step)",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.pool.PinAsCopySource(e.refs[0].id());
         e.refs.clear();
       },
       BlockState::kPinned, 0, 2, 0, 1},
      {"pinned -> free (EndStep)",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.pool.PinAsCopySource(e.refs[0].id());
         e.refs.clear();
         e.pool.EndStep();
       },
       BlockState::kFree, 0, 3, 0, 0},
      {"pinned -> cached (EndStep, hashed)",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.Hash(0, 9);
         e.pool.PinAsCopySource(e.refs[0].id());
         e.refs.clear();
         e.pool.EndStep();
       },
       BlockState::kCached, 0, 2, 1, 0},
      {"pinned -> active (prefix hit mid-step)",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.Hash(0, 9);
         e.pool.PinAsCopySource(e.refs[0].id());
         e.refs.clear();
         e.refs.push_back(e.pool.Acquire(e.pool.Lookup(9, 0, Tok(9, 4))));
       },
       BlockState::kActive, 1, 2, 0, 0},
      {"pin expires at EndStep: later release goes straight to free",
       [](Env& e) {
         e.refs.push_back(e.pool.Allocate());
         e.pool.PinAsCopySource(e.refs[0].id());
         e.pool.EndStep();
         e.refs.clear();
       },
       BlockState::kFree, 0, 3, 0, 0},
  };
  for (const TransitionCase& c : cases) {
    SCOPED_TRACE(c.name);
    Env e(3);
    c.run(e);
    const BlockId b(0);
    EXPECT_EQ(e.pool.state(b), c.want_state);
    EXPECT_EQ(e.pool.refcount(b), c.want_refcount);
    EXPECT_EQ(e.pool.num_free(), c.want_free);
    EXPECT_EQ(e.pool.num_cached(), c.want_cached);
    EXPECT_EQ(e.pool.num_pinned(), c.want_pinned);
    EXPECT_EQ(e.pool.num_active() + e.pool.num_allocatable() + e.pool.num_pinned(), 3);
    EXPECT_TRUE(e.Check().ok()) << e.Check();
  }
}

TEST(BlockPoolTest, EvictsLeastRecentlyReleasedFirst) {
  Env e(3);
  for (int i = 0; i < 3; ++i) e.refs.push_back(e.pool.Allocate());
  for (int i = 0; i < 3; ++i) e.Hash(i, 100 + i);
  // Release order 2, 0, 1: LRU head is 2.
  e.refs[2].Reset();
  e.refs[0].Reset();
  e.refs[1].Reset();
  e.refs.clear();
  BlockRef a = e.pool.Allocate();
  EXPECT_EQ(a.id(), BlockId(2));
  // A hit on 0 protects it: next eviction is 1.
  BlockRef hit = e.pool.Acquire(e.pool.Lookup(100, 0, Tok(100, 4)));
  BlockRef b = e.pool.Allocate();
  EXPECT_EQ(b.id(), BlockId(1));
  EXPECT_EQ(e.pool.num_evictions(), 2);
}

TEST(BlockPoolTest, LookupVerifiesParentAndTokens) {
  Env e(2);
  e.refs.push_back(e.pool.Allocate());
  ASSERT_TRUE(e.pool.Register(e.refs[0].id(), 55, 1, Tok(10, 4)));
  EXPECT_TRUE(e.pool.Lookup(55, 1, Tok(10, 4)).valid());
  EXPECT_FALSE(e.pool.Lookup(55, 2, Tok(10, 4)).valid()) << "other parent: collision is a miss";
  EXPECT_FALSE(e.pool.Lookup(55, 1, Tok(11, 4)).valid()) << "other tokens: collision is a miss";
  EXPECT_FALSE(e.pool.Lookup(56, 1, Tok(10, 4)).valid());
  // A second block cannot take the same hash; a hashed block cannot be re-hashed.
  e.refs.push_back(e.pool.Allocate());
  EXPECT_FALSE(e.pool.Register(e.refs[1].id(), 55, 1, Tok(10, 4)));
  EXPECT_FALSE(e.pool.Register(e.refs[0].id(), 77, 1, Tok(10, 4)));
  e.pool.Unregister(e.refs[0].id());
  EXPECT_FALSE(e.pool.Lookup(55, 1, Tok(10, 4)).valid());
  EXPECT_TRUE(e.Check().ok());
}

TEST(BlockPoolTest, MoveOnlyHandleReleasesExactlyOnce) {
  Env e(2);
  BlockRef a = e.pool.Allocate();
  BlockRef b = std::move(a);
  EXPECT_FALSE(a.valid());
  EXPECT_EQ(e.pool.refcount(b.id()), 1);
  BlockRef c;
  c = std::move(b);
  EXPECT_EQ(e.pool.refcount(c.id()), 1);
  c = e.pool.Allocate();  // assigning over a handle releases the old block
  EXPECT_EQ(e.pool.num_free(), 1);
  c.Reset();
  c.Reset();
  EXPECT_EQ(e.pool.num_free(), 2);
  EXPECT_TRUE(e.Check().ok());
}

TEST(BlockPoolTest, InvariantsCatchRefcountMismatch) {
  Env e(2);
  e.refs.push_back(e.pool.Allocate());
  std::vector<int32_t> wrong = e.ExpectedRefs();
  wrong[0] = 2;
  const absl::Status s = e.pool.CheckInvariants(wrong);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("freed while still referenced"), std::string::npos) << s;
}

TEST(BlockPoolTest, FaultSkipDecrefIsALeakTheChecksFind) {
  Env e(2, BlockFault{BlockFault::Kind::kSkipDecref, 0});
  e.refs.push_back(e.pool.Allocate());
  e.refs.clear();
  const absl::Status s = e.Check();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("leaked"), std::string::npos) << s;
}

TEST(BlockPoolTest, FaultExtraDecrefFreesAReferencedBlock) {
  Env e(2, BlockFault{BlockFault::Kind::kExtraDecref, 0});
  e.refs.push_back(e.pool.Allocate());
  e.refs.push_back(e.pool.Acquire(e.refs[0].id()));
  e.refs.pop_back();  // decrements twice: block 0 is free while refs[0] holds it
  EXPECT_EQ(e.pool.state(BlockId(0)), BlockState::kFree);
  absl::Status s = e.Check();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("freed while still referenced"), std::string::npos) << s;
  e.refs.clear();  // the knock-on double free is recorded, not fatal, once a fault fired
  s = e.Check();
  EXPECT_NE(s.message().find("double free"), std::string::npos) << s;
}

TEST(BlockPoolDeathTest, AcquiringAFreeBlockIsFatal) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  BlockPool pool(Device::kGpu, 2, 4);
  EXPECT_DEATH(pool.Acquire(BlockId(0)), "of free gpu block 0");
}

}  // namespace
}  // namespace strata
