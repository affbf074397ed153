// Device-side helpers of the KV-cache kernels: vector loads of cache chunks
// and their fast decoding to floats. Internal to kernels/cuda.
//
// A "chunk" is 8 consecutive elements of one row (head_dim is a multiple of
// 8): 32 bytes of fp32, 16 of fp16/bf16, 8 of fp8/int8, 4 of int4. Decoding
// gives the raw value of each element: the real value for fp32/fp16/bf16, the
// unscaled fp8 value, the integer code q for int8 (-128..127) and int4
// (0..15). Scale and zero point are applied per token by the caller, which
// gives exactly qmath::KvCodec::Decode's values:
//   fp8: raw * s;  int: (raw - z) * s.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kv_cache_view.h"
#include "kernels/quant_math.h"

namespace strata::cuda::detail {

template <KvDtype D>
struct ChunkTraits {
  static constexpr int kBytes = KvDtypeBits(D);  // 8 elements * bits / 8
  static constexpr int kWords = kBytes / 4;
};

// Loads one chunk (aligned to its size) through the read-only path.
template <int kBytes>
__device__ __forceinline__ void LoadChunk(const uint8_t* p, uint32_t (&w)[kBytes / 4]) {
  if constexpr (kBytes == 32) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
    const uint4 b = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
  } else if constexpr (kBytes == 16) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
  } else if constexpr (kBytes == 8) {
    const uint2 a = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = a.x; w[1] = a.y;
  } else {
    w[0] = __ldg(reinterpret_cast<const uint32_t*>(p));
  }
}

__device__ __forceinline__ float2 Half2ToFloat2(uint32_t h2) {
  float2 r;
  asm("{\n\t.reg .f16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\tcvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi;\n\t}"
      : "=f"(r.x), "=f"(r.y)
      : "r"(h2));
  return r;
}

// 2^23 + byte, as a float: PRMT of byte k of `w` under 0x4B000000.
template <int k>
__device__ __forceinline__ float MagicByte(uint32_t w) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | k));
}

// Raw values of one chunk (see the file comment).
template <KvDtype D>
__device__ __forceinline__ void DecodeChunk(const uint32_t (&w)[ChunkTraits<D>::kWords],
                                            float (&x)[8]) {
  if constexpr (D == KvDtype::kFp32) {
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = __uint_as_float(w[i]);
  } else if constexpr (D == KvDtype::kFp16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = Half2ToFloat2(w[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  } else if constexpr (D == KvDtype::kBf16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  } else if constexpr (D == KvDtype::kFp8E4M3) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      uint32_t h01, h23;
      const uint16_t lo = static_cast<uint16_t>(w[i] & 0xFFFFu);
      const uint16_t hi = static_cast<uint16_t>(w[i] >> 16);
      asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h01) : "h"(lo));
      asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h23) : "h"(hi));
      const float2 a = Half2ToFloat2(h01), b = Half2ToFloat2(h23);
      x[4 * i] = a.x;
      x[4 * i + 1] = a.y;
      x[4 * i + 2] = b.x;
      x[4 * i + 3] = b.y;
    }
  } else if constexpr (D == KvDtype::kFp8E5M2) {
    // e5m2 is the top byte of an fp16.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float2 a = Half2ToFloat2(__byte_perm(w[i], 0u, 0x1404u));
      const float2 b = Half2ToFloat2(__byte_perm(w[i], 0u, 0x3424u));
      x[4 * i] = a.x;
      x[4 * i + 1] = a.y;
      x[4 * i + 2] = b.x;
      x[4 * i + 3] = b.y;
    }
  } else if constexpr (D == KvDtype::kInt8) {
    // q + 128 as an unsigned byte, then 2^23 + (q + 128) - (2^23 + 128) = q exactly.
    constexpr float kOff = 8388608.0f + 128.0f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t u = w[i] ^ 0x80808080u;
      x[4 * i] = MagicByte<0>(u) - kOff;
      x[4 * i + 1] = MagicByte<1>(u) - kOff;
      x[4 * i + 2] = MagicByte<2>(u) - kOff;
      x[4 * i + 3] = MagicByte<3>(u) - kOff;
    }
  } else {  // kInt4: element 2i is the low nibble of byte i, 2i+1 the high one
    constexpr float kOff = 8388608.0f;
    const uint32_t lo = w[0] & 0x0F0F0F0Fu;
    const uint32_t hi = (w[0] >> 4) & 0x0F0F0F0Fu;
    x[0] = MagicByte<0>(lo) - kOff;
    x[1] = MagicByte<0>(hi) - kOff;
    x[2] = MagicByte<1>(lo) - kOff;
    x[3] = MagicByte<1>(hi) - kOff;
    x[4] = MagicByte<2>(lo) - kOff;
    x[5] = MagicByte<2>(hi) - kOff;
    x[6] = MagicByte<3>(lo) - kOff;
    x[7] = MagicByte<3>(hi) - kOff;
  }
}

// Per-row scale and zero point of a token (s = 1, z = 0 where none).
template <KvDtype D, KvScaleMode M>
struct RowScaleReader {
  static constexpr bool kScaled = M != KvScaleMode::kNone;
  static constexpr bool kHasZero = KvDtypeIsInteger(D);
  float static_s = 1.0f, static_z = 0.0f;

  __device__ __forceinline__ void Init(const float* scale, const float* zero, int h) {
    if constexpr (M == KvScaleMode::kStatic) {
      static_s = __ldg(scale + h);
      if constexpr (kHasZero) static_z = __ldg(zero + h);
    }
  }
  // block: start of the block; scale_off/zero_off: section offsets; idx: scale_index.
  __device__ __forceinline__ void Read(const uint8_t* block, uint32_t scale_off, uint32_t zero_off,
                                       uint32_t idx, float* s, float* z) const {
    if constexpr (M == KvScaleMode::kDynamic) {
      const unsigned short bits =
          __ldg(reinterpret_cast<const unsigned short*>(block + scale_off) + idx);
      *s = Half2ToFloat2(bits).x;  // exact, = qmath::HalfBitsToFloat(bits)
      if constexpr (kHasZero) {
        const uint8_t zb = __ldg(block + zero_off + idx);
        *z = qmath::ZeroFromBits(D, zb);
      } else {
        *z = 0.0f;
      }
    } else {
      *s = static_s;
      *z = static_z;
    }
  }
};

}  // namespace strata::cuda::detail
