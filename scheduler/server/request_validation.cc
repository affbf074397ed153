#include "scheduler/server/request_validation.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/status_macros.h"
#include "scheduler/server/text_util.h"

namespace strata::serving {
namespace {

absl::Status Invalid(std::string message) {
  return absl::InvalidArgumentError(std::move(message));
}

absl::Status CheckSize(const google::protobuf::Message& m, const RequestLimits& limits) {
  const size_t bytes = m.ByteSizeLong();
  if (static_cast<int64_t>(bytes) > limits.max_request_bytes) {
    return Invalid(absl::StrCat("request is ", bytes, " bytes; the limit is ",
                                limits.max_request_bytes, " (--max-request-bytes)"));
  }
  return absl::OkStatus();
}

// Size, UTF-8 and emptiness of a text field.
absl::Status CheckText(const std::string& text, const char* field, const RequestLimits& limits) {
  if (static_cast<int64_t>(text.size()) > limits.max_request_bytes) {
    return Invalid(absl::StrCat(field, " is ", text.size(), " bytes; the limit is ",
                                limits.max_request_bytes, " (--max-request-bytes)"));
  }
  if (auto bad = FindInvalidUtf8(text)) {
    return Invalid(absl::StrCat(field, " is not valid UTF-8 (byte offset ", *bad, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckIds(const google::protobuf::RepeatedField<int32_t>& ids, const char* field,
                      int32_t vocab) {
  for (int i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      return Invalid(absl::StrCat(field, "[", i, "] = ", ids[i],
                                  " is not a token id (vocabulary [0, ", vocab, "))"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ServingRequest> ValidateGenerateRequest(const v1::GenerateRequest& request,
                                                       const Tokenizer& tokenizer,
                                                       const RequestLimits& limits) {
  ServingRequest out;
  // Prompt.
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      RETURN_IF_ERROR(CheckText(request.text(), "prompt.text", limits));
      if (request.text().empty()) return Invalid("prompt.text is empty");
      if (!request.has_add_bos() || request.add_bos()) {
        if (tokenizer.bos_id() < 0) return Invalid("add_bos: the model's tokenizer has no BOS");
        out.prompt.push_back(tokenizer.bos_id());
      }
      const std::vector<int32_t> ids = tokenizer.Encode(request.text());
      out.prompt.insert(out.prompt.end(), ids.begin(), ids.end());
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      if (ids.empty()) return Invalid("prompt.token_ids is empty");
      if (ids.size() >= limits.max_context) {
        return Invalid(absl::StrCat("prompt.token_ids has ", ids.size(), " ids; the context holds ",
                                    limits.max_context, " tokens including the output"));
      }
      RETURN_IF_ERROR(CheckIds(ids, "prompt.token_ids", limits.vocab_size));
      out.prompt.assign(ids.begin(), ids.end());
      break;
    }
    default:
      return Invalid("prompt: set either prompt.text or prompt.token_ids");
  }
  RETURN_IF_ERROR(CheckSize(request, limits));
  if (request.request_id().size() > 256) return Invalid("request_id is longer than 256 bytes");
  out.label = request.request_id();
  const int32_t prompt_len = static_cast<int32_t>(out.prompt.size());
  if (prompt_len >= limits.max_context) {
    return Invalid(absl::StrCat("prompt has ", prompt_len, " tokens; the context holds ",
                                limits.max_context, " tokens including at least one output token"));
  }

  // Sampling.
  const v1::SamplingParams& s = request.sampling();
  if (s.has_temperature()) {
    if (!std::isfinite(s.temperature()) || s.temperature() < 0.0f) {
      return Invalid(absl::StrCat("sampling.temperature must be a finite number >= 0, got ",
                                  s.temperature()));
    }
    out.sampling.temperature = s.temperature();
  }
  if (s.has_top_p()) {
    if (!(s.top_p() > 0.0f && s.top_p() <= 1.0f)) {
      return Invalid(absl::StrCat("sampling.top_p must be in (0, 1], got ", s.top_p()));
    }
    out.sampling.top_p = s.top_p();
  }
  if (s.has_top_k()) {
    if (s.top_k() < 0) return Invalid(absl::StrCat("sampling.top_k must be >= 0, got ", s.top_k()));
    out.sampling.top_k = s.top_k();
  }
  if (s.has_seed()) out.sampling.seed = s.seed();
  if (s.has_max_tokens()) {
    if (s.max_tokens() <= 0) {
      return Invalid(absl::StrCat("sampling.max_tokens must be >= 1, got ", s.max_tokens()));
    }
    if (int64_t{prompt_len} + s.max_tokens() > limits.max_context) {
      return Invalid(absl::StrCat("sampling.max_tokens = ", s.max_tokens(), " with a ", prompt_len,
                                  "-token prompt exceeds the context of ", limits.max_context,
                                  " tokens (at most ", limits.max_context - prompt_len, ")"));
    }
    out.max_tokens = s.max_tokens();
  } else {
    out.max_tokens = limits.max_context - prompt_len;
  }
  if (s.stop_size() > limits.max_stop_strings) {
    return Invalid(absl::StrCat("sampling.stop has ", s.stop_size(), " strings; at most ",
                                limits.max_stop_strings));
  }
  for (int i = 0; i < s.stop_size(); ++i) {
    const std::string field = absl::StrCat("sampling.stop[", i, "]");
    if (s.stop(i).empty()) return Invalid(field + " is empty");
    if (static_cast<int32_t>(s.stop(i).size()) > limits.max_stop_bytes) {
      return Invalid(absl::StrCat(field, " is longer than ", limits.max_stop_bytes, " bytes"));
    }
    if (auto bad = FindInvalidUtf8(s.stop(i))) {
      return Invalid(absl::StrCat(field, " is not valid UTF-8 (byte offset ", *bad, ")"));
    }
    out.stop_strings.push_back(s.stop(i));
  }
  RETURN_IF_ERROR(CheckIds(s.stop_token_ids(), "sampling.stop_token_ids", limits.vocab_size));
  out.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  if (!s.ignore_eos()) {
    for (int32_t id : {tokenizer.eos_id(), tokenizer.bos_id()}) {
      if (id >= 0) out.stop_token_ids.push_back(id);
    }
  }
  if (s.has_logprobs()) {
    if (s.logprobs() < 0 || s.logprobs() > limits.max_logprobs) {
      return Invalid(absl::StrCat("sampling.logprobs must be in [0, ", limits.max_logprobs,
                                  "], got ", s.logprobs()));
    }
    out.num_logprobs = s.logprobs();
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> ValidateTokenizeRequest(const v1::TokenizeRequest& request,
                                                             const Tokenizer& tokenizer,
                                                             const RequestLimits& limits) {
  RETURN_IF_ERROR(CheckText(request.text(), "text", limits));
  std::vector<int32_t> ids;
  if (request.add_bos() && tokenizer.bos_id() >= 0) ids.push_back(tokenizer.bos_id());
  const std::vector<int32_t> enc = tokenizer.Encode(request.text());
  ids.insert(ids.end(), enc.begin(), enc.end());
  return ids;
}

absl::Status ValidateDetokenizeRequest(const v1::DetokenizeRequest& request,
                                       const RequestLimits& limits) {
  RETURN_IF_ERROR(CheckSize(request, limits));
  return CheckIds(request.token_ids(), "token_ids", limits.vocab_size);
}

}  // namespace strata::serving
