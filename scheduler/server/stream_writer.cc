#include "scheduler/server/stream_writer.h"

#include <utility>

namespace strata::serving {

StreamWriter::StreamWriter() : thread_([this] { Run(); }) {}

StreamWriter::~StreamWriter() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void StreamWriter::Post(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(task));
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
