// Token sampling on the host: greedy, temperature, top-k, top-p, with a
// per-request random stream so a seeded request gives the same tokens
// whatever else is in the batch.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace strata {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy (argmax, ties to the lowest id)
  int32_t top_k = 0;         // 0 = no limit
  float top_p = 1.0f;        // (0, 1]
  uint64_t seed = 0;
};

// INVALID_ARGUMENT naming the field for out-of-range values.
absl::Status ValidateSamplingParams(const SamplingParams& p, int32_t vocab_size);

// One request's sampler; owns its random stream.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  int32_t Sample(const float* logits, int32_t vocab_size);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

// The seed of a request's sampler for the token sampled at `position`: a
// seeded request's stream is keyed by (seed, position), so it does not depend
// on the batch, on preemption (recompute) or on the process that samples.
uint64_t SeedForPosition(uint64_t seed, uint64_t position);

int32_t ArgMax(const float* logits, int32_t n);

// log-softmax of `logits` at `token`, and the top `n` (id, logprob) pairs.
float LogProbOf(const float* logits, int32_t vocab_size, int32_t token);
std::vector<std::pair<int32_t, float>> TopLogProbs(const float* logits, int32_t vocab_size,
                                                   int32_t n);

}  // namespace strata
