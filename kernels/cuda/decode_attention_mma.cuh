// Tensor-core decode attention for the 8-bit and 4-bit KV formats (fp8 e4m3,
// fp8 e5m2, int8, int4) with block_size >= 16. Included by decode_attention.cuh.
//
// Why: with CUDA-core FMAs a GQA group of G heads costs G FMAs per cached
// element and pass, i.e. 4-8 FMAs per byte for int8 and 8-16 for int4 — more
// than the SMs can issue at memory speed. Here both products run on
// mma.sync.m16n8k16 (fp16 inputs, fp32 accumulation); the cores only convert
// the cached codes to fp16, which is exact for all four formats (int8 and
// int4 codes minus their zero point are small integers; fp8 values are a
// subset of fp16). The fp32 query and the fp32 softmax weights are split into
// fp16 hi + lo parts (two MMAs), so the products keep ~fp32 accuracy.
//
// Thread block = (partition, kv head, group of G <= 8 query heads, sequence),
// 4 warps; each warp takes 16-token tiles (one tile lies in one cache block).
//   K pass  D[16 tokens x 8 heads] += K[16 tokens x 16 dims] Q^T[16 dims x 8 heads]
//           lane (g, c) = (lane / 4, lane % 4) loads tokens g and g+8 and a set
//           of 8-dim groups of each; the dims are permuted consistently in K
//           and Q (a dot product does not care about the order).
//   softmax as in the CUDA-core kernel (shared memory, per head).
//   V pass  O^T[16 dims x 8 heads] += V^T[16 dims x 16 tokens] P^T[16 tokens x 8 heads]
//           lane (g, c) loads tokens 4c..4c+3 and its dims; PRMT interleaves
//           two tokens' bytes into the fp16 pairs the A operand wants.
// Per-token scales multiply the K-pass result rows and the V-pass weights;
// per-token (dynamic) zero points are subtracted exactly during the fp16
// conversion; static int8 zero points are folded per head at the end.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/kv_device.cuh"

namespace strata::cuda::detail {

constexpr int kMmaThreads = 128;
constexpr int kMmaWarps = kMmaThreads / 32;

template <KvDtype D>
constexpr bool kMmaFormat = D == KvDtype::kFp8E4M3 || D == KvDtype::kFp8E5M2 ||
                            D == KvDtype::kInt8 || D == KvDtype::kInt4;

__device__ __forceinline__ void Mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t H2Bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 BitsH2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// (x, y) -> fp16 pairs hi and lo with hi + lo ~ (x, y) to ~2^-22.
__device__ __forceinline__ void SplitPair(float x, float y, uint32_t* hi, uint32_t* lo) {
  const __half2 h = __floats2half2_rn(x, y);
  const float2 hf = __half22float2(h);
  *hi = H2Bits(h);
  *lo = H2Bits(__floats2half2_rn(x - hf.x, y - hf.y));
}

__device__ __forceinline__ uint32_t CvtE4M3x2(uint32_t two_bytes) {
  uint32_t r;
  const uint16_t in = static_cast<uint16_t>(two_bytes);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(in));
  return r;
}

__device__ __forceinline__ uint32_t Lop3AndOr(uint32_t x, uint32_t mask, uint32_t bits) {
  return (x & mask) | bits;  // compiles to one LOP3
}

constexpr uint32_t kMagic8 = 0x64646464u;    // bytes of fp16 1024 (0x6400)
constexpr uint32_t kMagic16 = 0x64006400u;   // fp16x2 (1024, 1024)

// Per-format conversion constants of one token (or token pair): subtract
// these (int) from the magic-number fp16 values to get code - zero exactly.
struct IntSub {
  uint32_t lo = 0;    // half2 to subtract from (1024 + code) / (1024 + u) values
  uint32_t hi_b = 0;  // int4 high nibbles: half2 bias for x * 1/16 + bias
};

// ---- K operand ---------------------------------------------------------------
// One token's 8-dim group (8-bit: w[0..1], int4: w[0]) -> the A-operand
// halves of two k-steps: out[ks][0] = positions (2c, 2c+1), out[ks][1] =
// positions (2c+8, 2c+9). kKDims gives the group dims of those positions,
// which the query fragments must follow.
template <KvDtype D>
struct KOperand {
  static constexpr bool kInt4 = D == KvDtype::kInt4;
  static constexpr int kWords = kInt4 ? 1 : 2;  // words per 8-dim group
  __device__ static constexpr int Dim(int ks, int slot) {
    // slot: 0,1 = positions 2c, 2c+1; 2,3 = positions 2c+8, 2c+9
    return kInt4 ? (ks * 2 + (slot >> 1) + 4 * (slot & 1)) : (ks * 4 + slot);
  }
  __device__ __forceinline__ static void Build(const uint32_t* w, const IntSub& sub,
                                               uint32_t (&out)[2][2]) {
    if constexpr (D == KvDtype::kInt8) {
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        const uint32_t u = w[ks] ^ 0x80808080u;
        out[ks][0] = H2Bits(__hsub2(BitsH2(__byte_perm(u, kMagic8, 0x4140u)), BitsH2(sub.lo)));
        out[ks][1] = H2Bits(__hsub2(BitsH2(__byte_perm(u, kMagic8, 0x4342u)), BitsH2(sub.lo)));
      }
    } else if constexpr (D == KvDtype::kFp8E4M3) {
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        out[ks][0] = CvtE4M3x2(w[ks] & 0xFFFFu);
        out[ks][1] = CvtE4M3x2(w[ks] >> 16);
      }
    } else if constexpr (D == KvDtype::kFp8E5M2) {
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        out[ks][0] = __byte_perm(w[ks], 0u, 0x1404u);
        out[ks][1] = __byte_perm(w[ks], 0u, 0x3424u);
      }
    } else {  // int4: dims (0,4),(1,5) | (2,6),(3,7)
      const __half2 sixteenth = __float2half2_rn(0.0625f);
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        const uint32_t x = ks == 0 ? w[0] : (w[0] >> 8);
        out[ks][0] = H2Bits(__hsub2(BitsH2(Lop3AndOr(x, 0x000F000Fu, kMagic16)), BitsH2(sub.lo)));
        out[ks][1] = H2Bits(__hfma2(BitsH2(Lop3AndOr(x, 0x00F000F0u, kMagic16)), sixteenth,
                                    BitsH2(sub.hi_b)));
      }
    }
  }
};

// ---- V operand ---------------------------------------------------------------
// One unit of dims (8-bit: 4 dims = 1 word, int4: 8 dims = 1 word) of four
// tokens w[0..3] (= tile tokens 4c..4c+3) -> kBlocks A operands of the
// V^T x P^T product. Block b covers dims (2b, 2b+1) of the unit:
//   a0 = (t0, t1) of dim 2b, a1 = (t0, t1) of dim 2b+1,
//   a2 = (t2, t3) of dim 2b, a3 = (t2, t3) of dim 2b+1.
template <KvDtype D>
struct VOperand {
  static constexpr bool kInt4 = D == KvDtype::kInt4;
  static constexpr int kDims = kInt4 ? 8 : 4;
  static constexpr int kBlocks = kDims / 2;
  // sub01 / sub23: constants for tokens (t0, t1) and (t2, t3).
  __device__ __forceinline__ static void Build(const uint32_t (&w)[4], const IntSub& sub01,
                                               const IntSub& sub23, uint32_t (&a)[kBlocks][4]) {
    if constexpr (kInt4) {
      const __half2 sixteenth = __float2half2_rn(0.0625f);
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {  // tokens (t0, t1) -> a0/a1, (t2, t3) -> a2/a3
        const IntSub& sub = pair ? sub23 : sub01;
        const uint32_t x_lo = __byte_perm(w[2 * pair], w[2 * pair + 1], 0x5410u);  // dims 0-3
        const uint32_t x_hi = __byte_perm(w[2 * pair], w[2 * pair + 1], 0x7632u);  // dims 4-7
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t x = (b < 2 ? x_lo : x_hi) >> (8 * (b & 1));
          a[b][2 * pair] =
              H2Bits(__hsub2(BitsH2(Lop3AndOr(x, 0x000F000Fu, kMagic16)), BitsH2(sub.lo)));
          a[b][2 * pair + 1] = H2Bits(__hfma2(BitsH2(Lop3AndOr(x, 0x00F000F0u, kMagic16)),
                                              sixteenth, BitsH2(sub.hi_b)));
        }
      }
    } else {
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        const IntSub& sub = pair ? sub23 : sub01;
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          // [t0 byte 2b, t1 byte 2b, t0 byte 2b+1, t1 byte 2b+1]
          const uint32_t x = __byte_perm(w[2 * pair], w[2 * pair + 1], b ? 0x7362u : 0x5140u);
          uint32_t lo, hi;  // dims 2b, 2b+1 as (t_even, t_odd) pairs
          if constexpr (D == KvDtype::kInt8) {
            const uint32_t u = x ^ 0x80808080u;
            lo = H2Bits(__hsub2(BitsH2(__byte_perm(u, kMagic8, 0x4140u)), BitsH2(sub.lo)));
            hi = H2Bits(__hsub2(BitsH2(__byte_perm(u, kMagic8, 0x4342u)), BitsH2(sub.lo)));
          } else if constexpr (D == KvDtype::kFp8E4M3) {
            lo = CvtE4M3x2(x & 0xFFFFu);
            hi = CvtE4M3x2(x >> 16);
          } else {  // e5m2
            lo = __byte_perm(x, 0u, 0x1404u);
            hi = __byte_perm(x, 0u, 0x3424u);
          }
          a[b][2 * pair] = lo;
          a[b][2 * pair + 1] = hi;
        }
      }
    }
  }
};

template <KvDtype D, int HD>
struct MmaCfg {
  static constexpr bool kInt4 = D == KvDtype::kInt4;
  // K pass: 8-dim groups, per lane c.
  static constexpr int kGroups = HD / 8;
  static constexpr int kGpl = (kGroups + 3) / 4;
  static constexpr bool kKContig = kGroups % 4 == 0;
  static constexpr int kGroupBytes = kInt4 ? 4 : 8;
  static constexpr int kKWords = kGpl * (kInt4 ? 1 : 2);
  // V pass: units (8-bit: quads, int4: octets), per lane g.
  static constexpr int kUnitDims = kInt4 ? 8 : 4;
  static constexpr int kUnits = HD / kUnitDims;
  static constexpr int kUpl = (kUnits + 7) / 8;
  static constexpr bool kVContig = kUnits % 8 == 0;
  static constexpr int kBlocks = kUpl * (kUnitDims / 2);
  static constexpr int kRowBytes = HD * KvDtypeBits(D) / 8;
  // Tiles per warp per iteration: the loads of all of them are in flight
  // together. The first GPU run (U = 2) was latency-bound: int4 (2 KB per warp
  // in flight) ran no faster than int8 (4 KB). Aim at ~8 KB per warp, within
  // 64 (int4: 48) data registers per lane so that nothing spills at 128.
  static constexpr int kKRegsPerTile = 2 * kKWords;
  static constexpr int kVRegsPerTile = 4 * kUpl;
  static constexpr int kMaxRegsPerTile = kKRegsPerTile > kVRegsPerTile ? kKRegsPerTile : kVRegsPerTile;
  static constexpr int kUnrollBytes = 8192 / (16 * kRowBytes);
  static constexpr int kUnrollRegs = (kInt4 ? 48 : 64) / kMaxRegsPerTile;  // int4: 64 spilled
  static constexpr int kUnroll = ClampInt(kUnrollBytes < kUnrollRegs ? kUnrollBytes : kUnrollRegs, 1, 8);
};

// Group index of (lane c, p) in the K pass; unit index of (lane g, i) in the V pass.
template <class Cfg>
__device__ __forceinline__ int KGroup(int c, int p) {
  return Cfg::kKContig ? c * Cfg::kGpl + p : p * 4 + c;
}
template <class Cfg>
__device__ __forceinline__ int VUnit(int g, int i) {
  return Cfg::kVContig ? g * Cfg::kUpl + i : i * 8 + g;
}

// Loads the K-pass words of one token row for lane c.
template <class Cfg>
__device__ __forceinline__ void LoadKRow(const uint8_t* row, int c, uint32_t (&w)[Cfg::kKWords]) {
  if constexpr (Cfg::kKContig) {
    LoadChunk<Cfg::kKWords * 4>(row + c * Cfg::kKWords * 4, w);
  } else {
    constexpr int kw = Cfg::kGroupBytes / 4;
#pragma unroll
    for (int p = 0; p < Cfg::kGpl; ++p) {
      const int j = KGroup<Cfg>(c, p);
      uint32_t t[kw];
      if (j < Cfg::kGroups) {
        LoadChunk<Cfg::kGroupBytes>(row + j * Cfg::kGroupBytes, t);
      } else {
#pragma unroll
        for (int k = 0; k < kw; ++k) t[k] = 0;
      }
#pragma unroll
      for (int k = 0; k < kw; ++k) w[p * kw + k] = t[k];
    }
  }
}

// Loads the V-pass words (one per unit) of one token row for lane g.
template <class Cfg>
__device__ __forceinline__ void LoadVRow(const uint8_t* row, int g, uint32_t (&w)[Cfg::kUpl]) {
  if constexpr (Cfg::kVContig) {
    LoadChunk<Cfg::kUpl * 4>(row + g * Cfg::kUpl * 4, w);
  } else {
#pragma unroll
    for (int i = 0; i < Cfg::kUpl; ++i) {
      const int u = VUnit<Cfg>(g, i);
      w[i] = u < Cfg::kUnits ? __ldg(reinterpret_cast<const uint32_t*>(row + u * 4)) : 0u;
    }
  }
}

// IntSub for one token (K pass: both halves the same token) or a token pair (V pass).
template <KvDtype D>
__device__ __forceinline__ IntSub MakeSub(float z0, float z1) {
  IntSub s;
  if constexpr (D == KvDtype::kInt8) {
    s.lo = H2Bits(__floats2half2_rn(1152.0f + z0, 1152.0f + z1));  // 1024 + 128 + z
  } else if constexpr (D == KvDtype::kInt4) {
    s.lo = H2Bits(__floats2half2_rn(1024.0f + z0, 1024.0f + z1));
    s.hi_b = H2Bits(__floats2half2_rn(-64.0f - z0, -64.0f - z1));
  }
  return s;
}

template <KvDtype D, KvScaleMode M, int HD, int G>
__global__ void __launch_bounds__(kMmaThreads, 4) DecodeMmaKernel(const DecodeParams p) {
  using Cfg = MmaCfg<D, HD>;
  using KOp = KOperand<D>;
  using VOp = VOperand<D>;
  constexpr bool kDynamic = M == KvScaleMode::kDynamic;
  constexpr bool kStatic = M == KvScaleMode::kStatic;
  constexpr bool kInt = KvDtypeIsInteger(D);
  constexpr int kU = Cfg::kUnroll;

  extern __shared__ __align__(16) float smem[];
  float* logits = smem;  // [logit_cap][G]; later [warps][G][HD]
  int32_t* sblk = reinterpret_cast<int32_t*>(smem + p.region_floats);
  float* sml = smem + p.region_floats + (p.partition >> p.log2_bs) + 1;

  const int split = blockIdx.x;
  const int seq = blockIdx.z;
  const int kvh = blockIdx.y / p.groups_per_kv;
  const int head0 = kvh * p.group + (blockIdx.y % p.groups_per_kv) * G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;

  const int ctx = p.context_lens[seq];
  const int token = p.query_start[seq];
  const int nsplit = (ctx + p.partition - 1) / p.partition;
  if (ctx <= 0 || nsplit > p.max_splits) {
    if (split == 0) {
      float* o = p.out + (static_cast<int64_t>(token) * p.num_heads + head0) * HD;
      for (int i = tid; i < G * HD; i += kMmaThreads) o[i] = ctx <= 0 ? 0.0f : NAN;
    }
    return;
  }
  if (split >= nsplit) return;
  const int start = split * p.partition;
  const int n = min(p.partition, ctx - start);
  const int ntiles = (n + 15) >> 4;
  const int first_blk = start >> p.log2_bs;
  {
    const int nblk = ((start + n - 1) >> p.log2_bs) - first_blk + 1;
    const int32_t* table =
        p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq + first_blk;
    for (int i = tid; i < nblk; i += kMmaThreads) sblk[i] = table[i];
  }

  // Query fragments (B operand of the K pass): head g, permuted dims.
  uint32_t qh[Cfg::kGpl][2][2], ql[Cfg::kGpl][2][2];
  {
    const float* qp = p.query + (static_cast<int64_t>(token) * p.num_heads + head0 + g) * HD;
#pragma unroll
    for (int gi = 0; gi < Cfg::kGpl; ++gi) {
      const int j = KGroup<Cfg>(c, gi);
      const bool ok = g < G && j < Cfg::kGroups;
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        float v[4];
#pragma unroll
        for (int s = 0; s < 4; ++s) v[s] = ok ? __ldg(qp + j * 8 + KOp::Dim(ks, s)) * p.q_scale : 0.0f;
        SplitPair(v[0], v[1], &qh[gi][ks][0], &ql[gi][ks][0]);
        SplitPair(v[2], v[3], &qh[gi][ks][1], &ql[gi][ks][1]);
      }
    }
  }
  // Static int8: sum of the scaled query per head (heads 2c, 2c+1), for the zero fold.
  float qsum[2] = {0.0f, 0.0f};
  if constexpr (kStatic && kInt) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (2 * c + k < G) {
        const float* qp = p.query + (static_cast<int64_t>(token) * p.num_heads + head0 + 2 * c + k) * HD;
        float s = 0.0f;
        for (int d = 0; d < HD; ++d) s += __ldg(qp + d) * p.q_scale;
        qsum[k] = s;
      }
    }
  }
  float static_ks = 1.0f, static_kz = 0.0f, static_vs = 1.0f, static_vz = 0.0f;
  if constexpr (kStatic) {
    static_ks = __ldg(p.cache.k_scale + kvh);
    static_vs = __ldg(p.cache.v_scale + kvh);
    if constexpr (kInt) {
      static_kz = __ldg(p.cache.k_zero + kvh);
      static_vz = __ldg(p.cache.v_zero + kvh);
    }
  }

  const uint8_t* pool = p.cache.pool;
  const KvBlockLayout& lay = p.cache.layout;
  const uint32_t block_bytes = lay.block_bytes;
  const uint32_t head_row = static_cast<uint32_t>(kvh) << p.log2_bs;
  const int bs_mask = (1 << p.log2_bs) - 1;
  __syncthreads();  // sblk

  // Address of the tile's first row in a section, and its scale index.
  auto tile_base = [&](int tile, uint32_t section, uint32_t* idx, const uint8_t** blk) {
    const int t0 = start + tile * 16;
    const int32_t b = sblk[(t0 >> p.log2_bs) - first_blk];
    *blk = pool + static_cast<int64_t>(b) * block_bytes;
    *idx = head_row + (t0 & bs_mask);
    return *blk + section + *idx * Cfg::kRowBytes;
  };

  // ---- K pass ---------------------------------------------------------------
  for (int tile0 = warp; tile0 < ntiles; tile0 += kMmaWarps * kU) {
    uint32_t kw[kU][2][Cfg::kKWords];
    uint32_t kmeta[kU][2];  // dynamic: fp16 scale bits | zero byte << 16 (rows g, g+8)
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int tile = tile0 + u * kMmaWarps;
      if (tile < ntiles) {
        uint32_t idx;
        const uint8_t* blk;
        const uint8_t* row = tile_base(tile, lay.k_data, &idx, &blk);
        LoadKRow<Cfg>(row + g * Cfg::kRowBytes, c, kw[u][0]);
        LoadKRow<Cfg>(row + (g + 8) * Cfg::kRowBytes, c, kw[u][1]);
        if constexpr (kDynamic) {
          const unsigned short* sc =
              reinterpret_cast<const unsigned short*>(blk + lay.k_scale) + idx;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            uint32_t meta = __ldg(sc + g + 8 * r);
            if constexpr (kInt) meta |= static_cast<uint32_t>(__ldg(blk + lay.k_zero + idx + g + 8 * r)) << 16;
            kmeta[u][r] = meta;
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int tile = tile0 + u * kMmaWarps;
      if (tile >= ntiles) break;  // warp-uniform
      IntSub sub0, sub1;
      if constexpr (kInt) {
        float z0 = 0.0f, z1 = 0.0f;
        if constexpr (kDynamic) {
          z0 = qmath::ZeroFromBits(D, static_cast<uint8_t>(kmeta[u][0] >> 16));
          z1 = qmath::ZeroFromBits(D, static_cast<uint8_t>(kmeta[u][1] >> 16));
        }
        sub0 = MakeSub<D>(z0, z0);
        sub1 = MakeSub<D>(z1, z1);
      }
      // Two independent accumulation chains (hi and lo query parts).
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc_lo[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int gi = 0; gi < Cfg::kGpl; ++gi) {
        uint32_t r0[2][2], r1[2][2];
        KOp::Build(&kw[u][0][gi * KOp::kWords], sub0, r0);
        KOp::Build(&kw[u][1][gi * KOp::kWords], sub1, r1);
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          Mma16816(acc, r0[ks][0], r1[ks][0], r0[ks][1], r1[ks][1], qh[gi][ks][0], qh[gi][ks][1]);
          Mma16816(acc_lo, r0[ks][0], r1[ks][0], r0[ks][1], r1[ks][1], ql[gi][ks][0], ql[gi][ks][1]);
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] += acc_lo[k];
      // acc: (token g, head 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int t = tile * 16 + g + 8 * r;
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int h = 2 * c + k;
          if (h < G) {
            float lg = acc[2 * r + k];
            if constexpr (kStatic && kInt) lg = fmaf(-static_kz, qsum[k], lg);
            if constexpr (kStatic) lg *= static_ks;
            if constexpr (kDynamic) lg *= Half2ToFloat2(kmeta[u][r] & 0xFFFFu).x;
            logits[t * G + h] = t < n ? lg : -INFINITY;
          }
        }
      }
    }
  }
  __syncthreads();

  // ---- softmax ----------------------------------------------------------------
  // The V weights (p, or p * s_t with s_t the token's V scale in dynamic mode)
  // are multiplied by a per-head power of two f that puts their maximum near
  // 2^14, so that their fp16 hi/lo parts stay normal down to tiny weights (a
  // second GPU run showed fp8 scales ~1e-5 times small p underflowing fp16).
  const int npad = ntiles * 16;
  for (int h = warp; h < G; h += kMmaWarps) {
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, logits[t * G + h]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.0f, wmax = 0.0f;
    for (int t = lane; t < npad; t += 32) {
      const float e = t < n ? exp2f(logits[t * G + h] - m) : 0.0f;
      sum += e;
      float w = e;
      if constexpr (kDynamic) {
        if (t < n) {
          const int at = start + t;
          const int32_t b = sblk[(at >> p.log2_bs) - first_blk];
          const unsigned short* sc = reinterpret_cast<const unsigned short*>(
              pool + static_cast<int64_t>(b) * block_bytes + lay.v_scale);
          w = e * Half2ToFloat2(__ldg(sc + head_row + (at & bs_mask))).x;
        }
      }
      wmax = fmaxf(wmax, w);
      logits[t * G + h] = w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      sum += __shfl_xor_sync(0xffffffffu, sum, o);
      wmax = fmaxf(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));
    }
    if (lane == 0) {
      sml[h] = m;
      sml[G + h] = sum;
      float f = 1.0f;
      if (wmax > 0.0f) {
        int ex;
        frexpf(wmax, &ex);  // wmax < 2^ex
        f = ldexpf(1.0f, 14 - ex);
      }
      sml[2 * G + h] = f;
    }
  }
  __syncthreads();

  // ---- V pass -------------------------------------------------------------------
  const float wscale = g < G ? sml[2 * G + g] : 1.0f;  // f of head g
  float acc[Cfg::kBlocks][4];
#pragma unroll
  for (int b = 0; b < Cfg::kBlocks; ++b) acc[b][0] = acc[b][1] = acc[b][2] = acc[b][3] = 0.0f;
  for (int tile0 = warp; tile0 < ntiles; tile0 += kMmaWarps * kU) {
    uint32_t vw[kU][4][Cfg::kUpl];
    uint32_t vzb[kU];  // dynamic int: zero bytes of tokens 4c..4c+3
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int tile = tile0 + u * kMmaWarps;
      if (tile < ntiles) {
        uint32_t idx;
        const uint8_t* blk;
        const uint8_t* row = tile_base(tile, lay.v_data, &idx, &blk);
#pragma unroll
        for (int i = 0; i < 4; ++i) LoadVRow<Cfg>(row + (4 * c + i) * Cfg::kRowBytes, g, vw[u][i]);
        if constexpr (kDynamic) {
          if constexpr (kInt) {
            vzb[u] = __ldg(reinterpret_cast<const uint32_t*>(blk + lay.v_zero + idx + 4 * c));
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int tile = tile0 + u * kMmaWarps;
      if (tile >= ntiles) break;  // warp-uniform
      // Weights of tokens 4c..4c+3 for head g; zero for padding tokens / heads.
      float w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = tile * 16 + 4 * c + i;
        const bool ok = t < n && g < G;
        float x = ok ? logits[t * G + (g < G ? g : 0)] : 0.0f;
        x *= wscale;
        w[i] = x;
        if (t >= n) {
#pragma unroll
          for (int k = 0; k < Cfg::kUpl; ++k) vw[u][i][k] = 0u;  // padding rows: finite codes
        }
      }
      uint32_t bh0, bl0, bh1, bl1;
      SplitPair(w[0], w[1], &bh0, &bl0);
      SplitPair(w[2], w[3], &bh1, &bl1);
      IntSub sub01, sub23;
      if constexpr (kInt) {
        if constexpr (kDynamic) {
          const bool ok0 = tile * 16 + 4 * c < n, ok1 = tile * 16 + 4 * c + 1 < n;
          const bool ok2 = tile * 16 + 4 * c + 2 < n, ok3 = tile * 16 + 4 * c + 3 < n;
          auto z = [&](int i) { return qmath::ZeroFromBits(D, static_cast<uint8_t>(vzb[u] >> (8 * i))); };
          sub01 = MakeSub<D>(ok0 ? z(0) : 0.0f, ok1 ? z(1) : 0.0f);
          sub23 = MakeSub<D>(ok2 ? z(2) : 0.0f, ok3 ? z(3) : 0.0f);
        } else {
          sub01 = sub23 = MakeSub<D>(0.0f, 0.0f);
        }
      }
#pragma unroll
      for (int i = 0; i < Cfg::kUpl; ++i) {
        const uint32_t words[4] = {vw[u][0][i], vw[u][1][i], vw[u][2][i], vw[u][3][i]};
        uint32_t a[VOp::kBlocks][4];
        VOp::Build(words, sub01, sub23, a);
#pragma unroll
        for (int b = 0; b < VOp::kBlocks; ++b) {
          float(&d)[4] = acc[i * VOp::kBlocks + b];
          Mma16816(d, a[b][0], a[b][1], a[b][2], a[b][3], bh0, bh1);
          Mma16816(d, a[b][0], a[b][1], a[b][2], a[b][3], bl0, bl1);
        }
      }
    }
  }
  __syncthreads();  // logits are dead: reuse the region
  float* red = smem;  // [warps][G][HD]
#pragma unroll
  for (int i = 0; i < Cfg::kUpl; ++i) {
    const int unit = VUnit<Cfg>(g, i);
    if (unit >= Cfg::kUnits) continue;
#pragma unroll
    for (int b = 0; b < VOp::kBlocks; ++b) {
      const int d0 = unit * Cfg::kUnitDims + 2 * b;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int h = 2 * c + k;
        if (h < G) {
          red[(warp * G + h) * HD + d0] = acc[i * VOp::kBlocks + b][k];
          red[(warp * G + h) * HD + d0 + 1] = acc[i * VOp::kBlocks + b][2 + k];
        }
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < G * HD; i += kMmaThreads) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) v += red[w * G * HD + i];
    const int h = i / HD, d = i % HD;
    v *= 1.0f / sml[2 * G + h];  // exact: f is a power of two
    if constexpr (kStatic) {
      if constexpr (kInt) v = fmaf(-static_vz, sml[G + h], v);
      v *= static_vs;
    }
    if (nsplit == 1) {
      p.out[(static_cast<int64_t>(token) * p.num_heads + head0 + h) * HD + d] = v / sml[G + h];
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * p.num_heads + head0 + h) * p.max_splits + split;
      p.part_out[part * HD + d] = v;
      if (d == 0) {
        p.part_ml[part * 2] = sml[h];
        p.part_ml[part * 2 + 1] = sml[G + h];
      }
    }
  }
}

}  // namespace strata::cuda::detail
