// Dense CPU operators of the LLaMA forward pass (fp32). GEMMs go through
// OpenBLAS; element-wise operators are plain loops the compiler vectorizes.
#pragma once

#include <cstdint>

namespace strata::cpu {

// y[m][n] = sum_k x[m][k] * w[n][k]  (+ y when accumulate). w is [n][k]
// (nn.Linear layout).
void Linear(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
            bool accumulate = false);

// out[r] = x[r] / rms(x[r]) * weight, rms over `dim` with epsilon.
void RmsNorm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim, float eps);

// Precomputed RoPE tables: cos/sin[pos][head_dim/2], matching the reference
// float arithmetic: freq_j = 1 / theta^(2j/head_dim), angle = pos * freq_j.
struct RopeTable {
  int32_t max_positions = 0;
  int32_t half_dim = 0;
  const float* cos = nullptr;  // [max_positions][half_dim]
  const float* sin = nullptr;
};
void FillRopeTable(float theta, int32_t head_dim, int32_t max_positions, float* cos, float* sin);

// Rotates each head of x [tokens][heads][head_dim] in place with the HF
// rotate_half convention: pairs (j, j + head_dim/2).
void ApplyRope(float* x, const int32_t* positions, int64_t tokens, int32_t heads,
               int32_t head_dim, const RopeTable& table);

// out[i] = silu(gate[i]) * up[i]
void SiluMul(const float* gate, const float* up, float* out, int64_t n);

// x[i] += y[i]
void AddInPlace(float* x, const float* y, int64_t n);

// out[t] = table[ids[t]], rows of `dim`.
void Embed(const float* table, const int32_t* ids, int64_t tokens, int64_t dim, float* out);

// Number of threads the CPU kernels use.
int NumThreads();

}  // namespace strata::cpu
