#include "runtime/check.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace strata {
namespace {
std::atomic<CheckFailureHook> g_hook{nullptr};
}  // namespace

void SetCheckFailureHook(CheckFailureHook hook) { g_hook.store(hook); }

namespace internal {

CheckFailure::CheckFailure(const char* file, int line, const char* condition) {
  stream_ << file << ":" << line << ": check failed: " << condition << " ";
}

CheckFailure::~CheckFailure() {
  const std::string message = stream_.str();
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  if (CheckFailureHook hook = g_hook.load()) hook(message);
  std::abort();
}

}  // namespace internal
}  // namespace strata
