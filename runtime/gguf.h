// GGUF reader (llama.cpp's model file format, versions 2 and 3), and LLaMA
// weights from a GGUF file.
//
// Why our own reader: no library packaged in Debian 12 reads GGUF from C++
// (ggml is not packaged), and the format is small: a header, typed key/value
// metadata, tensor descriptors and an aligned data section. Everything read
// from the file is bounds-checked against its size; a corrupt or truncated
// file yields DATA_LOSS naming the file and the field.
//
// Tensor types dequantized to fp32: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (block
// formats as in ggml-common.h: 32 elements per block, an fp16 scale `d`,
// Q4_1 also an fp16 minimum `m`; value = d * q (Q8_0), d * (q - 8) (Q4_0),
// d * q + m (Q4_1), with element j of a Q4 block in the low nibble of byte j
// for j < 16 and the high nibble of byte j - 16 otherwise). Other types
// (K-quants, Q5_*, IQ*) are UNIMPLEMENTED.
//
// Layout: GGUF lists dimensions fastest-varying first (ne[0] = columns), so
// a 2-D tensor with dims {in, out} is row-major [out][in], the nn.Linear
// layout ModelWeights uses.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/mapped_file.h"
#include "runtime/weights.h"

namespace strata {

// ggml tensor types (the numbers stored in the file).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kBf16 = 30,
};
const char* GgmlTypeName(uint32_t type);

// One metadata value. Arrays keep their element type; integer arrays are
// widened to int64, float arrays to double.
struct GgufValue {
  enum class Type : uint32_t {
    kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5,
    kFloat32 = 6, kBool = 7, kString = 8, kArray = 9, kUint64 = 10, kInt64 = 11, kFloat64 = 12,
  };
  Type type = Type::kUint8;
  Type element_type = Type::kUint8;  // arrays only
  std::variant<int64_t, uint64_t, double, bool, std::string, std::vector<int64_t>,
               std::vector<double>, std::vector<std::string>>
      value;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // GGUF order: dims[0] varies fastest
  uint32_t type = 0;          // GgmlType number
  uint64_t offset = 0;        // from the start of the data section
  int64_t num_elements = 0;
  int64_t num_bytes = 0;
  const uint8_t* data = nullptr;  // into the mapping
};

class GgufFile {
 public:
  // NOT_FOUND if the file cannot be opened; DATA_LOSS if it is not a
  // well-formed GGUF file; UNIMPLEMENTED for an unsupported version.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Parses an in-memory image (tests); `source` names it in errors. The
  // bytes must outlive the returned object.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Parse(const uint8_t* data, size_t size,
                                                         const std::string& source);

  const std::string& source() const { return source_; }
  uint32_t version() const { return version_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool Has(const std::string& key) const { return metadata_.count(key) > 0; }

  // Typed metadata lookups: NOT_FOUND when absent, INVALID_ARGUMENT when the
  // stored type does not convert (e.g. a string read as an integer).
  absl::StatusOr<int64_t> GetInt(const std::string& key) const;
  absl::StatusOr<double> GetFloat(const std::string& key) const;  // also accepts integers
  absl::StatusOr<bool> GetBool(const std::string& key) const;
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  absl::StatusOr<const std::vector<std::string>*> GetStringArray(const std::string& key) const;
  absl::StatusOr<const std::vector<int64_t>*> GetIntArray(const std::string& key) const;

  // NOT_FOUND naming the file when absent.
  absl::StatusOr<const GgufTensorInfo*> FindTensor(const std::string& name) const;

  // Dequantizes a tensor to fp32. `expected_shape` is row-major (slowest
  // first, i.e. reversed GGUF dims); INVALID_ARGUMENT if it differs.
  absl::Status Dequantize(const GgufTensorInfo& t, const std::vector<int64_t>& expected_shape,
                          float* out) const;

 private:
  GgufFile() = default;
  std::string source_;
  MappedFile file_;  // empty for Parse()
  uint32_t version_ = 0;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// Dequantizes `n` elements of `type` from `src` (n a multiple of the block
// size for block types). UNIMPLEMENTED for unsupported types.
absl::Status DequantizeGgml(uint32_t type, const uint8_t* src, int64_t n, float* out);
// Bytes of `n` elements of `type`; -1 for unsupported types or n not a
// multiple of the block size.
int64_t GgmlTensorBytes(uint32_t type, int64_t n);

// LLaMA model configuration from GGUF metadata (general.architecture must be
// "llama"): llama.{context_length, embedding_length, block_count,
// feed_forward_length, attention.head_count, attention.head_count_kv,
// rope.freq_base, attention.layer_norm_rms_epsilon, vocab_size}, else the
// length of tokenizer.ggml.tokens; tokenizer.ggml.{bos,eos}_token_id.
absl::StatusOr<ModelConfig> GgufModelConfig(const GgufFile& f);

// Loads LLaMA weights (token_embd, output_norm, output (else tied), blk.N.
// {attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
// ffn_up, ffn_down}) dequantized to fp32. llama.cpp's converter permutes q/k
// rows for interleaved-pair RoPE; they are permuted back to the HF
// rotate_half layout here (the inverse of convert_hf_to_gguf.py's
// LlamaModel.permute), so the engine keeps one RoPE convention.
absl::StatusOr<ModelWeights> LoadGgufWeights(const std::string& path);

// Row permutation from interleaved-pair RoPE (GGUF/Meta) to rotate_half
// (HF): HF row h*hd + i*(hd/2) + j <- source row h*hd + 2j + i. Exposed for
// tests.
std::vector<float> PermuteRowsForRotateHalf(const float* src, int heads, int head_dim, int cols);

}  // namespace strata
