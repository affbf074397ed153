// Fused non-attention CUDA kernels of the GPU engine's LLaMA forward pass:
// embedding, RMSNorm, RoPE fused with the quantizing KV-cache write, SiLU-mul,
// dtype conversion, on-GPU sampling, and random fills for dummy weights.
//
// Raw pointers and trivially copyable views only; every launcher returns the
// cudaError_t of its launch (cudaGetLastError), and never synchronizes. No
// absl, no logging. Shapes are in the comments; "T" is the activation/weight
// element type chosen at run time by `ActDtype`.
//
// CPU references: kernels/cpu/ops_cpu.h and kernels/cpu/kv_cache_cpu.h; the
// test cuda_ops_test.cc compares every kernel with them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kv_cache_view.h"

namespace strata::cuda_ops {

// Element type of a device buffer of activations or weights.
enum class ActDtype : uint8_t { kFp32 = 0, kFp16 = 1, kBf16 = 2 };
inline int ActDtypeBytes(ActDtype d) { return d == ActDtype::kFp32 ? 4 : 2; }

// out[t][:] = float(table[ids[t]][:]).
//   table: [vocab][dim] of `table_dtype`; ids: [tokens]; out: [tokens][dim] fp32.
cudaError_t Embed(const void* table, ActDtype table_dtype, const int32_t* ids, int32_t tokens,
                  int32_t dim, float* out, cudaStream_t stream);

// out[r] = weight * (x[src] / rms(x[src])), src = rows ? rows[r] : r; rms
// over `dim` with `eps` (the CPU formula: weight[i] * (inv * x[i])).
//   x: [*][dim] fp32; weight: [dim] fp32; rows: [num_rows] or null;
//   out: [num_rows][dim] of `out_dtype`.
cudaError_t RmsNorm(const float* x, const float* weight, const int32_t* rows, int32_t num_rows,
                    int32_t dim, float eps, void* out, ActDtype out_dtype, cudaStream_t stream);

// RoPE (HF rotate_half: pairs (j, j + head_dim/2)) on q and k of a fused QKV
// row, then the quantizing cache write of k and v. Given the same rotated
// values, the stored bits equal cpu::WriteKvCache's (kernels/quant_math.h);
// the rotation itself matches cpu::ApplyRope to rounding (the host compiler
// may contract a*c - b*s into an FMA, this kernel does not).
struct RopeKvWriteArgs {
  const float* qkv = nullptr;  // [num_tokens][(num_heads + 2 * num_kv_heads) * head_dim]: q | k | v
  int32_t num_tokens = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;  // even, <= kMaxHeadDim
  const int32_t* positions = nullptr;     // [num_tokens]
  const int64_t* slot_mapping = nullptr;  // [num_tokens]; -1 = padding (k/v not written)
  const float* rope_cos = nullptr;        // [max_positions][head_dim / 2] (cpu::FillRopeTable)
  const float* rope_sin = nullptr;
  void* q_out = nullptr;                  // [num_tokens][num_heads][head_dim] of q_dtype
  ActDtype q_dtype = ActDtype::kFp32;
  KvCacheView cache;                      // this layer; its format picks the codec
};
constexpr int kMaxHeadDim = 256;
cudaError_t RopeKvWrite(const RopeKvWriteArgs& args, cudaStream_t stream);

// out[t][i] = silu(gu[t][i]) * gu[t][f + i]  (gate rows first, then up).
//   gu: [tokens][2 * f] of dtype; out: [tokens][f] of dtype. Math in fp32.
cudaError_t SiluMul(const void* gu, int32_t tokens, int32_t f, void* out, ActDtype dtype,
                    cudaStream_t stream);

// out[i] = T(in[i]) (round to nearest even).
cudaError_t ConvertF32(const float* in, int64_t n, void* out, ActDtype out_dtype,
                       cudaStream_t stream);

// out[i] += float(in[i]), in of T (a tensor-parallel partial into the residual).
cudaError_t AddToF32(const void* in, ActDtype in_dtype, int64_t n, float* out, cudaStream_t stream);

// Deterministic pseudo-random fill: p[i] = lo + (hi - lo) * u(seed, i), u in
// [0, 1) from a counter hash (no state, any grid). For dummy weights.
cudaError_t FillUniform(void* p, ActDtype dtype, int64_t n, uint64_t seed, float lo, float hi,
                        cudaStream_t stream);

// ---- small-batch GEMV with fused prologue/epilogue -----------------------------
//
// Decode steps with a handful of tokens are pure weight streaming; cuBLAS
// reaches ~70% of the copy bandwidth there and the element-wise kernels
// around each GEMM cost a launch each. This GEMV streams W once with 16-byte
// loads, stages the (transformed) activations in shared memory as fp32, and
// fuses the neighbours of each projection of a LLaMA layer:
//   kNormF32      y fp32  = W . T(rmsnorm(x[rows]))         (QKV, LM head)
//   kF32AddF32    y fp32 += W . T(x)                         (attention out -> residual)
//   kNormSiluMul  y T     = silu(T(Wg . n)) * T(Wu . n), n = T(rmsnorm(x))
//                 (gate rows [0, n_out) then up rows [n_out, 2 n_out) of W)
//   kActAddF32    y fp32 += W . x, x of T                    (down proj -> residual)
// The roundings to T are the ones the unfused path (RmsNorm / ConvertF32 /
// GEMM to T / SiluMul) makes, so both paths compute the same function up to
// summation order. Accumulation in fp32.
enum class GemvKind : uint8_t { kNormF32, kF32AddF32, kNormSiluMul, kActAddF32 };
constexpr int kGemvMaxM = 4;
struct GemvArgs {
  GemvKind kind = GemvKind::kNormF32;
  const void* w = nullptr;        // [n_out (x2 for kNormSiluMul)][k] of the act dtype
  int32_t n_out = 0;              // output features
  int32_t k = 0;                  // input features, multiple of 8
  int32_t m = 0;                  // rows of x / y, 1..kGemvMaxM
  const void* x = nullptr;        // [*][k]: fp32 (kNorm*, kF32AddF32) or T (kActAddF32)
  const int32_t* x_rows = nullptr;  // kNorm*: row r reads x[x_rows[r]] (null: x[r])
  const float* norm_w = nullptr;  // kNorm*: [k] fp32
  float eps = 1e-5f;
  void* y = nullptr;              // [m][n_out]: fp32, or T for kNormSiluMul
};
// Whether Gemv handles this shape (m <= kGemvMaxM, k % 8 == 0, the staged
// activations fit in shared memory).
bool GemvSupported(int32_t m, int32_t k);
cudaError_t Gemv(const GemvArgs& args, ActDtype dtype, cudaStream_t stream);

// ---- sampling ----------------------------------------------------------------

constexpr int kMaxLogprobs = 20;

// One row to sample. Device memory, [num_rows].
struct SampleParams {
  int32_t logit_row = 0;      // row of `logits` to read
  float temperature = 0.0f;   // 0 = greedy (argmax, ties to the lowest id)
  int32_t top_k = 0;          // 0 = no limit
  float top_p = 1.0f;         // (0, 1]
  int32_t num_logprobs = -1;  // -1: none; 0: the sampled token's; n: also the top n (<= kMaxLogprobs)
  int32_t pad_ = 0;
  uint64_t seed = 0;          // random stream: hash(seed, counter, token id)
  uint64_t counter = 0;       // e.g. the position sampled, so a seeded request repeats
};

struct SampleOut {
  int32_t token = -1;
  float logprob = 0.0f;  // log-softmax of the raw logits at `token` (when asked)
  int32_t top_ids[kMaxLogprobs];
  float top_logprobs[kMaxLogprobs];
};

// Samples one token per row. Temperature scales the logits; top-k keeps the k
// largest (ties to the lowest ids), then top-p keeps the smallest prefix in
// descending order (ties to the lowest ids) whose probability mass reaches
// top_p; the token is drawn from the kept set with the Gumbel-max trick
// (argmax of logit/T + Gumbel noise), which is an exact draw from the
// renormalized distribution. Thresholds are found by 8-bit radix selection
// with integer (fixed-point) mass sums, so a row's result does not depend on
// scheduling. logits: [*][vocab] fp32; out: [num_rows].
cudaError_t SampleRows(const float* logits, int32_t vocab, const SampleParams* params,
                       int32_t num_rows, SampleOut* out, cudaStream_t stream);

}  // namespace strata::cuda_ops
