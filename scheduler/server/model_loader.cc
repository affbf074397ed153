#include "scheduler/server/model_loader.h"

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/kv_capacity.h"
#include "runtime/kv_format_util.h"
#include "runtime/kv_quant_params.h"
#include "runtime/model_config.h"
#include "runtime/status_macros.h"
#include "runtime/weights.h"
#include "spdlog/spdlog.h"
#include "worker/cpu_engine.h"

namespace strata::serving {

namespace fs = std::filesystem;

namespace {

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
  if (c.load_format != "auto" && c.load_format != "dummy") {
    return absl::InvalidArgumentError(
        absl::StrCat("--load-format must be auto or dummy, got \"", c.load_format, "\""));
  }
  if (c.load_format == "dummy" && c.tokenizer_path.empty()) {
    return absl::InvalidArgumentError(
        "--load-format dummy needs --tokenizer DIR (a model directory whose tokenizer matches the "
        "shape's vocabulary, e.g. stories15M for the llama-2 shapes)");
  }
  if (c.device == "cuda" && c.dtype != "auto" && c.dtype != "fp16" && c.dtype != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype must be auto, fp16 or bf16 with --device cuda, got \"", c.dtype, "\""));
  }
  if (c.device == "cpu" && c.dtype != "auto" && c.dtype != "fp32" && c.dtype != "fp16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype must be auto, fp32 or fp16 with --device cpu, got \"", c.dtype, "\""));
  }
  if (c.device == "cpu" && c.dtype == "fp16" && (c.tp > 1 || c.worker_processes)) {
    return absl::UnimplementedError("--dtype fp16 on the CPU runs in process only (--tp 1)");
  }
  if (c.external_workers) {
    if (c.control_plane_secret_file.empty()) {
      return absl::InvalidArgumentError(
          "--external-workers needs --control-plane-secret-file (the secret the workers present)");
    }
    const size_t colon = c.control_plane_address.rfind(':');
    if (colon == std::string::npos || c.control_plane_address.substr(colon + 1) == "0") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--external-workers needs a fixed --control-plane-address HOST:PORT for the workers to dial, got \"",
          c.control_plane_address, "\""));
    }
  }
  if (c.max_num_batched_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-num-batched-tokens must be >= 0, got ", c.max_num_batched_tokens));
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
  if (!(c.worker_step_timeout_s > 0.0) || !(c.worker_ready_timeout_s > 0.0)) {
    return absl::InvalidArgumentError(absl::StrCat("--worker-step-timeout and --worker-ready-timeout must be > 0 "
                                                   "seconds, got ", c.worker_step_timeout_s, " and ",
                                                   c.worker_ready_timeout_s));
  }
  return absl::OkStatus();
}

namespace {

std::string FindWorkerBinary(const std::string& flag) {
  if (!flag.empty()) return flag;
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const fs::path& p : {self.parent_path() / "strata-worker",
                              self.parent_path().parent_path() / "worker" / "strata-worker"}) {
      if (fs::exists(p, ec)) return p.string();
    }
  }
  if (const char* path = std::getenv("PATH")) {
    for (absl::string_view dir : absl::StrSplit(path, ':')) {
      const fs::path p = fs::path(std::string(dir)) / "strata-worker";
      if (!dir.empty() && fs::exists(p, ec)) return p.string();
    }
  }
  return "strata-worker";  // WorkerPool::Start reports it as not executable
}

// N strata-worker processes behind a RemoteEngine.
absl::Status StartWorkers(const EngineConfig& c, LoadProgress* progress, LoadedModel* out) {
  const bool dummy = c.load_format == "dummy";
  const bool cuda = c.device == "cuda";
  const fs::path config_path = fs::path(c.model_path) / "config.json";
  std::optional<ModelConfig> config;
  if (dummy) {
    ASSIGN_OR_RETURN(config, NamedModelShape(c.model_path));
  } else if (fs::exists(config_path)) {
    ASSIGN_OR_RETURN(config, LoadHfConfig(config_path.string()));
  }
  WorkerPoolOptions wo;
  wo.external_workers = c.external_workers;
  wo.secret_file = c.control_plane_secret_file;
  wo.listen_address = c.control_plane_address;
  if (!c.external_workers) wo.worker_binary = FindWorkerBinary(c.worker_binary);
  RemoteEngineOptions& e = wo.engine;
  e.step_timeout = absl::Seconds(c.worker_step_timeout_s);  // saturates for huge values
  e.world_size = c.tp;
  if (dummy) {
    e.load_format = "dummy";
    e.dummy_shape = c.model_path;
  } else {
    e.model_path = c.model_path;
  }
  e.device = c.device;
  e.dtype = c.dtype == "auto" ? "" : c.dtype;
  e.gpu_memory_utilization = c.gpu_memory_utilization;
  e.max_num_seqs = c.max_num_seqs;
  e.max_num_tokens = c.max_num_batched_tokens;
  e.enforce_eager = c.enforce_eager;
  e.serialize_mixed_attention = c.serialize_mixed_attention;
  // The cache format's "auto" follows the weights the engine computes with:
  // fp16/bf16 on the GPU, the checkpoint's dtype on the CPU.
  const WeightDtype model_dtype = cuda ? (c.dtype == "bf16" ? WeightDtype::kBf16 : WeightDtype::kFp16)
                                  : config ? config->torch_dtype
                                           : WeightDtype::kFp32;
  ASSIGN_OR_RETURN(e.kv_format, ParseKvFormat(c.kv_cache_dtype, c.kv_scale_mode, model_dtype));
  e.block_size = c.block_size;
  e.kv_quant_params_path = c.kv_quant_params_path;
  const int32_t context = c.max_model_len > 0   ? c.max_model_len
                          : config.has_value() ? config->max_position_embeddings
                                               : 4096;
  if (cuda) {
    // Each worker sizes its pool from its GPU's free memory.
  } else if (c.kv_cache_memory_gib > 0.0) {
    wo.kv_cache_memory_bytes = static_cast<int64_t>(c.kv_cache_memory_gib * (int64_t{1} << 30));
  } else {
    wo.kv_cache_memory_bytes = static_cast<int64_t>(
        c.gpu_memory_utilization * static_cast<double>(AvailableMemoryBytes()) / c.tp);
    e.max_gpu_blocks = c.max_num_seqs * ((context + c.block_size - 1) / c.block_size);
  }
  wo.swap_space_gib = c.swap_space_gib;
  progress->Phase("workers");
  if (c.external_workers) {
    spdlog::info("waiting for {} external {} worker(s) on {}", c.tp, c.device, c.control_plane_address);
  } else {
    spdlog::info("starting {} {} worker process(es): {}", c.tp, c.device, wo.worker_binary);
  }
  ASSIGN_OR_RETURN(out->pool, WorkerPool::Start(wo));
  absl::StatusOr<RemoteEngine*> engine =
      out->pool->WaitReady(absl::Seconds(c.worker_ready_timeout_s));
  if (!engine.ok()) {
    out->pool->Shutdown();
    return engine.status();
  }
  out->engine = *engine;
  out->kv_bytes_per_block = (*engine)->kv_bytes_per_block();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LoadedModel> LoadModel(const EngineConfig& c, LoadProgress* progress) {
  RETURN_IF_ERROR(ValidateEngineConfig(c));
  const bool dummy = c.load_format == "dummy";
  if (std::error_code ec; !dummy && !fs::exists(c.model_path, ec)) {
    return absl::NotFoundError(absl::StrCat("--model ", c.model_path, ": no such file or directory"));
  }
  if (dummy) RETURN_IF_ERROR(NamedModelShape(c.model_path).status());
  if (c.tp > 1 || c.worker_processes || c.external_workers || c.device == "cuda" || dummy) {
    LoadedModel out;
    progress->Phase("tokenizer");
    const fs::path tok_path = c.tokenizer_path.empty() ? fs::path(c.model_path) : fs::path(c.tokenizer_path);
    const fs::path model_dir = fs::is_directory(tok_path) ? tok_path : tok_path.parent_path();
    ASSIGN_OR_RETURN(out.tokenizer, Tokenizer::LoadFromDirectory(model_dir.string()));
    RETURN_IF_ERROR(StartWorkers(c, progress, &out));
    const ModelConfig& config = out.engine->config();
    if (out.tokenizer->vocab_size() != config.vocab_size) {
      out.Shutdown();
      return absl::InvalidArgumentError(absl::StrCat(
          model_dir.string(), ": tokenizer has ", out.tokenizer->vocab_size(),
          " pieces but the model's vocab_size is ", config.vocab_size));
    }
    out.max_model_len = c.max_model_len == 0 ? config.max_position_embeddings
                                             : std::min(c.max_model_len, config.max_position_embeddings);
    const EngineOptions& eo = out.engine->options();
    spdlog::info("KV cache {} on {} worker(s): {} blocks of {} tokens ({} bytes each per rank) + {} "
                 "swap blocks", KvFormatName(eo.kv_format), c.tp, eo.num_gpu_blocks, eo.block_size,
                 out.kv_bytes_per_block, eo.num_cpu_blocks);
    return out;
  }
  const auto [file_bytes, fp32_bytes] = CheckpointBytes(c.model_path);
  // Mapped checkpoint + fp32 host weights + the engine's fused copies.
  progress->Expect(file_bytes + 2 * fp32_bytes);

  LoadedModel out;
  progress->Phase("tokenizer");
  const fs::path tok_path = c.tokenizer_path.empty() ? fs::path(c.model_path) : fs::path(c.tokenizer_path);
  const fs::path model_dir = fs::is_directory(tok_path) ? tok_path : tok_path.parent_path();
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
  eo.weight_dtype = c.dtype == "fp16" ? WeightDtype::kFp16 : WeightDtype::kFp32;
  eo.num_gpu_blocks = plan.num_gpu_blocks;
  eo.num_cpu_blocks = plan.num_cpu_blocks;
  progress->Phase("engine");
  ASSIGN_OR_RETURN(std::unique_ptr<CpuEngine> engine,
                   CpuEngine::Create(std::move(weights), eo, std::move(params)));
  out.kv_bytes_per_block = engine->kv_bytes_per_block();
  out.engine = engine.get();
  out.in_process = std::move(engine);
  spdlog::info("KV cache {}: {} blocks of {} tokens ({} bytes each) + {} swap blocks",
               KvFormatName(eo.kv_format), eo.num_gpu_blocks, eo.block_size,
               out.kv_bytes_per_block, eo.num_cpu_blocks);
  return out;
}

}  // namespace strata::serving
