// Configuration and shared-memory staging of the tensor-core decode kernel
// (decode_attention_mma.cuh): its compile-time switches, the per-format tile
// and ring layout (MmaCfg), the shared-memory plan of a thread block
// (MmaSmem), the cp.async helpers and the reads of a staged tile's K and V
// rows. Internal to kernels/cuda.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/kv_device.cuh"
#include "kernels/kv_cache_view.h"

// Dynamic int8 / int4 codes as fp16 subnormals (compile-time switch, default
// off: on an H100 it passed the 444 kernel tests but measured within noise of
// the default, bench/results/decode_attention_2026-11-26_h100.md): instead of the magic-number conversion and a
// per-element subtraction of the token's zero point, a code u enters the MMAs
// as the fp16 subnormal u * 2^-24 (int8: u = byte ^ 0x80 = code + 128 in
// [0, 255]; int4 low nibble u * 2^-24, high nibble u * 2^-20, both exact) —
// one PRMT or LOP3 per two codes. The zero points are folded outside the MMAs
// as in the static mode: logit = s_k (2^24 q.u - z_k sum q) per token, and
// out = 2^24 sum_t w_t u_t - sum_t w_t z_t with a per-lane running sum of
// w_t z_t rescaled together with the softmax sum. The int4 high-nibble query
// dims are pre-scaled by 1/16 (exact); high-nibble V rows are scaled by 2^20
// instead of 2^24 at the end. Relies on mma.sync taking fp16 subnormal inputs
// exactly. Build with -DSTRATA_MMA_SUBNORMAL_INT=1 to enable.
#ifndef STRATA_MMA_SUBNORMAL_INT
#define STRATA_MMA_SUBNORMAL_INT 0
#endif

// Two tiles per loop iteration (compile-time switch; dynamic int4 only):
// each warp takes its items in pairs
// (i, i + 1) = tiles (warp + 4 i, warp + 4 i + 4). Per pair one cp.async wait
// and __syncwarp, one online-softmax reference update (a single max reduction
// over both tiles' logits, one rescale), both QK products before the softmax
// and both PV products after it; the weight transpose holds both tiles. A
// warp with an odd number of items runs its last pair with a phantom second
// tile (tokens past the context: -inf logits, zeroed V codes, zero weights),
// which adds exact zeros. The ring gets one more slot, so that the same
// ~8 KB stays in flight while a pair is computed. On by default: on an H100
// it passed the 444 kernel tests and took int4 at 4K context from 133.1 to
// 129.5 us (bench/results/decode_attention_2026-11-26_h100.md);
// -DSTRATA_MMA_TILE_PAIRS=0 restores the one-tile loop.
#ifndef STRATA_MMA_TILE_PAIRS
#define STRATA_MMA_TILE_PAIRS 1
#endif

namespace strata::cuda::detail {

constexpr int kMmaThreads = 128;
constexpr int kMmaWarps = kMmaThreads / 32;

// ---- configuration -----------------------------------------------------------

template <KvDtype D, KvScaleMode M, int HD>
struct MmaCfg {
  static constexpr bool kInt4 = D == KvDtype::kInt4;
  // 16-bit caches (fp16, bf16): their values are the MMA operands as they are.
  static constexpr bool k16Bit = D == KvDtype::kFp16 || D == KvDtype::kBf16;
  static_assert(!k16Bit || HD == 128, "16-bit caches run on tensor cores at head_dim 128 only");
  // K pass: 8-dim groups, per lane c (16-bit: group p * 4 + c, which the
  // swizzle below keeps free of bank conflicts).
  static constexpr int kGroups = HD / 8;
  static constexpr int kGpl = (kGroups + 3) / 4;
  static constexpr bool kKContig = kGroups % 4 == 0 && !k16Bit;
  static constexpr int kGroupBytes = kInt4 ? 4 : k16Bit ? 16 : 8;
  static constexpr int kKWords = kGpl * kGroupBytes / 4;
  // V pass: units (8-bit: quads, int4: octets, 16-bit: pairs: one 32-bit
  // word each), per lane g.
  static constexpr int kUnitDims = kInt4 ? 8 : k16Bit ? 2 : 4;
  static constexpr int kUnits = HD / kUnitDims;
  static constexpr int kUpl = (kUnits + 7) / 8;
  static constexpr bool kVContig = kUnits % 8 == 0;
  static constexpr int kBlocks = kUpl * (kUnitDims / 2);
  static constexpr int kRowBytes = HD * KvDtypeBits(D) / 8;
  // Shared-memory pipeline. A slot holds one 16-token tile: its K rows, its V
  // rows (each a verbatim copy of the 16 contiguous rows of the block) and, in
  // dynamic mode, the tile's per-token metadata:
  //   [0, 32) K scales, [32, 64) V scales, [64, 80) K zeros, [80, 96) V zeros.
  static constexpr int kTileBytes = 16 * kRowBytes;  // multiple of 16 for every HD
  static constexpr int kTileChunks = kTileBytes / 16;
  static constexpr bool kDynamic = M == KvScaleMode::kDynamic;
  static constexpr int kMetaBytes = kDynamic ? (KvDtypeIsInteger(D) ? 96 : 64) : 0;
  // Slots start on a 128-byte grid: a dynamic tile's 64 or 96 bytes of
  // metadata would otherwise shift every later slot of the ring off it (int8:
  // slot bases at 96 mod 128). Measured on an H100 (batch 64, 4K context, old
  // and new binaries alternately): int8 dynamic 200.7-201.2 -> 196.0-197.1 us,
  // fp8 e4m3 dynamic 196.8-198.1 -> 193.8-193.9, int4 116.2-118.6 -> 112.5-113.2
  // (with the ring rule below); static formats have 4096-byte slots already
  // (bench/results/decode_attention_2026-11-27_h100.md).
  static constexpr int kSlotBytes = (2 * kTileBytes + kMetaBytes + 127) / 128 * 128;
  // Slots per warp: ~8 KB per warp stays in flight while one tile is computed
  // (the previous kernel, with <= 8 KB in registers and none while computing,
  // was latency-bound; 12 KB, at 3 thread blocks per SM, measured on an H100:
  // no faster at 4K context, 10-20% slower at 512). Tile pairs
  // (STRATA_MMA_TILE_PAIRS) read two slots per iteration and follow the same
  // rule, so ~2 KB less is in flight while a pair is computed (int4, head_dim
  // 128: 5 slots of 2176 bytes; six would not fit 4 thread blocks per SM).
  static constexpr bool kPairs =
      STRATA_MMA_TILE_PAIRS && kDynamic && D == KvDtype::kInt4;
  static constexpr int kStages = ClampInt(1 + (8192 + kSlotBytes - 1) / kSlotBytes, kPairs ? 4 : 2,
                                          kPairs ? 10 : 8);
  // 16-bit: a tile's K rows and V rows are 4 KB each, so a ring of whole-tile
  // slots (2 x 8 KB per warp) would leave room for only 3 thread blocks per
  // SM. Its ring holds half tiles instead: 3 slots of 4 KB per warp, filled
  // in the order K0 V0 K1 V1 ... (half h in slot h % 3); while a tile's K
  // half is read the next K half is in flight, while its V half is read the
  // next K and V halves are (~6 KB on average), and 4 blocks fit an SM.
  static constexpr bool kHalfRing = k16Bit;
  static constexpr int kRingBytes = kHalfRing ? 3 * kTileBytes : kStages * kSlotBytes;
  // 128-byte rows (head_dim 128, 8-bit): 16-byte chunk c of row r is stored at
  // c ^ Swz(r), which makes both the K-pass reads (rows g, chunks 2c, 2c+1)
  // and the V-pass reads (rows 4c+i, chunk g) free of bank conflicts. Other
  // row sizes are stored as they are (at most 2-way conflicts).
  static constexpr bool kSwizzle = kRowBytes == 128;
  __device__ __forceinline__ static int Swz(int row) { return (row & 1) | ((row >> 1) & 6); }
  __device__ __forceinline__ static int Chunk(int row, int chunk) {
    return kSwizzle ? chunk ^ Swz(row) : chunk;
  }
  // 16-bit (256-byte rows: chunks c and c + 8 share banks), K and V swizzled
  // apart. K pass: the lanes of a quarter warp read chunk 4p + c of rows g,
  // g + 1 (g even): row bit 0 flips chunk bit 2. V pass: they read chunk g
  // (and g + 8) of rows 4c + t: row bits 2-3 flip chunk bits 1-2. Either way
  // the eight 16-byte reads of a quarter warp cover all 32 banks.
  // (16-bit caches only.)
  __device__ __forceinline__ static int KChunk(int row, int chunk) { return chunk ^ ((row & 1) << 2); }
  __device__ __forceinline__ static int VChunk(int row, int chunk) {
    return chunk ^ (((row >> 2) & 3) << 1);
  }
};
static_assert(MmaCfg<KvDtype::kInt4, KvScaleMode::kDynamic, 48>::kTileBytes % 16 == 0);

// Shared memory of one thread block (bytes): per-warp slot rings (reused for
// the per-warp output at the end), per-warp weight transposes, per-warp
// softmax statistics, the partition's block ids.
template <class Cfg, int G, int HD>
struct MmaSmem {
  static constexpr int kRing = Cfg::kRingBytes;
  static constexpr int kRed = G * HD * 4;
  static constexpr int kWarpBytes =  // each warp's ring on the slots' 128-byte grid
      ((kRing > kRed ? kRing : kRed) + 127) / 128 * 128;
  // Floats per head: conflict-free transposed writes (tile pairs: tile t at
  // columns 16 t of a 36-float row; 72 c mod 32 = 8 c keeps the writes apart).
  static constexpr int kTransStride = Cfg::kPairs ? 36 : 20;
  static constexpr int kTransOff = kMmaWarps * kWarpBytes;
  static constexpr int kStatsOff = kTransOff + kMmaWarps * 8 * kTransStride * 4;
  static constexpr int kBlkOff = kStatsOff + 2 * kMmaWarps * 8 * 4;
  static constexpr int Bytes(int blk_ints) { return kBlkOff + blk_ints * 4; }
};

// ---- cp.async helpers ---------------------------------------------------------

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// kBytes (4, 8 or 16, aligned) from shared memory.
template <int kBytes>
__device__ __forceinline__ void LdsWords(const uint8_t* p, uint32_t* w) {
  if constexpr (kBytes == 16) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
  } else if constexpr (kBytes == 8) {
    const uint2 a = *reinterpret_cast<const uint2*>(p);
    w[0] = a.x; w[1] = a.y;
  } else {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  }
}

// Group index of (lane c, p) in the K pass; unit index of (lane g, i) in the V pass.
template <class Cfg>
__device__ __forceinline__ int KGroup(int c, int p) {
  return Cfg::kKContig ? c * Cfg::kGpl + p : p * 4 + c;
}
template <class Cfg>
__device__ __forceinline__ int VUnit(int g, int i) {
  // 16-bit: chunks g and g + 8 of the row, 4 words (units) each.
  if constexpr (Cfg::k16Bit) return (g + 8 * (i >> 2)) * 4 + (i & 3);
  return Cfg::kVContig ? g * Cfg::kUpl + i : i * 8 + g;
}

// The K-pass words of row `row` of a staged tile for lane c.
template <class Cfg>
__device__ __forceinline__ void LdsKRow(const uint8_t* tile, int row, int c,
                                        uint32_t (&w)[Cfg::kKWords]) {
  const uint8_t* r = tile + row * Cfg::kRowBytes;
  if constexpr (Cfg::kKContig) {
    constexpr int kBytes = Cfg::kKWords * 4;
    if constexpr (kBytes == 32) {  // chunks 2c, 2c+1
      LdsWords<16>(r + Cfg::Chunk(row, 2 * c) * 16, &w[0]);
      LdsWords<16>(r + Cfg::Chunk(row, 2 * c + 1) * 16, &w[4]);
    } else {
      static_assert(!Cfg::kSwizzle);
      LdsWords<kBytes>(r + c * kBytes, w);
    }
  } else {
    constexpr int kw = Cfg::kGroupBytes / 4;
#pragma unroll
    for (int p = 0; p < Cfg::kGpl; ++p) {
      const int j = KGroup<Cfg>(c, p);
      if (j < Cfg::kGroups) {
        LdsWords<Cfg::kGroupBytes>(r + j * Cfg::kGroupBytes, &w[p * kw]);
      } else {
#pragma unroll
        for (int k = 0; k < kw; ++k) w[p * kw + k] = 0;
      }
    }
  }
}

// The V-pass words (one per unit) of row `row` of a staged tile for lane g.
template <class Cfg>
__device__ __forceinline__ void LdsVRow(const uint8_t* tile, int row, int g,
                                        uint32_t (&w)[Cfg::kUpl]) {
  const uint8_t* r = tile + row * Cfg::kRowBytes;
  if constexpr (Cfg::k16Bit) {  // chunks g, g + 8 (VUnit)
    LdsWords<16>(r + Cfg::VChunk(row, g) * 16, &w[0]);
    LdsWords<16>(r + Cfg::VChunk(row, g + 8) * 16, &w[4]);
  } else if constexpr (Cfg::kVContig) {
    constexpr int kBytes = Cfg::kUpl * 4;
    if constexpr (kBytes == 16) {  // chunk g
      LdsWords<16>(r + Cfg::Chunk(row, g) * 16, w);
    } else {
      static_assert(!Cfg::kSwizzle);
      LdsWords<kBytes>(r + g * kBytes, w);
    }
  } else {
#pragma unroll
    for (int i = 0; i < Cfg::kUpl; ++i) {
      const int u = VUnit<Cfg>(g, i);
      w[i] = u < Cfg::kUnits ? *reinterpret_cast<const uint32_t*>(r + u * 4) : 0u;
    }
  }
}

}  // namespace strata::cuda::detail
