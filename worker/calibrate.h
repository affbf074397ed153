// Static KV scale calibration over a text (`strata calibrate`): runs the
// model with an fp32 cache over the calibration tokens, records the range of
// every layer's (and kv head's) post-RoPE K and V with KvRangeObserver, and
// turns the ranges into KvQuantParams for int8 (scale + zero point) or fp8
// (scale). The file format is docs/kv_quant_params.md.
//
// Windows: consecutive, non-overlapping runs of `context` positions, each
// [BOS] (when bos_id >= 0) + text tokens, prefilled in chunks as serving
// would (so positions, and the attention-sink BOS, look as they will when
// serving). Calibrate on different text from the one you evaluate on.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/kv_quant_params.h"
#include "runtime/weights.h"
#include "worker/kv_calibration.h"

namespace strata {

struct CalibrateOptions {
  int32_t context = 0;          // positions per window; 0: min(model context, 2048)
  int64_t offset = 0;           // first text token used
  int64_t max_tokens = 0;       // text tokens used from `offset`; 0: the rest
  int32_t batch = 4;            // windows per step
  int32_t prefill_chunk = 512;  // tokens per sequence per step
  int32_t block_size = 16;
  int32_t bos_id = -1;          // prepended to every window when >= 0
};

// The observed ranges; Finish() them for each dtype wanted.
absl::StatusOr<std::unique_ptr<KvRangeObserver>> ObserveKvRanges(
    const ModelWeights& weights, const std::vector<int32_t>& text_tokens,
    const CalibrateOptions& options);

// ObserveKvRanges + Finish.
absl::StatusOr<KvQuantParams> CalibrateKvQuantParams(const ModelWeights& weights,
                                                     const std::vector<int32_t>& text_tokens,
                                                     const CalibrateOptions& options, KvDtype dtype,
                                                     bool per_head,
                                                     KRange k_range = KRange::kObserved);

}  // namespace strata
