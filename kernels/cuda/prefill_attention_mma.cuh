// Tensor-core prefill attention for the fp16, bf16, fp8 (e4m3, e5m2), int8 and
// int4 caches. Included by prefill_attention.cuh, after PrefillParams.
//
// Same work split as the CUDA-core kernel: one thread block = (64 query rows
// of one kv head, i.e. up to 64 / Gs tokens x Gs heads; kv head; sequence),
// 4 warps of 16 rows each, 32-position K/V tiles, causal mask, online softmax
// in the log2 domain. Both products run on mma.sync.m16n8k16 (fp16 inputs,
// fp32 accumulation) and keep fp32 accuracy:
//   - The cache enters as its raw values (DecodeChunk: fp16 values, unscaled
//     fp8 values, integer codes minus their integer per-token zero point),
//     which fp16 holds exactly; the per-token (or per-head) scale multiplies
//     the logit and the softmax weight, and a static (float) zero point is
//     folded outside the products:
//       logit  = s_k * (q . code_k - z_k * sum(q))
//       output = (sum_t w_t code_v,t - sum_t w_t z_v,t) / l,  w_t = p_t * s_v,t
//   - The fp32 query and the fp32 weights w are split into fp16 hi + lo
//     halves (two MMAs each). A bf16 cache runs bf16 MMAs instead: its
//     values as they are, the query and the weights split into bf16 hi + lo
//     (~2^-17 relative). The weights are first multiplied by a per-row
//     power of two that puts the largest weight seen near 2^14 (it only
//     decreases, by exact powers of two applied to the accumulators too), so
//     neither half overflows or loses bits to fp16 subnormals.
// K and V are staged row-major ([position][dim], fp16) in shared memory with
// padded rows, so the fragment loads (ldmatrix.x4 for Q and K, its
// transposing form for V) are free of bank conflicts. The S accumulators of
// two 8-position tiles are, register for register, the A operand of the P V
// product (no trip through shared memory).
// A warp skips the products of a tile that lies wholly after its last row's
// position.
#pragma once

#include "kernels/cuda/mma_util.cuh"

namespace strata::cuda::detail {

template <KvDtype D>
constexpr bool kPrefillMma = D == KvDtype::kFp16 || D == KvDtype::kBf16 ||
                             D == KvDtype::kFp8E4M3 || D == KvDtype::kFp8E5M2 ||
                             D == KvDtype::kInt8 || D == KvDtype::kInt4;

constexpr int kPmKt = 32;  // cached positions per tile

template <int HD>
struct PrefillMmaSmem {
  static_assert(HD % 16 == 0);
  static constexpr int kQStride = HD + 8;     // halves per Q / K / V row
  static constexpr int kQHi = 0;              // byte offsets
  static constexpr int kQLo = kQHi + kPfRows * kQStride * 2;
  static constexpr int kK = kQLo + kPfRows * kQStride * 2;
  static constexpr int kV = kK + kPmKt * kQStride * 2;
  static constexpr int kMeta = kV + kPmKt * kQStride * 2;  // K scales, K zeros, V scales, V zeros
  static constexpr int kQSum = kMeta + 4 * kPmKt * 4;   // [kPfRows] fp32
  static constexpr int kBytes = kQSum + kPfRows * 4;
};

// One staged chunk (8 elements) of an 8-bit or 4-bit cache as four fp16
// pairs (elements 2i, 2i + 1 in h[i]), exactly the raw values DecodeChunk
// gives minus the integer zero point `z` (0 where the codes keep it): integer
// codes through fp16 magic numbers (1024 + code) and one subtraction, fp8 by
// conversion or as the top byte of an fp16. No float round trip.
template <KvDtype D>
__device__ __forceinline__ void ChunkToHalves(const uint32_t (&w)[ChunkTraits<D>::kWords], int z,
                                              uint32_t (&h)[4]) {
  if constexpr (D == KvDtype::kInt8) {
    // byte ^ 0x80 = code + 128; (1024 + code + 128) - (1024 + 128 + z) = code - z.
    const __half2 sub = BitsH2(0x64006400u | (static_cast<uint32_t>(z + 128) * 0x00010001u));
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t u = w[i] ^ 0x80808080u;
      h[2 * i] = H2Bits(__hsub2(BitsH2(__byte_perm(u, 0x64646464u, 0x4140u)), sub));
      h[2 * i + 1] = H2Bits(__hsub2(BitsH2(__byte_perm(u, 0x64646464u, 0x4342u)), sub));
    }
  } else if constexpr (D == KvDtype::kInt4) {
    // Byte i's low nibble u0 -> (1024 + u0) - (1024 + z); its high nibble,
    // masked in place (16 u1), -> (1024 + 16 u1) / 16 - (64 + z). fp16 of
    // 1024 + z is 0x6400 + z, of 64 + z is 0x5400 + 16 z.
    const uint32_t zz = static_cast<uint32_t>(z);
    const __half2 neg = BitsH2(((0xD400u + 16u * zz) << 16) | (0xE400u + zz));
    const __half2 mul = BitsH2(0x2C003C00u);  // (1, 1/16)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t x = __byte_perm(w[0], 0u, 0x4040u | (i * 0x0101u));  // byte i at bytes 0, 2
      const uint32_t m = (x & 0x00F0000Fu) | 0x64006400u;
      h[i] = H2Bits(__hfma2(BitsH2(m), mul, neg));
    }
  } else if constexpr (D == KvDtype::kFp8E4M3) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint16_t lo = static_cast<uint16_t>(w[i] & 0xFFFFu);
      const uint16_t hi = static_cast<uint16_t>(w[i] >> 16);
      asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h[2 * i]) : "h"(lo));
      asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h[2 * i + 1]) : "h"(hi));
    }
  } else {
    static_assert(D == KvDtype::kFp8E5M2);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      h[2 * i] = __byte_perm(w[i], 0u, 0x1404u);
      h[2 * i + 1] = __byte_perm(w[i], 0u, 0x3424u);
    }
  }
}

// Thread blocks per SM the registers are budgeted for: 3 (at most 168
// registers, no spills at head_dim 128), 4 for int4 (128 registers, 40 bytes
// of spills). Measured on an H100 with 4 for every format: int4 16K 1.17x,
// 4K 1.05x; fp8 / int8 +2-3% at 16K but 4-7% slower at 4K; fp16 (210 bytes
// of spills) 1.2x slower.
template <KvDtype D>
constexpr int kPrefillMinBlocks = D == KvDtype::kInt4 ? 4 : 3;

template <KvDtype D, KvScaleMode M, int HD>
__global__ void __launch_bounds__(kPfThreads, kPrefillMinBlocks<D>)
    PrefillMmaKernel(const PrefillParams p) {
  using S = PrefillMmaSmem<HD>;
  constexpr int kNc = HD / 8;
  constexpr int kKs = HD / 16;  // k-steps of Q K^T
  constexpr int kDn = HD / 8;   // 8-dim output tiles
  constexpr int kQs = S::kQStride;
  constexpr bool kInt = KvDtypeIsInteger(D);
  constexpr bool kScaled = M != KvScaleMode::kNone;
  // Dynamic zero points are integers: code - zero is exact in fp16 and goes
  // into the MMAs directly (folding a large zero outside loses accuracy to
  // the tensor cores' fp32 accumulation at long contexts). Static int8 zero
  // points are arbitrary floats and are folded.
  constexpr bool kZeroInCodes = kInt && M == KvScaleMode::kDynamic;
  constexpr bool kFold = kInt && !kZeroInCodes;
  constexpr bool kBf = D == KvDtype::kBf16;  // bf16 MMAs, query and weights split in bf16
  extern __shared__ __align__(16) uint8_t psm[];
  __half* qhi = reinterpret_cast<__half*>(psm + S::kQHi);
  __half* qlo = reinterpret_cast<__half*>(psm + S::kQLo);
  __half* kc = reinterpret_cast<__half*>(psm + S::kK);
  __half* vt = reinterpret_cast<__half*>(psm + S::kV);
  float* mks = reinterpret_cast<float*>(psm + S::kMeta);
  float* mkz = mks + kPmKt;
  float* mvs = mkz + kPmKt;
  float* mvz = mvs + kPmKt;
  float* qsum = reinterpret_cast<float*>(psm + S::kQSum);

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
  const int pos_first = ctx - n + i0;
  const int kv_end = min(ctx, pos_first + nt);
  const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;

  // Query rows, pre-scaled, as fp16 (bf16 caches: bf16) hi + lo; invalid rows are zero.
  for (int idx = tid; idx < kPfRows * HD; idx += kPfThreads) {
    const int r = idx / HD, d = idx % HD;
    const int i = r / gs, g = r % gs;
    float v = 0.0f;
    if (i < nt) {
      v = p.query[(static_cast<int64_t>(q0 + i0 + i) * p.num_heads + head0 + g) * HD + d] *
          p.q_scale;
    }
    if constexpr (kBf) {
      const __nv_bfloat16 h = __float2bfloat16_rn(v);
      const __nv_bfloat16 l = __float2bfloat16_rn(v - __bfloat162float(h));
      reinterpret_cast<__nv_bfloat16*>(qhi)[r * kQs + d] = h;
      reinterpret_cast<__nv_bfloat16*>(qlo)[r * kQs + d] = l;
    } else {
      const __half h = __float2half_rn(v);
      qhi[r * kQs + d] = h;
      qlo[r * kQs + d] = __float2half_rn(v - __half2float(h));
    }
  }
  __syncthreads();
  if constexpr (kFold) {  // sum(q) of each row, as the MMAs see q (hi + lo)
    if (tid < kPfRows) {
      float s = 0.0f;
      for (int d = 0; d < HD; ++d) {
        s += __half2float(qhi[tid * kQs + d]) + __half2float(qlo[tid * kQs + d]);
      }
      qsum[tid] = s;
    }
  }

  RowScaleReader<D, M> kscale, vscale;
  kscale.Init(p.cache.k_scale, p.cache.k_zero, kvh);
  vscale.Init(p.cache.v_scale, p.cache.v_zero, kvh);
  const int bs_mask = (1 << p.log2_bs) - 1;
  const uint32_t head_row = static_cast<uint32_t>(kvh) << p.log2_bs;

  const int warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int r0 = warp * 16 + g, r1 = r0 + 8;  // this thread's two rows
  // ldmatrix row addresses of this lane (matrix m = lane / 8, its row lane % 8):
  // Q: rows +8 for m = 1, 3, dims +8 for m = 2, 3 (a0..a3); K (rows =
  // positions): dims +8 for m = 1, 3 (b0, b1 of one 8-position tile),
  // positions +8 for m = 2, 3 (the next tile).
  const int lm = lane >> 3, lr = lane & 7;
  const int lq_off = (warp * 16 + lr + 8 * (lm & 1)) * kQs + 8 * (lm >> 1);
  const int lk_off = (lr + 8 * (lm >> 1)) * kQs + 8 * (lm & 1);
  // V, row-major like K, through ldmatrix.trans: positions +8 for m = 1, 3,
  // dims +8 for m = 2, 3.
  const int lv_off = (lr + 8 * (lm & 1)) * kQs + 8 * (lm >> 1);
  const bool ok0 = r0 / gs < nt, ok1 = r1 / gs < nt;
  const int pos0 = pos_first + r0 / gs, pos1 = pos_first + r1 / gs;
  // Last position any row of this warp attends to (-1: the warp has no rows).
  const int warp_tokens = min(nt - 1, (warp * 16 + 15) / gs);
  const int warp_last = (warp * 16) / gs < nt ? pos_first + warp_tokens : -1;

  float o[kDn][4];
#pragma unroll
  for (int dn = 0; dn < kDn; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY;  // running max (log2 domain)
  float l0 = 0.0f, l1 = 0.0f;            // this lane's share of the softmax sums
  float z0 = 0.0f, z1 = 0.0f;            // this lane's share of sum w z_v
  float ws0 = 0.0f, ws1 = 0.0f;          // weight scale of the rows (0: none yet)
  float qs0 = 0.0f, qs1 = 0.0f;

  // Staging, software-pipelined: the raw cache words of tile t + 1 are loaded
  // into registers while tile t is computed, and decoded into shared memory
  // after it. Thread (warp w, lane) stages position k0 + lane, 8-dim chunks
  // w, w + 4, ...; warp 0 also its scales and zero points for the products
  // (measured on an H100: 16K context 1.08-1.11x, 4K 1.00-1.09x).
  constexpr int kCw = ChunkTraits<D>::kWords;
  constexpr int kCb = ChunkTraits<D>::kBytes;
  constexpr int kRowBytes = HD * KvDtypeBits(D) / 8;
  constexpr int kCpt = (kPmKt * kNc + kPfThreads - 1) / kPfThreads;  // chunks per thread
  uint32_t rk[kCpt][kCw], rv[kCpt][kCw];
  float rsk = 0.0f, rzk = 0.0f, rsv = 0.0f, rzv = 0.0f;
  bool rvalid = false;
  const KvBlockLayout& lay = p.cache.layout;
  auto load_raw = [&](int k0) {
    const int pos = k0 + lane;
    rvalid = pos < kv_end;
    if (!rvalid) return;
    const int32_t b = table[pos >> p.log2_bs];
    const uint32_t ridx = head_row + (pos & bs_mask);
    const uint8_t* blk = p.cache.pool + static_cast<int64_t>(b) * lay.block_bytes;
#pragma unroll
    for (int i = 0; i < kCpt; ++i) {
      const int ch = warp + 4 * i;
      if (ch < kNc) {
        LoadChunk<kCb>(blk + lay.k_data + ridx * kRowBytes + ch * kCb, rk[i]);
        LoadChunk<kCb>(blk + lay.v_data + ridx * kRowBytes + ch * kCb, rv[i]);
      }
    }
    if (warp == 0 || kZeroInCodes) {  // every warp subtracts dynamic zero points
      kscale.Read(blk, lay.k_scale, lay.k_zero, ridx, &rsk, &rzk);
      vscale.Read(blk, lay.v_scale, lay.v_zero, ridx, &rsv, &rzv);
    }
  };
  // Writes the loaded words of the tile as fp16 (bf16 caches: bf16) into
  // shared memory (zeros past the context: stale bytes could be NaN or Inf).
  auto store_raw = [&]() {
    const int tt = lane;
#pragma unroll
    for (int i = 0; i < kCpt; ++i) {
      const int ch = warp + 4 * i;
      if (ch >= kNc) continue;
      // fp16 / bf16 words are the values already; the other formats through
      // ChunkToHalves. Zeros past the context.
      uint32_t kh[4] = {0u, 0u, 0u, 0u}, vh[4] = {0u, 0u, 0u, 0u};
      if (rvalid) {
        if constexpr (D == KvDtype::kFp16 || D == KvDtype::kBf16) {
#pragma unroll
          for (int e = 0; e < 4; ++e) kh[e] = rk[i][e], vh[e] = rv[i][e];
        } else {
          ChunkToHalves<D>(rk[i], kZeroInCodes ? __float2int_rn(rzk) : 0, kh);
          ChunkToHalves<D>(rv[i], kZeroInCodes ? __float2int_rn(rzv) : 0, vh);
        }
      }
      *reinterpret_cast<uint4*>(kc + tt * kQs + ch * 8) = make_uint4(kh[0], kh[1], kh[2], kh[3]);
      *reinterpret_cast<uint4*>(vt + tt * kQs + ch * 8) = make_uint4(vh[0], vh[1], vh[2], vh[3]);
    }
    if (warp == 0) {
      const bool zin = kZeroInCodes;
      mks[tt] = rvalid ? rsk : 0.0f;
      mkz[tt] = rvalid && !zin ? rzk : 0.0f;
      mvs[tt] = rvalid ? rsv : 0.0f;
      mvz[tt] = rvalid && !zin ? rzv : 0.0f;
    }
  };

  load_raw(0);
  for (int k0 = 0; k0 < kv_end; k0 += kPmKt) {
    __syncthreads();  // the previous tile is consumed (and qsum is written)
    if constexpr (kFold) {
      if (k0 == 0) qs0 = qsum[r0], qs1 = qsum[r1];
    }
    store_raw();
    if (k0 + kPmKt < kv_end) load_raw(k0 + kPmKt);  // in flight during this tile's products
    __syncthreads();
    if (k0 > warp_last) continue;  // warp-uniform: the tile is after all of its rows

    // Logits of the warp's 16 rows x 32 positions: 4 tiles of 8 positions.
    float sc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKs; ++kk) {
      uint32_t qh[4], ql[4];  // A fragments: rows warp*16 + 0..15, dims kk*16 + 0..15
      Ldsm4(qhi + lq_off + kk * 16, qh);
      Ldsm4(qlo + lq_off + kk * 16, ql);
#pragma unroll
      for (int jp = 0; jp < 2; ++jp) {  // B fragments of position tiles 2 jp, 2 jp + 1
        uint32_t kb[4];
        Ldsm4(kc + lk_off + jp * 16 * kQs + kk * 16, kb);
#pragma unroll
        for (int h = 0; h < 2; ++h) MmaHiLoT<kBf>(sc[2 * jp + h], qh, ql, kb[2 * h], kb[2 * h + 1]);
      }
    }
    // Scale, zero-point fold, causal mask; the tile's row maxima.
    float t0 = -INFINITY, t1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tt = 8 * j + 2 * c + (e & 1);
        const int pos = k0 + tt;
        const bool hi = e >= 2;
        float x = sc[j][e];
        if constexpr (kFold) {
          x = mks[tt] * (x - mkz[tt] * (hi ? qs1 : qs0));
        } else if constexpr (kScaled) {
          x *= mks[tt];
        }
        const bool vis = hi ? (ok1 && pos <= pos1) : (ok0 && pos <= pos0);
        x = vis && pos < kv_end ? x : -INFINITY;
        sc[j][e] = x;
        if (hi) t1 = fmaxf(t1, x); else t0 = fmaxf(t0, x);
      }
    }
    t0 = fmaxf(t0, __shfl_xor_sync(0xffffffffu, t0, 1));
    t0 = fmaxf(t0, __shfl_xor_sync(0xffffffffu, t0, 2));
    t1 = fmaxf(t1, __shfl_xor_sync(0xffffffffu, t1, 1));
    t1 = fmaxf(t1, __shfl_xor_sync(0xffffffffu, t1, 2));
    const float mn0 = fmaxf(m0, t0), mn1 = fmaxf(m1, t1);
    const float base0 = mn0 == -INFINITY ? 0.0f : mn0;
    const float base1 = mn1 == -INFINITY ? 0.0f : mn1;
    float f0 = exp2f(m0 - base0), f1 = exp2f(m1 - base1);  // rescale of the old state
    m0 = mn0, m1 = mn1;
    // Weights w = p * s_v (in sc), sums, and the largest weight of each row.
    float ls0 = 0.0f, ls1 = 0.0f, zs0 = 0.0f, zs1 = 0.0f, wm0 = 0.0f, wm1 = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tt = 8 * j + 2 * c + (e & 1);
        const bool hi = e >= 2;
        const float pr = exp2f(sc[j][e] - (hi ? base1 : base0));
        float w = pr;
        if constexpr (kScaled) w *= mvs[tt];
        if (hi) {
          ls1 += pr, wm1 = fmaxf(wm1, w);
          if constexpr (kFold) zs1 += w * mvz[tt];
        } else {
          ls0 += pr, wm0 = fmaxf(wm0, w);
          if constexpr (kFold) zs0 += w * mvz[tt];
        }
        sc[j][e] = w;
      }
    }
    l0 = l0 * f0 + ls0, l1 = l1 * f1 + ls1;
    z0 = z0 * f0 + zs0, z1 = z1 * f1 + zs1;
    wm0 = fmaxf(wm0, __shfl_xor_sync(0xffffffffu, wm0, 1));
    wm0 = fmaxf(wm0, __shfl_xor_sync(0xffffffffu, wm0, 2));
    wm1 = fmaxf(wm1, __shfl_xor_sync(0xffffffffu, wm1, 1));
    wm1 = fmaxf(wm1, __shfl_xor_sync(0xffffffffu, wm1, 2));
    if (wm0 > 1e-30f) {
      const float want = exp2f(14.0f - FloorLog2(wm0));
      if (ws0 == 0.0f) {
        ws0 = want;
      } else if (want < ws0) {
        f0 *= want / ws0;  // exact: powers of two
        ws0 = want;
      }
    }
    if (wm1 > 1e-30f) {
      const float want = exp2f(14.0f - FloorLog2(wm1));
      if (ws1 == 0.0f) {
        ws1 = want;
      } else if (want < ws1) {
        f1 *= want / ws1;
        ws1 = want;
      }
    }
    // Rescale the accumulators only when some row's reference or weight
    // scale moved (rare after the first tiles).
    if (__any_sync(0xffffffffu, f0 != 1.0f || f1 != 1.0f)) {
#pragma unroll
      for (int dn = 0; dn < kDn; ++dn) {
        o[dn][0] *= f0, o[dn][1] *= f0;
        o[dn][2] *= f1, o[dn][3] *= f1;
      }
    }
    // O += W V over two 16-position k-steps.
#pragma unroll
    for (int kp = 0; kp < 2; ++kp) {
      uint32_t ah[4], al[4];
      SplitPairT<kBf>(sc[2 * kp][0] * ws0, sc[2 * kp][1] * ws0, &ah[0], &al[0]);
      SplitPairT<kBf>(sc[2 * kp][2] * ws1, sc[2 * kp][3] * ws1, &ah[1], &al[1]);
      SplitPairT<kBf>(sc[2 * kp + 1][0] * ws0, sc[2 * kp + 1][1] * ws0, &ah[2], &al[2]);
      SplitPairT<kBf>(sc[2 * kp + 1][2] * ws1, sc[2 * kp + 1][3] * ws1, &ah[3], &al[3]);
#pragma unroll
      for (int dp = 0; dp < kDn / 2; ++dp) {  // B fragments of dim tiles 2 dp, 2 dp + 1
        uint32_t vb[4];
        Ldsm4T(vt + lv_off + kp * 16 * kQs + dp * 16, vb);
#pragma unroll
        for (int h = 0; h < 2; ++h) MmaHiLoT<kBf>(o[2 * dp + h], ah, al, vb[2 * h], vb[2 * h + 1]);
      }
    }
  }

  // The quad's shares of the sums, then out = (o / ws - sum w z) / l.
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  if constexpr (kFold) {
    z0 += __shfl_xor_sync(0xffffffffu, z0, 1);
    z0 += __shfl_xor_sync(0xffffffffu, z0, 2);
    z1 += __shfl_xor_sync(0xffffffffu, z1, 1);
    z1 += __shfl_xor_sync(0xffffffffu, z1, 2);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? r1 : r0;
    if (!(half ? ok1 : ok0)) continue;
    const float ws = half ? ws1 : ws0;
    const float inv_ws = ws > 0.0f ? 1.0f / ws : 0.0f;
    const float zz = half ? z1 : z0;
    const float inv_l = 1.0f / (half ? l1 : l0);
    const int i = r / gs, hg = r % gs;
    float* dst = p.out + (static_cast<int64_t>(q0 + i0 + i) * p.num_heads + head0 + hg) * HD;
#pragma unroll
    for (int dn = 0; dn < kDn; ++dn) {
      const float a = (o[dn][2 * half] * inv_ws - zz) * inv_l;
      const float b = (o[dn][2 * half + 1] * inv_ws - zz) * inv_l;
      *reinterpret_cast<float2*>(dst + 8 * dn + 2 * c) = make_float2(a, b);
    }
  }
}

}  // namespace strata::cuda::detail
