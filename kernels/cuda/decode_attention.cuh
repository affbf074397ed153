// Paged decode attention (split-K / flash-decoding), templated on the KV
// format, head_dim and the number G of query heads sharing one kv head in a
// thread block. Included only by the decode_attention_*.cu instance files.
// This file: the CUDA-core kernel (fp32, fp16, bf16, and the 8/4-bit formats
// with blocks of < 16 tokens) and the launcher; the tensor-core kernel of the
// 8/4-bit formats is in decode_attention_mma.cuh.
//
// CUDA-core kernel: one thread block = (partition of the context, kv head,
// group of G query heads, sequence). Two passes over the partition, both
// streaming the cache with 4..32-byte vector loads, several tokens per thread
// in flight:
//   K pass  TPT threads per token, each holding the query values of its
//           dims for all G heads in registers; partial dot products are
//           combined by a "transposing" butterfly (each shuffle step halves
//           the number of heads a lane carries), logits go to shared memory;
//   softmax per head over the partition (max, exp2, sum) in shared memory;
//   V pass  the same thread/token mapping; each thread accumulates
//           p * v for its dims and all G heads, then a warp + block reduction.
// Scales and zero points are folded per token: logit = s * (q.k_raw - z * sum q),
// out = sum_t p_t s_t v_raw - sum_t p_t s_t z_t. Scores are in the log2 domain
// (q is pre-multiplied by softmax_scale * log2 e). With more than one
// partition the unnormalized output and (reference, sum) go to the workspace
// and a merge kernel (kv_cache_cuda.cu) combines them; the reference is the
// partition's max logit here, any finite value both are relative to in general.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cmath>

#include "kernels/cuda/attention_internal.h"
#include "kernels/cuda/kv_device.cuh"

namespace strata::cuda {
namespace detail {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;

constexpr int DecodeTpt(int g, int hd) {
  int t = 1;
  while (g * hd / t > 64 && t < 16) t *= 2;
  return t;
}
constexpr int ClampInt(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <KvDtype D, int HD, int G>
struct DecodeCfg {
  static constexpr int kTpt = DecodeTpt(G, HD);             // threads per token
  static constexpr int kNumChunks = HD / 8;                  // 8-element chunks per row
  static constexpr int kCpt = (kNumChunks + kTpt - 1) / kTpt;  // chunks per thread
  static constexpr bool kAllChunksValid = kNumChunks % kTpt == 0;
  static constexpr int kSlots = kDecodeThreads / kTpt;       // tokens in parallel
  static constexpr int kChunkBytes = ChunkTraits<D>::kBytes;
  static constexpr int kWords = ChunkTraits<D>::kWords;
  static constexpr int kUnroll = ClampInt(128 / (kCpt * kChunkBytes), 1, kCpt >= 4 ? 4 : 8);
  static constexpr int kTokensPerIter = kSlots * kUnroll;
  static constexpr int kRowBytes = HD * KvDtypeBits(D) / 8;
  static constexpr int kFinal = G > kTpt ? G / kTpt : 1;     // heads per lane after the butterfly
};

// Kernel parameters (trivially copyable, passed by value).
struct DecodeParams {
  KvCacheView cache;
  const int32_t* block_tables;
  const int32_t* context_lens;
  const int32_t* query_start;
  const float* query;
  float* out;
  float* part_out;
  float* part_ml;
  int32_t max_blocks_per_seq;
  int32_t num_heads;
  int32_t group;          // query heads per kv head
  int32_t groups_per_kv;  // group / G
  int32_t partition;
  int32_t max_splits;
  int32_t log2_bs;
  // CUDA-core kernel only (the tensor-core kernel's layout is MmaSmem):
  int32_t logit_cap;      // floats per head reserved for logits (>= roundup(partition, tokens/iter))
  int32_t region_floats;  // floats of the logits / reduction region
  float q_scale;          // softmax_scale * log2(e)
};

// Butterfly over the kTpt lanes of one token that halves the carried values
// each step while they number more than one, then sums.
template <int kCur, int kMask, int kTpt>
__device__ __forceinline__ void Butterfly(float* v, int j) {
  if constexpr (kMask < kTpt) {
    if constexpr (kCur > 1) {
      constexpr int h = kCur / 2;
      const bool upper = (j & kMask) != 0;
#pragma unroll
      for (int k = 0; k < h; ++k) {
        const float send = upper ? v[k] : v[k + h];
        const float keep = upper ? v[k + h] : v[k];
        v[k] = keep + __shfl_xor_sync(0xffffffffu, send, kMask);
      }
      Butterfly<h, kMask * 2, kTpt>(v, j);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], kMask);
      Butterfly<1, kMask * 2, kTpt>(v, j);
    }
  }
}

// Index of the head that v[0] holds after Butterfly<kCur, kMask, kTpt>.
template <int kCur, int kMask, int kTpt>
__device__ __forceinline__ int ButterflyHead(int j) {
  if constexpr (kMask < kTpt && kCur > 1) {
    return ((j & kMask) ? kCur / 2 : 0) + ButterflyHead<kCur / 2, kMask * 2, kTpt>(j);
  } else {
    return 0;
  }
}

template <KvDtype D, KvScaleMode M, int HD, int G>
__global__ void __launch_bounds__(kDecodeThreads, 4) DecodeKernel(const DecodeParams p) {
  using Cfg = DecodeCfg<D, HD, G>;
  constexpr int kTpt = Cfg::kTpt, kCpt = Cfg::kCpt, kU = Cfg::kUnroll, kW = Cfg::kWords;
  constexpr int kSlots = Cfg::kSlots, kTpi = Cfg::kTokensPerIter, kFinal = Cfg::kFinal;
  constexpr bool kScaled = M != KvScaleMode::kNone;
  constexpr bool kZero = KvDtypeIsInteger(D);

  extern __shared__ __align__(16) float smem[];
  float* logits = smem;  // [logit_cap][G], later the reduction area [warps][G][HD]
  int32_t* sblk = reinterpret_cast<int32_t*>(smem + p.region_floats);
  float* sml = smem + p.region_floats + (p.partition >> p.log2_bs) + 1;  // [2][G]

  const int split = blockIdx.x;
  const int seq = blockIdx.z;
  const int kvh = blockIdx.y / p.groups_per_kv;
  const int head0 = kvh * p.group + (blockIdx.y % p.groups_per_kv) * G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int j = tid % kTpt, slot = tid / kTpt;

  const int ctx = p.context_lens[seq];
  const int token = p.query_start[seq];
  const int nsplit = (ctx + p.partition - 1) / p.partition;
  if (ctx <= 0 || nsplit > p.max_splits) {
    if (split == 0) {
      float* o = p.out + (static_cast<int64_t>(token) * p.num_heads + head0) * HD;
      for (int i = tid; i < G * HD; i += kDecodeThreads) o[i] = ctx <= 0 ? 0.0f : NAN;
    }
    return;
  }
  if (split >= nsplit) return;
  const int start = split * p.partition;
  const int n = min(p.partition, ctx - start);  // tokens of this partition

  const int bs_mask = (1 << p.log2_bs) - 1;
  const int first_blk = start >> p.log2_bs;
  {
    const int nblk = ((start + n - 1) >> p.log2_bs) - first_blk + 1;
    const int32_t* table =
        p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq + first_blk;
    for (int i = tid; i < nblk; i += kDecodeThreads) sblk[i] = table[i];
  }

  // Query values of this thread's chunks, pre-scaled.
  float q[G][kCpt][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float* qp = p.query + (static_cast<int64_t>(token) * p.num_heads + head0 + g) * HD;
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
      const int chunk = j + c * kTpt;
      if (Cfg::kAllChunksValid || chunk < Cfg::kNumChunks) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(qp + chunk * 8));
        const float4 b = __ldg(reinterpret_cast<const float4*>(qp + chunk * 8) + 1);
        q[g][c][0] = a.x * p.q_scale; q[g][c][1] = a.y * p.q_scale;
        q[g][c][2] = a.z * p.q_scale; q[g][c][3] = a.w * p.q_scale;
        q[g][c][4] = b.x * p.q_scale; q[g][c][5] = b.y * p.q_scale;
        q[g][c][6] = b.z * p.q_scale; q[g][c][7] = b.w * p.q_scale;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) q[g][c][e] = 0.0f;
      }
    }
  }
  // Sum of q over all dims per head (zero-point folding), reduced the same way
  // as the dot products so that qsum[k] matches the head of part[k].
  float qsum[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
#pragma unroll
      for (int e = 0; e < 8; ++e) s += q[g][c][e];
    }
    qsum[g] = s;
  }
  if constexpr (kZero) Butterfly<G, 1, kTpt>(qsum, j);
  const int my_head = ButterflyHead<G, 1, kTpt>(j);
  const bool writer = j < G;

  const uint8_t* pool = p.cache.pool;
  const uint32_t block_bytes = p.cache.layout.block_bytes;
  const uint32_t head_row = static_cast<uint32_t>(kvh) << p.log2_bs;
  RowScaleReader<D, M> kscale, vscale;
  kscale.Init(p.cache.k_scale, p.cache.k_zero, kvh);
  vscale.Init(p.cache.v_scale, p.cache.v_zero, kvh);
  __syncthreads();  // sblk

  // Loads kU tokens' chunks (and per-token scale/zero) of K or V.
  auto load = [&](int t0, uint32_t data_off, uint32_t scale_off, uint32_t zero_off,
                  const RowScaleReader<D, M>& sr, uint32_t (&raw)[kU][kCpt][kW], float (&ts)[kU],
                  float (&tz)[kU]) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int t = min(t0 + u * kSlots + slot, n - 1) + start;
      const int32_t b = sblk[(t >> p.log2_bs) - first_blk];
      const uint32_t idx = head_row + (t & bs_mask);
      const uint8_t* blk = pool + static_cast<int64_t>(b) * block_bytes;
      const uint8_t* row = blk + data_off + idx * Cfg::kRowBytes;
#pragma unroll
      for (int c = 0; c < kCpt; ++c) {
        const int chunk = j + c * kTpt;
        if (Cfg::kAllChunksValid || chunk < Cfg::kNumChunks) {
          LoadChunk<Cfg::kChunkBytes>(row + chunk * Cfg::kChunkBytes, raw[u][c]);
        }
      }
      sr.Read(blk, scale_off, zero_off, idx, &ts[u], &tz[u]);
    }
  };

  const KvBlockLayout& lay = p.cache.layout;
  // ---- K pass: logits -------------------------------------------------------
  for (int t0 = 0; t0 < n; t0 += kTpi) {
    uint32_t raw[kU][kCpt][kW];
    float ts[kU], tz[kU];
    load(t0, lay.k_data, lay.k_scale, lay.k_zero, kscale, raw, ts, tz);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float part[G];
#pragma unroll
      for (int g = 0; g < G; ++g) part[g] = 0.0f;
#pragma unroll
      for (int c = 0; c < kCpt; ++c) {
        if (Cfg::kAllChunksValid || j + c * kTpt < Cfg::kNumChunks) {
          float x[8];
          DecodeChunk<D>(raw[u][c], x);
#pragma unroll
          for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int e = 0; e < 8; ++e) part[g] = fmaf(q[g][c][e], x[e], part[g]);
          }
        }
      }
      Butterfly<G, 1, kTpt>(part, j);
      const int t = t0 + u * kSlots + slot;
      if (writer) {
#pragma unroll
        for (int k = 0; k < kFinal; ++k) {
          float lg = part[k];
          if constexpr (kZero) lg = fmaf(-tz[u], qsum[k], lg);
          if constexpr (kScaled) lg *= ts[u];
          logits[t * G + my_head + k] = t < n ? lg : -INFINITY;
        }
      }
    }
  }
  __syncthreads();

  // ---- softmax over the partition -------------------------------------------
  const int npad = (n + kTpi - 1) / kTpi * kTpi;
  for (int g = warp; g < G; g += kDecodeWarps) {
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, logits[t * G + g]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.0f;
    for (int t = lane; t < npad; t += 32) {
      const float e = t < n ? exp2f(logits[t * G + g] - m) : 0.0f;
      logits[t * G + g] = e;
      sum += e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) {
      sml[g] = m;
      sml[G + g] = sum;
    }
  }
  __syncthreads();

  // ---- V pass -----------------------------------------------------------------
  float acc[G][kCpt][8];
  float corr[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    corr[g] = 0.0f;
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][c][e] = 0.0f;
    }
  }
  for (int t0 = 0; t0 < n; t0 += kTpi) {
    uint32_t raw[kU][kCpt][kW];
    float ts[kU], tz[kU];
    load(t0, lay.v_data, lay.v_scale, lay.v_zero, vscale, raw, ts, tz);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int t = t0 + u * kSlots + slot;  // < npad: its weight is 0 when t >= n
      float w[G];
      if constexpr (G % 4 == 0) {
#pragma unroll
        for (int g = 0; g < G; g += 4) {
          const float4 v4 = *reinterpret_cast<const float4*>(&logits[t * G + g]);
          w[g] = v4.x; w[g + 1] = v4.y; w[g + 2] = v4.z; w[g + 3] = v4.w;
        }
      } else {
#pragma unroll
        for (int g = 0; g < G; ++g) w[g] = logits[t * G + g];
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if constexpr (kScaled) w[g] *= ts[u];
        if constexpr (kZero) corr[g] = fmaf(w[g], tz[u], corr[g]);
      }
#pragma unroll
      for (int c = 0; c < kCpt; ++c) {
        if (Cfg::kAllChunksValid || j + c * kTpt < Cfg::kNumChunks) {
          float x[8];
          DecodeChunk<D>(raw[u][c], x);
#pragma unroll
          for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][c][e] = fmaf(w[g], x[e], acc[g][c][e]);
          }
        }
      }
    }
  }
  // Reduce over the token slots: lanes of a warp, then warps through smem.
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float v = acc[g][c][e];
        if constexpr (kZero) v -= corr[g];
#pragma unroll
        for (int o = kTpt; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        acc[g][c][e] = v;
      }
    }
  }
  __syncthreads();  // logits are dead: reuse the region
  float* red = smem;  // [warps][G][HD]
  if (lane < kTpt) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int c = 0; c < kCpt; ++c) {
        const int chunk = j + c * kTpt;
        if (Cfg::kAllChunksValid || chunk < Cfg::kNumChunks) {
#pragma unroll
          for (int e = 0; e < 8; ++e) red[(warp * G + g) * HD + chunk * 8 + e] = acc[g][c][e];
        }
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < G * HD; i += kDecodeThreads) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) v += red[w * G * HD + i];
    const int g = i / HD, d = i % HD;
    if (nsplit == 1) {
      p.out[(static_cast<int64_t>(token) * p.num_heads + head0 + g) * HD + d] = v / sml[G + g];
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * p.num_heads + head0 + g) * p.max_splits + split;
      p.part_out[part * HD + d] = v;
      if (d == 0) {
        p.part_ml[part * 2] = sml[g];
        p.part_ml[part * 2 + 1] = sml[G + g];
      }
    }
  }
}

}  // namespace detail
}  // namespace strata::cuda

#include "kernels/cuda/decode_attention_mma.cuh"

namespace strata::cuda {
namespace detail {

template <KvDtype D, KvScaleMode M, int HD, int G>
cudaError_t LaunchDecode(const DecodeLaunch& l, cudaStream_t stream) {
  using Cfg = DecodeCfg<D, HD, G>;
  const AttentionArgs& a = l.args;
  const int bs = a.cache.layout.block_size;
  const int group = a.num_heads / a.cache.layout.num_kv_heads;
  DecodeParams p;
  p.cache = a.cache;
  p.block_tables = a.batch.block_tables;
  p.context_lens = a.batch.context_lens;
  p.query_start = a.batch.query_start;
  p.query = a.query;
  p.out = a.out;
  p.part_out = l.part_out;
  p.part_ml = l.part_ml;
  p.max_blocks_per_seq = a.batch.max_blocks_per_seq;
  p.num_heads = a.num_heads;
  p.group = group;
  p.groups_per_kv = group / G;
  p.partition = l.plan.partition_size;
  p.max_splits = l.plan.max_splits;
  p.log2_bs = Log2Int(bs);
  constexpr int kTpi = Cfg::kTokensPerIter;
  p.logit_cap = (p.partition + kTpi - 1) / kTpi * kTpi;
  p.region_floats = p.logit_cap * G > kDecodeWarps * G * HD ? p.logit_cap * G : kDecodeWarps * G * HD;
  p.q_scale = a.softmax_scale * kLog2e;
  const int blk_ints = (p.partition >> p.log2_bs) + 1;
  const dim3 grid(l.plan.max_splits, a.cache.layout.num_kv_heads * p.groups_per_kv,
                  a.batch.num_seqs);
  if constexpr (kMmaDecode<D, HD>) {
    // 8-bit / 4-bit formats and fp16 / bf16 at head_dim 128 run on tensor
    // cores when a 16-token tile lies in one block.
    if (bs >= 16) {
      using Smem = MmaSmem<MmaCfg<D, M, HD>, G, HD>;
      // 4 thread blocks per SM (the launch bounds) at the largest partition.
      // A partition starts at a block boundary: it spans partition / block_size blocks.
      static_assert(Smem::Bytes(kMaxPartitionMma / 16) <= 56 * 1024);
      const int smem = Smem::Bytes(p.partition >> p.log2_bs);
      static KernelAttrCache attrs;
      auto kernel = DecodeMmaKernel<D, M, HD, G>;
      cudaError_t err = EnsureDynamicSmem(reinterpret_cast<const void*>(kernel), smem, &attrs);
      if (err != cudaSuccess) return err;
      // 4 blocks of ~40-54 KB per SM need (nearly) the whole carveout; a hint, set once per device.
      err = EnsureMaxSharedCarveout(reinterpret_cast<const void*>(kernel), &attrs);
      if (err != cudaSuccess) return err;
      kernel<<<grid, kMmaThreads, smem, stream>>>(p);
      return cudaGetLastError();
    }
  }
  const int smem = (p.region_floats + blk_ints + 2 * G) * 4;  // + [2][G] stats
  static KernelAttrCache attrs;
  auto kernel = DecodeKernel<D, M, HD, G>;
  cudaError_t err = EnsureDynamicSmem(reinterpret_cast<const void*>(kernel), smem, &attrs);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kDecodeThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail

template <KvDtype D, KvScaleMode M, int HD>
cudaError_t DecodeOp::Run(const DecodeLaunch& l, cudaStream_t stream) {
  const int group = l.args.num_heads / l.args.cache.layout.num_kv_heads;
  switch (HeadTile(group)) {
    case 8: return detail::LaunchDecode<D, M, HD, 8>(l, stream);
    case 4: return detail::LaunchDecode<D, M, HD, 4>(l, stream);
    case 2: return detail::LaunchDecode<D, M, HD, 2>(l, stream);
    default: return detail::LaunchDecode<D, M, HD, 1>(l, stream);
  }
}

}  // namespace strata::cuda
