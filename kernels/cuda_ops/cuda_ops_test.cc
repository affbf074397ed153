// Every cuda_ops kernel against its CPU reference (kernels/cpu, runtime/
// sampling). Skips only when no GPU is present.
#include "kernels/cuda_ops/cuda_ops.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/kv_cache_cpu.h"
#include "kernels/cpu/ops_cpu.h"
#include "kernels/quant_math.h"
#include "runtime/sampling.h"

namespace strata::cuda_ops {
namespace {

#define CUDA_ASSERT(x) ASSERT_EQ(cudaSuccess, (x)) << #x

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device"

// Device buffer freed on scope exit.
template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    if (cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T)) != cudaSuccess) p = nullptr;
  }
  Dev(const std::vector<T>& h) : Dev(h.size()) {
    if (p) cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~Dev() { cudaFree(p); }
  std::vector<T> Get() const {
    std::vector<T> h(n);
    cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
};

std::vector<float> Normal(size_t n, uint32_t seed, float sd = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

float FromBits(uint16_t b, ActDtype dt) {
  return dt == ActDtype::kFp16 ? qmath::HalfBitsToFloat(b) : qmath::Bf16BitsToFloat(b);
}
uint16_t ToBits(float f, ActDtype dt) {
  return dt == ActDtype::kFp16 ? qmath::FloatToHalfBits(f) : qmath::FloatToBf16Bits(f);
}

class Dtypes : public ::testing::TestWithParam<ActDtype> {};

TEST_P(Dtypes, EmbedGathersRows) {
  SKIP_WITHOUT_GPU();
  const ActDtype dt = GetParam();
  const int vocab = 50, dim = 72, tokens = 9;
  const auto table = Normal(vocab * dim, 1);
  std::vector<uint16_t> bits(table.size());
  std::vector<float> rounded(table.size());
  for (size_t i = 0; i < table.size(); ++i) bits[i] = ToBits(table[i], dt), rounded[i] = FromBits(bits[i], dt);
  const std::vector<int32_t> ids = {0, 49, 7, 7, 3, 11, 48, 1, 20};
  Dev<uint16_t> d_table(bits);
  Dev<int32_t> d_ids(ids);
  Dev<float> d_out(tokens * dim);
  CUDA_ASSERT(Embed(d_table.p, dt, d_ids.p, tokens, dim, d_out.p, nullptr));
  std::vector<float> ref(tokens * dim);
  cpu::Embed(rounded.data(), ids.data(), tokens, dim, ref.data());
  EXPECT_EQ(d_out.Get(), ref);
}

TEST_P(Dtypes, RmsNormMatchesCpuOnSelectedRows) {
  SKIP_WITHOUT_GPU();
  const ActDtype dt = GetParam();
  for (int dim : {288, 4096, 130}) {
    const int rows_in = 7;
    const auto x = Normal(rows_in * dim, dim, 3.0f), w = Normal(dim, dim + 1);
    const std::vector<int32_t> rows = {6, 0, 3};
    Dev<float> d_x(x), d_w(w);
    Dev<int32_t> d_rows(rows);
    Dev<uint16_t> d_out(rows.size() * dim);
    CUDA_ASSERT(RmsNorm(d_x.p, d_w.p, d_rows.p, 3, dim, 1e-5f, d_out.p, dt, nullptr));
    Dev<float> d_out32(rows_in * dim);
    CUDA_ASSERT(RmsNorm(d_x.p, d_w.p, nullptr, rows_in, dim, 1e-5f, d_out32.p, ActDtype::kFp32, nullptr));
    std::vector<float> ref(rows_in * dim);
    cpu::RmsNorm(x.data(), w.data(), ref.data(), rows_in, dim, 1e-5f);
    const auto got32 = d_out32.Get();
    for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(got32[i], ref[i], 1e-5f * (1 + std::fabs(ref[i])));
    const auto got = d_out.Get();
    const float tol = dt == ActDtype::kFp16 ? 1.0f / 1024 : 1.0f / 128;
    for (size_t r = 0; r < rows.size(); ++r) {
      for (int i = 0; i < dim; ++i) {
        const float want = ref[rows[r] * dim + i];
        ASSERT_NEAR(FromBits(got[r * dim + i], dt), want, tol * (std::fabs(want) + 1e-3f)) << dim;
      }
    }
  }
}

TEST_P(Dtypes, SiluMulMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const ActDtype dt = GetParam();
  const int tokens = 5, f = 300;
  auto gu = Normal(tokens * 2 * f, 9, 2.0f);
  std::vector<uint16_t> bits(gu.size());
  for (size_t i = 0; i < gu.size(); ++i) bits[i] = ToBits(gu[i], dt), gu[i] = FromBits(bits[i], dt);
  Dev<uint16_t> d_gu(bits), d_out(tokens * f);
  CUDA_ASSERT(SiluMul(d_gu.p, tokens, f, d_out.p, dt, nullptr));
  const auto got = d_out.Get();
  const float tol = dt == ActDtype::kFp16 ? 1.0f / 1024 : 1.0f / 128;
  for (int t = 0; t < tokens; ++t) {
    std::vector<float> ref(f);
    cpu::SiluMul(&gu[t * 2 * f], &gu[t * 2 * f + f], ref.data(), f);
    for (int i = 0; i < f; ++i) ASSERT_NEAR(FromBits(got[t * f + i], dt), ref[i], tol * (std::fabs(ref[i]) + 1e-3f));
  }
}

TEST_P(Dtypes, ConvertRoundsToNearestEven) {
  SKIP_WITHOUT_GPU();
  const ActDtype dt = GetParam();
  auto x = Normal(1000, 11, 100.0f);
  x.push_back(65519.0f);
  x.push_back(1e-8f);
  Dev<float> d_x(x);
  Dev<uint16_t> d_out(x.size());
  CUDA_ASSERT(ConvertF32(d_x.p, x.size(), d_out.p, dt, nullptr));
  const auto got = d_out.Get();
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(got[i], ToBits(x[i], dt)) << x[i];
}

TEST_P(Dtypes, AddToF32AddsTheWidenedValues) {
  SKIP_WITHOUT_GPU();
  const ActDtype dt = GetParam();
  const auto part = Normal(3001, 12, 10.0f);
  auto acc = Normal(part.size(), 13, 100.0f);
  std::vector<uint16_t> bits(part.size());
  for (size_t i = 0; i < part.size(); ++i) bits[i] = ToBits(part[i], dt);
  Dev<uint16_t> d_in(bits);
  Dev<float> d_acc(acc);
  CUDA_ASSERT(AddToF32(d_in.p, dt, static_cast<int64_t>(part.size()), d_acc.p, nullptr));
  const auto got = d_acc.Get();
  for (size_t i = 0; i < part.size(); ++i) ASSERT_EQ(got[i], acc[i] + FromBits(bits[i], dt)) << i;
}

TEST_P(Dtypes, FillUniformIsDeterministicAndInRange) {
  SKIP_WITHOUT_GPU();
  const ActDtype dt = GetParam();
  const int64_t n = 1 << 20;
  Dev<uint16_t> a(n), b(n), c(n);
  CUDA_ASSERT(FillUniform(a.p, dt, n, 42, -0.5f, 0.5f, nullptr));
  CUDA_ASSERT(FillUniform(b.p, dt, n, 42, -0.5f, 0.5f, nullptr));
  CUDA_ASSERT(FillUniform(c.p, dt, n, 43, -0.5f, 0.5f, nullptr));
  const auto ha = a.Get(), hb = b.Get(), hc = c.Get();
  EXPECT_EQ(ha, hb);
  EXPECT_NE(ha, hc);
  double sum = 0, sq = 0;
  for (uint16_t v : ha) {
    const float f = FromBits(v, dt);
    ASSERT_GE(f, -0.5f);
    ASSERT_LE(f, 0.5f);
    sum += f, sq += double{f} * f;
  }
  EXPECT_NEAR(sum / n, 0.0, 3e-3);
  EXPECT_NEAR(sq / n, 1.0 / 12, 3e-3);  // variance of U(-0.5, 0.5)
}

// Small-batch GEMV: every kind against a host reference that rounds its
// inputs the way the unfused path does.
TEST_P(Dtypes, GemvMatchesHostReference) {
  SKIP_WITHOUT_GPU();
  const ActDtype dt = GetParam();
  const float rel = dt == ActDtype::kFp16 ? 2e-3f : 1.6e-2f;
  auto round = [&](float v) { return FromBits(ToBits(v, dt), dt); };
  struct Shape { int n, k; };
  for (Shape sh : {Shape{37, 288}, Shape{1000, 4096}, Shape{513, 11008}}) {
    for (int m = 1; m <= kGemvMaxM; ++m) {
      if (!GemvSupported(m, sh.k)) continue;
      for (GemvKind kind : {GemvKind::kNormF32, GemvKind::kF32AddF32, GemvKind::kNormSiluMul,
                            GemvKind::kActAddF32}) {
        SCOPED_TRACE(::testing::Message() << "n " << sh.n << " k " << sh.k << " m " << m << " kind " << int(kind));
        const bool silu = kind == GemvKind::kNormSiluMul;
        const int wrows = silu ? 2 * sh.n : sh.n;
        const auto wf = Normal(int64_t{wrows} * sh.k, sh.k + m, 0.05f);
        std::vector<uint16_t> wb(wf.size());
        std::vector<float> w(wf.size());
        for (size_t i = 0; i < wf.size(); ++i) wb[i] = ToBits(wf[i], dt), w[i] = FromBits(wb[i], dt);
        const int xrows = m + 3;
        const auto xf = Normal(int64_t{xrows} * sh.k, 3 * m + 1, 2.0f);
        const auto nw = Normal(sh.k, 17);
        std::vector<int32_t> rows(m);
        for (int r = 0; r < m; ++r) rows[r] = (r * 2 + 1) % xrows;
        // Host prologue.
        std::vector<float> xin(int64_t{m} * sh.k);
        std::vector<uint16_t> xact(xin.size());
        for (int r = 0; r < m; ++r) {
          if (kind == GemvKind::kNormF32 || silu) {
            std::vector<float> normed(sh.k);
            cpu::RmsNorm(&xf[int64_t{rows[r]} * sh.k], nw.data(), normed.data(), 1, sh.k, 1e-5f);
            for (int i = 0; i < sh.k; ++i) xin[int64_t{r} * sh.k + i] = round(normed[i]);
          } else {
            for (int i = 0; i < sh.k; ++i) {
              xact[int64_t{r} * sh.k + i] = ToBits(xf[int64_t{r} * sh.k + i], dt);
              xin[int64_t{r} * sh.k + i] = round(xf[int64_t{r} * sh.k + i]);
            }
          }
        }
        const auto y0 = Normal(int64_t{m} * sh.n, 99);
        Dev<uint16_t> d_w(wb), d_xact(xact), d_ysilu(int64_t{m} * sh.n);
        Dev<float> d_x(xf), d_nw(nw), d_y(y0);
        Dev<int32_t> d_rows(rows);
        GemvArgs a;
        a.kind = kind, a.w = d_w.p, a.n_out = sh.n, a.k = sh.k, a.m = m;
        a.x = kind == GemvKind::kActAddF32 ? static_cast<const void*>(d_xact.p) : d_x.p;
        a.x_rows = (kind == GemvKind::kNormF32 || silu) ? d_rows.p : nullptr;
        a.norm_w = d_nw.p;
        a.y = silu ? static_cast<void*>(d_ysilu.p) : d_y.p;
        CUDA_ASSERT(Gemv(a, dt, nullptr));
        CUDA_ASSERT(cudaDeviceSynchronize());
        const auto gy = d_y.Get();
        const auto gs = d_ysilu.Get();
        for (int r = 0; r < m; ++r) {
          for (int j = 0; j < sh.n; ++j) {
            auto dot = [&](int row, double* mag) {
              double s = 0;
              *mag = 0;
              for (int i = 0; i < sh.k; ++i) {
                const double p = double{w[int64_t{row} * sh.k + i]} * xin[int64_t{r} * sh.k + i];
                s += p, *mag += std::fabs(p);
              }
              return s;
            };
            double mag, mag2;
            const double d = dot(j, &mag);
            if (silu) {
              const double u = dot(sh.n + j, &mag2);
              const double g = round(static_cast<float>(d)), up = round(static_cast<float>(u));
              const double want = g / (1 + std::exp(-g)) * up;
              const double tol = 3 * rel * (std::fabs(want) + (mag + mag2) * (std::fabs(g) + std::fabs(up) + 1)) + 1e-6;
              ASSERT_NEAR(FromBits(gs[int64_t{r} * sh.n + j], dt), want, tol) << r << " " << j;
            } else {
              const double base = kind == GemvKind::kNormF32 ? 0.0 : y0[int64_t{r} * sh.n + j];
              ASSERT_NEAR(gy[int64_t{r} * sh.n + j], base + d, 1e-4 * mag + 1e-5) << r << " " << j;
            }
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Half, Dtypes, ::testing::Values(ActDtype::kFp16, ActDtype::kBf16),
                         [](const auto& i) { return i.param == ActDtype::kFp16 ? "fp16" : "bf16"; });

// ---- RoPE + quantizing cache write -----------------------------------------

struct RopeCase {
  int heads, kv_heads, head_dim, block_size;
};

void RunRopeWrite(KvFormat fmt, const RopeCase& rc, bool random_positions) {
  const int T = 11, max_pos = 64, num_blocks = 8;
  const int q = rc.heads * rc.head_dim, kv = rc.kv_heads * rc.head_dim, width = q + 2 * kv;
  const auto qkv = Normal(T * width, 100 + rc.head_dim, 2.0f);
  std::vector<int32_t> pos(T, 0);
  std::mt19937 rng(rc.head_dim);
  if (random_positions) for (int& p : pos) p = rng() % max_pos;
  // Distinct slots in scrambled blocks; token 4 is padding.
  std::vector<int64_t> slots(T);
  for (int t = 0; t < T; ++t) slots[t] = ((t * 5 + 3) % num_blocks) * rc.block_size + t / num_blocks;
  slots[4] = -1;
  std::vector<float> cos(max_pos * rc.head_dim / 2), sin(cos.size());
  cpu::FillRopeTable(10000.0f, rc.head_dim, max_pos, cos.data(), sin.data());
  const KvBlockLayout layout = MakeKvBlockLayout(fmt, rc.block_size, rc.kv_heads, rc.head_dim);
  const size_t pool_bytes = size_t{layout.block_bytes} * num_blocks;
  std::vector<uint8_t> pool_init(pool_bytes);
  for (size_t i = 0; i < pool_bytes; ++i) pool_init[i] = static_cast<uint8_t>(i * 131 + 7);
  const std::vector<float> scales = {0.05f, 0.07f, 3.0f, -2.0f, 0.04f, 0.06f, 1.0f, 2.0f};
  std::vector<float> sc(4 * rc.kv_heads);
  for (int h = 0; h < rc.kv_heads; ++h) {
    sc[h] = scales[h % 2];                          // k_scale
    sc[rc.kv_heads + h] = scales[2 + h % 2];        // k_zero
    sc[2 * rc.kv_heads + h] = scales[4 + h % 2];    // v_scale
    sc[3 * rc.kv_heads + h] = scales[6 + h % 2];    // v_zero
  }
  const bool stat = fmt.scale_mode == KvScaleMode::kStatic;
  const bool zero = stat && KvDtypeIsInteger(fmt.dtype);

  Dev<float> d_qkv(qkv), d_cos(cos), d_sin(sin), d_sc(sc);
  Dev<int32_t> d_pos(pos);
  Dev<int64_t> d_slots(slots);
  Dev<uint8_t> d_pool(pool_init);
  Dev<float> d_q(T * q);
  RopeKvWriteArgs a;
  a.qkv = d_qkv.p, a.num_tokens = T, a.num_heads = rc.heads, a.num_kv_heads = rc.kv_heads;
  a.head_dim = rc.head_dim, a.positions = d_pos.p, a.slot_mapping = d_slots.p;
  a.rope_cos = d_cos.p, a.rope_sin = d_sin.p, a.q_out = d_q.p, a.q_dtype = ActDtype::kFp32;
  a.cache.layout = layout, a.cache.pool = d_pool.p, a.cache.num_blocks = num_blocks;
  if (stat) {
    a.cache.k_scale = d_sc.p, a.cache.v_scale = d_sc.p + 2 * rc.kv_heads;
    if (zero) a.cache.k_zero = d_sc.p + rc.kv_heads, a.cache.v_zero = d_sc.p + 3 * rc.kv_heads;
  }
  CUDA_ASSERT(RopeKvWrite(a, nullptr));
  CUDA_ASSERT(cudaDeviceSynchronize());

  // CPU reference: split, rope, write.
  std::vector<float> hq(T * q), hk(T * kv), hv(T * kv);
  for (int t = 0; t < T; ++t) {
    std::copy_n(&qkv[t * width], q, &hq[t * q]);
    std::copy_n(&qkv[t * width + q], kv, &hk[t * kv]);
    std::copy_n(&qkv[t * width + q + kv], kv, &hv[t * kv]);
  }
  const cpu::RopeTable table{max_pos, rc.head_dim / 2, cos.data(), sin.data()};
  cpu::ApplyRope(hq.data(), pos.data(), T, rc.heads, rc.head_dim, table);
  cpu::ApplyRope(hk.data(), pos.data(), T, rc.kv_heads, rc.head_dim, table);
  std::vector<uint8_t> ref_pool = pool_init;
  KvCacheView cv = a.cache;
  cv.pool = ref_pool.data();
  if (stat) {
    cv.k_scale = &sc[0], cv.v_scale = &sc[2 * rc.kv_heads];
    cv.k_zero = zero ? &sc[rc.kv_heads] : nullptr;
    cv.v_zero = zero ? &sc[3 * rc.kv_heads] : nullptr;
  }
  cpu::WriteKvCache(cv, hk.data(), hv.data(), slots.data(), T);

  const auto gq = d_q.Get();
  for (size_t i = 0; i < gq.size(); ++i) ASSERT_NEAR(gq[i], hq[i], 2e-6f * (1 + std::fabs(hq[i])));
  const auto gpool = d_pool.Get();
  if (!random_positions) {
    // Position 0: the rotation is exact on both sides, so every stored bit agrees,
    // and bytes of the padding token's slot are untouched.
    for (size_t i = 0; i < pool_bytes; ++i) ASSERT_EQ(gpool[i], ref_pool[i]) << "byte " << i;
  } else {
    // Elsewhere: read both caches back; they agree to one quantization step.
    KvCacheView gv = cv;
    std::vector<uint8_t> g = gpool;
    gv.pool = g.data();
    std::vector<float> k1(kv), v1(kv), k2(kv), v2(kv);
    for (int t = 0; t < T; ++t) {
      if (slots[t] < 0) continue;
      cpu::ReadKvToken(gv, slots[t], k1.data(), v1.data());
      cpu::ReadKvToken(cv, slots[t], k2.data(), v2.data());
      for (int i = 0; i < kv; ++i) {
        // One step of the format at this magnitude (a 1-ulp rotation difference
        // can move the row's dynamic scale or flip one rounding).
        const float tol = KvDtypeBits(fmt.dtype) == 4 ? 1.5f : 0.3f + 0.26f * std::fabs(k2[i]);
        ASSERT_NEAR(k1[i], k2[i], tol) << t << " " << i;
        ASSERT_EQ(v1[i], v2[i]);  // V is not rotated: bit-identical
      }
    }
  }
}

TEST(RopeKvWrite, EveryFormatMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const RopeCase cases[] = {{4, 4, 64, 16}, {8, 2, 128, 32}, {6, 6, 48, 8}, {4, 1, 256, 16}};
  for (KvFormat fmt : {
#define STRATA_FMT_(D, M) KvFormat{D, M},
           STRATA_FOR_EACH_KV_FORMAT(STRATA_FMT_)
#undef STRATA_FMT_
       }) {
    for (const RopeCase& rc : cases) {
      SCOPED_TRACE(::testing::Message() << "dtype " << int(fmt.dtype) << " mode " << int(fmt.scale_mode)
                                        << " hd " << rc.head_dim << " gqa " << rc.heads / rc.kv_heads);
      RunRopeWrite(fmt, rc, false);
      RunRopeWrite(fmt, rc, true);
    }
  }
}

// ---- sampling -------------------------------------------------------------

std::vector<SampleOut> Sample(const std::vector<float>& logits, int vocab,
                              const std::vector<SampleParams>& params) {
  Dev<float> d_l(logits);
  Dev<SampleParams> d_p(params);
  Dev<SampleOut> d_o(params.size());
  EXPECT_EQ(cudaSuccess, SampleRows(d_l.p, vocab, d_p.p, params.size(), d_o.p, nullptr));
  return d_o.Get();
}

TEST(Sampling, GreedyTiesToLowestIdAndLogprobs) {
  SKIP_WITHOUT_GPU();
  const int vocab = 32000, rows = 3;
  auto logits = Normal(rows * vocab, 21, 3.0f);
  logits[0 * vocab + 9000] = 50.0f, logits[0 * vocab + 100] = 50.0f;  // tie -> 100
  logits[1 * vocab + 31999] = 60.0f;
  std::vector<SampleParams> ps(rows);
  for (int r = 0; r < rows; ++r) ps[r].logit_row = r, ps[r].num_logprobs = 5;
  ps[2].num_logprobs = -1;
  const auto out = Sample(logits, vocab, ps);
  for (int r = 0; r < rows; ++r) {
    const float* row = &logits[r * vocab];
    EXPECT_EQ(out[r].token, ArgMax(row, vocab)) << r;
    if (ps[r].num_logprobs < 0) continue;
    EXPECT_NEAR(out[r].logprob, LogProbOf(row, vocab, out[r].token), 1e-4);
    const auto top = TopLogProbs(row, vocab, 5);
    for (int j = 0; j < 5; ++j) {
      EXPECT_EQ(out[r].top_ids[j], top[j].first);
      EXPECT_NEAR(out[r].top_logprobs[j], top[j].second, 1e-4);
    }
  }
  EXPECT_EQ(out[0].token, 100);
}

// Draws many samples (one row per counter) and compares frequencies with the
// CPU's definition of the filtered distribution.
void CheckDistribution(const std::vector<float>& row, float temp, int top_k, float top_p) {
  const int vocab = row.size(), draws = 16384;
  std::vector<SampleParams> ps(draws);
  for (int i = 0; i < draws; ++i) {
    ps[i].temperature = temp, ps[i].top_k = top_k, ps[i].top_p = top_p;
    ps[i].seed = 7, ps[i].counter = i;
  }
  const auto out = Sample(row, vocab, ps);
  // Expected: the CPU sampler's kept set and weights (sorted, ties by id).
  std::vector<std::pair<float, int>> s;
  for (int i = 0; i < vocab; ++i) s.push_back({row[i] / temp, i});
  std::sort(s.begin(), s.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  int n = (top_k > 0 && top_k < vocab) ? top_k : vocab;
  std::vector<double> w(n);
  double total = 0;
  for (int i = 0; i < n; ++i) total += (w[i] = std::exp(s[i].first - s[0].first));
  if (top_p < 1) {
    double cum = 0;
    int keep = 0;
    while (keep < n) { cum += w[keep++]; if (cum >= top_p * total) break; }
    n = keep, total = cum;
  }
  std::map<int, double> expect;
  for (int i = 0; i < n; ++i) expect[s[i].second] = w[i] / total;
  std::map<int, int> got;
  for (const auto& o : out) {
    ASSERT_TRUE(expect.count(o.token)) << "token " << o.token << " outside the kept set";
    ++got[o.token];
  }
  for (const auto& [id, p] : expect) {
    const double f = double(got[id]) / draws, sd = std::sqrt(p * (1 - p) / draws);
    EXPECT_NEAR(f, p, 5 * sd + 1e-3) << "id " << id << " T " << temp << " k " << top_k << " p " << top_p;
  }
}

TEST(Sampling, FrequenciesMatchFilteredSoftmax) {
  SKIP_WITHOUT_GPU();
  std::vector<float> row = {1.0f, 2.0f, 0.5f, 2.0f, -1.0f, 3.0f, 0.0f, 1.5f, -3.0f, 2.5f};
  CheckDistribution(row, 1.0f, 0, 1.0f);
  CheckDistribution(row, 0.7f, 4, 1.0f);   // top-k with a tie at the cut (ids 1 and 3)
  CheckDistribution(row, 1.3f, 0, 0.6f);
  CheckDistribution(row, 1.0f, 6, 0.8f);
  // A large vocabulary with a few dominant tokens.
  auto big = Normal(32000, 5, 1.0f);
  big[123] = 9.0f, big[31000] = 8.5f, big[7] = 8.0f;
  CheckDistribution(big, 1.0f, 0, 0.5f);
  CheckDistribution(big, 0.8f, 2, 1.0f);
}

TEST(Sampling, SeededRowsRepeatAndCountersDiffer) {
  SKIP_WITHOUT_GPU();
  const int vocab = 32000;
  const auto row = Normal(vocab, 8, 0.5f);
  std::vector<SampleParams> ps(64);
  for (int i = 0; i < 64; ++i) ps[i].temperature = 1.0f, ps[i].seed = 99, ps[i].counter = i % 32;
  const auto a = Sample(row, vocab, ps), b = Sample(row, vocab, ps);
  int distinct = 0;
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(a[i].token, b[i].token);
    if (i >= 32) {
      EXPECT_EQ(a[i].token, a[i - 32].token);
    }
    distinct += a[i].token != a[0].token;
  }
  EXPECT_GT(distinct, 20);
}

}  // namespace
}  // namespace strata::cuda_ops
