// CudaEngine's forward pass: layers, LM head + sampling, CUDA graphs, and the
// benchmark helper that fills the cache. Nothing here synchronizes with the
// host, so the decode path can be captured into a graph.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/kv_cache_cuda.h"
#include "runtime/status_macros.h"
#include "worker/cuda_engine.h"

namespace strata {

using cuda_ops::ActDtype;

absl::Status CudaEngine::Gemm(const void* x, const void* w, void* y, bool y_fp32, int64_t m,
                              int64_t n, int64_t k, bool accumulate) {
  // Row-major y[m][n] (+)= x[m][k] * w[n][k]^T is, column-major,
  // y^T[n][m] = w^T (op T on the [k][n] view) * x^T.
  if (m <= 0) return absl::OkStatus();
  const cudaDataType in = act_ == ActDtype::kFp16 ? CUDA_R_16F : CUDA_R_16BF;
  const cudaDataType out = y_fp32 ? CUDA_R_32F : in;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  CUBLAS_RETURN_IF_ERROR(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                                      static_cast<int>(m), static_cast<int>(k), &alpha, w, in,
                                      static_cast<int>(k), x, in, static_cast<int>(k), &beta, y,
                                      out, static_cast<int>(n), CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status CudaEngine::Forward(const Plan& p) {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size, q = c.q_size(), kv = c.kv_size(), f = c.intermediate_size;
  const int32_t T = p.padded_tokens;
  PagedBatchView batch;
  batch.num_seqs = p.padded_seqs;
  batch.num_tokens = T;
  batch.max_blocks_per_seq = max_blocks_per_seq_;
  batch.block_tables = dev_.block_tables;
  batch.context_lens = dev_.context_lens;
  batch.query_start = dev_.query_start;
  batch.slot_mapping = dev_.slots;
  cuda::DecodePlan dplan;
  PagedBatchView dec_batch;  // mixed step: its one-token sequences
  if (p.decode_only || p.num_decode > 0) {
    if (p.decode_only) {
      dplan = cuda::PlanDecode(views_[0], p.padded_seqs, c.num_heads, p.ctx_bucket, num_sms_);
    } else {
      dplan = cuda::PlanDecode(views_[0], p.num_decode, c.num_heads, p.dec_ctx_bucket, num_sms_);
      dec_batch.num_seqs = p.num_decode;
      dec_batch.num_tokens = p.num_decode;
      dec_batch.max_blocks_per_seq = max_blocks_per_seq_;
      dec_batch.block_tables = dev_.dec_block_tables;
      dec_batch.context_lens = dev_.dec_context_lens;
      dec_batch.query_start = dev_.dec_rows;
    }
    if (dplan.workspace_bytes > decode_ws_bytes_) {
      return absl::InternalError(absl::StrCat("decode plan needs ", dplan.workspace_bytes,
                                              " bytes of workspace, the arena has ", decode_ws_bytes_));
    }
  }
  const float softmax_scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  const bool small = options_.fused_small_batch && cuda_ops::GemvSupported(T, d) &&
                     cuda_ops::GemvSupported(T, q) && cuda_ops::GemvSupported(T, f);
  auto gemv = [&](cuda_ops::GemvKind kind, const void* w, int64_t n_out, int64_t k, const void* x,
                  const float* norm_w, void* y) {
    cuda_ops::GemvArgs g;
    g.kind = kind;
    g.w = w;
    g.n_out = static_cast<int32_t>(n_out);
    g.k = static_cast<int32_t>(k);
    g.m = T;
    g.x = x;
    g.norm_w = norm_w;
    g.eps = c.rms_norm_eps;
    g.y = y;
    return cuda_ops::Gemv(g, act_, stream_);
  };

  CUDA_RETURN_IF_ERROR(cuda_ops::Embed(embed_, act_, dev_.tokens, T, d, x_, stream_));
  RETURN_IF_ERROR(Mark("embed"));
  for (int l = 0; l < c.num_layers; ++l) {
    const Layer& lw = layers_[l];
    if (small) {
      CUDA_RETURN_IF_ERROR(gemv(cuda_ops::GemvKind::kNormF32, lw.wqkv, q + 2 * kv, d, x_, lw.attn_norm, qkv_));
    } else {
      CUDA_RETURN_IF_ERROR(cuda_ops::RmsNorm(x_, lw.attn_norm, nullptr, T, d, c.rms_norm_eps, h_, act_, stream_));
      RETURN_IF_ERROR(Gemm(h_, lw.wqkv, qkv_, /*y_fp32=*/true, T, q + 2 * kv, d, false));
    }
    RETURN_IF_ERROR(Mark("attn_norm+qkv"));
    cuda_ops::RopeKvWriteArgs rw;
    rw.qkv = qkv_;
    rw.num_tokens = T;
    rw.num_heads = c.num_heads;
    rw.num_kv_heads = c.num_kv_heads;
    rw.head_dim = c.head_dim;
    rw.positions = dev_.positions;
    rw.slot_mapping = dev_.slots;
    rw.rope_cos = rope_cos_;
    rw.rope_sin = rope_sin_;
    rw.q_out = q_;
    rw.q_dtype = ActDtype::kFp32;
    rw.cache = views_[l];
    CUDA_RETURN_IF_ERROR(cuda_ops::RopeKvWrite(rw, stream_));
    RETURN_IF_ERROR(Mark("rope+kv_write"));
    cuda::AttentionArgs a;
    a.cache = views_[l];
    a.batch = batch;
    a.query = q_;
    a.out = attn_;
    a.num_heads = c.num_heads;
    a.softmax_scale = softmax_scale;
    if (p.decode_only) {
      CUDA_RETURN_IF_ERROR(cuda::PagedDecodeAttention(a, dplan, decode_ws_, stream_));
    } else if (p.num_decode > 0 && p.num_decode < p.num_seqs && side_stream_ != nullptr) {
      // Both kinds: the prefill attention (launched first, on the
      // higher-priority side stream) and the decode attention write disjoint
      // rows of attn_ and read the cache the RoPE/KV write above filled.
      cuda::AttentionArgs da = a;
      da.batch = dec_batch;
      a.skip_single_token = true;
      a.seq_index = dev_.pf_seqs;  // thread blocks for the multi-token sequences only
      a.num_indexed_seqs = p.num_prefill;
      CUDA_RETURN_IF_ERROR(cudaEventRecord(fork_event_, stream_));
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(side_stream_, fork_event_, 0));
      CUDA_RETURN_IF_ERROR(cuda::PagedPrefillAttention(a, p.max_new_tokens, side_stream_));
      CUDA_RETURN_IF_ERROR(cudaEventRecord(join_event_, side_stream_));
      CUDA_RETURN_IF_ERROR(cuda::PagedDecodeAttention(da, dplan, decode_ws_, stream_));
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_, join_event_, 0));
    } else {
      if (p.num_decode > 0) {
        cuda::AttentionArgs da = a;
        da.batch = dec_batch;
        CUDA_RETURN_IF_ERROR(cuda::PagedDecodeAttention(da, dplan, decode_ws_, stream_));
        a.skip_single_token = true;
        a.seq_index = dev_.pf_seqs;
        a.num_indexed_seqs = p.num_prefill;
      }
      if (p.num_decode < p.num_seqs) {
        CUDA_RETURN_IF_ERROR(cuda::PagedPrefillAttention(a, p.max_new_tokens, stream_));
      }
    }
    RETURN_IF_ERROR(Mark("attention"));
    // Row-parallel projections accumulate into the residual x_ (RowParallel).
    // The small-batch path, sharded: rank 0's partial includes the residual,
    // the others start from zero, and the fp32 residual is all-reduced.
    if (small) {
      RETURN_IF_ERROR(ZeroForPartial(T));
      CUDA_RETURN_IF_ERROR(gemv(cuda_ops::GemvKind::kF32AddF32, lw.wo, d, q, attn_, nullptr, x_));
      RETURN_IF_ERROR(Mark("o_proj"));
      RETURN_IF_ERROR(AllReduceResidual(T));
      CUDA_RETURN_IF_ERROR(gemv(cuda_ops::GemvKind::kNormSiluMul, lw.wgu, f, d, x_, lw.mlp_norm, act_buf_));
      RETURN_IF_ERROR(Mark("mlp_norm+gate_up"));
      RETURN_IF_ERROR(ZeroForPartial(T));
      CUDA_RETURN_IF_ERROR(gemv(cuda_ops::GemvKind::kActAddF32, lw.wdown, d, f, act_buf_, nullptr, x_));
      RETURN_IF_ERROR(Mark("silu+down"));
      RETURN_IF_ERROR(AllReduceResidual(T));
      continue;
    }
    CUDA_RETURN_IF_ERROR(cuda_ops::ConvertF32(attn_, int64_t{T} * q, attn_t_, act_, stream_));
    RETURN_IF_ERROR(RowParallel(attn_t_, lw.wo, T, q, "o_proj"));
    CUDA_RETURN_IF_ERROR(cuda_ops::RmsNorm(x_, lw.mlp_norm, nullptr, T, d, c.rms_norm_eps, h_, act_, stream_));
    RETURN_IF_ERROR(Gemm(h_, lw.wgu, gu_, false, T, 2 * f, d, false));
    RETURN_IF_ERROR(Mark("mlp_norm+gate_up"));
    CUDA_RETURN_IF_ERROR(cuda_ops::SiluMul(gu_, T, f, act_buf_, act_, stream_));
    RETURN_IF_ERROR(RowParallel(act_buf_, lw.wdown, T, f, "silu+down"));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::RowParallel(const void* x, const void* w, int64_t tokens, int64_t k,
                                     const char* stage) {
  const int64_t d = config_.hidden_size;
  if (!options_.shard.sharded()) {
    RETURN_IF_ERROR(Gemm(x, w, x_, /*y_fp32=*/true, tokens, d, k, /*accumulate=*/true));
    return Mark(stage);
  }
  // Each rank's partial in the activation dtype (h_ is free here: its norm
  // output has been consumed), summed over the ranks in 16 bits, which halves
  // the all-reduce's bytes against the fp32 residual, then added to every
  // rank's copy of the residual.
  RETURN_IF_ERROR(Gemm(x, w, h_, /*y_fp32=*/false, tokens, d, k, /*accumulate=*/false));
  RETURN_IF_ERROR(Mark(stage));
  RETURN_IF_ERROR(options_.collectives->AllReduceSumHalf(h_, tokens * d, act_ == ActDtype::kBf16));
  RETURN_IF_ERROR(Mark("all_reduce"));
  CUDA_RETURN_IF_ERROR(cuda_ops::AddToF32(h_, act_, tokens * d, x_, stream_));
  return absl::OkStatus();
}

absl::Status CudaEngine::ZeroForPartial(int64_t tokens) {
  if (!options_.shard.sharded() || options_.shard.rank == 0) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(x_, 0, tokens * config_.hidden_size * sizeof(float), stream_));
  return absl::OkStatus();
}

absl::Status CudaEngine::AllReduceResidual(int64_t tokens) {
  if (!options_.shard.sharded()) return absl::OkStatus();
  RETURN_IF_ERROR(options_.collectives->AllReduceSum(x_, tokens * config_.hidden_size));
  return Mark("all_reduce");
}

absl::Status CudaEngine::LogitsChunk(const Plan& p, int32_t row0, int32_t rows, int32_t sample0,
                                     int32_t num_sample) {
  const ModelConfig& c = config_;
  if (options_.fused_small_batch && cuda_ops::GemvSupported(rows, c.hidden_size)) {
    cuda_ops::GemvArgs g;
    g.kind = cuda_ops::GemvKind::kNormF32;
    g.w = lm_head_;
    g.n_out = c.vocab_size;
    g.k = c.hidden_size;
    g.m = rows;
    g.x = x_;
    g.x_rows = dev_.logit_rows + row0;
    g.norm_w = final_norm_;
    g.eps = c.rms_norm_eps;
    g.y = logits_;
    CUDA_RETURN_IF_ERROR(cuda_ops::Gemv(g, act_, stream_));
  } else {
    CUDA_RETURN_IF_ERROR(cuda_ops::RmsNorm(x_, final_norm_, dev_.logit_rows + row0, rows, c.hidden_size,
                                           c.rms_norm_eps, hrows_, act_, stream_));
    RETURN_IF_ERROR(Gemm(hrows_, lm_head_, logits_, true, rows, c.vocab_size, c.hidden_size, false));
  }
  RETURN_IF_ERROR(Mark("lm_head"));
  if (num_sample > 0) {
    CUDA_RETURN_IF_ERROR(cuda_ops::SampleRows(logits_, c.vocab_size, dev_.sample + sample0, num_sample,
                                              dev_.sample_out + sample0, stream_));
    RETURN_IF_ERROR(Mark("sample"));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::RunDecodeGraph(const Plan& p) {
  const std::pair<int32_t, int32_t> key(p.padded_seqs, p.ctx_bucket);
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    absl::Status st = Forward(p);
    if (st.ok() && options_.compute_logits) st = LogitsChunk(p, 0, p.padded_seqs, 0, p.padded_seqs);
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    if (!st.ok()) {
      if (graph) cudaGraphDestroy(graph);
      return st;
    }
    CUDA_RETURN_IF_ERROR(end);
    cudaGraphExec_t exec = nullptr;
    const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    CUDA_RETURN_IF_ERROR(inst);
    it = graphs_.emplace(key, exec).first;
  }
  CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->second, stream_));
  ++graph_replays_;
  return absl::OkStatus();
}

absl::Status CudaEngine::FillKvCacheRandom(uint64_t seed, float range) {
  const ModelConfig& c = config_;
  const int32_t bs = options_.engine.block_size;
  const int32_t blocks_per_chunk = options_.max_num_tokens / bs;
  if (blocks_per_chunk < 1) {
    return absl::InvalidArgumentError("FillKvCacheRandom needs max_num_tokens >= block_size");
  }
  const int32_t chunk_tokens = blocks_per_chunk * bs;
  const int64_t width = int64_t{c.num_heads + 2 * c.num_kv_heads} * c.head_dim;
  // Slots 0..chunk-1 of a view shifted to the chunk's first block; position 0
  // (RoPE is the identity there: the random values are stored as drawn).
  for (int32_t i = 0; i < chunk_tokens; ++i) host_.slots[i] = i, host_.positions[i] = 0;
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev_.slots, host_.slots, chunk_tokens * sizeof(int64_t),
                                       cudaMemcpyHostToDevice, stream_));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev_.positions, host_.positions, chunk_tokens * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, stream_));
  uint64_t k = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int l = 0; l < c.num_layers; ++l) {
    const KvCacheView& v = views_[l];
    for (int32_t b0 = 0; b0 < v.num_blocks; b0 += blocks_per_chunk) {
      const int32_t nb = std::min(blocks_per_chunk, v.num_blocks - b0);
      CUDA_RETURN_IF_ERROR(cuda_ops::FillUniform(qkv_, ActDtype::kFp32, int64_t{nb} * bs * width, ++k,
                                                 -range, range, stream_));
      cuda_ops::RopeKvWriteArgs rw;
      rw.qkv = qkv_;
      rw.num_tokens = nb * bs;
      rw.num_heads = c.num_heads;
      rw.num_kv_heads = c.num_kv_heads;
      rw.head_dim = c.head_dim;
      rw.positions = dev_.positions;
      rw.slot_mapping = dev_.slots;
      rw.rope_cos = rope_cos_;
      rw.rope_sin = rope_sin_;
      rw.q_out = q_;
      rw.cache = v;
      rw.cache.pool = v.block(b0);
      rw.cache.num_blocks = nb;
      CUDA_RETURN_IF_ERROR(cuda_ops::RopeKvWrite(rw, stream_));
    }
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

}  // namespace strata
