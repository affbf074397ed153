#include "worker/kv_calibration.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "runtime/kv_format_util.h"

namespace strata {

KvRangeObserver::KvRangeObserver(int32_t num_layers, int32_t num_kv_heads, int32_t head_dim)
    : num_layers_(num_layers), num_kv_heads_(num_kv_heads), head_dim_(head_dim) {
  const size_t n = static_cast<size_t>(num_layers) * num_kv_heads;
  k_min_.assign(n, std::numeric_limits<float>::infinity());
  v_min_ = k_min_;
  k_max_.assign(n, -std::numeric_limits<float>::infinity());
  v_max_ = k_max_;
  k_pair_norm_.assign(n, 0.0f);
}

void KvRangeObserver::Observe(int32_t layer, const float* k, const float* v, int64_t tokens) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int32_t h = 0; h < num_kv_heads_; ++h) {
      const size_t idx = static_cast<size_t>(layer) * num_kv_heads_ + h;
      const float* kr = k + (t * num_kv_heads_ + h) * head_dim_;
      const float* vr = v + (t * num_kv_heads_ + h) * head_dim_;
      for (int32_t d = 0; d < head_dim_; ++d) {
        k_min_[idx] = std::min(k_min_[idx], kr[d]);
        k_max_[idx] = std::max(k_max_[idx], kr[d]);
        v_min_[idx] = std::min(v_min_[idx], vr[d]);
        v_max_[idx] = std::max(v_max_[idx], vr[d]);
      }
      const int32_t half = head_dim_ / 2;
      for (int32_t d = 0; d < half; ++d) {
        k_pair_norm_[idx] = std::max(k_pair_norm_[idx], std::hypot(kr[d], kr[d + half]));
      }
    }
  }
  if (layer == 0) tokens_ += tokens;
}

absl::StatusOr<KvQuantParams> KvRangeObserver::Finish(KvDtype dtype, bool per_head,
                                                      KRange k_range) const {
  if (tokens_ == 0) return absl::FailedPreconditionError("no K/V observed: calibration text is empty");
  if (!KvFormatSupported({dtype, KvScaleMode::kStatic})) {
    return absl::InvalidArgumentError(
        absl::StrCat(KvDtypeName(dtype), " has no static scale mode"));
  }
  KvQuantParams p = UnitKvQuantParams(dtype, num_layers_, num_kv_heads_);
  // Scale and zero for the range [mn, mx]: int8 maps it onto [-128, 127]
  // (dequantized = (q - zero) * scale); fp8 scales the largest magnitude to
  // the format's largest finite value.
  auto params = [&](float mn, float mx, float* scale, float* zero) {
    if (dtype == KvDtype::kInt8) {
      const float range = std::max(mx - mn, 1e-6f);
      *scale = range / 255.0f;
      *zero = -128.0f - mn / *scale;
    } else {
      const float amax = std::max({std::fabs(mn), std::fabs(mx), 1e-6f});
      *scale = amax / (dtype == KvDtype::kFp8E4M3 ? 448.0f : 57344.0f);
      *zero = 0.0f;
    }
  };
  // K range of (layer, head) index i.
  auto k_lo = [&](size_t i) { return k_range == KRange::kRopePairNorm ? -k_pair_norm_[i] : k_min_[i]; };
  auto k_hi = [&](size_t i) { return k_range == KRange::kRopePairNorm ? k_pair_norm_[i] : k_max_[i]; };
  for (int32_t l = 0; l < num_layers_; ++l) {
    float lk_min = INFINITY, lk_max = -INFINITY, lv_min = INFINITY, lv_max = -INFINITY;
    for (int32_t h = 0; h < num_kv_heads_; ++h) {
      const size_t i = static_cast<size_t>(l) * num_kv_heads_ + h;
      lk_min = std::min(lk_min, k_lo(i)), lk_max = std::max(lk_max, k_hi(i));
      lv_min = std::min(lv_min, v_min_[i]), lv_max = std::max(lv_max, v_max_[i]);
    }
    for (int32_t h = 0; h < num_kv_heads_; ++h) {
      const size_t i = static_cast<size_t>(l) * num_kv_heads_ + h;
      if (per_head) {
        params(k_lo(i), k_hi(i), &p.k_scale[l][h], &p.k_zero[l][h]);
        params(v_min_[i], v_max_[i], &p.v_scale[l][h], &p.v_zero[l][h]);
      } else {
        params(lk_min, lk_max, &p.k_scale[l][h], &p.k_zero[l][h]);
        params(lv_min, lv_max, &p.v_scale[l][h], &p.v_zero[l][h]);
      }
    }
  }
  return p;
}

}  // namespace strata
