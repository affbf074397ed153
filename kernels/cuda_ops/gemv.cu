// Small-batch GEMV with fused prologue/epilogue (see GemvKind in cuda_ops.h).
//
// Layout: 256 threads; the CTA stages f(x) for its m rows as fp32 in shared
// memory (its first weight loads already in flight), then each warp streams
// whole weight rows (two output rows, or a gate/up row pair) with 16-byte
// non-allocating loads, four chunks per row per lane in flight, and reduces
// across the warp. The grid is persistent (at most the resident CTAs), so the
// prologue runs once per CTA.
#include <atomic>
#include <algorithm>

#include "kernels/cuda_ops/common.cuh"
#include "kernels/cuda_ops/cuda_ops.h"

namespace strata::cuda_ops {
namespace {

using detail::FromFloat;
using detail::ToFloat;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSmem = 200 * 1024;

__device__ __forceinline__ uint4 LoadStream(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

template <class T>
__device__ __forceinline__ void Unpack(const uint4& v, float (&f)[8]);
template <>
__device__ __forceinline__ void Unpack<__half>(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}
template <>
__device__ __forceinline__ void Unpack<__nv_bfloat16>(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

template <class T, int M, GemvKind K>
__global__ void __launch_bounds__(kThreads) GemvKernel(const GemvArgs a) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);  // [M][k]
  __shared__ float red[32];
  const int k = a.k;
  constexpr bool kNorm = K == GemvKind::kNormF32 || K == GemvKind::kNormSiluMul;
  // One unit = R output rows (L weight rows) per warp; U 16-byte chunks of
  // each row in flight per lane.
  constexpr int R = K == GemvKind::kNormSiluMul ? 1 : 2;
  constexpr int L = K == GemvKind::kNormSiluMul ? 2 : R;
  constexpr int U = 4;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int units = (a.n_out + R - 1) / R;
  const int chunks = k / 8;
  const int wrows = K == GemvKind::kNormSiluMul ? 2 * a.n_out : a.n_out;
  const T* W = static_cast<const T*>(a.w);
  const int first_unit = blockIdx.x * kWarps + warp;

  uint4 wv[U][L];
  auto issue = [&](int u, int c0) {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const int row = K == GemvKind::kNormSiluMul ? u + l * a.n_out : u * R + l;
#pragma unroll
      for (int h = 0; h < U; ++h) {
        const int c = c0 + 32 * h;
        wv[h][l] = (row < wrows && c < chunks)
                       ? LoadStream(W + static_cast<int64_t>(row) * k + c * 8)
                       : make_uint4(0, 0, 0, 0);
      }
    }
  };
  // The first weight loads go out before the prologue and overlap it.
  if (first_unit < units) issue(first_unit, lane);

  // Prologue: f(x) rounded to T, kept as fp32.
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float* dst = xs + m * k;
    if constexpr (kNorm) {
      const int64_t row = a.x_rows ? a.x_rows[m] : m;
      const float* src = static_cast<const float*>(a.x) + row * k;
      float ss = 0.0f;
      for (int i = threadIdx.x; i < k; i += kThreads) ss += src[i] * src[i];
      ss = detail::BlockSum(ss, red);
      const float inv = 1.0f / sqrtf(ss / static_cast<float>(k) + a.eps);
      for (int i = threadIdx.x; i < k; i += kThreads) {
        dst[i] = ToFloat(FromFloat<T>(__fmul_rn(a.norm_w[i], __fmul_rn(inv, src[i]))));
      }
    } else if constexpr (K == GemvKind::kF32AddF32) {
      const float* src = static_cast<const float*>(a.x) + static_cast<int64_t>(m) * k;
      for (int i = threadIdx.x; i < k; i += kThreads) dst[i] = ToFloat(FromFloat<T>(src[i]));
    } else {
      const T* src = static_cast<const T*>(a.x) + static_cast<int64_t>(m) * k;
      for (int i = threadIdx.x; i < k; i += kThreads) dst[i] = ToFloat(src[i]);
    }
  }
  __syncthreads();

  for (int u = first_unit; u < units; u += gridDim.x * kWarps) {
    float acc[L][M];
#pragma unroll
    for (int l = 0; l < L; ++l) {
#pragma unroll
      for (int m = 0; m < M; ++m) acc[l][m] = 0.0f;
    }
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
      if (u != first_unit || c0 != lane) issue(u, c0);  // the first group is in flight already
#pragma unroll
      for (int h = 0; h < U; ++h) {
        const int c = c0 + 32 * h;
        if (c >= chunks) break;
#pragma unroll
        for (int l = 0; l < L; ++l) {
          float wf[8];
          Unpack<T>(wv[h][l], wf);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const float4 x0 = smem4[(m * k) / 4 + 2 * c];
            const float4 x1 = smem4[(m * k) / 4 + 2 * c + 1];
            float s = acc[l][m];
            s = fmaf(wf[0], x0.x, s);
            s = fmaf(wf[1], x0.y, s);
            s = fmaf(wf[2], x0.z, s);
            s = fmaf(wf[3], x0.w, s);
            s = fmaf(wf[4], x1.x, s);
            s = fmaf(wf[5], x1.y, s);
            s = fmaf(wf[6], x1.z, s);
            s = fmaf(wf[7], x1.w, s);
            acc[l][m] = s;
          }
        }
      }
    }
#pragma unroll
    for (int l = 0; l < L; ++l) {
#pragma unroll
      for (int m = 0; m < M; ++m) acc[l][m] = detail::WarpSum(acc[l][m]);
    }
    // Epilogue: lane m writes row m's outputs.
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (lane != m) continue;
      if constexpr (K == GemvKind::kNormSiluMul) {
        const float g = ToFloat(FromFloat<T>(acc[0][m]));
        const float up = ToFloat(FromFloat<T>(acc[1][m]));
        static_cast<T*>(a.y)[static_cast<int64_t>(m) * a.n_out + u] =
            FromFloat<T>(g * (1.0f / (1.0f + expf(-g))) * up);
      } else {
        float* y = static_cast<float*>(a.y) + static_cast<int64_t>(m) * a.n_out;
#pragma unroll
        for (int l = 0; l < L; ++l) {
          const int row = u * R + l;
          if (row >= a.n_out) continue;
          if constexpr (K == GemvKind::kNormF32) {
            y[row] = acc[l][m];
          } else {
            y[row] += acc[l][m];
          }
        }
      }
    }
  }
}

template <class T, int M, GemvKind K>
cudaError_t Launch(const GemvArgs& a, cudaStream_t stream) {
  auto* kernel = GemvKernel<T, M, K>;
  const int smem = M * a.k * static_cast<int>(sizeof(float));
  // Function attributes are per device (context): set once for each device used.
  static std::atomic<bool> attr_set[64] = {};
  int per_sm = 0, dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  if (!attr_set[dev].load(std::memory_order_relaxed)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem);
    if (err != cudaSuccess) return err;
    attr_set[dev].store(true, std::memory_order_relaxed);
  }
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  constexpr int R = K == GemvKind::kNormSiluMul ? 1 : 2;
  const int64_t units = (int64_t{a.n_out} + R - 1) / R;
  const int64_t need = (units + kWarps - 1) / kWarps;
  const int grid = static_cast<int>(std::min<int64_t>(need, int64_t{sms} * std::max(per_sm, 1)));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <class T, GemvKind K>
cudaError_t LaunchM(const GemvArgs& a, cudaStream_t stream) {
  switch (a.m) {
    case 1: return Launch<T, 1, K>(a, stream);
    case 2: return Launch<T, 2, K>(a, stream);
    case 3: return Launch<T, 3, K>(a, stream);
    case 4: return Launch<T, 4, K>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <class T>
cudaError_t LaunchKind(const GemvArgs& a, cudaStream_t stream) {
  switch (a.kind) {
    case GemvKind::kNormF32: return LaunchM<T, GemvKind::kNormF32>(a, stream);
    case GemvKind::kF32AddF32: return LaunchM<T, GemvKind::kF32AddF32>(a, stream);
    case GemvKind::kNormSiluMul: return LaunchM<T, GemvKind::kNormSiluMul>(a, stream);
    case GemvKind::kActAddF32: return LaunchM<T, GemvKind::kActAddF32>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool GemvSupported(int32_t m, int32_t k) {
  return m >= 1 && m <= kGemvMaxM && k > 0 && k % 8 == 0 &&
         int64_t{m} * k * static_cast<int64_t>(sizeof(float)) <= kMaxSmem;
}

cudaError_t Gemv(const GemvArgs& a, ActDtype dtype, cudaStream_t stream) {
  if (!GemvSupported(a.m, a.k) || a.n_out <= 0 || !a.w || !a.x || !a.y) return cudaErrorInvalidValue;
  if ((a.kind == GemvKind::kNormF32 || a.kind == GemvKind::kNormSiluMul) && !a.norm_w) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case ActDtype::kFp16: return LaunchKind<__half>(a, stream);
    case ActDtype::kBf16: return LaunchKind<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace strata::cuda_ops
