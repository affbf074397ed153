// In-process generation over one engine, without RPC: loads a model and its
// tokenizer, runs a set of requests together (batched prefill, then batched
// decode), and returns their tokens. Used by `strata generate`, tests and
// the CPU benchmark. Blocks come from a simple free list here; the serving
// path allocates them through the scheduler's block manager instead.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/sampling.h"
#include "runtime/tokenizer.h"
#include "worker/engine.h"

namespace strata {

struct GenerateRequest {
  std::vector<int32_t> prompt_ids;  // including BOS when wanted
  int32_t max_new_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;  // generation stops after emitting one (not included)
};

struct GenerateResult {
  std::vector<int32_t> output_ids;
  enum class Finish { kLength, kStop, kContext } finish = Finish::kLength;
  // Logits of the first `keep_logits_steps` sampled positions (tests).
  std::vector<std::vector<float>> logits;
};

struct OfflineOptions {
  std::string model_path;
  std::string kv_cache_dtype = "auto";
  std::string kv_scale_mode;            // "" = default of the dtype
  std::string kv_quant_params_path;     // static scales
  int32_t block_size = 16;
  int32_t max_batch_tokens = 4096;      // prefill chunking budget per step
  int32_t keep_logits_steps = 0;
  // CPU engine weight storage: kFp32 (exact) or kFp16 (half the bytes per
  // token; exact for fp16 checkpoints). See EngineOptions::weight_dtype.
  WeightDtype weight_dtype = WeightDtype::kFp32;
};

class OfflineGenerator {
 public:
  static absl::StatusOr<std::unique_ptr<OfflineGenerator>> Create(const OfflineOptions& options);
  // Wraps an existing engine and tokenizer (tests, benchmarks).
  OfflineGenerator(std::unique_ptr<Engine> engine, std::unique_ptr<Tokenizer> tokenizer,
                   const OfflineOptions& options);

  // Runs all requests as one batch. Fails (without partial results) on
  // invalid requests: empty prompt, bad ids, prompt beyond the context.
  // `on_token(request_index, token)` is called for every emitted token, in order.
  using TokenCallback = std::function<void(int32_t, int32_t)>;
  absl::StatusOr<std::vector<GenerateResult>> Generate(const std::vector<GenerateRequest>& requests,
                                                       const TokenCallback& on_token = nullptr);

  const Tokenizer& tokenizer() const { return *tokenizer_; }
  Engine& engine() { return *engine_; }
  const ModelConfig& config() const { return engine_->config(); }

 private:
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Tokenizer> tokenizer_;
  OfflineOptions options_;
};

}  // namespace strata
