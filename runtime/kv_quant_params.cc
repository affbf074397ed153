#include "runtime/kv_quant_params.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/kv_format_util.h"
#include "runtime/status_macros.h"

namespace strata {
namespace {

using nlohmann::json;

absl::Status Bad(const std::string& source, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
}

// A field is a number (per layer) or a list with one number per kv head.
absl::StatusOr<std::vector<float>> ReadValues(const json& layer, const char* key, float fallback,
                                              bool required, int layer_index,
                                              const std::string& source) {
  auto it = layer.find(key);
  if (it == layer.end()) {
    if (required) return Bad(source, absl::StrCat("layer ", layer_index, ": missing \"", key, "\""));
    return std::vector<float>{fallback};
  }
  if (it->is_number()) return std::vector<float>{it->get<float>()};
  if (it->is_array() && !it->empty()) {
    std::vector<float> v;
    for (const auto& x : *it) {
      if (!x.is_number()) return Bad(source, absl::StrCat("layer ", layer_index, ": \"", key, "\" holds a non-number"));
      v.push_back(x.get<float>());
    }
    return v;
  }
  return Bad(source, absl::StrCat("layer ", layer_index, ": \"", key,
                                  "\" must be a number or a non-empty list of numbers"));
}

}  // namespace

absl::StatusOr<KvQuantParams> ParseKvQuantParams(const std::string& json_text,
                                                 const std::string& source) {
  json j = json::parse(json_text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return Bad(source, "not a JSON object");
  KvQuantParams p;
  if (!j.contains("kv_cache_dtype") || !j["kv_cache_dtype"].is_string()) {
    return Bad(source, "missing string field \"kv_cache_dtype\"");
  }
  ASSIGN_OR_RETURN(KvFormat f, ParseKvFormat(j["kv_cache_dtype"].get<std::string>(), "static",
                                             WeightDtype::kFp16));
  p.dtype = f.dtype;
  if (!j.contains("layers") || !j["layers"].is_array() || j["layers"].empty()) {
    return Bad(source, "missing non-empty list \"layers\"");
  }
  const json& layers = j["layers"];
  p.num_layers = static_cast<int32_t>(layers.size());
  const bool integer = KvDtypeIsInteger(p.dtype);
  int32_t heads = 1;
  for (size_t i = 0; i < layers.size(); ++i) {
    if (!layers[i].is_object()) return Bad(source, absl::StrCat("layer ", i, " is not an object"));
    ASSIGN_OR_RETURN(auto ks, ReadValues(layers[i], "k_scale", 1.0f, true, i, source));
    ASSIGN_OR_RETURN(auto vs, ReadValues(layers[i], "v_scale", 1.0f, true, i, source));
    ASSIGN_OR_RETURN(auto kz, ReadValues(layers[i], "k_zero", 0.0f, false, i, source));
    ASSIGN_OR_RETURN(auto vz, ReadValues(layers[i], "v_zero", 0.0f, false, i, source));
    if (!integer && (layers[i].contains("k_zero") || layers[i].contains("v_zero"))) {
      for (float z : kz) if (z != 0.0f) return Bad(source, "fp8 parameters take no zero point");
      for (float z : vz) if (z != 0.0f) return Bad(source, "fp8 parameters take no zero point");
    }
    for (const auto* v : {&ks, &vs, &kz, &vz}) heads = std::max<int32_t>(heads, v->size());
    p.k_scale.push_back(std::move(ks));
    p.v_scale.push_back(std::move(vs));
    p.k_zero.push_back(std::move(kz));
    p.v_zero.push_back(std::move(vz));
  }
  // Broadcast per-layer values to every head; per-head lists must agree.
  p.num_kv_heads = heads;
  for (auto* table : {&p.k_scale, &p.v_scale, &p.k_zero, &p.v_zero}) {
    for (size_t i = 0; i < table->size(); ++i) {
      auto& v = (*table)[i];
      if (v.size() == 1) v.assign(heads, v[0]);
      if (static_cast<int32_t>(v.size()) != heads) {
        return Bad(source, absl::StrCat("layer ", i, ": per-head lists have ", v.size(),
                                        " entries, others have ", heads));
      }
    }
  }
  if (heads == 1) {
    // Per-layer file: widened to the declared head count so any shard can use
    // it, or, with none declared, to the model's (WidenKvQuantParams).
    int32_t declared = 0;
    if (j.contains("num_kv_heads") && j["num_kv_heads"].is_number_integer()) {
      declared = j["num_kv_heads"].get<int32_t>();
    }
    p.per_layer = true;
    if (declared > 0) WidenKvQuantParams(&p, declared);
  }
  return p;
}

void WidenKvQuantParams(KvQuantParams* p, int32_t num_kv_heads) {
  if (!p->per_layer || num_kv_heads < 1) return;
  p->num_kv_heads = num_kv_heads;
  for (auto* table : {&p->k_scale, &p->v_scale, &p->k_zero, &p->v_zero}) {
    for (auto& v : *table) v.assign(num_kv_heads, v[0]);
  }
  p->per_layer = false;
}

absl::StatusOr<KvQuantParams> LoadKvQuantParams(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open KV quantization parameters"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseKvQuantParams(ss.str(), path);
}

std::string KvQuantParamsToJson(const KvQuantParams& p, bool per_head) {
  json j;
  j["kv_cache_dtype"] = KvDtypeName(p.dtype);
  j["num_kv_heads"] = p.num_kv_heads;
  j["layers"] = json::array();
  for (int32_t l = 0; l < p.num_layers; ++l) {
    json layer;
    auto put = [&](const char* key, const std::vector<float>& v) {
      if (per_head) layer[key] = v;
      else layer[key] = v.empty() ? 0.0f : v[0];
    };
    put("k_scale", p.k_scale[l]);
    put("v_scale", p.v_scale[l]);
    if (KvDtypeIsInteger(p.dtype)) {
      put("k_zero", p.k_zero[l]);
      put("v_zero", p.v_zero[l]);
    }
    j["layers"].push_back(layer);
  }
  return j.dump(2);
}

absl::Status CheckKvQuantParams(const KvQuantParams& p, KvFormat format, int32_t num_layers,
                                int32_t num_kv_heads, const std::string& source) {
  if (p.dtype != format.dtype) {
    return Bad(source, absl::StrCat("parameters are for kv_cache_dtype ", KvDtypeName(p.dtype),
                                    " but the cache is ", KvDtypeName(format.dtype)));
  }
  if (p.num_layers != num_layers) {
    return Bad(source, absl::StrCat("parameters cover ", p.num_layers, " layers, the model has ",
                                    num_layers));
  }
  if (p.num_kv_heads != num_kv_heads) {
    return Bad(source, absl::StrCat("parameters cover ", p.num_kv_heads,
                                    " kv heads, the model has ", num_kv_heads));
  }
  for (int32_t l = 0; l < num_layers; ++l) {
    for (const auto* v : {&p.k_scale[l], &p.v_scale[l]}) {
      for (float s : *v) {
        if (!(s > 0.0f) || !std::isfinite(s)) {
          return Bad(source, absl::StrCat("layer ", l, ": scale ", s, " is not a positive finite number"));
        }
      }
    }
  }
  return absl::OkStatus();
}

KvQuantParams UnitKvQuantParams(KvDtype dtype, int32_t num_layers, int32_t num_kv_heads) {
  KvQuantParams p;
  p.dtype = dtype;
  p.num_layers = num_layers;
  p.num_kv_heads = num_kv_heads;
  p.k_scale.assign(num_layers, std::vector<float>(num_kv_heads, 1.0f));
  p.v_scale = p.k_scale;
  p.k_zero.assign(num_layers, std::vector<float>(num_kv_heads, 0.0f));
  p.v_zero = p.k_zero;
  return p;
}

}  // namespace strata
