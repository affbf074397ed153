#include "runtime/sampling.h"

#include <algorithm>
#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "absl/strings/str_cat.h"

namespace strata {

absl::Status ValidateSamplingParams(const SamplingParams& p, int32_t vocab_size) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", p.temperature));
  }
  if (p.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  return absl::OkStatus();
}

int32_t ArgMax(const float* logits, int32_t n) {
  int32_t i = 1, best = 0;
#if defined(__AVX512F__)
  // The same answer as the loop below (the first index of the largest value;
  // NaNs never win, and a NaN at 0 keeps 0), in two vector passes: the
  // largest non-NaN value, then its first index. Greedy decoding runs this
  // over the vocabulary for every sequence of every step.
  if (n >= 64 && !std::isnan(logits[0])) {
    __m512 m = _mm512_set1_ps(logits[0]);
    int32_t k = 0;
    for (; k + 16 <= n; k += 16) {
      const __m512 x = _mm512_loadu_ps(logits + k);
      m = _mm512_mask_max_ps(m, _mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), m, x);
    }
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, m);
    float best_value = lanes[0];
    for (int l = 1; l < 16; ++l) best_value = std::max(best_value, lanes[l]);
    for (; k < n; ++k) {
      if (logits[k] > best_value) best_value = logits[k];
    }
    const __m512 target = _mm512_set1_ps(best_value);
    for (k = 0; k + 16 <= n; k += 16) {
      const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(logits + k), target, _CMP_EQ_OQ);
      if (eq != 0) return k + __builtin_ctz(eq);
    }
    for (; k < n; ++k) {
      if (logits[k] == best_value) return k;
    }
  }
#endif
  for (; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

int32_t Sampler::Sample(const float* logits, int32_t vocab_size) {
  if (params_.temperature == 0.0f) return ArgMax(logits, vocab_size);
  const float inv_t = 1.0f / params_.temperature;
  scratch_.resize(vocab_size);
  for (int32_t i = 0; i < vocab_size; ++i) scratch_[i] = {logits[i] * inv_t, i};
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  int32_t n = vocab_size;
  if (params_.top_k > 0 && params_.top_k < n) {
    std::partial_sort(scratch_.begin(), scratch_.begin() + params_.top_k, scratch_.end(), by_logit);
    n = params_.top_k;
  } else if (params_.top_p < 1.0f) {
    std::sort(scratch_.begin(), scratch_.end(), by_logit);
  }
  const float max_logit =
      std::max_element(scratch_.begin(), scratch_.begin() + n, [](auto& a, auto& b) {
        return a.first < b.first;
      })->first;
  double total = 0.0;
  for (int32_t i = 0; i < n; ++i) {
    scratch_[i].first = std::exp(scratch_[i].first - max_logit);
    total += scratch_[i].first;
  }
  if (params_.top_p < 1.0f) {
    // Keep the smallest prefix (in descending probability) whose mass reaches top_p.
    if (params_.top_k > 0 && params_.top_k < vocab_size) {
      std::sort(scratch_.begin(), scratch_.begin() + n, by_logit);
    }
    double cum = 0.0;
    int32_t keep = 0;
    while (keep < n) {
      cum += scratch_[keep].first;
      ++keep;
      if (cum >= params_.top_p * total) break;
    }
    n = keep;
    total = cum;
  }
  std::uniform_real_distribution<double> uni(0.0, total);
  const double r = uni(rng_);
  double acc = 0.0;
  for (int32_t i = 0; i < n; ++i) {
    acc += scratch_[i].first;
    if (r < acc) return scratch_[i].second;
  }
  return scratch_[n - 1].second;
}

namespace {
double LogSumExp(const float* logits, int32_t n) {
  const float m = *std::max_element(logits, logits + n);
  double s = 0.0;
  for (int32_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(logits[i]) - m);
  return m + std::log(s);
}
}  // namespace

float LogProbOf(const float* logits, int32_t vocab_size, int32_t token) {
  return static_cast<float>(logits[token] - LogSumExp(logits, vocab_size));
}

std::vector<std::pair<int32_t, float>> TopLogProbs(const float* logits, int32_t vocab_size,
                                                   int32_t n) {
  n = std::min(n, vocab_size);
  const double lse = LogSumExp(logits, vocab_size);
  std::vector<int32_t> ids(vocab_size);
  for (int32_t i = 0; i < vocab_size; ++i) ids[i] = i;
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<std::pair<int32_t, float>> out;
  for (int32_t i = 0; i < n; ++i) out.emplace_back(ids[i], static_cast<float>(logits[ids[i]] - lse));
  return out;
}

namespace {
uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

uint64_t SeedForPosition(uint64_t seed, uint64_t position) {
  return SplitMix64(seed ^ SplitMix64(position));
}

}  // namespace strata
