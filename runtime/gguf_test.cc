// Tests for runtime/gguf.h: block dequantization against hand-computed values,
// metadata parsing, corrupt files, the q/k un-permutation (a random model
// written the way llama.cpp's convert_hf_to_gguf.py writes it must load back
// to the HF layout), and the real SmolLM2-135M GGUF when it has been fetched
// (tools/fetch_smollm2.sh).
#include "runtime/gguf.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "runtime/float16.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

// --- a minimal GGUF writer ---------------------------------------------------

class GgufWriter {
 public:
  void Str(const std::string& s) { U64(s.size()), meta_.append(s); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void F32(float v) { Raw(&v, 4); }

  void KvU32(const std::string& k, uint32_t v) { ++kv_, Str(k), U32(4), U32(v); }
  void KvF32(const std::string& k, float v) { ++kv_, Str(k), U32(6), F32(v); }
  void KvBool(const std::string& k, bool v) { ++kv_, Str(k), U32(7), meta_.push_back(v ? 1 : 0); }
  void KvStr(const std::string& k, const std::string& v) { ++kv_, Str(k), U32(8), Str(v); }
  void KvStrs(const std::string& k, const std::vector<std::string>& v) {
    ++kv_, Str(k), U32(9), U32(8), U64(v.size());
    for (const auto& s : v) Str(s);
  }
  void KvI32s(const std::string& k, const std::vector<int32_t>& v) {
    ++kv_, Str(k), U32(9), U32(5), U64(v.size());
    for (int32_t x : v) Raw(&x, 4);
  }
  // `dims` in GGUF order (fastest first); `bytes` the encoded data.
  void Tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type,
              const std::string& bytes) {
    tensors_.push_back({name, std::move(dims), type, bytes});
  }
  void TensorF32(const std::string& name, std::vector<uint64_t> dims, const std::vector<float>& v) {
    Tensor(name, std::move(dims), 0, std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4));
  }

  std::string Build() {
    std::string head = "GGUF";
    auto raw = [&](const void* p, size_t n) { head.append(static_cast<const char*>(p), n); };
    const uint32_t version = 3;
    const uint64_t nt = tensors_.size(), nkv = kv_;
    raw(&version, 4), raw(&nt, 8), raw(&nkv, 8);
    head += meta_;
    std::string data;
    for (const auto& t : tensors_) {
      const uint64_t len = t.name.size(), rank = t.dims.size(), off = data.size();
      raw(&len, 8), head += t.name, raw(&rank, 4);
      for (uint64_t d : t.dims) raw(&d, 8);
      raw(&t.type, 4), raw(&off, 8);
      data += t.bytes;
      data.resize((data.size() + 31) / 32 * 32, '\0');
    }
    head.resize((head.size() + 31) / 32 * 32, '\0');
    return head + data;
  }

 private:
  void Raw(const void* p, size_t n) { meta_.append(static_cast<const char*>(p), n); }
  struct T {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type;
    std::string bytes;
  };
  std::string meta_;
  uint64_t kv_ = 0;
  std::vector<T> tensors_;
};

std::string Half(float f) {
  const uint16_t h = FloatToHalf(f);
  return std::string(reinterpret_cast<const char*>(&h), 2);
}

std::string TempFile(const std::string& name, const std::string& bytes) {
  const std::string path =
      (fs::temp_directory_path() / ("strata_gguf_test_" + std::to_string(getpid()) + "_" + name)).string();
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

// --- dequantization ------------------------------------------------------------

TEST(GgufDequantize, BlockFormatsMatchHandComputedValues) {
  // Q8_0: d = 0.5, q = -16..15 -> value = 0.5 q.
  std::string q8 = Half(0.5f);
  for (int j = 0; j < 32; ++j) q8.push_back(static_cast<char>(static_cast<int8_t>(j - 16)));
  // Q4_0: d = 0.25, byte j = (lo = j % 16) | (hi = 15 - j % 16) << 4; value = d (q - 8).
  std::string q40 = Half(0.25f);
  for (int j = 0; j < 16; ++j) q40.push_back(static_cast<char>(j | ((15 - j) << 4)));
  // Q4_1: d = 2, m = -3; value = d q + m.
  std::string q41 = Half(2.0f) + Half(-3.0f);
  for (int j = 0; j < 16; ++j) q41.push_back(static_cast<char>(j | ((15 - j) << 4)));
  std::vector<float> out(32);
  ASSERT_TRUE(DequantizeGgml(8, reinterpret_cast<const uint8_t*>(q8.data()), 32, out.data()).ok());
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], 0.5f * (j - 16)) << j;
  ASSERT_TRUE(DequantizeGgml(2, reinterpret_cast<const uint8_t*>(q40.data()), 32, out.data()).ok());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 0.25f * (j - 8)) << j;             // low nibbles first
    EXPECT_EQ(out[j + 16], 0.25f * (15 - j - 8)) << j;   // then high nibbles
  }
  ASSERT_TRUE(DequantizeGgml(3, reinterpret_cast<const uint8_t*>(q41.data()), 32, out.data()).ok());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 2.0f * j - 3.0f) << j;
    EXPECT_EQ(out[j + 16], 2.0f * (15 - j) - 3.0f) << j;
  }
  const std::string f16 = Half(1.5f) + Half(-0.125f);
  ASSERT_TRUE(DequantizeGgml(1, reinterpret_cast<const uint8_t*>(f16.data()), 2, out.data()).ok());
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -0.125f);
  // Unsupported type (Q4_K) and a length that is not a whole number of blocks.
  EXPECT_EQ(DequantizeGgml(12, nullptr, 256, out.data()).code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(DequantizeGgml(8, nullptr, 31, out.data()).code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(GgmlTensorBytes(3, 64), 40);
  EXPECT_EQ(GgmlTensorBytes(8, 64), 68);
}

// --- metadata and errors --------------------------------------------------------

TEST(GgufFile, ParsesMetadataAndTensors) {
  GgufWriter w;
  w.KvStr("general.architecture", "llama");
  w.KvU32("llama.block_count", 2);
  w.KvF32("llama.rope.freq_base", 100000.0f);
  w.KvBool("tokenizer.ggml.add_bos_token", true);
  w.KvStrs("tokenizer.ggml.tokens", {"a", "b", "c"});
  w.KvI32s("tokenizer.ggml.token_type", {1, 3, 1});
  w.TensorF32("x", {3, 2}, {1, 2, 3, 4, 5, 6});
  const std::string img = w.Build();
  auto f = GgufFile::Parse(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "mem");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->version(), 3u);
  EXPECT_EQ(*(*f)->GetString("general.architecture"), "llama");
  EXPECT_EQ(*(*f)->GetInt("llama.block_count"), 2);
  EXPECT_EQ(*(*f)->GetFloat("llama.rope.freq_base"), 100000.0);
  EXPECT_TRUE(*(*f)->GetBool("tokenizer.ggml.add_bos_token"));
  EXPECT_EQ((**(*f)->GetStringArray("tokenizer.ggml.tokens")).size(), 3u);
  EXPECT_EQ((**(*f)->GetIntArray("tokenizer.ggml.token_type"))[1], 3);
  EXPECT_EQ((*f)->GetInt("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*f)->GetInt("general.architecture").status().code(), absl::StatusCode::kInvalidArgument);
  auto t = (*f)->FindTensor("x");
  ASSERT_TRUE(t.ok());
  std::vector<float> out(6);
  ASSERT_TRUE((*f)->Dequantize(**t, {2, 3}, out.data()).ok());
  EXPECT_EQ(out[5], 6.0f);
  const auto bad = (*f)->Dequantize(**t, {3, 2}, out.data());
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("'x' has shape [2, 3], expected [3, 2]"), std::string::npos) << bad;
}

TEST(GgufFile, CorruptFilesAreDataLossNamingTheFile) {
  GgufWriter w;
  w.KvStr("general.architecture", "llama");
  w.KvStrs("tokenizer.ggml.tokens", {"a", "b", "c"});
  w.TensorF32("x", {4, 4}, std::vector<float>(16, 1.0f));
  const std::string img = w.Build();
  // Every truncation point fails cleanly (no crash), as DATA_LOSS.
  for (size_t n = 0; n < img.size(); n += 7) {
    auto f = GgufFile::Parse(reinterpret_cast<const uint8_t*>(img.data()), n, "cut.gguf");
    ASSERT_FALSE(f.ok()) << n;
    EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss) << n << " " << f.status();
    EXPECT_NE(f.status().message().find("cut.gguf"), std::string::npos) << f.status();
  }
  std::string bad_magic = img;
  bad_magic[0] = 'X';
  auto f = GgufFile::Parse(reinterpret_cast<const uint8_t*>(bad_magic.data()), bad_magic.size(), "m");
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(GgufFile::Open("/nonexistent/model.gguf").status().code(), absl::StatusCode::kNotFound);
}

// --- q/k permutation ------------------------------------------------------------

// convert_hf_to_gguf.py's LlamaModel.permute:
//   w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
std::vector<float> LlamaCppPermute(const std::vector<float>& w, int n_head, int cols) {
  const int rows = static_cast<int>(w.size()) / cols, half = rows / n_head / 2;
  std::vector<float> out(w.size());
  for (int h = 0; h < n_head; ++h) {
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < half; ++b) {
        // source index [h][a][b] -> destination [h][b][a]
        const float* src = &w[(static_cast<size_t>(h) * 2 * half + a * half + b) * cols];
        float* dst = &out[(static_cast<size_t>(h) * 2 * half + b * 2 + a) * cols];
        std::memcpy(dst, src, sizeof(float) * cols);
      }
    }
  }
  return out;
}

TEST(GgufWeights, UndoesLlamaCppQkPermutation) {
  ModelConfig c;
  c.hidden_size = 64, c.intermediate_size = 96, c.num_layers = 2, c.num_heads = 4;
  c.num_kv_heads = 2, c.head_dim = 16, c.vocab_size = 40, c.max_position_embeddings = 128;
  c.tie_word_embeddings = true;
  const ModelWeights ref = RandomWeights(c, 7);
  GgufWriter w;
  w.KvStr("general.architecture", "llama");
  w.KvU32("llama.context_length", 128);
  w.KvU32("llama.embedding_length", 64);
  w.KvU32("llama.block_count", 2);
  w.KvU32("llama.feed_forward_length", 96);
  w.KvU32("llama.attention.head_count", 4);
  w.KvU32("llama.attention.head_count_kv", 2);
  w.KvF32("llama.rope.freq_base", 50000.0f);
  w.KvF32("llama.attention.layer_norm_rms_epsilon", 1e-6f);
  w.KvU32("llama.vocab_size", 40);
  const uint64_t h = 64;
  w.TensorF32("token_embd.weight", {h, 40}, ref.embed);
  w.TensorF32("output_norm.weight", {h}, ref.final_norm);
  for (int i = 0; i < 2; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    const LayerWeights& l = ref.layers[i];
    w.TensorF32(p + "attn_norm.weight", {h}, l.attn_norm);
    w.TensorF32(p + "attn_q.weight", {h, 64}, LlamaCppPermute(l.wq, 4, 64));
    w.TensorF32(p + "attn_k.weight", {h, 32}, LlamaCppPermute(l.wk, 2, 64));
    w.TensorF32(p + "attn_v.weight", {h, 32}, l.wv);
    w.TensorF32(p + "attn_output.weight", {64, h}, l.wo);
    w.TensorF32(p + "ffn_norm.weight", {h}, l.mlp_norm);
    w.TensorF32(p + "ffn_gate.weight", {h, 96}, l.w_gate);
    w.TensorF32(p + "ffn_up.weight", {h, 96}, l.w_up);
    w.TensorF32(p + "ffn_down.weight", {96, h}, l.w_down);
  }
  const std::string path = TempFile("tiny.gguf", w.Build());
  auto got = LoadModelWeights(path);  // through the .gguf dispatch
  std::filesystem::remove(path);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->config.num_kv_heads, 2);
  EXPECT_EQ(got->config.head_dim, 16);
  EXPECT_EQ(got->config.rope_theta, 50000.0f);
  EXPECT_FLOAT_EQ(got->config.rms_norm_eps, 1e-6f);
  EXPECT_TRUE(got->config.tie_word_embeddings);
  EXPECT_TRUE(got->lm_head.empty());
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(got->layers[i].wq, ref.layers[i].wq) << "layer " << i;
    EXPECT_EQ(got->layers[i].wk, ref.layers[i].wk) << "layer " << i;
    EXPECT_EQ(got->layers[i].wv, ref.layers[i].wv) << "layer " << i;
    EXPECT_EQ(got->layers[i].w_down, ref.layers[i].w_down) << "layer " << i;
  }
  EXPECT_EQ(got->embed, ref.embed);
  // Negative control: without the permutation the rows differ.
  EXPECT_NE(LlamaCppPermute(ref.layers[0].wq, 4, 64), ref.layers[0].wq);
}

// --- the real SmolLM2 file --------------------------------------------------------

std::string SmolLm2Path() {
  if (const char* p = std::getenv("STRATA_SMOLLM2_GGUF"); p != nullptr && *p) return p;
  std::string cache;
  if (const char* c = std::getenv("STRATA_MODEL_CACHE"); c != nullptr && *c) {
    cache = c;
  } else if (const char* home = std::getenv("HOME"); home != nullptr) {
    cache = std::string(home) + "/.cache/strata/models";
  }
  return cache + "/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf";
}

TEST(GgufSmolLm2, ConfigAndWeights) {
  const std::string path = SmolLm2Path();
  if (!fs::exists(path)) {
    GTEST_SKIP() << path << " is absent: run tools/fetch_smollm2.sh (or set STRATA_SMOLLM2_GGUF)";
  }
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  auto c = GgufModelConfig(**f);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_layers, 30);
  EXPECT_EQ(c->hidden_size, 576);
  EXPECT_EQ(c->intermediate_size, 1536);
  EXPECT_EQ(c->num_heads, 9);
  EXPECT_EQ(c->num_kv_heads, 3);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->max_position_embeddings, 8192);
  EXPECT_EQ(c->vocab_size, 49152);
  EXPECT_EQ(c->rope_theta, 100000.0f);
  EXPECT_TRUE(c->tie_word_embeddings);
  auto w = LoadModelWeights(path);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(w->layers.size(), 30u);
  // Dequantized values are finite and of a plausible scale.
  double sum2 = 0;
  for (float x : w->layers[0].wq) {
    ASSERT_TRUE(std::isfinite(x));
    sum2 += double(x) * x;
  }
  const double rms = std::sqrt(sum2 / w->layers[0].wq.size());
  EXPECT_GT(rms, 1e-3);
  EXPECT_LT(rms, 1.0);
}

}  // namespace
}  // namespace strata
