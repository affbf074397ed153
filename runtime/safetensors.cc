#include "runtime/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "runtime/float16.h"
#include "runtime/status_macros.h"

namespace strata {
namespace {

using nlohmann::json;

absl::Status Corrupt(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat(path, ": invalid safetensors file: ", what));
}

int DtypeBytes(WeightDtype d) { return d == WeightDtype::kFp32 ? 4 : 2; }

std::string ShapeString(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ","), "]");
}

}  // namespace

int64_t TensorRef::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& path) {
  auto ckpt = std::unique_ptr<SafetensorsCheckpoint>(new SafetensorsCheckpoint());
  ckpt->source_ = path;
  if (path.size() >= 5 && path.substr(path.size() - 5) == ".json") {
    std::ifstream in(path);
    if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open index file"));
    std::stringstream ss;
    ss << in.rdbuf();
    json index = json::parse(ss.str(), nullptr, false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": index must be a JSON object with a \"weight_map\" object"));
    }
    std::vector<std::string> shards;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": weight_map entry for ", name, " is not a file name"));
      }
      shards.push_back(file.get<std::string>());
    }
    std::sort(shards.begin(), shards.end());
    shards.erase(std::unique(shards.begin(), shards.end()), shards.end());
    const std::filesystem::path dir = std::filesystem::path(path).parent_path();
    for (const std::string& shard : shards) {
      RETURN_IF_ERROR(ckpt->AddFile((dir / shard).string()));
    }
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!ckpt->Contains(name)) {
        return absl::DataLossError(absl::StrCat(path, ": tensor ", name, " listed in ",
                                                file.get<std::string>(), " is not in that file"));
      }
    }
    return ckpt;
  }
  RETURN_IF_ERROR(ckpt->AddFile(path));
  return ckpt;
}

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::OpenDirectory(
    const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(index)) return Open(index.string());
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(single)) return Open(single.string());
  return absl::NotFoundError(
      absl::StrCat(dir, ": no model.safetensors or model.safetensors.index.json"));
}

absl::Status SafetensorsCheckpoint::AddFile(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile mapped, MappedFile::Open(path));
  auto file = std::make_unique<MappedFile>(std::move(mapped));
  const uint8_t* base = file->data();
  const size_t size = file->size();
  if (size < 8) return Corrupt(path, absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length"));
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);
  if (header_len > size - 8) {
    return Corrupt(path, absl::StrCat("header length ", header_len, " runs past the end of the ",
                                      size, "-byte file"));
  }
  json header = json::parse(reinterpret_cast<const char*>(base + 8),
                            reinterpret_cast<const char*>(base + 8 + header_len), nullptr, false);
  if (header.is_discarded() || !header.is_object()) return Corrupt(path, "header is not a JSON object");
  const uint8_t* data = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  const std::string* file_name = &file->path();

  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") ||
        !info.contains("data_offsets")) {
      return Corrupt(path, absl::StrCat("tensor ", name, " lacks dtype/shape/data_offsets"));
    }
    TensorRef t;
    t.name = name;
    t.file = file_name;
    const std::string dtype = info["dtype"].is_string() ? info["dtype"].get<std::string>() : "";
    if (dtype == "F32") t.dtype = WeightDtype::kFp32;
    else if (dtype == "F16") t.dtype = WeightDtype::kFp16;
    else if (dtype == "BF16") t.dtype = WeightDtype::kBf16;
    else {
      return absl::UnimplementedError(absl::StrCat(path, ": tensor ", name,
                                                   " has unsupported dtype \"", dtype,
                                                   "\" (supported: F32, F16, BF16)"));
    }
    if (!info["shape"].is_array()) return Corrupt(path, absl::StrCat("tensor ", name, ": shape is not a list"));
    for (const auto& d : info["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return Corrupt(path, absl::StrCat("tensor ", name, ": bad shape entry"));
      }
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = info["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned()) {
      return Corrupt(path, absl::StrCat("tensor ", name, ": data_offsets must be two unsigned integers"));
    }
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return Corrupt(path, absl::StrCat("tensor ", name, ": data_offsets [", begin, ",", end,
                                        ") outside the ", data_size, "-byte data section"));
    }
    t.data = data + begin;
    t.nbytes = static_cast<int64_t>(end - begin);
    if (t.numel() * DtypeBytes(t.dtype) != t.nbytes) {
      return Corrupt(path, absl::StrCat("tensor ", name, ": shape ", ShapeString(t.shape), " ",
                                        dtype, " needs ", t.numel() * DtypeBytes(t.dtype),
                                        " bytes but data_offsets span ", t.nbytes));
    }
    if (!tensors_.emplace(name, std::move(t)).second) {
      return Corrupt(path, absl::StrCat("tensor ", name, " appears twice in the checkpoint"));
    }
  }
  files_.push_back(std::move(file));
  return absl::OkStatus();
}

absl::StatusOr<const TensorRef*> SafetensorsCheckpoint::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(source_, ": missing tensor ", name));
  }
  return &it->second;
}

absl::Status CopyTensorToFloat(const TensorRef& t, const std::vector<int64_t>& expected_shape,
                               float* out) {
  if (t.shape != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        *t.file, ": tensor ", t.name, " has shape ", ShapeString(t.shape),
        " but config.json implies ", ShapeString(expected_shape)));
  }
  const int64_t n = t.numel();
  switch (t.dtype) {
    case WeightDtype::kFp32:
      std::memcpy(out, t.data, n * 4);
      break;
    case WeightDtype::kFp16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t.data + 2 * i, 2);
        out[i] = HalfToFloat(h);
      }
      break;
    case WeightDtype::kBf16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t.data + 2 * i, 2);
        out[i] = Bf16ToFloat(h);
      }
      break;
  }
  return absl::OkStatus();
}

}  // namespace strata
