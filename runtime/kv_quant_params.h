// Static KV quantization parameters (--kv-quant-params-path): per layer, and
// optionally per kv head, a scale and zero point for K and for V.
// Dequantized value = (q - zero) * scale. File format: see runtime/DESIGN.md.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/kv_format.h"

namespace strata {

struct KvQuantParams {
  KvDtype dtype = KvDtype::kInt8;
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  // [num_layers][num_kv_heads] each (per-layer values are broadcast to heads).
  std::vector<std::vector<float>> k_scale, k_zero, v_scale, v_zero;
  // One number per layer for every field and no declared head count: the
  // file fits any model's kv heads (num_kv_heads is 1 until
  // WidenKvQuantParams gives it the model's).
  bool per_layer = false;
};

absl::StatusOr<KvQuantParams> LoadKvQuantParams(const std::string& path);
absl::StatusOr<KvQuantParams> ParseKvQuantParams(const std::string& json_text,
                                                 const std::string& source);
std::string KvQuantParamsToJson(const KvQuantParams& p, bool per_head);

// Checks the parameters fit the model and format: layer and head counts,
// positive finite scales, dtype matches. Errors name `source`.
absl::Status CheckKvQuantParams(const KvQuantParams& p, KvFormat format, int32_t num_layers,
                                int32_t num_kv_heads, const std::string& source);

// A per-layer file (p->per_layer) widened to num_kv_heads heads; other
// parameters are left as they are (CheckKvQuantParams then compares counts).
void WidenKvQuantParams(KvQuantParams* p, int32_t num_kv_heads);

// Neutral parameters (scale 1, zero 0) for tests.
KvQuantParams UnitKvQuantParams(KvDtype dtype, int32_t num_layers, int32_t num_kv_heads);

}  // namespace strata
