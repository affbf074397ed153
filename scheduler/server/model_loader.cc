#include "scheduler/server/model_loader.h"

#include <filesystem>
#include <optional>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "runtime/kv_capacity.h"
#include "runtime/kv_format_util.h"
#include "runtime/kv_quant_params.h"
#include "runtime/model_config.h"
#include "runtime/status_macros.h"
#include "runtime/weights.h"
#include "spdlog/spdlog.h"
#include "worker/cpu_engine.h"

namespace strata::serving {
namespace {

namespace fs = std::filesystem;

// Checkpoint bytes and how many bytes of fp32 host weights they become.
std::pair<int64_t, int64_t> CheckpointBytes(const std::string& path) {
  std::error_code ec;
  int64_t file_bytes = 0;
  if (fs::is_directory(path, ec)) {
    for (const auto& e : fs::directory_iterator(path, ec)) {
      const std::string ext = e.path().extension().string();
      if (ext == ".safetensors" || ext == ".bin") file_bytes += static_cast<int64_t>(e.file_size(ec));
    }
  } else {
    file_bytes = static_cast<int64_t>(fs::file_size(path, ec));
  }
  int64_t fp32_bytes = file_bytes;
  if (auto c = LoadHfConfig((fs::path(path) / "config.json").string()); c.ok()) {
    fp32_bytes = c->num_parameters() * 4;
  }
  return {file_bytes, fp32_bytes};
}

}  // namespace

absl::Status ValidateEngineConfig(const EngineConfig& c) {
  if (c.tp < 1) return absl::InvalidArgumentError(absl::StrCat("--tp must be >= 1, got ", c.tp));
  if (c.device != "cpu" && c.device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be cpu or cuda, got \"", c.device, "\""));
  }
  if (c.tp > 1) {
    return absl::UnimplementedError(absl::StrCat(
        "--tp ", c.tp, ": tensor parallelism needs the worker processes (strata-worker, "
        "WorkerPool, RemoteEngine), which `strata serve` does not integrate yet; use --tp 1"));
  }
  if (c.device == "cuda") {
    return absl::UnimplementedError(
        "--device cuda: serving on GPUs goes through the worker processes (strata-worker), "
        "which `strata serve` does not integrate yet; use --device cpu");
  }
  if (!(c.gpu_memory_utilization > 0.0 && c.gpu_memory_utilization <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu-memory-utilization must be in (0, 1], got ",
                                                   c.gpu_memory_utilization));
  }
  if (c.kv_cache_memory_gib < 0.0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-cache-memory must be >= 0 GiB, got ", c.kv_cache_memory_gib));
  }
  if (c.swap_space_gib < 0.0) {
    return absl::InvalidArgumentError(absl::StrCat("--swap-space must be >= 0 GiB, got ", c.swap_space_gib));
  }
  if (c.block_size <= 0 || (c.block_size & (c.block_size - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--block-size must be a power of two, got ", c.block_size));
  }
  if (c.max_num_seqs < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--max-num-seqs must be >= 1, got ", c.max_num_seqs));
  }
  if (c.max_model_len < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--max-model-len must be >= 0, got ", c.max_model_len));
  }
  return absl::OkStatus();
}

absl::StatusOr<LoadedModel> LoadModel(const EngineConfig& c, LoadProgress* progress) {
  RETURN_IF_ERROR(ValidateEngineConfig(c));
  const auto [file_bytes, fp32_bytes] = CheckpointBytes(c.model_path);
  // Mapped checkpoint + fp32 host weights + the engine's fused copies.
  progress->Expect(file_bytes + 2 * fp32_bytes);

  LoadedModel out;
  progress->Phase("tokenizer");
  const fs::path model_dir =
      fs::is_directory(c.model_path) ? fs::path(c.model_path) : fs::path(c.model_path).parent_path();
  ASSIGN_OR_RETURN(out.tokenizer, Tokenizer::LoadFromDirectory(model_dir.string()));

  progress->Phase("weights");
  ASSIGN_OR_RETURN(ModelWeights weights, LoadModelWeights(c.model_path));
  const ModelConfig config = weights.config;
  if (out.tokenizer->vocab_size() != config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        model_dir.string(), ": tokenizer has ", out.tokenizer->vocab_size(),
        " pieces but the model's vocab_size is ", config.vocab_size));
  }
  out.max_model_len = c.max_model_len == 0 ? config.max_position_embeddings : c.max_model_len;
  if (out.max_model_len > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("--max-model-len ", c.max_model_len,
                                                   " exceeds the model's context of ",
                                                   config.max_position_embeddings));
  }

  progress->Phase("KV cache");
  KvCacheShape shape;
  ASSIGN_OR_RETURN(shape.format, ParseKvFormat(c.kv_cache_dtype, c.kv_scale_mode, weights.source_dtype));
  shape.block_size = c.block_size;
  shape.num_kv_heads = config.num_kv_heads;
  shape.head_dim = config.head_dim;
  shape.num_layers = config.num_layers;
  RETURN_IF_ERROR(ValidateKvCacheShape(shape));
  const int64_t per_block = KvBytesPerBlock(shape);
  KvMemoryBudget budget;
  ASSIGN_OR_RETURN(budget.cpu_bytes, SwapSpaceBytes(c.swap_space_gib));
  if (c.kv_cache_memory_gib > 0.0) {
    budget.gpu_bytes = static_cast<int64_t>(c.kv_cache_memory_gib * (int64_t{1} << 30));
  } else {
    const int64_t blocks_per_seq = (out.max_model_len + c.block_size - 1) / c.block_size;
    const int64_t cap = int64_t{c.max_num_seqs} * blocks_per_seq * per_block;
    const int64_t derived =
        static_cast<int64_t>(c.gpu_memory_utilization * static_cast<double>(AvailableMemoryBytes()));
    budget.gpu_bytes = std::min(derived, cap);
    spdlog::info("KV cache: {:.2f} GiB of main memory (--gpu-memory-utilization {} x available, "
                 "capped at {} sequences x {} tokens; set --kv-cache-memory to choose)",
                 budget.gpu_bytes / double(1 << 30), c.gpu_memory_utilization, c.max_num_seqs,
                 out.max_model_len);
  }
  ASSIGN_OR_RETURN(KvPoolPlan plan, PlanKvPools(budget, shape));
  if (plan.num_gpu_blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the KV cache budget (", budget.gpu_bytes, " bytes) holds no block of ", per_block,
        " bytes; raise --kv-cache-memory"));
  }
  progress->Expect(int64_t{plan.num_gpu_blocks} * per_block);
  std::optional<KvQuantParams> params;
  if (!c.kv_quant_params_path.empty()) {
    ASSIGN_OR_RETURN(params, LoadKvQuantParams(c.kv_quant_params_path));
  }
  EngineOptions eo;
  eo.kv_format = shape.format;
  eo.block_size = c.block_size;
  eo.num_gpu_blocks = plan.num_gpu_blocks;
  eo.num_cpu_blocks = plan.num_cpu_blocks;
  progress->Phase("engine");
  ASSIGN_OR_RETURN(std::unique_ptr<CpuEngine> engine,
                   CpuEngine::Create(std::move(weights), eo, std::move(params)));
  out.kv_bytes_per_block = engine->kv_bytes_per_block();
  out.engine = std::move(engine);
  spdlog::info("KV cache {}: {} blocks of {} tokens ({} bytes each) + {} swap blocks",
               KvFormatName(eo.kv_format), eo.num_gpu_blocks, eo.block_size,
               out.kv_bytes_per_block, eo.num_cpu_blocks);
  return out;
}

}  // namespace strata::serving
