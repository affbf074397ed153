// Tests of the CPU KV-cache kernels, the quantization math they share with the
// CUDA kernels, and host-side view validation.
#include "kernels/cpu/kv_cache_cpu.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/kv_cache_view_util.h"
#include "kernels/quant_math.h"

namespace strata::cpu {
namespace {

using qmath::BitsFloat;
using qmath::FloatBits;

// ---------------------------------------------------------------------------
// Scalar conversions

TEST(QuantMath, HalfMatchesCompilerFloat16) {
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = bits(rng);
    if (i % 4 == 1) u = (u & 0x807FFFFFu) | ((100u + u % 50u) << 23);  // near fp16 range
    if (i % 4 == 2) u = (u & 0x80001FFFu) | (FloatBits(1.0f + (u % 2048) / 1024.0f) & ~0x1FFFu);
    const float f = BitsFloat(u);
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    const uint16_t got = qmath::FloatToHalfBits(f);
    if (std::isnan(f)) {
      ASSERT_EQ(got & 0x7C00, 0x7C00);
      ASSERT_NE(got & 0x3FF, 0);
      continue;
    }
    ASSERT_EQ(got, want) << "f=" << f << " bits=" << std::hex << u;
  }
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t hb = static_cast<uint16_t>(b);
    _Float16 h;
    std::memcpy(&h, &hb, 2);
    const float want = static_cast<float>(h);
    const float got = qmath::HalfBitsToFloat(hb);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got));
    } else {
      ASSERT_EQ(FloatBits(got), FloatBits(want)) << b;
      ASSERT_EQ(qmath::FloatToHalfBits(got), hb);  // exact round trip
    }
  }
}

// Reference rounding: the nearest of all finite codes (ties to the even
// code), saturating; used for bf16 (via double) and fp8 (brute force).
uint16_t Bf16Reference(float f) {
  const uint32_t u = FloatBits(f);
  const uint32_t lo = u & 0xFFFF0000u;
  const uint32_t hi = lo + 0x10000u;
  const double dl = std::fabs(double(f) - double(BitsFloat(lo)));
  const double dh = std::fabs(double(f) - double(BitsFloat(hi)));
  if ((u & 0x7F800000u) == 0x7F800000u) return static_cast<uint16_t>(u >> 16);  // inf
  if (dl < dh) return static_cast<uint16_t>(lo >> 16);
  if (dh < dl) return static_cast<uint16_t>(hi >> 16);
  return static_cast<uint16_t>(((lo >> 16) & 1) ? hi >> 16 : lo >> 16);
}

TEST(QuantMath, Bf16RoundsToNearestEven) {
  std::mt19937 rng(2);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 1000000; ++i) {
    uint32_t u = bits(rng);
    if (i % 3 == 0) u = (u & 0xFFFF0000u) | 0x8000u;  // exact ties
    const float f = BitsFloat(u);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(qmath::Bf16BitsToFloat(qmath::FloatToBf16Bits(f))));
      continue;
    }
    if (std::fabs(f) > 3.3e38f) continue;  // rounding to inf checked below
    ASSERT_EQ(qmath::FloatToBf16Bits(f), Bf16Reference(f)) << std::hex << u;
  }
  EXPECT_EQ(qmath::FloatToBf16Bits(std::numeric_limits<float>::max()), 0x7F80);
}

template <class Enc, class Dec>
void CheckFp8(Enc enc, Dec dec, float max_finite, bool fn, int seed) {
  // All finite codes and values.
  std::vector<std::pair<float, uint8_t>> codes;
  for (int c = 0; c < 256; ++c) {
    const float v = dec(static_cast<uint8_t>(c));
    if (std::isfinite(v)) codes.push_back({v, static_cast<uint8_t>(c)});
  }
  EXPECT_EQ(dec(fn ? 0x7E : 0x7B), max_finite);
  // Every finite code round-trips.
  for (auto [v, c] : codes) {
    if (v == 0.0f) continue;
    ASSERT_EQ(enc(v), c) << v;
  }
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> mag(-22.0f, 17.0f);
  for (int i = 0; i < 300000; ++i) {
    float f = std::exp2(mag(rng)) * (i % 2 ? -1.0f : 1.0f);
    if (i % 5 == 0) {  // midpoints between neighbouring codes
      const auto& a = codes[rng() % codes.size()];
      const float b = dec(static_cast<uint8_t>(a.second + 1));
      if (std::isfinite(b) && std::signbit(b) == std::signbit(a.first)) f = 0.5f * (a.first + b);
    }
    // Brute force: nearest representable, ties to even mantissa, saturate.
    float best = 0;
    uint8_t best_code = 0;
    double best_d = 1e300;
    for (auto [v, c] : codes) {
      if (std::signbit(v) != std::signbit(f)) continue;
      const double d = std::fabs(double(v) - double(f));
      if (d < best_d || (d == best_d && (c & 1) == 0)) {
        best_d = d;
        best = v;
        best_code = c;
      }
    }
    if (std::fabs(f) >= max_finite) best = std::copysign(max_finite, f);
    const uint8_t got = enc(f);
    ASSERT_EQ(dec(got), best) << "f=" << f << " code " << int(got) << " want " << int(best_code);
  }
  EXPECT_EQ(dec(enc(1e9f)), max_finite);
  EXPECT_EQ(dec(enc(-std::numeric_limits<float>::infinity())), -max_finite);
  EXPECT_TRUE(std::isnan(dec(enc(std::nanf("")))));
}

TEST(QuantMath, Fp8E4M3MatchesBruteForce) {
  CheckFp8(qmath::FloatToE4M3Sat, qmath::E4M3ToFloat, 448.0f, true, 3);
  EXPECT_EQ(qmath::E4M3ToFloat(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
}

TEST(QuantMath, Fp8E5M2MatchesBruteForce) {
  CheckFp8(qmath::FloatToE5M2Sat, qmath::E5M2ToFloat, 57344.0f, false, 4);
  EXPECT_EQ(qmath::E5M2ToFloat(0x01), std::ldexp(1.0f, -16));
}

TEST(QuantMath, DynamicParamsFollowTheFormulas) {
  // int8: mn=-1, mx=3 -> s=4/255, s_h=fp16(s), z=rne(-128 + 1/s_h)
  qmath::RowParams p = qmath::DynamicRowParams(KvDtype::kInt8, -1.0f, 3.0f);
  const float sh = qmath::HalfBitsToFloat(qmath::FloatToHalfBits(4.0f / 255.0f));
  EXPECT_EQ(p.scale, sh);
  EXPECT_EQ(p.zero, std::nearbyint(-128.0f - (-1.0f) / sh));
  EXPECT_EQ(static_cast<int8_t>(p.zero_bits), static_cast<int>(p.zero));
  // all-positive row: mn clamps to 0 -> z = -128
  p = qmath::DynamicRowParams(KvDtype::kInt8, 2.0f, 5.0f);
  EXPECT_EQ(p.zero, -128.0f);
  // zero row -> s = 1
  p = qmath::DynamicRowParams(KvDtype::kInt4, 0.0f, 0.0f);
  EXPECT_EQ(p.scale, 1.0f);
  EXPECT_EQ(p.zero, 0.0f);
  p = qmath::DynamicRowParams(KvDtype::kFp8E4M3, -896.0f, 10.0f);
  EXPECT_EQ(p.scale, 2.0f);
  // tiny range: guard keeps the scale positive
  p = qmath::DynamicRowParams(KvDtype::kInt8, -1e-12f, 1e-12f);
  EXPECT_GT(p.scale, 0.0f);
}

TEST(QuantMath, FormatListMatchesKvFormatSupported) {
  std::vector<KvFormat> listed;
#define STRATA_LIST_(D, M) listed.push_back(KvFormat{D, M});
  STRATA_FOR_EACH_KV_FORMAT(STRATA_LIST_)
#undef STRATA_LIST_
  int supported = 0;
  for (int d = 0; d <= 6; ++d) {
    for (int m = 0; m <= 2; ++m) {
      const KvFormat f{static_cast<KvDtype>(d), static_cast<KvScaleMode>(m)};
      const bool in_list = std::find(listed.begin(), listed.end(), f) != listed.end();
      EXPECT_EQ(in_list, KvFormatSupported(f)) << d << "/" << m;
      supported += KvFormatSupported(f);
    }
  }
  EXPECT_EQ(supported, static_cast<int>(listed.size()));
}

// ---------------------------------------------------------------------------
// View validation

KvCacheViewOptions GoodOptions(uint8_t* pool) {
  KvCacheViewOptions o;
  o.format = {KvDtype::kInt8, KvScaleMode::kDynamic};
  o.block_size = 16;
  o.num_kv_heads = 2;
  o.head_dim = 64;
  o.pool = pool;
  o.num_blocks = 4;
  return o;
}

TEST(KvCacheViewUtil, AcceptsAndRejects) {
  alignas(16) static uint8_t pool[1 << 16];
  const float scales[2] = {0.1f, 0.2f};
  auto o = GoodOptions(pool);
  auto v = MakeKvCacheView(o);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->layout.block_bytes, KvBlockBytes(o.format, 16, 2, 64));

  auto expect_code_at = [&](KvCacheViewOptions opt, absl::StatusCode code, int line) {
    auto r = MakeKvCacheView(opt);
    EXPECT_EQ(r.status().code(), code) << r.status() << " (case at line " << line << ")";
  };
#define expect_code(o, c) expect_code_at(o, c, __LINE__)
  o = GoodOptions(pool);
  o.format = {KvDtype::kInt4, KvScaleMode::kStatic};
  expect_code(o, absl::StatusCode::kUnimplemented);
  o.format = {KvDtype::kFp16, KvScaleMode::kDynamic};
  expect_code(o, absl::StatusCode::kUnimplemented);
  o = GoodOptions(pool);
  o.block_size = 24;
  expect_code(o, absl::StatusCode::kInvalidArgument);
  o.block_size = 0;
  expect_code(o, absl::StatusCode::kInvalidArgument);
  o = GoodOptions(pool);
  o.pool = pool + 8;
  expect_code(o, absl::StatusCode::kInvalidArgument);
  o.pool = nullptr;
  expect_code(o, absl::StatusCode::kInvalidArgument);
  o = GoodOptions(pool);
  o.format = {KvDtype::kInt4, KvScaleMode::kDynamic};
  o.head_dim = 63;
  expect_code(o, absl::StatusCode::kInvalidArgument);
  o = GoodOptions(pool);
  o.num_kv_heads = 64;
  o.block_size = 4096;
  o.head_dim = 16384;  // 64 * 4096 * 16384 bytes = 4 GiB per section
  expect_code(o, absl::StatusCode::kInvalidArgument);
  // static modes
  o = GoodOptions(pool);
  o.format = {KvDtype::kInt8, KvScaleMode::kStatic};
  expect_code(o, absl::StatusCode::kInvalidArgument);  // no scales
  o.k_scale = o.v_scale = scales;
  expect_code(o, absl::StatusCode::kInvalidArgument);  // no zeros
  o.k_zero = o.v_zero = scales;
  EXPECT_TRUE(MakeKvCacheView(o).ok());
  o.format = {KvDtype::kFp8E4M3, KvScaleMode::kStatic};
  expect_code(o, absl::StatusCode::kInvalidArgument);  // fp8 has no zero
  o.k_zero = o.v_zero = nullptr;
  EXPECT_TRUE(MakeKvCacheView(o).ok());
  o.format = {KvDtype::kFp8E4M3, KvScaleMode::kDynamic};
  expect_code(o, absl::StatusCode::kInvalidArgument);  // scales for a dynamic format
#undef expect_code
}

TEST(KvCacheViewUtil, ValidatesHostBatch) {
  alignas(16) static uint8_t pool[1 << 16];
  auto v = MakeKvCacheView(GoodOptions(pool));
  ASSERT_TRUE(v.ok());
  std::vector<int32_t> tables = {0, 1, 2, 3};
  std::vector<int32_t> ctx = {20, 3};
  std::vector<int32_t> qs = {0, 2, 3};
  std::vector<int64_t> slots = {18, 19, 34, -1};
  PagedBatchView b;
  b.num_seqs = 2;
  b.num_tokens = 4;
  b.max_blocks_per_seq = 2;
  b.block_tables = tables.data();
  b.context_lens = ctx.data();
  b.query_start = qs.data();
  b.slot_mapping = slots.data();
  EXPECT_TRUE(ValidatePagedBatchOnHost(*v, b).ok());
  tables[3] = 7;  // second sequence's block 1 is not used (ctx 3): still fine
  EXPECT_TRUE(ValidatePagedBatchOnHost(*v, b).ok());
  tables[2] = 9;
  EXPECT_EQ(ValidatePagedBatchOnHost(*v, b).code(), absl::StatusCode::kInvalidArgument);
  tables[2] = 2;
  ctx[0] = 40;  // needs 3 blocks
  EXPECT_EQ(ValidatePagedBatchOnHost(*v, b).code(), absl::StatusCode::kInvalidArgument);
  ctx[0] = 1;  // fewer than its 2 new tokens
  EXPECT_EQ(ValidatePagedBatchOnHost(*v, b).code(), absl::StatusCode::kInvalidArgument);
  ctx[0] = 20;
  slots[1] = 64;
  EXPECT_EQ(ValidatePagedBatchOnHost(*v, b).code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// Kernels

const char* DtypeName(KvDtype d) {
  switch (d) {
    case KvDtype::kFp32: return "fp32";
    case KvDtype::kFp16: return "fp16";
    case KvDtype::kBf16: return "bf16";
    case KvDtype::kFp8E4M3: return "e4m3";
    case KvDtype::kFp8E5M2: return "e5m2";
    case KvDtype::kInt8: return "int8";
    case KvDtype::kInt4: return "int4";
  }
  return "?";
}

std::vector<KvFormat> AllFormats() {
  std::vector<KvFormat> f;
#define STRATA_LIST_(D, M) f.push_back(KvFormat{D, M});
  STRATA_FOR_EACH_KV_FORMAT(STRATA_LIST_)
#undef STRATA_LIST_
  return f;
}

std::string FormatName(KvFormat f) {
  static const char* modes[] = {"none", "static", "dynamic"};
  return std::string(DtypeName(f.dtype)) + "_" + modes[static_cast<int>(f.scale_mode)];
}

// A cache pool plus static scales, owning its memory.
struct TestCache {
  std::vector<uint8_t, std::allocator<uint8_t>> storage;
  std::vector<float> k_scale, k_zero, v_scale, v_zero;
  KvCacheView view;

  TestCache(KvFormat f, int block_size, int kv_heads, int head_dim, int num_blocks,
            float amax, std::mt19937& rng) {
    KvCacheViewOptions o;
    o.format = f;
    o.block_size = block_size;
    o.num_kv_heads = kv_heads;
    o.head_dim = head_dim;
    o.num_blocks = num_blocks;
    const size_t bytes = KvBlockBytes(f, block_size, kv_heads, head_dim) * size_t(num_blocks);
    storage.assign(bytes + 16, 0xA5);  // poison
    uintptr_t p = reinterpret_cast<uintptr_t>(storage.data());
    o.pool = storage.data() + ((16 - p % 16) % 16);
    if (f.scale_mode == KvScaleMode::kStatic) {
      std::uniform_real_distribution<float> jitter(1.0f, 1.3f);
      const float qmax = f.dtype == KvDtype::kInt8      ? 127.0f
                         : f.dtype == KvDtype::kFp8E4M3 ? 448.0f
                                                        : 57344.0f / 64;
      for (int h = 0; h < kv_heads; ++h) {
        k_scale.push_back(amax / qmax * jitter(rng));
        v_scale.push_back(amax / qmax * jitter(rng));
        if (f.dtype == KvDtype::kInt8) {  // small, non-integer zero points
          k_zero.push_back(0.25f * h - 0.3f);
          v_zero.push_back(-0.4f * h + 0.6f);
        }
      }
      o.k_scale = k_scale.data();
      o.v_scale = v_scale.data();
      if (!k_zero.empty()) {
        o.k_zero = k_zero.data();
        o.v_zero = v_zero.data();
      }
    }
    auto v = MakeKvCacheView(o);
    EXPECT_TRUE(v.ok()) << v.status();
    view = *v;
  }
};

// Bound on |dequant(quant(x)) - x| for element x of a row with the given
// scale (s) and row amax.
double QuantBound(KvFormat f, float x, float s, float amax) {
  const double ax = std::fabs(x);
  switch (f.dtype) {
    case KvDtype::kFp32: return 0;
    case KvDtype::kFp16: return ax * std::ldexp(1.0, -11) + std::ldexp(1.0, -25);
    case KvDtype::kBf16: return ax * std::ldexp(1.0, -8);
    case KvDtype::kFp8E4M3:
      return ax * std::ldexp(1.0, -4) + s * std::ldexp(1.0, -10) + amax * 1e-3;
    case KvDtype::kFp8E5M2:
      return ax * std::ldexp(1.0, -3) + s * std::ldexp(1.0, -17);
    case KvDtype::kInt8:
    case KvDtype::kInt4: return 1.25 * s + 1e-6 * amax;
  }
  return 0;
}

class FormatTest : public ::testing::TestWithParam<KvFormat> {};

TEST_P(FormatTest, RoundTripWithinBounds) {
  const KvFormat f = GetParam();
  std::mt19937 rng(7);
  for (int hd : {48, 64, 128}) {
    const int heads = 3, bs = 16, blocks = 4;
    TestCache c(f, bs, heads, hd, blocks, 20.0f, rng);
    const int tokens = bs * blocks;
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> k(size_t(tokens) * heads * hd), v(k.size());
    for (size_t i = 0; i < k.size(); ++i) {
      // mixed magnitudes, some rows all positive, a few outliers
      const int row = static_cast<int>(i / hd);
      k[i] = nd(rng) * (row % 5 == 0 ? 0.01f : 1.0f) + (row % 7 == 0 ? 2.0f : 0.0f);
      v[i] = nd(rng);
      if (i % 97 == 0) v[i] *= 3.5f;
    }
    std::vector<int64_t> slots(tokens);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    WriteKvCache(c.view, k.data(), v.data(), slots.data(), tokens);
    std::vector<float> kr(size_t(heads) * hd), vr(kr.size());
    for (int t = 0; t < tokens; ++t) {
      ReadKvToken(c.view, slots[t], kr.data(), vr.data());
      for (int h = 0; h < heads; ++h) {
        for (int is_v = 0; is_v < 2; ++is_v) {
          const float* x = (is_v ? v.data() : k.data()) + (size_t(t) * heads + h) * hd;
          const float* y = (is_v ? vr.data() : kr.data()) + size_t(h) * hd;
          float amax = 0, mn = 0, mx = 0;
          for (int d = 0; d < hd; ++d) {
            amax = std::max(amax, std::fabs(x[d]));
            mn = std::min(mn, x[d]);
            mx = std::max(mx, x[d]);
          }
          float s = 1.0f;
          if (f.scale_mode == KvScaleMode::kStatic) {
            s = (is_v ? c.v_scale : c.k_scale)[h];
          } else if (f.scale_mode == KvScaleMode::kDynamic) {
            s = qmath::DynamicRowParams(f.dtype, mn, mx).scale;
          }
          for (int d = 0; d < hd; ++d) {
            ASSERT_LE(std::fabs(double(y[d]) - x[d]), QuantBound(f, x[d], s, amax))
                << FormatName(f) << " hd " << hd << " t " << t << " h " << h << " v " << is_v
                << " d " << d << " x " << x[d] << " y " << y[d] << " s " << s;
          }
        }
      }
    }
  }
}

TEST_P(FormatTest, PaddingSlotsAreNotWrittenAndWritesAreDeterministic) {
  const KvFormat f = GetParam();
  std::mt19937 rng(8);
  const int heads = 2, hd = 64, bs = 16, blocks = 3;
  TestCache a(f, bs, heads, hd, blocks, 3.0f, rng), b(f, bs, heads, hd, blocks, 3.0f, rng);
  b.view.k_scale = a.view.k_scale;  // same static scales
  b.view.v_scale = a.view.v_scale;
  b.view.k_zero = a.view.k_zero;
  b.view.v_zero = a.view.v_zero;
  std::normal_distribution<float> nd;
  const int tokens = 10;
  std::vector<float> k(size_t(tokens) * heads * hd), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int64_t> with_pad = {3, -1, 17, 40, -1, 5, 6, -1, 33, 47};
  WriteKvCache(a.view, k.data(), v.data(), with_pad.data(), tokens);
  // Same tokens without the padding rows.
  std::vector<float> k2, v2;
  std::vector<int64_t> no_pad;
  for (int t = 0; t < tokens; ++t) {
    if (with_pad[t] < 0) continue;
    no_pad.push_back(with_pad[t]);
    k2.insert(k2.end(), k.begin() + size_t(t) * heads * hd, k.begin() + size_t(t + 1) * heads * hd);
    v2.insert(v2.end(), v.begin() + size_t(t) * heads * hd, v.begin() + size_t(t + 1) * heads * hd);
  }
  WriteKvCache(b.view, k2.data(), v2.data(), no_pad.data(), static_cast<int32_t>(no_pad.size()));
  const size_t bytes = size_t(a.view.layout.block_bytes) * blocks;
  EXPECT_EQ(std::memcmp(a.view.pool, b.view.pool, bytes), 0);
}

TEST_P(FormatTest, CopyBlocksCopiesDataScalesAndZeros) {
  const KvFormat f = GetParam();
  std::mt19937 rng(9);
  const int heads = 2, hd = 48, bs = 32, blocks = 6;
  TestCache c(f, bs, heads, hd, blocks, 2.0f, rng);
  std::normal_distribution<float> nd;
  const int tokens = bs * 3;  // fill blocks 0..2
  std::vector<float> k(size_t(tokens) * heads * hd), v(k.size());
  for (auto& x : k) x = nd(rng) * 2.0f;
  for (auto& x : v) x = nd(rng) * 0.5f;
  std::vector<int64_t> slots(tokens);
  std::iota(slots.begin(), slots.end(), 0);
  WriteKvCache(c.view, k.data(), v.data(), slots.data(), tokens);
  const int32_t src[] = {0, 1, 2};
  const int32_t dst[] = {5, 3, 4};
  CopyBlocks(c.view, src, dst, 3);
  const size_t bb = c.view.layout.block_bytes;
  std::vector<float> k1(size_t(heads) * hd), v1(k1.size()), k2(k1.size()), v2(k1.size());
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(std::memcmp(c.view.block(src[i]), c.view.block(dst[i]), bb), 0);
    for (int off = 0; off < bs; ++off) {
      ReadKvToken(c.view, int64_t{src[i]} * bs + off, k1.data(), v1.data());
      ReadKvToken(c.view, int64_t{dst[i]} * bs + off, k2.data(), v2.data());
      ASSERT_EQ(k1, k2);
      ASSERT_EQ(v1, v2);
    }
  }
  if (c.view.layout.has_token_scale()) {
    // The scale section is really in the copied range: dynamic scales differ per token.
    EXPECT_LT(c.view.layout.k_scale, bb);
  }
}

INSTANTIATE_TEST_SUITE_P(AllFormats, FormatTest, ::testing::ValuesIn(AllFormats()),
                         [](const auto& info) { return FormatName(info.param); });

// ---------------------------------------------------------------------------
// Attention against a float64 reference over the dequantized cache.

struct SeqSpec {
  int32_t context_len;  // after this step's write
  int32_t new_tokens;
};

struct AttnCase {
  KvFormat format;
  int head_dim;
  int block_size;
  int group;
  std::vector<SeqSpec> seqs;
  int padding_tokens;
};

// Builds a randomly paged batch, writes every cached token (previous steps and
// this step's new ones) and runs PagedAttention; checks against float64.
void RunAttentionCase(const AttnCase& ac, uint32_t seed, double tol) {
  std::mt19937 rng(seed);
  const int kv_heads = 2, hd = ac.head_dim, bs = ac.block_size;
  const int heads = kv_heads * ac.group;
  int max_blocks = 0, total_blocks = 0, num_tokens = 0;
  for (const auto& s : ac.seqs) {
    const int nb = (s.context_len + bs - 1) / bs;
    max_blocks = std::max(max_blocks, nb);
    total_blocks += nb;
    num_tokens += s.new_tokens;
  }
  const int num_seqs = static_cast<int>(ac.seqs.size());
  const int pool_blocks = total_blocks + 3;
  TestCache c(ac.format, bs, kv_heads, hd, pool_blocks, 3.0f, rng);

  std::vector<int32_t> ids(pool_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> tables(size_t(num_seqs) * std::max(1, max_blocks), -1);
  std::vector<int32_t> ctx(num_seqs), qs(num_seqs + 1, 0);
  int next = 0;
  for (int s = 0; s < num_seqs; ++s) {
    ctx[s] = ac.seqs[s].context_len;
    qs[s + 1] = qs[s] + ac.seqs[s].new_tokens;
    for (int b = 0; b < (ctx[s] + bs - 1) / bs; ++b) tables[size_t(s) * max_blocks + b] = ids[next++];
  }
  auto slot_of = [&](int s, int pos) {
    return int64_t{tables[size_t(s) * max_blocks + pos / bs]} * bs + pos % bs;
  };
  std::normal_distribution<float> nd;
  // Cached prefix: written as earlier steps would have.
  std::vector<float> kp, vp;
  std::vector<int64_t> prefix_slots;
  for (int s = 0; s < num_seqs; ++s) {
    for (int p = 0; p < ctx[s] - ac.seqs[s].new_tokens; ++p) prefix_slots.push_back(slot_of(s, p));
  }
  const size_t row = size_t(kv_heads) * hd;
  kp.resize(prefix_slots.size() * row);
  vp.resize(kp.size());
  for (size_t i = 0; i < kp.size(); ++i) {
    kp[i] = nd(rng) + 0.3f * std::sin(float(i % 97));
    vp[i] = nd(rng);
  }
  WriteKvCache(c.view, kp.data(), vp.data(), prefix_slots.data(),
               static_cast<int32_t>(prefix_slots.size()));
  // This step: new tokens plus padding tokens (slot -1).
  const int total_tokens = num_tokens + ac.padding_tokens;
  std::vector<int64_t> slots(total_tokens, -1);
  for (int s = 0; s < num_seqs; ++s) {
    for (int i = 0; i < ac.seqs[s].new_tokens; ++i) {
      slots[qs[s] + i] = slot_of(s, ctx[s] - ac.seqs[s].new_tokens + i);
    }
  }
  std::vector<float> kn(total_tokens * row), vn(kn.size());
  std::vector<float> q(size_t(total_tokens) * heads * hd);
  for (auto& x : kn) x = nd(rng);
  for (auto& x : vn) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  WriteKvCache(c.view, kn.data(), vn.data(), slots.data(), total_tokens);

  PagedBatchView b;
  b.num_seqs = num_seqs;
  b.num_tokens = total_tokens;
  b.max_blocks_per_seq = max_blocks;
  b.block_tables = tables.data();
  b.context_lens = ctx.data();
  b.query_start = qs.data();
  b.slot_mapping = slots.data();
  ASSERT_TRUE(ValidatePagedBatchOnHost(c.view, b).ok());
  const float scale = 1.0f / std::sqrt(float(hd));
  std::vector<float> out(q.size(), std::nanf(""));
  PagedAttention(c.view, b, q.data(), heads, scale, out.data());

  // Reference.
  std::vector<float> kr(row), vr(row);
  double worst = 0;
  for (int s = 0; s < num_seqs; ++s) {
    std::vector<float> K(size_t(ctx[s]) * row), V(K.size());
    for (int p = 0; p < ctx[s]; ++p) {
      ReadKvToken(c.view, slot_of(s, p), &K[p * row], &V[p * row]);
    }
    for (int i = 0; i < ac.seqs[s].new_tokens; ++i) {
      const int t = qs[s] + i;
      const int pos = ctx[s] - ac.seqs[s].new_tokens + i;
      for (int h = 0; h < heads; ++h) {
        const int kvh = h / ac.group;
        const float* qv = &q[(size_t(t) * heads + h) * hd];
        std::vector<double> sc(pos + 1);
        double m = -1e300;
        for (int p = 0; p <= pos; ++p) {
          double d = 0;
          for (int e = 0; e < hd; ++e) d += double(qv[e]) * K[p * row + kvh * hd + e];
          sc[p] = d * scale;
          m = std::max(m, sc[p]);
        }
        double sum = 0;
        for (auto& x : sc) sum += (x = std::exp(x - m));
        std::vector<double> ref(hd, 0.0);
        for (int p = 0; p <= pos; ++p) {
          for (int e = 0; e < hd; ++e) ref[e] += sc[p] / sum * V[p * row + kvh * hd + e];
        }
        double num = 0, den = 0;
        const float* o = &out[(size_t(t) * heads + h) * hd];
        for (int e = 0; e < hd; ++e) {
          num += (o[e] - ref[e]) * (o[e] - ref[e]);
          den += ref[e] * ref[e];
        }
        const double rel = std::sqrt(num / std::max(den, 1e-30));
        worst = std::max(worst, rel);
        ASSERT_LE(rel, tol) << FormatName(ac.format) << " hd " << hd << " bs " << bs << " G "
                            << ac.group << " seq " << s << " token " << i << " head " << h;
      }
    }
  }
  for (size_t i = size_t(num_tokens) * heads * hd; i < out.size(); ++i) {
    ASSERT_EQ(out[i], 0.0f) << "padding token output not zeroed";
  }
}

using AttnParam = std::tuple<KvFormat, int, int, int>;  // format, head_dim, block, group
class AttentionTest : public ::testing::TestWithParam<AttnParam> {};

TEST_P(AttentionTest, MixedPrefillDecodeMatchesFloat64) {
  const auto [format, hd, bs, group] = GetParam();
  // Decode (1 and long contexts), fresh prefill, chunked prefill on a cached
  // prefix, a sequence with no new tokens, and three padding tokens.
  AttnCase ac{format, hd, bs, group,
              {{1, 1}, {37, 1}, {20, 20}, {117, 17}, {bs * 9, 1}, {50, 0}, {333, 2}},
              3};
  RunAttentionCase(ac, 100 + hd + bs + group, 2e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, AttentionTest,
    ::testing::Combine(::testing::ValuesIn(AllFormats()), ::testing::Values(48, 64, 128),
                       ::testing::Values(16, 32), ::testing::Values(1, 4, 8)),
    [](const auto& info) {
      return FormatName(std::get<0>(info.param)) + "_hd" +
             std::to_string(std::get<1>(info.param)) + "_bs" +
             std::to_string(std::get<2>(info.param)) + "_g" +
             std::to_string(std::get<3>(info.param));
    });

TEST(AttentionLongContext, DecodeAndChunkedPrefillAt4K) {
  for (KvFormat f : {KvFormat{KvDtype::kFp32, KvScaleMode::kNone},
                     KvFormat{KvDtype::kInt8, KvScaleMode::kDynamic},
                     KvFormat{KvDtype::kInt4, KvScaleMode::kDynamic}}) {
    AttnCase ac{f, 128, 16, 4, {{4096, 1}, {4100, 33}, {2500, 1}}, 1};
    RunAttentionCase(ac, 5, 3e-5);
  }
}

}  // namespace
}  // namespace strata::cpu
