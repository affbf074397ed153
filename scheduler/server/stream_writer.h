// A single thread that runs the gRPC calls writing streamed responses
// (StartWrite, Finish) posted by the engine thread. Every engine step hands
// tokens to hundreds of streams; gRPC may serialize and even send a message
// inline in StartWrite, which would otherwise sit on the step's critical path.
// Tasks run in the order they are posted; the destructor runs the ones still
// queued, then joins.
//
// Batches: between BeginBatch() and EndBatch() on one thread (the engine
// thread, around a step), that thread's posts are collected without the lock
// and handed over together at EndBatch(), so a step that streams to a thousand
// requests takes the lock and wakes the writer once rather than per token.
// Posts from other threads meanwhile go straight to the queue. One batching
// thread at a time; a batch still open at destruction runs too.
#pragma once

#include <deque>
#include <functional>
#include <thread>
#include <vector>

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
  void BeginBatch();
  void EndBatch();

 private:
  void Run();
  bool Wakeable() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); }

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::function<void()>> batch_;  // the batching thread's, between Begin/EndBatch
  std::thread thread_;
};

}  // namespace strata::serving
