// Internal declarations shared by the kernel instance translation units and
// the public launchers (kv_cache_cuda.cu). Not part of the API.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>

#include "kernels/cuda/kv_cache_cuda.h"

namespace strata::cuda {

// Query heads of one kv head handled by one thread block: the largest of
// {8, 4, 2, 1} dividing the GQA group size.
inline int HeadTile(int group) {
  for (int g : {8, 4, 2}) {
    if (group % g == 0) return g;
  }
  return 1;
}

// The formats and head dims the tensor-core decode kernel runs (with
// block_size >= 16): every 8-bit and 4-bit format, and fp16 / bf16 at
// head_dim 128 (256-byte rows; other 16-bit head dims and fp32 stay on the
// CUDA-core kernel). LaunchDecode dispatches on it; MaxDecodePartition and
// PlanDecode read it through Dispatch.
template <KvDtype D, int HD>
constexpr bool kMmaDecode = D == KvDtype::kFp8E4M3 || D == KvDtype::kFp8E5M2 ||
                            D == KvDtype::kInt8 || D == KvDtype::kInt4 ||
                            ((D == KvDtype::kFp16 || D == KvDtype::kBf16) && HD == 128);

// Thread blocks per SM of the tensor-core decode kernel (its launch bounds;
// PlanDecode sizes its waves by it).
constexpr int kMmaBlocksPerSm = 4;

struct DecodeLaunch {
  AttentionArgs args;
  DecodePlan plan;
  float* part_out = nullptr;  // [num_seqs][num_heads][max_splits][head_dim]
  float* part_ml = nullptr;   // [num_seqs][num_heads][max_splits][2]: max (log2 domain), sum
};

struct DecodeOp {
  template <KvDtype D, KvScaleMode M, int HD>
  static cudaError_t Run(const DecodeLaunch& launch, cudaStream_t stream);
};

struct PrefillOp {
  template <KvDtype D, KvScaleMode M, int HD>
  static cudaError_t Run(const AttentionArgs& args, int32_t max_new_tokens, cudaStream_t stream);
};

struct WriteOp {
  template <KvDtype D, KvScaleMode M, int HD>
  static cudaError_t Run(const KvCacheView& cache, const float* key, const float* value,
                         const int64_t* slot_mapping, int32_t num_tokens, cudaStream_t stream);
};

// Function attributes belong to a device's context: one process driving
// several GPUs (a tensor-parallel benchmark, tests) sets them once per device.
inline constexpr int kMaxAttrDevices = 64;
struct KernelAttrCache {
  std::atomic<int> max_smem[kMaxAttrDevices] = {};      // largest dynamic smem limit set
  std::atomic<bool> carveout[kMaxAttrDevices] = {};     // preferred carveout set
};

// Raises a kernel's dynamic shared memory limit on the current device when
// `bytes` needs it (> 48 KiB). `cache` remembers what was set, per device.
cudaError_t EnsureDynamicSmem(const void* kernel, int bytes, KernelAttrCache* cache);
// Sets the preferred shared-memory carveout to the maximum, once per device.
cudaError_t EnsureMaxSharedCarveout(const void* kernel, KernelAttrCache* cache);

constexpr float kLog2e = 1.4426950408889634f;

inline int Log2Int(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

}  // namespace strata::cuda
