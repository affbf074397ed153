// Wire conversions of the control plane (worker_wire.h).
#include "worker/worker_wire.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/status_macros.h"

namespace strata {

namespace v1 = worker::v1;

grpc::Status ToGrpcStatus(const absl::Status& s) {
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

void StatusToProto(const absl::Status& s, v1::StatusProto* out) {
  out->set_code(static_cast<int32_t>(s.code()));
  out->set_message(std::string(s.message()));
}

absl::Status StatusFromProto(const v1::StatusProto& p) {
  if (p.code() < 0 || p.code() > 16) return absl::UnknownError(p.message());
  return absl::Status(static_cast<absl::StatusCode>(p.code()), p.message());
}

void ConfigToProto(const ModelConfig& c, v1::ModelConfigProto* p) {
  p->set_architecture(c.architecture);
  p->set_hidden_size(c.hidden_size);
  p->set_intermediate_size(c.intermediate_size);
  p->set_num_layers(c.num_layers);
  p->set_num_heads(c.num_heads);
  p->set_num_kv_heads(c.num_kv_heads);
  p->set_head_dim(c.head_dim);
  p->set_vocab_size(c.vocab_size);
  p->set_max_position_embeddings(c.max_position_embeddings);
  p->set_rms_norm_eps(c.rms_norm_eps);
  p->set_rope_theta(c.rope_theta);
  p->set_tie_word_embeddings(c.tie_word_embeddings);
  p->set_torch_dtype(static_cast<int32_t>(c.torch_dtype));
  p->set_bos_token_id(c.bos_token_id);
  p->set_eos_token_id(c.eos_token_id);
}

ModelConfig ConfigFromProto(const v1::ModelConfigProto& p) {
  ModelConfig c;
  c.architecture = p.architecture();
  c.hidden_size = p.hidden_size();
  c.intermediate_size = p.intermediate_size();
  c.num_layers = p.num_layers();
  c.num_heads = p.num_heads();
  c.num_kv_heads = p.num_kv_heads();
  c.head_dim = p.head_dim();
  c.vocab_size = p.vocab_size();
  c.max_position_embeddings = p.max_position_embeddings();
  c.rms_norm_eps = p.rms_norm_eps();
  c.rope_theta = p.rope_theta();
  c.tie_word_embeddings = p.tie_word_embeddings();
  c.torch_dtype = static_cast<WeightDtype>(std::clamp(p.torch_dtype(), 0, 2));
  c.bos_token_id = p.bos_token_id();
  c.eos_token_id = p.eos_token_id();
  return c;
}

namespace {

void MovesToProto(const std::vector<KvBlockMove>& moves, google::protobuf::RepeatedField<int32_t>* out) {
  out->Reserve(static_cast<int>(2 * moves.size()));
  for (const KvBlockMove& m : moves) out->Add(m.src), out->Add(m.dst);
}

absl::Status MovesFromProto(const google::protobuf::RepeatedField<int32_t>& p, const char* what,
                            std::vector<KvBlockMove>* out) {
  if (p.size() % 2 != 0) return absl::InvalidArgumentError(absl::StrCat(what, ": odd pair list"));
  out->clear();
  for (int i = 0; i < p.size(); i += 2) out->push_back({p[i], p[i + 1]});
  return absl::OkStatus();
}

static_assert(std::endian::native == std::endian::little,
              "the step's int32 columns travel as little-endian bytes");

// Column `what` of a step as `count` values of T (count < 0: any number),
// copied out of the message's bytes (which need not be aligned).
template <class T>
absl::Status ReadColumn(const std::string& bytes, const char* what, int64_t count, std::vector<T>* out) {
  if (bytes.size() % sizeof(T) != 0 ||
      (count >= 0 && bytes.size() != static_cast<size_t>(count) * sizeof(T))) {
    return absl::InvalidArgumentError(
        absl::StrCat("step column ", what, ": ", bytes.size(), " bytes, expected ",
                     count >= 0 ? absl::StrCat(count, " values of ", sizeof(T))
                                : absl::StrCat("a multiple of ", sizeof(T))));
  }
  out->resize(bytes.size() / sizeof(T));
  if (!out->empty()) std::memcpy(out->data(), bytes.data(), bytes.size());
  return absl::OkStatus();
}

// Offsets of `n` ranges into a column of `total` values: from 0, non-decreasing, ending at total.
absl::Status CheckOffsets(const std::vector<int32_t>& begin, const char* what, int64_t total) {
  for (size_t i = 0; i + 1 < begin.size(); ++i) {
    if (begin[i] > begin[i + 1]) {
      return absl::InvalidArgumentError(absl::StrCat("step column ", what, " decreases at sequence ", i));
    }
  }
  if (begin.front() != 0 || begin.back() != total) {
    return absl::InvalidArgumentError(absl::StrCat("step column ", what, " spans [", begin.front(), ", ",
                                                   begin.back(), ") of ", total, " values"));
  }
  return absl::OkStatus();
}

}  // namespace

void StepToProto(int64_t step_id, const StepInput& in, v1::Step* out) {
  const size_t n = in.seqs.size();
  size_t num_tokens = 0, num_blocks = 0;
  for (const SeqStepInput& s : in.seqs) num_tokens += s.tokens.size(), num_blocks += s.block_table.size();
  out->set_step_id(step_id);
  out->set_num_seqs(static_cast<int32_t>(n));
  std::string* tokens = out->mutable_tokens();
  std::string* token_begin = out->mutable_token_begin();
  std::string* tables = out->mutable_block_tables();
  std::string* table_begin = out->mutable_table_begin();
  std::string* start_pos = out->mutable_start_pos();
  std::string* logits = out->mutable_logits();
  std::string* sample = out->mutable_sample();
  tokens->resize(num_tokens * 4);
  tables->resize(num_blocks * 4);
  token_begin->resize((n + 1) * 4);
  table_begin->resize((n + 1) * 4);
  start_pos->resize(n * 4);
  logits->resize(n);
  sample->resize(n);
  int32_t tok = 0, blk = 0;
  std::memcpy(token_begin->data(), &tok, 4);
  std::memcpy(table_begin->data(), &blk, 4);
  for (size_t i = 0; i < n; ++i) {
    const SeqStepInput& s = in.seqs[i];
    if (!s.tokens.empty()) {
      std::memcpy(tokens->data() + size_t{4} * tok, s.tokens.data(), 4 * s.tokens.size());
    }
    if (!s.block_table.empty()) {
      std::memcpy(tables->data() + size_t{4} * blk, s.block_table.data(), 4 * s.block_table.size());
    }
    tok += static_cast<int32_t>(s.tokens.size());
    blk += static_cast<int32_t>(s.block_table.size());
    std::memcpy(token_begin->data() + 4 * (i + 1), &tok, 4);
    std::memcpy(table_begin->data() + 4 * (i + 1), &blk, 4);
    std::memcpy(start_pos->data() + 4 * i, &s.start_pos, 4);
    (*logits)[i] = static_cast<char>(s.logits);
    (*sample)[i] = s.sample ? 1 : 0;
    if (s.sample) {
      out->add_temperature(s.sampling.temperature);
      out->add_top_k(s.sampling.top_k);
      out->add_top_p(s.sampling.top_p);
      out->add_seed(s.sampling.seed);
      out->add_num_logprobs(s.num_logprobs);
    }
  }
  MovesToProto(in.swap_out, out->mutable_swap_out());
  MovesToProto(in.swap_in, out->mutable_swap_in());
  MovesToProto(in.copies, out->mutable_copies());
}

absl::Status StepFromProto(const v1::Step& p, StepInput* in) {
  const int64_t n = p.num_seqs();
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("step with ", n, " sequences"));
  std::vector<int32_t> token_begin, table_begin, start_pos;
  std::vector<uint8_t> logits, sample;
  RETURN_IF_ERROR(ReadColumn(p.token_begin(), "token_begin", n + 1, &token_begin));
  RETURN_IF_ERROR(ReadColumn(p.table_begin(), "table_begin", n + 1, &table_begin));
  RETURN_IF_ERROR(ReadColumn(p.start_pos(), "start_pos", n, &start_pos));
  RETURN_IF_ERROR(ReadColumn(p.logits(), "logits", n, &logits));
  RETURN_IF_ERROR(ReadColumn(p.sample(), "sample", n, &sample));
  if (p.tokens().size() % 4 != 0 || p.block_tables().size() % 4 != 0) {
    return absl::InvalidArgumentError("step columns tokens / block_tables are not whole int32 values");
  }
  RETURN_IF_ERROR(CheckOffsets(token_begin, "token_begin", static_cast<int64_t>(p.tokens().size() / 4)));
  RETURN_IF_ERROR(CheckOffsets(table_begin, "table_begin", static_cast<int64_t>(p.block_tables().size() / 4)));
  int64_t samplers = 0;
  for (uint8_t x : sample) samplers += x != 0;
  if (p.temperature_size() != samplers || p.top_k_size() != samplers || p.top_p_size() != samplers ||
      p.seed_size() != samplers || p.num_logprobs_size() != samplers) {
    return absl::InvalidArgumentError(absl::StrCat("step sampling columns do not match its ", samplers,
                                                   " sampling sequences"));
  }
  in->seqs.resize(static_cast<size_t>(n));
  int k = 0;  // index into the sampling columns
  for (int64_t i = 0; i < n; ++i) {
    SeqStepInput& s = in->seqs[i];
    s.tokens.resize(static_cast<size_t>(token_begin[i + 1] - token_begin[i]));
    if (!s.tokens.empty()) {
      std::memcpy(s.tokens.data(), p.tokens().data() + size_t{4} * token_begin[i], 4 * s.tokens.size());
    }
    s.block_table.resize(static_cast<size_t>(table_begin[i + 1] - table_begin[i]));
    if (!s.block_table.empty()) {
      std::memcpy(s.block_table.data(), p.block_tables().data() + size_t{4} * table_begin[i],
                  4 * s.block_table.size());
    }
    s.start_pos = start_pos[i];
    if (logits[i] > 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", i, ": unknown logits mode ", static_cast<int>(logits[i])));
    }
    s.logits = static_cast<SeqStepInput::Logits>(logits[i]);
    s.sample = sample[i] != 0;
    s.sampling = SamplingParams{};
    s.num_logprobs = -1;
    if (s.sample) {
      s.sampling.temperature = p.temperature(k);
      s.sampling.top_k = p.top_k(k);
      s.sampling.top_p = p.top_p(k);
      s.sampling.seed = p.seed(k);
      s.num_logprobs = p.num_logprobs(k);
      ++k;
      if (s.num_logprobs > 20) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": num_logprobs above 20"));
      }
    }
  }
  RETURN_IF_ERROR(MovesFromProto(p.swap_out(), "swap_out", &in->swap_out));
  RETURN_IF_ERROR(MovesFromProto(p.swap_in(), "swap_in", &in->swap_in));
  return MovesFromProto(p.copies(), "copies", &in->copies);
}

void OutputToProto(const StepOutput& out, v1::StepResult* p) {
  p->mutable_logits()->assign(reinterpret_cast<const char*>(out.logits.data()),
                              out.logits.size() * sizeof(float));
  p->mutable_row_begin()->Add(out.row_begin.begin(), out.row_begin.end());
  for (const StepOutput::Sampled& s : out.sampled) {
    v1::SampledProto* q = p->add_sampled();
    q->set_token(s.token);
    q->set_logprob(s.logprob);
    for (const auto& [id, lp] : s.top_logprobs) q->add_top_ids(id), q->add_top_logprobs(lp);
  }
}

absl::Status OutputFromProto(const v1::StepResult& p, int32_t vocab_size, StepOutput* out) {
  const size_t bytes = p.logits().size();
  if (bytes % (sizeof(float) * vocab_size) != 0) {
    return absl::DataLossError(absl::StrCat("step result has ", bytes, " logits bytes, not whole rows of ",
                                            vocab_size));
  }
  out->logits.resize(bytes / sizeof(float));
  if (bytes > 0) std::memcpy(out->logits.data(), p.logits().data(), bytes);
  out->row_begin.assign(p.row_begin().begin(), p.row_begin().end());
  const int64_t rows = static_cast<int64_t>(bytes / (sizeof(float) * vocab_size));
  if (!out->row_begin.empty() && out->row_begin.back() != rows) {
    return absl::DataLossError("step result row offsets do not match its logits");
  }
  out->sampled.resize(p.sampled_size());
  for (int i = 0; i < p.sampled_size(); ++i) {
    const v1::SampledProto& q = p.sampled(i);
    StepOutput::Sampled& s = out->sampled[i];
    s.token = q.token();
    s.logprob = q.logprob();
    s.top_logprobs.clear();
    for (int k = 0; k < q.top_ids_size() && k < q.top_logprobs_size(); ++k) {
      s.top_logprobs.emplace_back(q.top_ids(k), q.top_logprobs(k));
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
