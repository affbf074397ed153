#include "worker/eval_ppl.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "runtime/kv_format_util.h"
#include "runtime/status_macros.h"
#include "worker/cpu_engine.h"

namespace strata {
namespace {

// Largest reference we keep in memory: scored positions x vocab floats.
constexpr int64_t kMaxReferenceFloats = int64_t{1} << 30;  // 4 GiB

// Runs `prompts` (all the same length) as one batch, as serving would: the
// prompts in prefill chunks of at most `chunk` tokens per sequence (logits of
// the last position only), then `decode_steps` decode steps of one token per
// sequence. `on_row(seq, step, logits)` sees each sequence's rows in order
// (step 0: the prefill's last position; step k: the k-th decode step) and
// returns the token to feed next (ignored after the last step).
absl::Status RunLockstep(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                         int32_t decode_steps, int32_t chunk,
                         const std::function<int32_t(int, int, const float*)>& on_row) {
  const int32_t n = static_cast<int32_t>(prompts.size());
  const int32_t len = static_cast<int32_t>(prompts[0].size());
  const int32_t bs = engine.options().block_size;
  const int32_t nb = (len + decode_steps + bs - 1) / bs;
  if (int64_t{n} * nb > engine.options().num_gpu_blocks) {
    return absl::InternalError("evaluation batch does not fit the engine's blocks");
  }
  const int64_t vocab = engine.config().vocab_size;
  std::vector<std::vector<int32_t>> tables(n);
  for (int32_t i = 0; i < n; ++i) {
    for (int32_t b = 0; b < nb; ++b) tables[i].push_back(i * nb + b);
  }
  StepOutput out;
  std::vector<int32_t> next(n);
  for (int32_t c = 0; c < len; c += chunk) {
    const int32_t end = std::min(len, c + chunk);
    StepInput in;
    for (int32_t i = 0; i < n; ++i) {
      SeqStepInput s;
      s.tokens.assign(prompts[i].begin() + c, prompts[i].begin() + end);
      s.start_pos = c;
      s.block_table = tables[i];
      s.logits = end == len ? SeqStepInput::Logits::kLast : SeqStepInput::Logits::kNone;
      in.seqs.push_back(std::move(s));
    }
    RETURN_IF_ERROR(engine.Step(in, &out));
  }
  for (int32_t step = 0;; ++step) {
    for (int32_t i = 0; i < n; ++i) {
      next[i] = on_row(i, step, out.logits.data() + int64_t{out.row_begin[i]} * vocab);
    }
    if (step == decode_steps) break;
    StepInput in;
    for (int32_t i = 0; i < n; ++i) {
      SeqStepInput s;
      s.tokens = {next[i]};
      s.start_pos = len + step;
      s.block_table = tables[i];
      s.logits = SeqStepInput::Logits::kLast;
      in.seqs.push_back(std::move(s));
    }
    RETURN_IF_ERROR(engine.Step(in, &out));
  }
  return absl::OkStatus();
}

// log-softmax of one row into `out` (double accumulation).
void LogSoftmax(const float* logits, int64_t n, float* out) {
  float m = logits[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - m);
  const double lz = m + std::log(sum);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(logits[i] - lz);
}

int32_t Argmax(const float* x, int64_t n) {
  return static_cast<int32_t>(std::max_element(x, x + n) - x);  // first maximum on ties
}

}  // namespace

absl::StatusOr<std::unique_ptr<PplEvaluator>> PplEvaluator::Create(
    const ModelWeights& weights, std::vector<int32_t> text_tokens, const EvalPplOptions& options) {
  EvalPplOptions o = options;
  const ModelConfig& c = weights.config;
  if (o.context <= 1 || o.context > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("--context must be in [2, ",
                                                   c.max_position_embeddings, "], got ", o.context));
  }
  const int32_t bos = o.bos_id >= 0 ? 1 : 0;
  const int32_t window_text = o.context - bos;  // L
  if (o.stride == 0) o.stride = o.context / 2;
  if (o.stride < 1 || o.stride > window_text - 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--stride must be in [1, ", window_text - 1, "] (the prefill keeps at least one token), got ",
        o.stride));
  }
  if (o.batch < 1 || o.prefill_chunk < 1 || o.greedy_continuations < 0 || o.greedy_tokens < 1 ||
      o.greedy_prompt < 1) {
    return absl::InvalidArgumentError(
        "--batch, --prefill-chunk, --greedy-tokens and --greedy-prompt must be positive");
  }
  if (o.greedy_prompt + bos + o.greedy_tokens > c.max_position_embeddings) {
    return absl::InvalidArgumentError("greedy prompt + tokens exceed the model context");
  }
  if (o.offset < 0 || o.offset >= static_cast<int64_t>(text_tokens.size())) {
    return absl::InvalidArgumentError(absl::StrCat("--offset ", o.offset, " is outside the text (",
                                                   text_tokens.size(), " tokens)"));
  }
  const int64_t avail = static_cast<int64_t>(text_tokens.size()) - o.offset;
  const int64_t used = o.max_tokens > 0 ? std::min(o.max_tokens, avail) : avail;
  if (used < window_text) {
    return absl::InvalidArgumentError(absl::StrCat("the text has ", used, " tokens from --offset, fewer than one window (",
                                                   window_text, ")"));
  }
  for (int32_t t : text_tokens) {
    if (t < 0 || t >= c.vocab_size) return absl::InvalidArgumentError(absl::StrCat("token id ", t, " out of range"));
  }
  const int32_t windows = static_cast<int32_t>((used - window_text) / o.stride + 1);
  if (int64_t{windows} * o.stride * c.vocab_size > kMaxReferenceFloats) {
    return absl::InvalidArgumentError(absl::StrCat(
        windows * int64_t{o.stride}, " scored tokens x ", c.vocab_size,
        " vocabulary is too large a reference to keep in memory; lower --max-tokens"));
  }
  std::vector<int32_t> text(text_tokens.begin() + o.offset, text_tokens.begin() + o.offset + used);
  if (o.greedy_prompt + o.greedy_tokens > used) o.greedy_continuations = 0;
  std::unique_ptr<PplEvaluator> e(new PplEvaluator(weights, std::move(text), o));
  e->num_windows_ = windows;
  e->window_text_ = window_text;
  e->prefill_text_ = window_text - o.stride;
  return e;
}

absl::StatusOr<PplResult> PplEvaluator::Reference() {
  if (!have_reference_) {
    ASSIGN_OR_RETURN(reference_result_, RunFormat({options_.reference, std::nullopt, ""}, true));
    have_reference_ = true;
  }
  return reference_result_;
}

absl::StatusOr<PplResult> PplEvaluator::Evaluate(const KvFormatSpec& spec) {
  RETURN_IF_ERROR(Reference().status());
  return RunFormat(spec, false);
}

absl::StatusOr<PplResult> PplEvaluator::RunFormat(const KvFormatSpec& spec, bool is_reference) {
  const auto t0 = std::chrono::steady_clock::now();
  const ModelConfig& c = weights_.config;
  const EvalPplOptions& o = options_;
  const int64_t V = c.vocab_size;
  const int32_t bos = o.bos_id >= 0 ? 1 : 0;
  const int32_t bs = o.block_size;
  const int32_t ppl_blocks = o.batch * ((o.context + bs - 1) / bs);
  const int32_t greedy_len = bos + o.greedy_prompt + o.greedy_tokens;
  const int32_t greedy_blocks = o.greedy_continuations * ((greedy_len + bs - 1) / bs);
  EngineOptions eo;
  eo.kv_format = spec.format;
  eo.block_size = bs;
  eo.num_gpu_blocks = std::max(ppl_blocks, greedy_blocks);
  ASSIGN_OR_RETURN(std::unique_ptr<CpuEngine> engine, CpuEngine::Create(weights_, eo, spec.params));

  PplResult r;
  r.label = spec.label.empty() ? KvFormatName(spec.format) : spec.label;
  r.format = spec.format;
  r.windows = num_windows_;
  const int64_t scored = int64_t{num_windows_} * o.stride;
  if (is_reference) {
    ref_logprobs_.assign(static_cast<size_t>(scored * V), 0.0f);
    ref_argmax_.assign(static_cast<size_t>(scored), 0);
    ref_nll_.assign(static_cast<size_t>(scored), 0.0);
  }
  double d_sum = 0, d_sum2 = 0;
  std::vector<float> lp(static_cast<size_t>(V));
  double nll = 0, kl_sum = 0, kl_max = 0;
  int64_t top1_equal = 0;
  for (int32_t w0 = 0; w0 < num_windows_; w0 += o.batch) {
    const int32_t n = std::min(o.batch, num_windows_ - w0);
    std::vector<std::vector<int32_t>> prompts(n), windows(n);
    for (int32_t i = 0; i < n; ++i) {
      const int64_t s = int64_t{w0 + i} * o.stride;
      if (bos) windows[i].push_back(o.bos_id);
      windows[i].insert(windows[i].end(), text_.begin() + s, text_.begin() + s + window_text_);
      prompts[i].assign(windows[i].begin(), windows[i].begin() + bos + prefill_text_);
    }
    RETURN_IF_ERROR(RunLockstep(*engine, prompts, o.stride - 1, o.prefill_chunk,
                                [&](int i, int step, const float* row) {
      const int32_t k = bos + prefill_text_ + step;  // index of the predicted token
      const int32_t target = windows[i][k];
      const int64_t pos = int64_t{w0 + i} * o.stride + step;  // scored position
      LogSoftmax(row, V, lp.data());
      nll -= lp[target];
      const int32_t am = Argmax(lp.data(), V);
      if (is_reference) {
        std::copy(lp.begin(), lp.end(), ref_logprobs_.begin() + pos * V);
        ref_argmax_[pos] = am;
        ref_nll_[pos] = -lp[target];
      } else {
        const double d = -double(lp[target]) - ref_nll_[pos];
        d_sum += d;
        d_sum2 += d * d;
        const float* ref = ref_logprobs_.data() + pos * V;
        double kl = 0;
        for (int64_t v = 0; v < V; ++v) kl += std::exp(double(ref[v])) * (double(ref[v]) - lp[v]);
        kl = std::max(kl, 0.0);
        kl_sum += kl;
        kl_max = std::max(kl_max, kl);
        top1_equal += am == ref_argmax_[pos];
      }
      return step + 1 < o.stride ? windows[i][k] : 0;  // feed the text token (teacher forcing)
    }));
  }
  r.scored_tokens = scored;
  r.mean_nll = nll / scored;
  r.perplexity = std::exp(r.mean_nll);
  r.nll_delta_mean = d_sum / scored;
  const double var = scored > 1 ? (d_sum2 - d_sum * d_sum / scored) / (scored - 1) : 0;
  r.nll_delta_stderr = std::sqrt(std::max(var, 0.0) / scored);
  r.mean_kl = is_reference ? 0 : kl_sum / scored;
  r.max_kl = is_reference ? 0 : kl_max;
  r.top1_agreement = is_reference ? 1 : double(top1_equal) / scored;

  // Greedy continuations from N prompts spread over the text.
  const int32_t N = o.greedy_continuations;
  r.greedy_agreement = r.greedy_prefix = std::nan("");  // not measured
  if (N > 0) {
    std::vector<std::vector<int32_t>> prompts(N), gen(N);
    const int64_t span = static_cast<int64_t>(text_.size()) - o.greedy_prompt - o.greedy_tokens;
    for (int32_t j = 0; j < N; ++j) {
      const int64_t s = N > 1 ? span * j / (N - 1) : 0;
      if (bos) prompts[j].push_back(o.bos_id);
      prompts[j].insert(prompts[j].end(), text_.begin() + s, text_.begin() + s + o.greedy_prompt);
    }
    for (int32_t j0 = 0; j0 < N; j0 += std::max(o.batch, 8)) {
      const int32_t n = std::min(std::max(o.batch, 8), N - j0);
      std::vector<std::vector<int32_t>> part(prompts.begin() + j0, prompts.begin() + j0 + n);
      RETURN_IF_ERROR(RunLockstep(*engine, part, o.greedy_tokens - 1, o.prefill_chunk,
                                  [&](int i, int, const float* row) {
        const int32_t t = Argmax(row, V);
        gen[j0 + i].push_back(t);
        return t;
      }));
    }
    if (is_reference) {
      ref_greedy_ = gen;
      r.greedy_agreement = r.greedy_prefix = 1;
    } else {
      double equal = 0, prefix = 0;
      for (int32_t j = 0; j < N; ++j) {
        size_t p = 0;
        while (p < gen[j].size() && gen[j][p] == ref_greedy_[j][p]) ++p;
        prefix += double(p) / gen[j].size();
        for (size_t k = 0; k < gen[j].size(); ++k) equal += gen[j][k] == ref_greedy_[j][k];
      }
      r.greedy_agreement = equal / (double(N) * o.greedy_tokens);
      r.greedy_prefix = prefix / N;
    }
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::string PplResultsMarkdown(const std::vector<PplResult>& results) {
  const PplResult* fp16 = nullptr;
  for (const auto& r : results) {
    if (r.format == KvFormat{KvDtype::kFp16, KvScaleMode::kNone}) fp16 = &r;
  }
  std::string s =
      "| kv cache | perplexity | Δ vs fp16 | Δ vs ref (95% CI) | mean KL (nats) | top-1 agree | "
      "greedy tokens equal | greedy identical prefix | seconds |\n"
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  for (const auto& r : results) {
    const std::string delta =
        fp16 != nullptr ? absl::StrFormat("%+.3f%%", 100.0 * (r.perplexity / fp16->perplexity - 1))
                        : "–";
    auto pct = [](double x) { return std::isnan(x) ? std::string("–") : absl::StrFormat("%.1f%%", 100 * x); };
    const std::string ci = absl::StrFormat("%+.3f%% ± %.3f%%", 100 * std::expm1(r.nll_delta_mean),
                                           100 * 1.96 * r.nll_delta_stderr);
    absl::StrAppendFormat(&s, "| %s | %.4f | %s | %s | %.2e | %.2f%% | %s | %s | %.0f |\n", r.label,
                          r.perplexity, delta, ci, r.mean_kl, 100 * r.top1_agreement,
                          pct(r.greedy_agreement), pct(r.greedy_prefix), r.seconds);
  }
  return s;
}

std::string PplResultsJson(const std::vector<PplResult>& results) {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& r : results) {
    j.push_back({{"kv_cache", r.label},
                 {"kv_cache_dtype", KvDtypeName(r.format.dtype)},
                 {"kv_scale_mode", KvScaleModeName(r.format.scale_mode)},
                 {"windows", r.windows},
                 {"scored_tokens", r.scored_tokens},
                 {"mean_nll", r.mean_nll},
                 {"perplexity", r.perplexity},
                 {"nll_delta_mean", r.nll_delta_mean},
                 {"nll_delta_stderr", r.nll_delta_stderr},
                 {"mean_kl", r.mean_kl},
                 {"max_kl", r.max_kl},
                 {"top1_agreement", r.top1_agreement},
                 {"greedy_agreement", std::isnan(r.greedy_agreement) ? nlohmann::json() : nlohmann::json(r.greedy_agreement)},
                 {"greedy_prefix", std::isnan(r.greedy_prefix) ? nlohmann::json() : nlohmann::json(r.greedy_prefix)},
                 {"seconds", r.seconds}});
  }
  return j.dump(2);
}

}  // namespace strata
