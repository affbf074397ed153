// Host-side LLaMA weights in fp32, loaded from a Hugging Face directory
// (config.json + safetensors) or a llama2.c checkpoint (.bin).
//
// Matrices are row-major [out_features][in_features] (nn.Linear layout), so
// y = x W^T. q/k rows use the Hugging Face rotate_half RoPE layout whatever
// the source: llama2.c's interleaved layout is permuted at load.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model_config.h"

namespace strata {

struct LayerWeights {
  std::vector<float> attn_norm;  // [hidden]
  std::vector<float> wq;         // [num_heads*head_dim][hidden]
  std::vector<float> wk;         // [num_kv_heads*head_dim][hidden]
  std::vector<float> wv;         // [num_kv_heads*head_dim][hidden]
  std::vector<float> wo;         // [hidden][num_heads*head_dim]
  std::vector<float> mlp_norm;   // [hidden]
  std::vector<float> w_gate;     // [intermediate][hidden]
  std::vector<float> w_up;       // [intermediate][hidden]
  std::vector<float> w_down;     // [hidden][intermediate]
};

struct ModelWeights {
  ModelConfig config;
  WeightDtype source_dtype = WeightDtype::kFp32;  // dtype stored in the checkpoint
  std::vector<float> embed;       // [vocab][hidden]
  std::vector<float> final_norm;  // [hidden]
  std::vector<float> lm_head;     // [vocab][hidden]; empty when tied to `embed`
  std::vector<LayerWeights> layers;

  const std::vector<float>& output_matrix() const { return lm_head.empty() ? embed : lm_head; }
};

// `path` is a directory holding config.json + safetensors, or a llama2.c
// .bin file (or a directory holding exactly one *.bin).
absl::StatusOr<ModelWeights> LoadModelWeights(const std::string& path);

absl::StatusOr<ModelWeights> LoadHfWeights(const std::string& dir);
absl::StatusOr<ModelWeights> LoadLlama2cWeights(const std::string& bin_path);

// Random weights of a given shape (for tests and benchmarks), deterministic in `seed`.
ModelWeights RandomWeights(const ModelConfig& config, uint64_t seed);

}  // namespace strata
