// Embedding, RMSNorm, SiLU-mul, dtype conversion and random fills.
#include <algorithm>

#include "kernels/cuda_ops/common.cuh"
#include "kernels/cuda_ops/cuda_ops.h"

namespace strata::cuda_ops {
namespace {

using detail::FromFloat;
using detail::ToFloat;

template <class T>
__global__ void EmbedKernel(const T* __restrict__ table, const int32_t* __restrict__ ids,
                            int32_t dim, float* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const T* row = table + static_cast<int64_t>(ids[t]) * dim;
  float* o = out + t * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = ToFloat(row[i]);
}

// One block per output row. x is read twice (sum of squares, then scale);
// the second read hits L1/L2.
template <class T>
__global__ void RmsNormKernel(const float* __restrict__ x, const float* __restrict__ w,
                              const int32_t* __restrict__ rows, int32_t dim, float eps,
                              T* __restrict__ out) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const int64_t src = rows ? rows[r] : r;
  const float* xr = x + src * dim;
  T* o = out + r * dim;
  float ss = 0.0f;
  if ((dim & 3) == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
      const float4 v = x4[i];
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  }
  ss = detail::BlockSum(ss, red);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    o[i] = FromFloat<T>(__fmul_rn(w[i], __fmul_rn(inv, xr[i])));
  }
}

template <class T>
__global__ void SiluMulKernel(const T* __restrict__ gu, int32_t tokens, int32_t f,
                              T* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(tokens) * f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / f, j = i - t * f;
    const float g = ToFloat(gu[t * 2 * f + j]);
    const float u = ToFloat(gu[t * 2 * f + f + j]);
    out[i] = FromFloat<T>(g * (1.0f / (1.0f + expf(-g))) * u);
  }
}

template <class T>
__global__ void AddToF32Kernel(const T* __restrict__ in, int64_t n, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] += ToFloat<T>(in[i]);
  }
}

template <class T>
__global__ void ConvertKernel(const float* __restrict__ in, int64_t n, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = FromFloat<T>(in[i]);
  }
}

template <class T>
__global__ void FillUniformKernel(T* __restrict__ p, int64_t n, uint64_t seed, float lo,
                                  float span) {
  const uint64_t key = detail::Mix64(seed);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float u = detail::Uniform01(detail::Mix64(key ^ static_cast<uint64_t>(i)));
    p[i] = FromFloat<T>(lo + span * u);
  }
}

int GridFor(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 132 * 16));
}

}  // namespace

cudaError_t Embed(const void* table, ActDtype table_dtype, const int32_t* ids, int32_t tokens,
                  int32_t dim, float* out, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  return detail::VisitActDtype(table_dtype, [&](auto tag) {
    using T = decltype(tag);
    EmbedKernel<T><<<tokens, 256, 0, stream>>>(static_cast<const T*>(table), ids, dim, out);
    return cudaGetLastError();
  });
}

cudaError_t RmsNorm(const float* x, const float* weight, const int32_t* rows, int32_t num_rows,
                    int32_t dim, float eps, void* out, ActDtype out_dtype, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  const int threads = dim >= 4096 ? 512 : (dim >= 1024 ? 256 : 128);
  return detail::VisitActDtype(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    RmsNormKernel<T><<<num_rows, threads, 0, stream>>>(x, weight, rows, dim, eps,
                                                       static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t SiluMul(const void* gu, int32_t tokens, int32_t f, void* out, ActDtype dtype,
                    cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(tokens) * f;
  if (n <= 0) return cudaSuccess;
  return detail::VisitActDtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    SiluMulKernel<T><<<GridFor(n, 256), 256, 0, stream>>>(static_cast<const T*>(gu), tokens, f,
                                                          static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t ConvertF32(const float* in, int64_t n, void* out, ActDtype out_dtype,
                       cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return detail::VisitActDtype(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    ConvertKernel<T><<<GridFor(n, 256), 256, 0, stream>>>(in, n, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t AddToF32(const void* in, ActDtype in_dtype, int64_t n, float* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return detail::VisitActDtype(in_dtype, [&](auto tag) {
    using T = decltype(tag);
    AddToF32Kernel<T><<<GridFor(n, 256), 256, 0, stream>>>(static_cast<const T*>(in), n, out);
    return cudaGetLastError();
  });
}

cudaError_t FillUniform(void* p, ActDtype dtype, int64_t n, uint64_t seed, float lo, float hi,
                        cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return detail::VisitActDtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    FillUniformKernel<T><<<GridFor(n, 256), 256, 0, stream>>>(static_cast<T*>(p), n, seed, lo,
                                                              hi - lo);
    return cudaGetLastError();
  });
}

}  // namespace strata::cuda_ops
