// CudaEngine: creation (arena, KV pools), step validation, planning and
// results. The weights' allocation, upload and dummy fill are in
// cuda_weights.cc, the forward pass in cuda_forward.cc.
#include "worker/cuda_engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops_cpu.h"
#include "kernels/cuda/kv_cache_cuda.h"
#include "kernels/kv_cache_view_util.h"
#include "runtime/kv_capacity.h"
#include "runtime/kv_format_util.h"
#include "runtime/status_macros.h"
#if STRATA_HAVE_NCCL
#include "worker/collectives_nccl.h"
#endif

namespace strata {
namespace {

using cuda_ops::ActDtype;

constexpr int32_t kMaxCopiesPerLaunch = 4096;

bool IsPow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Decode split-K plans are made for context buckets (powers of two from 256,
// capped at the model context), so a CUDA graph serves a range of lengths.
int32_t CtxBucket(int32_t ctx, int32_t max_pos) {
  int64_t b = 256;
  while (b < ctx) b *= 2;
  return static_cast<int32_t>(std::min<int64_t>(b, max_pos));
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Create(
    const ModelWeights& weights, const CudaEngineOptions& options,
    std::optional<KvQuantParams> quant_params) {
  auto e = std::unique_ptr<CudaEngine>(new CudaEngine());
  ModelConfig config = weights.config;
  config.tie_word_embeddings = weights.lm_head.empty();
  RETURN_IF_ERROR(e->Init(config, options, std::move(quant_params)));
  RETURN_IF_ERROR(e->UploadWeights(weights));
  return Finish(std::move(e));
}

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::CreateDummy(
    const ModelConfig& config, const CudaEngineOptions& options, uint64_t seed,
    std::optional<KvQuantParams> quant_params) {
  auto e = std::unique_ptr<CudaEngine>(new CudaEngine());
  RETURN_IF_ERROR(e->Init(config, options, std::move(quant_params)));
  RETURN_IF_ERROR(e->FillDummyWeights(seed));
  return Finish(std::move(e));
}

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Finish(std::unique_ptr<CudaEngine> e) {
  RETURN_IF_ERROR(e->AllocateArena());
  RETURN_IF_ERROR(e->PlanKv());
  if (!e->options_.defer_kv_allocation) {
    RETURN_IF_ERROR(e->AllocateKv(e->max_gpu_blocks_, e->options_.engine.num_cpu_blocks));
  }
  return e;
}

CudaEngine::~CudaEngine() {
  if (stream_) cudaStreamSynchronize(stream_);
  for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
  for (cudaEvent_t e : prof_events_) cudaEventDestroy(e);
  if (cublas_) cublasDestroy(cublas_);
  if (side_stream_) {
    cudaStreamSynchronize(side_stream_);
    cudaStreamDestroy(side_stream_);
  }
  if (fork_event_) cudaEventDestroy(fork_event_);
  if (join_event_) cudaEventDestroy(join_event_);
  if (stream_) cudaStreamDestroy(stream_);
}

absl::Status CudaEngine::Init(const ModelConfig& config, const CudaEngineOptions& options,
                              std::optional<KvQuantParams> quant_params) {
  RETURN_IF_ERROR(ValidateModelConfig(config, "model config"));
  full_config_ = config;
  config_ = config;
  options_ = options;
  if (quant_params) WidenKvQuantParams(&*quant_params, config.num_kv_heads);
  if (options.shard.world_size < 1 || options.shard.rank < 0 ||
      options.shard.rank >= options.shard.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", options.shard.rank, " outside world size ",
                                                   options.shard.world_size));
  }
  if (options.shard.sharded()) {
    ASSIGN_OR_RETURN(const ShardDims dims, ComputeShardDims(config, options.shard));
    config_.num_heads = dims.num_heads;
    config_.num_kv_heads = dims.num_kv_heads;
    config_.intermediate_size = dims.intermediate;
    if (quant_params) quant_params = SliceKvQuantParams(*quant_params, dims);
  }
  const EngineOptions& eo = options.engine;
  if (options.dtype != WeightDtype::kFp16 && options.dtype != WeightDtype::kBf16) {
    return absl::InvalidArgumentError("--dtype must be fp16 or bf16 for the CUDA engine");
  }
  act_ = options.dtype == WeightDtype::kFp16 ? ActDtype::kFp16 : ActDtype::kBf16;
  if (!KvFormatSupported(eo.kv_format)) {
    return absl::UnimplementedError(absl::StrCat("KV cache format ", KvFormatName(eo.kv_format),
                                                 " is not supported"));
  }
  if (!IsPow2(eo.block_size) || eo.block_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--block-size must be a power of two in [1, 1024], got ", eo.block_size));
  }
  if (config.head_dim % 2 != 0 || config.head_dim > cuda_ops::kMaxHeadDim) {
    return absl::UnimplementedError(absl::StrCat("head_dim ", config.head_dim,
                                                 " (the CUDA engine needs an even head_dim <= ",
                                                 cuda_ops::kMaxHeadDim, ")"));
  }
  const cuda::KernelDesc desc{eo.kv_format.dtype, eo.kv_format.scale_mode, config.head_dim};
  if (cuda::KernelSupported(desc) != cudaSuccess) {
    return absl::UnimplementedError(absl::StrCat("no CUDA attention kernel for KV format ",
                                                 KvFormatName(eo.kv_format), " and head_dim ",
                                                 config.head_dim));
  }
  if (!(options.gpu_memory_utilization > 0.0 && options.gpu_memory_utilization <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu-memory-utilization must be in (0, 1], got ",
                                                   options.gpu_memory_utilization));
  }
  if (options.max_num_tokens < 1 || options.max_num_seqs < 1 || options.max_logit_rows < 1 ||
      eo.num_gpu_blocks < 0 || eo.num_cpu_blocks < 0) {
    return absl::InvalidArgumentError(
        "max_num_tokens, max_num_seqs and max_logit_rows must be >= 1; block counts >= 0");
  }
  if (eo.kv_format.scale_mode == KvScaleMode::kStatic) {
    if (!quant_params) {
      return absl::InvalidArgumentError(absl::StrCat("KV cache format ", KvFormatName(eo.kv_format),
                                                     " needs static scales: pass --kv-quant-params-path"));
    }
    RETURN_IF_ERROR(CheckKvQuantParams(*quant_params, eo.kv_format, config_.num_layers,
                                       config_.num_kv_heads, "--kv-quant-params-path"));
  }
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, options.device));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  if (options.overlap_mixed_attention) {
    // Greatest priority = lowest number: the prefill attention's few, long
    // thread blocks are dispatched before the decode attention's many short ones.
    int least = 0, greatest = 0;
    CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&side_stream_, cudaStreamNonBlocking, greatest));
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&fork_event_, cudaEventDisableTiming));
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&join_event_, cudaEventDisableTiming));
  }
  CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
  CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, stream_));
  max_blocks_per_seq_ = static_cast<int32_t>(
      (int64_t{config.max_position_embeddings} + eo.block_size - 1) / eo.block_size);
  if (quant_params) {
    const int32_t L = config_.num_layers, H = config_.num_kv_heads;
    std::vector<float> s(static_cast<size_t>(L) * 4 * H, 0.0f);
    const bool zero = KvDtypeIsInteger(eo.kv_format.dtype);
    for (int l = 0; l < L; ++l) {
      float* d = &s[static_cast<size_t>(l) * 4 * H];
      std::copy(quant_params->k_scale[l].begin(), quant_params->k_scale[l].end(), d);
      if (zero) std::copy(quant_params->k_zero[l].begin(), quant_params->k_zero[l].end(), d + H);
      std::copy(quant_params->v_scale[l].begin(), quant_params->v_scale[l].end(), d + 2 * H);
      if (zero) std::copy(quant_params->v_zero[l].begin(), quant_params->v_zero[l].end(), d + 3 * H);
    }
    if (eo.kv_format.scale_mode == KvScaleMode::kStatic) {
      RETURN_IF_ERROR(static_scales_.Allocate(s.size() * sizeof(float)));
      CUDA_RETURN_IF_ERROR(cudaMemcpy(static_scales_.get(), s.data(), s.size() * sizeof(float),
                                      cudaMemcpyHostToDevice));
    }
  }
  return AllocateWeights();
}

absl::Status CudaEngine::AllocateArena() {
  const ModelConfig& c = config_;
  EngineOptions& eo = options_.engine;
  const int64_t d = c.hidden_size, q = c.q_size(), kv = c.kv_size(), f = c.intermediate_size;
  const int64_t Tm = options_.max_num_tokens, Sm = options_.max_num_seqs;
  const int64_t Rm = options_.max_logit_rows, V = c.vocab_size, eb = 2;
  const int64_t MB = max_blocks_per_seq_;
  const int32_t max_pos = c.max_position_embeddings;

  KvCacheView probe;
  probe.layout = MakeKvBlockLayout(eo.kv_format, eo.block_size, c.num_kv_heads, c.head_dim);
  decode_ws_bytes_ = 0;
  for (int32_t n = 1; n <= Sm; ++n) {
    for (int32_t ctx = 1; ; ctx = CtxBucket(ctx, max_pos) + 1) {
      const int32_t b = CtxBucket(ctx, max_pos);
      decode_ws_bytes_ = std::max(decode_ws_bytes_,
                                  cuda::PlanDecode(probe, n, c.num_heads, b, num_sms_).workspace_bytes);
      if (b >= max_pos) break;
    }
  }
  cublas_ws_bytes_ = int64_t{32} << 20;

  auto carve_steps = [&](Arena& a, StepArrays& s) {
    s.tokens = a.Take<int32_t>(Tm);
    s.positions = a.Take<int32_t>(Tm);
    s.slots = a.Take<int64_t>(Tm);
    s.query_start = a.Take<int32_t>(Sm + 1);
    s.context_lens = a.Take<int32_t>(Sm);
    s.block_tables = a.Take<int32_t>(Sm * MB);
    s.logit_rows = a.Take<int32_t>(Tm);
    s.sample = a.Take<cuda_ops::SampleParams>(Sm);
    s.sample_out = a.Take<cuda_ops::SampleOut>(Sm);
    s.copy_src = a.Take<int32_t>(kMaxCopiesPerLaunch);
    s.copy_dst = a.Take<int32_t>(kMaxCopiesPerLaunch);
    s.dec_rows = a.Take<int32_t>(Sm);
    s.dec_context_lens = a.Take<int32_t>(Sm);
    s.dec_block_tables = a.Take<int32_t>(Sm * MB);
    s.pf_seqs = a.Take<int32_t>(Sm);
  };
  auto carve = [&](Arena& a) {
    x_ = a.Take<float>(Tm * d);
    h_ = a.Take<char>(Tm * d * eb);
    qkv_ = a.Take<float>(Tm * (q + 2 * kv));
    q_ = a.Take<float>(Tm * q);
    attn_ = a.Take<float>(Tm * q);
    attn_t_ = a.Take<char>(Tm * q * eb);
    gu_ = a.Take<char>(Tm * 2 * f * eb);
    act_buf_ = a.Take<char>(Tm * f * eb);
    hrows_ = a.Take<char>(Rm * d * eb);
    logits_ = a.Take<float>(Rm * V);
    rope_cos_ = a.Take<float>(int64_t{max_pos} * c.head_dim / 2);
    rope_sin_ = a.Take<float>(int64_t{max_pos} * c.head_dim / 2);
    carve_steps(a, dev_);
    decode_ws_ = a.Take<char>(decode_ws_bytes_);
    cublas_ws_ = a.Take<char>(cublas_ws_bytes_);
  };
  Arena measure;
  carve(measure);
  RETURN_IF_ERROR(arena_buf_.Allocate(measure.used()));
  Arena arena(arena_buf_.get());
  carve(arena);
  memory_.arena = static_cast<int64_t>(measure.used());
  Arena hmeasure;
  carve_steps(hmeasure, host_);
  RETURN_IF_ERROR(host_staging_.Allocate(hmeasure.used(), DeviceBuffer::kHost));
  Arena harena(host_staging_.get());
  carve_steps(harena, host_);
  CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(cublas_, cublas_ws_, cublas_ws_bytes_));

  std::vector<float> cos(static_cast<size_t>(max_pos) * c.head_dim / 2), sin(cos.size());
  cpu::FillRopeTable(c.rope_theta, c.head_dim, max_pos, cos.data(), sin.data());
  CUDA_RETURN_IF_ERROR(cudaMemcpy(rope_cos_, cos.data(), cos.size() * 4, cudaMemcpyHostToDevice));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(rope_sin_, sin.data(), sin.size() * 4, cudaMemcpyHostToDevice));

  return absl::OkStatus();
}

absl::Status CudaEngine::PlanKv() {
  // KV pools: what is free now, times the utilization, in whole blocks.
  const ModelConfig& c = config_;
  const EngineOptions& eo = options_.engine;
  size_t free_b = 0, total_b = 0;
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_b, &total_b));
  memory_.total = static_cast<int64_t>(total_b);
  memory_.free_before_kv = static_cast<int64_t>(free_b);
  KvCacheShape shape{eo.kv_format, eo.block_size, c.num_kv_heads, c.head_dim, c.num_layers};
  memory_.kv_bytes_per_block = KvBytesPerBlock(shape);
  const int64_t bpb = memory_.kv_bytes_per_block;
  if (eo.num_gpu_blocks == 0) {
    KvMemoryBudget budget;
    budget.gpu_bytes = static_cast<int64_t>(static_cast<double>(free_b) * options_.gpu_memory_utilization);
    ASSIGN_OR_RETURN(const KvPoolPlan plan, PlanKvPools(budget, shape));
    if (plan.num_gpu_blocks < 1) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "no KV block fits: ", free_b, " bytes free after weights (", memory_.weights,
          ") and activations (", memory_.arena, "), a block needs ", bpb));
    }
    max_gpu_blocks_ = plan.num_gpu_blocks;
  } else if (int64_t{eo.num_gpu_blocks} * bpb > static_cast<int64_t>(free_b)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        eo.num_gpu_blocks, " KV blocks need ", int64_t{eo.num_gpu_blocks} * bpb, " bytes, only ",
        free_b, " are free after weights and activations"));
  } else {
    max_gpu_blocks_ = eo.num_gpu_blocks;
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::AllocateKv(int32_t num_gpu_blocks, int32_t num_cpu_blocks) {
  const ModelConfig& c = config_;
  EngineOptions& eo = options_.engine;
  if (!views_.empty()) return absl::FailedPreconditionError("the KV pools are already allocated");
  if (num_gpu_blocks < 1 || num_gpu_blocks > max_gpu_blocks_ || num_cpu_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat("AllocateKv(", num_gpu_blocks, ", ", num_cpu_blocks,
                                                   "): between 1 and ", max_gpu_blocks_,
                                                   " device blocks fit, swap blocks >= 0"));
  }
  eo.num_gpu_blocks = num_gpu_blocks;
  eo.num_cpu_blocks = num_cpu_blocks;
  KvCacheView probe;
  probe.layout = MakeKvBlockLayout(eo.kv_format, eo.block_size, c.num_kv_heads, c.head_dim);
  const int64_t layer_bytes = int64_t{probe.layout.block_bytes} * eo.num_gpu_blocks;
  RETURN_IF_ERROR(kv_pool_.Allocate(static_cast<size_t>(layer_bytes * c.num_layers)));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(kv_pool_.get(), 0, kv_pool_.bytes(), stream_));
  memory_.kv = layer_bytes * c.num_layers;
  const int64_t host_layer = int64_t{probe.layout.block_bytes} * eo.num_cpu_blocks;
  if (eo.num_cpu_blocks > 0) {
    RETURN_IF_ERROR(host_pool_.Allocate(static_cast<size_t>(host_layer * c.num_layers), DeviceBuffer::kHost));
    memory_.host_swap = host_layer * c.num_layers;
  }
  const bool stat = eo.kv_format.scale_mode == KvScaleMode::kStatic;
  const bool zero = stat && KvDtypeIsInteger(eo.kv_format.dtype);
  for (int l = 0; l < c.num_layers; ++l) {
    KvCacheViewOptions vo;
    vo.format = eo.kv_format;
    vo.block_size = eo.block_size;
    vo.num_kv_heads = c.num_kv_heads;
    vo.head_dim = c.head_dim;
    vo.pool = kv_pool_.get<uint8_t>() + layer_bytes * l;
    vo.num_blocks = eo.num_gpu_blocks;
    if (stat) {
      const float* s = static_scales_.get<float>() + int64_t{l} * 4 * c.num_kv_heads;
      vo.k_scale = s;
      vo.v_scale = s + 2 * c.num_kv_heads;
      if (zero) vo.k_zero = s + c.num_kv_heads, vo.v_zero = s + 3 * c.num_kv_heads;
    }
    ASSIGN_OR_RETURN(KvCacheView v, MakeKvCacheView(vo));
    views_.push_back(v);
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  size_t free_b = 0, total_b = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_b, &total_b));
  memory_.free_after_kv = static_cast<int64_t>(free_b);
  return absl::OkStatus();
}

absl::Status CudaEngine::Validate(const StepInput& input) const {
  const ModelConfig& c = config_;
  const EngineOptions& eo = options_.engine;
  const int32_t bs = eo.block_size;
  if (input.seqs.empty()) return absl::InvalidArgumentError("step has no sequences");
  if (static_cast<int64_t>(input.seqs.size()) > options_.max_num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat("step has ", input.seqs.size(),
                                                   " sequences, max_num_seqs is ", options_.max_num_seqs));
  }
  int64_t total = 0;
  for (size_t i = 0; i < input.seqs.size(); ++i) {
    const SeqStepInput& s = input.seqs[i];
    if (s.tokens.empty()) return absl::InvalidArgumentError(absl::StrCat("sequence ", i, " has no new tokens"));
    total += s.tokens.size();
    const int64_t end = int64_t{s.start_pos} + s.tokens.size();
    if (s.start_pos < 0 || end > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, " reaches position ", end,
                                                     " beyond the model context ", c.max_position_embeddings));
    }
    if (static_cast<int64_t>(s.block_table.size()) * bs < end) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": block table covers ",
                                                     s.block_table.size() * bs, " positions, needs ", end));
    }
    for (int32_t b : s.block_table) {
      if (b < 0 || b >= eo.num_gpu_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": block id ", b, " out of range"));
      }
    }
    for (int32_t t : s.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": token id ", t, " out of range"));
      }
    }
    if (s.sample) {
      RETURN_IF_ERROR(ValidateSamplingParams(s.sampling, c.vocab_size));
      if (s.num_logprobs < -1 || s.num_logprobs > cuda_ops::kMaxLogprobs) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": num_logprobs must be in [-1, ",
                                                       cuda_ops::kMaxLogprobs, "], got ", s.num_logprobs));
      }
    }
  }
  if (total > options_.max_num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("step has ", total, " new tokens, max_num_tokens is ",
                                                   options_.max_num_tokens));
  }
  RETURN_IF_ERROR(ValidateBlockMoves(input, eo));
  // The copy kernel runs all pairs at once: destinations distinct, never sources.
  std::vector<int32_t> dsts, srcs;
  for (const KvBlockMove& m : input.copies) {
    if (m.src != m.dst) dsts.push_back(m.dst), srcs.push_back(m.src);
  }
  std::sort(dsts.begin(), dsts.end());
  std::sort(srcs.begin(), srcs.end());
  if (std::adjacent_find(dsts.begin(), dsts.end()) != dsts.end()) {
    return absl::InvalidArgumentError("block copies write one destination twice");
  }
  for (int32_t d : dsts) {
    if (std::binary_search(srcs.begin(), srcs.end(), d)) {
      return absl::InvalidArgumentError(absl::StrCat("block ", d, " is both a copy source and destination"));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::ApplyBlockMoves(const StepInput& input) {
  const EngineOptions& eo = options_.engine;
  const int64_t host_layer = int64_t{views_[0].layout.block_bytes} * eo.num_cpu_blocks;
  auto swap = [&](const std::vector<KvBlockMove>& moves, cuda::SwapDirection dir) -> absl::Status {
    if (moves.empty()) return absl::OkStatus();
    std::vector<int32_t> src, dst;
    for (const KvBlockMove& m : moves) src.push_back(m.src), dst.push_back(m.dst);
    for (size_t l = 0; l < views_.size(); ++l) {
      CUDA_RETURN_IF_ERROR(cuda::SwapBlocks(views_[l], host_pool_.get<uint8_t>() + host_layer * l,
                                            eo.num_cpu_blocks, src.data(), dst.data(),
                                            static_cast<int32_t>(src.size()), dir, stream_));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(swap(input.swap_out, cuda::SwapDirection::kDeviceToHost));
  RETURN_IF_ERROR(swap(input.swap_in, cuda::SwapDirection::kHostToDevice));
  std::vector<KvBlockMove> copies;
  for (const KvBlockMove& m : input.copies) {
    if (m.src != m.dst) copies.push_back(m);
  }
  for (size_t i = 0; i < copies.size(); i += kMaxCopiesPerLaunch) {
    const int32_t n = static_cast<int32_t>(std::min<size_t>(kMaxCopiesPerLaunch, copies.size() - i));
    for (int32_t k = 0; k < n; ++k) host_.copy_src[k] = copies[i + k].src, host_.copy_dst[k] = copies[i + k].dst;
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev_.copy_src, host_.copy_src, n * 4, cudaMemcpyHostToDevice, stream_));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev_.copy_dst, host_.copy_dst, n * 4, cudaMemcpyHostToDevice, stream_));
    for (const KvCacheView& v : views_) {
      CUDA_RETURN_IF_ERROR(cuda::CopyBlocks(v, dev_.copy_src, dev_.copy_dst, n, stream_));
    }
    // The pinned staging is reused by the next chunk.
    if (i + kMaxCopiesPerLaunch < copies.size()) CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::Step(const StepInput& input, StepOutput* output) {
  if (views_.empty()) return absl::FailedPreconditionError("Step before AllocateKv");
  if (options_.shard.sharded() && options_.collectives == nullptr) {
    return absl::FailedPreconditionError("a sharded engine needs its collectives before the first step");
  }
  RETURN_IF_ERROR(Validate(input));
  RETURN_IF_ERROR(ApplyBlockMoves(input));
  const ModelConfig& c = config_;
  const int32_t bs = options_.engine.block_size;
  const int32_t n = static_cast<int32_t>(input.seqs.size());
  const int32_t MB = max_blocks_per_seq_;
  Plan p;
  p.num_seqs = n;
  p.decode_only = true;
  int32_t max_ctx = 1;
  for (const SeqStepInput& s : input.seqs) {
    p.num_tokens += static_cast<int32_t>(s.tokens.size());
    p.decode_only &= s.tokens.size() == 1;
    p.max_new_tokens = std::max<int32_t>(p.max_new_tokens, s.tokens.size());
    max_ctx = std::max<int32_t>(max_ctx, s.start_pos + s.tokens.size());
  }
  p.ctx_bucket = CtxBucket(max_ctx, c.max_position_embeddings);
  p.padded_seqs = n;
  if (p.decode_only && !profile_) {
    const int32_t cap = std::min({options_.max_num_seqs, options_.max_logit_rows, options_.max_num_tokens});
    for (int32_t b : options_.graph_batch_sizes) {
      if (b >= n && b <= cap && (!p.use_graph || b < p.padded_seqs)) p.use_graph = true, p.padded_seqs = b;
    }
  }
  p.padded_tokens = p.use_graph ? p.padded_seqs : p.num_tokens;

  // Flattened tokens, positions, slots; per-sequence starts, lengths, tables.
  int32_t t = 0;
  int32_t dec_max_ctx = 1;  // mixed step: longest context of its one-token sequences
  host_.query_start[0] = 0;
  for (int32_t i = 0; i < p.padded_seqs; ++i) {
    int32_t* table = host_.block_tables + int64_t{i} * MB;
    if (i >= n) {  // graph padding: one token at position 0, written nowhere
      host_.tokens[t] = 0, host_.positions[t] = 0, host_.slots[t] = -1, ++t;
      host_.context_lens[i] = 1;
      table[0] = 0;
      host_.query_start[i + 1] = t;
      continue;
    }
    const SeqStepInput& s = input.seqs[i];
    for (size_t k = 0; k < s.tokens.size(); ++k, ++t) {
      const int32_t pos = s.start_pos + static_cast<int32_t>(k);
      host_.tokens[t] = s.tokens[k];
      host_.positions[t] = pos;
      host_.slots[t] = int64_t{s.block_table[pos / bs]} * bs + pos % bs;
    }
    host_.query_start[i + 1] = t;
    host_.context_lens[i] = s.start_pos + static_cast<int32_t>(s.tokens.size());
    const int32_t nb = std::min<int32_t>(MB, static_cast<int32_t>(s.block_table.size()));
    std::copy_n(s.block_table.begin(), nb, table);
    // Mixed step: one-token sequences (decodes, last prompt tokens) go to the
    // split-K decode kernel; the prefill kernel would give each a whole
    // 64-row tile and walk its context in one thread block.
    if (!p.decode_only && s.tokens.size() == 1) {
      const int32_t j = p.num_decode++;
      host_.dec_rows[j] = host_.query_start[i];
      host_.dec_context_lens[j] = host_.context_lens[i];
      std::copy_n(s.block_table.begin(), nb, host_.dec_block_tables + int64_t{j} * MB);
      dec_max_ctx = std::max(dec_max_ctx, host_.context_lens[i]);
    } else if (!p.decode_only) {
      host_.pf_seqs[p.num_prefill++] = i;
    }
  }
  if (p.num_decode > 0) p.dec_ctx_bucket = CtxBucket(dec_max_ctx, c.max_position_embeddings);

  // Logits rows (token indices) and samples, in sequence order.
  p.sample_index.assign(n, -1);
  p.host_row_begin.assign(n + 1, 0);
  auto add_sample = [&](int32_t i, int32_t row) {
    cuda_ops::SampleParams sp;
    sp.logit_row = row % options_.max_logit_rows;  // row inside its LM-head chunk
    if (i < n && input.seqs[i].sample) {
      const SeqStepInput& s = input.seqs[i];
      sp.temperature = s.sampling.temperature;
      sp.top_k = s.sampling.top_k;
      sp.top_p = s.sampling.top_p;
      sp.seed = s.sampling.seed;
      sp.num_logprobs = s.num_logprobs;
      sp.counter = static_cast<uint64_t>(s.start_pos + s.tokens.size() - 1);
      p.sample_index[i] = p.num_sample;
    }
    host_.sample[p.num_sample++] = sp;
    p.sample_rows.push_back(row);
  };
  for (int32_t i = 0; i < p.padded_seqs; ++i) {
    const int32_t first = host_.query_start[i], last = host_.query_start[i + 1] - 1;
    const SeqStepInput::Logits mode = i < n ? input.seqs[i].logits : SeqStepInput::Logits::kNone;
    const bool sample = i < n && input.seqs[i].sample;
    if (p.use_graph) {  // fixed shape: every sequence has its row and a sample slot
      host_.logit_rows[p.num_rows++] = first;
      if (mode != SeqStepInput::Logits::kNone) p.host_rows.push_back(first);
      add_sample(i, first);
    } else {
      const int32_t row0 = p.num_rows;
      if (mode == SeqStepInput::Logits::kAll) {
        for (int32_t k = first; k <= last; ++k) host_.logit_rows[p.num_rows++] = k;
      } else if (mode == SeqStepInput::Logits::kLast || sample) {
        host_.logit_rows[p.num_rows++] = last;
      }
      if (mode != SeqStepInput::Logits::kNone) {
        for (int32_t r = row0; r < p.num_rows; ++r) p.host_rows.push_back(r);
      }
      if (sample) add_sample(i, p.num_rows - 1);
    }
    if (i < n) p.host_row_begin[i + 1] = static_cast<int32_t>(p.host_rows.size());
  }

  RETURN_IF_ERROR(Upload(p));
  prof_marks_.clear();
  RETURN_IF_ERROR(Mark(nullptr));
  if (p.use_graph) {
    RETURN_IF_ERROR(RunDecodeGraph(p));
  } else {
    RETURN_IF_ERROR(Forward(p));
  }
  if (!options_.compute_logits) {  // a rank other than 0: nothing to return
    RETURN_IF_ERROR(SyncStream());
    RETURN_IF_ERROR(CollectProfile());
    output->logits.clear();
    output->row_begin.assign(input.seqs.size() + 1, 0);
    output->sampled.clear();
    return absl::OkStatus();
  }
  output->logits.resize(p.host_rows.size() * static_cast<size_t>(c.vocab_size));
  // LM head in chunks of max_logit_rows (one chunk on the graph path, already
  // enqueued), returned rows copied out in contiguous runs.
  const int32_t Rm = options_.max_logit_rows;
  size_t hr = 0;
  int32_t s0 = 0;
  for (int32_t r0 = 0; r0 < p.num_rows; r0 += Rm) {
    const int32_t rc = std::min(Rm, p.num_rows - r0);
    int32_t s1 = s0;
    while (s1 < p.num_sample && p.sample_rows[s1] < r0 + rc) ++s1;
    if (!p.use_graph) RETURN_IF_ERROR(LogitsChunk(p, r0, rc, s0, s1 - s0));
    s0 = s1;
    while (hr < p.host_rows.size() && p.host_rows[hr] < r0 + rc) {
      size_t e = hr + 1;
      while (e < p.host_rows.size() && p.host_rows[e] == p.host_rows[e - 1] + 1 && p.host_rows[e] < r0 + rc) ++e;
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(output->logits.data() + hr * c.vocab_size,
                                           logits_ + int64_t{p.host_rows[hr] - r0} * c.vocab_size,
                                           (e - hr) * c.vocab_size * sizeof(float),
                                           cudaMemcpyDeviceToHost, stream_));
      hr = e;
    }
  }
  const int32_t real_samples = p.use_graph ? n : p.num_sample;
  if (real_samples > 0) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_.sample_out, dev_.sample_out,
                                         real_samples * sizeof(cuda_ops::SampleOut),
                                         cudaMemcpyDeviceToHost, stream_));
  }
  RETURN_IF_ERROR(SyncStream());
  RETURN_IF_ERROR(CollectProfile());
  return Collect(p, input, output);
}

absl::Status CudaEngine::SyncStream() {
  // Sharded over NCCL on this stream: wait with the collectives' deadline and
  // error polling, so a dead peer fails the step instead of hanging it.
#if STRATA_HAVE_NCCL
  if (options_.shard.sharded()) {
    auto* nccl = dynamic_cast<NcclCollectives*>(options_.collectives);
    if (nccl != nullptr && nccl->stream() == stream_) return nccl->Synchronize();
  }
#endif
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaEngine::Mark(const char* stage) {
  if (!profile_) return absl::OkStatus();
  if (prof_marks_.size() == prof_events_.size()) {
    cudaEvent_t e;
    CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
    prof_events_.push_back(e);
  }
  CUDA_RETURN_IF_ERROR(cudaEventRecord(prof_events_[prof_marks_.size()], stream_));
  prof_marks_.push_back(stage);
  return absl::OkStatus();
}

absl::Status CudaEngine::CollectProfile() {
  if (!profile_ || prof_marks_.size() < 2) return absl::OkStatus();
  for (size_t i = 1; i < prof_marks_.size(); ++i) {
    float ms = 0.0f;
    CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, prof_events_[i - 1], prof_events_[i]));
    auto it = std::find_if(prof_sum_.begin(), prof_sum_.end(),
                           [&](const auto& e) { return e.first == prof_marks_[i]; });
    if (it == prof_sum_.end()) it = prof_sum_.insert(prof_sum_.end(), {prof_marks_[i], 0.0});
    it->second += ms;
  }
  ++prof_steps_;
  return absl::OkStatus();
}

std::vector<std::pair<std::string, double>> CudaEngine::StageProfile() const {
  std::vector<std::pair<std::string, double>> out = prof_sum_;
  for (auto& e : out) e.second /= std::max<int64_t>(prof_steps_, 1);
  return out;
}

absl::Status CudaEngine::Upload(const Plan& p) {
  auto h2d = [&](auto* dst, const auto* src, int64_t count) -> absl::Status {
    if (count <= 0) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, count * sizeof(*src), cudaMemcpyHostToDevice, stream_));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(h2d(dev_.tokens, host_.tokens, p.padded_tokens));
  RETURN_IF_ERROR(h2d(dev_.positions, host_.positions, p.padded_tokens));
  RETURN_IF_ERROR(h2d(dev_.slots, host_.slots, p.padded_tokens));
  RETURN_IF_ERROR(h2d(dev_.query_start, host_.query_start, p.padded_seqs + 1));
  RETURN_IF_ERROR(h2d(dev_.context_lens, host_.context_lens, p.padded_seqs));
  RETURN_IF_ERROR(h2d(dev_.block_tables, host_.block_tables, int64_t{p.padded_seqs} * max_blocks_per_seq_));
  RETURN_IF_ERROR(h2d(dev_.logit_rows, host_.logit_rows, p.num_rows));
  RETURN_IF_ERROR(h2d(dev_.sample, host_.sample, p.num_sample));
  if (p.num_decode > 0) {
    RETURN_IF_ERROR(h2d(dev_.dec_rows, host_.dec_rows, p.num_decode));
    RETURN_IF_ERROR(h2d(dev_.dec_context_lens, host_.dec_context_lens, p.num_decode));
    RETURN_IF_ERROR(h2d(dev_.dec_block_tables, host_.dec_block_tables,
                        int64_t{p.num_decode} * max_blocks_per_seq_));
    RETURN_IF_ERROR(h2d(dev_.pf_seqs, host_.pf_seqs, p.num_prefill));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::Collect(const Plan& p, const StepInput& input, StepOutput* output) {
  output->row_begin = p.host_row_begin;
  output->sampled.clear();
  bool any = false;
  for (const SeqStepInput& s : input.seqs) any |= s.sample;
  if (!any) return absl::OkStatus();
  output->sampled.resize(p.num_seqs);
  for (int32_t i = 0; i < p.num_seqs; ++i) {
    const int32_t si = p.sample_index[i];
    if (si < 0) continue;
    const cuda_ops::SampleOut& so = host_.sample_out[si];
    if (so.token < 0 || so.token >= config_.vocab_size) {
      return absl::InternalError(absl::StrCat("sampling returned token ", so.token, " for sequence ", i,
                                              ": the logits are not finite"));
    }
    StepOutput::Sampled& out = output->sampled[i];
    out.token = so.token;
    out.logprob = so.logprob;
    for (int32_t k = 0; k < input.seqs[i].num_logprobs; ++k) {
      out.top_logprobs.emplace_back(so.top_ids[k], so.top_logprobs[k]);
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
