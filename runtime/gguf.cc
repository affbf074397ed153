#include "runtime/gguf.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "runtime/float16.h"
#include "runtime/status_macros.h"

namespace strata {
namespace {

constexpr uint64_t kMaxCount = uint64_t{1} << 32;  // sanity bound on counts and lengths
constexpr int kBlock = 32;                          // elements per Q4_0/Q4_1/Q8_0 block

float Half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return HalfToFloat(h);
}

// Bounds-checked little-endian cursor over the file image.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& source)
      : data_(data), size_(size), source_(source) {}
  size_t pos() const { return pos_; }

  template <class T>
  absl::Status Read(T* out, const char* what) {
    if (size_ - pos_ < sizeof(T)) return Truncated(what);
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }
  absl::Status ReadString(std::string* out, const char* what) {
    uint64_t len = 0;
    RETURN_IF_ERROR(Read(&len, what));
    if (len > size_ - pos_) return Truncated(what);
    out->assign(reinterpret_cast<const char*>(data_ + pos_), len);
    pos_ += len;
    return absl::OkStatus();
  }
  absl::Status Truncated(const char* what) const {
    return absl::DataLossError(absl::StrCat(source_, ": truncated GGUF file while reading ", what,
                                            " at byte ", pos_, " of ", size_));
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& source_;
};

using VT = GgufValue::Type;

absl::Status ReadScalar(Cursor& c, VT type, GgufValue* v, const std::string& key,
                        const std::string& source) {
  const char* what = "a metadata value";
  switch (type) {
    case VT::kUint8: { uint8_t x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = int64_t{x}; break; }
    case VT::kInt8: { int8_t x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = int64_t{x}; break; }
    case VT::kUint16: { uint16_t x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = int64_t{x}; break; }
    case VT::kInt16: { int16_t x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = int64_t{x}; break; }
    case VT::kUint32: { uint32_t x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = int64_t{x}; break; }
    case VT::kInt32: { int32_t x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = int64_t{x}; break; }
    case VT::kUint64: { uint64_t x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = x; break; }
    case VT::kInt64: { int64_t x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = x; break; }
    case VT::kFloat32: { float x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = double{x}; break; }
    case VT::kFloat64: { double x = 0; RETURN_IF_ERROR(c.Read(&x, what)); v->value = x; break; }
    case VT::kBool: {
      uint8_t x = 0;
      RETURN_IF_ERROR(c.Read(&x, what));
      v->value = x != 0;
      break;
    }
    case VT::kString: {
      std::string s;
      RETURN_IF_ERROR(c.ReadString(&s, what));
      v->value = std::move(s);
      break;
    }
    default:
      return absl::DataLossError(absl::StrCat(source, ": metadata key '", key,
                                              "' has unknown value type ", static_cast<uint32_t>(type)));
  }
  return absl::OkStatus();
}

absl::Status ReadValue(Cursor& c, VT type, GgufValue* v, const std::string& key,
                       const std::string& source) {
  v->type = type;
  if (type != VT::kArray) return ReadScalar(c, type, v, key, source);
  uint32_t et = 0;
  uint64_t n = 0;
  RETURN_IF_ERROR(c.Read(&et, "an array element type"));
  RETURN_IF_ERROR(c.Read(&n, "an array length"));
  if (n > kMaxCount) {
    return absl::DataLossError(absl::StrCat(source, ": metadata array '", key, "' claims ", n,
                                            " elements"));
  }
  v->element_type = static_cast<VT>(et);
  GgufValue elem;
  if (v->element_type == VT::kString) {
    std::vector<std::string> out;
    out.reserve(std::min<uint64_t>(n, 1 << 20));
    for (uint64_t i = 0; i < n; ++i) {
      std::string s;
      RETURN_IF_ERROR(c.ReadString(&s, "a string array element"));
      out.push_back(std::move(s));
    }
    v->value = std::move(out);
  } else if (v->element_type == VT::kFloat32 || v->element_type == VT::kFloat64) {
    std::vector<double> out;
    out.reserve(std::min<uint64_t>(n, 1 << 20));
    for (uint64_t i = 0; i < n; ++i) {
      RETURN_IF_ERROR(ReadValue(c, v->element_type, &elem, key, source));
      out.push_back(std::get<double>(elem.value));
    }
    v->value = std::move(out);
  } else if (v->element_type == VT::kArray) {
    return absl::UnimplementedError(
        absl::StrCat(source, ": nested array in metadata key '", key, "'"));
  } else {
    std::vector<int64_t> out;
    out.reserve(std::min<uint64_t>(n, 1 << 20));
    for (uint64_t i = 0; i < n; ++i) {
      RETURN_IF_ERROR(ReadValue(c, v->element_type, &elem, key, source));
      if (auto* b = std::get_if<bool>(&elem.value)) {
        out.push_back(*b ? 1 : 0);
      } else if (auto* u = std::get_if<uint64_t>(&elem.value)) {
        out.push_back(static_cast<int64_t>(*u));
      } else {
        out.push_back(std::get<int64_t>(elem.value));
      }
    }
    v->value = std::move(out);
  }
  return absl::OkStatus();
}

}  // namespace

const char* GgmlTypeName(uint32_t type) {
  switch (type) {
    case 0: return "F32";
    case 1: return "F16";
    case 2: return "Q4_0";
    case 3: return "Q4_1";
    case 6: return "Q5_0";
    case 7: return "Q5_1";
    case 8: return "Q8_0";
    case 10: return "Q2_K";
    case 11: return "Q3_K";
    case 12: return "Q4_K";
    case 13: return "Q5_K";
    case 14: return "Q6_K";
    case 30: return "BF16";
    default: return "unknown";
  }
}

int64_t GgmlTensorBytes(uint32_t type, int64_t n) {
  if (n < 0) return -1;
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32: return n * 4;
    case GgmlType::kF16:
    case GgmlType::kBf16: return n * 2;
    case GgmlType::kQ4_0: return n % kBlock ? -1 : n / kBlock * 18;
    case GgmlType::kQ4_1: return n % kBlock ? -1 : n / kBlock * 20;
    case GgmlType::kQ8_0: return n % kBlock ? -1 : n / kBlock * 34;
  }
  return -1;
}

absl::Status DequantizeGgml(uint32_t type, const uint8_t* src, int64_t n, float* out) {
  if (GgmlTensorBytes(type, n) < 0) {
    return absl::UnimplementedError(absl::StrCat("ggml type ", GgmlTypeName(type), " (", type,
                                                 ") with ", n, " elements is not supported"));
  }
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      std::memcpy(out, src, static_cast<size_t>(n) * 4);
      break;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) out[i] = Half(src + 2 * i);
      break;
    case GgmlType::kBf16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, src + 2 * i, 2);
        const uint32_t bits = uint32_t{b} << 16;
        std::memcpy(&out[i], &bits, 4);
      }
      break;
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < n / kBlock; ++b) {
        const uint8_t* blk = src + b * 34;
        const float d = Half(blk);
        for (int j = 0; j < kBlock; ++j) out[b * kBlock + j] = d * static_cast<int8_t>(blk[2 + j]);
      }
      break;
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < n / kBlock; ++b) {
        const uint8_t* blk = src + b * 18;
        const float d = Half(blk);
        for (int j = 0; j < kBlock / 2; ++j) {
          out[b * kBlock + j] = d * (static_cast<int>(blk[2 + j] & 0x0F) - 8);
          out[b * kBlock + j + 16] = d * (static_cast<int>(blk[2 + j] >> 4) - 8);
        }
      }
      break;
    case GgmlType::kQ4_1:
      for (int64_t b = 0; b < n / kBlock; ++b) {
        const uint8_t* blk = src + b * 20;
        const float d = Half(blk), m = Half(blk + 2);
        for (int j = 0; j < kBlock / 2; ++j) {
          out[b * kBlock + j] = d * static_cast<float>(blk[4 + j] & 0x0F) + m;
          out[b * kBlock + j + 16] = d * static_cast<float>(blk[4 + j] >> 4) + m;
        }
      }
      break;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile mapped, MappedFile::Open(path));
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> f, Parse(mapped.data(), mapped.size(), path));
  f->file_ = std::move(mapped);  // the mapping (and so the data pointers) stays put
  return f;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Parse(const uint8_t* data, size_t size,
                                                          const std::string& source) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->source_ = source;
  Cursor c(data, size, f->source_);
  char magic[4];
  RETURN_IF_ERROR(c.Read(&magic, "the magic"));
  if (std::memcmp(magic, "GGUF", 4) != 0) {
    return absl::DataLossError(absl::StrCat(source, ": not a GGUF file (bad magic)"));
  }
  RETURN_IF_ERROR(c.Read(&f->version_, "the version"));
  if (f->version_ != 2 && f->version_ != 3) {
    return absl::UnimplementedError(
        absl::StrCat(source, ": GGUF version ", f->version_, " is not supported (2 or 3)"));
  }
  uint64_t n_tensors = 0, n_kv = 0;
  RETURN_IF_ERROR(c.Read(&n_tensors, "the tensor count"));
  RETURN_IF_ERROR(c.Read(&n_kv, "the metadata count"));
  if (n_tensors > size / 16 || n_kv > size / 12) {
    return absl::DataLossError(absl::StrCat(source, ": implausible counts (", n_tensors,
                                            " tensors, ", n_kv, " metadata entries)"));
  }
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    RETURN_IF_ERROR(c.ReadString(&key, "a metadata key"));
    uint32_t type = 0;
    RETURN_IF_ERROR(c.Read(&type, "a metadata type"));
    GgufValue v;
    RETURN_IF_ERROR(ReadValue(c, static_cast<VT>(type), &v, key, source));
    if (!f->metadata_.emplace(key, std::move(v)).second) {
      return absl::DataLossError(absl::StrCat(source, ": metadata key '", key, "' appears twice"));
    }
  }
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    RETURN_IF_ERROR(c.ReadString(&t.name, "a tensor name"));
    uint32_t n_dims = 0;
    RETURN_IF_ERROR(c.Read(&n_dims, "a tensor rank"));
    if (n_dims == 0 || n_dims > 4) {
      return absl::DataLossError(
          absl::StrCat(source, ": tensor '", t.name, "' has rank ", n_dims, " (1..4 allowed)"));
    }
    t.num_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t dim = 0;
      RETURN_IF_ERROR(c.Read(&dim, "a tensor dimension"));
      if (dim == 0 || dim > kMaxCount ||
          static_cast<uint64_t>(t.num_elements) * dim > (uint64_t{1} << 40)) {
        return absl::DataLossError(
            absl::StrCat(source, ": tensor '", t.name, "' has dimension ", dim));
      }
      t.dims.push_back(static_cast<int64_t>(dim));
      t.num_elements *= static_cast<int64_t>(dim);
    }
    RETURN_IF_ERROR(c.Read(&t.type, "a tensor type"));
    RETURN_IF_ERROR(c.Read(&t.offset, "a tensor offset"));
    t.num_bytes = GgmlTensorBytes(t.type, t.num_elements);
    if (!f->tensor_index_.emplace(t.name, f->tensors_.size()).second) {
      return absl::DataLossError(absl::StrCat(source, ": tensor '", t.name, "' appears twice"));
    }
    f->tensors_.push_back(std::move(t));
  }
  uint64_t alignment = 32;
  if (auto it = f->metadata_.find("general.alignment"); it != f->metadata_.end()) {
    ASSIGN_OR_RETURN(int64_t a, f->GetInt("general.alignment"));
    if (a <= 0 || (a & (a - 1)) != 0) {
      return absl::DataLossError(absl::StrCat(source, ": general.alignment ", a,
                                              " is not a power of two"));
    }
    alignment = static_cast<uint64_t>(a);
  }
  const uint64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
  if (data_start > size) return c.Truncated("the padding before the tensor data");
  const uint64_t data_size = size - data_start;
  for (GgufTensorInfo& t : f->tensors_) {
    if (t.offset % alignment != 0) {
      return absl::DataLossError(absl::StrCat(source, ": tensor '", t.name, "' offset ", t.offset,
                                              " is not aligned to ", alignment));
    }
    // Unsupported types keep num_bytes -1 and no data: an error only if used.
    if (t.num_bytes < 0) continue;
    if (t.offset > data_size || static_cast<uint64_t>(t.num_bytes) > data_size - t.offset) {
      return absl::DataLossError(absl::StrCat(
          source, ": tensor '", t.name, "' (", t.num_bytes, " bytes at data offset ", t.offset,
          ") extends past the end of the file (", data_size, " data bytes); truncated?"));
    }
    t.data = data + data_start + t.offset;
  }
  return f;
}

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) return absl::NotFoundError(absl::StrCat(source_, ": no metadata key '", key, "'"));
  const auto& v = it->second.value;
  if (auto* i = std::get_if<int64_t>(&v)) return *i;
  if (auto* u = std::get_if<uint64_t>(&v)) {
    if (*u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(absl::StrCat(source_, ": '", key, "' is out of range"));
    }
    return static_cast<int64_t>(*u);
  }
  return absl::InvalidArgumentError(absl::StrCat(source_, ": metadata '", key, "' is not an integer"));
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) return absl::NotFoundError(absl::StrCat(source_, ": no metadata key '", key, "'"));
  if (auto* d = std::get_if<double>(&it->second.value)) return *d;
  ASSIGN_OR_RETURN(int64_t i, GetInt(key));
  return static_cast<double>(i);
}

absl::StatusOr<bool> GgufFile::GetBool(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) return absl::NotFoundError(absl::StrCat(source_, ": no metadata key '", key, "'"));
  if (auto* b = std::get_if<bool>(&it->second.value)) return *b;
  return absl::InvalidArgumentError(absl::StrCat(source_, ": metadata '", key, "' is not a bool"));
}

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) return absl::NotFoundError(absl::StrCat(source_, ": no metadata key '", key, "'"));
  if (auto* s = std::get_if<std::string>(&it->second.value)) return *s;
  return absl::InvalidArgumentError(absl::StrCat(source_, ": metadata '", key, "' is not a string"));
}

absl::StatusOr<const std::vector<std::string>*> GgufFile::GetStringArray(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) return absl::NotFoundError(absl::StrCat(source_, ": no metadata key '", key, "'"));
  if (auto* s = std::get_if<std::vector<std::string>>(&it->second.value)) return s;
  return absl::InvalidArgumentError(absl::StrCat(source_, ": metadata '", key, "' is not a string array"));
}

absl::StatusOr<const std::vector<int64_t>*> GgufFile::GetIntArray(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) return absl::NotFoundError(absl::StrCat(source_, ": no metadata key '", key, "'"));
  if (auto* s = std::get_if<std::vector<int64_t>>(&it->second.value)) return s;
  return absl::InvalidArgumentError(absl::StrCat(source_, ": metadata '", key, "' is not an integer array"));
}

absl::StatusOr<const GgufTensorInfo*> GgufFile::FindTensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  if (it == tensor_index_.end()) {
    return absl::NotFoundError(absl::StrCat(source_, ": missing tensor '", name, "'"));
  }
  return &tensors_[it->second];
}

absl::Status GgufFile::Dequantize(const GgufTensorInfo& t, const std::vector<int64_t>& expected_shape,
                                  float* out) const {
  std::vector<int64_t> shape(t.dims.rbegin(), t.dims.rend());
  if (shape != expected_shape) {
    auto str = [](const std::vector<int64_t>& s) {
      std::string r = "[";
      for (size_t i = 0; i < s.size(); ++i) absl::StrAppend(&r, i ? ", " : "", s[i]);
      return r + "]";
    };
    return absl::InvalidArgumentError(absl::StrCat(source_, ": tensor '", t.name, "' has shape ",
                                                   str(shape), ", expected ", str(expected_shape)));
  }
  if (t.data == nullptr) {
    return absl::UnimplementedError(absl::StrCat(source_, ": tensor '", t.name, "' has type ",
                                                 GgmlTypeName(t.type), " (", t.type,
                                                 "), which is not supported (F32, F16, BF16, Q8_0, "
                                                 "Q4_0, Q4_1)"));
  }
  return DequantizeGgml(t.type, t.data, t.num_elements, out);
}

std::vector<float> PermuteRowsForRotateHalf(const float* src, int heads, int head_dim, int cols) {
  std::vector<float> dst(static_cast<size_t>(heads) * head_dim * cols);
  const int half = head_dim / 2;
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < half; ++j) {
        const float* s = src + (static_cast<size_t>(h) * head_dim + 2 * j + i) * cols;
        float* d = dst.data() + (static_cast<size_t>(h) * head_dim + i * half + j) * cols;
        std::memcpy(d, s, sizeof(float) * cols);
      }
    }
  }
  return dst;
}

absl::StatusOr<ModelConfig> GgufModelConfig(const GgufFile& f) {
  ASSIGN_OR_RETURN(std::string arch, f.GetString("general.architecture"));
  if (arch != "llama") {
    return absl::UnimplementedError(absl::StrCat(
        f.source(), ": general.architecture is '", arch, "'; only 'llama' is supported"));
  }
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  auto get_int = [&](const char* key, int32_t* out) -> absl::Status {
    ASSIGN_OR_RETURN(int64_t v, f.GetInt(key));
    if (v <= 0 || v > (int64_t{1} << 30)) {
      return absl::InvalidArgumentError(absl::StrCat(f.source(), ": ", key, " = ", v, " is out of range"));
    }
    *out = static_cast<int32_t>(v);
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(get_int("llama.context_length", &c.max_position_embeddings));
  RETURN_IF_ERROR(get_int("llama.embedding_length", &c.hidden_size));
  RETURN_IF_ERROR(get_int("llama.block_count", &c.num_layers));
  RETURN_IF_ERROR(get_int("llama.feed_forward_length", &c.intermediate_size));
  RETURN_IF_ERROR(get_int("llama.attention.head_count", &c.num_heads));
  c.num_kv_heads = c.num_heads;
  if (f.Has("llama.attention.head_count_kv")) {
    RETURN_IF_ERROR(get_int("llama.attention.head_count_kv", &c.num_kv_heads));
  }
  if (c.hidden_size % c.num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(f.source(), ": embedding_length ", c.hidden_size,
                                                   " is not divisible by head_count ", c.num_heads));
  }
  c.head_dim = c.hidden_size / c.num_heads;
  if (f.Has("llama.rope.dimension_count")) {
    ASSIGN_OR_RETURN(int64_t rd, f.GetInt("llama.rope.dimension_count"));
    if (rd != c.head_dim) {
      return absl::UnimplementedError(absl::StrCat(f.source(), ": partial RoPE (rope.dimension_count ",
                                                   rd, " != head_dim ", c.head_dim, ")"));
    }
  }
  if (f.Has("llama.rope.scaling.type")) {
    ASSIGN_OR_RETURN(std::string st, f.GetString("llama.rope.scaling.type"));
    if (st != "none") {
      return absl::UnimplementedError(absl::StrCat(f.source(), ": RoPE scaling '", st, "'"));
    }
  }
  c.rope_theta = 10000.0f;
  if (f.Has("llama.rope.freq_base")) {
    ASSIGN_OR_RETURN(double theta, f.GetFloat("llama.rope.freq_base"));
    c.rope_theta = static_cast<float>(theta);
  }
  ASSIGN_OR_RETURN(double eps, f.GetFloat("llama.attention.layer_norm_rms_epsilon"));
  c.rms_norm_eps = static_cast<float>(eps);
  if (f.Has("llama.vocab_size")) {
    RETURN_IF_ERROR(get_int("llama.vocab_size", &c.vocab_size));
  } else {
    ASSIGN_OR_RETURN(const std::vector<std::string>* toks, f.GetStringArray("tokenizer.ggml.tokens"));
    c.vocab_size = static_cast<int32_t>(toks->size());
  }
  if (f.Has("tokenizer.ggml.bos_token_id")) {
    ASSIGN_OR_RETURN(int64_t b, f.GetInt("tokenizer.ggml.bos_token_id"));
    c.bos_token_id = static_cast<int32_t>(b);
  }
  if (f.Has("tokenizer.ggml.eos_token_id")) {
    ASSIGN_OR_RETURN(int64_t e, f.GetInt("tokenizer.ggml.eos_token_id"));
    c.eos_token_id = static_cast<int32_t>(e);
  }
  c.tie_word_embeddings = !f.FindTensor("output.weight").ok();
  // Quantized or half weights: an "auto" KV cache resolves to fp16, as in llama.cpp.
  c.torch_dtype = WeightDtype::kFp16;
  RETURN_IF_ERROR(ValidateModelConfig(c, f.source()));
  return c;
}

absl::StatusOr<ModelWeights> LoadGgufWeights(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> f, GgufFile::Open(path));
  ModelWeights w;
  ASSIGN_OR_RETURN(w.config, GgufModelConfig(*f));
  const ModelConfig& c = w.config;
  w.source_dtype = WeightDtype::kFp16;
  const int64_t h = c.hidden_size, q = c.q_size(), kv = c.kv_size(), ff = c.intermediate_size;
  auto load = [&](const std::string& name, std::vector<int64_t> shape,
                  std::vector<float>* out) -> absl::Status {
    ASSIGN_OR_RETURN(const GgufTensorInfo* t, f->FindTensor(name));
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    // 1-D norms may be stored as [n]; matrices as [rows][cols].
    out->resize(static_cast<size_t>(n));
    return f->Dequantize(*t, shape, out->data());
  };
  RETURN_IF_ERROR(load("token_embd.weight", {c.vocab_size, h}, &w.embed));
  RETURN_IF_ERROR(load("output_norm.weight", {h}, &w.final_norm));
  if (!c.tie_word_embeddings) RETURN_IF_ERROR(load("output.weight", {c.vocab_size, h}, &w.lm_head));
  w.layers.resize(c.num_layers);
  std::vector<float> tmp;
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("blk.", i, ".");
    LayerWeights& l = w.layers[i];
    RETURN_IF_ERROR(load(p + "attn_norm.weight", {h}, &l.attn_norm));
    RETURN_IF_ERROR(load(p + "attn_q.weight", {q, h}, &tmp));
    l.wq = PermuteRowsForRotateHalf(tmp.data(), c.num_heads, c.head_dim, static_cast<int>(h));
    RETURN_IF_ERROR(load(p + "attn_k.weight", {kv, h}, &tmp));
    l.wk = PermuteRowsForRotateHalf(tmp.data(), c.num_kv_heads, c.head_dim, static_cast<int>(h));
    RETURN_IF_ERROR(load(p + "attn_v.weight", {kv, h}, &l.wv));
    RETURN_IF_ERROR(load(p + "attn_output.weight", {h, q}, &l.wo));
    RETURN_IF_ERROR(load(p + "ffn_norm.weight", {h}, &l.mlp_norm));
    RETURN_IF_ERROR(load(p + "ffn_gate.weight", {ff, h}, &l.w_gate));
    RETURN_IF_ERROR(load(p + "ffn_up.weight", {ff, h}, &l.w_up));
    RETURN_IF_ERROR(load(p + "ffn_down.weight", {h, ff}, &l.w_down));
  }
  return w;
}

}  // namespace strata
