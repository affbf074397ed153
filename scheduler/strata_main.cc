// `strata`: the command-line entry point.
//
//   strata generate --model DIR --prompt "Once upon a time"
//
// Subcommands are added as the serving stack grows; each validates its flags
// and reports bad input naming the flag or file.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>

#include "CLI/CLI.hpp"
#include "spdlog/spdlog.h"
#include "worker/offline_generator.h"

namespace strata {
namespace {

std::string DefaultModelPath() {
  if (const char* m = std::getenv("STRATA_MODEL"); m != nullptr && *m != '\0') return m;
  return "../shared/data/models/stories15M";
}

int RunGenerate(const OfflineOptions& opts, const std::string& prompt, int max_tokens,
                const SamplingParams& sampling, bool ignore_eos, bool no_bos) {
  const auto t0 = std::chrono::steady_clock::now();
  auto gen = OfflineGenerator::Create(opts);
  if (!gen.ok()) {
    std::fprintf(stderr, "strata generate: %s\n", std::string(gen.status().message()).c_str());
    return 2;
  }
  const auto t1 = std::chrono::steady_clock::now();
  const Tokenizer& tok = (*gen)->tokenizer();
  GenerateRequest req;
  if (!no_bos) req.prompt_ids.push_back(tok.bos_id());
  for (int32_t id : tok.Encode(prompt)) req.prompt_ids.push_back(id);
  req.max_new_tokens = max_tokens;
  req.sampling = sampling;
  if (!ignore_eos) req.stop_token_ids = {tok.eos_id(), tok.bos_id()};

  std::fputs(prompt.c_str(), stdout);
  std::fflush(stdout);
  StreamDecoder decoder(tok);
  // Prime the decoder with the prompt's last token so the first generated
  // piece keeps its leading space.
  if (req.prompt_ids.size() > 1) decoder.Push(req.prompt_ids.back());
  auto result = (*gen)->Generate({req}, [&](int32_t, int32_t id) {
    std::fputs(decoder.Push(id).c_str(), stdout);
    std::fflush(stdout);
  });
  if (!result.ok()) {
    std::fprintf(stderr, "\nstrata generate: %s\n", std::string(result.status().message()).c_str());
    return 1;
  }
  std::fputs(decoder.Flush().c_str(), stdout);
  std::fputs("\n", stdout);
  const auto t2 = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(t2 - t1).count();
  const size_t n = (*result)[0].output_ids.size();
  spdlog::info("model loaded in {:.2f} s; {} prompt + {} generated tokens in {:.3f} s ({:.1f} tokens/s)",
               std::chrono::duration<double>(t1 - t0).count(), req.prompt_ids.size(), n, secs,
               n / std::max(secs, 1e-9));
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  using namespace strata;
  CLI::App app{"Strata: LLaMA serving with a quantized paged KV cache"};
  app.require_subcommand(1);

  OfflineOptions opts;
  opts.model_path = DefaultModelPath();
  std::string prompt = "Once upon a time";
  int max_tokens = 128;
  SamplingParams sampling;
  bool ignore_eos = false, no_bos = false;
  CLI::App* gen = app.add_subcommand("generate", "Generate a continuation of a prompt in-process");
  gen->add_option("--model", opts.model_path,
                  "Model directory (config.json + safetensors + tokenizer.model) or llama2.c .bin")
      ->capture_default_str();
  gen->add_option("--prompt", prompt, "Prompt text")->capture_default_str();
  gen->add_option("--max-tokens", max_tokens, "Tokens to generate")->check(CLI::PositiveNumber)
      ->capture_default_str();
  gen->add_option("--temperature", sampling.temperature, "0 = greedy")->check(CLI::NonNegativeNumber);
  gen->add_option("--top-k", sampling.top_k, "0 = off")->check(CLI::NonNegativeNumber);
  gen->add_option("--top-p", sampling.top_p, "Nucleus sampling mass")->check(CLI::Range(1e-6, 1.0));
  gen->add_option("--seed", sampling.seed, "Sampling seed");
  gen->add_option("--kv-cache-dtype", opts.kv_cache_dtype,
                  "auto, fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int8, int4")->capture_default_str();
  gen->add_option("--kv-scale-mode", opts.kv_scale_mode, "none, static, dynamic (default per dtype)");
  gen->add_option("--kv-quant-params-path", opts.kv_quant_params_path, "Static KV scales (JSON)");
  gen->add_option("--block-size", opts.block_size, "Tokens per KV block")->capture_default_str();
  gen->add_flag("--ignore-eos", ignore_eos, "Do not stop at end-of-sequence tokens");
  gen->add_flag("--no-bos", no_bos, "Do not prepend the BOS token");

  CLI11_PARSE(app, argc, argv);
  if (*gen) return RunGenerate(opts, prompt, max_tokens, sampling, ignore_eos, no_bos);
  return 0;
}
