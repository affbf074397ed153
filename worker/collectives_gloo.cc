#include "worker/collectives_gloo.h"

#include <chrono>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gloo/allreduce.h"
#include "gloo/barrier.h"
#include "gloo/broadcast.h"
#include "gloo/common/error.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/prefix_store.h"
#include "gloo/rendezvous/store.h"
#include "gloo/transport/tcp/device.h"

namespace strata {
namespace {

std::chrono::milliseconds ToChrono(absl::Duration d) {
  return std::chrono::milliseconds(absl::ToInt64Milliseconds(d));
}

// gloo::rendezvous::Store over a strata::KvStore. Gloo's interface returns
// void, so failures are thrown as gloo::IoException (caught by the callers in
// this file).
class GlooStoreAdapter final : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(KvStore* store, absl::Duration timeout) : store_(store), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    Throw(store_->Set(key, std::string(data.begin(), data.end())));
  }
  std::vector<char> get(const std::string& key) override {
    absl::StatusOr<std::string> v = store_->Get(key, timeout_);
    Throw(v.status());
    return std::vector<char>(v->begin(), v->end());
  }
  void wait(const std::vector<std::string>& keys) override { Throw(store_->Wait(keys, timeout_)); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    Throw(store_->Wait(keys, absl::Milliseconds(timeout.count())));
  }

 private:
  static void Throw(const absl::Status& s) {
    if (!s.ok()) throw gloo::IoException(std::string(s.ToString()));
  }
  KvStore* store_;
  absl::Duration timeout_;
};

absl::Status FromException(const char* what_op, const std::exception& e) {
  // Gloo throws IoException for broken pairs and timeouts alike; either way
  // the group is unusable.
  return absl::UnavailableError(absl::StrCat("gloo ", what_op, " failed: ", e.what()));
}

class GlooCollectives final : public Collectives {
 public:
  GlooCollectives(std::shared_ptr<gloo::Context> ctx, absl::Duration timeout)
      : ctx_(std::move(ctx)), timeout_(ToChrono(timeout)) {}

  int rank() const override { return ctx_->rank; }
  int world_size() const override { return ctx_->size; }

  absl::Status AllReduceSum(float* data, int64_t n) override {
    if (n == 0) return absl::OkStatus();
    try {
      // Small groups and payloads (every decode step, most prefills): one
      // direct exchange. Gloo's ring needs ~2(N-1) dependent messages, each a
      // thread wake-up, which dominates at these sizes; the exchange needs one
      // round. Everything else: Gloo's ring.
      if (ctx_->size <= kMaxExchangeRanks && n * static_cast<int64_t>(sizeof(float)) <= kMaxExchangeBytes) {
        Exchange(data, n);
        return absl::OkStatus();
      }
      gloo::AllreduceOptions opts(ctx_);
      opts.setOutput(data, static_cast<size_t>(n));
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(
          &gloo::sum<float>));
      opts.setTag(NextTag());
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
    } catch (const std::exception& e) {
      return FromException("allreduce", e);
    }
    return absl::OkStatus();
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    if (root < 0 || root >= ctx_->size) {
      return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root, " of ", ctx_->size, " ranks"));
    }
    if (bytes == 0) return absl::OkStatus();
    try {
      gloo::BroadcastOptions opts(ctx_);
      opts.setOutput(static_cast<uint8_t*>(data), static_cast<size_t>(bytes));
      opts.setRoot(root);
      opts.setTag(NextTag());
      opts.setTimeout(timeout_);
      gloo::broadcast(opts);
    } catch (const std::exception& e) {
      return FromException("broadcast", e);
    }
    return absl::OkStatus();
  }

  absl::Status Barrier() override {
    try {
      gloo::BarrierOptions opts(ctx_);
      opts.setTag(NextTag());
      opts.setTimeout(timeout_);
      gloo::barrier(opts);
    } catch (const std::exception& e) {
      return FromException("barrier", e);
    }
    return absl::OkStatus();
  }

 private:
  // Every rank issues the same sequence of operations, so equal counters give
  // equal tags.
  uint32_t NextTag() { return tag_++; }

  // All-reduce by all-to-all exchange: every rank sends its vector to every
  // other rank, then sums the N vectors in rank order, so every rank computes
  // the same bits. Throws gloo exceptions on failure or timeout.
  void Exchange(float* data, int64_t n) {
    const int size = ctx_->size, me = ctx_->rank;
    const size_t bytes = static_cast<size_t>(n) * sizeof(float);
    const uint64_t slot = (uint64_t{kExchangeSlotPrefix} << 56) | NextTag();
    peers_.resize(size);
    std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> recv(size);
    for (int p = 0; p < size; ++p) {
      if (p == me) continue;
      peers_[p].resize(n);
      recv[p] = ctx_->createUnboundBuffer(peers_[p].data(), bytes);
      recv[p]->recv(p, slot);
    }
    auto send = ctx_->createUnboundBuffer(data, bytes);
    for (int p = 0; p < size; ++p) {
      if (p != me) send->send(p, slot);
    }
    for (int p = 0; p < size; ++p) {
      if (p != me && !recv[p]->waitRecv(timeout_)) throw gloo::IoException("exchange receive aborted");
    }
    for (int p = 0; p < size; ++p) {
      if (p != me && !send->waitSend(timeout_)) throw gloo::IoException("exchange send aborted");
    }
    // Rank order: (((x0 + x1) + x2) + ...), whatever this rank is.
    sum_.resize(n);
    const float* first = me == 0 ? data : peers_[0].data();
    std::copy(first, first + n, sum_.begin());
    for (int p = 1; p < size; ++p) {
      const float* x = p == me ? data : peers_[p].data();
      for (int64_t i = 0; i < n; ++i) sum_[i] += x[i];
    }
    std::copy(sum_.begin(), sum_.end(), data);
  }

  static constexpr int kMaxExchangeRanks = 4;
  static constexpr int64_t kMaxExchangeBytes = int64_t{4} << 20;
  static constexpr uint8_t kExchangeSlotPrefix = 0x5A;  // distinct from Gloo's own slot prefixes
  std::vector<std::vector<float>> peers_;
  std::vector<float> sum_;

  std::shared_ptr<gloo::Context> ctx_;
  std::chrono::milliseconds timeout_;
  uint32_t tag_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Collectives>> CreateGlooCollectives(const CollectivesOptions& options,
                                                                   KvStore* store) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", options.rank, " outside world size ", options.world_size));
  }
  if (options.world_size == 1) return MakeSingleRankCollectives();
  try {
    gloo::transport::tcp::attr attr(options.gloo_hostname.c_str());
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(options.rank, options.world_size);
    ctx->setTimeout(ToChrono(options.timeout));
    GlooStoreAdapter adapter(store, options.timeout);
    gloo::rendezvous::PrefixStore prefixed(options.key_prefix + "gloo", adapter);
    ctx->connectFullMesh(prefixed, device);
    return std::unique_ptr<Collectives>(new GlooCollectives(std::move(ctx), options.timeout));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("gloo rendezvous of rank ", options.rank, "/",
                                               options.world_size, " via ", options.gloo_hostname,
                                               " failed: ", e.what()));
  }
}

}  // namespace strata
