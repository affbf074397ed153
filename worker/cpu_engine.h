// The CPU engine: LLaMA forward pass over a paged, quantized KV cache held in
// main memory, fp32 activations. Projection weights are packed at creation
// for kernels/cpu/gemm_cpu.h, in fp32 or (EngineOptions::weight_dtype) fp16;
// attention and cache kernels from kernels/cpu (OpenMP).
//
// Tensor parallelism: with a CpuShardOptions of world_size > 1 the engine is
// one rank of a sharded model (worker/shard.h): it takes that rank's weights,
// holds its query and kv heads (the KV layout's num_kv_heads is the shard's),
// and sums the row-parallel o_proj and down_proj outputs over the ranks with
// Collectives::AllReduceSum before adding them to the residual. Every rank
// must run the same steps in the same order. With world_size 1 (the default)
// the forward pass is exactly the unsharded one.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/gemm_cpu.h"
#include "kernels/cpu/ops_cpu.h"
#include "kernels/kv_cache_view.h"
#include "runtime/kv_quant_params.h"
#include "runtime/weights.h"
#include "worker/collectives.h"
#include "worker/engine.h"
#include "worker/shard.h"

namespace strata {

struct CpuShardOptions {
  ShardSpec shard;                     // {0, 1}: unsharded
  Collectives* collectives = nullptr;  // required when shard.world_size > 1; not owned
  bool compute_logits = true;          // the LM head; off on ranks other than 0
};

class CpuEngine final : public Engine {
 public:
  // `quant_params` is required for static scale modes and ignored otherwise;
  // it covers the whole model (the engine keeps its shard's kv heads).
  // `weights` are the shard's (SliceWeights / LoadShardWeights) when sharded.
  static absl::StatusOr<std::unique_ptr<CpuEngine>> Create(
      ModelWeights weights, const EngineOptions& options,
      std::optional<KvQuantParams> quant_params = std::nullopt,
      const CpuShardOptions& shard = {});

  const ModelConfig& config() const override { return weights_.config; }
  const EngineOptions& options() const override { return options_; }
  absl::Status Step(const StepInput& input, StepOutput* output) override;

  // Called once per layer per step with the step's post-RoPE q, k, v
  // ([tokens][heads][head_dim], this shard's heads); calibration and accuracy
  // tools use it.
  using LayerObserver = std::function<void(int layer, const float* q, const float* k,
                                           const float* v, int64_t tokens)>;
  void set_layer_observer(LayerObserver observer) { observer_ = std::move(observer); }

  // The cache of one layer (tests and accuracy tools read it back).
  const KvCacheView& cache_view(int layer) const { return views_[layer]; }
  int64_t kv_bytes_per_block() const;  // all layers (this shard)
  const ShardDims& shard_dims() const { return dims_; }

 private:
  CpuEngine() = default;
  absl::Status Validate(const StepInput& input) const;
  void ApplyBlockMoves(const StepInput& input);
  void EnsureScratch(int64_t tokens);
  // x += y @ w^T for a row-parallel projection: directly when unsharded, else
  // through a partial product summed over the ranks.
  absl::Status RowParallelAccumulate(const float* y, const cpu::PackedWeights& w, float* x,
                                     int64_t tokens);

  struct AlignedFree {
    void operator()(uint8_t* p) const;
  };

  ModelWeights weights_;
  EngineOptions options_;
  std::optional<KvQuantParams> quant_params_;
  LayerObserver observer_;
  CpuShardOptions shard_;
  ShardDims dims_;
  // Packed projections per layer: [q; k; v] rows stacked, o, gate/up as
  // pairs (SwiGLU in the GEMM's epilogue), down. The unpacked matrices are
  // freed at creation (weights_ keeps embeddings and norms).
  struct PackedLayer {
    cpu::PackedWeights qkv, o, gate_up, down;
  };
  std::vector<PackedLayer> packed_;
  cpu::PackedWeights lm_head_;  // empty unless shard_.compute_logits
  std::vector<float> rope_cos_, rope_sin_;
  cpu::RopeTable rope_;

  KvBlockLayout layout_;
  std::vector<std::unique_ptr<uint8_t[], AlignedFree>> gpu_pool_;  // per layer
  std::vector<std::unique_ptr<uint8_t[], AlignedFree>> cpu_pool_;  // per layer (swap)
  std::vector<KvCacheView> views_;
  std::vector<std::vector<float>> static_scales_;  // per layer: k_scale,k_zero,v_scale,v_zero

  // Scratch, grown on demand.
  int64_t scratch_tokens_ = 0;
  std::vector<float> x_, h_, qkv_, q_, k_, v_, attn_, act_, partial_;
};

}  // namespace strata
