// llama2.c checkpoint reader (the legacy "v0" format of run.c):
//   int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
//   fp32 token_embedding[vocab][dim], rms_att[L][dim], wq[L][dim][dim],
//        wk[L][kv_dim][dim], wv[L][kv_dim][dim], wo[L][dim][dim], rms_ffn[L][dim],
//        w1[L][hidden][dim], w2[L][dim][hidden], w3[L][hidden][dim], rms_final[dim],
//        freq_cis_real[seq_len][head_dim/2], freq_cis_imag[...],
//        wcls[vocab][dim] only when vocab_size < 0 (unshared classifier).
#include <cstring>

#include "absl/strings/str_cat.h"
#include "runtime/gguf.h"  // PermuteRowsForRotateHalf
#include "runtime/mapped_file.h"
#include "runtime/status_macros.h"
#include "runtime/weights.h"

namespace strata {

absl::StatusOr<ModelWeights> LoadLlama2cWeights(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(path));
  if (file.size() < 28) {
    return absl::DataLossError(absl::StrCat(path, ": llama2.c checkpoint is ", file.size(),
                                            " bytes, shorter than its 28-byte header"));
  }
  int32_t hdr[7];
  std::memcpy(hdr, file.data(), sizeof(hdr));
  ModelWeights w;
  ModelConfig& c = w.config;
  c.hidden_size = hdr[0];
  c.intermediate_size = hdr[1];
  c.num_layers = hdr[2];
  c.num_heads = hdr[3];
  c.num_kv_heads = hdr[4];
  const bool shared_classifier = hdr[5] > 0;
  c.vocab_size = hdr[5] > 0 ? hdr[5] : -hdr[5];
  c.max_position_embeddings = hdr[6];
  c.tie_word_embeddings = shared_classifier;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  for (int i = 0; i < 7; ++i) {
    if (hdr[i] == 0 || (i != 5 && hdr[i] < 0) || hdr[i] > (1 << 24) || hdr[i] < -(1 << 24)) {
      return absl::DataLossError(
          absl::StrCat(path, ": not a llama2.c checkpoint (header field ", i, " = ", hdr[i], ")"));
    }
  }
  if (c.hidden_size % c.num_heads != 0) {
    return absl::DataLossError(absl::StrCat(path, ": dim ", c.hidden_size,
                                            " not divisible by n_heads ", c.num_heads));
  }
  c.head_dim = c.hidden_size / c.num_heads;
  RETURN_IF_ERROR(ValidateModelConfig(c, path));

  const int64_t d = c.hidden_size, kv = c.kv_size(), f = c.intermediate_size, L = c.num_layers,
                V = c.vocab_size, S = c.max_position_embeddings;
  const int64_t expected_floats = V * d + L * d + L * d * d + 2 * L * kv * d + L * d * d + L * d +
                                  3 * L * f * d + d + S * c.head_dim +
                                  (shared_classifier ? 0 : V * d);
  const int64_t expected_bytes = 28 + expected_floats * 4;
  if (static_cast<int64_t>(file.size()) != expected_bytes) {
    return absl::DataLossError(absl::StrCat(path, ": llama2.c checkpoint is ", file.size(),
                                            " bytes but its header implies ", expected_bytes,
                                            " (truncated or wrong format)"));
  }
  const float* p = reinterpret_cast<const float*>(file.data() + 28);
  auto take = [&p](int64_t n) {
    std::vector<float> v(p, p + n);
    p += n;
    return v;
  };
  w.embed = take(V * d);
  w.layers.resize(L);
  for (auto& l : w.layers) l.attn_norm = take(d);
  for (auto& l : w.layers) {
    l.wq = PermuteRowsForRotateHalf(p, c.num_heads, c.head_dim, d);
    p += d * d;
  }
  for (auto& l : w.layers) {
    l.wk = PermuteRowsForRotateHalf(p, c.num_kv_heads, c.head_dim, d);
    p += kv * d;
  }
  for (auto& l : w.layers) l.wv = take(kv * d);
  for (auto& l : w.layers) l.wo = take(d * d);
  for (auto& l : w.layers) l.mlp_norm = take(d);
  for (auto& l : w.layers) l.w_gate = take(f * d);  // w1
  for (auto& l : w.layers) l.w_down = take(d * f);  // w2
  for (auto& l : w.layers) l.w_up = take(f * d);    // w3
  w.final_norm = take(d);
  p += S * c.head_dim;  // legacy freq_cis_real/imag, recomputed from rope_theta
  if (!shared_classifier) w.lm_head = take(V * d);
  return w;
}

}  // namespace strata
