// One pool of KV cache blocks (GPU or CPU swap space): refcounts, the free
// list, and for a GPU pool with prefix caching the hash index and the LRU list
// of cached blocks. Host-only bookkeeping: no block contents live here.
//
// Block state machine (one state per block at any time):
//
//   free    refcount 0, no hash, on the free list
//   active  refcount > 0: referenced by >= 1 sequence block table
//           (may carry a hash: then it is also findable by prefix lookups)
//   cached  refcount 0, has a hash, on the LRU list: content still valid,
//           reusable by a prefix hit until evicted
//   pinned  refcount 0, but it is the source of a copy-on-write in the step
//           being planned; it may not be handed out again before the worker
//           has executed that copy, so it waits until EndStep()
//
// Transitions (each is commented at the line that makes it):
//   free -> active             Allocate()
//   cached -> free (evicted) -> active   Allocate() with an empty free list
//   cached -> active           Acquire() on a prefix hit
//   pinned -> active           Acquire() on a prefix hit of a pinned block
//   active -> active           Acquire() (refcount + 1) / release (refcount - 1 > 0)
//   active -> free             last reference released, no hash
//   active -> cached           last reference released, hashed
//   active -> pinned           last reference released while a copy source
//   pinned -> free / cached    EndStep()
//
// Threading: a pool is owned by its BlockManager and touched only by the
// thread that owns that (the engine thread). No locking.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "runtime/ids.h"
#include "runtime/prefix_hash.h"

namespace strata {

enum class Device : uint8_t { kGpu = 0, kCpu = 1 };
const char* DeviceName(Device d);

enum class BlockState : uint8_t { kFree = 0, kActive = 1, kCached = 2, kPinned = 3 };
const char* BlockStateName(BlockState s);

// Test-only fault injection: deliberate accounting bugs that the invariant
// checks must catch. Never set outside tests. Once a fault has fired, a later
// release of a block that is not active (the knock-on double free) is counted
// and reported by CheckInvariants instead of CHECK-failing.
struct BlockFault {
  enum class Kind : uint8_t {
    kNone = 0,
    kSkipDecref,   // one release forgets to decrement (a leak)
    kExtraDecref,  // one release of a shared block decrements twice
  };
  Kind kind = Kind::kNone;
  int64_t at_release = 0;  // fires at the first eligible release with index >= this
};

class BlockPool;

// Move-only handle owning one reference to one block. Destroying (or
// Reset()ing) it releases the reference. Copy a reference with
// BlockPool::Acquire(ref.id()).
class BlockRef {
 public:
  BlockRef() = default;
  BlockRef(const BlockRef&) = delete;
  BlockRef& operator=(const BlockRef&) = delete;
  BlockRef(BlockRef&& o) noexcept : pool_(o.pool_), id_(o.id_) { o.pool_ = nullptr; }
  BlockRef& operator=(BlockRef&& o) noexcept;
  ~BlockRef() { Reset(); }

  BlockId id() const { return id_; }
  bool valid() const { return pool_ != nullptr; }
  const BlockPool* pool() const { return pool_; }
  void Reset();

 private:
  friend class BlockPool;
  BlockRef(BlockPool* pool, BlockId id) : pool_(pool), id_(id) {}
  BlockPool* pool_ = nullptr;
  BlockId id_;
};

class BlockPool {
 public:
  BlockPool(Device device, int32_t num_blocks, int32_t block_size, BlockFault fault = {});
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  Device device() const { return device_; }
  int32_t num_blocks() const { return static_cast<int32_t>(refcount_.size()); }
  int32_t block_size() const { return block_size_; }
  int32_t num_free() const { return static_cast<int32_t>(free_list_.size()); }
  int32_t num_cached() const { return num_cached_; }
  int32_t num_pinned() const { return static_cast<int32_t>(pinned_.size()); }
  // Blocks Allocate() can hand out now: free plus evictable cached ones.
  int32_t num_allocatable() const { return num_free() + num_cached_; }
  // Blocks with refcount > 0.
  int32_t num_active() const { return num_blocks() - num_allocatable() - num_pinned(); }
  int64_t num_evictions() const { return num_evictions_; }

  BlockState state(BlockId b) const { return state_[Index(b)]; }
  int32_t refcount(BlockId b) const { return refcount_[Index(b)]; }
  bool hashed(BlockId b) const { return hashed_[Index(b)]; }
  BlockHash hash(BlockId b) const { return hash_[Index(b)]; }  // valid when hashed()

  // A fresh block with refcount 1. CHECKs num_allocatable() > 0: callers
  // check capacity first (allocation failure is a Status one level up).
  BlockRef Allocate();
  // One more reference to a block that is active, cached or pinned.
  BlockRef Acquire(BlockId b);

  // --- prefix index (GPU pool only) ---
  // The block registered under `hash` whose stored parent hash and tokens
  // equal the arguments, else an invalid id. Any state but free.
  BlockId Lookup(BlockHash hash, BlockHash parent, std::span<const int32_t> tokens) const;
  // Registers an active block under `hash`. Returns false (and changes
  // nothing) if another block already holds that hash or `b` is hashed.
  bool Register(BlockId b, BlockHash hash, BlockHash parent, std::span<const int32_t> tokens);
  // Drops the hash of an active block (it is about to be overwritten).
  void Unregister(BlockId b);
  int32_t num_hashed() const { return static_cast<int32_t>(index_.size()); }

  // --- step scoping of copy sources ---
  // Marks an active block as the source of a copy in the current step.
  void PinAsCopySource(BlockId b);
  // The step's plan is complete: pinned blocks become free or cached.
  void EndStep();

  // Checks every structure against the others and `expected_refs[b]`, the
  // number of block-table entries that reference block b (computed by the
  // owner). Errors name the block and the broken rule.
  absl::Status CheckInvariants(std::span<const int32_t> expected_refs) const;

 private:
  friend class BlockRef;
  static constexpr int32_t kNil = -1;
  int32_t Index(BlockId b) const;
  void Release(BlockId b);
  void LruPushBack(int32_t i);
  void LruRemove(int32_t i);
  void ToIdle(int32_t i);  // refcount reached 0 outside the pinned case

  Device device_;
  int32_t block_size_;
  BlockFault fault_;
  bool fault_fired_ = false;
  int64_t num_releases_ = 0;
  // Only after an injected fault: releases of non-active blocks are counted
  // here (and reported by CheckInvariants) instead of CHECK-failing, so that a
  // test can watch the checks catch the damage.
  int64_t invalid_releases_ = 0;
  uint32_t step_epoch_ = 1;

  std::vector<int32_t> refcount_;
  std::vector<BlockState> state_;
  std::vector<uint8_t> hashed_;
  std::vector<BlockHash> hash_;          // valid when hashed_
  std::vector<BlockHash> parent_hash_;   // valid when hashed_
  std::vector<int32_t> tokens_;          // [num_blocks][block_size], valid when hashed_
  std::vector<uint32_t> pin_epoch_;      // == step_epoch_ while a copy source this step
  std::vector<int32_t> free_list_;       // stack
  std::vector<int32_t> pinned_;
  // Intrusive doubly-linked LRU over cached blocks; head is evicted first.
  std::vector<int32_t> lru_prev_, lru_next_;
  int32_t lru_head_ = kNil, lru_tail_ = kNil, num_cached_ = 0;
  int64_t num_evictions_ = 0;
  absl::flat_hash_map<BlockHash, int32_t> index_;
};

}  // namespace strata
