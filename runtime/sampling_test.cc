#include "runtime/sampling.h"

#include <cmath>
#include <map>

#include "gtest/gtest.h"

namespace strata {
namespace {

TEST(Sampling, GreedyTiesGoToLowestId) {
  const float logits[] = {1.0f, 3.0f, 3.0f, -2.0f};
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.Sample(logits, 4), 1);
}

// ArgMax (vectorized where the CPU has AVX-512) against the plain loop: the
// first index of the largest value, NaNs never winning, a NaN at 0 keeping 0;
// ties, -inf, signed zeros, lengths around the vector width.
TEST(Sampling, ArgMaxMatchesTheFirstIndexOfTheMaximum) {
  auto reference = [](const std::vector<float>& v) {
    int32_t best = 0;
    for (int32_t i = 1; i < static_cast<int32_t>(v.size()); ++i) {
      if (v[i] > v[best]) best = i;
    }
    return best;
  };
  uint32_t state = 12345;
  auto next = [&] { return state = state * 1664525u + 1013904223u; };
  const float nan = std::nanf("");
  for (int n : {1, 15, 16, 17, 63, 64, 65, 100, 128, 1000, 32000}) {
    for (int trial = 0; trial < 40; ++trial) {
      std::vector<float> v(n);
      for (float& x : v) x = static_cast<float>(next() % 7) - 3.0f;  // many ties
      const int kind = trial % 8;
      if (kind == 1) v[next() % n] = nan;
      if (kind == 2) v[0] = nan;
      if (kind == 3) {
        for (float& x : v) x = -INFINITY;
      }
      if (kind == 4) {
        for (float& x : v) x = (next() & 1) ? 0.0f : -0.0f;
      }
      if (kind == 5) v[n - 1] = 100.0f;
      if (kind == 6) {
        for (int k = 0; k < n / 4 + 1; ++k) v[next() % n] = nan;
      }
      if (kind == 7) v[next() % n] = INFINITY;
      ASSERT_EQ(ArgMax(v.data(), n), reference(v)) << "n " << n << " trial " << trial;
    }
  }
}

TEST(Sampling, SeededStreamsAreReproducibleAndDiffer) {
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = std::sin(i * 0.7f);
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 42;
  Sampler a(p), b(p);
  p.seed = 43;
  Sampler c(p);
  int same_ac = 0;
  for (int i = 0; i < 200; ++i) {
    const int x = a.Sample(logits.data(), 50);
    EXPECT_EQ(x, b.Sample(logits.data(), 50));
    same_ac += (x == c.Sample(logits.data(), 50));
  }
  EXPECT_LT(same_ac, 100);
}

TEST(Sampling, TopKAndTopPRestrictTheSupport) {
  const float logits[] = {5.0f, 4.0f, 3.0f, 0.0f, -1.0f};
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 2;
  Sampler k(p);
  std::map<int, int> seen;
  for (int i = 0; i < 2000; ++i) seen[k.Sample(logits, 5)]++;
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_GT(seen[0], seen[1]);
  p.top_k = 0;
  p.top_p = 0.5f;  // token 0 alone has ~0.66 of the mass
  Sampler tp(p);
  for (int i = 0; i < 500; ++i) EXPECT_EQ(tp.Sample(logits, 5), 0);
  // Temperature sharpens: at T=0.5 the top token dominates more than at T=2.
  int top_cold = 0, top_hot = 0;
  p.top_p = 1.0f;
  p.temperature = 0.5f;
  Sampler cold(p);
  p.temperature = 2.0f;
  Sampler hot(p);
  for (int i = 0; i < 3000; ++i) {
    top_cold += cold.Sample(logits, 5) == 0;
    top_hot += hot.Sample(logits, 5) == 0;
  }
  EXPECT_GT(top_cold, top_hot + 300);
}

TEST(Sampling, Validation) {
  SamplingParams p;
  p.temperature = -1.0f;
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
  p = {};
  p.top_p = 0.0f;
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
  p.top_p = 1.5f;
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
  p = {};
  p.top_k = -2;
  EXPECT_FALSE(ValidateSamplingParams(p, 10).ok());
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}, 10).ok());
}

TEST(Sampling, LogProbs) {
  const float logits[] = {0.0f, std::log(3.0f)};
  EXPECT_NEAR(LogProbOf(logits, 2, 1), std::log(0.75), 1e-6);
  auto top = TopLogProbs(logits, 2, 1);
  ASSERT_EQ(top.size(), 1u);
  EXPECT_EQ(top[0].first, 1);
}

}  // namespace
}  // namespace strata
