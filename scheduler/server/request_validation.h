// Admission checks for strata.v1 requests, run on the RPC thread before
// anything reaches the engine thread. A malformed request never reaches a
// CHECK: every problem is INVALID_ARGUMENT with a message naming the field
// ("sampling.top_p must be in (0, 1], got 1.5").
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/strata_v1_generation.pb.h"
#include "runtime/tokenizer.h"
#include "scheduler/server/serving_engine.h"

namespace strata::serving {

struct RequestLimits {
  int32_t vocab_size = 0;
  int32_t max_context = 0;           // prompt + output tokens
  int64_t max_request_bytes = 1 << 20;  // serialized request, and prompt.text alone
  int32_t max_stop_strings = 16;
  int32_t max_stop_bytes = 256;      // per stop string
  int32_t max_logprobs = 20;
};

// Tokenizes a text prompt (BOS first unless add_bos is false) or checks the
// given ids, and checks every sampling field. Stop tokens: the given ones,
// plus EOS and BOS unless ignore_eos.
absl::StatusOr<ServingRequest> ValidateGenerateRequest(const v1::GenerateRequest& request,
                                                       const Tokenizer& tokenizer,
                                                       const RequestLimits& limits);

absl::StatusOr<std::vector<int32_t>> ValidateTokenizeRequest(const v1::TokenizeRequest& request,
                                                             const Tokenizer& tokenizer,
                                                             const RequestLimits& limits);

absl::Status ValidateDetokenizeRequest(const v1::DetokenizeRequest& request,
                                       const RequestLimits& limits);

}  // namespace strata::serving
