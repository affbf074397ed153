// `strata`: the command-line entry point.
//
//   strata generate --model DIR --prompt "Once upon a time"     # offline, in-process
//   strata serve --model DIR --port 50051                        # gRPC server (scheduler/server/)
//   strata generate --server localhost:50051 --prompt "..."      # gRPC client, streams the text
//   strata info --server localhost:50051                         # model, KV format, block usage
//
// Each subcommand validates its flags and reports bad input naming the flag
// or file.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/synchronization/mutex.h"
#include "scheduler/eval_cli.h"
#include "scheduler/server/client.h"
#include "scheduler/server/serve.h"
#include "spdlog/sinks/stdout_color_sinks.h"
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
  std::fflush(stdout);
  const auto t2 = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(t2 - t1).count();
  const size_t n = (*result)[0].output_ids.size();
  spdlog::info("model loaded in {:.2f} s; {} prompt + {} generated tokens in {:.3f} s ({:.1f} tokens/s)",
               std::chrono::duration<double>(t1 - t0).count(), req.prompt_ids.size(), n, secs,
               n / std::max(secs, 1e-9));
  return 0;
}

v1::GenerateRequest RemoteRequest(const std::string& prompt, int max_tokens,
                                  const SamplingParams& sampling, bool ignore_eos, bool no_bos,
                                  const std::vector<std::string>& stop,
                                  const std::vector<int32_t>& stop_token_ids) {
  v1::GenerateRequest r;
  r.set_text(prompt);
  if (no_bos) r.set_add_bos(false);
  v1::SamplingParams* s = r.mutable_sampling();
  s->set_max_tokens(max_tokens);
  s->set_temperature(sampling.temperature);
  s->set_top_k(sampling.top_k);
  s->set_top_p(sampling.top_p);
  s->set_seed(sampling.seed);
  s->set_ignore_eos(ignore_eos);
  for (const std::string& x : stop) s->add_stop(x);
  for (int32_t id : stop_token_ids) s->add_stop_token_ids(id);
  return r;
}

void AddClientFlags(CLI::App* app, serving::ClientOptions* c) {
  app->add_option("--auth-token-file", c->auth_token_file, "File with the server's bearer token");
  app->add_flag("--tls", c->tls, "Connect with TLS (system root certificates)");
  app->add_option("--tls-ca-file", c->tls_ca_file, "PEM root certificate(s) to trust (implies --tls)");
  app->add_option("--wait-ready", c->wait_ready_s,
                  "Wait up to this many seconds for the server to finish loading")
      ->capture_default_str();
  app->add_option("--timeout", c->timeout_s, "Deadline of the call in seconds")->capture_default_str();
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  using namespace strata;
  // absl::Mutex checks every lock order against a global graph when libabsl
  // is built without NDEBUG (Debian's is): a debugging aid that took ~12% of
  // the engine thread's CPU at 700 running sequences. Tests keep it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#ifdef STRATA_SCHEDULER_ONLY
  // strata-scheduler: `strata serve --external-workers` (Kubernetes: the
  // scheduler pod; the strata-worker pods dial its control plane).
  std::vector<char*> args = {argv[0], const_cast<char*>("serve"), const_cast<char*>("--external-workers")};
  args.insert(args.end(), argv + 1, argv + argc);
  argc = static_cast<int>(args.size());
  argv = args.data();
  CLI::App app{"strata-scheduler: the scheduler and gRPC API of a Strata deployment whose strata-worker "
               "ranks run elsewhere (= strata serve --external-workers)"};
#else
  CLI::App app{"Strata: LLaMA serving with a quantized paged KV cache"};
#endif
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
  std::string gen_dtype = "fp32";
  gen->add_option("--dtype", gen_dtype, "CPU weight storage: fp32 (exact) or fp16 (faster)")
      ->check(CLI::IsMember({"fp32", "fp16"}))
      ->capture_default_str();
  gen->add_flag("--ignore-eos", ignore_eos, "Do not stop at end-of-sequence tokens");
  gen->add_flag("--no-bos", no_bos, "Do not prepend the BOS token");
  // With --server, generate through a running `strata serve` instead of in-process.
  serving::ClientOptions client;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  gen->add_option("--server", client.server,
                  "host:port of a `strata serve` to stream from (otherwise runs in-process)");
  gen->add_option("--stop", stop, "Stop string (with --server; repeatable)");
  gen->add_option("--stop-token-id", stop_token_ids, "Stop token id (with --server; repeatable)");
  AddClientFlags(gen, &client);

  serving::ServeOptions serve;
  serving::EngineConfig& e = serve.engine;
  e.model_path = DefaultModelPath();
  CLI::App* srv = app.add_subcommand("serve", "Serve the strata.v1.Generation gRPC API");
  srv->add_option("--model", e.model_path, "Model directory or llama2.c .bin")->capture_default_str();
  srv->add_option("--tp", e.tp, "Tensor-parallel ranks: > 1 starts that many strata-worker processes")
      ->capture_default_str();
  srv->add_flag("--worker-processes", e.worker_processes,
                "Run the engine in strata-worker processes even with --tp 1");
  srv->add_option("--worker-binary", e.worker_binary,
                  "strata-worker executable (default: next to strata, ../worker/, or $PATH)");
  srv->add_flag("--external-workers", e.external_workers,
                "Spawn no workers: --tp strata-worker processes started elsewhere dial "
                "--control-plane-address with the secret in --control-plane-secret-file");
  srv->add_option("--control-plane-address", e.control_plane_address,
                  "HOST:PORT of the worker control plane (default loopback, a free port)")
      ->capture_default_str();
  srv->add_option("--control-plane-secret-file", e.control_plane_secret_file,
                  "File with the shared secret workers present (--external-workers)");
  srv->add_option("--worker-ready-timeout", e.worker_ready_timeout_s,
                  "Seconds to wait for the workers to load the model")->capture_default_str();
  srv->add_option("--worker-step-timeout", e.worker_step_timeout_s,
                  "Seconds one engine step may take on the workers before the group counts as hung")
      ->capture_default_str();
  srv->add_option("--device", e.device, "cpu or cuda (cuda: --tp strata-worker processes, GPU r for rank r)")
      ->capture_default_str();
  srv->add_option("--load-format", e.load_format,
                  "auto (checkpoint at --model) or dummy (--model names a shape: llama-2-7b, llama-2-13b, "
                  "llama-3-8b, llama-2-70b, or a config.json; random weights)")->capture_default_str();
  srv->add_option("--tokenizer", e.tokenizer_path, "Tokenizer directory (default: the model's; required with dummy)");
  srv->add_option("--dtype", e.dtype, "weights: auto; --device cuda fp16 (auto) or bf16; --device cpu fp32 (auto) "
                  "or fp16 (half the bytes per token, in process)")->capture_default_str();
  srv->add_flag("--enforce-eager", e.enforce_eager, "--device cuda: no CUDA graphs");
  srv->add_flag("--serialize-mixed-attention", e.serialize_mixed_attention,
                "--device cuda: in steps with prompt chunks and one-token sequences, run the prefill "
                "and the decode attention one after the other (default: side by side on two streams)");
  srv->add_option("--kv-cache-dtype", e.kv_cache_dtype,
                  "auto, fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int8, int4")->capture_default_str();
  srv->add_option("--kv-scale-mode", e.kv_scale_mode, "none, static, dynamic (default per dtype)");
  srv->add_option("--kv-quant-params-path", e.kv_quant_params_path, "Static KV scales (JSON)");
  srv->add_option("--swap-space", e.swap_space_gib, "CPU swap space for preempted sequences, GiB")
      ->capture_default_str();
  srv->add_option("--gpu-memory-utilization", e.gpu_memory_utilization,
                  "Share of free memory for the KV cache (--device cpu: of MemAvailable, unless "
                  "--kv-cache-memory is given)")->capture_default_str();
  srv->add_option("--kv-cache-memory", e.kv_cache_memory_gib,
                  "--device cpu: KV cache GiB per engine process / rank (0 = derive from "
                  "--gpu-memory-utilization)")
      ->capture_default_str();
  srv->add_option("--block-size", e.block_size, "Tokens per KV block")->capture_default_str();
  srv->add_option("--max-num-seqs", e.max_num_seqs, "Sequences running at once")->capture_default_str();
  srv->add_option("--max-model-len", e.max_model_len, "Prompt + output tokens (0 = model context)")
      ->capture_default_str();
  srv->add_option("--max-num-batched-tokens", serve.max_num_batched_tokens, "Tokens per engine step")
      ->capture_default_str();
  srv->add_option("--preemption-mode", serve.preemption_mode, "recompute, swap or auto")
      ->capture_default_str();
  srv->add_option("--max-queued-requests", serve.max_queued_requests,
                  "Requests waiting beyond --max-num-seqs before RESOURCE_EXHAUSTED")
      ->capture_default_str();
  srv->add_flag("!--no-prefix-caching", serve.enable_prefix_caching, "Disable prefix caching");
  srv->add_option("--host", serve.host, "Address to listen on")->capture_default_str();
  srv->add_option("--port", serve.port, "gRPC port (0 = pick a free one)")->capture_default_str();
  srv->add_option("--metrics-port", serve.metrics_port, "Prometheus /metrics port (0 = off)")
      ->capture_default_str();
  srv->add_option("--tls-cert-file", serve.tls_cert_file, "PEM certificate chain (enables TLS)");
  srv->add_option("--tls-key-file", serve.tls_key_file, "PEM private key");
  srv->add_option("--auth-token-file", serve.auth_token_file,
                  "Require `authorization: Bearer <token>` with the token in this file");
  srv->add_option("--max-request-bytes", serve.max_request_bytes,
                  "Largest request (and prompt text) accepted")->capture_default_str();
  srv->add_option("--shutdown-grace", serve.shutdown_grace_s,
                  "Seconds in-flight requests get to finish on SIGINT/SIGTERM")->capture_default_str();

  serving::ClientOptions info_client;
  CLI::App* info = app.add_subcommand("info", "Print a server's model, KV format and block usage");
  info->add_option("--server", info_client.server, "host:port of a `strata serve`")->required();
  AddClientFlags(info, &info_client);

  RegisterEvalCommands(app);  // eval-ppl, calibrate

  CLI11_PARSE(app, argc, argv);
  if (auto rc = DispatchEvalCommands()) return *rc;
  // Logs go to stderr; stdout carries generated text and the serve ready line.
  spdlog::set_default_logger(spdlog::stderr_color_mt("strata"));
  if (*gen && !client.server.empty()) {
    for (const char* flag : {"--model", "--kv-cache-dtype", "--kv-scale-mode", "--kv-quant-params-path",
                             "--block-size"}) {
      if (gen->count(flag) > 0) {
        std::fprintf(stderr, "strata generate: %s is a server setting; it has no effect with --server\n",
                     flag);
      }
    }
    return serving::RunRemoteGenerate(
        client, RemoteRequest(prompt, max_tokens, sampling, ignore_eos, no_bos, stop, stop_token_ids));
  }
  if (*gen) {
    opts.weight_dtype = gen_dtype == "fp16" ? WeightDtype::kFp16 : WeightDtype::kFp32;
    return RunGenerate(opts, prompt, max_tokens, sampling, ignore_eos, no_bos);
  }
  if (*srv) return serving::RunServe(serve);
  if (*info) return serving::RunRemoteInfo(info_client);
  return 0;
}
