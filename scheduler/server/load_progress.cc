#include "scheduler/server/load_progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>

#include "spdlog/spdlog.h"

namespace strata::serving {

int64_t ResidentBytes() {
  std::ifstream in("/proc/self/statm");
  int64_t size = 0, resident = 0;
  if (!(in >> size >> resident)) return 0;
  return resident * sysconf(_SC_PAGESIZE);
}

int64_t AvailableMemoryBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  int64_t kib = 0;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

LoadProgress::LoadProgress(int64_t expected_bytes)
    : tty_(isatty(STDERR_FILENO) == 1),
      start_(absl::Now()),
      rss0_(ResidentBytes()),
      expected_(std::max<int64_t>(expected_bytes, 1)) {
  thread_ = std::thread([this] { Run(); });
}

LoadProgress::~LoadProgress() { Done(); }

void LoadProgress::Phase(const std::string& name) {
  {
    absl::MutexLock lock(&mu_);
    phase_ = name;
  }
  if (!tty_) spdlog::info("loading: {}", name);
}

void LoadProgress::Done(bool ok) {
  if (done_.HasBeenNotified()) return;
  done_.Notify();
  thread_.join();
  Report(true, ok);
}

void LoadProgress::Run() {
  const absl::Duration interval = tty_ ? absl::Milliseconds(100) : absl::Seconds(2);
  while (!done_.WaitForNotificationWithTimeout(interval)) Report(false);
}

void LoadProgress::Report(bool final, bool ok) {
  if (final && !ok) {
    std::string phase;
    {
      absl::MutexLock lock(&mu_);
      phase = phase_;
    }
    if (tty_) std::fputs("\n", stderr);
    spdlog::error("loading failed during: {} ({:.1f} s)", phase,
                  absl::ToDoubleSeconds(absl::Now() - start_));
    return;
  }
  const double grown = static_cast<double>(std::max<int64_t>(ResidentBytes() - rss0_, 0));
  // No estimate (the work happens in worker processes): elapsed time only.
  const bool estimate = expected_.load() > 1;
  const double frac =
      final ? 1.0 : estimate ? std::min(0.99, grown / static_cast<double>(expected_.load())) : 0.0;
  const double secs = absl::ToDoubleSeconds(absl::Now() - start_);
  std::string phase;
  {
    absl::MutexLock lock(&mu_);
    phase = final ? "done" : phase_;
  }
  if (!estimate && !final) {
    if (tty_) {
      std::fprintf(stderr, "\rloading: %-12s %6.1f s", phase.c_str(), secs);
      std::fflush(stderr);
    } else {
      spdlog::info("loading: {} ({:.1f} s)", phase, secs);
    }
    return;
  }
  if (tty_) {
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(frac * kWidth);
    std::fprintf(stderr, "\rloading [%s%s] %3d%%  %-12s %6.1f s%s", std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, '.').c_str(), static_cast<int>(frac * 100),
                 phase.c_str(), secs, final ? "\n" : "");
    std::fflush(stderr);
  } else {
    spdlog::info("loading: {:3d}% ({}, {:.0f} MiB, {:.1f} s)", static_cast<int>(frac * 100), phase,
                 grown / (1 << 20), secs);
  }
}

}  // namespace strata::serving
