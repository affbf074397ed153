// Model-loading progress on stderr: a bar redrawn in place on a terminal,
// a log line every few seconds otherwise (logs, CI, systemd).
//
// The loaders report no progress of their own, so progress is estimated
// from the growth of this process's resident memory against the bytes the
// load is expected to touch (mapped checkpoint pages, host weights, the KV
// pool). It is an estimate: it is capped at 99% until Done(). Without an
// expected size (loading happens in worker processes) only the step and the
// elapsed time are shown.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace strata::serving {

class LoadProgress {
 public:
  explicit LoadProgress(int64_t expected_bytes);
  ~LoadProgress();  // Done()
  // Names the current step ("weights", "KV cache", ...).
  void Phase(const std::string& name);
  // Adds to the expected bytes once a later step's size is known.
  void Expect(int64_t more_bytes) { expected_.fetch_add(more_bytes); }
  // Prints the final line (100%, or "failed") and stops the reporter.
  void Done(bool ok = true);

 private:
  void Run();
  void Report(bool final, bool ok = true);

  const bool tty_;
  const absl::Time start_;
  const int64_t rss0_;
  std::atomic<int64_t> expected_;
  absl::Mutex mu_;
  std::string phase_ ABSL_GUARDED_BY(mu_);
  absl::Notification done_;
  std::thread thread_;
};

// Resident set size of this process in bytes (0 if unknown).
int64_t ResidentBytes();
// MemAvailable from /proc/meminfo in bytes (0 if unknown).
int64_t AvailableMemoryBytes();

}  // namespace strata::serving
