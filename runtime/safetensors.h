// Safetensors reader (mmap). Validates the header against the file: known
// dtypes, shapes that match byte ranges, ranges inside the data section.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/mapped_file.h"
#include "runtime/model_config.h"

namespace strata {

struct TensorRef {
  std::string name;
  WeightDtype dtype = WeightDtype::kFp32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // points into a mapped file
  int64_t nbytes = 0;
  const std::string* file = nullptr;  // the file it lives in, for messages

  int64_t numel() const;
};

// A set of tensors from one safetensors file or a sharded checkpoint
// (model.safetensors.index.json). Owns the mappings.
class SafetensorsCheckpoint {
 public:
  // `path` is a .safetensors file or an index .json.
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& path);
  // Opens <dir>/model.safetensors.index.json or <dir>/model.safetensors.
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> OpenDirectory(
      const std::string& dir);

  // NOT_FOUND naming the checkpoint when absent.
  absl::StatusOr<const TensorRef*> Find(const std::string& name) const;
  bool Contains(const std::string& name) const { return tensors_.count(name) > 0; }
  const std::map<std::string, TensorRef>& tensors() const { return tensors_; }
  const std::string& source() const { return source_; }

 private:
  absl::Status AddFile(const std::string& path);

  std::string source_;
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::map<std::string, TensorRef> tensors_;
};

// Converts a tensor to fp32, checking its shape. Errors name tensor and file.
absl::Status CopyTensorToFloat(const TensorRef& t, const std::vector<int64_t>& expected_shape,
                               float* out);

}  // namespace strata
