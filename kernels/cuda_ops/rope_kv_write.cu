// RoPE fused with the quantizing KV-cache write.
//
// Blocks of (token, group of 4 heads); each warp takes one head row (q heads,
// then k heads, then v heads). A head's row is staged in shared memory so that RoPE's pair
// (j, j + D/2) and int4's byte pair (2i, 2i + 1) are both easy, and the row's
// min/max (dynamic scales) is one warp reduction. Stored bits come from
// kernels/quant_math.h, so they equal the CPU kernels' bits.
#include "kernels/cuda_ops/common.cuh"
#include "kernels/cuda_ops/cuda_ops.h"
#include "kernels/quant_math.h"

namespace strata::cuda_ops {
namespace {

constexpr int kWarps = 4;

template <class C>
__device__ void QuantizeRowWarp(const KvCacheView& cache, int64_t slot, int h, bool is_v,
                                const float* x, int hd) {
  const int lane = threadIdx.x & 31;
  const KvBlockLayout& l = cache.layout;
  const int64_t block = slot / l.block_size;
  const int off = static_cast<int>(slot - block * l.block_size);
  uint8_t* b = cache.block(static_cast<int32_t>(block));
  uint8_t* data = b + (is_v ? l.v_data : l.k_data) + l.data_row(h, off);
  float s = 1.0f, z = 0.0f;
  if constexpr (C::kMode == KvScaleMode::kStatic) {
    s = (is_v ? cache.v_scale : cache.k_scale)[h];
    if constexpr (C::kHasZero) z = (is_v ? cache.v_zero : cache.k_zero)[h];
  } else if constexpr (C::kMode == KvScaleMode::kDynamic) {
    float mn = x[0], mx = x[0];
    for (int i = lane; i < hd; i += 32) mn = fminf(mn, x[i]), mx = fmaxf(mx, x[i]);
    mn = detail::WarpMin(mn);
    mx = detail::WarpMax(mx);
    const qmath::RowParams p = qmath::DynamicRowParams(C::kDtype, mn, mx);
    s = p.scale;
    z = p.zero;
    if (lane == 0) {
      reinterpret_cast<uint16_t*>(b + (is_v ? l.v_scale : l.k_scale))[l.scale_index(h, off)] =
          p.scale_bits;
      if constexpr (C::kHasZero) (b + (is_v ? l.v_zero : l.k_zero))[l.scale_index(h, off)] = p.zero_bits;
    }
  }
  if constexpr (C::kBits == 4) {
    for (int i = lane; i < hd / 2; i += 32) {
      data[i] = static_cast<uint8_t>(C::Encode(x[2 * i], s, z) | (C::Encode(x[2 * i + 1], s, z) << 4));
    }
  } else if constexpr (C::kBits == 8) {
    for (int i = lane; i < hd; i += 32) data[i] = static_cast<uint8_t>(C::Encode(x[i], s, z));
  } else if constexpr (C::kBits == 16) {
    uint16_t* d16 = reinterpret_cast<uint16_t*>(data);
    for (int i = lane; i < hd; i += 32) d16[i] = static_cast<uint16_t>(C::Encode(x[i], s, z));
  } else {
    uint32_t* d32 = reinterpret_cast<uint32_t*>(data);
    for (int i = lane; i < hd; i += 32) d32[i] = C::Encode(x[i], s, z);
  }
}

__device__ __forceinline__ void StoreQ(void* q_out, ActDtype dt, int64_t i, float v) {
  switch (dt) {
    case ActDtype::kFp32: static_cast<float*>(q_out)[i] = v; break;
    case ActDtype::kFp16: static_cast<__half*>(q_out)[i] = __float2half_rn(v); break;
    case ActDtype::kBf16: static_cast<__nv_bfloat16*>(q_out)[i] = __float2bfloat16_rn(v); break;
  }
}

template <class C>
__global__ void __launch_bounds__(kWarps * 32) RopeKvWriteKernel(const RopeKvWriteArgs a) {
  __shared__ float rows[kWarps][kMaxHeadDim];
  const int t = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int hd = a.head_dim, half = hd / 2;
  const int H = a.num_heads, KH = a.num_kv_heads;
  const int64_t width = static_cast<int64_t>(H + 2 * KH) * hd;
  const float* src = a.qkv + t * width;
  const int pos = a.positions[t];
  const float* cs = a.rope_cos + static_cast<int64_t>(pos) * half;
  const float* sn = a.rope_sin + static_cast<int64_t>(pos) * half;
  const int64_t slot = a.slot_mapping[t];
  float* x = rows[warp];
  for (int job = blockIdx.y * kWarps + warp; job < H + 2 * KH; job += gridDim.y * kWarps) {
    const bool is_q = job < H, is_k = !is_q && job < H + KH;
    if (!is_q && slot < 0) continue;  // padding token: nothing to write
    const float* in = src + static_cast<int64_t>(job) * hd;
    for (int i = lane; i < hd; i += 32) x[i] = in[i];
    __syncwarp();
    if (is_q || is_k) {
      for (int j = lane; j < half; j += 32) {
        const float p = x[j], q = x[j + half], c = cs[j], s = sn[j];
        // Explicit roundings (no FMA contraction). The host compiler may contract
        // the CPU reference, so tests compare rotated values with a tolerance.
        x[j] = __fsub_rn(__fmul_rn(p, c), __fmul_rn(q, s));
        x[j + half] = __fadd_rn(__fmul_rn(p, s), __fmul_rn(q, c));
      }
      __syncwarp();
    }
    if (is_q) {
      const int64_t base = (static_cast<int64_t>(t) * H + job) * hd;
      for (int i = lane; i < hd; i += 32) StoreQ(a.q_out, a.q_dtype, base + i, x[i]);
    } else {
      const int h = is_k ? job - H : job - H - KH;
      QuantizeRowWarp<C>(a.cache, slot, h, !is_k, x, hd);
    }
    __syncwarp();
  }
}

}  // namespace

cudaError_t RopeKvWrite(const RopeKvWriteArgs& a, cudaStream_t stream) {
  if (a.num_tokens <= 0) return cudaSuccess;
  if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.head_dim > kMaxHeadDim) {
    return cudaErrorInvalidValue;
  }
  const KvFormat f = a.cache.layout.format;
  // One warp per head row: (tokens, head groups of kWarps) blocks, so a
  // single decode token still spreads over the whole GPU.
  const dim3 grid(a.num_tokens, (a.num_heads + 2 * a.num_kv_heads + kWarps - 1) / kWarps);
#define STRATA_ROPE_CASE_(D, M)                                                    \
  if (f == KvFormat{D, M}) {                                                       \
    RopeKvWriteKernel<qmath::KvCodec<D, M>><<<grid, kWarps * 32, 0, stream>>>(a);     \
    return cudaGetLastError();                                                     \
  }
  STRATA_FOR_EACH_KV_FORMAT(STRATA_ROPE_CASE_)
#undef STRATA_ROPE_CASE_
  return cudaErrorInvalidValue;
}

}  // namespace strata::cuda_ops
