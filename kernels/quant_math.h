// Scalar quantization math shared by the CPU kernels and the CUDA kernels.
//
// Header-only and usable from host and device (STRATA_HD). Every conversion
// that produces stored bits is implemented here in software with IEEE float
// arithmetic (true division, round-to-nearest-even via rintf) so that a cache
// written on the CPU and one written on the GPU are bit-identical. Build
// without fast-math (nvcc's default -prec-div=true, -ftz=false; no
// -ffast-math on the host).
//
// Formulas (x: one row of head_dim floats of one token and one kv head):
//   fp32           copy
//   fp16 / bf16    round-to-nearest-even cast (overflow -> inf, as IEEE)
//   fp8 (any)      q = sat_cast(x / s), x' = q * s   (s = 1 for scale mode none;
//                  saturating: |x / s| >= max finite -> +-max finite, NaN -> NaN)
//   fp8_e4m3 dyn   s = amax / 448 (amax == 0 -> 1), stored as fp16 s_h
//   int8 static    q = clamp(rne(x / s + z), -128, 127), x' = (q - z) * s
//   int8 dynamic   mn = min(min x, 0), mx = max(max x, 0), s = (mx - mn) / 255
//                  (0 -> 1), s_h = fp16(s), z = clamp(rne(-128 - mn / s_h), -128, 127),
//                  q = clamp(rne(x / s_h) + z, -128, 127), x' = (q - z) * s_h
//   int4 dynamic   s = (mx - mn) / 15, s_h = fp16(s), z = clamp(rne(-mn / s_h), 0, 15),
//                  q = clamp(rne(x / s_h) + z, 0, 15), x' = (q - z) * s_h
// Degenerate-range guard (dynamic modes): when fp16(s) underflows to 0 it is
// replaced by the smallest fp16 subnormal (2^-24), and when it overflows to
// inf by the largest finite fp16 (65504); the stored s_h is what is used for
// both quantization and dequantization, so the round trip stays consistent.
// Inputs are expected to be finite.
#pragma once

#include <cstdint>
#include <cstring>

#include <math.h>

#include "runtime/kv_format.h"

namespace strata::qmath {

STRATA_HD inline uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

STRATA_HD inline float BitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Round to nearest, ties to even, in the default rounding mode. Same result on
// host (rintf) and device (rintf -> cvt.rni).
STRATA_HD inline float Rne(float x) { return rintf(x); }

STRATA_HD inline float Clamp(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

// ---- fp16 -------------------------------------------------------------------

// float -> IEEE binary16 bits, round-to-nearest-even; overflow -> inf.
STRATA_HD inline uint16_t FloatToHalfBits(float f) {
  const uint32_t x = FloatBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {
    // Below 2^-14: fp16 subnormal (or zero). |f| * 2^24 is exact; rint rounds
    // to the subnormal quantum. 1024 encodes the smallest normal, correctly.
    const float a = BitsFloat(ax) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(Rne(a)));
  }
  uint32_t r = ax - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0x0FFFu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

STRATA_HD inline float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24
    return sign ? -v : v;
  }
  if (e == 31) return BitsFloat(sign | 0x7F800000u | (m << 13));
  return BitsFloat(sign | ((e + 112u) << 23) | (m << 13));
}

// ---- bf16 -------------------------------------------------------------------

STRATA_HD inline uint16_t FloatToBf16Bits(float f) {
  uint32_t x = FloatBits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

STRATA_HD inline float Bf16BitsToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

// ---- fp8 --------------------------------------------------------------------

// Saturating float -> fp8 with `kMan` mantissa bits, exponent bias `kBias`,
// largest finite magnitude `max_finite` encoded as `max_code` (sign excluded).
// NaN -> 0x7F | sign (NaN in both e4m3fn and e5m2).
template <int kMan, int kBias>
STRATA_HD inline uint8_t FloatToFp8Sat(float f, float max_finite, uint32_t max_code) {
  constexpr int kEmin = 1 - kBias;  // exponent of the smallest normal
  const uint32_t sign = (FloatBits(f) >> 24) & 0x80u;
  const float a = fabsf(f);
  if (!(a == a)) return static_cast<uint8_t>(sign | 0x7Fu);
  if (a >= max_finite) return static_cast<uint8_t>(sign | max_code);
  int e = static_cast<int>((FloatBits(a) >> 23) & 0xFFu) - 127;
  if (e < kEmin) e = kEmin;
  // Spacing of representable values at this exponent; a / quantum and the
  // product below are exact (power-of-two scaling of normal floats).
  const float quantum = BitsFloat(static_cast<uint32_t>(e - kMan + 127) << 23);
  const float q = Rne(a / quantum) * quantum;
  if (q == 0.0f) return static_cast<uint8_t>(sign);
  const uint32_t qb = FloatBits(q);
  const int qe = static_cast<int>((qb >> 23) & 0xFFu) - 127;
  if (qe < kEmin) {
    const float sub_quantum_inv = BitsFloat(static_cast<uint32_t>(kMan - kEmin + 127) << 23);
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(q * sub_quantum_inv));
  }
  const uint32_t m = (qb >> (23 - kMan)) & ((1u << kMan) - 1u);
  return static_cast<uint8_t>(sign | (static_cast<uint32_t>(qe + kBias) << kMan) | m);
}

template <int kMan, int kBias, bool kFn>
STRATA_HD inline float Fp8ToFloat(uint8_t b) {
  constexpr int kExpBits = 7 - kMan;
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t e = (b & 0x7Fu) >> kMan;
  const uint32_t m = b & ((1u << kMan) - 1u);
  if (kFn) {
    if ((b & 0x7Fu) == 0x7Fu) return BitsFloat(sign | 0x7FC00000u);
  } else if (e == (1u << kExpBits) - 1u) {
    return BitsFloat(sign | (m ? 0x7FC00000u : 0x7F800000u));
  }
  if (e == 0) {
    const float quantum = BitsFloat(static_cast<uint32_t>(1 - kBias - kMan + 127) << 23);
    const float v = static_cast<float>(m) * quantum;
    return sign ? -v : v;
  }
  return BitsFloat(sign | ((e - kBias + 127u) << 23) | (m << (23 - kMan)));
}

// OCP fp8 e4m3fn: max 448 (0x7E), no infinities, NaN 0x7F.
constexpr float kE4M3Max = 448.0f;
STRATA_HD inline uint8_t FloatToE4M3Sat(float f) { return FloatToFp8Sat<3, 7>(f, kE4M3Max, 0x7Eu); }
STRATA_HD inline float E4M3ToFloat(uint8_t b) { return Fp8ToFloat<3, 7, true>(b); }

// fp8 e5m2 (IEEE-like): max finite 57344 (0x7B).
constexpr float kE5M2Max = 57344.0f;
STRATA_HD inline uint8_t FloatToE5M2Sat(float f) { return FloatToFp8Sat<2, 15>(f, kE5M2Max, 0x7Bu); }
STRATA_HD inline float E5M2ToFloat(uint8_t b) { return Fp8ToFloat<2, 15, false>(b); }

// ---- per-row parameters -----------------------------------------------------

// Scale and zero point of one (token, kv head) row, as floats for the math and
// as the bits stored in the block (dynamic mode).
struct RowParams {
  float scale = 1.0f;
  float zero = 0.0f;
  uint16_t scale_bits = 0x3C00;  // fp16 1.0
  uint8_t zero_bits = 0;         // int8 (two's complement) or uint8 (int4)
};

// fp16 scale with the degenerate-range guard described at the top.
STRATA_HD inline uint16_t ScaleToHalfBits(float s) {
  uint16_t b = FloatToHalfBits(s);
  if (b == 0) b = 1;                 // underflow -> smallest subnormal
  if (b >= 0x7C00u) b = 0x7BFFu;     // overflow -> 65504
  return b;
}

// Dynamic-mode parameters from the row's raw min and max.
STRATA_HD inline RowParams DynamicRowParams(KvDtype d, float row_min, float row_max) {
  const float mn = fminf(row_min, 0.0f);
  const float mx = fmaxf(row_max, 0.0f);
  RowParams p;
  float s = 1.0f;
  if (d == KvDtype::kFp8E4M3) {
    const float amax = fmaxf(-mn, mx);
    s = amax / kE4M3Max;
  } else if (d == KvDtype::kInt8) {
    s = (mx - mn) / 255.0f;
  } else if (d == KvDtype::kInt4) {
    s = (mx - mn) / 15.0f;
  }
  if (s == 0.0f) s = 1.0f;
  p.scale_bits = ScaleToHalfBits(s);
  p.scale = HalfBitsToFloat(p.scale_bits);
  if (d == KvDtype::kInt8) {
    p.zero = Clamp(Rne(-128.0f - mn / p.scale), -128.0f, 127.0f);
    p.zero_bits = static_cast<uint8_t>(static_cast<int8_t>(static_cast<int>(p.zero)));
  } else if (d == KvDtype::kInt4) {
    p.zero = Clamp(Rne(-mn / p.scale), 0.0f, 15.0f);
    p.zero_bits = static_cast<uint8_t>(static_cast<int>(p.zero));
  }
  return p;
}

// Stored zero-point bits -> float zero.
STRATA_HD inline float ZeroFromBits(KvDtype d, uint8_t bits) {
  return d == KvDtype::kInt8 ? static_cast<float>(static_cast<int8_t>(bits))
                             : static_cast<float>(bits);
}

// ---- element codec ----------------------------------------------------------

// Encode/decode one element of a supported format. Codes are returned in the
// low KvDtypeBits(D) bits. `s` and `z` are the row's scale and zero point
// (1 and 0 where the format has none).
template <KvDtype D, KvScaleMode M>
struct KvCodec {
  static_assert(KvFormatSupported(KvFormat{D, M}), "unsupported KV format");
  static constexpr KvDtype kDtype = D;
  static constexpr KvScaleMode kMode = M;
  static constexpr int kBits = KvDtypeBits(D);
  static constexpr bool kScaled = M != KvScaleMode::kNone;
  static constexpr bool kHasZero = KvDtypeIsInteger(D);

  STRATA_HD static uint32_t Encode(float x, float s, float z) {
    if constexpr (D == KvDtype::kFp32) {
      return FloatBits(x);
    } else if constexpr (D == KvDtype::kFp16) {
      return FloatToHalfBits(x);
    } else if constexpr (D == KvDtype::kBf16) {
      return FloatToBf16Bits(x);
    } else if constexpr (D == KvDtype::kFp8E4M3) {
      return FloatToE4M3Sat(x / s);
    } else if constexpr (D == KvDtype::kFp8E5M2) {
      return FloatToE5M2Sat(kScaled ? x / s : x);
    } else if constexpr (D == KvDtype::kInt8) {
      const float t = (M == KvScaleMode::kStatic) ? Rne(x / s + z) : Rne(x / s) + z;
      return static_cast<uint8_t>(static_cast<int8_t>(static_cast<int>(Clamp(t, -128.0f, 127.0f))));
    } else {  // kInt4
      const float t = Rne(x / s) + z;
      return static_cast<uint32_t>(static_cast<int>(Clamp(t, 0.0f, 15.0f)));
    }
  }

  STRATA_HD static float Decode(uint32_t c, float s, float z) {
    if constexpr (D == KvDtype::kFp32) {
      return BitsFloat(c);
    } else if constexpr (D == KvDtype::kFp16) {
      return HalfBitsToFloat(static_cast<uint16_t>(c));
    } else if constexpr (D == KvDtype::kBf16) {
      return Bf16BitsToFloat(static_cast<uint16_t>(c));
    } else if constexpr (D == KvDtype::kFp8E4M3) {
      return E4M3ToFloat(static_cast<uint8_t>(c)) * s;
    } else if constexpr (D == KvDtype::kFp8E5M2) {
      const float v = E5M2ToFloat(static_cast<uint8_t>(c));
      return kScaled ? v * s : v;
    } else if constexpr (D == KvDtype::kInt8) {
      return (static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(c))) - z) * s;
    } else {  // kInt4
      return (static_cast<float>(c & 0xFu) - z) * s;
    }
  }
};

}  // namespace strata::qmath

// X(dtype, scale_mode) for every format KvFormatSupported() accepts. The
// kernels' test checks that this list and KvFormatSupported agree.
#define STRATA_FOR_EACH_KV_FORMAT(X)                                   \
  X(::strata::KvDtype::kFp32, ::strata::KvScaleMode::kNone)            \
  X(::strata::KvDtype::kFp16, ::strata::KvScaleMode::kNone)            \
  X(::strata::KvDtype::kBf16, ::strata::KvScaleMode::kNone)            \
  X(::strata::KvDtype::kFp8E4M3, ::strata::KvScaleMode::kStatic)       \
  X(::strata::KvDtype::kFp8E4M3, ::strata::KvScaleMode::kDynamic)      \
  X(::strata::KvDtype::kFp8E5M2, ::strata::KvScaleMode::kNone)         \
  X(::strata::KvDtype::kFp8E5M2, ::strata::KvScaleMode::kStatic)       \
  X(::strata::KvDtype::kInt8, ::strata::KvScaleMode::kStatic)          \
  X(::strata::KvDtype::kInt8, ::strata::KvScaleMode::kDynamic)         \
  X(::strata::KvDtype::kInt4, ::strata::KvScaleMode::kDynamic)
