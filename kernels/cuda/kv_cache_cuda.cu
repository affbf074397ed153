// Public launchers of kernels/cuda/kv_cache_cuda.h that are not per-format
// instances: argument checks, decode planning, the split-K merge, block copy
// and swap.
#include "kernels/cuda/kv_cache_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "kernels/cuda/attention_internal.h"
#include "kernels/cuda/kv_dispatch.h"

namespace strata::cuda {
namespace {

// Combines the partitions of each (sequence, head) with more than one.
//   grid (num_heads, num_seqs), block 128.
__global__ void DecodeMergeKernel(const int32_t* context_lens, const int32_t* query_start,
                                  const float* part_out, const float* part_ml, float* out,
                                  int32_t num_heads, int32_t head_dim, int32_t partition,
                                  int32_t max_splits) {
  const int h = blockIdx.x, seq = blockIdx.y;
  const int ctx = context_lens[seq];
  const int nsplit = (ctx + partition - 1) / partition;
  if (nsplit <= 1 || nsplit > max_splits) return;  // written by the decode kernel
  const int64_t base = (static_cast<int64_t>(seq) * num_heads + h) * max_splits;
  float m = -INFINITY;
  for (int i = 0; i < nsplit; ++i) m = fmaxf(m, part_ml[(base + i) * 2]);
  float l = 0.0f;
  for (int i = 0; i < nsplit; ++i) l += part_ml[(base + i) * 2 + 1] * exp2f(part_ml[(base + i) * 2] - m);
  const float inv = 1.0f / l;
  float* o = out + (static_cast<int64_t>(query_start[seq]) * num_heads + h) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int i = 0; i < nsplit; ++i) {
      acc += part_out[(base + i) * head_dim + d] * exp2f(part_ml[(base + i) * 2] - m);
    }
    o[d] = acc * inv;
  }
}

// One thread block per (pair, slice of the block); 16-byte vectors.
__global__ void CopyBlocksKernel(uint8_t* pool, int32_t num_blocks, uint32_t block_bytes,
                                 const int32_t* src, const int32_t* dst) {
  const int32_t s = src[blockIdx.x], d = dst[blockIdx.x];
  if (s < 0 || s >= num_blocks || d < 0 || d >= num_blocks || s == d) return;
  const uint4* from = reinterpret_cast<const uint4*>(pool + static_cast<int64_t>(s) * block_bytes);
  uint4* to = reinterpret_cast<uint4*>(pool + static_cast<int64_t>(d) * block_bytes);
  const uint32_t n = block_bytes / 16;
  for (uint32_t i = blockIdx.y * blockDim.x + threadIdx.x; i < n; i += gridDim.y * blockDim.x) {
    to[i] = from[i];
  }
}

bool ValidAttention(const AttentionArgs& a) {
  const KvBlockLayout& l = a.cache.layout;
  return a.cache.pool != nullptr && a.query != nullptr && a.out != nullptr &&
         l.num_kv_heads > 0 && a.num_heads > 0 && a.num_heads % l.num_kv_heads == 0 &&
         l.block_size > 0 && (l.block_size & (l.block_size - 1)) == 0 && a.batch.num_seqs >= 0 &&
         (a.batch.num_seqs == 0 || (a.batch.block_tables && a.batch.context_lens &&
                                    a.batch.query_start)) &&
         std::isfinite(a.softmax_scale);
}

}  // namespace

namespace {
cudaError_t CurrentDevice(int* dev) {
  const cudaError_t err = cudaGetDevice(dev);
  if (err != cudaSuccess) return err;
  return *dev >= 0 && *dev < kMaxAttrDevices ? cudaSuccess : cudaErrorInvalidDevice;
}
}  // namespace

cudaError_t EnsureDynamicSmem(const void* kernel, int bytes, KernelAttrCache* cache) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t err = CurrentDevice(&dev);
  if (err != cudaSuccess) return err;
  std::atomic<int>& max_set = cache->max_smem[dev];
  if (bytes <= max_set.load(std::memory_order_relaxed)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  int cur = max_set.load(std::memory_order_relaxed);
  while (cur < bytes && !max_set.compare_exchange_weak(cur, bytes)) {
  }
  return cudaSuccess;
}

cudaError_t EnsureMaxSharedCarveout(const void* kernel, KernelAttrCache* cache) {
  int dev = 0;
  cudaError_t err = CurrentDevice(&dev);
  if (err != cudaSuccess) return err;
  if (cache->carveout[dev].load(std::memory_order_relaxed)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  cache->carveout[dev].store(true, std::memory_order_relaxed);
  return cudaSuccess;
}

namespace {
struct SupportedOp {
  template <KvDtype D, KvScaleMode M, int HD>
  static cudaError_t Run() {
    return cudaSuccess;
  }
};
}  // namespace

cudaError_t KernelSupported(const KernelDesc& desc) { return Dispatch<SupportedOp>(desc); }

namespace {
struct MmaDecodeOp {
  template <KvDtype D, KvScaleMode M, int HD>
  static cudaError_t Run() {
    return kMmaDecode<D, HD> ? cudaSuccess : cudaErrorNotSupported;
  }
};

// Whether decode runs on the tensor-core kernel: the format and head dim
// LaunchDecode sends there (kMmaDecode), and a 16-token tile inside one block.
bool MmaDecode(const KvCacheView& cache) {
  const KernelDesc desc{cache.layout.format.dtype, cache.layout.format.scale_mode,
                        cache.layout.head_dim};
  return cache.layout.block_size >= 16 && Dispatch<MmaDecodeOp>(desc) == cudaSuccess;
}
}  // namespace

int32_t MaxDecodePartition(const KvCacheView& cache) {
  return MmaDecode(cache) ? kMaxPartitionMma : kMaxPartition;
}

DecodePlan PlanDecodeWithPartition(const KvCacheView& cache, int32_t num_seqs, int32_t num_heads,
                                   int32_t max_context_len, int32_t partition_size) {
  DecodePlan plan;
  plan.partition_size = partition_size;
  plan.max_context_len = std::max(max_context_len, 1);
  plan.max_splits = (plan.max_context_len + partition_size - 1) / partition_size;
  if (plan.max_splits > 1) {
    const int64_t parts = int64_t{num_seqs} * num_heads * plan.max_splits;
    plan.workspace_bytes = parts * (cache.layout.head_dim + 2) * int64_t{sizeof(float)};
  }
  return plan;
}

DecodePlan PlanDecode(const KvCacheView& cache, int32_t num_seqs, int32_t num_heads,
                      int32_t max_context_len, int32_t num_sms) {
  const int group = cache.layout.num_kv_heads > 0 ? num_heads / cache.layout.num_kv_heads : 1;
  const int64_t base_ctas = std::max<int64_t>(1, int64_t{num_seqs} * num_heads / HeadTile(std::max(group, 1)));
  // CUDA-core kernel: aim at >= 2 thread blocks per SM in total: long
  // partitions amortize the per-block setup and the merge (measured on H200,
  // batch 64 x 8 kv heads: P = 2048 best at 4K context, P = 512 / one split
  // best at 512); partitions of 256..2048 tokens.
  int64_t want_splits = (int64_t{num_sms} * 2 + base_ctas - 1) / base_ctas;
  if (MmaDecode(cache)) {
    // Tensor-core kernel (up to 4096-token partitions, 4 thread blocks per
    // SM): a split costs the merge kernel and the partials, which a kernel of
    // a few tens of microseconds does not earn back, so one split unless the
    // blocks would not fill half the SMs (then a power of two of splits,
    // about one block per SM; none for contexts <= 512); past one wave of
    // slots, the split count (1, 2 or 4, partitions >= 512) that fills the
    // last wave best.
    // Measured on an H100 over batch 16-256 x context 512-8192 x (40/40, 10/10,
    // 32/8, 8/2 heads) (bench/results/decode_plan_2026-11-27_h100.md): e.g.
    // 16 x 512, 8 kv heads 19.6 -> 14.2 us; 64 x 4096, 10 heads 272 -> 250 us.
    const int64_t slots = int64_t{num_sms} * kMmaBlocksPerSm;
    if (base_ctas <= slots) {
      want_splits = 1;
      if (base_ctas * 2 < num_sms && max_context_len > 512) {
        while (want_splits * 2 * base_ctas <= num_sms + base_ctas - 1) want_splits *= 2;
      }
    } else {
      auto fill = [&](int64_t s) {  // fraction of the last wave's slots in use
        const int64_t ctas = base_ctas * s;
        return double(ctas) / double((ctas + slots - 1) / slots * slots);
      };
      want_splits = 1;
      for (int64_t s : {2, 4}) {
        if (int64_t{max_context_len} / s >= 512 && fill(s) > fill(want_splits) + 0.05) want_splits = s;
      }
    }
  }
  int64_t part = (max_context_len + want_splits - 1) / std::max<int64_t>(want_splits, 1);
  part = (part + 255) / 256 * 256;
  part = std::clamp<int64_t>(part, 256, MaxDecodePartition(cache));
  const int bs = cache.layout.block_size;
  part = (part + bs - 1) / bs * bs;  // block sizes above 256: partitions of whole blocks
  return PlanDecodeWithPartition(cache, num_seqs, num_heads, max_context_len,
                                 static_cast<int32_t>(part));
}

cudaError_t PagedDecodeAttention(AttentionArgs args, DecodePlan plan, void* workspace,
                                 cudaStream_t stream) {
  if (!ValidAttention(args)) return cudaErrorInvalidValue;
  const int bs = args.cache.layout.block_size;
  if (plan.partition_size <= 0 || plan.partition_size > MaxDecodePartition(args.cache) ||
      plan.partition_size % bs != 0 || plan.max_splits <= 0 ||
      int64_t{plan.max_splits} * plan.partition_size < plan.max_context_len) {
    return cudaErrorInvalidValue;
  }
  if (args.batch.num_seqs == 0) return cudaSuccess;
  DecodeLaunch l;
  l.args = args;
  l.plan = plan;
  if (plan.max_splits > 1) {
    const int64_t parts = int64_t{args.batch.num_seqs} * args.num_heads * plan.max_splits;
    const int64_t need = parts * (args.cache.layout.head_dim + 2) * int64_t{sizeof(float)};
    if (workspace == nullptr || plan.workspace_bytes < need) return cudaErrorInvalidValue;
    l.part_out = static_cast<float*>(workspace);
    l.part_ml = l.part_out + parts * args.cache.layout.head_dim;
  }
  cudaError_t err = Dispatch<DecodeOp>(DescOf(args.cache), l, stream);
  if (err != cudaSuccess || plan.max_splits == 1) return err;
  const dim3 grid(args.num_heads, args.batch.num_seqs);
  DecodeMergeKernel<<<grid, 128, 0, stream>>>(args.batch.context_lens, args.batch.query_start,
                                              l.part_out, l.part_ml, args.out, args.num_heads,
                                              args.cache.layout.head_dim, plan.partition_size,
                                              plan.max_splits);
  return cudaGetLastError();
}

cudaError_t PagedPrefillAttention(AttentionArgs args, int32_t max_new_tokens,
                                  cudaStream_t stream) {
  if (!ValidAttention(args) || max_new_tokens < 0) return cudaErrorInvalidValue;
  if (args.seq_index != nullptr &&
      (args.num_indexed_seqs < 0 || args.num_indexed_seqs > args.batch.num_seqs)) {
    return cudaErrorInvalidValue;
  }
  const int32_t launched = args.seq_index != nullptr ? args.num_indexed_seqs : args.batch.num_seqs;
  if (launched == 0 || max_new_tokens == 0) return cudaSuccess;
  return Dispatch<PrefillOp>(DescOf(args.cache), args, max_new_tokens, stream);
}

cudaError_t CopyBlocks(KvCacheView cache, const int32_t* src, const int32_t* dst, int32_t n,
                       cudaStream_t stream) {
  if (n < 0 || (n > 0 && (!src || !dst || !cache.pool))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const uint32_t vecs = cache.layout.block_bytes / 16;
  const unsigned slices = std::max(1u, std::min(8u, vecs / (256u * 8u)));
  CopyBlocksKernel<<<dim3(n, slices), 256, 0, stream>>>(cache.pool, cache.num_blocks,
                                                        cache.layout.block_bytes, src, dst);
  return cudaGetLastError();
}

cudaError_t SwapBlocks(KvCacheView device_cache, uint8_t* host_pool, int32_t host_num_blocks,
                       const int32_t* src, const int32_t* dst, int32_t n, SwapDirection dir,
                       cudaStream_t stream) {
  if (n < 0 || (n > 0 && (!src || !dst || !host_pool || !device_cache.pool))) {
    return cudaErrorInvalidValue;
  }
  const bool to_host = dir == SwapDirection::kDeviceToHost;
  const int32_t src_blocks = to_host ? device_cache.num_blocks : host_num_blocks;
  const int32_t dst_blocks = to_host ? host_num_blocks : device_cache.num_blocks;
  for (int32_t i = 0; i < n; ++i) {
    if (src[i] < 0 || src[i] >= src_blocks || dst[i] < 0 || dst[i] >= dst_blocks) {
      return cudaErrorInvalidValue;
    }
  }
  if (n == 0) return cudaSuccess;
  uint8_t* src_pool = to_host ? device_cache.pool : host_pool;
  uint8_t* dst_pool = to_host ? host_pool : device_cache.pool;
  const size_t bb = device_cache.layout.block_bytes;
  // Merge runs of consecutive ids into single copies.
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  for (int32_t i = 0; i < n;) {
    int32_t k = i + 1;
    while (k < n && src[k] == src[k - 1] + 1 && dst[k] == dst[k - 1] + 1) ++k;
    srcs.push_back(src_pool + static_cast<size_t>(src[i]) * bb);
    dsts.push_back(dst_pool + static_cast<size_t>(dst[i]) * bb);
    sizes.push_back(static_cast<size_t>(k - i) * bb);
    i = k;
  }
  const cudaMemcpyKind kind = to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
  if (stream == nullptr || stream == cudaStreamLegacy) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      const cudaError_t err = cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], kind, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  cudaMemcpyAttributes attr = {};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  size_t attr_idx = 0;
  return cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(), &attr,
                              &attr_idx, 1, stream);
}

}  // namespace strata::cuda
