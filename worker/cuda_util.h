// CUDA / cuBLAS error handling for the GPU engine: every call's result becomes
// an absl::Status (never a silent wrong answer), plus small RAII owners.
//
// Status codes: RESOURCE_EXHAUSTED for cudaErrorMemoryAllocation (retry with
// less, or after freeing), INVALID_ARGUMENT for cudaErrorInvalidValue and
// UNIMPLEMENTED for cudaErrorNotSupported (permanent for the given inputs),
// INTERNAL for everything else (a sticky device error poisons the context:
// the worker must mark itself unhealthy).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace strata {

inline absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  switch (e) {
    case cudaErrorMemoryAllocation: return absl::ResourceExhaustedError(msg);
    case cudaErrorInvalidValue: return absl::InvalidArgumentError(msg);
    case cudaErrorNotSupported: return absl::UnimplementedError(msg);
    default: return absl::InternalError(msg);
  }
}

inline absl::Status CublasStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ")");
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(msg);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED) return absl::UnimplementedError(msg);
  return absl::InternalError(msg);
}

}  // namespace strata

#define STRATA_CUDA_STR_(x) #x
#define STRATA_CUDA_XSTR_(x) STRATA_CUDA_STR_(x)
#define STRATA_CUDA_WHERE_ __FILE__ ":" STRATA_CUDA_XSTR_(__LINE__)

// Returns the call's error as a Status from the enclosing function.
#define CUDA_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                               \
    const cudaError_t strata_cuda_err_ = (expr);                                     \
    if (strata_cuda_err_ != cudaSuccess)                                             \
      return ::strata::CudaStatus(strata_cuda_err_, #expr " at " STRATA_CUDA_WHERE_); \
  } while (0)

#define CUBLAS_RETURN_IF_ERROR(expr)                                                  \
  do {                                                                                \
    const cublasStatus_t strata_cublas_st_ = (expr);                                  \
    if (strata_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                   \
      return ::strata::CublasStatus(strata_cublas_st_, #expr " at " STRATA_CUDA_WHERE_); \
  } while (0)

namespace strata {

// Owns one cudaMalloc'd allocation (or pinned host memory with kHost).
class DeviceBuffer {
 public:
  enum Kind { kDevice, kHost };
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    std::swap(kind_, o.kind_);
    return *this;
  }
  ~DeviceBuffer() { Reset(); }

  absl::Status Allocate(size_t bytes, Kind kind = kDevice) {
    Reset();
    kind_ = kind;
    if (bytes == 0) return absl::OkStatus();
    if (kind == kDevice) {
      CUDA_RETURN_IF_ERROR(cudaMalloc(&p_, bytes));
    } else {
      CUDA_RETURN_IF_ERROR(cudaHostAlloc(&p_, bytes, cudaHostAllocDefault));
    }
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void Reset() {
    if (p_) (kind_ == kDevice ? (void)cudaFree(p_) : (void)cudaFreeHost(p_));
    p_ = nullptr;
    bytes_ = 0;
  }
  template <class T = void>
  T* get() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
  Kind kind_ = kDevice;
};

// Bump allocator over one device allocation: the activation arena. Carving
// happens once at start-up; addresses stay fixed (CUDA graphs capture them).
class Arena {
 public:
  static constexpr size_t kAlign = 256;
  // First pass (base null) only measures; second pass hands out addresses.
  explicit Arena(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* Take(size_t count) {
    used_ = (used_ + kAlign - 1) / kAlign * kAlign;
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += count * sizeof(T);
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

}  // namespace strata
