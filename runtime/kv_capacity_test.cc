#include "runtime/kv_capacity.h"

#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

KvCacheShape Llama7B(KvFormat f) { return KvCacheShape{f, 16, 32, 128, 32}; }

TEST(KvCapacityTest, BlockSpansAllLayers) {
  const KvCacheShape s = Llama7B({KvDtype::kFp16, KvScaleMode::kNone});
  // fp16: 2 (K,V) * 32 heads * 16 tokens * 128 dims * 2 bytes = 256 KiB per layer.
  EXPECT_EQ(KvBytesPerBlock(s), 32 * 256 * 1024);
  EXPECT_EQ(PlanKvPool(int64_t{32} * 256 * 1024 * 10 + 5, s).value(), 10);
  EXPECT_EQ(PlanKvPool(0, s).value(), 0);
  EXPECT_EQ(PlanKvPool(int64_t{32} * 256 * 1024 * 10, s.format, 16, 32, 128, 32).value(), 10);
}

TEST(KvCapacityTest, QuantizedFormatsGetProportionallyMoreBlocks) {
  struct Case {
    KvFormat f;
    double min_ratio, max_ratio;
  };
  const std::vector<Case> cases = {
      {{KvDtype::kFp32, KvScaleMode::kNone}, 0.5, 0.5},
      {{KvDtype::kBf16, KvScaleMode::kNone}, 1.0, 1.0},
      {{KvDtype::kFp8E5M2, KvScaleMode::kNone}, 2.0, 2.0},
      {{KvDtype::kFp8E4M3, KvScaleMode::kStatic}, 2.0, 2.0},
      {{KvDtype::kFp8E4M3, KvScaleMode::kDynamic}, 1.94, 2.0},
      {{KvDtype::kInt8, KvScaleMode::kStatic}, 2.0, 2.0},
      {{KvDtype::kInt8, KvScaleMode::kDynamic}, 1.94, 2.0},
      {{KvDtype::kInt4, KvScaleMode::kDynamic}, 3.7, 4.0},
  };
  const int64_t budget = int64_t{20} << 30;
  const int64_t fp16 = PlanKvPool(budget, Llama7B({KvDtype::kFp16, KvScaleMode::kNone})).value();
  for (const Case& c : cases) {
    SCOPED_TRACE(static_cast<int>(c.f.dtype) * 10 + static_cast<int>(c.f.scale_mode));
    const int64_t n = PlanKvPool(budget, Llama7B(c.f)).value();
    const double ratio = static_cast<double>(n) / static_cast<double>(fp16);
    EXPECT_GE(ratio, c.min_ratio - 0.002);
    EXPECT_LE(ratio, c.max_ratio + 0.002);
    EXPECT_NEAR(KvTokensPerGiB(Llama7B(c.f)) /
                    KvTokensPerGiB(Llama7B({KvDtype::kFp16, KvScaleMode::kNone})),
                ratio, 0.01);
  }
}

TEST(KvCapacityTest, RejectsBadShapesAndFormats) {
  KvCacheShape s = Llama7B({KvDtype::kFp16, KvScaleMode::kNone});
  s.block_size = 12;
  EXPECT_EQ(PlanKvPool(1 << 30, s).status().code(), absl::StatusCode::kInvalidArgument);
  s = Llama7B({KvDtype::kFp16, KvScaleMode::kNone});
  s.num_layers = 0;
  EXPECT_EQ(PlanKvPool(1 << 30, s).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanKvPool(-1, Llama7B({KvDtype::kFp16, KvScaleMode::kNone})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanKvPool(1 << 30, Llama7B({KvDtype::kInt4, KvScaleMode::kStatic})).status().code(),
            absl::StatusCode::kUnimplemented);
}

TEST(KvCapacityTest, PlansBothPoolsFromBudgets) {
  const KvCacheShape s = Llama7B({KvDtype::kInt8, KvScaleMode::kStatic});
  const int64_t swap = SwapSpaceBytes(4).value();
  EXPECT_EQ(swap, int64_t{4} << 30);
  const KvPoolPlan p = PlanKvPools({int64_t{10} << 30, swap}, s).value();
  EXPECT_EQ(p.bytes_per_block, 32 * 128 * 1024);
  EXPECT_EQ(p.num_gpu_blocks, 2560);
  EXPECT_EQ(p.num_cpu_blocks, 1024);
  EXPECT_EQ(SwapSpaceBytes(-1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SwapSpaceBytes(0.5).value(), int64_t{1} << 29);
}

}  // namespace
}  // namespace strata
