// Builds the engine `strata serve` drives: loads the tokenizer and weights,
// plans the KV pools (runtime/kv_capacity.h) and creates the engine behind
// the Engine interface.
//
// Today: the in-process CpuEngine (--device cpu, --tp 1). --tp > 1 and
// --device cuda need the worker processes (strata-worker + WorkerPool +
// RemoteEngine), which are not integrated yet: they return UNIMPLEMENTED.
//
// KV pool for --device cpu (main memory): --kv-cache-memory GiB when given;
// otherwise --gpu-memory-utilization x MemAvailable (measured after the
// weights are loaded), capped at what --max-num-seqs full-context sequences
// can use (more blocks would only extend the prefix cache). Swap pool:
// --swap-space GiB.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/kv_format.h"
#include "runtime/tokenizer.h"
#include "scheduler/server/load_progress.h"
#include "worker/engine.h"

namespace strata::serving {

struct EngineConfig {
  std::string model_path;
  int32_t tp = 1;
  std::string device = "cpu";  // cpu | cuda
  std::string kv_cache_dtype = "auto";
  std::string kv_scale_mode;  // "" = the dtype's default
  std::string kv_quant_params_path;
  double swap_space_gib = 1.0;
  double gpu_memory_utilization = 0.9;
  double kv_cache_memory_gib = 0.0;  // --device cpu; 0 = derive (see above)
  int32_t block_size = 16;
  int32_t max_num_seqs = 256;
  int32_t max_model_len = 0;  // 0 = the model's context
};

struct LoadedModel {
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Engine> engine;
  int64_t kv_bytes_per_block = 0;  // all layers
  int32_t max_model_len = 0;       // resolved
};

// Checks the flags that need no model (INVALID_ARGUMENT / UNIMPLEMENTED
// naming the flag), so `strata serve` fails before listening.
absl::Status ValidateEngineConfig(const EngineConfig& config);

absl::StatusOr<LoadedModel> LoadModel(const EngineConfig& config, LoadProgress* progress);

}  // namespace strata::serving
