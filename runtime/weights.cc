#include "runtime/weights.h"

#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "runtime/gguf.h"
#include "runtime/safetensors.h"
#include "runtime/status_macros.h"

namespace strata {
namespace {

absl::Status LoadMatrix(const SafetensorsCheckpoint& ckpt, const std::string& name,
                        std::vector<int64_t> shape, std::vector<float>* out) {
  ASSIGN_OR_RETURN(const TensorRef* t, ckpt.Find(name));
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  out->resize(n);
  return CopyTensorToFloat(*t, shape, out->data());
}

}  // namespace

absl::StatusOr<ModelWeights> LoadHfWeights(const std::string& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) return absl::NotFoundError(absl::StrCat(dir, ": not a directory"));
  ModelWeights w;
  ASSIGN_OR_RETURN(w.config, LoadHfConfig((fs::path(dir) / "config.json").string()));
  ASSIGN_OR_RETURN(auto ckpt, SafetensorsCheckpoint::OpenDirectory(dir));
  const ModelConfig& c = w.config;
  const int64_t h = c.hidden_size, q = c.q_size(), kv = c.kv_size(), f = c.intermediate_size;
  ASSIGN_OR_RETURN(const TensorRef* embed, ckpt->Find("model.embed_tokens.weight"));
  w.source_dtype = embed->dtype;
  RETURN_IF_ERROR(LoadMatrix(*ckpt, "model.embed_tokens.weight", {c.vocab_size, h}, &w.embed));
  RETURN_IF_ERROR(LoadMatrix(*ckpt, "model.norm.weight", {h}, &w.final_norm));
  if (ckpt->Contains("lm_head.weight")) {
    RETURN_IF_ERROR(LoadMatrix(*ckpt, "lm_head.weight", {c.vocab_size, h}, &w.lm_head));
  } else if (!c.tie_word_embeddings) {
    return absl::NotFoundError(absl::StrCat(
        ckpt->source(), ": missing tensor lm_head.weight and config.json does not set "
                        "tie_word_embeddings"));
  }
  w.layers.resize(c.num_layers);
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights& l = w.layers[i];
    RETURN_IF_ERROR(LoadMatrix(*ckpt, p + "input_layernorm.weight", {h}, &l.attn_norm));
    RETURN_IF_ERROR(LoadMatrix(*ckpt, p + "self_attn.q_proj.weight", {q, h}, &l.wq));
    RETURN_IF_ERROR(LoadMatrix(*ckpt, p + "self_attn.k_proj.weight", {kv, h}, &l.wk));
    RETURN_IF_ERROR(LoadMatrix(*ckpt, p + "self_attn.v_proj.weight", {kv, h}, &l.wv));
    RETURN_IF_ERROR(LoadMatrix(*ckpt, p + "self_attn.o_proj.weight", {h, q}, &l.wo));
    RETURN_IF_ERROR(LoadMatrix(*ckpt, p + "post_attention_layernorm.weight", {h}, &l.mlp_norm));
    RETURN_IF_ERROR(LoadMatrix(*ckpt, p + "mlp.gate_proj.weight", {f, h}, &l.w_gate));
    RETURN_IF_ERROR(LoadMatrix(*ckpt, p + "mlp.up_proj.weight", {f, h}, &l.w_up));
    RETURN_IF_ERROR(LoadMatrix(*ckpt, p + "mlp.down_proj.weight", {h, f}, &l.w_down));
  }
  return w;
}

absl::StatusOr<ModelWeights> LoadModelWeights(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec)) return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
  if (fs::is_regular_file(path)) {
    if (fs::path(path).extension() == ".bin") return LoadLlama2cWeights(path);
    if (fs::path(path).extension() == ".gguf") return LoadGgufWeights(path);
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a model directory (config.json + *.safetensors), a llama2.c .bin file or a "
              ".gguf file"));
  }
  if (fs::exists(fs::path(path) / "config.json")) return LoadHfWeights(path);
  std::vector<fs::path> bins;
  for (const auto& e : fs::directory_iterator(path, ec)) {
    if (e.path().extension() == ".bin" && e.path().filename() != "tokenizer.bin") bins.push_back(e.path());
  }
  if (bins.size() == 1) return LoadLlama2cWeights(bins[0].string());
  return absl::NotFoundError(absl::StrCat(
      path, ": no config.json, and not exactly one llama2.c .bin checkpoint in the directory"));
}

ModelWeights RandomWeights(const ModelConfig& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  auto fill = [&](std::vector<float>& v, int64_t n) {
    v.resize(n);
    for (float& x : v) x = dist(rng);
  };
  auto ones = [](std::vector<float>& v, int64_t n) { v.assign(n, 1.0f); };
  ModelWeights w;
  w.config = c;
  const int64_t h = c.hidden_size, q = c.q_size(), kv = c.kv_size(), f = c.intermediate_size;
  fill(w.embed, int64_t{c.vocab_size} * h);
  ones(w.final_norm, h);
  if (!c.tie_word_embeddings) fill(w.lm_head, int64_t{c.vocab_size} * h);
  w.layers.resize(c.num_layers);
  for (LayerWeights& l : w.layers) {
    ones(l.attn_norm, h);
    ones(l.mlp_norm, h);
    fill(l.wq, q * h);
    fill(l.wk, kv * h);
    fill(l.wv, kv * h);
    fill(l.wo, h * q);
    fill(l.w_gate, f * h);
    fill(l.w_up, f * h);
    fill(l.w_down, h * f);
  }
  return w;
}

}  // namespace strata
