// A single thread that runs the gRPC calls writing streamed responses
// (StartWrite, Finish) posted by the engine thread. Every engine step hands
// tokens to hundreds of streams; gRPC may serialize and even send a message
// inline in StartWrite, which would otherwise sit on the step's critical path.
// Tasks run in the order they are posted; the destructor runs the ones still
// queued, then joins.
#pragma once

#include <deque>
#include <functional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace strata::serving {

class StreamWriter {
 public:
  StreamWriter();
  ~StreamWriter();
  StreamWriter(const StreamWriter&) = delete;
  StreamWriter& operator=(const StreamWriter&) = delete;

  void Post(std::function<void()> task);

 private:
  void Run();
  bool Wakeable() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); }

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace strata::serving
