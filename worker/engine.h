// The engine interface: runs one step of the LLaMA forward pass for a batch of
// sequences over a paged KV cache. The CPU engine implements it now; the CUDA
// engine implements the same interface.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "runtime/kv_format.h"
#include "runtime/model_config.h"

namespace strata {

// One sequence's part of a step.
struct SeqStepInput {
  std::vector<int32_t> tokens;       // new tokens to run (prefill chunk or one decode token)
  int32_t start_pos = 0;             // tokens of this sequence already in the cache
  std::vector<int32_t> block_table;  // block ids covering positions [0, start_pos + tokens)
  // Which logits to return: none, the last new token's, or every new token's
  // (prompt log-probs, perplexity).
  enum class Logits : uint8_t { kNone, kLast, kAll } logits = Logits::kLast;
};

struct BlockCopy {
  int32_t src = 0;
  int32_t dst = 0;
};

struct StepInput {
  std::vector<SeqStepInput> seqs;
  // Applied before the forward pass, in this order: swap out (device -> host
  // pool), swap in (host -> device pool), copy-on-write copies (device).
  std::vector<BlockCopy> swap_out;
  std::vector<BlockCopy> swap_in;
  std::vector<BlockCopy> copies;
};

struct StepOutput {
  // Rows of logits in sequence order: per sequence, 0, 1 or len(tokens) rows.
  std::vector<float> logits;  // [rows][vocab]
  std::vector<int32_t> row_begin;  // [num_seqs + 1] row offsets per sequence
};

struct EngineOptions {
  KvFormat kv_format;
  int32_t block_size = 16;
  int32_t num_gpu_blocks = 0;  // device (or main-memory, for the CPU engine) KV blocks
  int32_t num_cpu_blocks = 0;  // swap blocks
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual const ModelConfig& config() const = 0;
  virtual const EngineOptions& options() const = 0;
  // Validates the step against the pools (block ids in range, tables long
  // enough, positions within the model's context) and runs it.
  virtual absl::Status Step(const StepInput& input, StepOutput* output) = 0;
};

}  // namespace strata
