#include "bench/serving_bench_workload.h"

#include <algorithm>
#include <cmath>
#include <random>

namespace strata::bench {
namespace {

// Independent streams per purpose, so e.g. changing --request-rate keeps the lengths and
// prompts of a given seed.
enum class Stream : uint64_t { kLengths = 1, kArrivals = 2, kPrompt = 3 };

std::mt19937_64 Rng(uint64_t seed, Stream stream, uint64_t index = 0) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(stream), static_cast<uint32_t>(index),
                    static_cast<uint32_t>(index >> 32)};
  return std::mt19937_64(seq);
}

}  // namespace

bool ParseWorkload(const std::string& name, Workload* out) {
  if (name == "sharegpt") *out = Workload::kShareGpt;
  else if (name == "long4k") *out = Workload::kLong4k;
  else if (name == "long16k") *out = Workload::kLong16k;
  else if (name == "fixed") *out = Workload::kFixed;
  else return false;
  return true;
}

const char* WorkloadName(Workload w) {
  switch (w) {
    case Workload::kShareGpt: return "sharegpt";
    case Workload::kLong4k: return "long4k";
    case Workload::kLong16k: return "long16k";
    case Workload::kFixed: return "fixed";
  }
  return "?";
}

std::vector<RequestSpec> SampleLengths(const WorkloadOptions& o) {
  std::vector<RequestSpec> out(o.num_prompts);
  if (o.workload != Workload::kShareGpt) {
    int in = o.input_len, len = o.output_len;
    if (o.workload == Workload::kLong4k) in = 4096, len = 512;
    if (o.workload == Workload::kLong16k) in = 16384, len = 256;
    for (RequestSpec& r : out) r.input_len = in, r.output_len = len;
    return out;
  }
  std::mt19937_64 rng = Rng(o.seed, Stream::kLengths);
  std::lognormal_distribution<double> input(kShareGptInputMu, kShareGptInputSigma);
  std::lognormal_distribution<double> output(kShareGptOutputMu, kShareGptOutputSigma);
  for (RequestSpec& r : out) {
    // vLLM's ShareGPT sampler drops pairs outside these bounds; ~7% are rejected here.
    for (;;) {
      const double in = std::round(input(rng));
      const double len = std::round(output(rng));
      if (in < 4 || in > 1024 || len < 4 || in + len > 2048) continue;
      r.input_len = static_cast<int>(in);
      r.output_len = static_cast<int>(len);
      break;
    }
  }
  return out;
}

int ClipToContext(int max_context, std::vector<RequestSpec>* requests) {
  int clipped = 0;
  for (RequestSpec& r : *requests) {
    if (r.input_len + r.output_len <= max_context) continue;
    r.output_len = std::min(r.output_len, std::max(1, max_context / 2));
    r.input_len = std::min(r.input_len, max_context - r.output_len);
    r.clipped = true;
    ++clipped;
  }
  return clipped;
}

void AssignArrivals(double rate, uint64_t seed, std::vector<RequestSpec>* requests) {
  if (std::isinf(rate)) {
    for (RequestSpec& r : *requests) r.arrival_s = 0;
    return;
  }
  std::mt19937_64 rng = Rng(seed, Stream::kArrivals);
  std::exponential_distribution<double> gap(rate);
  double t = 0;
  for (size_t i = 0; i < requests->size(); ++i) {
    if (i > 0) t += gap(rng);
    (*requests)[i].arrival_s = t;
  }
}

std::vector<int32_t> PromptTokenIds(uint64_t seed, int index, int len, int vocab_size, int bos,
                                    int eos) {
  std::mt19937_64 rng = Rng(seed, Stream::kPrompt, static_cast<uint64_t>(index));
  std::uniform_int_distribution<int32_t> id(0, vocab_size - 1);
  std::vector<int32_t> ids;
  ids.reserve(len);
  while (static_cast<int>(ids.size()) < len) {
    const int32_t t = id(rng);
    if (t != bos && t != eos) ids.push_back(t);
  }
  return ids;
}

}  // namespace strata::bench
