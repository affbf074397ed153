// Tensor-core decode attention for the 8-bit and 4-bit KV formats (fp8 e4m3,
// fp8 e5m2, int8, int4) and for fp16 / bf16 at head_dim 128, with block_size >= 16.
// Included by decode_attention.cuh.
//
// Why tensor cores: with CUDA-core FMAs a GQA group of G heads costs G FMAs
// per cached element and pass, i.e. 4-8 FMAs per byte for int8 and 8-16 for
// int4 — more than the SMs can issue at memory speed. Here both products run
// on mma.sync.m16n8k16 (fp16 inputs, fp32 accumulation); the cores only
// convert the cached codes to fp16, which is exact for all four formats (int8
// and int4 codes minus their zero point are small integers; fp8 values are a
// subset of fp16). fp16 needs no conversion (bf16 neither: its products run as
// bf16 MMAs, with bf16 hi + lo splits, ~2^-17); 16-bit caches run here for the
// one-pass tiles (no logits in shared memory, so partitions of 4096 tokens:
// one split and one wave at 4K context) and the cp.async ring, which for
// their 8 KB tiles holds half tiles (MmaCfg::kHalfRing) so that 4 thread
// blocks fit an SM. The fp32 query and the fp32 softmax weights are split into
// fp16 hi + lo parts, so the products keep ~fp32 accuracy. With G <= 4 heads
// per thread block (GQA 4, and no GQA) both parts share one MMA: the heads
// fill only half of the 8 B-operand columns, so columns 4-7 carry the lo
// parts and lanes c, c ^ 2 add the halves; G = 8 takes two MMAs.
//
// Thread block = (partition, kv head, group of G <= 8 query heads, sequence),
// 4 warps. Warp w takes the 16-token tiles w, w+4, ... of the partition (a
// tile lies in one cache block) and streams them through its own ring of
// shared-memory slots with cp.async: kStages-1 tiles (~8 KB) are in flight
// while one is computed, so memory latency is hidden by the warp itself (the
// previous kernel loaded into registers, waited, computed, and loaded again,
// and reached 30-75% of the copy bandwidth). A slot holds the tile's K rows,
// V rows and, in dynamic mode, its per-token scales / zero points. Per tile:
//   logits  D[16 tokens x 8 heads] = K[16 tokens x 16 dims] Q^T[16 dims x 8 heads]
//           lane (g, c) = (lane / 4, lane % 4) reads tokens g and g+8 and a set
//           of 8-dim groups of each; the dims are permuted consistently in K
//           and Q (a dot product does not care about the order).
//   softmax online, per warp and head (flash-decoding style): a running
//           reference, rescaling of the accumulators when it grows; the
//           weights go through a small per-warp transpose in shared memory.
//   PV      O^T[16 dims x 8 heads] += V^T[16 dims x 16 tokens] P^T[16 tokens x 8 heads]
//           lane (g, c) reads tokens 4c..4c+3 and its dims; PRMT interleaves
//           two tokens' bytes into the fp16 pairs the A operand wants.
// The four warps' (reference, sum, output) are combined at the end. K and V
// of a token are read once, in one pass, with no block-wide barrier.
// Per-token K scales multiply the logits, V scales the weights; per-token
// (dynamic) zero points are subtracted exactly during the fp16 conversion;
// static int8 zero points are folded per head.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "kernels/cuda/kv_device.cuh"
#include "kernels/cuda/decode_attention_mma_layout.cuh"
#include "kernels/cuda/decode_attention_mma_operands.cuh"
#include "kernels/cuda/mma_util.cuh"

namespace strata::cuda::detail {

// 2^x, flushing results below 2^-126 to 0 (one MUFU; exp2f adds a subnormal fix-up).
__device__ __forceinline__ float Exp2Ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}


constexpr float kWeightScale = 16384.0f;  // 2^14: V weights sit in [2^14, 2^15) at their maximum

template <KvDtype D, KvScaleMode M, int HD, int G>
__global__ void __launch_bounds__(kMmaThreads, kMmaBlocksPerSm) DecodeMmaKernel(const DecodeParams p) {
  using Cfg = MmaCfg<D, M, HD>;
  using Smem = MmaSmem<Cfg, G, HD>;
  using KOp = KOperand<D>;
  using VOp = VOperand<D>;
  constexpr bool kDynamic = M == KvScaleMode::kDynamic;
  constexpr bool kStatic = M == KvScaleMode::kStatic;
  constexpr bool kInt = KvDtypeIsInteger(D);
  constexpr int kS = Cfg::kStages;
  constexpr bool kBf = D == KvDtype::kBf16;  // bf16 MMAs and splits (a bf16 cache)
  // Subnormal integer codes with folded zero points (see STRATA_MMA_SUBNORMAL_INT).
  constexpr bool kRaw = STRATA_MMA_SUBNORMAL_INT && kDynamic && kInt;
  constexpr float kRawScale = 16777216.0f;  // 2^24
  // Hi/lo halves in one MMA (G <= 4): the B operands' columns 0-3 carry the
  // hi parts of heads 0-3 and columns 4-7 their lo parts, so each product is
  // one MMA instead of two; lanes c and c ^ 2 hold the two halves of the same
  // heads and add them with one shuffle (logits per tile, outputs at the end).
  constexpr bool kFold = G <= 4;

  extern __shared__ __align__(16) uint8_t mma_smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;
  uint8_t* ring = mma_smem + warp * Smem::kWarpBytes;  // [kS][slot]; later [G][HD] floats
  float* trans =  // [8 heads][kTransStride]: this warp's weight transpose
      reinterpret_cast<float*>(mma_smem + Smem::kTransOff) + warp * 8 * Smem::kTransStride;
  float* stat_r = reinterpret_cast<float*>(mma_smem + Smem::kStatsOff);  // [warps][8]
  float* stat_l = stat_r + kMmaWarps * 8;                                // [warps][8]
  int32_t* sblk = reinterpret_cast<int32_t*>(mma_smem + Smem::kBlkOff);

  const int split = blockIdx.x;
  const int seq = blockIdx.z;
  const int kvh = blockIdx.y / p.groups_per_kv;
  const int head0 = kvh * p.group + (blockIdx.y % p.groups_per_kv) * G;

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
  __syncthreads();  // sblk

  const uint8_t* pool = p.cache.pool;
  const KvBlockLayout& lay = p.cache.layout;
  const uint32_t block_bytes = lay.block_bytes;
  const uint32_t head_row = static_cast<uint32_t>(kvh) << p.log2_bs;
  const int bs_mask = (1 << p.log2_bs) - 1;
  // This warp's tiles: warp, warp + 4, ... (item i = tile warp + 4 i).
  const int my_tiles = warp < ntiles ? (ntiles - 1 - warp) / kMmaWarps + 1 : 0;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  // Starts the copies of item i into slot `slot`. A tile starts at a multiple
  // of 16 tokens of its block (partitions start at multiples of the block
  // size, blocks hold >= 16 tokens), so its 16 rows lie in one block, are
  // contiguous, and every source / destination is 16-byte aligned. Rows past
  // the context are copied too (stale cache bytes); they are masked below.
  // Lane l copies 16-byte chunks l, l + 32, ... of the K and the V rows and,
  // in dynamic mode, chunk l of the metadata (lanes 0-1: K scales, 2-3: V
  // scales, 4: K zeros, 5: V zeros).
  const uint32_t v_minus_k = lay.v_data - lay.k_data;
  uint32_t meta_off = 0, meta_shift = 0;  // metadata source: blk + meta_off + (idx << meta_shift)
  if constexpr (kDynamic) {
    meta_off = lane < 2 ? lay.k_scale + lane * 16
             : lane < 4 ? lay.v_scale + (lane - 2) * 16
             : lane == 4 ? lay.k_zero : lay.v_zero;
    meta_shift = lane < 4 ? 1 : 0;
  }
  // The cache block and the block row (its K / V sections) of item i's first token.
  struct TileAt {
    const uint8_t* blk;
    uint32_t idx;
  };
  auto tile_at = [&](int i) {
    const int t0 = start + (warp + i * kMmaWarps) * 16;
    const int32_t b = sblk[(t0 >> p.log2_bs) - first_blk];
    return TileAt{pool + static_cast<int64_t>(b) * block_bytes, head_row + (t0 & bs_mask)};
  };
  auto issue = [&](int i, int slot) {
    const TileAt t = tile_at(i);
    const uint8_t* ksrc = t.blk + (lay.k_data + t.idx * Cfg::kRowBytes + lane * 16);
    const uint8_t* vsrc = ksrc + v_minus_k;
    const uint32_t dst = ring_s + slot * Cfg::kSlotBytes;
#pragma unroll
    for (int k = 0; k < (Cfg::kTileChunks + 31) / 32; ++k) {
      if (Cfg::kTileChunks % 32 == 0 || lane + 32 * k < Cfg::kTileChunks) {
        uint32_t off = (lane + 32 * k) * 16;
        if constexpr (Cfg::kSwizzle) {  // 8 chunks per row
          const int row = (lane >> 3) + 4 * k;
          off = row * 128 + Cfg::Chunk(row, lane & 7) * 16;
        }
        CpAsync16(dst + off, ksrc + 512 * k);
        CpAsync16(dst + Cfg::kTileBytes + off, vsrc + 512 * k);
      }
    }
    if constexpr (kDynamic) {
      if (lane < Cfg::kMetaBytes / 16) {
        CpAsync16(dst + 2 * Cfg::kTileBytes + lane * 16, t.blk + (meta_off + (t.idx << meta_shift)));
      }
    }
  };

  // Half-tile ring (16-bit caches): half h (tile h / 2; K if h is even, V if
  // odd) into slot h % 3 of kTileBytes, 16 chunks per row, K and V swizzled apart.
  [[maybe_unused]] auto issue_half = [&](int h) {
    const TileAt t = tile_at(h >> 1);
    const uint8_t* src = t.blk + ((h & 1 ? lay.v_data : lay.k_data) + t.idx * Cfg::kRowBytes + lane * 16);
    const uint32_t dst = ring_s + (h % 3) * Cfg::kTileBytes;
#pragma unroll
    for (int k = 0; k < Cfg::kTileChunks / 32; ++k) {
      const int row = (lane >> 4) + 2 * k;
      const int chunk = h & 1 ? Cfg::VChunk(row, lane & 15) : Cfg::KChunk(row, lane & 15);
      CpAsync16(dst + row * 256 + chunk * 16, src + 512 * k);
    }
  };

  // Prologue: kS - 1 items in flight (one commit group per item, empty ones
  // included, so that wait_group<kS - 1> below always means "item i landed");
  // tile pairs: kS - 2 items (wait_group<kS - 2>: "items i, i + 1 landed");
  // half tiles: halves K0, V0, K1 (wait_group<2>: "the half about to be read
  // landed", with the two halves after it in flight).
  if constexpr (Cfg::kHalfRing) {
    static_assert(Cfg::kTileChunks % 32 == 0 && Cfg::kRowBytes == 256);
#pragma unroll 1
    for (int h = 0; h < 3; ++h) {
      if ((h >> 1) < my_tiles) issue_half(h);
      CpAsyncCommit();
    }
  } else {
    constexpr int kPrologue = Cfg::kPairs ? kS - 2 : kS - 1;
#pragma unroll 1
    for (int s = 0; s < kPrologue; ++s) {
      if (s < my_tiles) issue(s, s);
      CpAsyncCommit();
    }
  }

  // Query fragments (B operand of the K pass): head g, permuted dims. Loaded
  // while the first tiles are in flight.
  uint32_t qh[Cfg::kGpl][2][2], ql[Cfg::kGpl][2][2];
  float qpart = 0.0f;  // this lane's share of sum_d q[g][d] (static int8 zero fold)
  {
    const int qhead = kFold ? (g & 3) : g;  // fold: columns 4-7 = lo parts of heads 0-3
    const float* qp = p.query + (static_cast<int64_t>(token) * p.num_heads + head0 + qhead) * HD;
#pragma unroll
    for (int gi = 0; gi < Cfg::kGpl; ++gi) {
      const int j = KGroup<Cfg>(c, gi);
      const bool ok = qhead < G && j < Cfg::kGroups;
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        float v[4];
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          v[s] = ok ? __ldg(qp + j * 8 + KOp::Dim(ks, s)) * p.q_scale : 0.0f;
        }
        qpart += (v[0] + v[1]) + (v[2] + v[3]);
        if constexpr (kRaw && D == KvDtype::kInt4) {  // high nibbles are 16 u * 2^-24
          v[2] *= 0.0625f;
          v[3] *= 0.0625f;
        }
        SplitPairT<kBf>(v[0], v[1], &qh[gi][ks][0], &ql[gi][ks][0]);
        SplitPairT<kBf>(v[2], v[3], &qh[gi][ks][1], &ql[gi][ks][1]);
        if (kFold && g >= 4) {
          qh[gi][ks][0] = ql[gi][ks][0];
          qh[gi][ks][1] = ql[gi][ks][1];
        }
      }
    }
  }
  // Static int8: sum of the scaled query of heads 2c, 2c+1 (the K-pass result
  // columns of this lane; fold: heads 2 (c & 1), 2 (c & 1) + 1). The four
  // lanes of head g hold disjoint dims.
  float qsum[2] = {0.0f, 0.0f};
  if constexpr ((kStatic && kInt) || kRaw) {
    qpart += __shfl_xor_sync(0xffffffffu, qpart, 1);
    qpart += __shfl_xor_sync(0xffffffffu, qpart, 2);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      qsum[k] = __shfl_sync(0xffffffffu, qpart, (2 * (kFold ? (c & 1) : c) + k) * 4);
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

  // Online softmax per warp, for heads 2c + k (replicated over g):
  //   ref[k]  running reference (log2 domain), >= every logit + floor(log2 s_v)
  //           of the tokens seen (s_v = the token's V scale, dynamic mode only);
  //   lsum[k] this lane's part of sum_t exp2(logit_t - ref) (tokens g, g + 8);
  //   acc     O^T += V^T P^T with P = 2^14 exp2(logit - ref) s_v, which keeps the
  //           largest weight of a head in [2^14, 2^15): its fp16 hi/lo parts
  //           stay normal (tiny fp8 scales times small p once underflowed fp16).
  float ref[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.0f, 0.0f};
  float zsum[2] = {0.0f, 0.0f};  // kRaw: this lane's part of sum_t w_t z_t (V zero points)
  float acc[Cfg::kBlocks][4];
#pragma unroll
  for (int b = 0; b < Cfg::kBlocks; ++b) acc[b][0] = acc[b][1] = acc[b][2] = acc[b][3] = 0.0f;

  // ---- per-tile steps (shared by the loops below) ----
  // `masked` (std::true_type / std::false_type, warp-uniform): whether the
  // tile may hold rows past the context (the last tile of the partition, or
  // the phantom tile of a pair), which then need the selects below; every
  // other tile skips them.
  // Logits of a staged tile: lg[r][k] = token tok0 + g + 8r, head 2c + k
  // (D[16 tokens x 8 heads] = K Q^T); -inf past the context.
  auto tile_logits = [&](const uint8_t* sk, const uint8_t* sm, int tok0, float (&lg)[2][2], auto masked) {
    [[maybe_unused]] float kscale[2] = {1.0f, 1.0f};  // (dynamic mode)
    [[maybe_unused]] uint32_t kzb[2] = {0u, 0u};      // (dynamic integer formats)
    if constexpr (kDynamic) {
      const unsigned short* ks = reinterpret_cast<const unsigned short*>(sm);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        kscale[r] = Half2ToFloat2(ks[g + 8 * r]).x;
        if constexpr (kInt) kzb[r] = sm[64 + g + 8 * r];
      }
    }
    IntSub sub0, sub1;
    if constexpr (kInt && !kRaw) {
      sub0 = SubFromBytes<D>(kzb[0], 0x4040u);
      sub1 = SubFromBytes<D>(kzb[1], 0x4040u);
    }
    uint32_t kw0[Cfg::kKWords], kw1[Cfg::kKWords];
    if constexpr (!Cfg::k16Bit) {
      LdsKRow<Cfg>(sk, g, c, kw0);
      LdsKRow<Cfg>(sk, g + 8, c, kw1);
    }
    // Two independent accumulation chains (hi and lo query parts; fold: k-steps 0 and 1).
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d_lo[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int gi = 0; gi < Cfg::kGpl; ++gi) {
      if constexpr (Cfg::k16Bit) {  // a group (16 bytes) of each row at a time: fewer live registers
        const int j = KGroup<Cfg>(c, gi);
        LdsWords<16>(sk + g * 256 + Cfg::KChunk(g, j) * 16, &kw0[gi * 4]);
        LdsWords<16>(sk + (g + 8) * 256 + Cfg::KChunk(g + 8, j) * 16, &kw1[gi * 4]);
      }
      uint32_t r0[2][2], r1[2][2];
      if constexpr (kRaw) {
        KOp::BuildRaw(&kw0[gi * KOp::kWords], r0);
        KOp::BuildRaw(&kw1[gi * KOp::kWords], r1);
      } else {
        KOp::Build(&kw0[gi * KOp::kWords], sub0, r0);
        KOp::Build(&kw1[gi * KOp::kWords], sub1, r1);
      }
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        if constexpr (kFold) {  // two chains (k-steps 0 and 1), half the MMA latency
          MmaT<kBf>(ks ? d_lo : d, r0[ks][0], r1[ks][0], r0[ks][1], r1[ks][1], qh[gi][ks][0],
                   qh[gi][ks][1]);
        } else {
          MmaT<kBf>(d, r0[ks][0], r1[ks][0], r0[ks][1], r1[ks][1], qh[gi][ks][0], qh[gi][ks][1]);
          MmaT<kBf>(d_lo, r0[ks][0], r1[ks][0], r0[ks][1], r1[ks][1], ql[gi][ks][0],
                   ql[gi][ks][1]);
        }
      }
    }
    if constexpr (kFold) {  // the other half of the same heads sits in lane c ^ 2
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        d[i] += d_lo[i];
        d_lo[i] = __shfl_xor_sync(0xffffffffu, d[i], 2);
      }
    }
    // d: (token g, head 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool valid = tok0 + g + 8 * r < n;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float x = d[2 * r + k] + d_lo[2 * r + k];
        if constexpr (kRaw) {  // u = code + 128 (int8) / code (int4); the same for z
          const float kz = static_cast<float>(D == KvDtype::kInt8 ? kzb[r] ^ 0x80u : kzb[r]);
          x = fmaf(x, kRawScale, -kz * qsum[k]);
        }
        if constexpr (kStatic && kInt) x = fmaf(-static_kz, qsum[k], x);
        if constexpr (kStatic) x *= static_ks;
        if constexpr (kDynamic) x *= kscale[r];
        if constexpr (decltype(masked)::value) {
          lg[r][k] = valid ? x : -INFINITY;  // a select: stale rows may hold NaN codes
        } else {
          lg[r][k] = x;
        }
      }
    }
  };
  // V scales of tokens g, g + 8 of a staged tile, floor(log2) of them and
  // (kRaw) their V zero points.
  auto tile_vmeta = [&](const uint8_t* sm, float (&vscale)[2], float (&vexp)[2], float (&vz)[2]) {
    if constexpr (kDynamic) {
      const unsigned short* vs = reinterpret_cast<const unsigned short*>(sm + 32);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        vscale[r] = Half2ToFloat2(vs[g + 8 * r]).x;
        vexp[r] = FloorLog2(vscale[r]);  // finite for any bits; only used with finite lg
        if constexpr (kRaw) {
          const uint32_t zb = sm[80 + g + 8 * r];
          vz[r] = static_cast<float>(D == KvDtype::kInt8 ? zb ^ 0x80u : zb);
        }
      }
    }
  };
  // Grows the reference of head 2c + k to tmax (if larger), rescaling the sums.
  auto update_ref = [&](int k, float tmax) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
    // tmax is finite: token tok0 (lane g = 0, r = 0) is inside the context.
    if (tmax > ref[k]) {
      const float alpha = Exp2Ftz(ref[k] - tmax);  // 0 on the first tile
      lsum[k] *= alpha;
      if constexpr (kRaw) zsum[k] *= alpha;
#pragma unroll
      for (int b = 0; b < Cfg::kBlocks; ++b) {
        acc[b][k] *= alpha;
        acc[b][2 + k] *= alpha;
      }
      ref[k] = tmax;
    }
  };
  // Weights of head 2c + k of a tile into the transpose (columns col + g + 8r).
  auto tile_weights = [&](int k, const float (&lg)[2][2], const float (&vscale)[2],
                          const float (&vz)[2], int col, auto masked) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float e = Exp2Ftz(lg[r][k] - ref[k]);  // 0 past the context
      lsum[k] += e;
      float w = e * kWeightScale;
      if constexpr (kDynamic) {
        if constexpr (decltype(masked)::value) {
          w = lg[r][k] > -INFINITY ? w * vscale[r] : 0.0f;  // a stale row's scale may be NaN
        } else {
          w *= vscale[r];
        }
      }
      if constexpr (kRaw) zsum[k] = fmaf(w, vz[r], zsum[k]);
      trans[(2 * c + k) * Smem::kTransStride + col + g + 8 * r] = w;
    }
  };
  // O^T[16 dims x 8 heads] += V^T[16 dims x 16 tokens] P^T; wv = weights of
  // head g for tokens tok0 + 4c .. 4c + 3 (B operand).
  auto tile_pv = [&](const uint8_t* sv, const uint8_t* sm, int tok0, const float4 wv, auto masked) {
    uint32_t vw[4][Cfg::kUpl];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      LdsVRow<Cfg>(sv, 4 * c + t, g, vw[t]);
      if constexpr (decltype(masked)::value) {
        if (tok0 + 4 * c + t >= n) {
#pragma unroll
          for (int k = 0; k < Cfg::kUpl; ++k) vw[t][k] = 0u;  // stale rows: finite codes
        }
      }
    }
    uint32_t bh0, bl0, bh1, bl1;
    SplitPairT<kBf>(wv.x, wv.y, &bh0, &bl0);
    SplitPairT<kBf>(wv.z, wv.w, &bh1, &bl1);
    if (kFold && g >= 4) {  // row g of the transpose holds head g - 4 (lanes c >= 2 wrote it)
      bh0 = bl0;
      bh1 = bl1;
    }
    IntSub sub01, sub23;
    if constexpr (kInt && !kRaw) {
      uint32_t zb = 0u;  // zero-point bytes of tokens 4c .. 4c+3
      if constexpr (kDynamic) zb = *reinterpret_cast<const uint32_t*>(sm + 80 + 4 * c);
      sub01 = SubFromBytes<D>(zb, 0x4140u);
      sub23 = SubFromBytes<D>(zb, 0x4342u);
    }
#pragma unroll
    for (int u = 0; u < Cfg::kUpl; ++u) {
      const uint32_t words[4] = {vw[0][u], vw[1][u], vw[2][u], vw[3][u]};
      uint32_t a[VOp::kBlocks][4];
      if constexpr (kRaw) {
        VOp::BuildRaw(words, a);
      } else {
        VOp::Build(words, sub01, sub23, a);
      }
#pragma unroll
      for (int b = 0; b < VOp::kBlocks; ++b) {
        float(&o)[4] = acc[u * VOp::kBlocks + b];
        MmaT<kBf>(o, a[b][0], a[b][1], a[b][2], a[b][3], bh0, bh1);
        if constexpr (!kFold) MmaT<kBf>(o, a[b][0], a[b][1], a[b][2], a[b][3], bl0, bl1);
      }
    }
  };

  if constexpr (Cfg::kHalfRing) {
    for (int i = 0; i < my_tiles; ++i) {
      const int tok0 = (warp + i * kMmaWarps) * 16;  // partition-relative; tok0 < n
      const uint8_t* sk = ring + ((2 * i) % 3) * Cfg::kTileBytes;
      const uint8_t* sv = ring + ((2 * i + 1) % 3) * Cfg::kTileBytes;
      auto step = [&](auto masked) {
        CpAsyncWait<2>();  // K half of tile i (V_i and K_{i+1} may be in flight)
        __syncwarp();
        float lg[2][2];
        tile_logits(sk, nullptr, tok0, lg, masked);
        __syncwarp();  // every lane is done with K_i's slot: V_{i+1} goes there
        if (i + 1 < my_tiles) issue_half(2 * i + 3);
        CpAsyncCommit();
        float vscale[2] = {1.0f, 1.0f}, vexp[2] = {0.0f, 0.0f}, vz[2] = {0.0f, 0.0f};
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          update_ref(k, fmaxf(lg[0][k] + vexp[0], lg[1][k] + vexp[1]));
          tile_weights(k, lg, vscale, vz, 0, masked);
        }
        CpAsyncWait<2>();  // V half of tile i (K_{i+1} and V_{i+1} may be in flight)
        __syncwarp();      // ... landed for every lane; the weights are in `trans`
        const float4 wv = *reinterpret_cast<const float4*>(trans + g * Smem::kTransStride + 4 * c);
        tile_pv(sv, nullptr, tok0, wv, masked);
        __syncwarp();  // every lane is done with V_i's slot (K_{i+2} goes there) and `trans`
        if (i + 2 < my_tiles) issue_half(2 * i + 4);
        CpAsyncCommit();
      };
      if (tok0 + 16 <= n) {
        step(std::false_type{});
      } else {
        step(std::true_type{});
      }
    }
  } else if constexpr (!Cfg::kPairs) {
    int rd_slot = 0, wr_slot = kS - 1;
    for (int i = 0; i < my_tiles; ++i) {
      // Refill the slot read in iteration i - 1 (the __syncwarp at the end of
      // that iteration ordered all lanes' reads before these copies).
      if (i + kS - 1 < my_tiles) issue(i + kS - 1, wr_slot);
      CpAsyncCommit();
      wr_slot = wr_slot + 1 == kS ? 0 : wr_slot + 1;
      CpAsyncWait<kS - 1>();  // this lane's copies of item i have landed
      __syncwarp();           // ... and every lane's, visible to all
      const uint8_t* sk = ring + rd_slot * Cfg::kSlotBytes;
      const uint8_t* sv = sk + Cfg::kTileBytes;
      const uint8_t* sm = sv + Cfg::kTileBytes;
      const int tok0 = (warp + i * kMmaWarps) * 16;  // partition-relative; tok0 < n
      auto step = [&](auto masked) {
        float lg[2][2];
        tile_logits(sk, sm, tok0, lg, masked);

        // ---- online softmax: weights of this tile ----
        float vscale[2] = {1.0f, 1.0f}, vexp[2] = {0.0f, 0.0f}, vz[2] = {0.0f, 0.0f};
        tile_vmeta(sm, vscale, vexp, vz);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          update_ref(k, fmaxf(lg[0][k] + vexp[0], lg[1][k] + vexp[1]));
          tile_weights(k, lg, vscale, vz, 0, masked);
        }
        __syncwarp();
        // Weights of head g for tokens tok0 + 4c .. 4c + 3 (B operand of the V pass).
        const float4 wv = *reinterpret_cast<const float4*>(trans + g * Smem::kTransStride + 4 * c);
        tile_pv(sv, sm, tok0, wv, masked);
      };
      if (tok0 + 16 <= n) {
        step(std::false_type{});
      } else {
        step(std::true_type{});
      }
      rd_slot = rd_slot + 1 == kS ? 0 : rd_slot + 1;
      __syncwarp();  // all lanes are done with this slot and with `trans`
    }
  } else {
    // Pairs of items (i, i + 1), slots i % kS and (i + 1) % kS; the prologue
    // committed items 0 .. kS - 3. Item i + 1 may be a phantom (i + 1 ==
    // my_tiles): its tokens lie past the context (tile index >= ntiles), so
    // its slot's stale bytes are masked like the rows past a partial block.
    int rd_slot = 0, wr_slot = kS - 2;
    for (int i = 0; i < my_tiles; i += 2) {
      // Refill the two slots read in the previous iteration.
#pragma unroll
      for (int j = kS - 2; j < kS; ++j) {
        if (i + j < my_tiles) issue(i + j, wr_slot);
        CpAsyncCommit();
        wr_slot = wr_slot + 1 == kS ? 0 : wr_slot + 1;
      }
      CpAsyncWait<kS - 2>();  // this lane's copies of items i, i + 1 have landed
      __syncwarp();           // ... and every lane's, visible to all
      const int rd_b = rd_slot + 1 == kS ? 0 : rd_slot + 1;
      const uint8_t* sk_a = ring + rd_slot * Cfg::kSlotBytes;
      const uint8_t* sk_b = ring + rd_b * Cfg::kSlotBytes;
      const uint8_t* sm_a = sk_a + 2 * Cfg::kTileBytes;
      const uint8_t* sm_b = sk_b + 2 * Cfg::kTileBytes;
      const int tok_a = (warp + i * kMmaWarps) * 16;  // partition-relative; tok_a < n
      const int tok_b = tok_a + kMmaWarps * 16;

      auto step = [&](auto masked) {
        float lg_a[2][2], lg_b[2][2];
        tile_logits(sk_a, sm_a, tok_a, lg_a, masked);
        tile_logits(sk_b, sm_b, tok_b, lg_b, masked);

        // ---- online softmax: one reference update for both tiles ----
        float vscale_a[2] = {1.0f, 1.0f}, vexp_a[2] = {0.0f, 0.0f}, vz_a[2] = {0.0f, 0.0f};
        float vscale_b[2] = {1.0f, 1.0f}, vexp_b[2] = {0.0f, 0.0f}, vz_b[2] = {0.0f, 0.0f};
        tile_vmeta(sm_a, vscale_a, vexp_a, vz_a);
        tile_vmeta(sm_b, vscale_b, vexp_b, vz_b);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          // lg_b is -inf for a phantom tile, so the max is that of tile a alone.
          update_ref(k, fmaxf(fmaxf(lg_a[0][k] + vexp_a[0], lg_a[1][k] + vexp_a[1]),
                              fmaxf(lg_b[0][k] + vexp_b[0], lg_b[1][k] + vexp_b[1])));
          tile_weights(k, lg_a, vscale_a, vz_a, 0, masked);
          tile_weights(k, lg_b, vscale_b, vz_b, 16, masked);
        }
        __syncwarp();
        const float4 wv_a = *reinterpret_cast<const float4*>(trans + g * Smem::kTransStride + 4 * c);
        const float4 wv_b =
            *reinterpret_cast<const float4*>(trans + g * Smem::kTransStride + 16 + 4 * c);
        tile_pv(sk_a + Cfg::kTileBytes, sm_a, tok_a, wv_a, masked);
        tile_pv(sk_b + Cfg::kTileBytes, sm_b, tok_b, wv_b, masked);
      };
      // Tile b is the later one: both full, or the selects for both.
      if (tok_b + 16 <= n) {
        step(std::false_type{});
      } else {
        step(std::true_type{});
      }
      rd_slot = rd_b + 1 == kS ? 0 : rd_b + 1;
      __syncwarp();  // all lanes are done with these slots and with `trans`
    }
  }
  CpAsyncWait<0>();  // only empty groups can be pending; the ring becomes the output area
  __syncwarp();

  // ---- combine: lanes, then warps ----
#pragma unroll
  for (int k = 0; k < 2; ++k) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) lsum[k] += __shfl_xor_sync(0xffffffffu, lsum[k], o);
    if constexpr (kRaw) {
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) zsum[k] += __shfl_xor_sync(0xffffffffu, zsum[k], o);
    }
  }
  if constexpr (kFold) {  // hi (lanes c < 2) + lo (lanes c ^ 2) products of heads 2c + k
#pragma unroll
    for (int b = 0; b < Cfg::kBlocks; ++b) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[b][e] += __shfl_xor_sync(0xffffffffu, acc[b][e], 2);
    }
  }
  float* red = reinterpret_cast<float*>(ring);  // [G][HD], this warp's share
#pragma unroll
  for (int u = 0; u < Cfg::kUpl; ++u) {
    const int unit = VUnit<Cfg>(g, u);
    if (unit >= Cfg::kUnits) continue;
#pragma unroll
    for (int b = 0; b < VOp::kBlocks; ++b) {
      const int d0 = unit * Cfg::kUnitDims + 2 * b;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int h = 2 * c + k;
        if (h < G) {
          float v0 = acc[u * VOp::kBlocks + b][k], v1 = acc[u * VOp::kBlocks + b][2 + k];
          if constexpr (kRaw) {  // odd dims of an int4 unit are high nibbles: 16 u * 2^-24
            v0 = fmaf(v0, kRawScale, -zsum[k]);
            v1 = fmaf(v1, D == KvDtype::kInt4 ? kRawScale / 16.0f : kRawScale, -zsum[k]);
          }
          red[h * HD + d0] = v0;
          red[h * HD + d0 + 1] = v1;
        }
      }
    }
  }
  if (g == 0) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (2 * c + k < G) {
        stat_r[warp * 8 + 2 * c + k] = ref[k];  // -inf for a warp without tiles
        stat_l[warp * 8 + 2 * c + k] = lsum[k];
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < G * HD; i += kMmaThreads) {
    const int h = i / HD, d = i % HD;
    float rmax = -INFINITY;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) rmax = fmaxf(rmax, stat_r[w * 8 + h]);
    // rmax is finite: warp 0 has tile 0.
    float v = 0.0f, l = 0.0f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) {
      const float f = exp2f(stat_r[w * 8 + h] - rmax);
      v = fmaf(reinterpret_cast<const float*>(mma_smem + w * Smem::kWarpBytes)[i], f, v);
      l = fmaf(stat_l[w * 8 + h], f, l);
    }
    v *= 1.0f / kWeightScale;  // exact
    if constexpr (kStatic) {
      if constexpr (kInt) v = fmaf(-static_vz, l, v);
      v *= static_vs;
    }
    if (nsplit == 1) {
      p.out[(static_cast<int64_t>(token) * p.num_heads + head0 + h) * HD + d] = v / l;
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * p.num_heads + head0 + h) * p.max_splits + split;
      p.part_out[part * HD + d] = v;
      if (d == 0) {
        p.part_ml[part * 2] = rmax;  // the reference of `v` and `l` (log2 domain)
        p.part_ml[part * 2 + 1] = l;
      }
    }
  }
}

}  // namespace strata::cuda::detail
