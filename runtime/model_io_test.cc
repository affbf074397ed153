// Model loading: config.json parsing, safetensors validation, llama2.c
// checkpoints, and a clear error for every kind of bad file.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/safetensors.h"
#include "runtime/weights.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string DataDir() {
  const char* d = std::getenv("STRATA_DATA_DIR");
  return d != nullptr ? d : "../shared/data";
}

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("strata_model_io_" + std::to_string(::getpid()) + "_" +
                                         std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), bytes.size());
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A minimal LLaMA: hidden 8, 2 heads, 1 kv head, intermediate 16, 1 layer, vocab 4.
nlohmann::json TinyConfig() {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"hidden_size", 8},
          {"intermediate_size", 16},
          {"num_hidden_layers", 1},
          {"num_attention_heads", 2},
          {"num_key_value_heads", 1},
          {"vocab_size", 4},
          {"max_position_embeddings", 32},
          {"rms_norm_eps", 1e-5},
          {"tie_word_embeddings", true}};
}

std::map<std::string, std::vector<int64_t>> TinyShapes() {
  return {{"model.embed_tokens.weight", {4, 8}},
          {"model.norm.weight", {8}},
          {"model.layers.0.input_layernorm.weight", {8}},
          {"model.layers.0.post_attention_layernorm.weight", {8}},
          {"model.layers.0.self_attn.q_proj.weight", {8, 8}},
          {"model.layers.0.self_attn.k_proj.weight", {4, 8}},
          {"model.layers.0.self_attn.v_proj.weight", {4, 8}},
          {"model.layers.0.self_attn.o_proj.weight", {8, 8}},
          {"model.layers.0.mlp.gate_proj.weight", {16, 8}},
          {"model.layers.0.mlp.up_proj.weight", {16, 8}},
          {"model.layers.0.mlp.down_proj.weight", {8, 16}}};
}

// Serializes F32 tensors filled with 0.5 into safetensors bytes.
std::string Safetensors(const std::map<std::string, std::vector<int64_t>>& shapes,
                        const std::string& dtype = "F32") {
  nlohmann::json header;
  std::string data;
  for (const auto& [name, shape] : shapes) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const size_t begin = data.size();
    std::vector<float> v(n, 0.5f);
    data.append(reinterpret_cast<const char*>(v.data()), v.size() * 4);
    header[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string h = header.dump();
  while (h.size() % 8) h.push_back(' ');
  uint64_t len = h.size();
  return std::string(reinterpret_cast<const char*>(&len), 8) + h + data;
}

void WriteTinyModel(const TempDir& dir, const nlohmann::json& config, const std::string& st) {
  WriteFile(dir.file("config.json"), config.dump());
  WriteFile(dir.file("model.safetensors"), st);
}

TEST(ModelConfig, ParsesStories15M) {
  auto c = LoadHfConfig(DataDir() + "/models/stories15M/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 288);
  EXPECT_EQ(c->num_layers, 6);
  EXPECT_EQ(c->num_heads, 6);
  EXPECT_EQ(c->num_kv_heads, 6);
  EXPECT_EQ(c->head_dim, 48);
  EXPECT_EQ(c->vocab_size, 32000);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-5f);
}

TEST(ModelConfig, RejectsBadConfigs) {
  struct Case {
    const char* what;
    std::function<void(nlohmann::json&)> edit;
    const char* message;
    absl::StatusCode code;
  };
  const std::vector<Case> cases = {
      {"missing field", [](auto& j) { j.erase("hidden_size"); }, "missing required field \"hidden_size\"",
       absl::StatusCode::kInvalidArgument},
      {"wrong type", [](auto& j) { j["num_hidden_layers"] = "six"; }, "must be an integer",
       absl::StatusCode::kInvalidArgument},
      {"negative", [](auto& j) { j["vocab_size"] = -3; }, "out of range",
       absl::StatusCode::kInvalidArgument},
      {"architecture", [](auto& j) { j["architectures"] = {"GPT2LMHeadModel"}; },
       "unsupported architecture \"GPT2LMHeadModel\"", absl::StatusCode::kUnimplemented},
      {"gqa", [](auto& j) { j["num_key_value_heads"] = 3; }, "not a multiple",
       absl::StatusCode::kInvalidArgument},
      {"heads", [](auto& j) { j["num_attention_heads"] = 3; }, "not divisible",
       absl::StatusCode::kInvalidArgument},
  };
  for (const Case& c : cases) {
    nlohmann::json j = TinyConfig();
    c.edit(j);
    auto r = ParseHfConfig(j.dump(), "/x/config.json");
    ASSERT_FALSE(r.ok()) << c.what;
    EXPECT_EQ(r.status().code(), c.code) << c.what;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("/x/config.json")) << c.what;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(c.message)) << c.what;
  }
  auto r = ParseHfConfig("{not json", "/x/config.json");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("not valid JSON"));
}

TEST(Weights, LoadsTinyModelAndTiesEmbeddings) {
  TempDir dir;
  WriteTinyModel(dir, TinyConfig(), Safetensors(TinyShapes()));
  auto w = LoadModelWeights(dir.path().string());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE(w->lm_head.empty());
  EXPECT_EQ(&w->output_matrix(), &w->embed);
  EXPECT_EQ(w->layers[0].wk.size(), 32u);
}

TEST(Weights, LoadsBf16AndF16) {
  for (const char* dtype : {"F16", "BF16"}) {
    // Same bytes reinterpreted: sizes halve, so build with half-size tensors.
    auto shapes = TinyShapes();
    nlohmann::json header;
    std::string data;
    for (const auto& [name, shape] : shapes) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      const size_t begin = data.size();
      const uint16_t one = std::string(dtype) == "F16" ? 0x3c00 : 0x3f80;
      for (int64_t i = 0; i < n; ++i) data.append(reinterpret_cast<const char*>(&one), 2);
      header[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
    }
    std::string h = header.dump();
    uint64_t len = h.size();
    TempDir dir;
    WriteTinyModel(dir, TinyConfig(), std::string(reinterpret_cast<char*>(&len), 8) + h + data);
    auto w = LoadModelWeights(dir.path().string());
    ASSERT_TRUE(w.ok()) << dtype << ": " << w.status();
    EXPECT_FLOAT_EQ(w->embed[0], 1.0f) << dtype;
  }
}

TEST(Weights, BadSafetensorsFilesNameTheFileAndProblem) {
  const std::string good = Safetensors(TinyShapes());
  uint64_t header_len;
  std::memcpy(&header_len, good.data(), 8);
  struct Case {
    const char* what;
    std::string bytes;
    const char* message;
  };
  std::string past_end = good;
  const uint64_t huge = 1u << 30;
  std::memcpy(past_end.data(), &huge, 8);
  // Lying offsets: claim a tensor ends far past the data section.
  auto lying_shapes = TinyShapes();
  std::string lying = good;
  {
    std::string h = good.substr(8, header_len);
    auto j = nlohmann::json::parse(h);
    j["model.norm.weight"]["data_offsets"] = {0, 1u << 24};
    std::string nh = j.dump();
    uint64_t nl = nh.size();
    lying = std::string(reinterpret_cast<char*>(&nl), 8) + nh + good.substr(8 + header_len);
  }
  const std::vector<Case> cases = {
      {"empty", "", "shorter than the 8-byte header"},
      {"header past end", past_end, "runs past the end"},
      {"truncated data", good.substr(0, good.size() - 100), "outside the"},
      {"garbage header", std::string(8, '\x10') + std::string(16, 'x'), "runs past the end"},
      {"lying offsets", lying, "outside the"},
      {"wrong dtype", Safetensors(TinyShapes(), "I64"), "unsupported dtype \"I64\""},
  };
  for (const Case& c : cases) {
    TempDir dir;
    WriteTinyModel(dir, TinyConfig(), c.bytes);
    auto w = LoadModelWeights(dir.path().string());
    ASSERT_FALSE(w.ok()) << c.what;
    EXPECT_THAT(std::string(w.status().message()), HasSubstr(dir.file("model.safetensors"))) << c.what;
    EXPECT_THAT(std::string(w.status().message()), HasSubstr(c.message)) << c.what;
  }
}

TEST(Weights, ShapeDisagreeingWithConfig) {
  TempDir dir;
  auto shapes = TinyShapes();
  shapes["model.layers.0.self_attn.k_proj.weight"] = {8, 8};  // config says 1 kv head: [4, 8]
  WriteTinyModel(dir, TinyConfig(), Safetensors(shapes));
  auto w = LoadModelWeights(dir.path().string());
  ASSERT_FALSE(w.ok());
  EXPECT_THAT(std::string(w.status().message()),
              HasSubstr("k_proj.weight has shape [8,8] but config.json implies [4,8]"));
}

TEST(Weights, MissingTensorAndMissingFiles) {
  {
    TempDir dir;
    auto shapes = TinyShapes();
    shapes.erase("model.layers.0.mlp.up_proj.weight");
    WriteTinyModel(dir, TinyConfig(), Safetensors(shapes));
    auto w = LoadModelWeights(dir.path().string());
    ASSERT_FALSE(w.ok());
    EXPECT_THAT(std::string(w.status().message()), HasSubstr("missing tensor model.layers.0.mlp.up_proj.weight"));
  }
  {
    TempDir dir;
    auto j = TinyConfig();
    j["tie_word_embeddings"] = false;
    WriteTinyModel(dir, j, Safetensors(TinyShapes()));
    auto w = LoadModelWeights(dir.path().string());
    ASSERT_FALSE(w.ok());
    EXPECT_THAT(std::string(w.status().message()), HasSubstr("lm_head.weight"));
  }
  {
    TempDir dir;
    WriteFile(dir.file("config.json"), TinyConfig().dump());
    auto w = LoadModelWeights(dir.path().string());
    ASSERT_FALSE(w.ok());
    EXPECT_THAT(std::string(w.status().message()), HasSubstr("no model.safetensors"));
  }
  auto w = LoadModelWeights("/nonexistent/model");
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("/nonexistent/model"));
}

TEST(Weights, ShardedCheckpointThroughIndex) {
  TempDir dir;
  auto shapes = TinyShapes();
  std::map<std::string, std::vector<int64_t>> a, b;
  nlohmann::json index = {{"weight_map", nlohmann::json::object()}};
  int i = 0;
  for (const auto& [name, shape] : shapes) {
    ((i++ % 2) ? a : b)[name] = shape;
    index["weight_map"][name] = (i % 2) ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  WriteFile(dir.file("config.json"), TinyConfig().dump());
  WriteFile(dir.file("model-00001-of-00002.safetensors"), Safetensors(a));
  WriteFile(dir.file("model-00002-of-00002.safetensors"), Safetensors(b));
  WriteFile(dir.file("model.safetensors.index.json"), index.dump());
  auto w = LoadModelWeights(dir.path().string());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->layers.size(), 1u);
}

TEST(Llama2c, LoadsAndMatchesHfCheckpoint) {
  auto a = LoadModelWeights(DataDir() + "/models/stories15M-llama2c/stories15M.bin");
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = LoadModelWeights(DataDir() + "/models/stories15M");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->config.hidden_size, b->config.hidden_size);
  EXPECT_EQ(a->config.max_position_embeddings, 256);
  // After permuting to the rotate_half layout, q/k must equal the HF export.
  EXPECT_EQ(a->layers[3].wq, b->layers[3].wq);
  EXPECT_EQ(a->layers[3].wk, b->layers[3].wk);
  EXPECT_EQ(a->layers[5].w_down, b->layers[5].w_down);
  EXPECT_EQ(a->embed, b->embed);
}

TEST(Llama2c, TruncatedAndGarbageFiles) {
  const std::string real = ReadFile(DataDir() + "/models/stories15M-llama2c/stories15M.bin");
  ASSERT_GT(real.size(), 1000u);
  TempDir dir;
  const struct {
    const char* name;
    std::string bytes;
    const char* message;
  } cases[] = {
      {"short.bin", real.substr(0, 20), "shorter than its 28-byte header"},
      {"truncated.bin", real.substr(0, real.size() / 2), "truncated or wrong format"},
      {"garbage.bin", std::string(64, '\xff'), "not a llama2.c checkpoint"},
  };
  for (const auto& c : cases) {
    WriteFile(dir.file(c.name), c.bytes);
    auto w = LoadModelWeights(dir.file(c.name));
    ASSERT_FALSE(w.ok()) << c.name;
    EXPECT_THAT(std::string(w.status().message()), HasSubstr(dir.file(c.name)));
    EXPECT_THAT(std::string(w.status().message()), HasSubstr(c.message)) << c.name;
  }
}

TEST(NamedShapes, KnownAndUnknown) {
  auto c = NamedModelShape("llama-2-70b");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_NEAR(c->num_parameters() / 1e9, 69.0, 1.0);
  EXPECT_FALSE(NamedModelShape("gpt-5").ok());
  auto longer = NamedModelShape("llama-2-7b:20480");
  ASSERT_TRUE(longer.ok());
  EXPECT_EQ(longer->max_position_embeddings, 20480);
  EXPECT_EQ(longer->hidden_size, 4096);
  EXPECT_FALSE(NamedModelShape("llama-2-7b:x").ok());
  EXPECT_FALSE(NamedModelShape("llama-2-7b:0").ok());
}

TEST(NamedShapes, ConfigJsonPath) {
  TempDir dir;
  WriteFile(dir.file("shape.json"), TinyConfig().dump());
  auto c = NamedModelShape(dir.file("shape.json"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, TinyConfig()["hidden_size"].get<int>());
  EXPECT_EQ(c->num_layers, TinyConfig()["num_hidden_layers"].get<int>());
  auto missing = NamedModelShape(dir.file("none.json"));
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("none.json"));
  nlohmann::json bad = TinyConfig();
  bad["num_attention_heads"] = 3;  // does not divide hidden_size
  WriteFile(dir.file("bad.json"), bad.dump());
  auto invalid = NamedModelShape(dir.file("bad.json"));
  ASSERT_FALSE(invalid.ok());
  EXPECT_THAT(std::string(invalid.status().message()), HasSubstr("bad.json"));
}

}  // namespace
}  // namespace strata
