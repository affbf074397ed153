#include "runtime/prefix_hash.h"

#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(PrefixHashTest, SeedSeparatesModelsDtypesAndScaleModes) {
  std::set<BlockHash> seeds;
  for (const char* model : {"llama-7b", "llama-13b"})
    for (int d = 0; d <= 6; ++d)
      for (int m = 0; m <= 2; ++m)
        seeds.insert(PrefixHashSeed(model, {static_cast<KvDtype>(d), static_cast<KvScaleMode>(m)}));
  EXPECT_EQ(seeds.size(), 2u * 7 * 3);
}

TEST(PrefixHashTest, ChainDependsOnParentAndEveryToken) {
  const BlockHash seed = PrefixHashSeed("m", {KvDtype::kInt8, KvScaleMode::kDynamic});
  const std::vector<int32_t> a = {1, 2, 3, 4};
  const BlockHash h = HashBlockTokens(seed, a);
  EXPECT_EQ(h, HashBlockTokens(seed, a)) << "deterministic";
  EXPECT_NE(h, HashBlockTokens(seed + 1, a));
  for (size_t i = 0; i < a.size(); ++i) {
    auto b = a;
    b[i] += 1;
    EXPECT_NE(h, HashBlockTokens(seed, b)) << i;
  }
  EXPECT_NE(HashBlockTokens(seed, std::vector<int32_t>{1, 2}),
            HashBlockTokens(seed, std::vector<int32_t>{2, 1}));
  // Same tokens after a different first block hash differently.
  EXPECT_NE(HashBlockTokens(HashBlockTokens(seed, a), a),
            HashBlockTokens(HashBlockTokens(seed, std::vector<int32_t>{9, 9, 9, 9}), a));
}

TEST(PrefixHashTest, NoCollisionsOverManySmallBlocks) {
  std::set<BlockHash> seen;
  const BlockHash seed = PrefixHashSeed("m", {KvDtype::kFp16, KvScaleMode::kNone});
  for (int32_t a = 0; a < 300; ++a)
    for (int32_t b = 0; b < 300; ++b) seen.insert(HashBlockTokens(seed, std::vector<int32_t>{a, b}));
  EXPECT_EQ(seen.size(), 90000u);
}

}  // namespace
}  // namespace strata
