// Prefill / chunked-prefill attention over the paged, quantized cache.
// Included only by the prefill_attention_*.cu instance files.
//
// fp32 caches (and head dims not a multiple of 16): a simple tiled
// flash-attention on CUDA cores (the other formats use the tensor-core kernel
// of prefill_attention_mma.cuh). One thread block = (tile of query rows, kv
// head, sequence); its 64 query rows are
// (token, head) pairs of up to 64 / Gs tokens and Gs query heads of one kv head.
// For each tile of 32 cached positions, K and V are dequantized into shared
// memory (exactly qmath::KvCodec::Decode's values), scores are computed with a
// causal mask (position <= the row's position), and an online softmax
// (running max / sum, log2 domain) updates the fp32 accumulators.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cmath>

#include "kernels/cuda/attention_internal.h"
#include "kernels/cuda/kv_device.cuh"

namespace strata::cuda {
namespace detail {

constexpr int kPfThreads = 128;
constexpr int kPfRows = 64;  // query rows per block
constexpr int kPfKt = 32;    // cached positions per tile

struct PrefillParams {
  KvCacheView cache;
  const int32_t* block_tables;
  const int32_t* context_lens;
  const int32_t* query_start;
  const float* query;
  float* out;
  int32_t max_blocks_per_seq;
  int32_t num_heads;
  int32_t group;          // query heads per kv head
  int32_t heads_per_cta;  // Gs
  int32_t groups_per_kv;  // group / Gs
  int32_t tokens_per_cta; // kPfRows / Gs
  int32_t log2_bs;
  float q_scale;          // softmax_scale * log2(e)
  bool skip_single;       // sequences with one new token are left to the decode kernel
  const int32_t* seq_index;  // blockIdx.z -> sequence (null: the identity)
};

template <int HD>
struct PrefillSmem {
  static constexpr int kStride = HD + 4;  // padded rows (16 bytes)
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kPfRows * kStride;
  static constexpr int kV = kK + kPfKt * kStride;
  static constexpr int kS = kV + kPfKt * kStride;  // [rows][kPfKt + 1]
  static constexpr int kM = kS + kPfRows * (kPfKt + 1);
  static constexpr int kL = kM + kPfRows;
  static constexpr int kAlpha = kL + kPfRows;
  static constexpr int kFloats = kAlpha + kPfRows;
  static constexpr int kBytes = kFloats * 4;
};

// Chunk `ch` (8 dims) of position `pos`'s K and V rows for the kv head whose
// rows start at `head_row` in each block: raw values (DecodeChunk) and the
// rows' scales and zero points. The CUDA-core kernel stages its tiles with it
// (the tensor-core one prefetches raw words and converts them to fp16 itself).
template <KvDtype D, KvScaleMode M, int HD>
__device__ __forceinline__ void ReadKvChunk(const PrefillParams& p, const int32_t* table,
                                            uint32_t head_row, int bs_mask, int pos, int ch,
                                            const RowScaleReader<D, M>& kscale,
                                            const RowScaleReader<D, M>& vscale, float (&kx)[8],
                                            float (&vx)[8], float* sk, float* zk, float* sv,
                                            float* zv) {
  constexpr int kCb = ChunkTraits<D>::kBytes;
  constexpr int kRowBytes = HD * KvDtypeBits(D) / 8;
  const KvBlockLayout& lay = p.cache.layout;
  const int32_t b = table[pos >> p.log2_bs];
  const uint32_t ridx = head_row + (pos & bs_mask);
  const uint8_t* blk = p.cache.pool + static_cast<int64_t>(b) * lay.block_bytes;
  uint32_t kw[ChunkTraits<D>::kWords], vw[ChunkTraits<D>::kWords];
  LoadChunk<kCb>(blk + lay.k_data + ridx * kRowBytes + ch * kCb, kw);
  LoadChunk<kCb>(blk + lay.v_data + ridx * kRowBytes + ch * kCb, vw);
  DecodeChunk<D>(kw, kx);
  DecodeChunk<D>(vw, vx);
  kscale.Read(blk, lay.k_scale, lay.k_zero, ridx, sk, zk);
  vscale.Read(blk, lay.v_scale, lay.v_zero, ridx, sv, zv);
}

template <KvDtype D, KvScaleMode M, int HD>
__global__ void __launch_bounds__(kPfThreads) PrefillKernel(const PrefillParams p) {
  using S = PrefillSmem<HD>;
  constexpr int kNc = HD / 8;
  constexpr int kDpt = HD / 8;  // output dims per thread (d = dg + 8 k)
  extern __shared__ __align__(16) float smem[];
  float* qs = smem + S::kQ;
  float* ks = smem + S::kK;
  float* vs = smem + S::kV;
  float* ss = smem + S::kS;
  float* rm = smem + S::kM;
  float* rl = smem + S::kL;
  float* ra = smem + S::kAlpha;

  const int seq = p.seq_index != nullptr ? p.seq_index[blockIdx.z] : static_cast<int>(blockIdx.z);
  const int kvh = blockIdx.y / p.groups_per_kv;
  const int head0 = kvh * p.group + (blockIdx.y % p.groups_per_kv) * p.heads_per_cta;
  const int q0 = p.query_start[seq];
  const int n = p.query_start[seq + 1] - q0;
  const int ctx = p.context_lens[seq];
  const int i0 = blockIdx.x * p.tokens_per_cta;
  if (i0 >= n || (p.skip_single && n == 1)) return;
  const int nt = min(p.tokens_per_cta, n - i0);
  const int gs = p.heads_per_cta;
  const int tid = threadIdx.x;
  const int pos_first = ctx - n + i0;          // position of the tile's first token
  const int kv_end = min(ctx, pos_first + nt);  // positions [0, kv_end) are read
  const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;

  // Query rows, pre-scaled; invalid rows are zero.
  for (int idx = tid; idx < kPfRows * HD; idx += kPfThreads) {
    const int r = idx / HD, d = idx % HD;
    const int i = r / gs, g = r % gs;
    float v = 0.0f;
    if (i < nt) {
      v = p.query[(static_cast<int64_t>(q0 + i0 + i) * p.num_heads + head0 + g) * HD + d] *
          p.q_scale;
    }
    qs[r * S::kStride + d] = v;
  }
  if (tid < kPfRows) {
    rm[tid] = -INFINITY;
    rl[tid] = 0.0f;
  }
  RowScaleReader<D, M> kscale, vscale;
  kscale.Init(p.cache.k_scale, p.cache.k_zero, kvh);
  vscale.Init(p.cache.v_scale, p.cache.v_zero, kvh);
  const int bs_mask = (1 << p.log2_bs) - 1;
  const uint32_t head_row = static_cast<uint32_t>(kvh) << p.log2_bs;

  const int rg = tid / 8, cg = tid % 8;  // 16 row groups of 4 rows, 8 column / dim groups
  float o[4][kDpt];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int k = 0; k < kDpt; ++k) o[a][k] = 0.0f;
  }
  int row_pos[4];
  bool row_ok[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int r = rg * 4 + a;
    row_ok[a] = r / gs < nt;
    row_pos[a] = pos_first + r / gs;
  }

  for (int k0 = 0; k0 < kv_end; k0 += kPfKt) {
    __syncthreads();  // previous tile fully consumed (and Q / stats initialized)
    // Dequantize K and V of positions [k0, k0 + kPfKt) into shared memory.
    for (int idx = tid; idx < kPfKt * kNc; idx += kPfThreads) {
      const int tt = idx / kNc, c = idx % kNc;
      const int pos = k0 + tt;
      float kx[8], vx[8];
      if (pos < kv_end) {
        float sk, zk, sv, zv;
        ReadKvChunk<D, M, HD>(p, table, head_row, bs_mask, pos, c, kscale, vscale, kx, vx, &sk, &zk, &sv, &zv);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if constexpr (KvDtypeIsInteger(D)) {
            kx[e] = (kx[e] - zk) * sk;
            vx[e] = (vx[e] - zv) * sv;
          } else if constexpr (M != KvScaleMode::kNone) {
            kx[e] *= sk;
            vx[e] *= sv;
          }
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kx[e] = vx[e] = 0.0f;
      }
      float4* kd = reinterpret_cast<float4*>(ks + tt * S::kStride + c * 8);
      float4* vd = reinterpret_cast<float4*>(vs + tt * S::kStride + c * 8);
      kd[0] = make_float4(kx[0], kx[1], kx[2], kx[3]);
      kd[1] = make_float4(kx[4], kx[5], kx[6], kx[7]);
      vd[0] = make_float4(vx[0], vx[1], vx[2], vx[3]);
      vd[1] = make_float4(vx[4], vx[5], vx[6], vx[7]);
    }
    __syncthreads();

    // Scores: rows rg*4 + a, columns cg + 8 b.
    {
      float acc[4][4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
      }
#pragma unroll 4
      for (int d = 0; d < HD; d += 4) {
        float4 qv[4], kv[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) qv[a] = *reinterpret_cast<const float4*>(qs + (rg * 4 + a) * S::kStride + d);
#pragma unroll
        for (int b = 0; b < 4; ++b) kv[b] = *reinterpret_cast<const float4*>(ks + (cg + 8 * b) * S::kStride + d);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            acc[a][b] = fmaf(qv[a].x, kv[b].x, acc[a][b]);
            acc[a][b] = fmaf(qv[a].y, kv[b].y, acc[a][b]);
            acc[a][b] = fmaf(qv[a].z, kv[b].z, acc[a][b]);
            acc[a][b] = fmaf(qv[a].w, kv[b].w, acc[a][b]);
          }
        }
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int pos = k0 + cg + 8 * b;
          const bool ok = row_ok[a] && pos <= row_pos[a] && pos < kv_end;
          ss[(rg * 4 + a) * (kPfKt + 1) + cg + 8 * b] = ok ? acc[a][b] : -INFINITY;
        }
      }
    }
    __syncthreads();

    // Online softmax: two threads per row, 16 columns each.
    {
      const int r = tid / 2, half = tid % 2;
      float* srow = ss + r * (kPfKt + 1) + half * 16;
      float mt = -INFINITY;
#pragma unroll
      for (int c = 0; c < 16; ++c) mt = fmaxf(mt, srow[c]);
      mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
      const float m_old = rm[r];
      const float m_new = fmaxf(m_old, mt);
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      float ls = 0.0f;
#pragma unroll
      for (int c = 0; c < 16; ++c) {
        const float e = exp2f(srow[c] - base);
        srow[c] = e;
        ls += e;
      }
      ls += __shfl_xor_sync(0xffffffffu, ls, 1);
      const float alpha = exp2f(m_old - base);
      const float l_old = rl[r];
      __syncwarp();
      if (half == 0) {
        rm[r] = m_new;
        rl[r] = l_old * alpha + ls;
        ra[r] = alpha;
      }
    }
    __syncthreads();

    // O = alpha * O + P V.
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const float al = ra[rg * 4 + a];
#pragma unroll
      for (int k = 0; k < kDpt; ++k) o[a][k] *= al;
    }
#pragma unroll 4
    for (int tt = 0; tt < kPfKt; ++tt) {
      float pr[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) pr[a] = ss[(rg * 4 + a) * (kPfKt + 1) + tt];
#pragma unroll
      for (int k = 0; k < kDpt; ++k) {
        const float v = vs[tt * S::kStride + cg + 8 * k];
#pragma unroll
        for (int a = 0; a < 4; ++a) o[a][k] = fmaf(pr[a], v, o[a][k]);
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int r = rg * 4 + a;
    if (!row_ok[a]) continue;
    const int i = r / gs, g = r % gs;
    const float inv = 1.0f / rl[r];
    float* dst = p.out + (static_cast<int64_t>(q0 + i0 + i) * p.num_heads + head0 + g) * HD;
#pragma unroll
    for (int k = 0; k < kDpt; ++k) dst[cg + 8 * k] = o[a][k] * inv;
  }
}

}  // namespace detail
}  // namespace strata::cuda

#include "kernels/cuda/prefill_attention_mma.cuh"

namespace strata::cuda {

template <KvDtype D, KvScaleMode M, int HD>
cudaError_t PrefillOp::Run(const AttentionArgs& a, int32_t max_new_tokens, cudaStream_t stream) {
  using S = detail::PrefillSmem<HD>;
  const int group = a.num_heads / a.cache.layout.num_kv_heads;
  const int gs = HeadTile(group);
  detail::PrefillParams p;
  p.cache = a.cache;
  p.block_tables = a.batch.block_tables;
  p.context_lens = a.batch.context_lens;
  p.query_start = a.batch.query_start;
  p.query = a.query;
  p.out = a.out;
  p.max_blocks_per_seq = a.batch.max_blocks_per_seq;
  p.num_heads = a.num_heads;
  p.group = group;
  p.heads_per_cta = gs;
  p.groups_per_kv = group / gs;
  p.tokens_per_cta = detail::kPfRows / gs;
  p.log2_bs = Log2Int(a.cache.layout.block_size);
  p.q_scale = a.softmax_scale * kLog2e;
  p.skip_single = a.skip_single_token;
  p.seq_index = a.seq_index;
  const dim3 grid((max_new_tokens + p.tokens_per_cta - 1) / p.tokens_per_cta,
                  a.cache.layout.num_kv_heads * p.groups_per_kv,
                  a.seq_index != nullptr ? a.num_indexed_seqs : a.batch.num_seqs);
  static KernelAttrCache attrs;
  if constexpr (detail::kPrefillMma<D> && HD % 16 == 0) {
    // Tensor cores (fp32-accurate, see prefill_attention_mma.cuh).
    constexpr int kBytes = detail::PrefillMmaSmem<HD>::kBytes;
    auto kernel = detail::PrefillMmaKernel<D, M, HD>;
    cudaError_t err = EnsureDynamicSmem(reinterpret_cast<const void*>(kernel), kBytes, &attrs);
    if (err != cudaSuccess) return err;
    kernel<<<grid, detail::kPfThreads, kBytes, stream>>>(p);
  } else {  // fp32 caches (and head dims not a multiple of 16): CUDA cores
    auto kernel = detail::PrefillKernel<D, M, HD>;
    cudaError_t err = EnsureDynamicSmem(reinterpret_cast<const void*>(kernel), S::kBytes, &attrs);
    if (err != cudaSuccess) return err;
    kernel<<<grid, detail::kPfThreads, S::kBytes, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace strata::cuda
