#include "scheduler/server/stream_writer.h"

#include <utility>

namespace strata::serving {

StreamWriter::StreamWriter() : thread_([this] { Run(); }) {}

namespace {
// The writer whose batch this thread is filling, if any.
thread_local const StreamWriter* tls_batching = nullptr;
}  // namespace

StreamWriter::~StreamWriter() {
  {
    absl::MutexLock lock(&mu_);
    // A batch left open (its thread gone without EndBatch) still runs.
    for (std::function<void()>& task : batch_) queue_.push_back(std::move(task));
    batch_.clear();
    stop_ = true;
  }
  if (tls_batching == this) tls_batching = nullptr;
  thread_.join();
}

void StreamWriter::Post(std::function<void()> task) {
  if (tls_batching == this) {
    batch_.push_back(std::move(task));
    return;
  }
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(task));
}

void StreamWriter::BeginBatch() { tls_batching = this; }

void StreamWriter::EndBatch() {
  tls_batching = nullptr;
  if (batch_.empty()) return;
  {
    absl::MutexLock lock(&mu_);
    for (std::function<void()>& task : batch_) queue_.push_back(std::move(task));
  }
  batch_.clear();
}

void StreamWriter::Run() {
  for (;;) {
    std::deque<std::function<void()>> batch;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &StreamWriter::Wakeable));
      if (queue_.empty()) return;  // stopping, nothing left
      batch.swap(queue_);
    }
    for (std::function<void()>& task : batch) task();
  }
}

}  // namespace strata::serving
