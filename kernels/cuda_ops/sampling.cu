// On-GPU sampling: one 1024-thread block per row. See SampleRows in cuda_ops.h.
//
// Passes over the row (it stays in L2): greedy is one arg-max pass. With a
// temperature: a max pass, 4 radix passes for top-k (counts), 1 + 4 for top-p
// (fixed-point masses), an id-cutoff pass only when ties straddle a
// threshold, and the Gumbel arg-max pass. Log-probs: 2 passes + one per top-n.
#include <climits>

#include "kernels/cuda_ops/common.cuh"
#include "kernels/cuda_ops/cuda_ops.h"

namespace strata::cuda_ops {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr double kFixedOne = 1099511627776.0;  // 2^40: mass fixed point

// Order-preserving map float -> uint32 (larger float, larger key).
__device__ __forceinline__ uint32_t Key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float KeyToFloat(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

struct Shared {
  unsigned long long hist[256];
  float f[kWarps];
  int i[kWarps];
  unsigned long long u[kWarps];
  // Results broadcast by one thread.
  uint32_t sel_bucket;
  unsigned long long sel_remaining;
  unsigned long long sel_ties;
  int cut;
};

// Ordering of (value, id) pairs: larger value first, then lower id.
__device__ __forceinline__ bool Better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

__device__ void BlockArgMax(float& v, int& id, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, id, o);
    if (Better(ov, oi, v, id)) v = ov, id = oi;
  }
  __syncthreads();
  if (lane == 0) sh.f[warp] = v, sh.i[warp] = id;
  __syncthreads();
  v = sh.f[lane];
  id = sh.i[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, id, o);
    if (Better(ov, oi, v, id)) v = ov, id = oi;
  }
}

__device__ float BlockMax(float v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = detail::WarpMax(v);
  __syncthreads();
  if (lane == 0) sh.f[warp] = v;
  __syncthreads();
  return detail::WarpMax(sh.f[lane]);
}

__device__ float BlockSumF(float v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = detail::WarpSum(v);
  __syncthreads();
  if (lane == 0) sh.f[warp] = v;
  __syncthreads();
  return detail::WarpSum(sh.f[lane]);
}

__device__ unsigned long long BlockSumU64(unsigned long long v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) sh.u[warp] = v;
  __syncthreads();
  v = sh.u[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Radix selection over keys, MSB first, 8 bits per pass. weight(i) returns the
// element's weight (0 = not a candidate). Finds the largest key K with
// sum(weight of keys >= K) >= target (target >= 1, reachable). Returns K; sets
// `remaining` = target - weight(keys > K) and `ties` = weight at K.
template <class KeyFn, class WeightFn>
__device__ uint32_t RadixSelect(int vocab, unsigned long long target, KeyFn key_of,
                                WeightFn weight, unsigned long long& remaining,
                                unsigned long long& ties, Shared& sh) {
  uint32_t prefix = 0;
  remaining = target;
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const uint32_t k = key_of(i);
      if (level > 0 && (k >> (shift + 8)) != prefix) continue;
      const unsigned long long w = weight(i);
      if (w) atomicAdd(&sh.hist[(k >> shift) & 0xFFu], w);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l owns buckets 255-8l down to 248-8l.
      const int lane = threadIdx.x;
      unsigned long long s = 0;
      for (int j = 0; j < 8; ++j) s += sh.hist[255 - 8 * lane - j];
      unsigned long long incl = s;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
      }
      unsigned long long cum = incl - s;
      if (cum < remaining && remaining <= incl) {
        for (int j = 0; j < 8; ++j) {
          const int b = 255 - 8 * lane - j;
          if (remaining <= cum + sh.hist[b]) {
            sh.sel_bucket = static_cast<uint32_t>(b);
            sh.sel_remaining = remaining - cum;
            sh.sel_ties = sh.hist[b];
            break;
          }
          cum += sh.hist[b];
        }
      }
    }
    __syncthreads();
    prefix = (prefix << 8) | sh.sel_bucket;
    remaining = sh.sel_remaining;
    ties = sh.sel_ties;
    __syncthreads();
  }
  return prefix;
}

// The r-th (1-based) smallest id with pred(id), r >= 1 and reachable.
template <class Pred>
__device__ int IdCutoff(int vocab, int r, Pred pred, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
  const int lo = threadIdx.x * chunk, hi = min(vocab, lo + chunk);
  int c = 0;
  for (int i = lo; i < hi; ++i) c += pred(i) ? 1 : 0;
  int incl = c;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  __syncthreads();
  if (lane == 31) sh.i[warp] = incl;
  __syncthreads();
  int warp_off = 0;
  for (int w = 0; w < warp; ++w) warp_off += sh.i[w];
  int before = warp_off + incl - c;
  if (before < r && r <= before + c) {
    for (int i = lo; i < hi; ++i) {
      if (pred(i) && ++before == r) {
        sh.cut = i;
        break;
      }
    }
  }
  __syncthreads();
  return sh.cut;
}

__global__ void __launch_bounds__(kThreads) SampleKernel(const float* __restrict__ logits,
                                                         int vocab,
                                                         const SampleParams* __restrict__ params,
                                                         SampleOut* __restrict__ out) {
  __shared__ Shared sh;
  const SampleParams p = params[blockIdx.x];
  const float* row = logits + static_cast<int64_t>(p.logit_row) * vocab;
  SampleOut* o = out + blockIdx.x;
  int token;
  if (p.temperature == 0.0f) {
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = row[i];
      if (Better(v, i, bv, bi)) bv = v, bi = i;
    }
    BlockArgMax(bv, bi, sh);
    token = bi;
  } else {
    const float inv_t = 1.0f / p.temperature;
    auto scaled = [&](int i) { return row[i] * inv_t; };
    auto key_of = [&](int i) { return Key(scaled(i)); };
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, scaled(i));
    m = BlockMax(m, sh);

    // Top-k: keys > kk, plus ties at kk with id <= cut_k.
    uint32_t kk = 0;
    int cut_k = INT_MAX;
    if (p.top_k > 0 && p.top_k < vocab) {
      unsigned long long rem, ties;
      kk = RadixSelect(vocab, static_cast<unsigned long long>(p.top_k), key_of,
                       [](int) { return 1ull; }, rem, ties, sh);
      if (rem < ties) {
        cut_k = IdCutoff(vocab, static_cast<int>(rem), [&](int i) { return key_of(i) == kk; }, sh);
      }
    }
    auto kept_k = [&](int i) {
      const uint32_t k = key_of(i);
      return k > kk || (k == kk && i <= cut_k);
    };
    auto mass = [&](int i) {
      return static_cast<unsigned long long>(__double2ull_rn(
          static_cast<double>(expf(scaled(i) - m)) * kFixedOne));
    };
    // Top-p over the top-k survivors.
    uint32_t kp = 0;
    int cut_p = INT_MAX;
    if (p.top_p < 1.0f) {
      unsigned long long total = 0;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x) total += kept_k(i) ? mass(i) : 0ull;
      total = BlockSumU64(total, sh);
      unsigned long long target =
          static_cast<unsigned long long>(ceil(static_cast<double>(p.top_p) * static_cast<double>(total)));
      if (target < 1) target = 1;
      if (target > total) target = total;
      unsigned long long rem, ties;
      kp = RadixSelect(vocab, target, key_of,
                       [&](int i) { return kept_k(i) ? mass(i) : 0ull; }, rem, ties, sh);
      const unsigned long long w = static_cast<unsigned long long>(
          __double2ull_rn(static_cast<double>(expf(KeyToFloat(kp) - m)) * kFixedOne));
      const unsigned long long need = (rem + w - 1) / w;  // ties to keep, in id order
      if (need < ties / w) {
        cut_p = IdCutoff(vocab, static_cast<int>(need),
                         [&](int i) { return key_of(i) == kp && kept_k(i); }, sh);
      }
    }
    // Gumbel-max over the kept set.
    const uint64_t stream = detail::Mix64(p.seed ^ detail::Mix64(p.counter + 0x5DEECE66Dull));
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const uint32_t k = key_of(i);
      if (!(k > kk || (k == kk && i <= cut_k))) continue;
      if (!(k > kp || (k == kp && i <= cut_p))) continue;
      const uint64_t h = detail::Mix64(stream ^ static_cast<uint64_t>(i));
      // W uniform in (0, 1) with fine resolution near 0 (the Gumbel tail).
      const float w = (static_cast<float>(h >> 40) +
                       (static_cast<float>((h >> 16) & 0xFFFFFFu) + 0.5f) * (1.0f / 16777216.0f)) *
                      (1.0f / 16777216.0f);
      const float e = -log1pf(-w);  // Exp(1) variate: -log(1 - W)
      const float v = scaled(i) - logf(e);
      if (Better(v, i, bv, bi)) bv = v, bi = i;
    }
    BlockArgMax(bv, bi, sh);
    token = bi;
  }

  float lse = 0.0f;
  if (p.num_logprobs >= 0) {
    float mr = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mr = fmaxf(mr, row[i]);
    mr = BlockMax(mr, sh);
    float s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(row[i] - mr);
    s = BlockSumF(s, sh);
    lse = mr + logf(s);
    float pv = INFINITY;
    int pi = -1;
    const int n = min(p.num_logprobs, kMaxLogprobs);
    for (int j = 0; j < n; ++j) {
      float bv = -INFINITY;
      int bi = INT_MAX;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (!(v < pv || (v == pv && i > pi))) continue;  // already listed
        if (Better(v, i, bv, bi)) bv = v, bi = i;
      }
      BlockArgMax(bv, bi, sh);
      if (threadIdx.x == 0) o->top_ids[j] = bi, o->top_logprobs[j] = bv - lse;
      pv = bv;
      pi = bi;
    }
  }
  if (threadIdx.x == 0) {
    o->token = token;
    o->logprob = (p.num_logprobs >= 0 && token >= 0 && token < vocab) ? row[token] - lse : 0.0f;
  }
}

}  // namespace

cudaError_t SampleRows(const float* logits, int32_t vocab, const SampleParams* params,
                       int32_t num_rows, SampleOut* out, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  if (vocab <= 0) return cudaErrorInvalidValue;
  SampleKernel<<<num_rows, kThreads, 0, stream>>>(logits, vocab, params, out);
  return cudaGetLastError();
}

}  // namespace strata::cuda_ops
