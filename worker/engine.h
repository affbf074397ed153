// The engine interface: runs one step of the LLaMA forward pass for a batch of
// sequences over a paged KV cache. The CPU engine implements it now; the CUDA
// engine implements the same interface.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "runtime/kv_format.h"
#include "runtime/model_config.h"
#include "runtime/sampling.h"

namespace strata {

// One sequence's part of a step.
struct SeqStepInput {
  std::vector<int32_t> tokens;       // new tokens to run (prefill chunk or one decode token)
  int32_t start_pos = 0;             // tokens of this sequence already in the cache
  std::vector<int32_t> block_table;  // block ids covering positions [0, start_pos + tokens)
  // Which logits to return: none, the last new token's, or every new token's
  // (prompt log-probs, perplexity).
  enum class Logits : uint8_t { kNone, kLast, kAll } logits = Logits::kLast;
  // On-device sampling, for engines whose SupportsSampling() is true (others
  // ignore these fields): the next token is drawn from the last new token's
  // logits with `sampling`, independently of `logits` (kNone keeps the logits
  // on the device). A seeded request's random stream is keyed by (seed,
  // position of the sampled row), so it does not depend on the batch.
  bool sample = false;
  SamplingParams sampling;
  int32_t num_logprobs = -1;  // -1: none; 0: the sampled token's; n: also the top n (<= 20)
};

struct KvBlockMove {
  int32_t src = 0;
  int32_t dst = 0;
};

struct StepInput {
  std::vector<SeqStepInput> seqs;
  // Applied before the forward pass, in this order: swap out (device -> host
  // pool), swap in (host -> device pool), copy-on-write copies (device).
  std::vector<KvBlockMove> swap_out;
  std::vector<KvBlockMove> swap_in;
  std::vector<KvBlockMove> copies;
};

struct StepOutput {
  // Rows of logits in sequence order: per sequence, 0, 1 or len(tokens) rows.
  std::vector<float> logits;  // [rows][vocab]
  std::vector<int32_t> row_begin;  // [num_seqs + 1] row offsets per sequence
  // On-device sampling results: [num_seqs] when any sequence set `sample`
  // (token -1 for those that did not), else empty.
  struct Sampled {
    int32_t token = -1;
    float logprob = 0.0f;                               // log-softmax of the raw logits
    std::vector<std::pair<int32_t, float>> top_logprobs;  // (id, logprob), best first
  };
  std::vector<Sampled> sampled;
};

struct EngineOptions {
  KvFormat kv_format;
  int32_t block_size = 16;
  int32_t num_gpu_blocks = 0;  // device (or main-memory, for the CPU engine) KV blocks
  int32_t num_cpu_blocks = 0;  // swap blocks
  // CPU engine: storage dtype of the projection and LM-head weights, kFp32
  // (exact) or kFp16 (rounded to nearest even at load; exact for an fp16
  // checkpoint; computed in fp32). Embeddings and norms stay fp32. The CUDA
  // engine takes its weight dtype from CudaEngineOptions instead.
  WeightDtype weight_dtype = WeightDtype::kFp32;
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual const ModelConfig& config() const = 0;
  virtual const EngineOptions& options() const = 0;
  // Validates the step against the pools (block ids in range, tables long
  // enough, positions within the model's context) and runs it.
  virtual absl::Status Step(const StepInput& input, StepOutput* output) = 0;
  // Whether Step() honours SeqStepInput::sample (the CUDA engine does).
  virtual bool SupportsSampling() const { return false; }
};

// INVALID_ARGUMENT unless every swap-out, swap-in and copy pair of `input`
// names blocks inside the pools of `options`. Engines call it before moving
// anything.
absl::Status ValidateBlockMoves(const StepInput& input, const EngineOptions& options);

}  // namespace strata
