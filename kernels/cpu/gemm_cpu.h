// Weight-streaming GEMM for the CPU engine: y = x w^T with the weights packed
// once, at load, in fp32 or fp16, and read once per call for all rows of x.
//
// Why not OpenBLAS: sgemm repacks the whole weight matrix on every call,
// which dominated decode steps of a few to a few dozen rows; and it has no
// fp16 weights. Here the packed layout is the one the kernel streams, so a
// call reads each weight byte from memory once (then from L2 for further
// rows), and fp16 weights halve those bytes.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <memory>

#include "runtime/model_config.h"  // WeightDtype

namespace strata::cpu {

// Memory for large buffers streamed every step (packed weights, KV pools):
// 64-byte aligned, and from `bytes` >= 2 MiB on 2 MiB-aligned with Linux
// transparent huge pages requested (madvise), which spares the page walks of
// streaming tens of MB through 4 KiB pages. Free with std::free. nullptr when
// out of memory.
uint8_t* AllocLargeBuffer(size_t bytes);

// A weight matrix w [n][k] (nn.Linear layout: n outputs, k inputs), packed in
// panels of kPanel output rows. Panel p holds rows [16p, 16p+16) k-major:
// element (row 16p + j, column c) is at panel p, offset c * 16 + j, so one
// 16-lane vector holds one input column of 16 outputs. The last panel is
// zero-padded. Elements are fp32, or IEEE fp16 rounded to nearest even.
//
// A paired matrix (PackPairs) interleaves two matrices of the same shape
// (gate and up): panel 2p is gate's panel p and panel 2p+1 is up's, so one
// pass produces both halves of SwiGLU for the same outputs.
class PackedWeights {
 public:
  static constexpr int kPanel = 16;

  PackedWeights() = default;
  // The rows of `parts` stacked ([part0 rows; part1 rows; ...], each
  // [rows_i][k]) as one matrix. dtype: kFp32 or kFp16 (kBf16 is a bug).
  struct Part {
    const float* w;
    int64_t rows;
  };
  static PackedWeights Pack(std::initializer_list<Part> parts, int64_t k, WeightDtype dtype);
  static PackedWeights Pack(const float* w, int64_t n, int64_t k, WeightDtype dtype) {
    return Pack({{w, n}}, k, dtype);
  }
  // gate and up: [n][k] each.
  static PackedWeights PackPairs(const float* gate, const float* up, int64_t n, int64_t k,
                                 WeightDtype dtype);

  int64_t n() const { return n_; }  // outputs (of one matrix of a pair)
  int64_t k() const { return k_; }
  WeightDtype dtype() const { return dtype_; }
  bool paired() const { return paired_; }
  int64_t num_panels() const { return panels_; }  // including both halves of pairs
  int64_t bytes() const { return panels_ * panel_bytes(); }
  int64_t panel_bytes() const { return k_ * kPanel * (dtype_ == WeightDtype::kFp16 ? 2 : 4); }
  const uint8_t* panel(int64_t p) const { return data_.get() + p * panel_bytes(); }
  bool empty() const { return data_ == nullptr; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  void Allocate(int64_t panels, int64_t k, WeightDtype dtype);
  void StoreRow(int64_t panel, int lane, const float* row);

  int64_t n_ = 0, k_ = 0, panels_ = 0;
  WeightDtype dtype_ = WeightDtype::kFp32;
  bool paired_ = false;
  std::unique_ptr<uint8_t[], Free> data_;
};

enum class Epilogue : uint8_t {
  kStore,       // y = x w^T
  kAccumulate,  // y += x w^T
  kSiluMul,     // paired w: y = silu(x gate^T) * (x up^T)
};

// x [m][k] row-major, y [m][w.n()] row-major. OpenMP over output panels (one
// parallel region per call, none for small products).
//
// Numerics: every output is one fp32 fused-multiply-add chain over k in
// increasing order (fp16 weights converted exactly), then the epilogue. A
// row's result therefore does not depend on m, on the other rows or on the
// thread count: the engine's outputs are batch invariant.
void PackedLinear(const float* x, const PackedWeights& w, float* y, int64_t m, Epilogue ep);

// Which code runs. kAuto: AVX-512 (with F16C/FMA) where the CPU has it
// (checked at run time), else portable C++. Tests force each.
enum class GemmIsa : uint8_t { kAuto, kPortable, kAvx512 };
void PackedLinear(const float* x, const PackedWeights& w, float* y, int64_t m, Epilogue ep,
                  GemmIsa isa);
bool CpuHasAvx512();  // AVX-512F + FMA + F16C

}  // namespace strata::cpu
