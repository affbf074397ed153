// Tests for worker/kv_calibration.h: ranges to int8/fp8 parameters, per head
// and per layer, and the RoPE-pair-norm K range that bounds K at any position.
#include "worker/kv_calibration.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

// One layer, two kv heads, head_dim 4 (RoPE pairs (0, 2) and (1, 3)).
TEST(KvRangeObserver, ObservedAndRopePairRanges) {
  KvRangeObserver obs(1, 2, 4);
  // head 0: K channels (3, 0, 4, 0) -> pair (0, 2) has norm 5; head 1 smaller.
  const std::vector<float> k = {3, 0, 4, 0, /*head 1*/ 1, -1, 0, 0};
  const std::vector<float> v = {0.5f, -0.5f, 0, 0, /*head 1*/ 2, 0, 0, -2};
  obs.Observe(0, k.data(), v.data(), 1);
  EXPECT_EQ(obs.tokens_observed(), 1);

  auto p = obs.Finish(KvDtype::kInt8, /*per_head=*/true);
  ASSERT_TRUE(p.ok()) << p.status();
  // Observed K range of head 0 is [0, 4]: scale 4/255, and 0 maps to -128.
  EXPECT_FLOAT_EQ(p->k_scale[0][0], 4.0f / 255);
  EXPECT_FLOAT_EQ(p->k_zero[0][0], -128.0f);
  EXPECT_FLOAT_EQ(p->v_scale[0][1], 4.0f / 255);  // V head 1: [-2, 2]

  auto r = obs.Finish(KvDtype::kInt8, /*per_head=*/true, KRange::kRopePairNorm);
  ASSERT_TRUE(r.ok());
  // [-5, 5]: the pair (3, 4) can rotate to (5, 0) or (0, -5) at other positions.
  EXPECT_FLOAT_EQ(r->k_scale[0][0], 10.0f / 255);
  EXPECT_NEAR(r->k_zero[0][0], -0.5f, 1e-5);
  EXPECT_FLOAT_EQ(r->k_scale[0][1], 2.0f / 255);  // pairs (1, 0) and (-1, 0): norm 1
  EXPECT_EQ(r->v_scale, p->v_scale);  // V is not rotated

  // Per layer: one range over both heads.
  auto l = obs.Finish(KvDtype::kFp8E4M3, /*per_head=*/false, KRange::kRopePairNorm);
  ASSERT_TRUE(l.ok());
  EXPECT_FLOAT_EQ(l->k_scale[0][0], 5.0f / 448);
  EXPECT_FLOAT_EQ(l->k_scale[0][1], 5.0f / 448);
  EXPECT_FLOAT_EQ(l->k_zero[0][1], 0.0f);
}

TEST(KvRangeObserver, Errors) {
  KvRangeObserver obs(1, 1, 2);
  EXPECT_EQ(obs.Finish(KvDtype::kInt8, true).status().code(), absl::StatusCode::kFailedPrecondition);
  const float k[2] = {1, 2}, v[2] = {1, 2};
  obs.Observe(0, k, v, 1);
  EXPECT_EQ(obs.Finish(KvDtype::kInt4, true).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace strata
