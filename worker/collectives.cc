#include "worker/collectives.h"

#include "absl/strings/str_cat.h"

namespace strata {

absl::Status InMemoryKvStore::Set(const std::string& key, const std::string& value) {
  absl::MutexLock lock(&mu_);
  values_[key] = value;
  return absl::OkStatus();
}

absl::StatusOr<std::string> InMemoryKvStore::Get(const std::string& key, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto present = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return values_.count(key) > 0; };
  if (!mu_.AwaitWithTimeout(absl::Condition(&present), timeout)) {
    return absl::DeadlineExceededError(absl::StrCat("rendezvous key ", key, " did not appear within ",
                                                    absl::FormatDuration(timeout)));
  }
  return values_.at(key);
}

absl::Status InMemoryKvStore::Wait(const std::vector<std::string>& keys, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto present = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    for (const auto& k : keys) {
      if (values_.count(k) == 0) return false;
    }
    return true;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&present), timeout)) {
    return absl::DeadlineExceededError(absl::StrCat("rendezvous keys did not appear within ",
                                                    absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

namespace {

class SingleRank final : public Collectives {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  absl::Status AllReduceSum(float*, int64_t) override { return absl::OkStatus(); }
  absl::Status Broadcast(void*, int64_t, int root) override {
    if (root != 0) return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root, " of 1 rank"));
    return absl::OkStatus();
  }
  absl::Status Barrier() override { return absl::OkStatus(); }
};

}  // namespace

std::unique_ptr<Collectives> MakeSingleRankCollectives() { return std::make_unique<SingleRank>(); }

}  // namespace strata
