#include "worker/offline_generator.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "runtime/kv_format_util.h"
#include "runtime/kv_quant_params.h"
#include "runtime/status_macros.h"
#include "runtime/weights.h"
#include "worker/cpu_engine.h"

namespace strata {

absl::StatusOr<std::unique_ptr<OfflineGenerator>> OfflineGenerator::Create(
    const OfflineOptions& options) {
  namespace fs = std::filesystem;
  ASSIGN_OR_RETURN(ModelWeights weights, LoadModelWeights(options.model_path));
  const fs::path model_dir =
      fs::is_directory(options.model_path) ? fs::path(options.model_path)
                                           : fs::path(options.model_path).parent_path();
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
                   Tokenizer::LoadFromDirectory(model_dir.string()));
  if (tokenizer->vocab_size() != weights.config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        model_dir.string(), ": tokenizer has ", tokenizer->vocab_size(),
        " pieces but the model's vocab_size is ", weights.config.vocab_size));
  }
  EngineOptions eo;
  ASSIGN_OR_RETURN(eo.kv_format, ParseKvFormat(options.kv_cache_dtype, options.kv_scale_mode,
                                               weights.source_dtype));
  eo.block_size = options.block_size;
  eo.weight_dtype = options.weight_dtype;
  // Enough blocks for a full batch of 64 sequences at the model's context.
  const int32_t per_seq =
      (weights.config.max_position_embeddings + options.block_size - 1) / options.block_size;
  eo.num_gpu_blocks = std::min<int64_t>(per_seq * 64, 1 << 20);
  std::optional<KvQuantParams> params;
  if (!options.kv_quant_params_path.empty()) {
    ASSIGN_OR_RETURN(params, LoadKvQuantParams(options.kv_quant_params_path));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<CpuEngine> engine,
                   CpuEngine::Create(std::move(weights), eo, std::move(params)));
  return std::make_unique<OfflineGenerator>(std::move(engine), std::move(tokenizer), options);
}

OfflineGenerator::OfflineGenerator(std::unique_ptr<Engine> engine,
                                   std::unique_ptr<Tokenizer> tokenizer,
                                   const OfflineOptions& options)
    : engine_(std::move(engine)), tokenizer_(std::move(tokenizer)), options_(options) {}

absl::StatusOr<std::vector<GenerateResult>> OfflineGenerator::Generate(
    const std::vector<GenerateRequest>& requests, const TokenCallback& on_token) {
  const ModelConfig& c = engine_->config();
  const int32_t bs = engine_->options().block_size;
  const int32_t max_ctx = c.max_position_embeddings;
  const int32_t n = static_cast<int32_t>(requests.size());

  // Admission: validate everything before running anything.
  int64_t blocks_needed = 0;
  for (int32_t i = 0; i < n; ++i) {
    const GenerateRequest& r = requests[i];
    if (r.prompt_ids.empty()) return absl::InvalidArgumentError(absl::StrCat("request ", i, ": empty prompt"));
    if (static_cast<int32_t>(r.prompt_ids.size()) >= max_ctx) {
      return absl::InvalidArgumentError(absl::StrCat("request ", i, ": prompt of ", r.prompt_ids.size(),
                                                     " tokens leaves no room in the ", max_ctx,
                                                     "-token context"));
    }
    if (r.max_new_tokens <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("request ", i, ": max_new_tokens must be > 0"));
    }
    for (int32_t t : r.prompt_ids) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("request ", i, ": token id ", t, " out of range"));
      }
    }
    RETURN_IF_ERROR(ValidateSamplingParams(r.sampling, c.vocab_size));
    const int64_t len = std::min<int64_t>(max_ctx, r.prompt_ids.size() + r.max_new_tokens);
    blocks_needed += (len + bs - 1) / bs;
  }
  if (blocks_needed > engine_->options().num_gpu_blocks) {
    return absl::ResourceExhaustedError(absl::StrCat("batch needs ", blocks_needed,
                                                     " KV blocks, the cache has ",
                                                     engine_->options().num_gpu_blocks));
  }

  struct Live {
    std::vector<int32_t> tokens;  // prompt + generated
    int32_t computed = 0;         // tokens in the cache
    std::vector<int32_t> blocks;
    Sampler sampler;
    bool done = false;
  };
  std::vector<Live> live;
  std::vector<GenerateResult> results(n);
  int32_t next_block = 0;
  for (int32_t i = 0; i < n; ++i) {
    const GenerateRequest& r = requests[i];
    const int64_t len = std::min<int64_t>(max_ctx, r.prompt_ids.size() + r.max_new_tokens);
    Live l{r.prompt_ids, 0, {}, Sampler(r.sampling), false};
    for (int64_t b = 0; b < (len + bs - 1) / bs; ++b) l.blocks.push_back(next_block++);
    live.push_back(std::move(l));
  }

  StepOutput out;
  for (;;) {
    StepInput step;
    std::vector<int32_t> index;  // step row -> request
    int32_t budget = options_.max_batch_tokens;
    for (int32_t i = 0; i < n && budget > 0; ++i) {
      Live& l = live[i];
      if (l.done) continue;
      const int32_t pending = static_cast<int32_t>(l.tokens.size()) - l.computed;
      const int32_t chunk = std::min(pending, budget);
      SeqStepInput s;
      s.tokens.assign(l.tokens.begin() + l.computed, l.tokens.begin() + l.computed + chunk);
      s.start_pos = l.computed;
      s.block_table = l.blocks;
      s.logits = chunk == pending ? SeqStepInput::Logits::kLast : SeqStepInput::Logits::kNone;
      budget -= chunk;
      step.seqs.push_back(std::move(s));
      index.push_back(i);
    }
    if (step.seqs.empty()) break;
    RETURN_IF_ERROR(engine_->Step(step, &out));
    for (size_t k = 0; k < index.size(); ++k) {
      const int32_t i = index[k];
      Live& l = live[i];
      l.computed += static_cast<int32_t>(step.seqs[k].tokens.size());
      if (step.seqs[k].logits == SeqStepInput::Logits::kNone) continue;
      const float* logits = out.logits.data() + int64_t{out.row_begin[k]} * c.vocab_size;
      GenerateResult& res = results[i];
      if (static_cast<int32_t>(res.logits.size()) < options_.keep_logits_steps) {
        res.logits.emplace_back(logits, logits + c.vocab_size);
      }
      const int32_t tok = l.sampler.Sample(logits, c.vocab_size);
      const GenerateRequest& r = requests[i];
      bool stop = false;
      for (int32_t s : r.stop_token_ids) stop |= (s == tok);
      if (stop) {
        res.finish = GenerateResult::Finish::kStop;
        l.done = true;
        continue;
      }
      res.output_ids.push_back(tok);
      if (on_token) on_token(i, tok);
      l.tokens.push_back(tok);
      if (static_cast<int32_t>(res.output_ids.size()) >= r.max_new_tokens) {
        res.finish = GenerateResult::Finish::kLength;
        l.done = true;
      } else if (static_cast<int32_t>(l.tokens.size()) > max_ctx) {
        // Like the reference, the token sampled at the last position is
        // emitted but never forwarded.
        res.finish = GenerateResult::Finish::kContext;
        l.done = true;
      }
    }
  }
  return results;
}

}  // namespace strata
