// Tensor-core primitives shared by the decode and prefill attention kernels:
// mma.sync m16n8k16 (fp16 or bf16 inputs, fp32 accumulation) and the hi + lo
// split that keeps fp32 operands at ~2^-22 (fp16) / ~2^-17 (bf16) relative
// accuracy through two MMAs. Internal to kernels/cuda.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace strata::cuda::detail {

__device__ __forceinline__ void Mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The same with bf16 inputs (bf16 caches).
__device__ __forceinline__ void Mma16816Bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ldmatrix.x4: four 8x8 matrices of 16-bit values from shared memory. Lane l
// passes the address of row l % 8 of matrix l / 8 (16 contiguous bytes,
// 16-byte aligned) and receives, in r[m], the pair (row l / 4, columns
// 2 (l % 4), 2 (l % 4) + 1) of matrix m: the layout of an mma.m16n8k16
// fragment register.
__device__ __forceinline__ void Ldsm4(const void* row, uint32_t (&r)[4]) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// The same, transposed: r[m] holds (rows 2 (l % 4), 2 (l % 4) + 1; column
// l / 4) of matrix m.
__device__ __forceinline__ void Ldsm4T(const void* row, uint32_t (&r)[4]) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
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

// (x, y) -> bf16 pairs hi and lo with hi + lo ~ (x, y) to ~2^-17 (8 + 8
// significant bits).
__device__ __forceinline__ void SplitPairBf16(float x, float y, uint32_t* hi, uint32_t* lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x - hf.x, y - hf.y);
  *hi = *reinterpret_cast<const uint32_t*>(&h);
  *lo = *reinterpret_cast<const uint32_t*>(&l);
}

// The MMA and the split of a 16-bit input type: fp16, or bf16 when kBf16.
template <bool kBf16>
__device__ __forceinline__ void MmaT(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                     uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    Mma16816Bf16(d, a0, a1, a2, a3, b0, b1);
  } else {
    Mma16816(d, a0, a1, a2, a3, b0, b1);
  }
}
template <bool kBf16>
__device__ __forceinline__ void SplitPairT(float x, float y, uint32_t* hi, uint32_t* lo) {
  if constexpr (kBf16) {
    SplitPairBf16(x, y, hi, lo);
  } else {
    SplitPair(x, y, hi, lo);
  }
}

// d += (ah + al) b: an fp32-accurate A operand as its hi and lo halves
// (SplitPairT), two MMAs sharing the B fragments; fp16, or bf16 when kBf16.
template <bool kBf16>
__device__ __forceinline__ void MmaHiLoT(float (&d)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4],
                                         uint32_t b0, uint32_t b1) {
  MmaT<kBf16>(d, ah[0], ah[1], ah[2], ah[3], b0, b1);
  MmaT<kBf16>(d, al[0], al[1], al[2], al[3], b0, b1);
}

// floor(log2(x)) of a positive normal fp32 x, as a float (exact).
__device__ __forceinline__ float FloorLog2(float x) {
  return static_cast<float>(static_cast<int>((__float_as_uint(x) >> 23) & 0xFFu) - 127);
}

}  // namespace strata::cuda::detail
