#include "runtime/block_manager.h"

#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

constexpr int kBs = 4;

std::vector<int32_t> Tok(int n, int32_t first = 100) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

BlockManagerOptions Opts(int gpu, int cpu, bool caching = true) {
  BlockManagerOptions o;
  o.num_gpu_blocks = gpu;
  o.num_cpu_blocks = cpu;
  o.block_size = kBs;
  o.enable_prefix_caching = caching;
  o.hash_seed = PrefixHashSeed("test-model", KvFormat{KvDtype::kFp16, KvScaleMode::kNone});
  o.bytes_per_block = 1000;
  return o;
}

// Admits `seq` with `tokens` fully computed (as after its prefill step).
void RunPrefill(BlockManager& bm, SeqId seq, const std::vector<int32_t>& tokens) {
  const PrefixMatch m = bm.MatchPrefix(tokens);
  bm.Admit(seq, m, static_cast<int32_t>(tokens.size()));
  std::vector<BlockCopy> copies;
  const int32_t start = std::min<int32_t>(m.num_tokens(), static_cast<int32_t>(tokens.size()) - 1);
  ASSERT_TRUE(bm.AppendSlots(seq, start, static_cast<int32_t>(tokens.size()), &copies).ok());
  bm.EndStep();
  bm.CommitComputed(seq, tokens, static_cast<int32_t>(tokens.size()));
}

#define EXPECT_INVARIANTS(bm)                          \
  do {                                                 \
    const absl::Status s_ = (bm).CheckInvariants();    \
    EXPECT_TRUE(s_.ok()) << s_;                        \
  } while (0)

TEST(BlockManagerTest, AppendAllocatesWholeBlocks) {
  BlockManager bm(Opts(8, 0));
  const auto t = Tok(10);
  bm.Admit(SeqId(1), bm.MatchPrefix(t), 10);
  EXPECT_EQ(bm.AppendCost(SeqId(1), 0, 10), 3);
  std::vector<BlockCopy> copies;
  ASSERT_TRUE(bm.AppendSlots(SeqId(1), 0, 10, &copies).ok());
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(bm.NumSeqBlocks(SeqId(1)), 3);
  EXPECT_EQ(bm.AppendCost(SeqId(1), 10, 12), 0) << "room left in the last block";
  EXPECT_EQ(bm.AppendCost(SeqId(1), 10, 13), 1);
  EXPECT_EQ(bm.Stats().gpu_used, 3);
  bm.EndStep();
  EXPECT_INVARIANTS(bm);
  bm.Free(SeqId(1));
  EXPECT_EQ(bm.Stats().gpu_used, 0);
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, FreedFullBlocksAreReusedByTheNextRequest) {
  BlockManager bm(Opts(8, 0));
  const auto a = Tok(10);
  RunPrefill(bm, SeqId(1), a);
  const std::vector<BlockId> a_blocks = bm.BlockIds(SeqId(1));
  bm.Free(SeqId(1));
  EXPECT_EQ(bm.Stats().gpu_cached, 2) << "two full blocks stay cached";
  EXPECT_EQ(bm.Stats().gpu_free, 6);

  auto b = Tok(8);
  b.push_back(7);
  b.push_back(8);  // same first two blocks, different tail
  const PrefixMatch m = bm.MatchPrefix(b);
  ASSERT_EQ(m.blocks.size(), 2u);
  EXPECT_EQ(m.num_cached_hits, 2);
  EXPECT_EQ(m.blocks[0], a_blocks[0]);
  EXPECT_EQ(m.blocks[1], a_blocks[1]);
  EXPECT_EQ(bm.AdmissionCost(m, 8, 10), 1 + 2) << "one new block plus two leaving the cache";
  bm.Admit(SeqId(2), m, 10);
  EXPECT_EQ(bm.gpu().state(a_blocks[0]), BlockState::kActive);  // cached -> active
  EXPECT_EQ(bm.Stats().prefix_hit_tokens, 8);
  EXPECT_EQ(bm.Stats().prefix_queried_tokens, 10 + 10);
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, RunningSequenceSharesItsFullBlocks) {
  BlockManager bm(Opts(8, 0));
  RunPrefill(bm, SeqId(1), Tok(9));
  const PrefixMatch m = bm.MatchPrefix(Tok(9));
  ASSERT_EQ(m.blocks.size(), 2u);
  EXPECT_EQ(m.num_cached_hits, 0) << "hits on active blocks cost nothing";
  bm.Admit(SeqId(2), m, 9);
  EXPECT_EQ(bm.gpu().refcount(m.blocks[0]), 2);
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, FullHitOnSharedBlockCopiesBeforeRecomputingLastToken) {
  BlockManager bm(Opts(8, 0));
  const auto t = Tok(8);
  RunPrefill(bm, SeqId(1), t);
  const PrefixMatch m = bm.MatchPrefix(t);
  ASSERT_EQ(m.num_tokens(), 8);
  // All 8 tokens hit; token 7 is recomputed for logits, into a shared block.
  EXPECT_EQ(bm.AdmissionCost(m, 7, 8), 1);
  bm.Admit(SeqId(2), m, 8);
  std::vector<BlockCopy> copies;
  ASSERT_TRUE(bm.AppendSlots(SeqId(2), 7, 8, &copies).ok());
  const auto a = bm.BlockIds(SeqId(1)), b = bm.BlockIds(SeqId(2));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, a[1]);
  EXPECT_EQ(copies[0].dst, b[1]);
  EXPECT_EQ(a[0], b[0]);
  EXPECT_NE(a[1], b[1]);
  bm.EndStep();
  bm.CommitComputed(SeqId(2), t, 8);
  EXPECT_FALSE(bm.gpu().hashed(b[1])) << "duplicate content stays out of the index";
  EXPECT_EQ(bm.Stats().cow_copies, 1);
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, FullHitOnExclusiveBlockUnhashesInsteadOfCopying) {
  BlockManager bm(Opts(8, 0));
  const auto t = Tok(8);
  RunPrefill(bm, SeqId(1), t);
  bm.Free(SeqId(1));
  const PrefixMatch m = bm.MatchPrefix(t);
  EXPECT_EQ(bm.AdmissionCost(m, 7, 8), 2) << "two cached hits, no copy";
  bm.Admit(SeqId(2), m, 8);
  std::vector<BlockCopy> copies;
  ASSERT_TRUE(bm.AppendSlots(SeqId(2), 7, 8, &copies).ok());
  EXPECT_TRUE(copies.empty());
  const auto b = bm.BlockIds(SeqId(2));
  EXPECT_FALSE(bm.gpu().hashed(b[1]));
  EXPECT_INVARIANTS(bm);
  bm.CommitComputed(SeqId(2), t, 8);
  EXPECT_TRUE(bm.gpu().hashed(b[1])) << "re-indexed once recomputed";
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, ForkSharesPartialBlockAndAppendCopiesOnWrite) {
  BlockManager bm(Opts(8, 0));
  const auto t = Tok(6);  // one full block, one partial holding 2 tokens
  RunPrefill(bm, SeqId(1), t);
  ASSERT_TRUE(bm.Fork(SeqId(1), SeqId(2)).ok());
  const auto before = bm.BlockIds(SeqId(1));
  EXPECT_EQ(bm.BlockIds(SeqId(2)), before);
  EXPECT_EQ(bm.gpu().refcount(before[1]), 2);
  EXPECT_EQ(bm.AppendCost(SeqId(1), 6, 7), 1);
  std::vector<BlockCopy> copies;
  ASSERT_TRUE(bm.AppendSlots(SeqId(1), 6, 7, &copies).ok());
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, before[1]);
  EXPECT_EQ(bm.BlockIds(SeqId(1))[1], copies[0].dst);
  EXPECT_EQ(bm.BlockIds(SeqId(1))[0], before[0]) << "full block stays shared";
  // The other sharer now holds the original alone and writes in place.
  EXPECT_EQ(bm.AppendCost(SeqId(2), 6, 7), 0);
  ASSERT_TRUE(bm.AppendSlots(SeqId(2), 6, 7, &copies).ok());
  EXPECT_EQ(copies.size(), 1u);
  EXPECT_EQ(bm.BlockIds(SeqId(2))[1], before[1]);
  bm.EndStep();
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, CopySourceFreedMidStepIsPinnedUntilEndStep) {
  BlockManager bm(Opts(4, 0));
  RunPrefill(bm, SeqId(1), Tok(2));
  ASSERT_TRUE(bm.Fork(SeqId(1), SeqId(2)).ok());
  const BlockId src = bm.BlockIds(SeqId(1))[0];
  std::vector<BlockCopy> copies;
  ASSERT_TRUE(bm.AppendSlots(SeqId(1), 2, 3, &copies).ok());
  bm.Free(SeqId(2));  // e.g. preempted later in the same step
  EXPECT_EQ(bm.gpu().state(src), BlockState::kPinned);
  EXPECT_EQ(bm.gpu().num_allocatable(), 2) << "the copy source cannot be handed out yet";
  EXPECT_FALSE(bm.CheckInvariants().ok()) << "mid-step state is not a valid resting state";
  bm.EndStep();
  EXPECT_EQ(bm.gpu().state(src), BlockState::kFree);
  EXPECT_EQ(bm.gpu().num_allocatable(), 3);
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, SwapRoundTripWithoutCaching) {
  BlockManager bm(Opts(4, 4, /*caching=*/false));
  const auto t = Tok(10);
  RunPrefill(bm, SeqId(1), t);
  const auto gpu_before = bm.BlockIds(SeqId(1));
  ASSERT_TRUE(bm.CanSwapOut(SeqId(1)));
  std::vector<BlockCopy> out, in;
  ASSERT_TRUE(bm.SwapOut(SeqId(1), &out).ok());
  EXPECT_EQ(bm.SeqDevice(SeqId(1)), Device::kCpu);
  const auto cpu_blocks = bm.BlockIds(SeqId(1));
  ASSERT_EQ(out.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(out[i], (BlockCopy{gpu_before[i], cpu_blocks[i]}));
  EXPECT_EQ(bm.Stats().gpu_used, 0);
  EXPECT_EQ(bm.Stats().cpu_used, 3);
  EXPECT_EQ(bm.SwapInCost(SeqId(1), t), 3);
  ASSERT_TRUE(bm.SwapIn(SeqId(1), t, &in).ok());
  const auto gpu_after = bm.BlockIds(SeqId(1));
  ASSERT_EQ(in.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(in[i], (BlockCopy{cpu_blocks[i], gpu_after[i]}));
  EXPECT_EQ(bm.Stats().cpu_used, 0);
  EXPECT_EQ(bm.Stats().bytes_swapped_out, 3000);
  EXPECT_EQ(bm.Stats().bytes_swapped_in, 3000);
  bm.EndStep();
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, SwapInReacquiresFullBlocksStillCachedOnGpu) {
  BlockManager bm(Opts(6, 4));
  const auto t = Tok(10);
  RunPrefill(bm, SeqId(1), t);
  const auto gpu_before = bm.BlockIds(SeqId(1));
  std::vector<BlockCopy> out, in;
  ASSERT_TRUE(bm.SwapOut(SeqId(1), &out).ok());
  EXPECT_EQ(bm.Stats().gpu_cached, 2);
  EXPECT_EQ(bm.SwapInCost(SeqId(1), t), 3);
  ASSERT_TRUE(bm.SwapIn(SeqId(1), t, &in).ok());
  const auto gpu_after = bm.BlockIds(SeqId(1));
  EXPECT_EQ(gpu_after[0], gpu_before[0]);
  EXPECT_EQ(gpu_after[1], gpu_before[1]);
  ASSERT_EQ(in.size(), 1u) << "only the partial block travels back";
  EXPECT_EQ(in[0].dst, gpu_after[2]);
  EXPECT_EQ(bm.Stats().blocks_swapped_in, 1);
  bm.EndStep();
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, SwapInAfterEvictionCopiesEverything) {
  BlockManager bm(Opts(3, 3));
  const auto t = Tok(10);
  RunPrefill(bm, SeqId(1), t);
  std::vector<BlockCopy> out, in, copies;
  ASSERT_TRUE(bm.SwapOut(SeqId(1), &out).ok());
  bm.Admit(SeqId(2), bm.MatchPrefix(Tok(12, 500)), 12);
  ASSERT_TRUE(bm.AppendSlots(SeqId(2), 0, 12, &copies).ok());  // evicts both cached blocks
  EXPECT_EQ(bm.Stats().evictions, 2);
  EXPECT_EQ(bm.SwapInCost(SeqId(1), t), 3);
  EXPECT_EQ(bm.SwapIn(SeqId(1), t, &in).code(), absl::StatusCode::kResourceExhausted);
  bm.Free(SeqId(2));
  ASSERT_TRUE(bm.SwapIn(SeqId(1), t, &in).ok());
  EXPECT_EQ(in.size(), 3u);
  bm.EndStep();
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, FailedAllocationsChangeNothing) {
  BlockManager bm(Opts(3, 1));
  bm.Admit(SeqId(1), bm.MatchPrefix(Tok(8)), 8);
  std::vector<BlockCopy> copies;
  const absl::Status s = bm.AppendSlots(SeqId(1), 0, 16, &copies);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("needs 4 GPU blocks, 3 allocatable"), std::string::npos) << s;
  EXPECT_EQ(bm.NumSeqBlocks(SeqId(1)), 0);
  ASSERT_TRUE(bm.AppendSlots(SeqId(1), 0, 8, &copies).ok());
  EXPECT_FALSE(bm.CanSwapOut(SeqId(1)));
  EXPECT_EQ(bm.SwapOut(SeqId(1), &copies).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(bm.SeqDevice(SeqId(1)), Device::kGpu);
  EXPECT_EQ(bm.Stats().cpu_used, 0);
  bm.EndStep();
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, ForkOfSwappedSequenceIsRefused) {
  BlockManager bm(Opts(4, 4));
  RunPrefill(bm, SeqId(1), Tok(5));
  std::vector<BlockCopy> out;
  ASSERT_TRUE(bm.SwapOut(SeqId(1), &out).ok());
  EXPECT_EQ(bm.Fork(SeqId(1), SeqId(2)).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(bm.HasSeq(SeqId(2)));
  bm.EndStep();
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, EvictionTakesTheTailOfAFreedSequenceFirst) {
  BlockManager bm(Opts(3, 0));
  const auto t = Tok(12);
  RunPrefill(bm, SeqId(1), t);
  bm.Free(SeqId(1));
  EXPECT_EQ(bm.Stats().gpu_cached, 3);
  std::vector<BlockCopy> copies;
  bm.Admit(SeqId(2), bm.MatchPrefix(Tok(4, 900)), 4);
  ASSERT_TRUE(bm.AppendSlots(SeqId(2), 0, 4, &copies).ok());
  EXPECT_EQ(bm.MatchPrefix(t).blocks.size(), 2u) << "the head of the prefix survives";
  bm.EndStep();
  EXPECT_INVARIANTS(bm);
}

TEST(BlockManagerTest, CachingOffNeverHashes) {
  BlockManager bm(Opts(4, 0, /*caching=*/false));
  RunPrefill(bm, SeqId(1), Tok(8));
  bm.Free(SeqId(1));
  EXPECT_EQ(bm.Stats().gpu_cached, 0);
  EXPECT_EQ(bm.gpu().num_hashed(), 0);
  EXPECT_TRUE(bm.MatchPrefix(Tok(8)).blocks.empty());
  EXPECT_INVARIANTS(bm);
}

// Sequence-level state machine, one row per transition.
struct SeqTransitionCase {
  std::string name;
  std::function<void(BlockManager&)> run;  // acts on SeqId(1) (10 tokens, admitted)
  bool want_present;
  Device want_device;
  int want_gpu_used, want_cpu_used;
};

TEST(BlockManagerTest, SequenceTransitionsTableDriven) {
  std::vector<BlockCopy> scratch;
  const auto t = Tok(10);
  const std::vector<SeqTransitionCase> cases = {
      {"(none) -> gpu table", [](BlockManager&) {}, true, Device::kGpu, 3, 0},
      {"gpu -> cpu (swap out)",
       [&](BlockManager& bm) { ASSERT_TRUE(bm.SwapOut(SeqId(1), &scratch).ok()); }, true,
       Device::kCpu, 0, 3},
      {"cpu -> gpu (swap in)",
       [&](BlockManager& bm) {
         ASSERT_TRUE(bm.SwapOut(SeqId(1), &scratch).ok());
         ASSERT_TRUE(bm.SwapIn(SeqId(1), t, &scratch).ok());
       },
       true, Device::kGpu, 3, 0},
      {"gpu -> (none) (free)", [](BlockManager& bm) { bm.Free(SeqId(1)); }, false, Device::kGpu,
       0, 0},
      {"cpu -> (none) (abort while swapped)",
       [&](BlockManager& bm) {
         ASSERT_TRUE(bm.SwapOut(SeqId(1), &scratch).ok());
         bm.Free(SeqId(1));
       },
       false, Device::kGpu, 0, 0},
      {"gpu -> gpu (fork adds a second table)",
       [](BlockManager& bm) { ASSERT_TRUE(bm.Fork(SeqId(1), SeqId(2)).ok()); }, true,
       Device::kGpu, 3, 0},
  };
  for (const SeqTransitionCase& c : cases) {
    SCOPED_TRACE(c.name);
    BlockManager bm(Opts(8, 8));
    RunPrefill(bm, SeqId(1), t);
    c.run(bm);
    bm.EndStep();
    EXPECT_EQ(bm.HasSeq(SeqId(1)), c.want_present);
    if (c.want_present) {
      EXPECT_EQ(bm.SeqDevice(SeqId(1)), c.want_device);
    }
    EXPECT_EQ(bm.Stats().gpu_used, c.want_gpu_used);
    EXPECT_EQ(bm.Stats().cpu_used, c.want_cpu_used);
    EXPECT_INVARIANTS(bm);
  }
}

TEST(BlockManagerTest, InjectedSkippedDecrefIsReported) {
  BlockManagerOptions o = Opts(4, 0);
  o.fault = BlockFault{BlockFault::Kind::kSkipDecref, 0};
  BlockManager bm(o);
  RunPrefill(bm, SeqId(1), Tok(6));
  EXPECT_INVARIANTS(bm);
  bm.Free(SeqId(1));
  const absl::Status s = bm.CheckInvariants();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("leaked/orphaned"), std::string::npos) << s;
}

}  // namespace
}  // namespace strata
