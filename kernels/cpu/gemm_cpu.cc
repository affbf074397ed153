#include "kernels/cpu/gemm_cpu.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "runtime/check.h"
#include "runtime/float16.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define STRATA_AVX512_TARGET __attribute__((target("avx512f,fma,f16c")))
#endif

namespace strata::cpu {
namespace {

constexpr int kP = PackedWeights::kPanel;
constexpr int kMaxNb = 4;  // panels per tile
constexpr int kMaxMb = 8;  // rows of x per tile

// One tile: rows [0, MB) of x (row stride k) against NB consecutive panels
// starting at `w` (panel stride `pb` bytes). out[MB][NB][16].
using TileFn = void (*)(const float* x, int64_t k, const uint8_t* w, int64_t pb, float* out);

// Multiply and add stay separate (no contraction into FMA, which the compiler
// would apply to some loop versions and not others), so every tile shape
// computes the same bits.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <int NB, int MB, bool kHalf>
void TilePortable(const float* x, int64_t k, const uint8_t* w, int64_t pb, float* out) {
  float acc[MB][NB][kP] = {};
  for (int64_t c = 0; c < k; ++c) {
    float wv[NB][kP];
    for (int b = 0; b < NB; ++b) {
      if constexpr (kHalf) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(w + b * pb) + c * kP;
        for (int j = 0; j < kP; ++j) wv[b][j] = HalfToFloat(h[j]);
      } else {
        const float* f = reinterpret_cast<const float*>(w + b * pb) + c * kP;
        for (int j = 0; j < kP; ++j) wv[b][j] = f[j];
      }
    }
    for (int r = 0; r < MB; ++r) {
      const float xv = x[r * k + c];
      for (int b = 0; b < NB; ++b) {
        for (int j = 0; j < kP; ++j) acc[r][b][j] += wv[b][j] * xv;
      }
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}
#pragma GCC pop_options

#if defined(__x86_64__)
// The same with 16-lane registers: NB weight vectors per input column (fp16
// converted by vcvtph2ps), each FMA'd with the broadcast x of MB rows.
// NB * MB accumulators stay in registers (the shapes used keep it <= 24 of
// the 32).
template <int NB, int MB, bool kHalf>
STRATA_AVX512_TARGET void TileAvx512(const float* x, int64_t k, const uint8_t* w, int64_t pb,
                                     float* out) {
  __m512 acc[MB][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < k; ++c) {
    __m512 wv[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      if constexpr (kHalf) {
        // The maskz form: GCC 12 flags _mm512_cvtph_ps's undefined passthrough.
        wv[b] = _mm512_maskz_cvtph_ps(__mmask16(0xffff), 
            _mm256_load_si256(reinterpret_cast<const __m256i*>(w + b * pb + c * kP * 2)));
      } else {
        wv[b] = _mm512_load_ps(reinterpret_cast<const float*>(w + b * pb + c * kP * 4));
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * k + c]);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(wv[b], xv, acc[r][b]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(out + (r * NB + b) * kP, acc[r][b]);
  }
}
#endif

using TileTable = std::array<TileFn, kMaxNb * kMaxMb>;  // [nb - 1][mb - 1]

template <bool kAvx, bool kHalf, size_t... I>
constexpr TileTable MakeTable(std::index_sequence<I...>) {
#if defined(__x86_64__)
  if constexpr (kAvx) return {&TileAvx512<I / kMaxMb + 1, I % kMaxMb + 1, kHalf>...};
#endif
  return {&TilePortable<I / kMaxMb + 1, I % kMaxMb + 1, kHalf>...};
}

const TileTable& Tiles(bool avx, bool half) {
  using Seq = std::make_index_sequence<kMaxNb * kMaxMb>;
  static constexpr TileTable kTables[2][2] = {
      {MakeTable<false, false>(Seq{}), MakeTable<false, true>(Seq{})},
      {MakeTable<true, false>(Seq{}), MakeTable<true, true>(Seq{})}};
  return kTables[avx][half];
}

inline float Silu(float g) { return g * (1.0f / (1.0f + std::exp(-g))); }

// Writes one tile's out[mb][nb][16] to y. Plain matrix: panel p = first + b
// holds outputs [16p, 16p+16). Paired: panels (2q, 2q+1) are gate and up of
// outputs [16q, 16q+16), with q = first/2 + b/2.
void Store(const float* out, int nb, int mb, int64_t first_panel, bool paired, int64_t n,
           Epilogue ep, float* y) {
  for (int r = 0; r < mb; ++r) {
    float* yr = y + r * n;
    const float* o = out + r * nb * kP;
    if (paired) {
      for (int b = 0; b < nb; b += 2) {
        const int64_t n0 = (first_panel + b) / 2 * kP;
        const int w = static_cast<int>(std::min<int64_t>(kP, n - n0));
        for (int j = 0; j < w; ++j) yr[n0 + j] = Silu(o[b * kP + j]) * o[(b + 1) * kP + j];
      }
      continue;
    }
    for (int b = 0; b < nb; ++b) {
      const int64_t n0 = (first_panel + b) * kP;
      const int w = static_cast<int>(std::min<int64_t>(kP, n - n0));
      if (ep == Epilogue::kAccumulate) {
        for (int j = 0; j < w; ++j) yr[n0 + j] += o[b * kP + j];
      } else {
        for (int j = 0; j < w; ++j) yr[n0 + j] = o[b * kP + j];
      }
    }
  }
}

void Run(const float* x, const PackedWeights& w, float* y, int64_t m, Epilogue ep, bool avx) {
  const int64_t n = w.n(), k = w.k(), pb = w.panel_bytes();
  const bool paired = w.paired();
  const TileTable& tiles = Tiles(avx, w.dtype() == WeightDtype::kFp16);
  // Work unit: one panel, or one gate/up pair. Each thread owns a contiguous
  // range of units and streams it once per chunk of rows.
  const int unit = paired ? 2 : 1;
  const int64_t units = w.num_panels() / unit;
  // Tile shape: NB panels x MB rows, NB * MB <= 24 accumulators. Few rows:
  // 4 panels (4 independent FMA chains per row even at m = 1). Eight rows or
  // more: 8-row tiles, so m = 16 is two passes over each weight group (the
  // first from memory, the second from L2). Measured on Zen 4 at m = 16
  // against 4 x 6 and 2 x 8: within noise of each other, 2 x 8 slower on
  // the LM head.
  const int nb_units = m >= 8 ? (paired ? 1 : 3) : 4 / unit;
  const int mb = m >= 8 ? 8 : 6;
  const int64_t row_chunk = int64_t{mb} * 8;
  const bool parallel = m * w.num_panels() * kP * k >= 32768;
#pragma omp parallel if (parallel)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
    alignas(64) float out[kMaxMb * kMaxNb * kP];
    for (int64_t r0 = 0; r0 < m; r0 += row_chunk) {
      const int64_t r1 = std::min(m, r0 + row_chunk);
      for (int64_t u = u0; u < u1; u += nb_units) {
        const int nb = static_cast<int>(std::min<int64_t>(nb_units, u1 - u)) * unit;
        const uint8_t* panels = w.panel(u * unit);
        for (int64_t r = r0; r < r1; r += mb) {
          const int rows = static_cast<int>(std::min<int64_t>(mb, r1 - r));
          tiles[(nb - 1) * kMaxMb + rows - 1](x + r * k, k, panels, pb, out);
          Store(out, nb, rows, u * unit, paired, n, ep, y + r * n);
        }
      }
    }
  }
}

}  // namespace

bool CpuHasAvx512() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

uint8_t* AllocLargeBuffer(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  if (bytes < kHuge) {
    return static_cast<uint8_t*>(std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64)));
  }
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, rounded);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p != nullptr) (void)madvise(p, rounded, MADV_HUGEPAGE);  // a hint: fine if refused
#endif
  return static_cast<uint8_t*>(p);
}

void PackedWeights::Allocate(int64_t panels, int64_t k, WeightDtype dtype) {
  STRATA_CHECK(dtype == WeightDtype::kFp32 || dtype == WeightDtype::kFp16)
      << "packed weights are fp32 or fp16";
  k_ = k;
  dtype_ = dtype;
  panels_ = panels;
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(64, (this->bytes() + 63) / 64 * 64));
  data_.reset(AllocLargeBuffer(bytes));
  STRATA_CHECK(data_ != nullptr) << "cannot allocate " << bytes << " bytes of weights";
  std::memset(data_.get(), 0, bytes);
}

void PackedWeights::StoreRow(int64_t panel, int lane, const float* row) {
  uint8_t* p = data_.get() + panel * panel_bytes();
  if (dtype_ == WeightDtype::kFp16) {
    uint16_t* h = reinterpret_cast<uint16_t*>(p);
    for (int64_t c = 0; c < k_; ++c) h[c * kP + lane] = FloatToHalf(row[c]);
  } else {
    float* f = reinterpret_cast<float*>(p);
    for (int64_t c = 0; c < k_; ++c) f[c * kP + lane] = row[c];
  }
}

PackedWeights PackedWeights::Pack(std::initializer_list<Part> parts, int64_t k, WeightDtype dtype) {
  PackedWeights pw;
  int64_t n = 0;
  for (const Part& p : parts) n += p.rows;
  pw.n_ = n;
  pw.Allocate((n + kP - 1) / kP, k, dtype);
  int64_t i = 0;
  for (const Part& p : parts) {
    for (int64_t r = 0; r < p.rows; ++r, ++i) pw.StoreRow(i / kP, i % kP, p.w + r * k);
  }
  return pw;
}

PackedWeights PackedWeights::PackPairs(const float* gate, const float* up, int64_t n, int64_t k,
                                       WeightDtype dtype) {
  PackedWeights pw;
  pw.n_ = n;
  pw.paired_ = true;
  pw.Allocate(2 * ((n + kP - 1) / kP), k, dtype);
  for (int64_t i = 0; i < n; ++i) {
    pw.StoreRow(2 * (i / kP), i % kP, gate + i * k);
    pw.StoreRow(2 * (i / kP) + 1, i % kP, up + i * k);
  }
  return pw;
}

void PackedLinear(const float* x, const PackedWeights& w, float* y, int64_t m, Epilogue ep,
                  GemmIsa isa) {
  STRATA_CHECK(!w.empty());
  STRATA_CHECK_EQ(ep == Epilogue::kSiluMul, w.paired()) << "kSiluMul needs a paired matrix";
  if (m <= 0) return;
  bool avx = isa == GemmIsa::kAvx512 || (isa == GemmIsa::kAuto && CpuHasAvx512());
  STRATA_CHECK(!avx || CpuHasAvx512()) << "AVX-512 GEMM requested on a CPU without it";
  Run(x, w, y, m, ep, avx);
}

void PackedLinear(const float* x, const PackedWeights& w, float* y, int64_t m, Epilogue ep) {
  PackedLinear(x, w, y, m, ep, GemmIsa::kAuto);
}

}  // namespace strata::cpu
