#include "tests/serving_test_util.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "grpcpp/generic/generic_stub.h"

namespace strata::testing {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// fork + exec with stdout/stderr redirected to files, in a new process
// group, killed if the test process dies.
pid_t Spawn(const std::vector<std::string>& argv, const std::string& out, const std::string& err) {
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    const int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0) _exit(127);
    dup2(o, STDOUT_FILENO);
    dup2(e, STDERR_FILENO);
    // One OpenMP thread that sleeps when idle: test servers share 2 cores
    // with parallel ctest jobs, and spinning or oversubscribed OpenMP teams
    // slow everything down by an order of magnitude there.
    setenv("OMP_NUM_THREADS", "1", 1);
    setenv("OMP_WAIT_POLICY", "passive", 1);
    const int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  if (pid > 0) setpgid(pid, pid);
  return pid;
}

grpc::ByteBuffer ToBuffer(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}

std::string FromBuffer(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  (void)b.Dump(&slices);
  std::string out;
  for (const grpc::Slice& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

bool Next(grpc::CompletionQueue* cq) {
  void* tag = nullptr;
  bool ok = false;
  return cq->Next(&tag, &ok) && ok;
}

}  // namespace

std::string StrataCli() {
  // STRATA_CLI overrides the build tree's binary (a relocated bundle on a GPU machine).
  const char* env = std::getenv("STRATA_CLI");
  return env != nullptr && *env ? env : STRATA_CLI_PATH;
}
std::string StrataSourceDir() { return STRATA_SOURCE_ROOT; }

std::string MakeTempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "strata_serving_XXXXXX").string();
  const char* d = mkdtemp(tmpl.data());
  return d == nullptr ? std::string() : std::string(d);
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0 && !exited_) {
    kill(-pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

bool ServerProcess::Start(const std::vector<std::string>& args, std::chrono::seconds timeout) {
  dir_ = MakeTempDir();
  std::vector<std::string> argv = {StrataCli(), "serve", "--host", "127.0.0.1", "--port", "0"};
  argv.insert(argv.end(), args.begin(), args.end());
  pid_ = Spawn(argv, dir_ + "/out", dir_ + "/err");
  if (pid_ <= 0) return false;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    const std::string out = ReadAll(dir_ + "/out");
    const std::string key = "ready on ";
    if (const size_t p = out.find(key); p != std::string::npos) {
      const size_t end = out.find('\n', p);
      if (end != std::string::npos) {
        address_ = out.substr(p + key.size(), end - p - key.size());
        return true;
      }
    }
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

void ServerProcess::Signal(int sig) const {
  if (pid_ > 0 && !exited_) kill(pid_, sig);
}

int ServerProcess::WaitExit(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

bool ServerProcess::ProcessGroupGone() const {
  return kill(-pid_, 0) == -1 && errno == ESRCH;
}

std::string ServerProcess::log() const {
  return "--- stdout ---\n" + ReadAll(dir_ + "/out") + "--- stderr ---\n" + ReadAll(dir_ + "/err");
}

CommandResult RunCommand(const std::vector<std::string>& argv, std::chrono::seconds timeout) {
  CommandResult r;
  const std::string dir = MakeTempDir();
  const pid_t pid = Spawn(argv, dir + "/out", dir + "/err");
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  bool done = false;
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      done = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!done) {
    kill(-pid, SIGKILL);
    waitpid(pid, &status, 0);
  } else if (WIFEXITED(status)) {
    r.exit_code = WEXITSTATUS(status);
  }
  r.out = ReadAll(dir + "/out");
  r.err = ReadAll(dir + "/err");
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return r;
}

std::shared_ptr<grpc::Channel> LoopbackChannel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(64 << 20);
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

grpc::Status RawUnaryCall(grpc::Channel* channel, const std::string& method,
                          const std::string& request, std::string* response,
                          std::chrono::milliseconds timeout) {
  grpc::GenericStub stub(std::shared_ptr<grpc::ChannelInterface>(
      channel, [](grpc::ChannelInterface*) {}));  // borrowed
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::CompletionQueue cq;
  auto call = stub.PrepareUnaryCall(&ctx, method, ToBuffer(request), &cq);
  call->StartCall();
  grpc::ByteBuffer out;
  grpc::Status status;
  call->Finish(&out, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  if (status.ok()) *response = FromBuffer(out);
  return status;
}

grpc::Status RawBidiCall(grpc::Channel* channel, const std::string& method,
                         const std::string& request, std::vector<std::string>* responses,
                         std::chrono::milliseconds timeout) {
  grpc::GenericStub stub(std::shared_ptr<grpc::ChannelInterface>(
      channel, [](grpc::ChannelInterface*) {}));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::CompletionQueue cq;
  auto call = stub.PrepareCall(&ctx, method, &cq);
  call->StartCall(reinterpret_cast<void*>(1));
  if (Next(&cq)) {
    call->Write(ToBuffer(request), reinterpret_cast<void*>(2));
    if (Next(&cq)) {
      call->WritesDone(reinterpret_cast<void*>(3));
      Next(&cq);
      for (;;) {
        grpc::ByteBuffer b;
        call->Read(&b, reinterpret_cast<void*>(4));
        if (!Next(&cq)) break;
        responses->push_back(FromBuffer(b));
      }
    }
  }
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  return status;
}

int HealthStatus(grpc::Channel* channel, const std::string& service) {
  // HealthCheckRequest{service = 1}; HealthCheckResponse{status = 1 (enum)}.
  std::string req;
  if (!service.empty()) {
    req.push_back(0x0A);
    req.push_back(static_cast<char>(service.size()));
    req += service;
  }
  std::string resp;
  const grpc::Status s = RawUnaryCall(channel, "/grpc.health.v1.Health/Check", req, &resp,
                                      std::chrono::seconds(5));
  if (!s.ok()) return -1;
  if (resp.size() == 2 && resp[0] == 0x08) return resp[1];
  return resp.empty() ? 0 : -1;  // UNKNOWN (0) is encoded as an empty message
}

namespace {

// State and parent pid from /proc/<pid>/stat ("pid (comm) S ppid ...").
bool ReadStat(pid_t pid, char* state, pid_t* ppid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return false;
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return false;
  std::istringstream rest(line.substr(close + 1));
  return static_cast<bool>(rest >> *state >> *ppid);
}

}  // namespace

std::vector<pid_t> ChildPids(pid_t parent) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    char state = 0;
    pid_t ppid = 0;
    if (ReadStat(pid, &state, &ppid) && ppid == parent && state != 'Z') out.push_back(pid);
  }
  return out;
}

bool WaitProcessGone(pid_t pid, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    char state = 0;
    pid_t ppid = 0;
    if (!ReadStat(pid, &state, &ppid) || state == 'Z') return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace strata::testing
