// Tensor-parallel sharding of the CPU engine, in one process: ranks are
// threads joined by Gloo over loopback. A sharded forward pass must give the
// unsharded logits (up to float summation order) for split and replicated kv
// heads, for plain, dynamically and statically quantized caches.
#include "worker/shard.h"

#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/test_data.h"
#include "worker/collectives_gloo.h"
#include "worker/cpu_engine.h"

namespace strata {
namespace {

ModelConfig SmallGqa() {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_layers = 2;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.vocab_size = 97;
  c.max_position_embeddings = 64;
  c.tie_word_embeddings = false;
  return c;
}

TEST(ShardDims, SplitsAndReplicates) {
  ModelConfig c = SmallGqa();
  struct Row {
    int tp, rank, heads, q_begin, kv, kv_begin, f, f_begin;
  };
  for (const Row& r : {Row{1, 0, 8, 0, 2, 0, 96, 0}, Row{2, 1, 4, 4, 1, 1, 48, 48},
                       Row{4, 0, 2, 0, 1, 0, 24, 0}, Row{4, 1, 2, 2, 1, 0, 24, 24},
                       Row{4, 2, 2, 4, 1, 1, 24, 48}, Row{8, 7, 1, 7, 1, 1, 12, 84}}) {
    auto d = ComputeShardDims(c, {r.rank, r.tp});
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->num_heads, r.heads) << r.tp << "/" << r.rank;
    EXPECT_EQ(d->q_head_begin, r.q_begin) << r.tp << "/" << r.rank;
    EXPECT_EQ(d->num_kv_heads, r.kv) << r.tp << "/" << r.rank;
    EXPECT_EQ(d->kv_head_begin, r.kv_begin) << r.tp << "/" << r.rank;
    EXPECT_EQ(d->intermediate, r.f) << r.tp << "/" << r.rank;
    EXPECT_EQ(d->f_begin, r.f_begin) << r.tp << "/" << r.rank;
  }
  EXPECT_EQ(ComputeShardDims(c, {0, 3}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ComputeShardDims(c, {2, 2}).status().code(), absl::StatusCode::kInvalidArgument);
  c.intermediate_size = 90;
  EXPECT_EQ(ComputeShardDims(c, {0, 4}).status().code(), absl::StatusCode::kInvalidArgument);
  c = SmallGqa();
  c.num_heads = 12;
  c.num_kv_heads = 3;  // tp 2: 3 kv heads neither split nor replicate evenly
  EXPECT_EQ(ComputeShardDims(c, {0, 2}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ShardWeights, EngineRejectsUnshardedWeights) {
  ModelConfig c = SmallGqa();
  auto coll = MakeSingleRankCollectives();
  EngineOptions eo;
  eo.num_gpu_blocks = 4;
  CpuShardOptions so;
  so.shard = {0, 2};
  so.collectives = coll.get();  // wrong size
  EXPECT_FALSE(CpuEngine::Create(RandomWeights(c, 1), eo, std::nullopt, so).ok());
}

TEST(ShardWeights, LoadingAShardEqualsSlicingTheModel) {
  // Hugging Face directory: only the shard's rows/columns are converted.
  const std::string path = testing::DataPath("models/stories15M");
  auto full = LoadModelWeights(path);
  ASSERT_TRUE(full.ok()) << full.status();
  for (int rank : {0, 1}) {
    auto loaded = LoadShardWeights(path, {rank, 2});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    auto sliced = SliceWeights(*full, {rank, 2});
    ASSERT_TRUE(sliced.ok()) << sliced.status();
    EXPECT_EQ(loaded->embed, sliced->embed);
    EXPECT_EQ(loaded->lm_head, sliced->lm_head);
    ASSERT_EQ(loaded->layers.size(), sliced->layers.size());
    for (size_t l = 0; l < loaded->layers.size(); ++l) {
      const LayerWeights &a = loaded->layers[l], &b = sliced->layers[l];
      EXPECT_EQ(a.wq, b.wq) << l;
      EXPECT_EQ(a.wk, b.wk) << l;
      EXPECT_EQ(a.wv, b.wv) << l;
      EXPECT_EQ(a.wo, b.wo) << l;
      EXPECT_EQ(a.w_gate, b.w_gate) << l;
      EXPECT_EQ(a.w_up, b.w_up) << l;
      EXPECT_EQ(a.w_down, b.w_down) << l;
      EXPECT_EQ(a.attn_norm, b.attn_norm) << l;
      EXPECT_EQ(a.mlp_norm, b.mlp_norm) << l;
      EXPECT_EQ(a.wq.size(), 3u * 48 * 288) << "3 of 6 heads";
      EXPECT_EQ(a.w_down.size(), 288u * 384) << "half of the MLP";
    }
  }
  // The llama2.c checkpoint loads whole and is sliced: the same shard.
  auto from_bin = LoadShardWeights(testing::DataPath("models/stories15M-llama2c/stories15M.bin"), {1, 2});
  ASSERT_TRUE(from_bin.ok()) << from_bin.status();
  auto sliced = SliceWeights(*full, {1, 2});
  ASSERT_TRUE(sliced.ok());
  EXPECT_EQ(from_bin->layers[3].wo, sliced->layers[3].wo);
  EXPECT_EQ(from_bin->layers[3].wq, sliced->layers[3].wq);
}

struct Format {
  const char* name;
  KvFormat format;
};
void PrintTo(const Format& f, std::ostream* os) { *os << f.name; }

class ShardedForward : public ::testing::TestWithParam<std::tuple<int, Format>> {};

KvQuantParams PerHeadParams(const ModelConfig& c) {
  KvQuantParams p = UnitKvQuantParams(KvDtype::kInt8, c.num_layers, c.num_kv_heads);
  for (int l = 0; l < c.num_layers; ++l) {
    for (int h = 0; h < c.num_kv_heads; ++h) {
      p.k_scale[l][h] = 0.002f * (h + 1) + 0.001f * l;
      p.v_scale[l][h] = 0.0005f * (2 * h + 1);
      p.k_zero[l][h] = static_cast<float>(h);
      p.v_zero[l][h] = -static_cast<float>(h);
    }
  }
  return p;
}

SeqStepInput Seq(std::vector<int32_t> tokens, int32_t start, std::vector<int32_t> table,
                 SeqStepInput::Logits logits = SeqStepInput::Logits::kLast) {
  SeqStepInput s;
  s.tokens = std::move(tokens);
  s.start_pos = start;
  s.block_table = std::move(table);
  s.logits = logits;
  return s;
}

// Prefill of two sequences (one chunked), then decodes, with a CoW copy.
std::vector<StepInput> Steps() {
  std::vector<StepInput> steps(4);
  steps[0].seqs = {Seq({5, 9, 13, 2, 40, 41, 7}, 0, {0}, SeqStepInput::Logits::kAll),
                   Seq({3, 4, 5}, 0, {2, 3})};
  steps[1].seqs = {Seq({11}, 7, {0}), Seq({60, 61, 62, 63, 64, 65, 66, 67, 68}, 3, {2, 3})};
  steps[2].copies = {{0, 1}};
  steps[2].seqs = {Seq({12}, 8, {1, 4}), Seq({70}, 12, {2, 3})};
  steps[3].seqs = {Seq({13}, 9, {1, 4}), Seq({71}, 13, {2, 3})};
  return steps;
}

TEST_P(ShardedForward, MatchesUnsharded) {
  const int tp = std::get<0>(GetParam());
  const Format fmt = std::get<1>(GetParam());
  const ModelConfig c = SmallGqa();
  const ModelWeights full = RandomWeights(c, 7);
  EngineOptions eo;
  eo.kv_format = fmt.format;
  eo.block_size = 8;
  eo.num_gpu_blocks = 8;
  std::optional<KvQuantParams> qp;
  if (fmt.format.scale_mode == KvScaleMode::kStatic) qp = PerHeadParams(c);

  auto ref = CpuEngine::Create(full, eo, qp);
  ASSERT_TRUE(ref.ok()) << ref.status();
  std::vector<StepOutput> want(Steps().size());
  for (size_t i = 0; i < Steps().size(); ++i) ASSERT_TRUE((*ref)->Step(Steps()[i], &want[i]).ok());

  InMemoryKvStore store;
  std::vector<std::vector<StepOutput>> got(tp, std::vector<StepOutput>(Steps().size()));
  std::vector<absl::Status> status(tp);
  std::vector<std::thread> ranks;
  for (int r = 0; r < tp; ++r) {
    ranks.emplace_back([&, r] {
      status[r] = [&]() -> absl::Status {
        CollectivesOptions co;
        co.rank = r;
        co.world_size = tp;
        co.timeout = absl::Seconds(30);
        auto coll = CreateGlooCollectives(co, &store);
        if (!coll.ok()) return coll.status();
        auto w = SliceWeights(full, {r, tp});
        if (!w.ok()) return w.status();
        CpuShardOptions so{{r, tp}, coll->get(), r == 0};
        auto e = CpuEngine::Create(std::move(*w), eo, qp, so);
        if (!e.ok()) return e.status();
        for (size_t i = 0; i < Steps().size(); ++i) {
          absl::Status s = (*e)->Step(Steps()[i], &got[r][i]);
          if (!s.ok()) return s;
        }
        return absl::OkStatus();
      }();
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < tp; ++r) ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r];
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(got[0][i].row_begin, want[i].row_begin);
    ASSERT_EQ(got[0][i].logits.size(), want[i].logits.size());
    float max_diff = 0.0f, max_abs = 0.0f;
    for (size_t k = 0; k < want[i].logits.size(); ++k) {
      max_diff = std::max(max_diff, std::fabs(got[0][i].logits[k] - want[i].logits[k]));
      max_abs = std::max(max_abs, std::fabs(want[i].logits[k]));
    }
    EXPECT_LE(max_diff, 1e-5f * std::max(1.0f, max_abs)) << "step " << i << " " << fmt.name;
    for (int r = 1; r < tp; ++r) EXPECT_TRUE(got[r][i].logits.empty()) << "rank " << r << " computed logits";
  }
}

INSTANTIATE_TEST_SUITE_P(
    TpAndFormat, ShardedForward,
    ::testing::Combine(::testing::Values(2, 4),
                       ::testing::Values(Format{"fp32", {KvDtype::kFp32, KvScaleMode::kNone}},
                                         Format{"int8_dynamic", {KvDtype::kInt8, KvScaleMode::kDynamic}},
                                         Format{"int8_static", {KvDtype::kInt8, KvScaleMode::kStatic}})),
    [](const auto& info) {
      return absl::StrCat("tp", std::get<0>(info.param), "_", std::get<1>(info.param).name);
    });

}  // namespace
}  // namespace strata
