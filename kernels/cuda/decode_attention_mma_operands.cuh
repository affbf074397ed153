// Operand builders of the tensor-core decode kernel (decode_attention_mma.cuh):
// cached 8-bit / 4-bit codes of K and V turned into the fp16 A operands of
// mma.sync m16n8k16, exactly (codes minus their integer zero points, fp8
// values; fp16 / bf16 values as they are), and the per-token zero-point
// constants they subtract. Internal to kernels/cuda.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/mma_util.cuh"
#include "kernels/kv_cache_view.h"

namespace strata::cuda::detail {

__device__ __forceinline__ uint32_t CvtE4M3x2(uint32_t two_bytes) {
  uint32_t r;
  const uint16_t in = static_cast<uint16_t>(two_bytes);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(in));
  return r;
}

// (x & mask) | bits in one LOP3 (written as C++, it compiles to two: SASS LOP3
// takes one immediate, and the compiler does not keep the other in a register).
__device__ __forceinline__ uint32_t Lop3AndOr(uint32_t x, uint32_t mask, uint32_t bits) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(mask), "r"(bits));
  return r;
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
  static constexpr bool k16Bit = D == KvDtype::kFp16 || D == KvDtype::kBf16;
  static constexpr int kWords = kInt4 ? 1 : k16Bit ? 4 : 2;  // words per 8-dim group
  __device__ static constexpr int Dim(int ks, int slot) {
    // slot: 0,1 = positions 2c, 2c+1; 2,3 = positions 2c+8, 2c+9
    return kInt4 ? (ks * 2 + (slot >> 1) + 4 * (slot & 1)) : (ks * 4 + slot);
  }
  __device__ __forceinline__ static void Build(const uint32_t* w, const IntSub& sub,
                                               uint32_t (&out)[2][2]) {
    if constexpr (k16Bit) {  // w[2 ks + i] = dims (4 ks + 2 i, 4 ks + 2 i + 1)
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        out[ks][0] = w[2 * ks];
        out[ks][1] = w[2 * ks + 1];
      }
    } else if constexpr (D == KvDtype::kInt8) {
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
  // Integer formats, subnormal mode (STRATA_MMA_SUBNORMAL_INT): the same
  // positions as fp16 subnormals u * 2^-24 (int4 high nibbles: u * 2^-20).
  __device__ __forceinline__ static void BuildRaw(const uint32_t* w, uint32_t (&out)[2][2]) {
    static_assert(D == KvDtype::kInt8 || D == KvDtype::kInt4);
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      if constexpr (D == KvDtype::kInt8) {
        const uint32_t u = w[ks] ^ 0x80808080u;
        out[ks][0] = __byte_perm(u, 0u, 0x4140u);
        out[ks][1] = __byte_perm(u, 0u, 0x4342u);
      } else {
        const uint32_t x = ks == 0 ? w[0] : (w[0] >> 8);
        out[ks][0] = x & 0x000F000Fu;
        out[ks][1] = x & 0x00F000F0u;
      }
    }
  }
};

// ---- V operand ---------------------------------------------------------------
// One unit of dims (8-bit: 4 dims = 1 word, int4: 8 dims = 1 word, fp16 /
// bf16: 2 dims = 1 word) of four tokens w[0..3] (= tile tokens 4c..4c+3) ->
// kBlocks A operands of the V^T x P^T product. Block b covers dims (2b, 2b+1)
// of the unit:
//   a0 = (t0, t1) of dim 2b, a1 = (t0, t1) of dim 2b+1,
//   a2 = (t2, t3) of dim 2b, a3 = (t2, t3) of dim 2b+1.
template <KvDtype D>
struct VOperand {
  static constexpr bool kInt4 = D == KvDtype::kInt4;
  static constexpr bool k16Bit = D == KvDtype::kFp16 || D == KvDtype::kBf16;
  static constexpr int kDims = kInt4 ? 8 : k16Bit ? 2 : 4;
  static constexpr int kBlocks = kDims / 2;
  // sub01 / sub23: constants for tokens (t0, t1) and (t2, t3).
  __device__ __forceinline__ static void Build(const uint32_t (&w)[4], const IntSub& sub01,
                                               const IntSub& sub23, uint32_t (&a)[kBlocks][4]) {
    if constexpr (k16Bit) {  // the two tokens' low halves (dim 0), high halves (dim 1)
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        a[0][2 * pair] = __byte_perm(w[2 * pair], w[2 * pair + 1], 0x5410u);
        a[0][2 * pair + 1] = __byte_perm(w[2 * pair], w[2 * pair + 1], 0x7632u);
      }
    } else if constexpr (kInt4) {
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
  // Integer formats, subnormal mode: as Build, codes as fp16 subnormals
  // u * 2^-24 (int4 odd dims, the high nibbles: u * 2^-20), no zero point.
  __device__ __forceinline__ static void BuildRaw(const uint32_t (&w)[4],
                                                  uint32_t (&a)[kBlocks][4]) {
    static_assert(D == KvDtype::kInt8 || D == KvDtype::kInt4);
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      if constexpr (kInt4) {
        const uint32_t x_lo = __byte_perm(w[2 * pair], w[2 * pair + 1], 0x5410u);  // dims 0-3
        const uint32_t x_hi = __byte_perm(w[2 * pair], w[2 * pair + 1], 0x7632u);  // dims 4-7
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t x = (b < 2 ? x_lo : x_hi) >> (8 * (b & 1));
          a[b][2 * pair] = x & 0x000F000Fu;
          a[b][2 * pair + 1] = x & 0x00F000F0u;
        }
      } else {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const uint32_t u =
              __byte_perm(w[2 * pair], w[2 * pair + 1], b ? 0x7362u : 0x5140u) ^ 0x80808080u;
          a[b][2 * pair] = __byte_perm(u, 0u, 0x4140u);
          a[b][2 * pair + 1] = __byte_perm(u, 0u, 0x4342u);
        }
      }
    }
  }
};

// IntSub of two tokens from their stored zero-point bytes: the tokens of bytes
// (sel & 0xF) and ((sel >> 8) & 0xF) of `zb` go to the low and the high half
// (sel = 0x4140: bytes 0, 1; 0x4342: bytes 2, 3; 0x4040: byte 0 twice).
// Integer ops only: 1152 + z (int8, z = int8 byte) is the fp16 0x6400 | (byte ^
// 0x80); 1024 + z (int4, z = 0..15) is 0x6400 | z; -64 - z is 0xD400 + 16 z.
// Any byte gives a finite constant (stale bytes past the context meet zeroed
// codes and zero weights). zb = 0: no zero point.
template <KvDtype D>
__device__ __forceinline__ IntSub SubFromBytes(uint32_t zb, uint32_t sel) {
  IntSub s;
  if constexpr (D == KvDtype::kInt8) {
    s.lo = __byte_perm(zb ^ 0x80808080u, kMagic8, sel);
  } else if constexpr (D == KvDtype::kInt4) {
    s.lo = __byte_perm(zb, kMagic8, sel);
    s.hi_b = __byte_perm(zb << 4, 0xD4D4D4D4u, sel);
  }
  return s;
}

}  // namespace strata::cuda::detail
