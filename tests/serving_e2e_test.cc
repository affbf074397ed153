// End to end on the CPU: the built `strata serve` runs as a subprocess on
// loopback (stories15M, fp32 KV cache) and a C++ gRPC client drives it.
// Greedy outputs must match the golden reference, every malformed request
// must get its status code (and leave the server healthy), cancellation must
// free blocks at once, and 200 concurrent streams must all complete with the
// pools back to empty. Process-level behaviour (auth, TLS, queue limits,
// SIGTERM, CLI clients) is in serving_process_test.cc.
#include <atomic>
#include <thread>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "proto/strata_v1_generation.grpc.pb.h"
#include "tests/serving_rpc_helpers.h"
#include "tests/serving_test_util.h"
#include "tests/test_data.h"

namespace strata {
namespace {

using testing::FromIds;
using testing::In;
using testing::LoopbackChannel;
using testing::ServerProcess;

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  int messages = 0;
  v1::GenerateResponse last;
  std::vector<v1::TokenLogprobs> logprobs;
};

class ServingE2ETest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess();
    ASSERT_TRUE(server_->Start({"--model", testing::DataPath("models/stories15M"),
                                "--kv-cache-memory", "0.25", "--swap-space", "0.125"}))
        << server_->log();
    golden_ = new nlohmann::json(testing::LoadJson("golden/stories15M_greedy.json"));
  }
  static void TearDownTestSuite() {
    server_->Signal(SIGTERM);
    EXPECT_EQ(server_->WaitExit(std::chrono::seconds(20)), 0) << server_->log();
    delete server_;
    delete golden_;
  }
  void SetUp() override {
    channel_ = LoopbackChannel(server_->address());
    stub_ = v1::Generation::NewStub(channel_);
  }

  StreamResult Stream(const v1::GenerateRequest& req,
                      std::chrono::milliseconds timeout = std::chrono::seconds(300)) {
    StreamResult r;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(timeout));
    auto reader = stub_->Generate(&ctx, req);
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
      ++r.messages;
      r.tokens.insert(r.tokens.end(), m.token_ids().begin(), m.token_ids().end());
      r.text += m.text();
      r.logprobs.insert(r.logprobs.end(), m.logprobs().begin(), m.logprobs().end());
      if (m.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) r.last = m;
    }
    r.status = reader->Finish();
    return r;
  }
  v1::ModelInfo Info() {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(10)));
    v1::ModelInfo info;
    EXPECT_TRUE(stub_->GetModelInfo(&ctx, {}, &info).ok());
    return info;
  }
  // Polls until no block is used and nothing is queued (aborts are applied
  // by the engine thread between steps).
  v1::ModelInfo WaitIdle() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    v1::ModelInfo info = Info();
    while ((info.gpu_blocks().used() != 0 || info.cpu_blocks().used() != 0 ||
            info.num_running() + info.num_waiting() + info.num_swapped() != 0) &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      info = Info();
    }
    return info;
  }
  static const nlohmann::json& Case(const std::string& id) {
    for (const auto& c : (*golden_)["cases"]) {
      if (c["id"] == id) return c;
    }
    throw std::runtime_error("no golden case " + id);
  }

  static ServerProcess* server_;
  static nlohmann::json* golden_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};

ServerProcess* ServingE2ETest::server_ = nullptr;
nlohmann::json* ServingE2ETest::golden_ = nullptr;

// All 8 golden prompts streamed at once, greedy, through the whole context.
TEST_F(ServingE2ETest, StreamsGreedyGoldenOutputs) {
  std::vector<nlohmann::json> cases((*golden_)["cases"].begin(), (*golden_)["cases"].end());
  std::vector<StreamResult> results(cases.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < cases.size(); ++i) {
    threads.emplace_back([&, i] {
      const auto prompt = cases[i]["prompt_ids"].get<std::vector<int32_t>>();
      results[i] = Stream(FromIds(prompt, 256 - static_cast<int>(prompt.size())));
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < cases.size(); ++i) {
    const StreamResult& r = results[i];
    const std::string id = cases[i]["id"];
    ASSERT_TRUE(r.status.ok()) << id << ": " << r.status.error_message();
    const auto expected = cases[i]["output_ids_ignore_bos"].get<std::vector<int32_t>>();
    const size_t prompt_len = cases[i]["prompt_ids"].size();
    const size_t n = std::min<size_t>(cases[i]["stable_prefix_len"]["margin_1e-3"].get<size_t>(),
                                      256 - prompt_len);
    ASSERT_EQ(r.tokens.size(), 256 - prompt_len) << id;
    for (size_t k = 0; k < n; ++k) ASSERT_EQ(r.tokens[k], expected[k]) << id << " token " << k;
    EXPECT_GT(r.messages, 1) << id << ": tokens must be streamed, not sent at the end";
    EXPECT_EQ(r.last.finish_reason(), v1::FINISH_REASON_LENGTH) << id;
    EXPECT_EQ(r.last.usage().prompt_tokens(), static_cast<int>(prompt_len)) << id;
    EXPECT_EQ(r.last.usage().completion_tokens(), static_cast<int>(r.tokens.size())) << id;
  }
  const v1::ModelInfo info = WaitIdle();
  EXPECT_EQ(info.gpu_blocks().used(), 0);
}

// Default stopping (EOS and BOS) from a text prompt: the reference stops at
// BOS, and the streamed text is the reference's completion text.
TEST_F(ServingE2ETest, TextPromptStopsAtBosWithReferenceText) {
  const nlohmann::json& c = Case("once_upon_a_time");
  v1::GenerateRequest req;
  req.set_text(c["prompt"].get<std::string>());
  const StreamResult r = Stream(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, c["output_ids"].get<std::vector<int32_t>>());
  EXPECT_EQ(r.text, c["completion_text"].get<std::string>());
  EXPECT_EQ(r.last.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(r.last.stop_token_id(), 1);
  EXPECT_EQ(r.last.usage().prompt_tokens(), 5);
}

TEST_F(ServingE2ETest, UnaryTokenizeDetokenizeAndModelInfo) {
  const nlohmann::json& c = Case("once_upon_a_time");
  const auto prompt_ids = c["prompt_ids"].get<std::vector<int32_t>>();
  const auto golden = c["output_ids"].get<std::vector<int32_t>>();
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(10)));
    v1::TokenizeRequest req;
    req.set_text(c["prompt"].get<std::string>());
    req.set_add_bos(true);
    v1::TokenizeResponse resp;
    ASSERT_TRUE(stub_->Tokenize(&ctx, req, &resp).ok());
    EXPECT_EQ(std::vector<int32_t>(resp.token_ids().begin(), resp.token_ids().end()), prompt_ids);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(10)));
    v1::DetokenizeRequest req;
    req.mutable_token_ids()->Add(prompt_ids.begin(), prompt_ids.end());
    v1::DetokenizeResponse resp;
    ASSERT_TRUE(stub_->Detokenize(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.text(), "Once upon a time");
  }
  v1::GenerateRequest req;
  req.set_text("Once upon a time");
  req.mutable_sampling()->set_max_tokens(20);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  v1::GenerateResponse unary;
  ASSERT_TRUE(stub_->GenerateUnary(&ctx, req, &unary).ok());
  EXPECT_EQ(std::vector<int32_t>(unary.token_ids().begin(), unary.token_ids().end()),
            std::vector<int32_t>(golden.begin(), golden.begin() + 20));
  EXPECT_EQ(unary.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(unary.usage().completion_tokens(), 20);
  EXPECT_EQ(unary.text(), Stream(req).text) << "unary and streamed text agree";

  const v1::ModelInfo info = WaitIdle();
  EXPECT_EQ(info.tp_size(), 1);
  EXPECT_EQ(info.device(), "cpu");
  EXPECT_EQ(info.kv_cache_dtype(), "fp32");
  EXPECT_EQ(info.kv_scale_mode(), "none");
  EXPECT_EQ(info.block_size(), 16);
  EXPECT_EQ(info.max_context(), 256);
  EXPECT_EQ(info.vocab_size(), 32000);
  EXPECT_EQ(info.bos_token_id(), 1);
  EXPECT_EQ(info.eos_token_id(), 2);
  // 0.25 GiB of fp32 blocks: 6 layers x K,V x 16 tokens x 288 x 4 bytes.
  EXPECT_EQ(info.kv_bytes_per_block(), 221184);
  EXPECT_EQ(info.gpu_blocks().total(), (int64_t{1} << 28) / 221184);
  EXPECT_EQ(info.gpu_blocks().total(),
            info.gpu_blocks().used() + info.gpu_blocks().cached() + info.gpu_blocks().free());
  EXPECT_GT(info.cpu_blocks().total(), 0);
  EXPECT_EQ(info.gpu_blocks().used(), 0);
}

TEST_F(ServingE2ETest, LogprobsSeedsAndStopStrings) {
  // Greedy: the sampled token is the most likely one.
  v1::GenerateRequest req;
  req.set_text("Once upon a time");
  req.mutable_sampling()->set_max_tokens(8);
  req.mutable_sampling()->set_logprobs(3);
  StreamResult r = Stream(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_EQ(r.logprobs.size(), r.tokens.size());
  for (size_t i = 0; i < r.tokens.size(); ++i) {
    const v1::TokenLogprobs& lp = r.logprobs[i];
    EXPECT_EQ(lp.sampled().token_id(), r.tokens[i]);
    ASSERT_EQ(lp.top_size(), 3);
    EXPECT_EQ(lp.top(0).token_id(), r.tokens[i]) << "greedy picks the top token, step " << i;
    EXPECT_FLOAT_EQ(lp.top(0).logprob(), lp.sampled().logprob());
    EXPECT_LE(lp.top(0).logprob(), 0.0f);
    EXPECT_GE(lp.top(0).logprob(), lp.top(1).logprob());
  }
  // Seeded sampling is reproducible and depends on the seed.
  req.clear_sampling();
  req.mutable_sampling()->set_max_tokens(24);
  req.mutable_sampling()->set_temperature(1.0f);
  req.mutable_sampling()->set_seed(7);
  const StreamResult a = Stream(req), b = Stream(req);
  req.mutable_sampling()->set_seed(8);
  const StreamResult c = Stream(req);
  ASSERT_TRUE(a.status.ok() && b.status.ok() && c.status.ok());
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_NE(a.tokens, c.tokens);
  // Stop string: the text is cut before it.
  req.clear_sampling();
  req.mutable_sampling()->set_max_tokens(60);
  req.mutable_sampling()->add_stop(".");
  r = Stream(req);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.text, ", there was a little girl named Lily");
  EXPECT_EQ(r.last.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(r.last.stop_string(), ".");
  // Stop token id: not reported.
  req.clear_sampling();
  req.mutable_sampling()->set_max_tokens(60);
  req.mutable_sampling()->add_stop_token_ids(r.tokens[2]);  // " was"
  r = Stream(req);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.tokens.size(), 2u);
  EXPECT_EQ(r.last.stop_token_id(), req.sampling().stop_token_ids(0));
  EXPECT_EQ(WaitIdle().gpu_blocks().used(), 0);
}

struct BadRequest {
  const char* name;
  std::function<void(v1::GenerateRequest*)> edit;
  const char* field;  // must appear in the error message
};

TEST_F(ServingE2ETest, InvalidRequestsGetInvalidArgumentNamingTheField) {
  const std::vector<BadRequest> cases = {
      {"negative temperature", [](auto* r) { r->mutable_sampling()->set_temperature(-0.5f); },
       "sampling.temperature"},
      {"top_p zero", [](auto* r) { r->mutable_sampling()->set_top_p(0.0f); }, "sampling.top_p"},
      {"top_p above one", [](auto* r) { r->mutable_sampling()->set_top_p(1.5f); }, "sampling.top_p"},
      {"negative top_k", [](auto* r) { r->mutable_sampling()->set_top_k(-1); }, "sampling.top_k"},
      {"max_tokens zero", [](auto* r) { r->mutable_sampling()->set_max_tokens(0); },
       "sampling.max_tokens"},
      {"max_tokens negative", [](auto* r) { r->mutable_sampling()->set_max_tokens(-3); },
       "sampling.max_tokens"},
      {"beyond the context", [](auto* r) { r->mutable_sampling()->set_max_tokens(252); },
       "sampling.max_tokens"},
      {"unknown stop token", [](auto* r) { r->mutable_sampling()->add_stop_token_ids(32000); },
       "sampling.stop_token_ids[0]"},
      {"negative stop token", [](auto* r) { r->mutable_sampling()->add_stop_token_ids(-1); },
       "sampling.stop_token_ids[0]"},
      {"logprobs too many", [](auto* r) { r->mutable_sampling()->set_logprobs(21); },
       "sampling.logprobs"},
      {"empty stop string", [](auto* r) { r->mutable_sampling()->add_stop(""); }, "sampling.stop[0]"},
      {"invalid UTF-8 stop", [](auto* r) { r->mutable_sampling()->add_stop("\xC3\x28"); },
       "sampling.stop[0]"},
      {"empty text prompt", [](auto* r) { r->set_text(""); }, "prompt.text"},
      {"invalid UTF-8 prompt", [](auto* r) { r->set_text("Once upon a \xFF\xFE time"); },
       "prompt.text"},
      {"overlong UTF-8 prompt", [](auto* r) { r->set_text("a\xC0\xAF"); }, "prompt.text"},
      {"oversized prompt", [](auto* r) { r->set_text(std::string(2 << 20, 'a')); }, "prompt.text"},
      {"no prompt", [](auto* r) { r->clear_prompt(); }, "prompt"},
      {"empty token ids", [](auto* r) { r->mutable_token_ids(); }, "prompt.token_ids"},
      {"token id outside vocab",
       [](auto* r) { r->mutable_token_ids()->add_ids(1), r->mutable_token_ids()->add_ids(99999); },
       "prompt.token_ids[1]"},
      {"prompt longer than context",
       [](auto* r) {
         for (int i = 0; i < 300; ++i) r->mutable_token_ids()->add_ids(100);
       },
       "prompt.token_ids"},
  };
  for (const BadRequest& c : cases) {
    v1::GenerateRequest req;
    req.set_text("Once upon a time");
    c.edit(&req);
    const StreamResult r = Stream(req, std::chrono::seconds(30));
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_NE(r.status.error_message().find(c.field), std::string::npos)
        << c.name << ": \"" << r.status.error_message() << "\" should name " << c.field;
    EXPECT_EQ(r.messages, 0) << c.name;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(30)));
    v1::GenerateResponse unary;
    EXPECT_EQ(stub_->GenerateUnary(&ctx, req, &unary).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT) << c.name << " (unary)";
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(10)));
    v1::TokenizeRequest req;
    req.set_text("\xED\xA0\x80");  // a UTF-16 surrogate
    v1::TokenizeResponse resp;
    const grpc::Status s = stub_->Tokenize(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("text"), std::string::npos);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(10)));
    v1::DetokenizeRequest req;
    req.add_token_ids(40000);
    v1::DetokenizeResponse resp;
    const grpc::Status s = stub_->Detokenize(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("token_ids[0]"), std::string::npos) << s.error_message();
  }
  // Still healthy and serving.
  EXPECT_EQ(testing::HealthStatus(channel_.get(), "strata.v1.Generation"), 1);
  v1::GenerateRequest ok;
  ok.set_text("Once upon a time");
  ok.mutable_sampling()->set_max_tokens(4);
  EXPECT_TRUE(Stream(ok).status.ok());
  EXPECT_EQ(WaitIdle().gpu_blocks().used(), 0);
}

TEST_F(ServingE2ETest, CancellationFreesBlocksAtOnce) {
  v1::GenerateRequest req = FromIds(Case("lily_and_tom")["prompt_ids"], 240);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  auto reader = stub_->Generate(&ctx, req);
  v1::GenerateResponse m;
  int tokens = 0;
  while (tokens < 40 && reader->Read(&m)) tokens += m.token_ids_size();
  ASSERT_GE(tokens, 40);
  const v1::ModelInfo busy = Info();
  EXPECT_GE(busy.gpu_blocks().used(), 3) << "49+ tokens in 16-token blocks";
  EXPECT_EQ(busy.num_running(), 1);
  ctx.TryCancel();
  while (reader->Read(&m)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  const v1::ModelInfo after = WaitIdle();
  EXPECT_EQ(after.gpu_blocks().used(), 0);
  EXPECT_EQ(after.num_running(), 0);

  // A deadline that passes mid-generation frees the blocks the same way.
  const StreamResult r = Stream(req, std::chrono::milliseconds(100));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(WaitIdle().gpu_blocks().used(), 0);
}

TEST_F(ServingE2ETest, TwoHundredConcurrentStreamingClients) {
  constexpr int kClients = 200;
  constexpr int kTokens = 8;
  std::vector<nlohmann::json> cases((*golden_)["cases"].begin(), (*golden_)["cases"].end());
  std::atomic<int> ok{0};
  std::vector<std::string> failures(kClients);
  std::vector<std::thread> threads;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      const nlohmann::json& c = cases[i % cases.size()];
      const auto expected = c["output_ids_ignore_bos"].get<std::vector<int32_t>>();
      // Each client its own channel (its own connection), like separate processes.
      auto stub = v1::Generation::NewStub(LoopbackChannel(server_->address()));
      grpc::ClientContext ctx;
      ctx.set_deadline(In(std::chrono::seconds(300)));
      auto reader = stub->Generate(&ctx, FromIds(c["prompt_ids"], kTokens));
      std::vector<int32_t> got;
      v1::GenerateResponse m;
      while (reader->Read(&m)) got.insert(got.end(), m.token_ids().begin(), m.token_ids().end());
      const grpc::Status s = reader->Finish();
      if (!s.ok()) {
        failures[i] = s.error_message();
      } else if (got != std::vector<int32_t>(expected.begin(), expected.begin() + kTokens)) {
        failures[i] = "wrong tokens for " + c["id"].get<std::string>();
      } else {
        ok.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int i = 0; i < kClients; ++i) EXPECT_EQ(failures[i], "") << "client " << i;
  EXPECT_EQ(ok.load(), kClients);
  const v1::ModelInfo info = WaitIdle();
  EXPECT_EQ(info.gpu_blocks().used(), 0);
  EXPECT_EQ(info.cpu_blocks().used(), 0);
  EXPECT_EQ(info.num_running() + info.num_waiting() + info.num_swapped(), 0);
  std::printf("%d streaming clients x %d tokens in %.2f s\n", kClients, kTokens, secs);
}

TEST_F(ServingE2ETest, HealthAndReflection) {
  EXPECT_EQ(testing::HealthStatus(channel_.get(), ""), 1);
  EXPECT_EQ(testing::HealthStatus(channel_.get(), "strata.v1.Generation"), 1);
  // grpc.reflection.v1alpha: ServerReflectionRequest{list_services = 7: ""}.
  std::vector<std::string> responses;
  const grpc::Status s = testing::RawBidiCall(
      channel_.get(), "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      std::string("\x3A\x00", 2), &responses, std::chrono::seconds(10));
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(responses.size(), 1u);
  EXPECT_NE(responses[0].find("strata.v1.Generation"), std::string::npos);
  EXPECT_NE(responses[0].find("grpc.health.v1.Health"), std::string::npos);
}

}  // namespace
}  // namespace strata
