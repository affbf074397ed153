// Serving pieces without a server: UTF-8 validation, stop-string matching
// over streamed deltas, request validation (field names in messages), chunk
// merging, the stream writer, and the serving engine's rounds over an engine
// that computes nothing.
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "scheduler/server/generation_service.h"
#include "scheduler/server/request_validation.h"
#include "scheduler/server/serving_engine.h"
#include "scheduler/server/stream_writer.h"
#include "scheduler/server/text_util.h"
#include "tests/test_data.h"

namespace strata::serving {
namespace {

TEST(FindInvalidUtf8, AcceptsWellFormedAndFindsTheFirstBadByte) {
  EXPECT_EQ(FindInvalidUtf8(""), std::nullopt);
  EXPECT_EQ(FindInvalidUtf8("plain ascii"), std::nullopt);
  EXPECT_EQ(FindInvalidUtf8("caf\xC3\xA9 \xF0\x9F\x90\xB6 \xE2\x82\xAC"), std::nullopt);
  EXPECT_EQ(FindInvalidUtf8("ab\xFF"), 2u);
  EXPECT_EQ(FindInvalidUtf8("a\x80"), 1u);                  // lone continuation byte
  EXPECT_EQ(FindInvalidUtf8("a\xC3"), 1u);                  // truncated
  EXPECT_EQ(FindInvalidUtf8("\xC0\xAF"), 0u);               // overlong '/'
  EXPECT_EQ(FindInvalidUtf8("\xE0\x80\xAF"), 0u);           // overlong
  EXPECT_EQ(FindInvalidUtf8("x\xED\xA0\x80"), 1u);          // surrogate
  EXPECT_EQ(FindInvalidUtf8("\xF4\x90\x80\x80"), 0u);       // above U+10FFFF
  EXPECT_EQ(FindInvalidUtf8("\xE2\x82"), 0u);
  EXPECT_EQ(FindInvalidUtf8(std::string("a\0b", 3)), std::nullopt);
}

// Feeds `deltas` and returns everything emitted plus the index matched.
std::pair<std::string, std::optional<size_t>> Feed(std::vector<std::string> stops,
                                                  const std::vector<std::string>& deltas) {
  StopStringMatcher m(std::move(stops));
  std::string out;
  std::optional<size_t> matched;
  for (const std::string& d : deltas) {
    StopStringMatcher::Result r = m.Push(d);
    out += r.text;
    if (r.matched) matched = r.matched;
  }
  out += m.Flush();
  return {out, matched};
}

TEST(StopStringMatcher, CutsBeforeTheFirstStopAcrossDeltas) {
  using Out = std::pair<std::string, std::optional<size_t>>;
  EXPECT_EQ(Feed({}, {"a", "b"}), Out("ab", std::nullopt));
  EXPECT_EQ(Feed({"."}, {"Hello", " world", ". More"}), Out("Hello world", 0));
  // Split across deltas.
  EXPECT_EQ(Feed({"END"}, {"abc E", "N", "D tail"}), Out("abc ", 0));
  // A prefix that does not complete is released.
  EXPECT_EQ(Feed({"END"}, {"abc EN", "x"}), Out("abc ENx", std::nullopt));
  // Held-back prefix released at the end.
  EXPECT_EQ(Feed({"END"}, {"abc EN"}), Out("abc EN", std::nullopt));
  // Earliest occurrence wins, whichever stop string it is.
  EXPECT_EQ(Feed({"world", "lo"}, {"hello world"}), Out("hel", 1));
  // Overlapping prefixes: "aab" in "aaab".
  EXPECT_EQ(Feed({"aab"}, {"a", "a", "a", "b", "c"}), Out("a", 0));
  // Nothing after a match.
  StopStringMatcher m({"x"});
  EXPECT_TRUE(m.Push("1x2").matched);
  EXPECT_EQ(m.Push("3").text, "");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopStringMatcher, EmitsOnlyWholeCharacters) {
  // The held suffix starts where a stop string starts, so multi-byte
  // characters are never split.
  const auto [out, matched] = Feed({"\xC3\xA9t\xC3\xA9"}, {"caf\xC3\xA9", " \xC3\xA9", "t\xC3\xA9!"});
  EXPECT_EQ(out, "caf\xC3\xA9 ");
  EXPECT_EQ(matched, 0u);
}

class ValidationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = Tokenizer::LoadFromDirectory(testing::DataPath("models/stories15M"));
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = std::move(*t);
    limits_.vocab_size = 32000;
    limits_.max_context = 256;
  }
  absl::StatusOr<ServingRequest> Validate(const v1::GenerateRequest& r) {
    return ValidateGenerateRequest(r, *tokenizer_, limits_);
  }
  std::unique_ptr<Tokenizer> tokenizer_;
  RequestLimits limits_;
};

TEST_F(ValidationTest, TextPromptDefaults) {
  v1::GenerateRequest r;
  r.set_text("Once upon a time");
  absl::StatusOr<ServingRequest> v = Validate(r);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->prompt, (std::vector<int32_t>{1, 9038, 2501, 263, 931}));
  EXPECT_EQ(v->max_tokens, 256 - 5) << "default: the rest of the context";
  EXPECT_EQ(v->sampling.temperature, 0.0f);
  EXPECT_EQ(v->stop_token_ids, (std::vector<int32_t>{2, 1})) << "EOS and BOS stop by default";
  EXPECT_EQ(v->num_logprobs, -1);
  r.set_add_bos(false);
  r.mutable_sampling()->set_ignore_eos(true);
  r.mutable_sampling()->add_stop_token_ids(13);
  v = Validate(r);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->prompt.front(), 9038);
  EXPECT_EQ(v->stop_token_ids, (std::vector<int32_t>{13}));
}

TEST_F(ValidationTest, MessagesNameTheField) {
  struct Case {
    std::function<void(v1::GenerateRequest*)> edit;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](auto* r) { r->mutable_sampling()->set_top_p(2.0f); },
       "sampling.top_p must be in (0, 1], got 2"},
      {[](auto* r) { r->mutable_sampling()->set_temperature(-1.0f); },
       "sampling.temperature must be a finite number >= 0, got -1"},
      {[](auto* r) { r->mutable_sampling()->set_max_tokens(0); },
       "sampling.max_tokens must be >= 1, got 0"},
      {[](auto* r) { r->mutable_sampling()->set_max_tokens(252); },
       "sampling.max_tokens = 252 with a 5-token prompt exceeds the context of 256 tokens (at most "
       "251)"},
      {[](auto* r) { r->mutable_sampling()->add_stop_token_ids(32000); },
       "sampling.stop_token_ids[0] = 32000 is not a token id (vocabulary [0, 32000))"},
      {[](auto* r) { r->set_text("\xFF"); }, "prompt.text is not valid UTF-8 (byte offset 0)"},
      {[](auto* r) { r->set_text(""); }, "prompt.text is empty"},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest r;
    r.set_text("Once upon a time");
    c.edit(&r);
    const absl::StatusOr<ServingRequest> v = Validate(r);
    EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_EQ(v.status().message(), c.message);
  }
}

TEST(MergeChunk, ConcatenatesAndKeepsFinishFields) {
  v1::GenerateResponse a, b;
  a.add_token_ids(1);
  a.set_text("x");
  b.add_token_ids(2);
  b.set_text("y");
  b.set_finish_reason(v1::FINISH_REASON_STOP);
  b.set_stop_string(".");
  b.mutable_usage()->set_completion_tokens(2);
  MergeChunk(&a, std::move(b));
  EXPECT_EQ(a.token_ids_size(), 2);
  EXPECT_EQ(a.text(), "xy");
  EXPECT_EQ(a.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(a.stop_string(), ".");
  EXPECT_EQ(a.usage().completion_tokens(), 2);
}

}  // namespace
TEST(StreamWriter, RunsTasksInOrderOnItsOwnThread) {
  std::vector<int> seen;
  std::thread::id ran_on;
  {
    StreamWriter w;
    for (int i = 0; i < 1000; ++i) {
      w.Post([&seen, &ran_on, i] {
        seen.push_back(i);
        ran_on = std::this_thread::get_id();
      });
    }
  }  // the destructor runs what is still queued, then joins
  ASSERT_EQ(seen.size(), 1000u);
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(seen[i], i);
  EXPECT_NE(ran_on, std::this_thread::get_id());
}

TEST(StreamWriter, TasksPostedFromManyThreadsAndFromTasksAllRun) {
  std::atomic<int> count{0};
  {
    StreamWriter w;
    std::vector<std::thread> posters;
    for (int t = 0; t < 4; ++t) {
      posters.emplace_back([&w, &count] {
        for (int i = 0; i < 250; ++i) {
          w.Post([&w, &count] {
            ++count;
            w.Post([&count] { ++count; });  // a task may post another
          });
        }
      });
    }
    for (std::thread& p : posters) p.join();
  }
  EXPECT_EQ(count.load(), 2000);
}

// A batch left open when the writer goes still runs.
TEST(StreamWriter, OpenBatchRunsAtDestruction) {
  std::atomic<int> ran{0};
  {
    StreamWriter w;
    w.BeginBatch();
    for (int i = 0; i < 10; ++i) w.Post([&ran] { ++ran; });
  }
  EXPECT_EQ(ran.load(), 10);
}

// A batch's posts wait for EndBatch and then run in order; another thread's
// posts meanwhile run without waiting for the batch.
TEST(StreamWriter, BatchedPostsRunAtEndBatchInOrder) {
  StreamWriter w;
  absl::Mutex mu;
  std::vector<int> seen;
  auto record = [&](int v) {
    return [&mu, &seen, v] {
      absl::MutexLock lock(&mu);
      seen.push_back(v);
    };
  };
  auto count = [&] {
    absl::MutexLock lock(&mu);
    return seen.size();
  };
  w.BeginBatch();
  for (int i = 0; i < 100; ++i) w.Post(record(i));
  std::thread other([&] { w.Post(record(-1)); });  // not this thread's batch
  other.join();
  for (int tries = 0; count() < 1 && tries < 2000; ++tries) absl::SleepFor(absl::Milliseconds(1));
  {
    absl::MutexLock lock(&mu);
    ASSERT_EQ(seen, std::vector<int>{-1});  // the batch is still held
  }
  w.EndBatch();
  for (int tries = 0; count() < 101 && tries < 2000; ++tries) absl::SleepFor(absl::Milliseconds(1));
  {
    absl::MutexLock lock(&mu);
    ASSERT_EQ(seen.size(), 101u);
    for (int i = 0; i < 100; ++i) EXPECT_EQ(seen[i + 1], i);
  }
  // After EndBatch this thread posts directly again.
  w.Post(record(100));
  for (int tries = 0; count() < 102 && tries < 2000; ++tries) absl::SleepFor(absl::Milliseconds(1));
  absl::MutexLock lock(&mu);
  EXPECT_EQ(seen.back(), 100);
}

// An engine that samples token 300 + step % 50 for every sequence at once.
class InstantEngine final : public Engine {
 public:
  InstantEngine(std::atomic<bool>* in_round, std::atomic<int>* steps_outside)
      : in_round_(in_round), steps_outside_(steps_outside) {
    config_.hidden_size = 64, config_.intermediate_size = 128, config_.num_layers = 1;
    config_.num_heads = 1, config_.num_kv_heads = 1, config_.head_dim = 64;
    config_.vocab_size = 32000, config_.max_position_embeddings = 512;
    options_.block_size = 16;
    options_.num_gpu_blocks = 256;
  }
  const ModelConfig& config() const override { return config_; }
  const EngineOptions& options() const override { return options_; }
  bool SupportsSampling() const override { return true; }
  // While armed, the next step waits (up to 10 s) until Open(): a test can
  // queue a command that must land between two given steps.
  void Arm() { armed_.store(true), open_.store(false); }
  void Open() { open_.store(true); }
  absl::Status Step(const StepInput& input, StepOutput* output) override {
    if (!in_round_->load()) steps_outside_->fetch_add(1);
    if (armed_.exchange(false)) {
      for (int i = 0; i < 10000 && !open_.load(); ++i) absl::SleepFor(absl::Milliseconds(1));
    }
    output->row_begin.assign(input.seqs.size() + 1, 0);
    output->sampled.assign(input.seqs.size(), {});
    for (size_t i = 0; i < input.seqs.size(); ++i) {
      output->sampled[i].token = input.seqs[i].sample ? 300 + (steps_ % 50) : -1;
    }
    ++steps_;
    return absl::OkStatus();
  }

 private:
  std::atomic<bool>* in_round_;
  std::atomic<int>* steps_outside_;
  std::atomic<bool> armed_{false}, open_{false};
  ModelConfig config_;
  EngineOptions options_;
  int steps_ = 0;
};

// Records what a request got and whether each call came inside a round.
class RecordingSink final : public GenerationSink {
 public:
  explicit RecordingSink(std::atomic<bool>* in_round) : in_round_(in_round) {}
  void OnChunk(v1::GenerateResponse chunk) override {
    absl::MutexLock lock(&mu_);
    outside_ += in_round_->load() ? 0 : 1;
    tokens_ += chunk.token_ids_size();
  }
  void OnDone(const absl::Status& status, v1::GenerateResponse last) override {
    absl::MutexLock lock(&mu_);
    outside_ += in_round_->load() ? 0 : 1;
    tokens_ += last.token_ids_size();
    done_ = true;
    status_ = status;
  }
  bool WaitDone(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    return mu_.AwaitWithTimeout(absl::Condition(&done_), timeout);
  }
  absl::Status status() {
    absl::MutexLock lock(&mu_);
    return status_;
  }
  int tokens() {
    absl::MutexLock lock(&mu_);
    return tokens_;
  }
  int outside() {
    absl::MutexLock lock(&mu_);
    return outside_;
  }

 private:
  std::atomic<bool>* in_round_;
  absl::Mutex mu_;
  bool done_ = false;
  absl::Status status_;
  int tokens_ = 0, outside_ = 0;
};

// begin_round / end_round pair up on the engine thread, every step and every
// sink call happens inside a round, and no round is open while the engine
// waits for work (so a batching sink never holds answers while idle).
TEST(ServingEngine, RoundsPairUpAndHoldEveryStepAndSinkCall) {
  auto tok = Tokenizer::LoadFromDirectory(testing::DataPath("models/stories15M"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::atomic<bool> in_round{false};
  std::atomic<int> steps_outside{0}, unbalanced{0}, rounds{0};
  InstantEngine engine(&in_round, &steps_outside);
  ServingEngineOptions so;
  so.scheduler.max_num_seqs = 8;
  so.scheduler.max_model_len = 512;
  so.scheduler.blocks.num_gpu_blocks = engine.options().num_gpu_blocks;
  so.scheduler.blocks.block_size = 16;
  so.begin_round = [&] {
    if (in_round.exchange(true)) unbalanced.fetch_add(1);
    rounds.fetch_add(1);
  };
  so.end_round = [&] {
    if (!in_round.exchange(false)) unbalanced.fetch_add(1);
  };
  auto se = ServingEngine::Create(&engine, tok->get(), nullptr, so);
  ASSERT_TRUE(se.ok()) << se.status();
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (int i = 0; i < 4; ++i) {
    ServingRequest r;
    r.prompt = {1, 400 + i, 500 + i};
    r.max_tokens = 6;
    r.stop_token_ids = {2};
    sinks.push_back(std::make_shared<RecordingSink>(&in_round));
    ASSERT_TRUE((*se)->Submit(std::move(r), sinks.back()).ok());
  }
  for (auto& s : sinks) {
    ASSERT_TRUE(s->WaitDone(absl::Seconds(30)));
    EXPECT_TRUE(s->status().ok()) << s->status();
    EXPECT_EQ(s->tokens(), 6);
  }
  // A request cancelled while it runs gets CANCELLED (the cancel is queued
  // while its first step is held, so it lands before the request can finish).
  ServingRequest r;
  r.prompt = {1, 700};
  r.max_tokens = 400;
  auto cancelled = std::make_shared<RecordingSink>(&in_round);
  engine.Arm();
  auto handle = (*se)->Submit(std::move(r), cancelled);
  ASSERT_TRUE(handle.ok());
  (*se)->Cancel(*handle);
  engine.Open();
  ASSERT_TRUE(cancelled->WaitDone(absl::Seconds(30)));
  EXPECT_EQ(cancelled->status().code(), absl::StatusCode::kCancelled);
  // Idle: no round may be open.
  for (int tries = 0; in_round.load() && tries < 1000; ++tries) absl::SleepFor(absl::Milliseconds(1));
  absl::SleepFor(absl::Milliseconds(20));
  EXPECT_FALSE(in_round.load());
  (*se)->Stop();
  EXPECT_FALSE(in_round.load());
  EXPECT_EQ(unbalanced.load(), 0);
  EXPECT_EQ(steps_outside.load(), 0);
  EXPECT_GT(rounds.load(), 6);
  for (auto& s : sinks) EXPECT_EQ(s->outside(), 0);
  EXPECT_EQ(cancelled->outside(), 0);
}

}  // namespace strata::serving
