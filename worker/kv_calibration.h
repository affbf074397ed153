// Static KV scale calibration: observes the K and V an engine writes while it
// runs calibration text, and turns their ranges into KvQuantParams for a
// static scale mode (int8: scale + zero point; fp8: scale).
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "runtime/kv_quant_params.h"

namespace strata {

// How the K range of a head is taken.
enum class KRange : uint8_t {
  // The observed per-head minimum and maximum of post-RoPE K. Tight, but only
  // for positions like the calibration windows': RoPE rotates each channel
  // pair (j, j + head_dim/2) by an angle that grows with position, so longer
  // contexts reach channel values the calibration never saw (they saturate).
  kObserved,
  // [-r, r] with r the largest norm sqrt(k_j^2 + k_{j+half}^2) of a RoPE
  // channel pair: RoPE leaves that norm unchanged, so it bounds the channel
  // values at every position. Wider (up to about sqrt(2) x) than kObserved.
  kRopePairNorm,
};

class KvRangeObserver {
 public:
  KvRangeObserver(int32_t num_layers, int32_t num_kv_heads, int32_t head_dim);
  // k, v: [tokens][num_kv_heads][head_dim] of one layer.
  void Observe(int32_t layer, const float* k, const float* v, int64_t tokens);
  int64_t tokens_observed() const { return tokens_; }
  // Per-head parameters when `per_head`, else one per layer (widened to all
  // heads). FAILED_PRECONDITION before anything was observed;
  // INVALID_ARGUMENT for a dtype without a static mode.
  absl::StatusOr<KvQuantParams> Finish(KvDtype dtype, bool per_head,
                                       KRange k_range = KRange::kObserved) const;

 private:
  int32_t num_layers_, num_kv_heads_, head_dim_;
  int64_t tokens_ = 0;
  // [layer][head] running min/max of K and V.
  std::vector<float> k_min_, k_max_, v_min_, v_max_;
  std::vector<float> k_pair_norm_;  // [layer][head] largest RoPE pair norm of K
};

}  // namespace strata
