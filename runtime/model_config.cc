#include "runtime/model_config.h"

#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/status_macros.h"

namespace strata {

const char* WeightDtypeName(WeightDtype d) {
  switch (d) {
    case WeightDtype::kFp32: return "float32";
    case WeightDtype::kFp16: return "float16";
    case WeightDtype::kBf16: return "bfloat16";
  }
  return "?";
}

int64_t ModelConfig::num_parameters() const {
  const int64_t h = hidden_size;
  const int64_t per_layer = h * q_size() + 2 * h * kv_size() + q_size() * h +
                            3 * h * int64_t{intermediate_size} + 2 * h;
  const int64_t embed = int64_t{vocab_size} * h;
  return embed * (tie_word_embeddings ? 1 : 2) + per_layer * num_layers + h;
}

namespace {

using nlohmann::json;

absl::Status Invalid(const std::string& source, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
}

absl::StatusOr<int32_t> RequiredInt(const json& j, const char* key, const std::string& source) {
  auto it = j.find(key);
  if (it == j.end()) return Invalid(source, absl::StrCat("missing required field \"", key, "\""));
  if (!it->is_number_integer()) {
    return Invalid(source, absl::StrCat("field \"", key, "\" must be an integer"));
  }
  const int64_t v = it->get<int64_t>();
  if (v <= 0 || v > (int64_t{1} << 30)) {
    return Invalid(source, absl::StrCat("field \"", key, "\" out of range: ", v));
  }
  return static_cast<int32_t>(v);
}

absl::StatusOr<int32_t> OptionalInt(const json& j, const char* key, int32_t fallback,
                                    const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  return RequiredInt(j, key, source);
}

absl::StatusOr<float> OptionalFloat(const json& j, const char* key, float fallback,
                                    const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) return Invalid(source, absl::StrCat("field \"", key, "\" must be a number"));
  return it->get<float>();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseHfConfig(const std::string& json_text, const std::string& source) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Invalid(source, "not valid JSON");
  if (!j.is_object()) return Invalid(source, "top level is not a JSON object");

  ModelConfig c;
  if (auto it = j.find("architectures"); it != j.end()) {
    if (!it->is_array() || it->empty() || !(*it)[0].is_string()) {
      return Invalid(source, "\"architectures\" must be a non-empty list of strings");
    }
    c.architecture = (*it)[0].get<std::string>();
  } else if (auto mt = j.find("model_type"); mt != j.end() && mt->is_string()) {
    c.architecture = mt->get<std::string>() == "llama" ? "LlamaForCausalLM" : mt->get<std::string>();
  } else {
    return Invalid(source, "missing \"architectures\" (or \"model_type\")");
  }
  if (c.architecture != "LlamaForCausalLM" && c.architecture != "MistralForCausalLM") {
    return absl::UnimplementedError(absl::StrCat(source, ": unsupported architecture \"",
                                                 c.architecture,
                                                 "\" (supported: LlamaForCausalLM)"));
  }
  ASSIGN_OR_RETURN(c.hidden_size, RequiredInt(j, "hidden_size", source));
  ASSIGN_OR_RETURN(c.intermediate_size, RequiredInt(j, "intermediate_size", source));
  ASSIGN_OR_RETURN(c.num_layers, RequiredInt(j, "num_hidden_layers", source));
  ASSIGN_OR_RETURN(c.num_heads, RequiredInt(j, "num_attention_heads", source));
  ASSIGN_OR_RETURN(c.num_kv_heads, OptionalInt(j, "num_key_value_heads", c.num_heads, source));
  ASSIGN_OR_RETURN(c.vocab_size, RequiredInt(j, "vocab_size", source));
  ASSIGN_OR_RETURN(c.max_position_embeddings,
                   OptionalInt(j, "max_position_embeddings", 2048, source));
  if (c.hidden_size % c.num_heads != 0) {
    return Invalid(source, absl::StrCat("hidden_size ", c.hidden_size,
                                        " is not divisible by num_attention_heads ", c.num_heads));
  }
  ASSIGN_OR_RETURN(c.head_dim, OptionalInt(j, "head_dim", c.hidden_size / c.num_heads, source));
  ASSIGN_OR_RETURN(c.rms_norm_eps, OptionalFloat(j, "rms_norm_eps", 1e-6f, source));
  ASSIGN_OR_RETURN(c.rope_theta, OptionalFloat(j, "rope_theta", 10000.0f, source));
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    return absl::UnimplementedError(absl::StrCat(source, ": rope_scaling is not supported yet"));
  }
  if (auto it = j.find("tie_word_embeddings"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) return Invalid(source, "\"tie_word_embeddings\" must be a boolean");
    c.tie_word_embeddings = it->get<bool>();
  }
  if (auto it = j.find("torch_dtype"); it != j.end() && it->is_string()) {
    const std::string d = it->get<std::string>();
    if (d == "float32") c.torch_dtype = WeightDtype::kFp32;
    else if (d == "float16") c.torch_dtype = WeightDtype::kFp16;
    else if (d == "bfloat16") c.torch_dtype = WeightDtype::kBf16;
    else return Invalid(source, absl::StrCat("unsupported torch_dtype \"", d, "\""));
  }
  ASSIGN_OR_RETURN(c.bos_token_id, OptionalInt(j, "bos_token_id", 1, source));
  ASSIGN_OR_RETURN(c.eos_token_id, OptionalInt(j, "eos_token_id", 2, source));
  RETURN_IF_ERROR(ValidateModelConfig(c, source));
  return c;
}

absl::StatusOr<ModelConfig> LoadHfConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open config file"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseHfConfig(ss.str(), path);
}

absl::Status ValidateModelConfig(const ModelConfig& c, const std::string& source) {
  if (c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 ||
      c.num_kv_heads <= 0 || c.head_dim <= 0 || c.vocab_size <= 0) {
    return Invalid(source, "model sizes must be positive");
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return Invalid(source, absl::StrCat("num_attention_heads ", c.num_heads,
                                        " is not a multiple of num_key_value_heads ",
                                        c.num_kv_heads));
  }
  if (c.head_dim % 2 != 0) return Invalid(source, "head_dim must be even for RoPE");
  if (!(c.rms_norm_eps > 0.0f)) return Invalid(source, "rms_norm_eps must be positive");
  if (!(c.rope_theta > 0.0f)) return Invalid(source, "rope_theta must be positive");
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> NamedModelShape(const std::string& shape) {
  if (shape.ends_with(".json")) {
    ASSIGN_OR_RETURN(ModelConfig c, LoadHfConfig(shape));
    RETURN_IF_ERROR(ValidateModelConfig(c, shape));
    return c;
  }
  // "NAME" or "NAME:CONTEXT" (a longer max_position_embeddings, e.g. for
  // long-context benchmarks on random weights).
  std::string name = shape;
  int32_t context = 0;
  if (const size_t colon = shape.find(':'); colon != std::string::npos) {
    name = shape.substr(0, colon);
    if (!absl::SimpleAtoi(shape.substr(colon + 1), &context) || context < 16 || context > (1 << 20)) {
      return absl::InvalidArgumentError(absl::StrCat("model shape \"", shape,
                                                     "\": the context after ':' must be in [16, 1048576]"));
    }
  }
  ModelConfig c;
  c.torch_dtype = WeightDtype::kFp16;
  c.vocab_size = 32000;
  c.max_position_embeddings = 4096;
  if (name == "llama-2-7b") {
    c.hidden_size = 4096, c.intermediate_size = 11008, c.num_layers = 32, c.num_heads = 32,
    c.num_kv_heads = 32;
  } else if (name == "llama-2-13b") {
    c.hidden_size = 5120, c.intermediate_size = 13824, c.num_layers = 40, c.num_heads = 40,
    c.num_kv_heads = 40;
  } else if (name == "llama-2-70b") {
    c.hidden_size = 8192, c.intermediate_size = 28672, c.num_layers = 80, c.num_heads = 64,
    c.num_kv_heads = 8;
  } else if (name == "llama-3-8b") {
    c.hidden_size = 4096, c.intermediate_size = 14336, c.num_layers = 32, c.num_heads = 32,
    c.num_kv_heads = 8, c.vocab_size = 128256, c.max_position_embeddings = 8192,
    c.rope_theta = 500000.0f;
  } else if (name == "stories15m") {
    c.hidden_size = 288, c.intermediate_size = 768, c.num_layers = 6, c.num_heads = 6,
    c.num_kv_heads = 6, c.max_position_embeddings = 256, c.tie_word_embeddings = true;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown model shape \"", name,
        "\" (known: llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, stories15m; NAME:CONTEXT "
        "sets the context)"));
  }
  c.head_dim = c.hidden_size / c.num_heads;
  if (context > 0) c.max_position_embeddings = context;
  return c;
}

}  // namespace strata
