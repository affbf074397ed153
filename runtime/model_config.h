// LLaMA-family model configuration, read from a Hugging Face config.json or a
// llama2.c checkpoint header.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace strata {

enum class WeightDtype : uint8_t { kFp32, kFp16, kBf16 };
const char* WeightDtypeName(WeightDtype d);

struct ModelConfig {
  std::string architecture = "LlamaForCausalLM";
  int32_t hidden_size = 0;
  int32_t intermediate_size = 0;
  int32_t num_layers = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t vocab_size = 0;
  int32_t max_position_embeddings = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  bool tie_word_embeddings = false;
  WeightDtype torch_dtype = WeightDtype::kFp32;
  int32_t bos_token_id = 1;
  int32_t eos_token_id = 2;

  int32_t q_size() const { return num_heads * head_dim; }
  int32_t kv_size() const { return num_kv_heads * head_dim; }
  // Parameters of the whole model (for capacity planning and benchmarks).
  int64_t num_parameters() const;
};

// Parses config.json text. `source` names the file in error messages.
absl::StatusOr<ModelConfig> ParseHfConfig(const std::string& json_text, const std::string& source);
absl::StatusOr<ModelConfig> LoadHfConfig(const std::string& path);

// Checks internal consistency (positive sizes, heads divide hidden size, GQA
// divisibility). Errors name `source`.
absl::Status ValidateModelConfig(const ModelConfig& config, const std::string& source);

// Shapes for --load-format dummy: llama-2-7b, llama-2-13b, llama-2-70b,
// llama-3-8b, stories15m; "NAME:CONTEXT" overrides max_position_embeddings.
// A path ending in ".json" is read as a config.json (LoadHfConfig, validated).
absl::StatusOr<ModelConfig> NamedModelShape(const std::string& shape);

}  // namespace strata
