// Tensor-parallel sharding of a LLaMA model (Megatron style).
//
// Rank r of tp ranks holds:
//   q_proj, k_proj, v_proj   column-parallel: the rows of its heads
//                            (query heads [r*H/tp, (r+1)*H/tp), kv heads below)
//   o_proj                   row-parallel: the matching input columns; the
//                            partial outputs are summed by an all-reduce
//   gate_proj, up_proj       column-parallel: rows [r*F/tp, (r+1)*F/tp)
//   down_proj                row-parallel: the matching columns; all-reduce
//   embedding, norms         replicated
//   LM head                  replicated, and only rank 0 (which samples) keeps
//                            an untied one
// KV heads: with KV >= tp each rank holds KV/tp of them (KV % tp == 0); with
// KV < tp each is replicated on tp/KV ranks (tp % KV == 0) and rank r holds kv
// head r*KV/tp. The query heads of a rank always read kv heads it holds. A
// rank's KV cache layout uses its own kv-head count.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/kv_quant_params.h"
#include "runtime/weights.h"

namespace strata {

struct ShardSpec {
  int32_t rank = 0;
  int32_t world_size = 1;
  bool sharded() const { return world_size > 1; }
};

// What one rank holds.
struct ShardDims {
  int32_t num_heads = 0;       // query heads of this rank
  int32_t q_head_begin = 0;
  int32_t num_kv_heads = 0;    // kv heads of this rank
  int32_t kv_head_begin = 0;
  int32_t intermediate = 0;    // MLP columns of this rank
  int32_t f_begin = 0;
};

// INVALID_ARGUMENT (naming the model dimension) unless the model divides
// evenly: heads % tp == 0, intermediate % tp == 0, and kv % tp == 0 or
// tp % kv == 0.
absl::StatusOr<ShardDims> ComputeShardDims(const ModelConfig& config, const ShardSpec& spec);

// The shard of full weights (config unchanged: it describes the whole model).
absl::StatusOr<ModelWeights> SliceWeights(ModelWeights full, const ShardSpec& spec);

// Loads only this rank's shard. For a Hugging Face checkpoint only the shard's
// rows/columns are converted (the file is mmapped, so other ranks' rows are
// never copied); a llama2.c checkpoint is loaded whole and sliced.
absl::StatusOr<ModelWeights> LoadShardWeights(const std::string& path, const ShardSpec& spec);

// The kv heads of this rank from full-model static KV parameters.
KvQuantParams SliceKvQuantParams(const KvQuantParams& full, const ShardDims& dims);

// Bytes of the weights held (fp32).
int64_t WeightBytes(const ModelWeights& w);

}  // namespace strata
