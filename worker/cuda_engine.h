// The GPU engine: the LLaMA forward pass on CUDA over the paged, quantized KV
// cache, at the speed of the memory.
//
// Weights live on the device in fp16 or bf16 (norms in fp32); the residual
// stream is fp32. Per layer: RMSNorm -> fused QKV GEMM (cuBLAS, fp32 out) ->
// RoPE fused with the quantizing cache write (kernels/cuda_ops) -> paged
// attention (kernels/cuda: split-K decode, or prefill for mixed steps) ->
// output projection accumulated into the residual (GEMM beta = 1) -> RMSNorm
// -> fused gate/up GEMM -> SiLU*up -> down projection accumulated into the
// residual. Steps of at most 4 tokens instead run the fused small-batch GEMV
// of kernels/cuda_ops (RMSNorm / conversion / SwiGLU folded into the
// projections: 5 launches per layer plus attention). Logits for the requested rows only; sampling on the device, so a
// decode step sends only token ids (and asked-for log-probs) to the host.
// Decode-only steps replay CUDA graphs captured per (batch bucket, context
// bucket); mixed prefill + decode steps run eagerly.
//
// Memory: weights, then one activation arena sized for max_num_tokens /
// max_num_seqs / max_logit_rows, then the KV pools: with num_gpu_blocks == 0
// the block count is floor(free device memory after weights and arena *
// gpu_memory_utilization / bytes of one block across all layers). Every
// CUDA/cuBLAS call is checked; errors come back as absl::Status.
//
// Tensor parallelism: with a shard of world_size > 1 the engine is one rank of
// a sharded model (worker/shard.h): it holds its query/kv heads and MLP
// columns, and after the row-parallel o_proj and down projections the
// residual stream is summed over the ranks in place (rank 0 adds its partial
// to the residual, the other ranks start from zero) with
// Collectives::AllReduceSum on the engine's stream, so the all-reduces are
// captured into the decode CUDA graphs with the kernels. Only ranks with
// compute_logits run the LM head and sampling.
//
// Two-phase creation (workers): with defer_kv_allocation the engine uploads
// weights and carves its arena, reports how many KV blocks would fit
// (max_gpu_blocks()), and allocates the pools later with AllocateKv(), once
// the scheduler has taken the minimum over the ranks.
//
// Threading: one engine is driven by one thread (the worker's engine thread);
// all device work is on the engine's own stream, except the prefill attention
// of mixed steps, which forks onto a side stream and joins back within the layer.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cuda_ops/cuda_ops.h"
#include "kernels/kv_cache_view.h"
#include "runtime/kv_quant_params.h"
#include "runtime/weights.h"
#include "worker/collectives.h"
#include "worker/cuda_util.h"
#include "worker/engine.h"
#include "worker/shard.h"

namespace strata {

struct CudaEngineOptions {
  // kv_format, block_size, num_gpu_blocks (0 = from gpu_memory_utilization),
  // num_cpu_blocks (pinned host swap blocks).
  EngineOptions engine;
  WeightDtype dtype = WeightDtype::kFp16;  // device weights: kFp16 or kBf16
  double gpu_memory_utilization = 0.9;     // (0, 1]: share of the free memory for KV blocks
  int32_t max_num_tokens = 4096;           // new tokens per step (prefill chunk budget)
  int32_t max_num_seqs = 256;              // sequences per step
  int32_t max_logit_rows = 256;            // LM-head rows per launch (longer kAll requests run in chunks)
  // Decode batch sizes that get CUDA graphs (a decode step of n sequences
  // replays the smallest bucket >= n, padded). Empty: always eager.
  std::vector<int32_t> graph_batch_sizes = {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256};
  // Steps of <= cuda_ops::kGemvMaxM tokens use the fused small-batch GEMV
  // (RMSNorm, dtype conversion and SwiGLU folded into the projections)
  // instead of cuBLAS + element-wise kernels.
  bool fused_small_batch = true;
  // Mixed steps (prompt chunks and one-token sequences together): the prefill
  // attention runs on a second, higher-priority stream side by side with the
  // decode attention (each alone fills only part of the GPU once the heads
  // are sharded), joined before the output projection. Off: one after the other.
  bool overlap_mixed_attention = true;
  int device = 0;
  // Tensor parallelism (see above). `collectives` (not owned) must be set
  // before the first step of a sharded engine: here or with set_collectives().
  ShardSpec shard;
  Collectives* collectives = nullptr;
  bool compute_logits = true;  // the LM head and sampling; off on ranks other than 0
  // Create() stops before the KV pools: see AllocateKv().
  bool defer_kv_allocation = false;
};

// Where the device memory went (bytes), measured at creation.
struct CudaMemoryReport {
  int64_t total = 0;             // cudaMemGetInfo total
  int64_t weights = 0;           // device weights
  int64_t arena = 0;             // activations, step inputs, workspaces
  int64_t free_before_kv = 0;    // free after weights + arena
  int64_t kv_bytes_per_block = 0;  // all layers
  int64_t kv = 0;                // num_gpu_blocks * kv_bytes_per_block
  int64_t free_after_kv = 0;
  int64_t host_swap = 0;         // pinned host swap pool
};

class CudaEngine final : public Engine {
 public:
  // Real weights (host fp32, converted on upload; the shard's weights when
  // sharded: SliceWeights / LoadShardWeights). `quant_params` is required for
  // static scale modes and ignored otherwise; it covers the whole model (a
  // sharded engine keeps its kv heads).
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Create(
      const ModelWeights& weights, const CudaEngineOptions& options,
      std::optional<KvQuantParams> quant_params = std::nullopt);
  // Random weights of `config`'s shape, generated on the device (--load-format dummy).
  static absl::StatusOr<std::unique_ptr<CudaEngine>> CreateDummy(
      const ModelConfig& config, const CudaEngineOptions& options, uint64_t seed,
      std::optional<KvQuantParams> quant_params = std::nullopt);
  ~CudaEngine() override;

  // The whole model's configuration (shard_config() is this rank's part).
  const ModelConfig& config() const override { return full_config_; }
  const ModelConfig& shard_config() const { return config_; }
  const EngineOptions& options() const override { return options_.engine; }
  absl::Status Step(const StepInput& input, StepOutput* output) override;
  bool SupportsSampling() const override { return true; }

  const CudaEngineOptions& cuda_options() const { return options_; }
  // Deferred creation: the KV blocks that fit
  // gpu_memory_utilization x the free memory after weights and arena (or
  // options.engine.num_gpu_blocks when set), then the pools' allocation.
  int32_t max_gpu_blocks() const { return max_gpu_blocks_; }
  absl::Status AllocateKv(int32_t num_gpu_blocks, int32_t num_cpu_blocks);
  void set_collectives(Collectives* collectives) { options_.collectives = collectives; }
  const CudaMemoryReport& memory() const { return memory_; }
  cudaStream_t stream() const { return stream_; }
  // One layer's device pool (tests and accuracy tools copy it back).
  const KvCacheView& cache_view(int layer) const { return views_[layer]; }
  int64_t kv_bytes_per_block() const { return memory_.kv_bytes_per_block; }
  // Bytes of device weights one forward pass reads (all matrices + norms).
  int64_t weight_bytes_read_per_step() const { return weight_bytes_read_; }
  // Fills every slot of every layer with K/V drawn uniformly from
  // [-range, range], written through the real quantizing cache write
  // (benchmarks: never time on zeros).
  absl::Status FillKvCacheRandom(uint64_t seed, float range = 3.0f);
  // Stage timing for benchmarks: while on, steps run eagerly with CUDA events
  // between the stages of the forward pass (sharded engines: "all_reduce" is
  // the collectives' share). StageProfile() gives the mean
  // milliseconds per step of each stage since the last reset.
  void set_profile_stages(bool on) { profile_ = on; }
  std::vector<std::pair<std::string, double>> StageProfile() const;
  void ResetStageProfile() { prof_sum_.clear(), prof_steps_ = 0; }
  // Number of CUDA graphs captured so far, and steps that replayed one.
  int num_graphs() const { return static_cast<int>(graphs_.size()); }
  int64_t graph_replays() const { return graph_replays_; }

 private:
  CudaEngine() = default;
  struct Layer {
    void* wqkv = nullptr;   // [q + 2kv][hidden]
    void* wo = nullptr;     // [hidden][q]
    void* wgu = nullptr;    // [2 * inter][hidden]: gate rows, then up rows
    void* wdown = nullptr;  // [hidden][inter]
    float* attn_norm = nullptr;
    float* mlp_norm = nullptr;
  };
  // Per-step plan, in pinned host memory, mirrored by device arrays at fixed
  // addresses (CUDA graphs read them).
  struct StepArrays {
    int32_t* tokens = nullptr;        // [max_num_tokens]
    int32_t* positions = nullptr;     // [max_num_tokens]
    int64_t* slots = nullptr;         // [max_num_tokens]
    int32_t* query_start = nullptr;   // [max_num_seqs + 1]
    int32_t* context_lens = nullptr;  // [max_num_seqs]
    int32_t* block_tables = nullptr;  // [max_num_seqs][max_blocks_per_seq]
    int32_t* logit_rows = nullptr;    // [max_num_tokens] token index of each logits row
    cuda_ops::SampleParams* sample = nullptr;  // [max_num_seqs]
    cuda_ops::SampleOut* sample_out = nullptr;  // [max_num_seqs]
    int32_t* copy_src = nullptr;      // [max_num_seqs] block copies (CoW)
    int32_t* copy_dst = nullptr;
    // Mixed steps: the sequences with one new token as a decode sub-batch
    // (query_start[j] = the token's row, so outputs land in place).
    int32_t* dec_rows = nullptr;          // [max_num_seqs]
    int32_t* dec_context_lens = nullptr;  // [max_num_seqs]
    int32_t* dec_block_tables = nullptr;  // [max_num_seqs][max_blocks_per_seq]
    // ... and the indices of the others (the prefill kernel's sequences).
    int32_t* pf_seqs = nullptr;  // [max_num_seqs]
  };
  // Host-side description of one step; its arrays are in host_ (pinned).
  struct Plan {
    int32_t num_seqs = 0;       // real sequences
    int32_t padded_seqs = 0;    // sequences the kernels see (graph bucket, else num_seqs)
    int32_t num_tokens = 0;     // real new tokens
    int32_t padded_tokens = 0;  // tokens the kernels see
    bool decode_only = false;   // one new token per sequence
    bool use_graph = false;
    int32_t max_new_tokens = 0;  // largest new-token count of a sequence
    int32_t ctx_bucket = 0;      // decode: plan the split-K for contexts up to this
    int32_t num_decode = 0;      // mixed step: sequences in the decode sub-batch
    int32_t num_prefill = 0;     // mixed step: the other sequences (host_.pf_seqs)
    int32_t dec_ctx_bucket = 0;  // mixed step: the sub-batch's split-K bucket
    int32_t num_rows = 0;        // logits rows (host_.logit_rows)
    int32_t num_sample = 0;      // sampled rows (host_.sample), in row order
    std::vector<int32_t> sample_index;  // [num_seqs] index into the samples, or -1
    std::vector<int32_t> sample_rows;   // [num_sample] logits row of each sample
    std::vector<int32_t> host_row_begin;  // [num_seqs + 1] rows returned per sequence
    std::vector<int32_t> host_rows;       // logits rows returned, in order
  };

  absl::Status Init(const ModelConfig& config, const CudaEngineOptions& options,
                    std::optional<KvQuantParams> quant_params);
  absl::Status AllocateWeights();
  absl::Status UploadWeights(const ModelWeights& w);
  absl::Status FillDummyWeights(uint64_t seed);
  absl::Status AllocateArena();
  absl::Status PlanKv();
  // Row-parallel output: rank 0 adds its partial to the residual, the others
  // start from zero (ZeroForPartial before the projection, AllReduce after).
  absl::Status ZeroForPartial(int64_t tokens);
  absl::Status AllReduceResidual(int64_t tokens);
  // x_ += x . w^T for a row-parallel projection (o_proj, down) of `tokens`
  // rows and k inputs: a residual-accumulating GEMM unsharded; sharded, a
  // 16-bit partial, all-reduced, then added (the small-batch GEMV path keeps
  // the fp32 all-reduce of the residual).
  // `stage` names the GEMM for the stage profile.
  absl::Status RowParallel(const void* x, const void* w, int64_t tokens, int64_t k, const char* stage);
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Finish(std::unique_ptr<CudaEngine> e);
  absl::Status Validate(const StepInput& input) const;
  absl::Status ApplyBlockMoves(const StepInput& input);
  absl::Status Upload(const Plan& plan);
  // The forward pass over the plan's tokens (no host sync; graph-capturable).
  absl::Status Forward(const Plan& plan);
  absl::Status Gemm(const void* x, const void* w, void* y, bool y_fp32, int64_t m, int64_t n,
                    int64_t k, bool accumulate);
  // LM head + sampling for rows [row0, row0 + rows) of the plan.
  absl::Status LogitsChunk(const Plan& plan, int32_t row0, int32_t rows, int32_t sample0,
                           int32_t num_sample);
  absl::Status RunDecodeGraph(const Plan& plan);
  absl::Status Collect(const Plan& plan, const StepInput& input, StepOutput* output);
  absl::Status Mark(const char* stage);  // profiling: `stage` ends here
  absl::Status SyncStream();
  absl::Status CollectProfile();

  ModelConfig full_config_;  // the whole model
  ModelConfig config_;       // this rank's shard (== full_config_ unsharded)
  CudaEngineOptions options_;
  int32_t max_gpu_blocks_ = 0;
  CudaMemoryReport memory_;
  cuda_ops::ActDtype act_ = cuda_ops::ActDtype::kFp16;
  cudaStream_t stream_ = nullptr;
  cudaStream_t side_stream_ = nullptr;  // mixed steps: the prefill attention
  cudaEvent_t fork_event_ = nullptr, join_event_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  int num_sms_ = 0;
  int32_t max_blocks_per_seq_ = 0;
  int64_t weight_bytes_read_ = 0;

  std::vector<DeviceBuffer> weight_buffers_;
  void* embed_ = nullptr;    // [vocab][hidden]
  void* lm_head_ = nullptr;  // [vocab][hidden] (== embed_ when tied)
  float* final_norm_ = nullptr;
  std::vector<Layer> layers_;

  DeviceBuffer arena_buf_;
  DeviceBuffer host_staging_;  // pinned mirror of StepArrays
  StepArrays dev_, host_;
  float* rope_cos_ = nullptr;
  float* rope_sin_ = nullptr;
  float* x_ = nullptr;       // [max_num_tokens][hidden] residual, fp32
  void* h_ = nullptr;        // [max_num_tokens][hidden] normed, T
  float* qkv_ = nullptr;     // [max_num_tokens][q + 2kv] fp32
  float* q_ = nullptr;       // [max_num_tokens][q] fp32 after RoPE
  float* attn_ = nullptr;    // [max_num_tokens][q] fp32
  void* attn_t_ = nullptr;   // [max_num_tokens][q] T
  void* gu_ = nullptr;       // [max_num_tokens][2 * inter] T
  void* act_buf_ = nullptr;  // [max_num_tokens][inter] T
  void* hrows_ = nullptr;    // [max_logit_rows][hidden] T
  float* logits_ = nullptr;  // [max_logit_rows][vocab] fp32
  void* decode_ws_ = nullptr;
  int64_t decode_ws_bytes_ = 0;
  void* cublas_ws_ = nullptr;
  int64_t cublas_ws_bytes_ = 0;

  DeviceBuffer kv_pool_;     // [num_layers][num_gpu_blocks][block_bytes]
  DeviceBuffer host_pool_;   // [num_layers][num_cpu_blocks][block_bytes], pinned
  DeviceBuffer static_scales_;  // [num_layers][4][num_kv_heads] fp32
  std::vector<KvCacheView> views_;

  std::map<std::pair<int32_t, int32_t>, cudaGraphExec_t> graphs_;  // (batch, ctx bucket)
  int64_t graph_replays_ = 0;
  bool profile_ = false;
  std::vector<cudaEvent_t> prof_events_;
  std::vector<const char*> prof_marks_;  // stage that ends at each event of this step
  std::vector<std::pair<std::string, double>> prof_sum_;
  int64_t prof_steps_ = 0;
};

}  // namespace strata
