#include "kernels/cpu/ops_cpu.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace strata::cpu {
namespace {

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

TEST(OpsCpu, LinearMatchesNaive) {
  for (int64_t m : {1, 3, 17}) {
    const int64_t n = 33, k = 29;
    auto x = Random(m * k, 1), w = Random(n * k, 2), y = Random(m * n, 3);
    auto y0 = y;
    Linear(x.data(), w.data(), y.data(), m, n, k, /*accumulate=*/true);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double s = y0[i * n + j];
        for (int64_t t = 0; t < k; ++t) s += double{x[i * k + t]} * w[j * k + t];
        EXPECT_NEAR(y[i * n + j], s, 1e-4) << m;
      }
    }
  }
}

TEST(OpsCpu, RmsNormAndSilu) {
  auto x = Random(2 * 8, 4), w = Random(8, 5);
  std::vector<float> out(16);
  RmsNorm(x.data(), w.data(), out.data(), 2, 8, 1e-5f);
  for (int r = 0; r < 2; ++r) {
    double ss = 0;
    for (int i = 0; i < 8; ++i) ss += double{x[r * 8 + i]} * x[r * 8 + i];
    const double inv = 1.0 / std::sqrt(ss / 8 + 1e-5);
    for (int i = 0; i < 8; ++i) EXPECT_NEAR(out[r * 8 + i], w[i] * x[r * 8 + i] * inv, 1e-5);
  }
  const float g[] = {-2.0f, 0.0f, 3.0f}, u[] = {1.0f, 5.0f, 2.0f};
  float o[3];
  SiluMul(g, u, o, 3);
  EXPECT_NEAR(o[0], -2.0 / (1 + std::exp(2.0)), 1e-6);
  EXPECT_EQ(o[1], 0.0f);
  EXPECT_NEAR(o[2], 2 * 3.0 / (1 + std::exp(-3.0)), 1e-5);
}

TEST(OpsCpu, RopeRotatesHalvesAndPreservesNorm) {
  const int hd = 8, heads = 2, maxpos = 16;
  std::vector<float> c(maxpos * hd / 2), s(maxpos * hd / 2);
  FillRopeTable(10000.0f, hd, maxpos, c.data(), s.data());
  RopeTable t{maxpos, hd / 2, c.data(), s.data()};
  auto x = Random(heads * hd, 6);
  auto x0 = x;
  const int32_t pos = 7;
  ApplyRope(x.data(), &pos, 1, heads, hd, t);
  for (int h = 0; h < heads; ++h) {
    for (int j = 0; j < hd / 2; ++j) {
      const double ang = pos * std::pow(10000.0, -2.0 * j / hd);
      const double a = x0[h * hd + j], b = x0[h * hd + j + hd / 2];
      EXPECT_NEAR(x[h * hd + j], a * std::cos(ang) - b * std::sin(ang), 1e-5);
      EXPECT_NEAR(x[h * hd + j + hd / 2], a * std::sin(ang) + b * std::cos(ang), 1e-5);
    }
  }
  const int32_t zero = 0;
  auto y = x0;
  ApplyRope(y.data(), &zero, 1, heads, hd, t);
  EXPECT_EQ(y, x0);
}

}  // namespace
}  // namespace strata::cpu
