// Perplexity and reference-agreement evaluation of KV cache formats, run
// through the real serving path: a CpuEngine with a paged, quantized cache,
// prefill chunks and then one decode step per token.
//
// Windows. The evaluated text R = tokens[offset, offset + max_tokens) is cut
// into windows of `context` positions: [BOS] (when the tokenizer adds one)
// followed by L = context - 1 (or context) text tokens, window w starting at
// text token w * stride. Each window is run as serving runs a request:
//   * prefill: its first P = L - stride text tokens (and the BOS), in chunks
//     of at most `prefill_chunk` tokens, logits of the last position only;
//   * decode: the remaining `stride` tokens appended one step at a time, each
//     step returning one row of logits.
// The prefill's last row and every decode row are scored against the next
// text token, so window w scores R[P + w*stride, P + (w+1)*stride): windows
// score disjoint, consecutive tokens, each with at least P tokens of context
// held in the quantized cache. `batch` windows run together as separate
// sequences of one step (continuous batching), each in its own blocks.
//
// Reference. The same windows run once with the reference format (fp32 cache
// by default); its log-probabilities at every scored position are kept in
// memory (scored tokens x vocab floats) to give, per evaluated format:
//   * mean KL(P_ref || P_fmt) of the next-token distributions,
//   * top-1 agreement: how often both caches put the same token first,
//   * greedy agreement: N prompts taken evenly from R, G tokens generated
//     greedily with each cache; the fraction of equal tokens position by
//     position and the mean fraction of identical prefix.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/kv_format.h"
#include "runtime/kv_quant_params.h"
#include "runtime/weights.h"

namespace strata {

struct EvalPplOptions {
  int32_t context = 256;       // positions per window, including the BOS
  int32_t stride = 0;          // tokens scored per window (decode steps + 1); 0: context / 2
  int64_t offset = 0;          // first text token evaluated
  int64_t max_tokens = 0;      // text tokens evaluated from `offset`; 0: the rest of the text
  int32_t batch = 4;           // windows per engine step
  int32_t prefill_chunk = 512;  // prefill tokens per sequence per step
  int32_t block_size = 16;
  int32_t bos_id = -1;         // prepended to every window and prompt when >= 0
  KvFormat reference{KvDtype::kFp32, KvScaleMode::kNone};
  int32_t greedy_continuations = 8;  // N prompts
  int32_t greedy_tokens = 32;        // G tokens generated per prompt
  int32_t greedy_prompt = 128;       // text tokens per prompt
};

struct KvFormatSpec {
  KvFormat format;
  std::optional<KvQuantParams> params;  // static scale modes
  std::string label;                    // for reports; empty: KvFormatName(format)
};

struct PplResult {
  std::string label;
  KvFormat format;
  int64_t scored_tokens = 0;
  int32_t windows = 0;
  double mean_nll = 0;    // nats per scored token
  double perplexity = 0;  // exp(mean_nll)
  // Paired per-token NLL difference vs the reference (this format minus the
  // reference, same tokens): mean and its standard error. exp(mean) - 1 is
  // the relative perplexity change vs the reference; 1.96 * stderr bounds
  // its 95% confidence interval, i.e. how much of a change is noise.
  double nll_delta_mean = 0;
  double nll_delta_stderr = 0;
  double mean_kl = 0;     // vs the reference, nats
  double max_kl = 0;
  double top1_agreement = 0;    // [0, 1]
  double greedy_agreement = 0;  // equal tokens, position by position, [0, 1]; NaN: not run
  double greedy_prefix = 0;     // mean identical-prefix fraction, [0, 1]; NaN: not run
  double seconds = 0;
};

class PplEvaluator {
 public:
  // `weights` must outlive the evaluator; each format gets its own engine
  // built from a copy. INVALID_ARGUMENT for windows that do not fit the
  // model or the text.
  static absl::StatusOr<std::unique_ptr<PplEvaluator>> Create(const ModelWeights& weights,
                                                              std::vector<int32_t> text_tokens,
                                                              const EvalPplOptions& options);

  // Evaluates one format (the reference runs first, once).
  absl::StatusOr<PplResult> Evaluate(const KvFormatSpec& spec);
  // The reference's own result (KL 0, agreement 1); runs it if needed.
  absl::StatusOr<PplResult> Reference();

  int32_t num_windows() const { return num_windows_; }
  int64_t scored_per_window() const { return options_.stride; }
  const EvalPplOptions& options() const { return options_; }

 private:
  PplEvaluator(const ModelWeights& weights, std::vector<int32_t> text, const EvalPplOptions& o)
      : weights_(weights), text_(std::move(text)), options_(o) {}
  absl::StatusOr<PplResult> RunFormat(const KvFormatSpec& spec, bool is_reference);

  const ModelWeights& weights_;
  std::vector<int32_t> text_;  // R: the evaluated tokens only
  EvalPplOptions options_;
  int32_t num_windows_ = 0;
  int32_t prefill_text_ = 0;  // P
  int32_t window_text_ = 0;   // L
  bool have_reference_ = false;
  PplResult reference_result_;
  std::vector<float> ref_logprobs_;               // [scored][vocab]
  std::vector<int32_t> ref_argmax_;               // [scored]
  std::vector<double> ref_nll_;                   // [scored]
  std::vector<std::vector<int32_t>> ref_greedy_;  // [N][G]
};

// One-line-per-format markdown table of results; the relative perplexity
// delta is against the row whose format is fp16/none when present.
std::string PplResultsMarkdown(const std::vector<PplResult>& results);
std::string PplResultsJson(const std::vector<PplResult>& results);

}  // namespace strata
