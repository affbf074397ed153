#include "runtime/kv_format.h"

#include "gtest/gtest.h"
#include "runtime/kv_format_util.h"
#include "runtime/kv_quant_params.h"

namespace strata {
namespace {

TEST(KvBlockLayout, SectionsAlignedAndSized) {
  for (KvFormat f : AllSupportedKvFormats()) {
    for (int bs : {1, 16, 32}) {
      for (int heads : {1, 6, 8}) {
        for (int hd : {48, 64, 128}) {
          const KvBlockLayout l = MakeKvBlockLayout(f, bs, heads, hd);
          SCOPED_TRACE(KvFormatName(f));
          EXPECT_EQ(l.k_data % kKvSectionAlign, 0u);
          EXPECT_EQ(l.v_data % kKvSectionAlign, 0u);
          EXPECT_EQ(l.block_bytes % kKvSectionAlign, 0u);
          const int64_t data = int64_t{heads} * bs * hd * KvDtypeBits(f.dtype) / 8;
          EXPECT_GE(l.v_data - l.k_data, data);
          EXPECT_EQ(l.token_bytes * 8, static_cast<uint32_t>(hd * KvDtypeBits(f.dtype)));
          if (l.has_token_scale()) {
            EXPECT_GE(l.k_scale, l.v_data + data);
            EXPECT_GE(l.v_scale, l.k_scale + 2 * heads * bs);
          }
          if (l.has_token_zero()) {
            EXPECT_GE(l.v_zero, l.k_zero + heads * bs);
          }
          EXPECT_EQ(KvBlockBytes(f, bs, heads, hd), l.block_bytes);
        }
      }
    }
  }
}

TEST(KvBlockLayout, ExactBytesForLlama7bShape) {
  // 32 kv heads, head_dim 128, block 16.
  EXPECT_EQ(KvBlockBytes({KvDtype::kFp16, KvScaleMode::kNone}, 16, 32, 128), 2 * 32 * 16 * 128 * 2);
  // int8 dynamic: 1 byte/elem + fp16 scale + int8 zero per token-head.
  EXPECT_EQ(KvBlockBytes({KvDtype::kInt8, KvScaleMode::kDynamic}, 16, 32, 128),
            2 * 32 * 16 * 128 + 2 * 32 * 16 * 2 + 2 * 32 * 16);
  EXPECT_EQ(KvBlockBytes({KvDtype::kInt4, KvScaleMode::kDynamic}, 16, 32, 128),
            2 * 32 * 16 * 64 + 2 * 32 * 16 * 2 + 2 * 32 * 16);
  EXPECT_EQ(KvBlockBytes({KvDtype::kFp8E4M3, KvScaleMode::kStatic}, 16, 32, 128), 2 * 32 * 16 * 128);
}

TEST(KvFormat, ParsingAndDefaults) {
  auto f = ParseKvFormat("int8", "", WeightDtype::kFp16);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->scale_mode, KvScaleMode::kDynamic);
  f = ParseKvFormat("auto", "", WeightDtype::kBf16);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->dtype, KvDtype::kBf16);
  f = ParseKvFormat("fp8_e5m2", "", WeightDtype::kFp16);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->scale_mode, KvScaleMode::kNone);
  EXPECT_EQ(ParseKvFormat("int3", "", WeightDtype::kFp16).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseKvFormat("int4", "static", WeightDtype::kFp16).status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(ParseKvFormat("int8", "sometimes", WeightDtype::kFp16).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(KvQuantParams, RoundTripAndValidation) {
  KvQuantParams p = UnitKvQuantParams(KvDtype::kInt8, 2, 3);
  p.k_scale[1] = {0.5f, 0.25f, 0.125f};
  auto back = ParseKvQuantParams(KvQuantParamsToJson(p, /*per_head=*/true), "p.json");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->k_scale[1], p.k_scale[1]);
  EXPECT_TRUE(CheckKvQuantParams(*back, {KvDtype::kInt8, KvScaleMode::kStatic}, 2, 3, "p.json").ok());
  EXPECT_FALSE(CheckKvQuantParams(*back, {KvDtype::kInt8, KvScaleMode::kStatic}, 3, 3, "p.json").ok());
  EXPECT_FALSE(CheckKvQuantParams(*back, {KvDtype::kFp8E4M3, KvScaleMode::kStatic}, 2, 3, "p.json").ok());
  auto per_layer = ParseKvQuantParams(
      R"({"kv_cache_dtype":"int8","num_kv_heads":4,"layers":[{"k_scale":0.1,"v_scale":0.2,"k_zero":1}]})",
      "q.json");
  ASSERT_TRUE(per_layer.ok()) << per_layer.status();
  EXPECT_EQ(per_layer->num_kv_heads, 4);
  EXPECT_EQ(per_layer->k_zero[0], std::vector<float>(4, 1.0f));
  EXPECT_FALSE(per_layer->per_layer);
  // One number per layer and no head count: fits any model once widened.
  auto any = ParseKvQuantParams(
      R"({"kv_cache_dtype":"fp8_e4m3","layers":[{"k_scale":0.1,"v_scale":0.2},{"k_scale":0.3,"v_scale":0.4}]})",
      "a.json");
  ASSERT_TRUE(any.ok()) << any.status();
  EXPECT_TRUE(any->per_layer);
  EXPECT_FALSE(CheckKvQuantParams(*any, {KvDtype::kFp8E4M3, KvScaleMode::kStatic}, 2, 6, "a.json").ok());
  WidenKvQuantParams(&*any, 6);
  EXPECT_FALSE(any->per_layer);
  EXPECT_EQ(any->num_kv_heads, 6);
  EXPECT_EQ(any->v_scale[1], std::vector<float>(6, 0.4f));
  EXPECT_TRUE(CheckKvQuantParams(*any, {KvDtype::kFp8E4M3, KvScaleMode::kStatic}, 2, 6, "a.json").ok());
  WidenKvQuantParams(&*any, 3);  // per-head parameters are not changed
  EXPECT_EQ(any->num_kv_heads, 6);
  auto bad = ParseKvQuantParams(R"({"kv_cache_dtype":"int8","layers":[{"v_scale":0.2}]})", "r.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("r.json: layer 0: missing \"k_scale\""),
            std::string::npos);
  KvQuantParams neg = UnitKvQuantParams(KvDtype::kInt8, 1, 1);
  neg.v_scale[0][0] = -1.0f;
  EXPECT_FALSE(CheckKvQuantParams(neg, {KvDtype::kInt8, KvScaleMode::kStatic}, 1, 1, "n").ok());
}

}  // namespace
}  // namespace strata
