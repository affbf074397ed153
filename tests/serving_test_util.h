// Helpers for the serving end-to-end tests: run the built `strata` binary as
// a subprocess (own process group, killed with the test), talk to it over
// loopback, and make raw gRPC calls to services without generated stubs
// (health, reflection).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"

namespace strata::testing {

// Path of the built `strata` CLI (compile definition STRATA_CLI_PATH; the
// environment variable STRATA_CLI overrides it).
std::string StrataCli();
// The source tree (compile definition STRATA_SOURCE_ROOT).
std::string StrataSourceDir();

class ServerProcess {
 public:
  ServerProcess() = default;
  ~ServerProcess();  // SIGKILLs the process group if still running
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  // Starts `strata serve --host 127.0.0.1 --port 0 <args>` and waits (up to
  // `timeout`) for its "ready on" line. False if it exited or timed out;
  // log() then says why.
  bool Start(const std::vector<std::string>& args,
             std::chrono::seconds timeout = std::chrono::seconds(90));
  const std::string& address() const { return address_; }
  pid_t pid() const { return pid_; }

  void Signal(int sig) const;
  // Waits for exit; returns the raw wait status, or -1 on timeout.
  int WaitExit(std::chrono::milliseconds timeout);
  // True when no process of the server's process group is left.
  bool ProcessGroupGone() const;
  std::string log() const;  // stdout + stderr so far

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  std::string dir_;  // temp dir with stdout/stderr files
  std::string address_;
};

struct CommandResult {
  int exit_code = -1;  // -1: did not exit normally
  std::string out;     // stdout
  std::string err;     // stderr
};
// Runs a command (argv, no shell) with a timeout; captures its output.
CommandResult RunCommand(const std::vector<std::string>& argv, std::chrono::seconds timeout);

std::shared_ptr<grpc::Channel> LoopbackChannel(const std::string& address);

// A unary call with serialized bytes, e.g. "/grpc.health.v1.Health/Check".
grpc::Status RawUnaryCall(grpc::Channel* channel, const std::string& method,
                          const std::string& request, std::string* response,
                          std::chrono::milliseconds timeout);
// One request / all responses of a bidi-streaming method (reflection).
grpc::Status RawBidiCall(grpc::Channel* channel, const std::string& method,
                         const std::string& request, std::vector<std::string>* responses,
                         std::chrono::milliseconds timeout);

// grpc.health.v1.Health/Check: 1 = SERVING, 2 = NOT_SERVING, -1 = call failed.
int HealthStatus(grpc::Channel* channel, const std::string& service);

std::string MakeTempDir();

// Live child processes of `parent` (from /proc).
std::vector<pid_t> ChildPids(pid_t parent);
// True once `pid` no longer exists (or is a zombie), waiting up to `timeout`.
bool WaitProcessGone(pid_t pid, std::chrono::milliseconds timeout);

}  // namespace strata::testing
