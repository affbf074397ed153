#include "scheduler/eval_cli.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "runtime/kv_format_util.h"
#include "runtime/status_macros.h"
#include "runtime/tokenizer.h"
#include "runtime/weights.h"
#include "worker/calibrate.h"
#include "worker/eval_ppl.h"

namespace strata {
namespace {

struct EvalFlags {
  std::string model, text, dtypes = "fp32", scale_modes, params_path, reference = "fp32", json_out;
  std::string bos = "auto";
  EvalPplOptions opts;
};

struct CalibrateFlags {
  std::string model, text, out, dtypes = "int8";
  std::string bos = "auto";
  std::string k_range = "observed";
  bool per_head = false;
  CalibrateOptions opts;
};

struct State {
  CLI::App* eval = nullptr;
  CLI::App* calibrate = nullptr;
  EvalFlags e;
  CalibrateFlags c;
};

State& GetState() {
  static State* s = new State();  // flag storage for the life of the process
  return *s;
}

struct Loaded {
  ModelWeights weights;
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<int32_t> tokens;
};

absl::StatusOr<Loaded> LoadModelAndText(const std::string& model, const std::string& text_path) {
  Loaded l;
  ASSIGN_OR_RETURN(l.weights, LoadModelWeights(model));
  ASSIGN_OR_RETURN(l.tokenizer, Tokenizer::LoadFromDirectory(
                                    std::filesystem::is_directory(model)
                                        ? model
                                        : (std::filesystem::path(model).extension() == ".gguf"
                                               ? model
                                               : std::filesystem::path(model).parent_path().string())));
  if (l.tokenizer->vocab_size() != l.weights.config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(model, ": tokenizer has ", l.tokenizer->vocab_size(),
                                                   " pieces, the model ", l.weights.config.vocab_size));
  }
  std::ifstream in(text_path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--text ", text_path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  l.tokens = l.tokenizer->Encode(ss.str());
  if (l.tokens.empty()) return absl::InvalidArgumentError(absl::StrCat("--text ", text_path, ": no tokens"));
  return l;
}

// --bos: "auto" (the tokenizer's add_bos), "none", or a token id.
absl::StatusOr<int32_t> BosId(const std::string& flag, const Tokenizer& tok) {
  if (flag == "auto") return tok.add_bos() ? tok.bos_id() : -1;
  if (flag == "none") return -1;
  int32_t id = -1;
  if (!absl::SimpleAtoi(flag, &id) || id < 0 || id >= tok.vocab_size()) {
    return absl::InvalidArgumentError(absl::StrCat("--bos: expected auto, none or a token id, got ", flag));
  }
  return id;
}

std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) out.emplace_back(p);
  return out;
}

std::string ForDtype(const std::string& pattern, KvDtype d) {
  return absl::StrReplaceAll(pattern, {{"{dtype}", KvDtypeName(d)}});
}

int Fail(const char* cmd, const absl::Status& s) {
  std::fprintf(stderr, "strata %s: %s\n", cmd, s.ToString().c_str());
  return s.code() == absl::StatusCode::kInvalidArgument || s.code() == absl::StatusCode::kNotFound ||
                 s.code() == absl::StatusCode::kUnimplemented
             ? 2
             : 1;
}

absl::StatusOr<std::vector<KvFormatSpec>> ParseSpecs(const EvalFlags& f, WeightDtype wd) {
  std::vector<KvFormat> formats;
  if (f.dtypes == "all") {
    if (!f.scale_modes.empty()) return absl::InvalidArgumentError("--kv-scale-mode must be empty with all");
    formats = AllSupportedKvFormats();
  } else {
    const auto d = SplitList(f.dtypes);
    const auto m = SplitList(f.scale_modes);
    if (d.empty()) return absl::InvalidArgumentError("--kv-cache-dtype is empty");
    if (!m.empty() && m.size() != 1 && m.size() != d.size()) {
      return absl::InvalidArgumentError("--kv-scale-mode needs one value or one per --kv-cache-dtype");
    }
    for (size_t i = 0; i < d.size(); ++i) {
      const std::string mode = m.empty() ? "" : m[m.size() == 1 ? 0 : i];
      ASSIGN_OR_RETURN(KvFormat fmt, ParseKvFormat(d[i], mode, wd));
      formats.push_back(fmt);
    }
  }
  std::vector<KvFormatSpec> specs;
  for (KvFormat fmt : formats) {
    KvFormatSpec s{fmt, std::nullopt, ""};
    if (fmt.scale_mode == KvScaleMode::kStatic) {
      if (f.params_path.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(KvFormatName(fmt),
                                                       " needs --kv-quant-params-path (see `strata calibrate`)"));
      }
      ASSIGN_OR_RETURN(s.params, LoadKvQuantParams(ForDtype(f.params_path, fmt.dtype)));
    }
    specs.push_back(std::move(s));
  }
  return specs;
}

absl::Status RunEvalPpl(const EvalFlags& f) {
  ASSIGN_OR_RETURN(Loaded l, LoadModelAndText(f.model, f.text));
  ASSIGN_OR_RETURN(std::vector<KvFormatSpec> specs, ParseSpecs(f, l.weights.source_dtype));
  EvalPplOptions o = f.opts;
  ASSIGN_OR_RETURN(o.reference, ParseKvFormat(f.reference, "", l.weights.source_dtype));
  if (o.reference.scale_mode != KvScaleMode::kNone || KvDtypeBits(o.reference.dtype) < 16) {
    return absl::InvalidArgumentError("--reference-kv-cache-dtype must be fp32, fp16 or bf16");
  }
  ASSIGN_OR_RETURN(o.bos_id, BosId(f.bos, *l.tokenizer));
  ASSIGN_OR_RETURN(std::unique_ptr<PplEvaluator> ev,
                   PplEvaluator::Create(l.weights, l.tokens, o));
  const EvalPplOptions& eo = ev->options();
  std::printf("model %s (%d layers, %d heads, %d kv heads, head_dim %d); text %s: %zu tokens\n",
              f.model.c_str(), l.weights.config.num_layers, l.weights.config.num_heads,
              l.weights.config.num_kv_heads, l.weights.config.head_dim, f.text.c_str(), l.tokens.size());
  std::printf("windows: %d of %d positions (BOS %s), stride %d: %lld tokens scored from text token %lld; "
              "reference cache %s; greedy: %d prompts of %d tokens, %d generated each\n",
              ev->num_windows(), eo.context, eo.bos_id >= 0 ? "yes" : "no", eo.stride,
              static_cast<long long>(int64_t{ev->num_windows()} * eo.stride),
              static_cast<long long>(eo.offset + eo.context - (eo.bos_id >= 0 ? 1 : 0) - eo.stride),
              KvFormatName(eo.reference).c_str(), eo.greedy_continuations, eo.greedy_prompt,
              eo.greedy_tokens);
  std::fflush(stdout);
  std::vector<PplResult> results;
  for (const KvFormatSpec& spec : specs) {
    absl::StatusOr<PplResult> r = spec.format == eo.reference && !spec.params ? ev->Reference()
                                                                             : ev->Evaluate(spec);
    if (!r.ok()) return r.status();
    const std::string greedy = std::isnan(r->greedy_agreement)
                                   ? std::string("-")
                                   : absl::StrFormat("%.1f%%", 100 * r->greedy_agreement);
    std::fprintf(stderr, "%-18s ppl %.4f  KL %.2e  top1 %.2f%%  greedy %s  (%.0f s)\n",
                 r->label.c_str(), r->perplexity, r->mean_kl, 100 * r->top1_agreement,
                 greedy.c_str(), r->seconds);
    results.push_back(*r);
  }
  std::printf("\n%s", PplResultsMarkdown(results).c_str());
  if (!f.json_out.empty()) {
    std::ofstream out(f.json_out);
    out << PplResultsJson(results) << "\n";
    if (!out) return absl::InternalError(absl::StrCat("--json ", f.json_out, ": cannot write"));
  }
  return absl::OkStatus();
}

absl::Status RunCalibrate(const CalibrateFlags& f) {
  ASSIGN_OR_RETURN(Loaded l, LoadModelAndText(f.model, f.text));
  std::vector<KvDtype> dtypes;
  for (const std::string& d : SplitList(f.dtypes)) {
    ASSIGN_OR_RETURN(KvFormat fmt, ParseKvFormat(d, "static", l.weights.source_dtype));
    dtypes.push_back(fmt.dtype);
  }
  if (dtypes.empty()) return absl::InvalidArgumentError("--kv-cache-dtype is empty");
  if (dtypes.size() > 1 && f.out.find("{dtype}") == std::string::npos) {
    return absl::InvalidArgumentError("several dtypes need {dtype} in --out");
  }
  CalibrateOptions o = f.opts;
  ASSIGN_OR_RETURN(o.bos_id, BosId(f.bos, *l.tokenizer));
  KRange k_range = KRange::kObserved;
  if (f.k_range == "rope") {
    k_range = KRange::kRopePairNorm;
  } else if (f.k_range != "observed") {
    return absl::InvalidArgumentError(absl::StrCat("--k-range: expected observed or rope, got ", f.k_range));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<KvRangeObserver> ranges, ObserveKvRanges(l.weights, l.tokens, o));
  for (KvDtype d : dtypes) {
    ASSIGN_OR_RETURN(KvQuantParams p, ranges->Finish(d, f.per_head, k_range));
    const std::string path = ForDtype(f.out, d);
    std::ofstream out(path);
    out << KvQuantParamsToJson(p, f.per_head) << "\n";
    if (!out) return absl::InternalError(absl::StrCat("--out ", path, ": cannot write"));
    std::printf("wrote %s (%s, %s scales, %lld calibration tokens)\n", path.c_str(), KvDtypeName(d),
                f.per_head ? "per-kv-head" : "per-layer",
                static_cast<long long>(ranges->tokens_observed()));
  }
  return absl::OkStatus();
}

}  // namespace

void RegisterEvalCommands(CLI::App& app) {
  State& st = GetState();
  EvalFlags& e = st.e;
  CLI::App* ev = app.add_subcommand(
      "eval-ppl", "Perplexity, KL and greedy agreement of KV cache formats through the paged decode path");
  ev->add_option("--model", e.model, "Model: HF directory, llama2.c .bin or .gguf file")->required();
  ev->add_option("--text", e.text, "UTF-8 text file to evaluate on")->required()->check(CLI::ExistingFile);
  ev->add_option("--kv-cache-dtype", e.dtypes,
                 "Format(s): fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int8, int4, a comma list, or all")
      ->capture_default_str();
  ev->add_option("--kv-scale-mode", e.scale_modes, "none, static, dynamic (one, or one per dtype)");
  ev->add_option("--kv-quant-params-path", e.params_path,
                 "Static scales (JSON); {dtype} is replaced by the dtype name");
  ev->add_option("--context", e.opts.context, "Positions per window (including BOS)")->required()
      ->check(CLI::PositiveNumber);
  ev->add_option("--stride", e.opts.stride, "Tokens scored per window (0: context/2)")
      ->check(CLI::NonNegativeNumber);
  ev->add_option("--max-tokens", e.opts.max_tokens, "Text tokens evaluated (0: all)")
      ->check(CLI::NonNegativeNumber);
  ev->add_option("--offset", e.opts.offset, "First text token evaluated")->check(CLI::NonNegativeNumber);
  ev->add_option("--batch", e.opts.batch, "Windows per step")->capture_default_str()->check(CLI::PositiveNumber);
  ev->add_option("--prefill-chunk", e.opts.prefill_chunk, "Prefill tokens per sequence per step")
      ->capture_default_str()->check(CLI::PositiveNumber);
  ev->add_option("--block-size", e.opts.block_size, "Tokens per KV block")->capture_default_str();
  ev->add_option("--reference-kv-cache-dtype", e.reference, "Reference cache: fp32 or fp16")
      ->capture_default_str();
  ev->add_option("--greedy-continuations", e.opts.greedy_continuations, "Prompts for greedy agreement")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  ev->add_option("--greedy-tokens", e.opts.greedy_tokens, "Tokens generated per prompt")
      ->capture_default_str()->check(CLI::PositiveNumber);
  ev->add_option("--greedy-prompt", e.opts.greedy_prompt, "Text tokens per greedy prompt")
      ->capture_default_str()->check(CLI::PositiveNumber);
  ev->add_option("--json", e.json_out, "Also write the results as JSON to this file");
  ev->add_option("--bos", e.bos, "Token starting each window: auto (the tokenizer's), none, or an id")
      ->capture_default_str();
  st.eval = ev;

  CalibrateFlags& c = st.c;
  CLI::App* cal = app.add_subcommand("calibrate", "Static KV cache scales from K/V ranges over a text");
  cal->add_option("--model", c.model, "Model: HF directory, llama2.c .bin or .gguf file")->required();
  cal->add_option("--text", c.text, "Calibration text (UTF-8)")->required()->check(CLI::ExistingFile);
  cal->add_option("--out", c.out, "Output JSON ({dtype} is replaced by the dtype name)")->required();
  cal->add_flag("--per-head", c.per_head, "One scale per kv head (else one per layer)");
  cal->add_option("--kv-cache-dtype", c.dtypes, "int8, fp8_e4m3, fp8_e5m2, or a comma list")
      ->capture_default_str();
  cal->add_option("--context", c.opts.context, "Positions per window (0: min(model, 2048))")
      ->check(CLI::NonNegativeNumber);
  cal->add_option("--offset", c.opts.offset, "First text token used")->check(CLI::NonNegativeNumber);
  cal->add_option("--max-tokens", c.opts.max_tokens, "Text tokens used (0: all)")
      ->check(CLI::NonNegativeNumber);
  cal->add_option("--batch", c.opts.batch, "Windows per step")->capture_default_str()->check(CLI::PositiveNumber);
  cal->add_option("--bos", c.bos, "Token starting each window: auto (the tokenizer's), none, or an id")
      ->capture_default_str();
  cal->add_option("--k-range", c.k_range,
                  "K range: observed (min/max seen) or rope (RoPE pair norm: valid at any position)")
      ->capture_default_str();
  st.calibrate = cal;
}

std::optional<int> DispatchEvalCommands() {
  State& st = GetState();
  if (st.eval != nullptr && st.eval->parsed()) {
    const absl::Status s = RunEvalPpl(st.e);
    return s.ok() ? 0 : Fail("eval-ppl", s);
  }
  if (st.calibrate != nullptr && st.calibrate->parsed()) {
    const absl::Status s = RunCalibrate(st.c);
    return s.ok() ? 0 : Fail("calibrate", s);
  }
  return std::nullopt;
}

}  // namespace strata
