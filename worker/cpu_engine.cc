#include "worker/cpu_engine.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/kv_cache_cpu.h"
#include "kernels/kv_cache_view_util.h"
#include "runtime/kv_format_util.h"
#include "runtime/status_macros.h"

namespace strata {
namespace {

template <class T>
void Free(std::vector<T>& v) {
  v.clear();
  v.shrink_to_fit();
}

uint8_t* AllocPool(int64_t bytes) {
  return cpu::AllocLargeBuffer(static_cast<size_t>(AlignUp(std::max<int64_t>(bytes, 64), 64)));
}

}  // namespace

void CpuEngine::AlignedFree::operator()(uint8_t* p) const { std::free(p); }

absl::StatusOr<std::unique_ptr<CpuEngine>> CpuEngine::Create(
    ModelWeights weights, const EngineOptions& options, std::optional<KvQuantParams> quant_params,
    const CpuShardOptions& shard) {
  const ModelConfig& c = weights.config;
  ASSIGN_OR_RETURN(const ShardDims dims, ComputeShardDims(c, shard.shard));
  if (quant_params) WidenKvQuantParams(&*quant_params, c.num_kv_heads);
  if (shard.shard.sharded() &&
      (shard.collectives == nullptr || shard.collectives->world_size() != shard.shard.world_size ||
       shard.collectives->rank() != shard.shard.rank)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", shard.shard.rank, " of ", shard.shard.world_size,
        " needs collectives of the same rank and size"));
  }
  {
    // The weights must be this shard's.
    const int64_t h = c.hidden_size, hd = c.head_dim;
    const int64_t q = dims.num_heads * hd, kv = dims.num_kv_heads * hd, f = dims.intermediate;
    auto n = [](const std::vector<float>& v) { return static_cast<int64_t>(v.size()); };
    if (static_cast<int32_t>(weights.layers.size()) != c.num_layers) {
      return absl::InvalidArgumentError("weights have a different layer count than their config");
    }
    for (const LayerWeights& lw : weights.layers) {
      if (n(lw.wq) != q * h || n(lw.wk) != kv * h || n(lw.wv) != kv * h || n(lw.wo) != h * q ||
          n(lw.w_gate) != f * h || n(lw.w_up) != f * h || n(lw.w_down) != h * f) {
        return absl::InvalidArgumentError(absl::StrCat(
            "weights do not match shard ", shard.shard.rank, "/", shard.shard.world_size,
            " of the model (slice them with SliceWeights or load with LoadShardWeights)"));
      }
    }
    if (shard.compute_logits && weights.lm_head.empty() && !c.tie_word_embeddings) {
      return absl::InvalidArgumentError("computing logits needs the LM head (lm_head is empty)");
    }
  }
  if (options.weight_dtype != WeightDtype::kFp32 && options.weight_dtype != WeightDtype::kFp16) {
    return absl::UnimplementedError("the CPU engine stores weights in fp32 or fp16");
  }
  if (!KvFormatSupported(options.kv_format)) {
    return absl::UnimplementedError(
        absl::StrCat("KV cache format ", KvFormatName(options.kv_format), " is not supported"));
  }
  const int32_t bs = options.block_size;
  if (bs <= 0 || (bs & (bs - 1)) != 0 || bs > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--block-size must be a power of two in [1, 1024], got ", bs));
  }
  if (options.num_gpu_blocks <= 0) {
    return absl::InvalidArgumentError("the KV cache needs at least one block");
  }
  if (options.kv_format.dtype == KvDtype::kInt4 && c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError("int4 KV cache needs an even head_dim");
  }
  auto e = std::unique_ptr<CpuEngine>(new CpuEngine());
  e->options_ = options;
  e->shard_ = shard;
  e->dims_ = dims;
  e->layout_ = MakeKvBlockLayout(options.kv_format, bs, dims.num_kv_heads, c.head_dim);
  const int64_t pool_bytes = int64_t{e->layout_.block_bytes} * options.num_gpu_blocks;
  if (int64_t{e->layout_.block_bytes} * bs > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError("KV block too large for 32-bit offsets");
  }
  if (options.kv_format.scale_mode == KvScaleMode::kStatic) {
    if (!quant_params) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KV cache format ", KvFormatName(options.kv_format),
          " needs static scales: pass --kv-quant-params-path"));
    }
    RETURN_IF_ERROR(CheckKvQuantParams(*quant_params, options.kv_format, c.num_layers,
                                       c.num_kv_heads, "--kv-quant-params-path"));
    if (shard.shard.sharded()) quant_params = SliceKvQuantParams(*quant_params, dims);
    e->quant_params_ = std::move(quant_params);
  }

  // Pack the projections (the original matrices are freed as we go).
  const WeightDtype wdt = options.weight_dtype;
  const int64_t h = c.hidden_size, q = int64_t{dims.num_heads} * c.head_dim;
  const int64_t kv = int64_t{dims.num_kv_heads} * c.head_dim, f = dims.intermediate;
  e->packed_.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    LayerWeights& lw = weights.layers[l];
    PackedLayer& p = e->packed_[l];
    p.qkv = cpu::PackedWeights::Pack({{lw.wq.data(), q}, {lw.wk.data(), kv}, {lw.wv.data(), kv}},
                                     h, wdt);
    p.o = cpu::PackedWeights::Pack(lw.wo.data(), h, q, wdt);
    p.gate_up = cpu::PackedWeights::PackPairs(lw.w_gate.data(), lw.w_up.data(), f, h, wdt);
    p.down = cpu::PackedWeights::Pack(lw.w_down.data(), h, f, wdt);
    Free(lw.wq), Free(lw.wk), Free(lw.wv), Free(lw.wo);
    Free(lw.w_gate), Free(lw.w_up), Free(lw.w_down);
  }
  if (shard.compute_logits) {
    e->lm_head_ = cpu::PackedWeights::Pack(weights.output_matrix().data(), c.vocab_size, h, wdt);
  }
  Free(weights.lm_head);  // the embedding table stays for lookups
  const int32_t max_pos = c.max_position_embeddings;
  e->rope_cos_.resize(static_cast<size_t>(max_pos) * c.head_dim / 2);
  e->rope_sin_.resize(e->rope_cos_.size());
  cpu::FillRopeTable(c.rope_theta, c.head_dim, max_pos, e->rope_cos_.data(), e->rope_sin_.data());
  e->rope_ = {max_pos, c.head_dim / 2, e->rope_cos_.data(), e->rope_sin_.data()};

  e->views_.resize(c.num_layers);
  e->static_scales_.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    e->gpu_pool_.emplace_back(AllocPool(pool_bytes));
    if (!e->gpu_pool_.back()) return absl::ResourceExhaustedError("cannot allocate the KV cache");
    std::memset(e->gpu_pool_.back().get(), 0, pool_bytes);
    if (options.num_cpu_blocks > 0) {
      e->cpu_pool_.emplace_back(AllocPool(int64_t{e->layout_.block_bytes} * options.num_cpu_blocks));
      if (!e->cpu_pool_.back()) return absl::ResourceExhaustedError("cannot allocate swap space");
    }
    KvCacheViewOptions vo;
    vo.format = options.kv_format;
    vo.block_size = bs;
    vo.num_kv_heads = dims.num_kv_heads;
    vo.head_dim = c.head_dim;
    vo.pool = e->gpu_pool_.back().get();
    vo.num_blocks = options.num_gpu_blocks;
    if (e->quant_params_) {
      auto& s = e->static_scales_[l];
      const KvQuantParams& p = *e->quant_params_;
      const int32_t H = dims.num_kv_heads;
      s.resize(4 * H);
      std::copy(p.k_scale[l].begin(), p.k_scale[l].end(), s.begin());
      std::copy(p.k_zero[l].begin(), p.k_zero[l].end(), s.begin() + H);
      std::copy(p.v_scale[l].begin(), p.v_scale[l].end(), s.begin() + 2 * H);
      std::copy(p.v_zero[l].begin(), p.v_zero[l].end(), s.begin() + 3 * H);
      vo.k_scale = s.data();
      vo.v_scale = s.data() + 2 * H;
      if (KvDtypeIsInteger(options.kv_format.dtype)) {
        vo.k_zero = s.data() + H;
        vo.v_zero = s.data() + 3 * H;
      }
    }
    ASSIGN_OR_RETURN(e->views_[l], MakeKvCacheView(vo));
  }
  e->weights_ = std::move(weights);
  return e;
}

int64_t CpuEngine::kv_bytes_per_block() const {
  return int64_t{layout_.block_bytes} * weights_.config.num_layers;
}

absl::Status CpuEngine::Validate(const StepInput& input) const {
  const ModelConfig& c = weights_.config;
  const int32_t bs = options_.block_size;
  if (input.seqs.empty()) return absl::InvalidArgumentError("step has no sequences");
  for (size_t i = 0; i < input.seqs.size(); ++i) {
    const SeqStepInput& s = input.seqs[i];
    if (s.tokens.empty()) return absl::InvalidArgumentError(absl::StrCat("sequence ", i, " has no new tokens"));
    const int64_t end = int64_t{s.start_pos} + s.tokens.size();
    if (s.start_pos < 0 || end > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, " reaches position ", end,
                                                     " beyond the model context ",
                                                     c.max_position_embeddings));
    }
    if (static_cast<int64_t>(s.block_table.size()) * bs < end) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": block table covers ",
                                                     s.block_table.size() * bs,
                                                     " positions, needs ", end));
    }
    for (int32_t b : s.block_table) {
      if (b < 0 || b >= options_.num_gpu_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": block id ", b, " out of range"));
      }
    }
    for (int32_t t : s.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": token id ", t, " out of range"));
      }
    }
  }
  RETURN_IF_ERROR(ValidateBlockMoves(input, options_));
  return absl::OkStatus();
}

void CpuEngine::ApplyBlockMoves(const StepInput& input) {
  const int64_t bb = layout_.block_bytes;
  for (size_t l = 0; l < views_.size(); ++l) {
    uint8_t* dev = gpu_pool_[l].get();
    for (const KvBlockMove& m : input.swap_out) {
      std::memcpy(cpu_pool_[l].get() + m.dst * bb, dev + m.src * bb, bb);
    }
    for (const KvBlockMove& m : input.swap_in) {
      std::memcpy(dev + m.dst * bb, cpu_pool_[l].get() + m.src * bb, bb);
    }
  }
  if (!input.copies.empty()) {
    std::vector<int32_t> src, dst;
    for (const KvBlockMove& m : input.copies) src.push_back(m.src), dst.push_back(m.dst);
    for (const KvCacheView& v : views_) {
      cpu::CopyBlocks(v, src.data(), dst.data(), static_cast<int32_t>(src.size()));
    }
  }
}

void CpuEngine::EnsureScratch(int64_t tokens) {
  if (tokens <= scratch_tokens_) return;
  const ModelConfig& c = weights_.config;
  const int64_t d = c.hidden_size, q = int64_t{dims_.num_heads} * c.head_dim;
  const int64_t kv = int64_t{dims_.num_kv_heads} * c.head_dim, f = dims_.intermediate;
  x_.resize(tokens * d);
  h_.resize(tokens * d);
  qkv_.resize(tokens * (q + 2 * kv));
  q_.resize(tokens * q);
  k_.resize(tokens * kv);
  v_.resize(tokens * kv);
  attn_.resize(tokens * q);
  act_.resize(tokens * f);
  if (shard_.shard.sharded()) partial_.resize(tokens * d);
  scratch_tokens_ = tokens;
}

absl::Status CpuEngine::RowParallelAccumulate(const float* y, const cpu::PackedWeights& w,
                                              float* x, int64_t tokens) {
  const int64_t d = weights_.config.hidden_size;
  if (!shard_.shard.sharded()) {
    cpu::PackedLinear(y, w, x, tokens, cpu::Epilogue::kAccumulate);
    return absl::OkStatus();
  }
  cpu::PackedLinear(y, w, partial_.data(), tokens, cpu::Epilogue::kStore);
  RETURN_IF_ERROR(shard_.collectives->AllReduceSum(partial_.data(), tokens * d));
  cpu::AddInPlace(x, partial_.data(), tokens * d);
  return absl::OkStatus();
}

absl::Status CpuEngine::Step(const StepInput& input, StepOutput* output) {
  RETURN_IF_ERROR(Validate(input));
  ApplyBlockMoves(input);
  const ModelConfig& c = weights_.config;
  // This shard's sizes (the whole model's when unsharded).
  const int32_t heads = dims_.num_heads, kv_heads = dims_.num_kv_heads;
  const int64_t d = c.hidden_size, q = int64_t{heads} * c.head_dim;
  const int64_t kv = int64_t{kv_heads} * c.head_dim;
  const int32_t bs = options_.block_size;
  const int32_t n = static_cast<int32_t>(input.seqs.size());

  // Plan once per step: flattened tokens, positions, slots, batch view.
  std::vector<int32_t> tokens, positions, query_start(n + 1, 0), context_lens(n);
  std::vector<int64_t> slots;
  int32_t max_blocks = 0;
  for (const auto& s : input.seqs) max_blocks = std::max<int32_t>(max_blocks, s.block_table.size());
  std::vector<int32_t> tables(static_cast<size_t>(n) * max_blocks, 0);
  for (int32_t i = 0; i < n; ++i) {
    const SeqStepInput& s = input.seqs[i];
    for (size_t t = 0; t < s.tokens.size(); ++t) {
      const int32_t pos = s.start_pos + static_cast<int32_t>(t);
      tokens.push_back(s.tokens[t]);
      positions.push_back(pos);
      slots.push_back(int64_t{s.block_table[pos / bs]} * bs + pos % bs);
    }
    query_start[i + 1] = static_cast<int32_t>(tokens.size());
    context_lens[i] = s.start_pos + static_cast<int32_t>(s.tokens.size());
    std::copy(s.block_table.begin(), s.block_table.end(), tables.begin() + int64_t{i} * max_blocks);
  }
  const int64_t T = static_cast<int64_t>(tokens.size());
  PagedBatchView batch;
  batch.num_seqs = n;
  batch.num_tokens = static_cast<int32_t>(T);
  batch.max_blocks_per_seq = max_blocks;
  batch.block_tables = tables.data();
  batch.context_lens = context_lens.data();
  batch.query_start = query_start.data();
  batch.slot_mapping = slots.data();

  EnsureScratch(T);
  float* x = x_.data();
  float* h = h_.data();
  cpu::Embed(weights_.embed.data(), tokens.data(), T, d, x);
  const float softmax_scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const int64_t qkv_w = q + 2 * kv;
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = weights_.layers[l];
    const PackedLayer& pl = packed_[l];
    cpu::RmsNorm(x, lw.attn_norm.data(), h, T, d, c.rms_norm_eps);
    cpu::PackedLinear(h, pl.qkv, qkv_.data(), T, cpu::Epilogue::kStore);
    for (int64_t t = 0; t < T; ++t) {
      const float* row = qkv_.data() + t * qkv_w;
      std::memcpy(q_.data() + t * q, row, sizeof(float) * q);
      std::memcpy(k_.data() + t * kv, row + q, sizeof(float) * kv);
      std::memcpy(v_.data() + t * kv, row + q + kv, sizeof(float) * kv);
    }
    cpu::ApplyRope(q_.data(), positions.data(), T, heads, c.head_dim, rope_);
    cpu::ApplyRope(k_.data(), positions.data(), T, kv_heads, c.head_dim, rope_);
    if (observer_) observer_(l, q_.data(), k_.data(), v_.data(), T);
    cpu::WriteKvCache(views_[l], k_.data(), v_.data(), slots.data(), static_cast<int32_t>(T));
    cpu::PagedAttention(views_[l], batch, q_.data(), heads, softmax_scale, attn_.data());
    RETURN_IF_ERROR(RowParallelAccumulate(attn_.data(), pl.o, x, T));

    cpu::RmsNorm(x, lw.mlp_norm.data(), h, T, d, c.rms_norm_eps);
    cpu::PackedLinear(h, pl.gate_up, act_.data(), T, cpu::Epilogue::kSiluMul);  // silu(gate) * up
    RETURN_IF_ERROR(RowParallelAccumulate(act_.data(), pl.down, x, T));
  }

  // Logits for the requested rows only.
  std::vector<int64_t> rows;
  output->row_begin.assign(n + 1, 0);
  for (int32_t i = 0; i < n; ++i) {
    const SeqStepInput& s = input.seqs[i];
    if (s.logits == SeqStepInput::Logits::kAll) {
      for (int32_t t = query_start[i]; t < query_start[i + 1]; ++t) rows.push_back(t);
    } else if (s.logits == SeqStepInput::Logits::kLast) {
      rows.push_back(query_start[i + 1] - 1);
    }
    output->row_begin[i + 1] = static_cast<int32_t>(rows.size());
  }
  if (!shard_.compute_logits) rows.clear(), output->row_begin.assign(n + 1, 0);
  const int64_t R = static_cast<int64_t>(rows.size());
  output->logits.resize(R * c.vocab_size);
  if (R > 0) {
    for (int64_t r = 0; r < R; ++r) {
      cpu::RmsNorm(x + rows[r] * d, weights_.final_norm.data(), h + r * d, 1, d, c.rms_norm_eps);
    }
    cpu::PackedLinear(h, lm_head_, output->logits.data(), R, cpu::Epilogue::kStore);
  }
  return absl::OkStatus();
}

}  // namespace strata
