#include "worker/shard.h"

#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "runtime/float16.h"
#include "runtime/safetensors.h"
#include "runtime/status_macros.h"

namespace strata {
namespace {

// Rows [begin, begin + count) of a row-major [rows][cols] matrix.
std::vector<float> SliceRows(const std::vector<float>& m, int64_t cols, int64_t begin, int64_t count) {
  return std::vector<float>(m.begin() + begin * cols, m.begin() + (begin + count) * cols);
}

// Columns [begin, begin + count) of a row-major [rows][cols] matrix.
std::vector<float> SliceCols(const std::vector<float>& m, int64_t rows, int64_t cols, int64_t begin,
                             int64_t count) {
  std::vector<float> out(rows * count);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out.data() + r * count, m.data() + r * cols + begin, sizeof(float) * count);
  }
  return out;
}

// Converts `n` elements starting at element `offset` of a checkpoint tensor.
void ConvertRange(const TensorRef& t, int64_t offset, int64_t n, float* out) {
  switch (t.dtype) {
    case WeightDtype::kFp32:
      std::memcpy(out, t.data + 4 * offset, 4 * n);
      return;
    case WeightDtype::kFp16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t.data + 2 * (offset + i), 2);
        out[i] = HalfToFloat(h);
      }
      return;
    case WeightDtype::kBf16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t.data + 2 * (offset + i), 2);
        out[i] = Bf16ToFloat(h);
      }
      return;
  }
}

absl::StatusOr<const TensorRef*> FindShaped(const SafetensorsCheckpoint& ckpt, const std::string& name,
                                            int64_t rows, int64_t cols) {
  ASSIGN_OR_RETURN(const TensorRef* t, ckpt.Find(name));
  const std::vector<int64_t> want = cols > 0 ? std::vector<int64_t>{rows, cols} : std::vector<int64_t>{rows};
  if (t->shape != want) {
    return absl::InvalidArgumentError(absl::StrCat(*t->file, ": tensor ", name, " has ",
                                                   t->shape.size(), " dims / ", t->numel(),
                                                   " elements, but config.json implies [", rows,
                                                   cols > 0 ? absl::StrCat(", ", cols) : "", "]"));
  }
  return t;
}

absl::Status LoadAll(const SafetensorsCheckpoint& ckpt, const std::string& name, int64_t rows,
                     int64_t cols, std::vector<float>* out) {
  ASSIGN_OR_RETURN(const TensorRef* t, FindShaped(ckpt, name, rows, cols));
  out->resize(t->numel());
  ConvertRange(*t, 0, t->numel(), out->data());
  return absl::OkStatus();
}

absl::Status LoadRows(const SafetensorsCheckpoint& ckpt, const std::string& name, int64_t rows,
                      int64_t cols, int64_t begin, int64_t count, std::vector<float>* out) {
  ASSIGN_OR_RETURN(const TensorRef* t, FindShaped(ckpt, name, rows, cols));
  out->resize(count * cols);
  ConvertRange(*t, begin * cols, count * cols, out->data());
  return absl::OkStatus();
}

absl::Status LoadCols(const SafetensorsCheckpoint& ckpt, const std::string& name, int64_t rows,
                      int64_t cols, int64_t begin, int64_t count, std::vector<float>* out) {
  ASSIGN_OR_RETURN(const TensorRef* t, FindShaped(ckpt, name, rows, cols));
  out->resize(rows * count);
  for (int64_t r = 0; r < rows; ++r) ConvertRange(*t, r * cols + begin, count, out->data() + r * count);
  return absl::OkStatus();
}

absl::StatusOr<ModelWeights> LoadHfShard(const std::string& dir, const ShardSpec& spec) {
  namespace fs = std::filesystem;
  ModelWeights w;
  ASSIGN_OR_RETURN(w.config, LoadHfConfig((fs::path(dir) / "config.json").string()));
  RETURN_IF_ERROR(ValidateModelConfig(w.config, dir + "/config.json"));
  ASSIGN_OR_RETURN(ShardDims d, ComputeShardDims(w.config, spec));
  ASSIGN_OR_RETURN(auto ckpt, SafetensorsCheckpoint::OpenDirectory(dir));
  const ModelConfig& c = w.config;
  const int64_t h = c.hidden_size, hd = c.head_dim, q = c.q_size(), kv = c.kv_size();
  const int64_t f = c.intermediate_size;
  ASSIGN_OR_RETURN(const TensorRef* embed, ckpt->Find("model.embed_tokens.weight"));
  w.source_dtype = embed->dtype;
  RETURN_IF_ERROR(LoadAll(*ckpt, "model.embed_tokens.weight", c.vocab_size, h, &w.embed));
  RETURN_IF_ERROR(LoadAll(*ckpt, "model.norm.weight", h, 0, &w.final_norm));
  if (ckpt->Contains("lm_head.weight")) {
    // Only rank 0 computes logits; the other ranks skip the LM head.
    if (spec.rank == 0) RETURN_IF_ERROR(LoadAll(*ckpt, "lm_head.weight", c.vocab_size, h, &w.lm_head));
  } else if (!c.tie_word_embeddings) {
    return absl::NotFoundError(absl::StrCat(ckpt->source(),
                                            ": missing tensor lm_head.weight and config.json does "
                                            "not set tie_word_embeddings"));
  }
  w.layers.resize(c.num_layers);
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights& l = w.layers[i];
    RETURN_IF_ERROR(LoadAll(*ckpt, p + "input_layernorm.weight", h, 0, &l.attn_norm));
    RETURN_IF_ERROR(LoadAll(*ckpt, p + "post_attention_layernorm.weight", h, 0, &l.mlp_norm));
    RETURN_IF_ERROR(LoadRows(*ckpt, p + "self_attn.q_proj.weight", q, h, d.q_head_begin * hd,
                             d.num_heads * hd, &l.wq));
    RETURN_IF_ERROR(LoadRows(*ckpt, p + "self_attn.k_proj.weight", kv, h, d.kv_head_begin * hd,
                             d.num_kv_heads * hd, &l.wk));
    RETURN_IF_ERROR(LoadRows(*ckpt, p + "self_attn.v_proj.weight", kv, h, d.kv_head_begin * hd,
                             d.num_kv_heads * hd, &l.wv));
    RETURN_IF_ERROR(LoadCols(*ckpt, p + "self_attn.o_proj.weight", h, q, d.q_head_begin * hd,
                             d.num_heads * hd, &l.wo));
    RETURN_IF_ERROR(LoadRows(*ckpt, p + "mlp.gate_proj.weight", f, h, d.f_begin, d.intermediate, &l.w_gate));
    RETURN_IF_ERROR(LoadRows(*ckpt, p + "mlp.up_proj.weight", f, h, d.f_begin, d.intermediate, &l.w_up));
    RETURN_IF_ERROR(LoadCols(*ckpt, p + "mlp.down_proj.weight", h, f, d.f_begin, d.intermediate, &l.w_down));
  }
  return w;
}

}  // namespace

absl::StatusOr<ShardDims> ComputeShardDims(const ModelConfig& c, const ShardSpec& spec) {
  const int32_t tp = spec.world_size;
  if (tp < 1 || spec.rank < 0 || spec.rank >= tp) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", spec.rank, " outside world size ", tp));
  }
  if (c.num_heads <= 0 || c.num_kv_heads <= 0 || c.intermediate_size <= 0 ||
      c.num_heads % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("model has ", c.num_heads, " heads and ",
                                                   c.num_kv_heads, " kv heads: cannot shard it"));
  }
  if (c.num_heads % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallel size ", tp,
                                                   " does not divide the model's ", c.num_heads,
                                                   " attention heads"));
  }
  if (c.intermediate_size % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallel size ", tp,
                                                   " does not divide intermediate_size ",
                                                   c.intermediate_size));
  }
  if (c.num_kv_heads % tp != 0 && tp % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor parallel size ", tp, " and the model's ", c.num_kv_heads,
        " kv heads: one must divide the other (kv heads are split or replicated)"));
  }
  ShardDims d;
  d.num_heads = c.num_heads / tp;
  d.q_head_begin = spec.rank * d.num_heads;
  if (c.num_kv_heads >= tp) {
    d.num_kv_heads = c.num_kv_heads / tp;
    d.kv_head_begin = spec.rank * d.num_kv_heads;
  } else {
    d.num_kv_heads = 1;  // replicated on tp / num_kv_heads ranks
    d.kv_head_begin = spec.rank * c.num_kv_heads / tp;
  }
  d.intermediate = c.intermediate_size / tp;
  d.f_begin = spec.rank * d.intermediate;
  return d;
}

absl::StatusOr<ModelWeights> SliceWeights(ModelWeights full, const ShardSpec& spec) {
  ASSIGN_OR_RETURN(ShardDims d, ComputeShardDims(full.config, spec));
  if (!spec.sharded()) return full;
  const ModelConfig& c = full.config;
  const int64_t h = c.hidden_size, hd = c.head_dim, q = c.q_size(), f = c.intermediate_size;
  const int64_t kv = c.kv_size();
  auto n = [](const std::vector<float>& v) { return static_cast<int64_t>(v.size()); };
  if (full.layers.size() != static_cast<size_t>(c.num_layers)) {
    return absl::InvalidArgumentError("weights have a different layer count than their config");
  }
  for (const LayerWeights& l : full.layers) {
    if (n(l.wq) != q * h || n(l.wk) != kv * h || n(l.wv) != kv * h || n(l.wo) != h * q ||
        n(l.w_gate) != f * h || n(l.w_up) != f * h || n(l.w_down) != h * f) {
      return absl::InvalidArgumentError("full weights do not match their config's shapes");
    }
  }
  for (LayerWeights& l : full.layers) {
    l.wq = SliceRows(l.wq, h, d.q_head_begin * hd, d.num_heads * hd);
    l.wk = SliceRows(l.wk, h, d.kv_head_begin * hd, d.num_kv_heads * hd);
    l.wv = SliceRows(l.wv, h, d.kv_head_begin * hd, d.num_kv_heads * hd);
    l.wo = SliceCols(l.wo, h, q, d.q_head_begin * hd, d.num_heads * hd);
    l.w_gate = SliceRows(l.w_gate, h, d.f_begin, d.intermediate);
    l.w_up = SliceRows(l.w_up, h, d.f_begin, d.intermediate);
    l.w_down = SliceCols(l.w_down, h, f, d.f_begin, d.intermediate);
  }
  if (spec.rank != 0) {
    full.lm_head.clear();
    full.lm_head.shrink_to_fit();
  }
  return full;
}

absl::StatusOr<ModelWeights> LoadShardWeights(const std::string& path, const ShardSpec& spec) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec) && fs::exists(fs::path(path) / "config.json", ec)) {
    return LoadHfShard(path, spec);
  }
  ASSIGN_OR_RETURN(ModelWeights full, LoadModelWeights(path));
  return SliceWeights(std::move(full), spec);
}

KvQuantParams SliceKvQuantParams(const KvQuantParams& full, const ShardDims& d) {
  KvQuantParams out = full;
  out.num_kv_heads = d.num_kv_heads;
  auto slice = [&](std::vector<std::vector<float>>& per_layer) {
    for (auto& v : per_layer) {
      if (static_cast<int32_t>(v.size()) != full.num_kv_heads) continue;  // absent (fp8 zero points)
      v = std::vector<float>(v.begin() + d.kv_head_begin, v.begin() + d.kv_head_begin + d.num_kv_heads);
    }
  };
  slice(out.k_scale);
  slice(out.k_zero);
  slice(out.v_scale);
  slice(out.v_zero);
  return out;
}

int64_t WeightBytes(const ModelWeights& w) {
  int64_t n = w.embed.size() + w.final_norm.size() + w.lm_head.size();
  for (const LayerWeights& l : w.layers) {
    n += l.attn_norm.size() + l.wq.size() + l.wk.size() + l.wv.size() + l.wo.size() +
         l.mlp_norm.size() + l.w_gate.size() + l.w_up.size() + l.w_down.size();
  }
  return n * static_cast<int64_t>(sizeof(float));
}

}  // namespace strata
