#include "runtime/kv_format_util.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace strata {

const char* KvDtypeName(KvDtype d) {
  switch (d) {
    case KvDtype::kFp32: return "fp32";
    case KvDtype::kFp16: return "fp16";
    case KvDtype::kBf16: return "bf16";
    case KvDtype::kFp8E4M3: return "fp8_e4m3";
    case KvDtype::kFp8E5M2: return "fp8_e5m2";
    case KvDtype::kInt8: return "int8";
    case KvDtype::kInt4: return "int4";
  }
  return "?";
}

const char* KvScaleModeName(KvScaleMode m) {
  switch (m) {
    case KvScaleMode::kNone: return "none";
    case KvScaleMode::kStatic: return "static";
    case KvScaleMode::kDynamic: return "dynamic";
  }
  return "?";
}

std::string KvFormatName(KvFormat f) {
  return absl::StrCat(KvDtypeName(f.dtype), "/", KvScaleModeName(f.scale_mode));
}

KvScaleMode DefaultScaleMode(KvDtype d) {
  switch (d) {
    case KvDtype::kInt8:
    case KvDtype::kInt4:
    case KvDtype::kFp8E4M3: return KvScaleMode::kDynamic;
    default: return KvScaleMode::kNone;
  }
}

absl::StatusOr<KvFormat> ParseKvFormat(std::string_view dtype, std::string_view scale_mode,
                                       WeightDtype model_dtype) {
  KvFormat f;
  if (dtype == "auto") {
    f.dtype = model_dtype == WeightDtype::kFp32   ? KvDtype::kFp32
              : model_dtype == WeightDtype::kBf16 ? KvDtype::kBf16
                                                  : KvDtype::kFp16;
  } else if (dtype == "fp32" || dtype == "float32") {
    f.dtype = KvDtype::kFp32;
  } else if (dtype == "fp16" || dtype == "float16") {
    f.dtype = KvDtype::kFp16;
  } else if (dtype == "bf16" || dtype == "bfloat16") {
    f.dtype = KvDtype::kBf16;
  } else if (dtype == "fp8_e4m3") {
    f.dtype = KvDtype::kFp8E4M3;
  } else if (dtype == "fp8_e5m2" || dtype == "fp8") {
    f.dtype = KvDtype::kFp8E5M2;
  } else if (dtype == "int8") {
    f.dtype = KvDtype::kInt8;
  } else if (dtype == "int4") {
    f.dtype = KvDtype::kInt4;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-cache-dtype: unknown value \"", std::string(dtype),
        "\" (accepted: auto, fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int8, int4)"));
  }
  if (scale_mode.empty()) {
    f.scale_mode = DefaultScaleMode(f.dtype);
  } else if (scale_mode == "none") {
    f.scale_mode = KvScaleMode::kNone;
  } else if (scale_mode == "static") {
    f.scale_mode = KvScaleMode::kStatic;
  } else if (scale_mode == "dynamic") {
    f.scale_mode = KvScaleMode::kDynamic;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--kv-scale-mode: unknown value \"", std::string(scale_mode),
                                                   "\" (accepted: none, static, dynamic)"));
  }
  if (!KvFormatSupported(f)) {
    return absl::UnimplementedError(
        absl::StrCat("KV cache format ", KvFormatName(f),
                     " is not supported (fp32/fp16/bf16: none; fp8_e5m2: none or static; "
                     "fp8_e4m3: static or dynamic; int8: static or dynamic; int4: dynamic)"));
  }
  return f;
}

std::vector<KvFormat> AllSupportedKvFormats() {
  std::vector<KvFormat> out;
  for (int d = 0; d <= static_cast<int>(KvDtype::kInt4); ++d) {
    for (int m = 0; m <= static_cast<int>(KvScaleMode::kDynamic); ++m) {
      KvFormat f{static_cast<KvDtype>(d), static_cast<KvScaleMode>(m)};
      if (KvFormatSupported(f)) out.push_back(f);
    }
  }
  return out;
}

}  // namespace strata
