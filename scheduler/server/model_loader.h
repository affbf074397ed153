// Builds the engine `strata serve` drives: loads the tokenizer and weights,
// plans the KV pools (runtime/kv_capacity.h) and creates the engine behind
// the Engine interface.
//
// Engines:
//  * --device cpu --tp 1: the in-process CpuEngine (no child processes);
//  * --device cpu --tp N > 1 (or --worker-processes): N strata-worker
//    processes started by a WorkerPool, driven through its RemoteEngine
//    (scheduler/worker_pool.h); they are children of this process and die
//    with it;
//  * --device cuda: always N = --tp strata-worker processes (N >= 1), rank r
//    on GPU r, each running the CUDA engine on its shard, NCCL between them,
//    sampling on rank 0's GPU; this process needs no GPU;
//  * --external-workers: the same, but the --tp workers are started elsewhere
//    and dial --control-plane-address (strata-scheduler is `serve` in this mode);
//  * --load-format dummy: --model names a shape (llama-2-7b, ... see
//    NamedModelShape) or a config.json; random weights on the workers; the
//    tokenizer comes from --tokenizer (its vocabulary must match).
//
// KV pool, --device cuda: --gpu-memory-utilization x the free device memory
// after weights and activations, per rank; the minimum over ranks.
// KV pool (main memory for --device cpu), per engine process, i.e. per rank
// with workers: --kv-cache-memory GiB when given; otherwise
// --gpu-memory-utilization x MemAvailable (in-process: measured after the
// weights are loaded; workers: divided by the ranks), capped at what
// --max-num-seqs full-context sequences can use (more blocks would only
// extend the prefix cache). Swap pool: --swap-space GiB (per rank).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/kv_format.h"
#include "runtime/tokenizer.h"
#include "scheduler/server/load_progress.h"
#include "scheduler/worker_pool.h"
#include "worker/engine.h"

namespace strata::serving {

struct EngineConfig {
  std::string model_path;
  std::string load_format = "auto";  // auto | dummy
  std::string tokenizer_path;        // "" = the model's directory
  std::string dtype = "auto";        // weights: cuda auto (= fp16), fp16, bf16; cpu auto (= fp32), fp32, fp16
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
  int32_t max_num_batched_tokens = 0;  // cuda: the engine's per-step token budget (0 = default)
  bool enforce_eager = false;          // cuda: no CUDA graphs
  bool serialize_mixed_attention = false;  // cuda: mixed steps' two attention kernels one after the other
  // Worker processes.
  bool worker_processes = false;  // also for --tp 1
  // Workers started elsewhere (Kubernetes pods, other hosts): nothing is
  // spawned; --tp strata-worker processes dial control_plane_address with the
  // secret in control_plane_secret_file.
  bool external_workers = false;
  std::string control_plane_address = "127.0.0.1:0";
  std::string control_plane_secret_file;
  std::string worker_binary;      // "" = strata-worker next to this binary, ../worker/, $PATH
  double worker_ready_timeout_s = 600;
  // One step on the workers may take this long before the group counts as
  // hung (a large model on CPU workers, or a long prefill, needs more).
  double worker_step_timeout_s = 60;
};

struct LoadedModel {
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Engine> in_process;  // or:
  std::unique_ptr<WorkerPool> pool;    // owns its RemoteEngine
  Engine* engine = nullptr;            // the one to drive
  int64_t kv_bytes_per_block = 0;      // all layers (of one rank)
  int32_t max_model_len = 0;           // resolved

  // OK in process; with workers, UNAVAILABLE naming a dead or failed worker.
  absl::Status Health() const { return pool ? pool->Health().status : absl::OkStatus(); }
  // Stops the worker processes (no-op in process). Call after the engine
  // thread has stopped.
  void Shutdown() {
    if (pool) pool->Shutdown();
  }
};

// Checks the flags that need no model (INVALID_ARGUMENT / UNIMPLEMENTED
// naming the flag), so `strata serve` fails before listening.
absl::Status ValidateEngineConfig(const EngineConfig& config);

absl::StatusOr<LoadedModel> LoadModel(const EngineConfig& config, LoadProgress* progress);

}  // namespace strata::serving
