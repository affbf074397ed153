#include "worker/calibrate.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "runtime/status_macros.h"
#include "worker/cpu_engine.h"

namespace strata {

absl::StatusOr<std::unique_ptr<KvRangeObserver>> ObserveKvRanges(
    const ModelWeights& weights, const std::vector<int32_t>& text_tokens,
    const CalibrateOptions& options) {
  const ModelConfig& c = weights.config;
  CalibrateOptions o = options;
  if (o.context == 0) o.context = std::min(c.max_position_embeddings, 2048);
  const int32_t bos = o.bos_id >= 0 ? 1 : 0;
  if (o.context <= bos || o.context > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("--context must be in [", bos + 1, ", ",
                                                   c.max_position_embeddings, "], got ", o.context));
  }
  if (o.batch < 1 || o.prefill_chunk < 1) {
    return absl::InvalidArgumentError("--batch and --prefill-chunk must be positive");
  }
  if (o.offset < 0 || o.offset >= static_cast<int64_t>(text_tokens.size())) {
    return absl::InvalidArgumentError(absl::StrCat("--offset ", o.offset, " is outside the text (",
                                                   text_tokens.size(), " tokens)"));
  }
  const int64_t avail = static_cast<int64_t>(text_tokens.size()) - o.offset;
  const int64_t used = o.max_tokens > 0 ? std::min(o.max_tokens, avail) : avail;
  for (int64_t i = o.offset; i < o.offset + used; ++i) {
    if (text_tokens[i] < 0 || text_tokens[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", text_tokens[i], " out of range"));
    }
  }
  const int32_t per_window = o.context - bos;
  const int32_t bs = o.block_size;
  const int32_t nb = (o.context + bs - 1) / bs;
  EngineOptions eo;
  eo.kv_format = {KvDtype::kFp32, KvScaleMode::kNone};
  eo.block_size = bs;
  eo.num_gpu_blocks = o.batch * nb;
  ASSIGN_OR_RETURN(std::unique_ptr<CpuEngine> engine, CpuEngine::Create(weights, eo));
  auto observer = std::make_unique<KvRangeObserver>(c.num_layers, c.num_kv_heads, c.head_dim);
  engine->set_layer_observer([&](int layer, const float*, const float* k, const float* v,
                                 int64_t tokens) { observer->Observe(layer, k, v, tokens); });

  std::vector<std::vector<int32_t>> windows;
  for (int64_t s = 0; s < used; s += per_window) {
    const int64_t e = std::min(used, s + per_window);
    std::vector<int32_t>& w = windows.emplace_back();
    w.reserve(static_cast<size_t>(e - s) + (bos ? 1 : 0));
    if (bos) w.push_back(o.bos_id);
    for (int64_t t = s; t < e; ++t) w.push_back(text_tokens[o.offset + t]);
  }
  StepOutput out;
  for (size_t w0 = 0; w0 < windows.size(); w0 += o.batch) {
    const size_t n = std::min<size_t>(o.batch, windows.size() - w0);
    int32_t longest = 0;
    for (size_t i = 0; i < n; ++i) longest = std::max<int32_t>(longest, windows[w0 + i].size());
    for (int32_t c0 = 0; c0 < longest; c0 += o.prefill_chunk) {
      StepInput in;
      for (size_t i = 0; i < n; ++i) {
        const auto& w = windows[w0 + i];
        if (c0 >= static_cast<int32_t>(w.size())) continue;  // a shorter last window
        SeqStepInput s;
        const int32_t e = std::min<int32_t>(w.size(), c0 + o.prefill_chunk);
        s.tokens.assign(w.begin() + c0, w.begin() + e);
        s.start_pos = c0;
        for (int32_t b = 0; b < nb; ++b) s.block_table.push_back(static_cast<int32_t>(i) * nb + b);
        s.logits = SeqStepInput::Logits::kNone;
        in.seqs.push_back(std::move(s));
      }
      RETURN_IF_ERROR(engine->Step(in, &out));
    }
  }
  return observer;
}

absl::StatusOr<KvQuantParams> CalibrateKvQuantParams(const ModelWeights& weights,
                                                     const std::vector<int32_t>& text_tokens,
                                                     const CalibrateOptions& options, KvDtype dtype,
                                                     bool per_head, KRange k_range) {
  ASSIGN_OR_RETURN(std::unique_ptr<KvRangeObserver> ranges,
                   ObserveKvRanges(weights, text_tokens, options));
  return ranges->Finish(dtype, per_head, k_range);
}

}  // namespace strata
