// Names, parsing and validation of KV cache formats (host-only).
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "runtime/kv_format.h"
#include "runtime/model_config.h"

namespace strata {

const char* KvDtypeName(KvDtype d);        // "fp16", "int8", ...
const char* KvScaleModeName(KvScaleMode m);  // "none", "static", "dynamic"
std::string KvFormatName(KvFormat f);      // "int8/dynamic"

// Parses --kv-cache-dtype (fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int8, int4,
// auto) and --kv-scale-mode (none, static, dynamic, or "" for the default of
// the dtype). `auto` resolves to the model's dtype (fp32 stays fp32).
// INVALID_ARGUMENT names the flag and lists the accepted values;
// UNIMPLEMENTED for a known but unsupported combination.
absl::StatusOr<KvFormat> ParseKvFormat(std::string_view dtype, std::string_view scale_mode,
                                       WeightDtype model_dtype);

// Default scale mode of a dtype when none is given: dynamic for int8/int4 and
// fp8_e4m3, none otherwise.
KvScaleMode DefaultScaleMode(KvDtype d);

// Every format KvFormatSupported() accepts, for tests and benchmarks.
std::vector<KvFormat> AllSupportedKvFormats();

}  // namespace strata
