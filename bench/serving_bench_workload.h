// strata-serving-bench: the request stream (lengths, arrival times, prompt token ids).
// Pure host code, deterministic for a given seed and standard library; the fits and their
// sources are documented in bench/WORKLOADS.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace strata::bench {

enum class Workload { kShareGpt, kLong4k, kLong16k, kFixed };

// "sharegpt", "long4k", "long16k", "fixed"; false for anything else.
bool ParseWorkload(const std::string& name, Workload* out);
const char* WorkloadName(Workload w);

struct WorkloadOptions {
  Workload workload = Workload::kShareGpt;
  int num_prompts = 1000;
  int input_len = 0;   // --workload fixed only
  int output_len = 0;  // --workload fixed only
  uint64_t seed = 0;
};

struct RequestSpec {
  int input_len = 0;
  int output_len = 0;  // sent as max_tokens with ignore_eos
  bool clipped = false;
  double arrival_s = 0;  // offset from the start of the run; 0 for every request at rate inf
};

// Log-normal fit of ShareGPT V3 as sampled by vLLM's benchmark (bench/WORKLOADS.md):
// ln(len) ~ N(mu, sigma^2), rounded, with vLLM's filter (prompt in [4, 1024], output >= 4,
// prompt + output <= 2048) applied by rejection.
inline constexpr double kShareGptInputMu = 5.108;
inline constexpr double kShareGptInputSigma = 1.2;
inline constexpr double kShareGptOutputMu = 4.843;
inline constexpr double kShareGptOutputSigma = 1.0;

// The lengths of every request, before clipping.
std::vector<RequestSpec> SampleLengths(const WorkloadOptions& options);

// Makes prompt + output fit `max_context`: the output keeps its length if it fits in half the
// context (else it is cut to half), then the prompt is cut to what is left. Returns how many
// requests were changed (and marks them `clipped`).
int ClipToContext(int max_context, std::vector<RequestSpec>* requests);

// Poisson arrivals at `rate` requests/s (exponential gaps, first request at 0); every offset is
// 0 when rate is infinite.
void AssignArrivals(double rate, uint64_t seed, std::vector<RequestSpec>* requests);

// `len` token ids uniform in [0, vocab_size) except `bos` and `eos`, from a stream that depends
// only on (seed, index), so a prompt can be made when its request is sent.
std::vector<int32_t> PromptTokenIds(uint64_t seed, int index, int len, int vocab_size, int bos,
                                    int eos);

}  // namespace strata::bench
