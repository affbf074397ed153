#include "kernels/cpu/ops_cpu.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace strata::cpu {

namespace {

// y[r][j] (+)= dot(x[r], w[j]) for up to 4 rows r of x against one row of w.
// 32 lanes per row (two independent vector accumulators) keep FMAs in flight.
template <int M>
inline void DotRows(const float* x, int64_t x_stride, const float* wr, int64_t k, float* out) {
  float acc[M][32] = {};
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    for (int r = 0; r < M; ++r) {
      const float* xr = x + r * x_stride + i;
      for (int t = 0; t < 32; ++t) acc[r][t] += wr[i + t] * xr[t];
    }
  }
  for (int r = 0; r < M; ++r) {
    float s = 0.0f;
    for (int t = 0; t < 32; ++t) s += acc[r][t];
    for (int64_t t = i; t < k; ++t) s += wr[t] * x[r * x_stride + t];
    out[r] = s;
  }
}

// Small batches (m <= kSmallBatchRows): every row of w streams from memory
// once and is reused for all rows of x, four at a time. Rows of w are split
// statically across threads (one parallel region per call). OpenBLAS sgemm
// would repack the whole weight matrix on every call, which dominates at
// these sizes.
void SmallBatchLinear(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
                      bool accumulate) {
#pragma omp parallel for schedule(static) if (n * k >= 32768)
  for (int64_t j = 0; j < n; ++j) {
    const float* wr = w + j * k;
    float out[4];
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const float* xr = x + r0 * k;
      switch (std::min<int64_t>(4, m - r0)) {
        case 1: DotRows<1>(xr, k, wr, k, out); break;
        case 2: DotRows<2>(xr, k, wr, k, out); break;
        case 3: DotRows<3>(xr, k, wr, k, out); break;
        default: DotRows<4>(xr, k, wr, k, out); break;
      }
      for (int64_t r = r0; r < std::min<int64_t>(m, r0 + 4); ++r) {
        float* o = y + r * n + j;
        *o = accumulate ? *o + out[r - r0] : out[r - r0];
      }
    }
  }
}

constexpr int64_t kSmallBatchRows = 4;

}  // namespace

void Linear(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
            bool accumulate) {
  const float beta = accumulate ? 1.0f : 0.0f;
  if (m <= kSmallBatchRows) return SmallBatchLinear(x, w, y, m, n, k, accumulate);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), 1.0f, x, static_cast<blasint>(k),
              w, static_cast<blasint>(k), beta, y, static_cast<blasint>(n));
}

void RmsNorm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim,
             float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    float ss = 0.0f;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    ss /= static_cast<float>(dim);
    ss += eps;
    const float inv = 1.0f / std::sqrt(ss);
    for (int64_t i = 0; i < dim; ++i) o[i] = weight[i] * (inv * xr[i]);
  }
}

void FillRopeTable(float theta, int32_t head_dim, int32_t max_positions, float* cos, float* sin) {
  const int32_t half = head_dim / 2;
  for (int32_t pos = 0; pos < max_positions; ++pos) {
    for (int32_t j = 0; j < half; ++j) {
      const float freq = 1.0f / std::pow(theta, static_cast<float>(2 * j) / head_dim);
      const float angle = static_cast<float>(pos) * freq;
      cos[static_cast<int64_t>(pos) * half + j] = std::cos(angle);
      sin[static_cast<int64_t>(pos) * half + j] = std::sin(angle);
    }
  }
}

void ApplyRope(float* x, const int32_t* positions, int64_t tokens, int32_t heads,
               int32_t head_dim, const RopeTable& table) {
  const int32_t half = head_dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = table.cos + static_cast<int64_t>(positions[t]) * half;
    const float* s = table.sin + static_cast<int64_t>(positions[t]) * half;
    for (int32_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;
      for (int32_t j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half];
        v[j] = a * c[j] - b * s[j];
        v[j + half] = a * s[j] + b * c[j];
      }
    }
  }
}

void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g * (1.0f / (1.0f + std::exp(-g))) * up[i];
  }
}

void AddInPlace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void Embed(const float* table, const int32_t* ids, int64_t tokens, int64_t dim, float* out) {
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(out + t * dim, table + static_cast<int64_t>(ids[t]) * dim, sizeof(float) * dim);
  }
}

int NumThreads() { return omp_get_max_threads(); }

}  // namespace strata::cpu
