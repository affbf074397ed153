#include "scheduler/worker_pool.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/status_macros.h"
#include "spdlog/spdlog.h"
#include "worker/worker_service.h"

namespace strata {
namespace {

std::string RandomSecret() {
  std::random_device rd;  // /dev/urandom
  std::string s;
  for (int i = 0; i < 8; ++i) s += absl::StrFormat("%08x", rd());
  return s;
}

std::string DescribeExit(int wstatus) {
  if (WIFEXITED(wstatus)) return absl::StrCat("exited with status ", WEXITSTATUS(wstatus));
  if (WIFSIGNALED(wstatus)) return absl::StrCat("killed by signal ", WTERMSIG(wstatus));
  return absl::StrCat("ended (wait status ", wstatus, ")");
}

}  // namespace

std::string FindWorkerBinary() {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  for (const fs::path& p : {self.parent_path() / "strata-worker",
                            self.parent_path().parent_path() / "worker" / "strata-worker"}) {
    if (::access(p.c_str(), X_OK) == 0) return p.string();
  }
  return "";
}

absl::StatusOr<std::unique_ptr<WorkerPool>> WorkerPool::Start(const WorkerPoolOptions& options) {
  const int n = options.engine.world_size;
  if (n < 1) return absl::InvalidArgumentError("world size must be at least 1");
  if (options.external_workers) {
    auto pool = std::unique_ptr<WorkerPool>(new WorkerPool());
    pool->options_ = options;
    ControlPlaneOptions co;
    co.listen_address = options.listen_address;
    ASSIGN_OR_RETURN(co.secret, ReadSecretFile(options.secret_file));
    co.world_size = n;
    co.keepalive_time = options.keepalive_time;
    co.keepalive_timeout = options.keepalive_timeout;
    ASSIGN_OR_RETURN(pool->control_, ControlPlane::Start(co));
    spdlog::info("worker pool: waiting for {} external worker(s) on {}", n, pool->control_->address());
    return pool;
  }
  if (::access(options.worker_binary.c_str(), X_OK) != 0) {
    return absl::NotFoundError(absl::StrCat("worker binary ", options.worker_binary, " is not executable"));
  }
  if (!options.extra_args.empty() && static_cast<int>(options.extra_args.size()) != n) {
    return absl::InvalidArgumentError("extra_args must be empty or have one entry per rank");
  }
  auto pool = std::unique_ptr<WorkerPool>(new WorkerPool());
  pool->options_ = options;

  char tmpl[] = "/tmp/strata-pool-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp: ", std::strerror(errno)));
  }
  pool->secret_dir_ = tmpl;  // 0700
  pool->secret_path_ = pool->secret_dir_ + "/secret";
  const std::string secret = RandomSecret();
  {
    const int fd = ::open(pool->secret_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || ::write(fd, secret.data(), secret.size()) != static_cast<ssize_t>(secret.size())) {
      if (fd >= 0) ::close(fd);
      return absl::InternalError(absl::StrCat("cannot write ", pool->secret_path_, ": ", std::strerror(errno)));
    }
    ::close(fd);
  }
  ControlPlaneOptions co;
  co.listen_address = options.listen_address;
  co.secret = secret;
  co.world_size = n;
  co.keepalive_time = options.keepalive_time;
  co.keepalive_timeout = options.keepalive_timeout;
  ASSIGN_OR_RETURN(pool->control_, ControlPlane::Start(co));
  RETURN_IF_ERROR(pool->Spawn());
  return pool;
}

absl::Status WorkerPool::Spawn() {
  const int n = options_.engine.world_size;
  int threads = options_.threads_per_worker;
  if (threads <= 0) threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / n);
  // Everything the children need is built before fork: after fork only
  // async-signal-safe calls are allowed.
  std::vector<std::vector<std::string>> args(n);
  std::vector<int> log_fds(n, -1);
  for (int r = 0; r < n; ++r) {
    auto& a = args[r];
    a = {options_.worker_binary, "--rank", std::to_string(r), "--world-size", std::to_string(n),
         "--scheduler", control_->address(), "--secret-file", secret_path_,
         "--threads", std::to_string(threads)};
    if (options_.num_kv_blocks > 0) a.insert(a.end(), {"--num-kv-blocks", std::to_string(options_.num_kv_blocks)});
    if (options_.kv_cache_memory_bytes > 0) {
      a.insert(a.end(), {"--kv-cache-memory", std::to_string(options_.kv_cache_memory_bytes)});
    }
    if (options_.num_swap_blocks >= 0) {
      a.insert(a.end(), {"--num-swap-blocks", std::to_string(options_.num_swap_blocks)});
    } else if (options_.swap_space_gib > 0) {
      a.insert(a.end(), {"--swap-space", absl::StrCat(options_.swap_space_gib)});
    }
    if (!options_.extra_args.empty()) a.insert(a.end(), options_.extra_args[r].begin(), options_.extra_args[r].end());
    if (!options_.log_dir.empty()) {
      const std::string path = absl::StrCat(options_.log_dir, "/worker-", r, ".log");
      log_fds[r] = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (log_fds[r] < 0) return absl::InternalError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
    }
  }
  spawner_ = std::thread([this, n, args = std::move(args), log_fds]() {
    std::vector<std::vector<char*>> argv(n);
    for (int r = 0; r < n; ++r) {
      for (const auto& s : args[r]) argv[r].push_back(const_cast<char*>(s.c_str()));
      argv[r].push_back(nullptr);
    }
    const pid_t parent = ::getpid();
    pid_t group = 0;
    absl::Status status;
    for (int r = 0; r < n && status.ok(); ++r) {
      const pid_t pid = ::fork();
      if (pid < 0) {
        status = absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
        break;
      }
      if (pid == 0) {
        // Child: async-signal-safe calls only.
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (::getppid() != parent) ::_exit(1);  // the scheduler died before prctl
        ::setpgid(0, group);
        if (log_fds[r] >= 0) ::dup2(log_fds[r], 1), ::dup2(log_fds[r], 2);
        ::execv(argv[r][0], argv[r].data());
        ::_exit(127);
      }
      if (group == 0) group = pid;
      ::setpgid(pid, group);  // also from the parent, so it holds before we rely on it
      absl::MutexLock lock(&mu_);
      children_.push_back({r, pid, true, ""});
    }
    for (int fd : log_fds) {
      if (fd >= 0) ::close(fd);
    }
    absl::MutexLock lock(&spawn_mu_);
    spawned_ = true;
    spawn_status_ = status;
    // Park: the children's PDEATHSIG is tied to this thread.
    spawn_mu_.Await(absl::Condition(&release_spawner_));
  });
  absl::MutexLock lock(&spawn_mu_);
  spawn_mu_.Await(absl::Condition(&spawned_));
  if (spawn_status_.ok()) {
    spdlog::info("worker pool: {} worker(s) started, control plane at {}", n, control_->address());
  }
  return spawn_status_;
}

std::vector<pid_t> WorkerPool::pids() const {
  absl::MutexLock lock(&mu_);
  std::vector<pid_t> out;
  for (const auto& c : children_) out.push_back(c.pid);
  return out;
}

absl::Status WorkerPool::CheckChildren() {
  absl::MutexLock lock(&mu_);
  absl::Status first;
  for (auto& c : children_) {
    if (!c.running) continue;
    int ws = 0;
    const pid_t r = ::waitpid(c.pid, &ws, WNOHANG);
    if (r == c.pid) {
      c.running = false;
      c.exit = DescribeExit(ws);
    } else if (r < 0 && errno == ECHILD) {
      c.running = false;
      c.exit = "reaped elsewhere";
    }
    if (!c.running && first.ok() && !shut_down_) {
      first = absl::UnavailableError(absl::StrCat("worker rank ", c.rank, " (pid ", c.pid, ") ", c.exit,
                                                  options_.log_dir.empty() ? "" : absl::StrCat("; see ", options_.log_dir, "/worker-", c.rank, ".log")));
    }
  }
  return first;
}

absl::StatusOr<RemoteEngine*> WorkerPool::WaitReady(absl::Duration timeout) {
  if (engine_ != nullptr) return engine_.get();
  if (shut_down_) return absl::FailedPreconditionError("the worker pool was shut down");
  ASSIGN_OR_RETURN(engine_, RemoteEngine::Connect(control_.get(), options_.engine, absl::Now() + timeout,
                                                  [this] { return CheckChildren(); }));
  ready_engine_ = engine_.get();
  return engine_.get();
}

PoolHealth WorkerPool::Health() {
  PoolHealth h;
  h.status = CheckChildren();
  if (h.status.ok() && shut_down_) h.status = absl::UnavailableError("the worker pool was shut down");
  RemoteEngine* engine = ready_engine_.load();
  if (h.status.ok() && engine != nullptr) h.status = engine->health();
  if (h.status.ok() && engine == nullptr) h.status = absl::UnavailableError("workers are not ready yet");
  absl::MutexLock lock(&mu_);
  h.workers = children_;
  return h;
}

void WorkerPool::KillAndReap(absl::Duration grace) {
  const absl::Time deadline = absl::Now() + grace;
  for (;;) {
    (void)CheckChildren();
    bool any = false;
    {
      absl::MutexLock lock(&mu_);
      for (const auto& c : children_) any |= c.running;
    }
    if (!any || absl::Now() >= deadline) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  absl::MutexLock lock(&mu_);
  for (auto& c : children_) {
    if (!c.running) continue;
    spdlog::warn("worker pool: worker rank {} (pid {}) did not exit in time; killing it", c.rank, c.pid);
    ::kill(c.pid, SIGKILL);
    int ws = 0;
    while (::waitpid(c.pid, &ws, 0) < 0 && errno == EINTR) {
    }
    c.running = false;
    c.exit = DescribeExit(ws);
  }
}

void WorkerPool::Shutdown() {
  if (shut_down_.exchange(true)) return;
  // Ask the workers to exit (the engine's Shutdown message, or the end of
  // their streams), give them the grace period, then kill what is left.
  if (engine_ != nullptr) {
    engine_->Shutdown("the worker pool is shutting down");
  } else if (control_ != nullptr) {
    control_->CloseAll(absl::UnavailableError("the worker pool is shutting down"));
  }
  KillAndReap(options_.shutdown_grace);
  if (control_ != nullptr) control_->Shutdown();
  if (spawner_.joinable()) {
    {
      absl::MutexLock lock(&spawn_mu_);
      release_spawner_ = true;
    }
    spawner_.join();
  }
  if (!secret_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(secret_dir_, ec);
  }
}

WorkerPool::~WorkerPool() { Shutdown(); }

}  // namespace strata
