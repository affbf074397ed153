#include "runtime/block_pool.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "runtime/check.h"

namespace strata {

const char* DeviceName(Device d) { return d == Device::kGpu ? "gpu" : "cpu"; }

const char* BlockStateName(BlockState s) {
  switch (s) {
    case BlockState::kFree: return "free";
    case BlockState::kActive: return "active";
    case BlockState::kCached: return "cached";
    case BlockState::kPinned: return "pinned";
  }
  return "?";
}

BlockRef& BlockRef::operator=(BlockRef&& o) noexcept {
  if (this != &o) {
    Reset();
    pool_ = o.pool_;
    id_ = o.id_;
    o.pool_ = nullptr;
  }
  return *this;
}

void BlockRef::Reset() {
  if (pool_ != nullptr) {
    BlockPool* pool = pool_;
    pool_ = nullptr;
    pool->Release(id_);
  }
}

BlockPool::BlockPool(Device device, int32_t num_blocks, int32_t block_size, BlockFault fault)
    : device_(device), block_size_(block_size), fault_(fault) {
  STRATA_CHECK_GE(num_blocks, 0);
  STRATA_CHECK_GT(block_size, 0);
  const size_t n = static_cast<size_t>(num_blocks);
  refcount_.assign(n, 0);
  state_.assign(n, BlockState::kFree);
  hashed_.assign(n, 0);
  hash_.assign(n, 0);
  parent_hash_.assign(n, 0);
  pin_epoch_.assign(n, 0);
  lru_prev_.assign(n, kNil);
  lru_next_.assign(n, kNil);
  if (device == Device::kGpu) tokens_.assign(n * static_cast<size_t>(block_size), 0);
  // Pop order hands out low ids first, which keeps tests readable.
  free_list_.resize(n);
  std::iota(free_list_.rbegin(), free_list_.rend(), 0);
}

int32_t BlockPool::Index(BlockId b) const {
  STRATA_DCHECK(b.valid() && b.value() < num_blocks()) << "block " << b << " out of range";
  return b.value();
}

BlockRef BlockPool::Allocate() {
  STRATA_CHECK_GT(num_allocatable(), 0) << "Allocate() on an exhausted " << DeviceName(device_)
                                        << " pool; callers must check capacity first";
  int32_t i;
  if (!free_list_.empty()) {
    i = free_list_.back();
    free_list_.pop_back();
  } else {
    // cached -> free (evicted): the least recently released cached block.
    i = lru_head_;
    LruRemove(i);
    index_.erase(hash_[i]);
    hashed_[i] = 0;
    state_[i] = BlockState::kFree;
    ++num_evictions_;
  }
  STRATA_DCHECK(refcount_[i] == 0 && state_[i] == BlockState::kFree);
  // free -> active
  state_[i] = BlockState::kActive;
  refcount_[i] = 1;
  return BlockRef(this, BlockId(i));
}

BlockRef BlockPool::Acquire(BlockId b) {
  const int32_t i = Index(b);
  switch (state_[i]) {
    case BlockState::kActive:
      // active -> active (one more sharer)
      ++refcount_[i];
      break;
    case BlockState::kCached:
      // cached -> active (prefix hit)
      LruRemove(i);
      state_[i] = BlockState::kActive;
      refcount_[i] = 1;
      break;
    case BlockState::kPinned:
      // pinned -> active (prefix hit on a block that is a copy source this step)
      pinned_.erase(std::find(pinned_.begin(), pinned_.end(), i));
      state_[i] = BlockState::kActive;
      refcount_[i] = 1;
      break;
    case BlockState::kFree:
      STRATA_CHECK(false) << "Acquire() of free " << DeviceName(device_) << " block " << b;
  }
  return BlockRef(this, b);
}

void BlockPool::Release(BlockId b) {
  const int32_t i = Index(b);
  if (fault_fired_ && (state_[i] != BlockState::kActive || refcount_[i] <= 0)) {
    ++invalid_releases_;
    return;
  }
  STRATA_CHECK(state_[i] == BlockState::kActive && refcount_[i] > 0)
      << "release of " << DeviceName(device_) << " block " << b << " in state "
      << BlockStateName(state_[i]) << " refcount " << refcount_[i] << " (double free)";
  int32_t dec = 1;
  if (fault_.kind != BlockFault::Kind::kNone && num_releases_ >= fault_.at_release) {
    if (fault_.kind == BlockFault::Kind::kSkipDecref) {
      dec = 0;
      fault_.kind = BlockFault::Kind::kNone;
      fault_fired_ = true;
    } else if (refcount_[i] >= 2) {  // kExtraDecref, only where it cannot go negative
      dec = 2;
      fault_.kind = BlockFault::Kind::kNone;
      fault_fired_ = true;
    }
  }
  ++num_releases_;
  refcount_[i] -= dec;
  if (refcount_[i] > 0) return;  // active -> active (one sharer left)
  if (pin_epoch_[i] == step_epoch_) {
    // active -> pinned: a copy reads this block in the step being planned.
    state_[i] = BlockState::kPinned;
    pinned_.push_back(i);
    return;
  }
  ToIdle(i);
}

void BlockPool::ToIdle(int32_t i) {
  if (hashed_[i]) {
    // active -> cached (or pinned -> cached): reusable until evicted.
    state_[i] = BlockState::kCached;
    LruPushBack(i);
  } else {
    // active -> free (or pinned -> free)
    state_[i] = BlockState::kFree;
    free_list_.push_back(i);
  }
}

void BlockPool::LruPushBack(int32_t i) {
  lru_prev_[i] = lru_tail_;
  lru_next_[i] = kNil;
  if (lru_tail_ != kNil) lru_next_[lru_tail_] = i;
  else lru_head_ = i;
  lru_tail_ = i;
  ++num_cached_;
}

void BlockPool::LruRemove(int32_t i) {
  const int32_t p = lru_prev_[i], n = lru_next_[i];
  if (p != kNil) lru_next_[p] = n;
  else lru_head_ = n;
  if (n != kNil) lru_prev_[n] = p;
  else lru_tail_ = p;
  lru_prev_[i] = lru_next_[i] = kNil;
  --num_cached_;
}

BlockId BlockPool::Lookup(BlockHash hash, BlockHash parent, std::span<const int32_t> tokens) const {
  const auto it = index_.find(hash);
  if (it == index_.end()) return BlockId();
  const int32_t i = it->second;
  if (parent_hash_[i] != parent || tokens.size() != static_cast<size_t>(block_size_) ||
      !std::equal(tokens.begin(), tokens.end(), tokens_.begin() + int64_t{i} * block_size_)) {
    return BlockId();  // a 64-bit collision: treat as a miss
  }
  return BlockId(i);
}

bool BlockPool::Register(BlockId b, BlockHash hash, BlockHash parent,
                         std::span<const int32_t> tokens) {
  const int32_t i = Index(b);
  STRATA_CHECK(device_ == Device::kGpu) << "prefix index exists only on the GPU pool";
  STRATA_CHECK(state_[i] == BlockState::kActive) << "Register() of a non-active block " << b;
  STRATA_CHECK_EQ(tokens.size(), static_cast<size_t>(block_size_));
  if (hashed_[i] || index_.contains(hash)) return false;
  index_.emplace(hash, i);
  hashed_[i] = 1;
  hash_[i] = hash;
  parent_hash_[i] = parent;
  std::copy(tokens.begin(), tokens.end(), tokens_.begin() + int64_t{i} * block_size_);
  return true;
}

void BlockPool::Unregister(BlockId b) {
  const int32_t i = Index(b);
  STRATA_CHECK(state_[i] == BlockState::kActive && hashed_[i]) << "Unregister() of block " << b;
  index_.erase(hash_[i]);
  hashed_[i] = 0;
}

void BlockPool::PinAsCopySource(BlockId b) {
  const int32_t i = Index(b);
  STRATA_CHECK(state_[i] == BlockState::kActive) << "copy source " << b << " is not active";
  pin_epoch_[i] = step_epoch_;
}

void BlockPool::EndStep() {
  for (const int32_t i : pinned_) ToIdle(i);  // pinned -> free / cached
  pinned_.clear();
  ++step_epoch_;
}

absl::Status BlockPool::CheckInvariants(std::span<const int32_t> expected_refs) const {
  const int32_t n = num_blocks();
  const char* dev = DeviceName(device_);
  if (expected_refs.size() != static_cast<size_t>(n)) {
    return absl::InternalError("expected_refs has the wrong size");
  }
  if (invalid_releases_ > 0) {
    return absl::InternalError(absl::StrCat(dev, " pool saw ", invalid_releases_,
                                            " release(s) of a block that was not active (double free)"));
  }
  std::vector<uint8_t> on_free(n, 0), on_lru(n, 0), on_pinned(n, 0);
  for (const int32_t i : free_list_) {
    if (i < 0 || i >= n) return absl::InternalError(absl::StrCat(dev, " free list holds ", i));
    if (on_free[i]++) {
      return absl::InternalError(absl::StrCat(dev, " block ", i, " is on the free list twice (double free)"));
    }
  }
  int32_t lru_count = 0;
  for (int32_t i = lru_head_, prev = kNil; i != kNil; prev = i, i = lru_next_[i]) {
    if (lru_prev_[i] != prev) return absl::InternalError(absl::StrCat(dev, " LRU links broken at ", i));
    if (on_lru[i]++ || ++lru_count > n) {
      return absl::InternalError(absl::StrCat(dev, " LRU list has a cycle at ", i));
    }
  }
  if (lru_count != num_cached_) {
    return absl::InternalError(absl::StrCat(dev, " LRU holds ", lru_count, " blocks, counter says ", num_cached_));
  }
  for (const int32_t i : pinned_) {
    if (on_pinned[i]++) return absl::InternalError(absl::StrCat(dev, " block ", i, " pinned twice"));
  }
  int32_t hashed_count = 0;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t rc = refcount_[i];
    if (rc != expected_refs[i]) {
      return absl::InternalError(absl::StrCat(
          dev, " block ", i, " (", BlockStateName(state_[i]), ") has refcount ", rc, " but ",
          expected_refs[i], " block-table reference(s): ",
          rc > expected_refs[i] ? "leaked/orphaned reference" : "freed while still referenced"));
    }
    const int memberships = on_free[i] + on_lru[i] + on_pinned[i];
    bool ok = true;
    switch (state_[i]) {
      case BlockState::kFree: ok = rc == 0 && !hashed_[i] && on_free[i] && memberships == 1; break;
      case BlockState::kActive: ok = rc > 0 && memberships == 0; break;
      case BlockState::kCached: ok = rc == 0 && hashed_[i] && on_lru[i] && memberships == 1; break;
      case BlockState::kPinned: ok = rc == 0 && on_pinned[i] && memberships == 1; break;
    }
    if (!ok) {
      return absl::InternalError(absl::StrCat(
          dev, " block ", i, " in state ", BlockStateName(state_[i]), " has refcount ", rc,
          ", hashed ", int{hashed_[i]}, ", on free list ", int{on_free[i]}, ", on LRU ",
          int{on_lru[i]}, ", pinned ", int{on_pinned[i]}));
    }
    if (hashed_[i]) {
      ++hashed_count;
      const auto it = index_.find(hash_[i]);
      if (it == index_.end() || it->second != i) {
        return absl::InternalError(absl::StrCat(dev, " hashed block ", i, " missing from the index"));
      }
    }
  }
  if (hashed_count != static_cast<int32_t>(index_.size())) {
    return absl::InternalError(absl::StrCat(dev, " prefix index has ", index_.size(),
                                            " entries for ", hashed_count, " hashed blocks"));
  }
  return absl::OkStatus();
}

}  // namespace strata
