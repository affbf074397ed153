#include "kernels/cpu/gemm_cpu.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/float16.h"

namespace strata::cpu {
namespace {

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

std::vector<GemmIsa> Isas() {
  std::vector<GemmIsa> isas = {GemmIsa::kPortable};
  if (CpuHasAvx512()) isas.push_back(GemmIsa::kAvx512);
  return isas;
}

// The weight as the kernel sees it (fp16-rounded when packed as fp16).
float Stored(float v, WeightDtype dt) {
  return dt == WeightDtype::kFp16 ? HalfToFloat(FloatToHalf(v)) : v;
}

// Shapes: n not a multiple of 16, m across the tile and row-chunk edges.
TEST(GemmCpu, MatchesFloat64ReferenceForEveryShapeDtypeAndEpilogue) {
  for (GemmIsa isa : Isas()) {
    for (WeightDtype dt : {WeightDtype::kFp32, WeightDtype::kFp16}) {
      for (int64_t n : {1, 16, 37, 80, 200}) {
        for (int64_t k : {1, 29, 64}) {
          const auto w = Random(n * k, 2);
          const PackedWeights pw = PackedWeights::Pack(w.data(), n, k, dt);
          for (int64_t m : {1, 2, 5, 6, 7, 13, 49, 100}) {
            const auto x = Random(m * k, 1), y0 = Random(m * n, 3);
            for (Epilogue ep : {Epilogue::kStore, Epilogue::kAccumulate}) {
              std::vector<float> y = y0;
              PackedLinear(x.data(), pw, y.data(), m, ep, isa);
              for (int64_t i = 0; i < m; ++i) {
                for (int64_t j = 0; j < n; ++j) {
                  double s = ep == Epilogue::kAccumulate ? y0[i * n + j] : 0.0;
                  for (int64_t t = 0; t < k; ++t) s += double{x[i * k + t]} * Stored(w[j * k + t], dt);
                  ASSERT_NEAR(y[i * n + j], s, 1e-5 * k + 1e-5)
                      << "isa " << int(isa) << " dt " << int(dt) << " m " << m << " n " << n << " k " << k;
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST(GemmCpu, StackedPartsAndSiluMulPairs) {
  const int64_t k = 40, n1 = 20, n2 = 7, f = 50, m = 9;
  const auto a = Random(n1 * k, 4), b = Random(n2 * k, 5), x = Random(m * k, 6);
  const auto gate = Random(f * k, 7), up = Random(f * k, 8);
  for (GemmIsa isa : Isas()) {
    for (WeightDtype dt : {WeightDtype::kFp32, WeightDtype::kFp16}) {
      const PackedWeights stacked = PackedWeights::Pack({{a.data(), n1}, {b.data(), n2}}, k, dt);
      ASSERT_EQ(stacked.n(), n1 + n2);
      std::vector<float> y(m * (n1 + n2));
      PackedLinear(x.data(), stacked, y.data(), m, Epilogue::kStore, isa);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n1 + n2; ++j) {
          const float* wr = j < n1 ? &a[j * k] : &b[(j - n1) * k];
          double s = 0;
          for (int64_t t = 0; t < k; ++t) s += double{x[i * k + t]} * Stored(wr[t], dt);
          ASSERT_NEAR(y[i * (n1 + n2) + j], s, 1e-4);
        }
      }
      const PackedWeights pairs = PackedWeights::PackPairs(gate.data(), up.data(), f, k, dt);
      ASSERT_TRUE(pairs.paired());
      std::vector<float> act(m * f);
      PackedLinear(x.data(), pairs, act.data(), m, Epilogue::kSiluMul, isa);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < f; ++j) {
          double g = 0, u = 0;
          for (int64_t t = 0; t < k; ++t) {
            g += double{x[i * k + t]} * Stored(gate[j * k + t], dt);
            u += double{x[i * k + t]} * Stored(up[j * k + t], dt);
          }
          ASSERT_NEAR(act[i * f + j], g / (1 + std::exp(-g)) * u, 1e-4 * (1 + std::fabs(u)));
        }
      }
    }
  }
}

// A row's outputs are bit-identical whatever else is in the batch.
TEST(GemmCpu, BatchInvariant) {
  const int64_t n = 300, k = 96, m = 23;
  const auto w = Random(n * k, 9), x = Random(m * k, 10);
  for (GemmIsa isa : Isas()) {
    for (WeightDtype dt : {WeightDtype::kFp32, WeightDtype::kFp16}) {
      const PackedWeights pw = PackedWeights::Pack(w.data(), n, k, dt);
      std::vector<float> all(m * n), one(n);
      PackedLinear(x.data(), pw, all.data(), m, Epilogue::kStore, isa);
      for (int64_t i = 0; i < m; ++i) {
        PackedLinear(x.data() + i * k, pw, one.data(), 1, Epilogue::kStore, isa);
        for (int64_t j = 0; j < n; ++j) ASSERT_EQ(one[j], all[i * n + j]) << i << " " << j;
      }
    }
  }
}

TEST(GemmCpu, Fp16PackingIsExactForFp16Values) {
  const int64_t n = 17, k = 5;
  auto w = Random(n * k, 11);
  for (float& v : w) v = HalfToFloat(FloatToHalf(v));
  const PackedWeights pw = PackedWeights::Pack(w.data(), n, k, WeightDtype::kFp16);
  EXPECT_EQ(pw.bytes(), 2 * 16 * k * 2);  // two panels of 16 rows, 2 bytes each
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(pw.panel(j / 16));
    for (int64_t c = 0; c < k; ++c) EXPECT_EQ(HalfToFloat(h[c * 16 + j % 16]), w[j * k + c]);
  }
}

}  // namespace
}  // namespace strata::cpu
