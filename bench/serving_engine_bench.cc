// Host work of the serving engine per step: ServingEngine (scheduler core,
// engine loop, per-token detokenizing, stop strings, response messages, sink
// posts) over an engine that computes nothing and returns a sampled token per
// sequence at once. What a GPU step of the same batch pays on the engine
// thread besides the forward pass and the control plane.
//
//   serving_engine_bench [--seqs 256,1024] [--prompt 200] [--steps 300]
//                        [--tokenizer DIR] [--logprobs -1]
//
// Per batch size: --seqs requests of --prompt random tokens are submitted at
// once (max_tokens large enough that none finishes while measured); once every
// sequence decodes, the wall time of --steps steps is divided by their count.
// Each request's sink hands its chunks to the StreamWriter thread as the gRPC
// service's stream sinks do (one pending write per stream, later chunks merged
// into it), with the engine's per-round batching of those posts unless
// --no-batch; --discard drops the chunks instead.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "runtime/model_config.h"
#include "runtime/tokenizer.h"
#include "scheduler/server/generation_service.h"
#include "scheduler/server/serving_engine.h"
#include "scheduler/server/stream_writer.h"

namespace strata {
namespace {

// Samples a token per sequence instantly; times the steps in which every sequence decoded.
class NullEngine final : public Engine {
 public:
  NullEngine(const ModelConfig& c, const EngineOptions& o) : config_(c), options_(o) {}
  const ModelConfig& config() const override { return config_; }
  const EngineOptions& options() const override { return options_; }
  bool SupportsSampling() const override { return true; }
  absl::Status Step(const StepInput& input, StepOutput* output) override {
    output->logits.clear();
    output->row_begin.assign(input.seqs.size() + 1, 0);
    output->sampled.resize(input.seqs.size());
    int decodes = 0;
    for (size_t i = 0; i < input.seqs.size(); ++i) {
      // Letters and words of the vocabulary, never a control token.
      output->sampled[i].token = input.seqs[i].sample ? 300 + static_cast<int32_t>(rng_() % 20000) : -1;
      output->sampled[i].logprob = -1.0f;
      decodes += input.seqs[i].tokens.size() == 1 ? 1 : 0;
    }
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    if (decodes == static_cast<int>(input.seqs.size())) {
      if (full_steps_ == 0) full_start_ = now;
      ++full_steps_;
      full_end_ = now;
    }
    return absl::OkStatus();
  }
  // Steps in which every sequence decoded, and the time from the first to the last.
  std::pair<int64_t, double> FullSteps() {
    std::lock_guard<std::mutex> lock(mu_);
    return {full_steps_, std::chrono::duration<double>(full_end_ - full_start_).count()};
  }

 private:
  ModelConfig config_;
  EngineOptions options_;
  std::mt19937 rng_{7};
  std::mutex mu_;
  int64_t full_steps_ = 0;
  std::chrono::steady_clock::time_point full_start_, full_end_;
};

// One request's stream, shaped like the gRPC service's: a chunk is written
// by the StreamWriter's thread; chunks that come while a write is pending are
// merged into it.
class StreamLikeSink final : public serving::GenerationSink,
                             public std::enable_shared_from_this<StreamLikeSink> {
 public:
  StreamLikeSink(serving::StreamWriter* writer, std::atomic<int64_t>* written, bool discard)
      : writer_(writer), written_(written), discard_(discard) {}
  void OnChunk(v1::GenerateResponse chunk) override { Take(std::move(chunk)); }
  void OnDone(const absl::Status&, v1::GenerateResponse last) override { Take(std::move(last)); }

 private:
  void Take(v1::GenerateResponse r) {
    if (discard_) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (pending_) {
        serving::MergeChunk(&next_, std::move(r));
        return;
      }
      pending_ = true;
      next_ = std::move(r);
    }
    writer_->Post([self = shared_from_this()] { self->Write(); });
  }
  void Write() {
    v1::GenerateResponse r;
    {
      std::lock_guard<std::mutex> lock(mu_);
      r = std::move(next_);
      next_.Clear();
      pending_ = false;
    }
    std::string bytes = r.SerializeAsString();  // what StartWrite costs at least
    written_->fetch_add(1);
  }
  serving::StreamWriter* writer_;
  std::atomic<int64_t>* written_;
  const bool discard_;
  std::mutex mu_;
  bool pending_ = false;
  v1::GenerateResponse next_;
};

int Run(int argc, char** argv) {
  CLI::App app{"Serving engine host work per step over an engine that computes nothing"};
  std::string seqs_s = "256,1024", tokenizer_dir = "../shared/data/models/stories15M-fp16";
  int prompt = 200, steps = 300, logprobs = -1;
  app.add_option("--seqs", seqs_s, "running sequences (comma-separated)");
  app.add_option("--prompt", prompt, "prompt tokens per request");
  app.add_option("--steps", steps, "decode steps measured");
  app.add_option("--tokenizer", tokenizer_dir, "Hugging Face model directory with the tokenizer");
  app.add_option("--logprobs", logprobs, "num_logprobs of every request (-1: none)");
  bool discard = false, no_batch = false;
  app.add_flag("--discard", discard, "the sinks drop every chunk (no writer thread work)");
  app.add_flag("--no-batch", no_batch, "post each write to the writer thread on its own (no per-step batch)");
  CLI11_PARSE(app, argc, argv);
  if (const char* env = std::getenv("STRATA_DATA_DIR"); env != nullptr && app.count("--tokenizer") == 0) {
    tokenizer_dir = std::string(env) + "/models/stories15M-fp16";
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::LoadFromDirectory(tokenizer_dir);
  if (!tok.ok()) {
    std::fprintf(stderr, "--tokenizer %s: %s\n", tokenizer_dir.c_str(), tok.status().ToString().c_str());
    return 2;
  }
  std::vector<int> batch_sizes;
  for (absl::string_view s : absl::StrSplit(seqs_s, ',')) {
    int n = 0;
    if (!absl::SimpleAtoi(s, &n) || n < 1) {
      std::fprintf(stderr, "--seqs: '%s' is not a positive count\n", std::string(s).c_str());
      return 2;
    }
    batch_sizes.push_back(n);
  }
  if (prompt < 1 || prompt > 2000 || steps < 1) {
    std::fprintf(stderr, "--prompt must be in [1, 2000] and --steps >= 1\n");
    return 2;
  }
  std::printf("| running sequences | steps | host us per step | us per sequence | chunks written |\n");
  std::printf("|---:|---:|---:|---:|---:|\n");
  for (const int n : batch_sizes) {
    ModelConfig c;
    c.hidden_size = 64, c.intermediate_size = 128, c.num_layers = 1, c.num_heads = 1, c.num_kv_heads = 1;
    c.head_dim = 64, c.vocab_size = (*tok)->vocab_size(), c.max_position_embeddings = 4096;
    const int max_tokens = 4000 - prompt;
    const int blocks_per_seq = (prompt + max_tokens + 15) / 16 + 1;
    EngineOptions eo;
    eo.block_size = 16;
    eo.num_gpu_blocks = n * blocks_per_seq;
    NullEngine engine(c, eo);
    serving::ServingEngineOptions so;
    so.scheduler.max_num_seqs = n;
    so.scheduler.max_num_batched_tokens = std::max(4096, n);
    so.scheduler.max_model_len = 4096;
    so.scheduler.blocks.num_gpu_blocks = eo.num_gpu_blocks;
    so.scheduler.blocks.block_size = 16;
    so.max_queued_requests = n;
    serving::StreamWriter writer;
    std::atomic<int64_t> written{0};
    if (!no_batch) {
      so.begin_round = [&writer] { writer.BeginBatch(); };
      so.end_round = [&writer] { writer.EndBatch(); };
    }
    auto se = serving::ServingEngine::Create(&engine, tok->get(), nullptr, so);
    if (!se.ok()) {
      std::fprintf(stderr, "%s\n", se.status().ToString().c_str());
      return 1;
    }
    std::mt19937 rng(3);
    for (int i = 0; i < n; ++i) {
      serving::ServingRequest r;
      for (int k = 0; k < prompt; ++k) r.prompt.push_back(300 + static_cast<int32_t>(rng() % 20000));
      r.max_tokens = max_tokens;
      r.stop_token_ids = {c.eos_token_id};
      r.num_logprobs = logprobs;
      auto sink = std::make_shared<StreamLikeSink>(&writer, &written, discard);
      if (auto h = (*se)->Submit(std::move(r), sink); !h.ok()) {
        std::fprintf(stderr, "%s\n", h.status().ToString().c_str());
        return 1;
      }
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
    while (engine.FullSteps().first < steps + 1 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    const auto [full, secs] = engine.FullSteps();
    (*se)->Stop();
    if (full < steps + 1) {
      std::fprintf(stderr, "%d sequences: only %lld all-decode steps within 5 minutes\n", n,
                   static_cast<long long>(full));
      return 1;
    }
    const double us = secs / static_cast<double>(full - 1) * 1e6;
    std::printf("| %d | %lld | %.1f | %.3f | %lld |\n", n, static_cast<long long>(full - 1), us, us / n,
                static_cast<long long>(written.load()));
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) { return strata::Run(argc, argv); }
