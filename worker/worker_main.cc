// strata-worker: one tensor-parallel rank of a model, driven by the scheduler.
//
//   strata-worker --rank 0 --world-size 2 --scheduler 127.0.0.1:50051
//                 --secret-file /run/strata/secret [--kv-cache-memory 2GiB]
//                 [--cuda-device N]
//
// The worker dials the scheduler's control plane, registers, and takes its
// model and KV format from the scheduler (see worker/worker_service.h); the
// flags here are what is local to the machine: memory budgets, threads, the
// address peers reach this rank's collectives on. Exit status: 0 after an
// orderly shutdown, 1 on a runtime failure (scheduler gone, collectives
// broken), 2 on bad flags, 3 when the scheduler rejects the secret.
#include <omp.h>

#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "spdlog/spdlog.h"
#include "worker/worker_service.h"

extern "C" void openblas_set_num_threads(int num_threads);

namespace strata {
namespace {

// "1073741824", "512MiB", "2GiB", "1.5G" -> bytes.
absl::StatusOr<int64_t> ParseBytes(std::string s) {
  double mult = 1.0;
  auto strip = [&](std::string_view suffix, double m) {
    if (s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0) {
      s.resize(s.size() - suffix.size());
      mult = m;
      return true;
    }
    return false;
  };
  strip("GiB", 1 << 30) || strip("G", 1 << 30) || strip("MiB", 1 << 20) || strip("M", 1 << 20) ||
      strip("KiB", 1 << 10) || strip("K", 1 << 10);
  double v = 0;
  if (!absl::SimpleAtod(s, &v) || v < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-cache-memory: cannot parse '", s, "' as bytes"));
  }
  return static_cast<int64_t>(v * mult);
}

int Main(int argc, char** argv) {
  // absl::Mutex checks every lock order against a global graph when libabsl
  // is built without NDEBUG (Debian's is): a debugging aid that took ~12% of
  // the engine thread's CPU at 700 running sequences. Tests keep it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  CLI::App app{"strata-worker: one tensor-parallel rank, driven by the scheduler"};
  WorkerOptions o;
  std::string secret_file, kv_memory;
  int threads = 0;
  double connect_timeout_s = 30;
  app.add_option("--rank", o.rank, "this worker's tensor-parallel rank")->required()->check(CLI::NonNegativeNumber);
  app.add_option("--world-size", o.world_size, "number of tensor-parallel ranks")->required()->check(CLI::PositiveNumber);
  app.add_option("--scheduler", o.scheduler_address, "host:port of the scheduler's control plane")->required();
  app.add_option("--secret-file", secret_file, "file holding the shared control-plane secret")->required();
  app.add_option("--kv-cache-memory", kv_memory, "bytes for KV blocks (e.g. 2GiB; default 1GiB, at most half of MemAvailable)");
  app.add_option("--num-kv-blocks", o.num_kv_blocks, "KV block count (instead of --kv-cache-memory)")->check(CLI::NonNegativeNumber);
  app.add_option("--swap-space", o.swap_space_gib, "GiB of swap blocks")->check(CLI::NonNegativeNumber);
  app.add_option("--num-swap-blocks", o.num_swap_blocks, "swap block count (instead of --swap-space)")->check(CLI::NonNegativeNumber);
  app.add_option("--threads", threads, "CPU threads for the engine (0: OpenMP default)")->check(CLI::NonNegativeNumber);
  app.add_option("--gloo-host", o.gloo_hostname, "address other ranks reach this rank's Gloo endpoint on");
  app.add_option("--cuda-device", o.cuda_device, "GPU of this rank when the scheduler asks for --device cuda (default: the rank)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--connect-timeout", connect_timeout_s, "seconds to wait for the scheduler")->check(CLI::PositiveNumber);
  int fault_slow_step_ms = 0;
  app.add_option("--fault-slow-first-step", fault_slow_step_ms,
                 "tests: sleep this many milliseconds before the first step (a worker busy in a long step)")
      ->check(CLI::NonNegativeNumber)
      ->group("");  // hidden
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  spdlog::set_pattern(absl::StrCat("[%H:%M:%S.%e] [strata-worker ", o.rank, "] [%l] %v"));
  if (o.rank >= o.world_size) {
    spdlog::error("--rank {} must be below --world-size {}", o.rank, o.world_size);
    return 2;
  }
  if (!kv_memory.empty()) {
    auto b = ParseBytes(kv_memory);
    if (!b.ok()) {
      spdlog::error("{}", b.status().ToString());
      return 2;
    }
    o.kv_cache_memory_bytes = *b;
  }
  auto secret = ReadSecretFile(secret_file);
  if (!secret.ok()) {
    spdlog::error("{}", secret.status().ToString());
    return 2;
  }
  o.secret = *secret;
  o.connect_timeout = absl::Seconds(connect_timeout_s);
  o.fault_slow_first_step = absl::Milliseconds(fault_slow_step_ms);
  if (threads > 0) {
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
  }
  spdlog::info("rank {}/{} connecting to {} ({} threads)", o.rank, o.world_size, o.scheduler_address,
               omp_get_max_threads());
  WorkerSession session(std::move(o));
  const absl::Status s = session.Run();
  if (s.ok()) return 0;
  spdlog::error("{}", s.ToString());
  return s.code() == absl::StatusCode::kUnauthenticated ? 3 : 1;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) { return strata::Main(argc, argv); }
