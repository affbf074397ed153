// Every KV cache format on the CPU engine with the real stories15M model:
//  * relative attention-output error on real q/k/v (captured from the model
//    running Moby-Dick text), per format;
//  * greedy-token agreement with the fp32 cache on the golden prompts.
// Static formats use scales calibrated on that text. The numbers are printed
// (they are the report) and checked against per-format bounds.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "gtest/gtest.h"
#include "kernels/cpu/kv_cache_cpu.h"
#include "kernels/kv_cache_view_util.h"
#include "runtime/check.h"
#include "runtime/kv_format_util.h"
#include "runtime/tokenizer.h"
#include "runtime/weights.h"
#include "tests/test_data.h"
#include "worker/cpu_engine.h"
#include "worker/kv_calibration.h"
#include "worker/offline_generator.h"

namespace strata {
namespace {

struct Captured {
  std::vector<float> q, k, v;  // [tokens][heads][head_dim]
};

class KvDtypeCpuTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto w = LoadModelWeights(testing::DataPath("models/stories15M"));
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = new ModelWeights(std::move(*w));
    // Calibration / capture text: the Moby-Dick opening, as token ids.
    const auto md = testing::LoadJson("golden/stories15M_moby_dick_logprobs.json");
    text_ = new std::vector<int32_t>(md["token_ids"].get<std::vector<int32_t>>());
    const ModelConfig& c = weights_->config;
    auto engine = MakeEngine({KvDtype::kFp32, KvScaleMode::kNone}, std::nullopt);
    KvRangeObserver ranges(c.num_layers, c.num_kv_heads, c.head_dim);
    captured_ = new std::vector<Captured>(c.num_layers);
    engine->set_layer_observer([&](int l, const float* q, const float* k, const float* v, int64_t t) {
      ranges.Observe(l, k, v, t);
      auto& cap = (*captured_)[l];
      cap.q.assign(q, q + t * c.q_size());
      cap.k.assign(k, k + t * c.kv_size());
      cap.v.assign(v, v + t * c.kv_size());
    });
    StepInput in;
    SeqStepInput& s = in.seqs.emplace_back();
    s.tokens = *text_;
    s.block_table = BlockTable(text_->size());
    s.logits = SeqStepInput::Logits::kNone;
    StepOutput out;
    ASSERT_TRUE(engine->Step(in, &out).ok());
    params_ = new std::map<KvDtype, KvQuantParams>();
    for (KvDtype d : {KvDtype::kInt8, KvDtype::kFp8E4M3, KvDtype::kFp8E5M2}) {
      auto p = ranges.Finish(d, /*per_head=*/true);
      ASSERT_TRUE(p.ok()) << p.status();
      (*params_)[d] = *p;
    }
  }

  static std::vector<int32_t> BlockTable(size_t tokens) {
    std::vector<int32_t> t;
    for (size_t i = 0; i * 16 < tokens; ++i) t.push_back(static_cast<int32_t>(i));
    return t;
  }

  static std::unique_ptr<CpuEngine> MakeEngine(KvFormat f, std::optional<KvQuantParams> p) {
    EngineOptions eo;
    eo.kv_format = f;
    eo.block_size = 16;
    eo.num_gpu_blocks = 16 * 8;
    auto e = CpuEngine::Create(*weights_, eo, std::move(p));
    STRATA_CHECK(e.ok()) << e.status();
    return std::move(*e);
  }

  static std::optional<KvQuantParams> ParamsFor(KvFormat f) {
    if (f.scale_mode != KvScaleMode::kStatic) return std::nullopt;
    return params_->at(f.dtype);
  }

  static inline ModelWeights* weights_ = nullptr;
  static inline std::vector<int32_t>* text_ = nullptr;
  static inline std::vector<Captured>* captured_ = nullptr;
  static inline std::map<KvDtype, KvQuantParams>* params_ = nullptr;
};

// Attention output of layer `l` over the captured q/k/v, through a cache of
// format `f`.
std::vector<float> Attention(const ModelConfig& c, const Captured& cap, KvFormat f,
                             const KvQuantParams* params, int layer) {
  const int32_t T = static_cast<int32_t>(cap.k.size() / c.kv_size());
  const int32_t bs = 16, nblocks = (T + bs - 1) / bs;
  const KvBlockLayout l = MakeKvBlockLayout(f, bs, c.num_kv_heads, c.head_dim);
  std::vector<uint8_t> pool(static_cast<size_t>(l.block_bytes) * nblocks + 64);
  uint8_t* base = reinterpret_cast<uint8_t*>(AlignUp(reinterpret_cast<intptr_t>(pool.data()), 16));
  KvCacheViewOptions vo;
  vo.format = f;
  vo.block_size = bs;
  vo.num_kv_heads = c.num_kv_heads;
  vo.head_dim = c.head_dim;
  vo.pool = base;
  vo.num_blocks = nblocks;
  if (params != nullptr) {
    vo.k_scale = params->k_scale[layer].data();
    vo.v_scale = params->v_scale[layer].data();
    if (KvDtypeIsInteger(f.dtype)) {
      vo.k_zero = params->k_zero[layer].data();
      vo.v_zero = params->v_zero[layer].data();
    }
  }
  auto view = MakeKvCacheView(vo);
  STRATA_CHECK(view.ok()) << view.status();
  std::vector<int64_t> slots(T);
  std::vector<int32_t> table(nblocks);
  for (int32_t i = 0; i < T; ++i) slots[i] = i;
  for (int32_t i = 0; i < nblocks; ++i) table[i] = i;
  cpu::WriteKvCache(*view, cap.k.data(), cap.v.data(), slots.data(), T);
  const int32_t qs[2] = {0, T}, ctx[1] = {T};
  PagedBatchView b;
  b.num_seqs = 1;
  b.num_tokens = T;
  b.max_blocks_per_seq = nblocks;
  b.block_tables = table.data();
  b.context_lens = ctx;
  b.query_start = qs;
  b.slot_mapping = slots.data();
  std::vector<float> out(static_cast<size_t>(T) * c.q_size());
  cpu::PagedAttention(*view, b, cap.q.data(), c.num_heads, 1.0f / std::sqrt(float(c.head_dim)),
                      out.data());
  return out;
}

// Upper bounds on the relative attention-output error, per dtype: about 1.4x
// the worst layer measured when the test was written (see
// bench/results/kv_dtype_cpu.md), so a regression in any codec fails.
double ErrorBound(KvFormat f) {
  switch (f.dtype) {
    case KvDtype::kFp32: return 1e-6;
    case KvDtype::kFp16: return 2e-3;
    case KvDtype::kBf16: return 1e-2;
    case KvDtype::kInt8: return 3e-2;
    case KvDtype::kFp8E4M3: return 1e-1;
    case KvDtype::kFp8E5M2: return 2e-1;
    case KvDtype::kInt4: return 2.6e-1;
  }
  return 0;
}

TEST_F(KvDtypeCpuTest, AttentionErrorOnRealKv) {
  const ModelConfig& c = weights_->config;
  std::printf("\n%-18s %14s %14s\n", "kv format", "rel err (mean)", "rel err (max)");
  for (KvFormat f : AllSupportedKvFormats()) {
    const KvQuantParams* p = f.scale_mode == KvScaleMode::kStatic ? &params_->at(f.dtype) : nullptr;
    double sum = 0, worst = 0;
    for (int l = 0; l < c.num_layers; ++l) {
      const auto ref = Attention(c, (*captured_)[l], {KvDtype::kFp32, KvScaleMode::kNone}, nullptr, l);
      const auto got = Attention(c, (*captured_)[l], f, p, l);
      double num = 0, den = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
        den += double(ref[i]) * ref[i];
      }
      const double rel = std::sqrt(num / den);
      sum += rel;
      worst = std::max(worst, rel);
    }
    std::printf("%-18s %14.2e %14.2e\n", KvFormatName(f).c_str(), sum / c.num_layers, worst);
    EXPECT_LT(worst, ErrorBound(f)) << KvFormatName(f);
  }
}

TEST_F(KvDtypeCpuTest, GreedyAgreementWithFp32Cache) {
  const auto golden = testing::LoadJson("golden/stories15M_greedy.json");
  std::vector<GenerateRequest> reqs;
  for (const auto& c : golden["cases"]) {
    GenerateRequest r;
    r.prompt_ids = c["prompt_ids"].get<std::vector<int32_t>>();
    r.max_new_tokens = 96;
    reqs.push_back(r);
  }
  auto run = [&](KvFormat f) {
    auto tok = Tokenizer::LoadSentencePiece(testing::DataPath("models/stories15M/tokenizer.model"));
    STRATA_CHECK(tok.ok());
    OfflineGenerator gen(MakeEngine(f, ParamsFor(f)), std::move(*tok), OfflineOptions{});
    auto res = gen.Generate(reqs);
    STRATA_CHECK(res.ok()) << res.status();
    return std::move(*res);
  };
  const auto base = run({KvDtype::kFp32, KvScaleMode::kNone});
  std::printf("\n%-18s %22s %18s\n", "kv format", "identical prefix (mean)", "tokens equal");
  for (KvFormat f : AllSupportedKvFormats()) {
    const auto got = run(f);
    double prefix = 0, equal = 0, total = 0;
    for (size_t i = 0; i < reqs.size(); ++i) {
      const auto& a = base[i].output_ids;
      const auto& b = got[i].output_ids;
      size_t p = 0;
      while (p < a.size() && p < b.size() && a[p] == b[p]) ++p;
      prefix += double(p) / a.size();
      for (size_t k = 0; k < std::min(a.size(), b.size()); ++k) equal += a[k] == b[k];
      total += a.size();
    }
    prefix /= reqs.size();
    std::printf("%-18s %21.1f%% %17.1f%%\n", KvFormatName(f).c_str(), 100 * prefix, 100 * equal / total);
    if (f.dtype == KvDtype::kFp32) {
      EXPECT_EQ(prefix, 1.0);
    }
    // fp16 and int8 caches must track the fp32 cache closely on this model.
    if (f.dtype == KvDtype::kFp16) {
      EXPECT_GT(prefix, 0.9) << KvFormatName(f);
    }
    if (f.dtype == KvDtype::kInt8) {
      EXPECT_GT(prefix, 0.5) << KvFormatName(f);
    }
  }
}

}  // namespace
}  // namespace strata
