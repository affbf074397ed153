// CudaEngine's weights: device allocation, upload of a checkpoint (fp32 on the
// host, converted on the device in chunks to the engine's 16-bit type), and
// the seeded random fill of the dummy-weight shapes used by benchmarks.
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "runtime/status_macros.h"
#include "worker/cuda_engine.h"

namespace strata {
namespace {

using cuda_ops::ActDtype;

constexpr int64_t kUploadChunk = int64_t{8} << 20;  // floats per weight-upload chunk

}  // namespace

absl::Status CudaEngine::AllocateWeights() {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size, q = c.q_size(), kv = c.kv_size(), f = c.intermediate_size;
  const int64_t V = c.vocab_size, eb = 2;
  auto alloc = [&](int64_t bytes, void** out) -> absl::Status {
    DeviceBuffer b;
    RETURN_IF_ERROR(b.Allocate(static_cast<size_t>(bytes)));
    *out = b.get();
    memory_.weights += bytes;
    weight_buffers_.push_back(std::move(b));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(alloc(V * d * eb, &embed_));
  if (c.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    RETURN_IF_ERROR(alloc(V * d * eb, &lm_head_));
  }
  void* p = nullptr;
  RETURN_IF_ERROR(alloc(d * 4, &p));
  final_norm_ = static_cast<float*>(p);
  layers_.resize(c.num_layers);
  for (Layer& l : layers_) {
    RETURN_IF_ERROR(alloc((q + 2 * kv) * d * eb, &l.wqkv));
    RETURN_IF_ERROR(alloc(d * q * eb, &l.wo));
    RETURN_IF_ERROR(alloc(2 * f * d * eb, &l.wgu));
    RETURN_IF_ERROR(alloc(d * f * eb, &l.wdown));
    RETURN_IF_ERROR(alloc(d * 4, &p));
    l.attn_norm = static_cast<float*>(p);
    RETURN_IF_ERROR(alloc(d * 4, &p));
    l.mlp_norm = static_cast<float*>(p);
  }
  weight_bytes_read_ = c.num_layers * (((q + 2 * kv) * d + d * q + 3 * f * d) * eb + 2 * d * 4) +
                       V * d * eb + d * 4;
  return absl::OkStatus();
}

absl::Status CudaEngine::UploadWeights(const ModelWeights& w) {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size, q = c.q_size(), kv = c.kv_size(), f = c.intermediate_size;
  DeviceBuffer tmp;
  RETURN_IF_ERROR(tmp.Allocate(kUploadChunk * sizeof(float)));
  // Host fp32 -> device fp32 chunk -> converted into `dst` (T) at element offset.
  auto up = [&](void* dst, int64_t offset, const std::vector<float>& src, int64_t expect,
                const char* name) -> absl::Status {
    if (static_cast<int64_t>(src.size()) != expect) {
      return absl::InvalidArgumentError(absl::StrCat("weight ", name, " has ", src.size(),
                                                     " values, expected ", expect));
    }
    char* base = static_cast<char*>(dst) + offset * 2;
    for (int64_t o = 0; o < expect; o += kUploadChunk) {
      const int64_t n = std::min(kUploadChunk, expect - o);
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tmp.get(), src.data() + o, n * sizeof(float),
                                           cudaMemcpyHostToDevice, stream_));
      CUDA_RETURN_IF_ERROR(cuda_ops::ConvertF32(tmp.get<float>(), n, base + o * 2, act_, stream_));
    }
    return absl::OkStatus();
  };
  auto up32 = [&](float* dst, const std::vector<float>& src, const char* name) -> absl::Status {
    if (static_cast<int64_t>(src.size()) != d) {
      return absl::InvalidArgumentError(absl::StrCat("norm ", name, " has ", src.size(), " values"));
    }
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src.data(), d * sizeof(float), cudaMemcpyHostToDevice, stream_));
    return absl::OkStatus();
  };
  if (static_cast<int32_t>(w.layers.size()) != c.num_layers) {
    return absl::InvalidArgumentError("weights have the wrong number of layers");
  }
  RETURN_IF_ERROR(up(embed_, 0, w.embed, int64_t{c.vocab_size} * d, "embed"));
  if (lm_head_ != embed_) RETURN_IF_ERROR(up(lm_head_, 0, w.lm_head, int64_t{c.vocab_size} * d, "lm_head"));
  RETURN_IF_ERROR(up32(final_norm_, w.final_norm, "final_norm"));
  for (int i = 0; i < c.num_layers; ++i) {
    const LayerWeights& lw = w.layers[i];
    Layer& l = layers_[i];
    RETURN_IF_ERROR(up(l.wqkv, 0, lw.wq, q * d, "wq"));
    RETURN_IF_ERROR(up(l.wqkv, q * d, lw.wk, kv * d, "wk"));
    RETURN_IF_ERROR(up(l.wqkv, (q + kv) * d, lw.wv, kv * d, "wv"));
    RETURN_IF_ERROR(up(l.wo, 0, lw.wo, d * q, "wo"));
    RETURN_IF_ERROR(up(l.wgu, 0, lw.w_gate, f * d, "w_gate"));
    RETURN_IF_ERROR(up(l.wgu, f * d, lw.w_up, f * d, "w_up"));
    RETURN_IF_ERROR(up(l.wdown, 0, lw.w_down, d * f, "w_down"));
    RETURN_IF_ERROR(up32(l.attn_norm, lw.attn_norm, "attn_norm"));
    RETURN_IF_ERROR(up32(l.mlp_norm, lw.mlp_norm, "mlp_norm"));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaEngine::FillDummyWeights(uint64_t seed) {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size, q = c.q_size(), kv = c.kv_size(), f = c.intermediate_size;
  uint64_t k = seed * 0x100000001B3ull;
  // Matrices ~ U(-a, a) with a = sqrt(3 / fan_in): unit gain per layer, so
  // activations stay O(1) through any depth; norms ~ U(0.8, 1.2).
  auto mat = [&](void* p, int64_t rows, int64_t fan_in) {
    const float a = std::sqrt(3.0f / static_cast<float>(fan_in));
    return cuda_ops::FillUniform(p, act_, rows * fan_in, ++k, -a, a, stream_);
  };
  auto norm = [&](float* p) { return cuda_ops::FillUniform(p, ActDtype::kFp32, d, ++k, 0.8f, 1.2f, stream_); };
  CUDA_RETURN_IF_ERROR(cuda_ops::FillUniform(embed_, act_, int64_t{c.vocab_size} * d, ++k, -1.0f, 1.0f, stream_));
  if (lm_head_ != embed_) CUDA_RETURN_IF_ERROR(mat(lm_head_, c.vocab_size, d));
  CUDA_RETURN_IF_ERROR(norm(final_norm_));
  for (Layer& l : layers_) {
    CUDA_RETURN_IF_ERROR(mat(l.wqkv, q + 2 * kv, d));
    CUDA_RETURN_IF_ERROR(mat(l.wo, d, q));
    CUDA_RETURN_IF_ERROR(mat(l.wgu, 2 * f, d));
    CUDA_RETURN_IF_ERROR(mat(l.wdown, d, f));
    CUDA_RETURN_IF_ERROR(norm(l.attn_norm));
    CUDA_RETURN_IF_ERROR(norm(l.mlp_norm));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

}  // namespace strata
