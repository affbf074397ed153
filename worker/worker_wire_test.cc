// The step's wire form (worker_wire.h: StepToProto / StepFromProto): a round
// trip keeps every field of every sequence, and malformed columns are
// INVALID_ARGUMENT naming the column.
#include "worker/worker_wire.h"

#include <cstring>
#include <random>
#include <string>

#include "gtest/gtest.h"

namespace strata {
namespace {

namespace v1 = worker::v1;

StepInput RandomStep(std::mt19937& rng, int n) {
  StepInput in;
  for (int i = 0; i < n; ++i) {
    SeqStepInput s;
    const int tokens = i % 7 == 0 ? 0 : 1 + static_cast<int>(rng() % (i % 3 == 0 ? 300 : 2));
    for (int t = 0; t < tokens; ++t) s.tokens.push_back(static_cast<int32_t>(rng() % 32000));
    s.start_pos = static_cast<int32_t>(rng() % 4000);
    const int blocks = static_cast<int>(rng() % 60);
    for (int b = 0; b < blocks; ++b) s.block_table.push_back(static_cast<int32_t>(rng() % 100000));
    s.logits = static_cast<SeqStepInput::Logits>(rng() % 3);
    s.sample = rng() % 2 == 0;
    if (s.sample) {
      s.sampling.temperature = 0.25f * static_cast<float>(rng() % 8);
      s.sampling.top_k = static_cast<int32_t>(rng() % 50);
      s.sampling.top_p = 0.5f + 0.05f * static_cast<float>(rng() % 10);
      s.sampling.seed = (uint64_t{rng()} << 32) | rng();
      s.num_logprobs = static_cast<int32_t>(rng() % 22) - 1;
      if (s.num_logprobs > 20) s.num_logprobs = 20;
    }
    in.seqs.push_back(std::move(s));
  }
  in.swap_out = {{1, 2}, {3, 4}};
  in.swap_in = {{5, 6}};
  in.copies = {{7, 8}, {9, 10}, {11, 12}};
  return in;
}

TEST(StepWire, RoundTripKeepsEverySequence) {
  std::mt19937 rng(5);
  for (int n : {0, 1, 3, 257}) {
    const StepInput in = RandomStep(rng, n);
    v1::Step p;
    StepToProto(42, in, &p);
    std::string bytes;
    ASSERT_TRUE(p.SerializeToString(&bytes));
    v1::Step q;
    ASSERT_TRUE(q.ParseFromString(bytes));
    EXPECT_EQ(q.step_id(), 42);
    StepInput out;
    out.seqs.resize(5);  // reused storage is overwritten
    ASSERT_TRUE(StepFromProto(q, &out).ok()) << StepFromProto(q, &out);
    ASSERT_EQ(out.seqs.size(), in.seqs.size());
    for (int i = 0; i < n; ++i) {
      const SeqStepInput& a = in.seqs[i];
      const SeqStepInput& b = out.seqs[i];
      EXPECT_EQ(a.tokens, b.tokens) << i;
      EXPECT_EQ(a.start_pos, b.start_pos) << i;
      EXPECT_EQ(a.block_table, b.block_table) << i;
      EXPECT_EQ(a.logits, b.logits) << i;
      EXPECT_EQ(a.sample, b.sample) << i;
      if (a.sample) {
        EXPECT_EQ(a.sampling.temperature, b.sampling.temperature) << i;
        EXPECT_EQ(a.sampling.top_k, b.sampling.top_k) << i;
        EXPECT_EQ(a.sampling.top_p, b.sampling.top_p) << i;
        EXPECT_EQ(a.sampling.seed, b.sampling.seed) << i;
        EXPECT_EQ(a.num_logprobs, b.num_logprobs) << i;
      } else {
        EXPECT_EQ(b.num_logprobs, -1) << i;
      }
    }
    ASSERT_EQ(out.swap_out.size(), 2u);
    EXPECT_EQ(out.swap_out[1].src, 3);
    EXPECT_EQ(out.swap_out[1].dst, 4);
    EXPECT_EQ(out.swap_in.size(), 1u);
    EXPECT_EQ(out.copies.size(), 3u);
    EXPECT_EQ(out.copies[2].dst, 12);
  }
}

// A valid step of 3 sequences (the second samples), to corrupt one field at a time.
v1::Step ValidStep() {
  std::mt19937 rng(9);
  StepInput in = RandomStep(rng, 3);
  in.seqs[0].sample = false;
  in.seqs[1].sample = true;
  in.seqs[2].sample = false;
  in.seqs[1].num_logprobs = 3;
  in.seqs[0].tokens = {1, 2, 3};
  in.seqs[0].logits = SeqStepInput::Logits::kLast;
  v1::Step p;
  StepToProto(1, in, &p);
  return p;
}

void ExpectRejected(const v1::Step& p, const std::string& needle) {
  StepInput out;
  const absl::Status s = StepFromProto(p, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find(needle), std::string::npos) << s;
}

void SetInt(std::string* column, int index, int32_t v) { std::memcpy(column->data() + 4 * index, &v, 4); }

TEST(StepWire, MalformedColumnsAreInvalidArgument) {
  StepInput ok;
  ASSERT_TRUE(StepFromProto(ValidStep(), &ok).ok());
  v1::Step p = ValidStep();
  p.set_num_seqs(-1);
  ExpectRejected(p, "-1 sequences");
  p = ValidStep();
  p.set_num_seqs(4);  // the columns hold 3
  ExpectRejected(p, "token_begin");
  p = ValidStep();
  p.mutable_start_pos()->pop_back();
  ExpectRejected(p, "start_pos");
  p = ValidStep();
  p.mutable_tokens()->push_back('x');
  ExpectRejected(p, "whole int32");
  p = ValidStep();
  SetInt(p.mutable_token_begin(), 1, 1000);  // past the tokens, and decreasing after
  ExpectRejected(p, "token_begin");
  p = ValidStep();
  SetInt(p.mutable_table_begin(), 0, 1);
  ExpectRejected(p, "table_begin");
  p = ValidStep();
  (*p.mutable_logits())[2] = 3;
  ExpectRejected(p, "unknown logits mode 3");
  p = ValidStep();
  p.add_seed(7);  // one more than the sampling sequences
  ExpectRejected(p, "sampling columns");
  p = ValidStep();
  p.set_num_logprobs(0, 21);
  ExpectRejected(p, "num_logprobs above 20");
  p = ValidStep();
  p.add_copies(1);  // odd pair list
  ExpectRejected(p, "copies");
}

}  // namespace
}  // namespace strata
