// The CPU engine: fp32 LLaMA forward pass over a paged, quantized KV cache
// held in main memory. GEMMs through OpenBLAS, attention and cache kernels
// from kernels/cpu (OpenMP).
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/ops_cpu.h"
#include "kernels/kv_cache_view.h"
#include "runtime/kv_quant_params.h"
#include "runtime/weights.h"
#include "worker/engine.h"

namespace strata {

class CpuEngine final : public Engine {
 public:
  // `quant_params` is required for static scale modes and ignored otherwise.
  static absl::StatusOr<std::unique_ptr<CpuEngine>> Create(
      ModelWeights weights, const EngineOptions& options,
      std::optional<KvQuantParams> quant_params = std::nullopt);

  const ModelConfig& config() const override { return weights_.config; }
  const EngineOptions& options() const override { return options_; }
  absl::Status Step(const StepInput& input, StepOutput* output) override;

  // Called once per layer per step with the step's post-RoPE q, k, v
  // ([tokens][heads][head_dim]); calibration and accuracy tools use it.
  using LayerObserver = std::function<void(int layer, const float* q, const float* k,
                                           const float* v, int64_t tokens)>;
  void set_layer_observer(LayerObserver observer) { observer_ = std::move(observer); }

  // The cache of one layer (tests and accuracy tools read it back).
  const KvCacheView& cache_view(int layer) const { return views_[layer]; }
  int64_t kv_bytes_per_block() const;  // all layers

 private:
  CpuEngine() = default;
  absl::Status Validate(const StepInput& input) const;
  void ApplyBlockMoves(const StepInput& input);
  void EnsureScratch(int64_t tokens);

  struct AlignedFree {
    void operator()(uint8_t* p) const;
  };

  ModelWeights weights_;
  EngineOptions options_;
  std::optional<KvQuantParams> quant_params_;
  LayerObserver observer_;
  // Fused projections: [q; k; v] rows and [gate; up] rows, per layer.
  std::vector<std::vector<float>> wqkv_, wgateup_;
  std::vector<float> rope_cos_, rope_sin_;
  cpu::RopeTable rope_;

  KvBlockLayout layout_;
  std::vector<std::unique_ptr<uint8_t[], AlignedFree>> gpu_pool_;  // per layer
  std::vector<std::unique_ptr<uint8_t[], AlignedFree>> cpu_pool_;  // per layer (swap)
  std::vector<KvCacheView> views_;
  std::vector<std::vector<float>> static_scales_;  // per layer: k_scale,k_zero,v_scale,v_zero

  // Scratch, grown on demand.
  int64_t scratch_tokens_ = 0;
  std::vector<float> x_, h_, qkv_, q_, k_, v_, attn_, gu_, act_;
};

}  // namespace strata
