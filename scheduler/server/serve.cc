#include "scheduler/server/serve.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "runtime/kv_format_util.h"
#include "runtime/prefix_hash.h"
#include "runtime/status_macros.h"
#include "scheduler/metrics.h"
#include "scheduler/server/generation_service.h"
#include "scheduler/server/serving_engine.h"
#include "spdlog/spdlog.h"

namespace strata::serving {

constexpr absl::Duration kLameDuck = absl::Milliseconds(750);
namespace {

constexpr char kServiceName[] = "strata.v1.Generation";

// SIGINT/SIGTERM run a handler that only writes a byte to a pipe; a watcher
// thread reads it, so shutdown runs as ordinary code on the main thread.
// (Handlers, unlike a blocked mask, are not inherited by the strata-worker
// processes: exec resets them.)
class SignalWatcher {
 public:
  SignalWatcher() {
    if (pipe2(fds_, O_CLOEXEC) != 0) {
      fds_[0] = fds_[1] = -1;
      return;
    }
    write_fd_.store(fds_[1]);
    struct sigaction sa = {};
    sa.sa_handler = &SignalWatcher::Handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
    thread_ = std::thread([this] {
      for (;;) {
        char c = 0;
        const ssize_t n = read(fds_[0], &c, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || c == 'q') return;
        if (!first_.HasBeenNotified()) {
          spdlog::info("received {}; shutting down (send again to skip the grace period)",
                       c == 'i' ? "SIGINT" : "SIGTERM");
          first_.Notify();
        } else {
          spdlog::warn("second signal: failing in-flight requests now");
          second_.store(true);
        }
      }
    });
  }
  ~SignalWatcher() {
    if (fds_[1] < 0) return;
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
    const char q = 'q';
    (void)!write(fds_[1], &q, 1);
    thread_.join();
    write_fd_.store(-1);
    close(fds_[0]);
    close(fds_[1]);
  }
  bool WaitFirst(absl::Duration timeout) { return first_.WaitForNotificationWithTimeout(timeout); }
  bool requested() const { return first_.HasBeenNotified(); }
  bool forced() const { return second_.load(); }

 private:
  static void Handler(int sig) {  // async-signal-safe: write(2) only
    const int saved = errno;
    const char c = sig == SIGINT ? 'i' : 't';
    const int fd = write_fd_.load();
    if (fd >= 0) (void)!write(fd, &c, 1);
    errno = saved;
  }
  static inline std::atomic<int> write_fd_{-1};
  int fds_[2] = {-1, -1};
  struct sigaction old_int_ = {}, old_term_ = {};
  absl::Notification first_;
  std::atomic<bool> second_{false};
  std::thread thread_;
};

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string HostPort(const std::string& host, int port) {
  if (host.find(':') != std::string::npos && host.front() != '[') {
    return absl::StrCat("[", host, "]:", port);
  }
  return absl::StrCat(host, ":", port);
}

// Everything `RunServe` builds from flags before listening.
struct Prepared {
  std::optional<std::string> auth_token;
  std::shared_ptr<grpc::ServerCredentials> credentials;
  PreemptionMode preemption_mode = PreemptionMode::kAuto;
};

absl::StatusOr<Prepared> Prepare(const ServeOptions& o) {
  Prepared p;
  RETURN_IF_ERROR(ValidateEngineConfig(o.engine));
  ASSIGN_OR_RETURN(p.preemption_mode, ParsePreemptionMode(o.preemption_mode));
  if (o.port < 0 || o.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--port must be in [0, 65535], got ", o.port));
  }
  if (o.metrics_port < 0 || o.metrics_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-port must be in [0, 65535], got ", o.metrics_port));
  }
  if (o.max_num_batched_tokens < 1 || o.max_queued_requests < 0 || o.max_request_bytes < 1024 ||
      o.shutdown_grace_s < 0) {
    return absl::InvalidArgumentError(
        "--max-num-batched-tokens must be >= 1, --max-queued-requests >= 0, "
        "--max-request-bytes >= 1024 and --shutdown-grace >= 0");
  }
  if (!o.auth_token_file.empty()) {
    ASSIGN_OR_RETURN(std::string token, ReadFile(o.auth_token_file, "--auth-token-file"));
    token = std::string(absl::StripAsciiWhitespace(token));
    if (token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--auth-token-file: ", o.auth_token_file, " is empty"));
    }
    p.auth_token = std::move(token);
  }
  if (o.tls_cert_file.empty() != o.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert-file and --tls-key-file go together");
  }
  if (!o.tls_cert_file.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
    ASSIGN_OR_RETURN(pair.private_key, ReadFile(o.tls_key_file, "--tls-key-file"));
    ASSIGN_OR_RETURN(pair.cert_chain, ReadFile(o.tls_cert_file, "--tls-cert-file"));
    ssl.pem_key_cert_pairs.push_back(std::move(pair));
    p.credentials = grpc::SslServerCredentials(ssl);
  } else {
    p.credentials = grpc::InsecureServerCredentials();
  }
  return p;
}

void SetHealth(grpc::Server* server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(serving);
  health->SetServingStatus(kServiceName, serving);
}

}  // namespace

int RunServe(const ServeOptions& o) {
  SignalWatcher signals;
  absl::StatusOr<Prepared> prepared = Prepare(o);
  if (!prepared.ok()) {
    std::fprintf(stderr, "strata serve: %s\n", prepared.status().ToString().c_str());
    return 2;
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  GenerationService service(prepared->auth_token);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(HostPort(o.host, o.port), prepared->credentials, &port);
  builder.RegisterService(&service);
  // Oversized requests are parsed and answered with INVALID_ARGUMENT naming
  // the field; only messages past this hard cap get gRPC's RESOURCE_EXHAUSTED.
  builder.SetMaxReceiveMessageSize(
      static_cast<int>(std::min<int64_t>(INT_MAX, std::max<int64_t>(4 * o.max_request_bytes, 4 << 20))));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "strata serve: cannot listen on %s\n", HostPort(o.host, o.port).c_str());
    return 1;
  }
  SetHealth(server.get(), false);
  spdlog::info("listening on {}{} (loading {})", HostPort(o.host, port),
               o.tls_cert_file.empty() ? "" : " with TLS", o.engine.model_path);

  LoadProgress progress(0);
  EngineConfig engine_config = o.engine;
  engine_config.max_num_batched_tokens = std::max(o.max_num_batched_tokens, o.engine.max_num_seqs);
  absl::StatusOr<LoadedModel> model = LoadModel(engine_config, &progress);
  progress.Done(model.ok());
  if (!model.ok()) {
    std::fprintf(stderr, "strata serve: %s\n", model.status().ToString().c_str());
    server->Shutdown();
    return 2;
  }
  Engine& engine = *model->engine;
  // Stops worker processes on every return path below (no-op in process).
  struct StopWorkers {
    LoadedModel* m;
    ~StopWorkers() { m->Shutdown(); }
  } stop_workers{&*model};

  ServingEngineOptions so;
  so.max_queued_requests = o.max_queued_requests;
  so.begin_round = [&service] { service.BeginWriteBatch(); };
  so.end_round = [&service] { service.EndWriteBatch(); };
  SchedulerOptions& sched = so.scheduler;
  sched.max_num_seqs = o.engine.max_num_seqs;
  sched.max_num_batched_tokens = o.max_num_batched_tokens;
  sched.max_model_len = model->max_model_len;
  sched.preemption_mode = prepared->preemption_mode;
  sched.blocks.num_gpu_blocks = engine.options().num_gpu_blocks;
  sched.blocks.num_cpu_blocks = engine.options().num_cpu_blocks;
  sched.blocks.block_size = engine.options().block_size;
  sched.blocks.enable_prefix_caching = o.enable_prefix_caching;
  sched.blocks.hash_seed = PrefixHashSeed(o.engine.model_path, engine.options().kv_format);
  sched.blocks.bytes_per_block = model->kv_bytes_per_block;
  ModelInfoLabels labels;
  labels.model = o.engine.model_path;
  labels.tp_size = o.engine.tp;
  labels.kv_dtype = KvDtypeName(engine.options().kv_format.dtype);
  labels.kv_scale_mode = KvScaleModeName(engine.options().kv_format.scale_mode);
  labels.block_size = engine.options().block_size;
  labels.device = o.engine.device;
  absl::StatusOr<std::unique_ptr<ServingMetrics>> metrics = ServingMetrics::Create(
      o.metrics_port > 0 ? HostPort(o.host, o.metrics_port) : std::string(), labels);
  if (!metrics.ok()) {
    std::fprintf(stderr, "strata serve: %s\n", metrics.status().ToString().c_str());
    server->Shutdown();
    return 2;
  }
  (*metrics)->SetPoolSizes(engine.options().num_gpu_blocks, engine.options().num_cpu_blocks,
                           model->kv_bytes_per_block);
  ServingMetrics* m = metrics->get();
  if (model->pool != nullptr) {
    RemoteEngine* remote = model->pool->engine();
    const std::vector<RankMemory>& mem = remote->memory();
    for (size_t r = 0; r < mem.size(); ++r) {
      const RankMemory& x = mem[r];
      m->SetWorkerUp(static_cast<int>(r), true);
      for (const auto& [kind, bytes] : {std::pair<const char*, int64_t>{"weights", x.weights},
                                        {"kv_cache", x.kv_cache}, {"activations", x.activations},
                                        {"swap", x.swap}, {"free", x.free}, {"total", x.total}}) {
        if (bytes > 0 || std::string(kind) == "kv_cache") m->SetWorkerMemory(static_cast<int>(r), kind, bytes);
      }
    }
    remote->set_rank_step_observer([m](int rank, int64_t /*worker_us*/, int64_t engine_us) {
      m->OnWorkerStep(rank, static_cast<double>(engine_us) * 1e-6);
    });
    remote->set_step_observer([m](const RemoteStepTimings& t) {
      m->OnRemoteStep(static_cast<double>(t.wall_us) * 1e-6, static_cast<double>(t.worker_us) * 1e-6,
                      static_cast<double>(t.engine_us) * 1e-6);
    });
  } else {
    m->set_in_process_worker(true);
    m->SetWorkerUp(0, true);
    m->SetWorkerMemory(0, "kv_cache", int64_t{engine.options().num_gpu_blocks} * model->kv_bytes_per_block);
    m->SetWorkerMemory(0, "swap", int64_t{engine.options().num_cpu_blocks} * model->kv_bytes_per_block);
  }
  if (o.metrics_port > 0) spdlog::info("metrics on http://{}/metrics", HostPort(o.host, o.metrics_port));
  absl::StatusOr<std::unique_ptr<ServingEngine>> serving =
      ServingEngine::Create(&engine, model->tokenizer.get(), metrics->get(), so);
  if (!serving.ok()) {
    std::fprintf(stderr, "strata serve: %s\n", serving.status().ToString().c_str());
    server->Shutdown();
    return 2;
  }

  RequestLimits limits;
  limits.vocab_size = engine.config().vocab_size;
  limits.max_context = model->max_model_len;
  limits.max_request_bytes = o.max_request_bytes;
  v1::ModelInfo info;
  info.set_model(o.engine.model_path);
  info.set_tp_size(o.engine.tp);
  info.set_device(o.engine.device);
  info.set_kv_cache_dtype(KvDtypeName(engine.options().kv_format.dtype));
  info.set_kv_scale_mode(KvScaleModeName(engine.options().kv_format.scale_mode));
  info.set_block_size(engine.options().block_size);
  info.set_max_context(model->max_model_len);
  info.set_vocab_size(engine.config().vocab_size);
  info.set_bos_token_id(model->tokenizer->bos_id());
  info.set_eos_token_id(model->tokenizer->eos_id());
  info.set_kv_bytes_per_block(model->kv_bytes_per_block);
  service.SetReady(serving->get(), model->tokenizer.get(), metrics->get(), limits, info);

  if (!signals.requested()) {
    SetHealth(server.get(), true);
    std::printf("strata serve: ready on %s\n", HostPort(o.host, port).c_str());
    std::fflush(stdout);
  }
  // Health follows the engine and the workers: NOT_SERVING while the last
  // step failed or a worker is gone.
  bool healthy = true;
  while (!signals.WaitFirst(absl::Seconds(1))) {
    const absl::Status workers = model->Health();
    if (!workers.ok() && healthy) spdlog::error("workers unhealthy: {}", workers.ToString());
    if (model->pool != nullptr) {
      const std::vector<WorkerProcessStatus> children = model->pool->Health().workers;
      for (const WorkerProcessStatus& w : children) m->SetWorkerUp(w.rank, w.running && workers.ok());
      if (children.empty()) {  // external workers: the group's health is all there is
        for (int r = 0; r < o.engine.tp; ++r) m->SetWorkerUp(r, workers.ok());
      }
    }
    const bool now = (*serving)->Stats().engine_healthy && workers.ok();
    if (now != healthy) SetHealth(server.get(), now);
    healthy = now;
  }

  // Shutdown: stop admitting, let in-flight requests finish for the grace
  // period (a second signal cuts it short), fail the rest, stop serving.
  SetHealth(server.get(), false);
  const absl::Time deadline = absl::Now() + absl::Seconds(o.shutdown_grace_s);
  spdlog::info("draining {} requests in flight (up to {} s)", (*serving)->Stats().in_flight,
               o.shutdown_grace_s);
  while (!(*serving)->Drain(std::min(absl::Milliseconds(100), deadline - absl::Now())) &&
         absl::Now() < deadline && !signals.forced()) {
  }
  const int64_t left = (*serving)->Stats().in_flight;
  if (left > 0) spdlog::warn("failing {} unfinished requests with UNAVAILABLE", left);
  (*serving)->Stop();
  model->Shutdown();  // workers asked to exit, then killed and reaped
  // Lame duck: for a moment the listener stays up and every new call is
  // answered UNAVAILABLE by the handlers; calls that reach gRPC after
  // server->Shutdown() would be CANCELLED by the library instead.
  if (!signals.forced()) absl::SleepFor(kLameDuck);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server->Wait();
  serving->reset();
  metrics->reset();
  spdlog::info("stopped");
  return 0;
}

}  // namespace strata::serving
