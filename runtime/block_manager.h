// Block manager: per-sequence block tables over a GPU pool and a CPU swap
// pool, prefix caching, copy-on-write, swapping. Pure host code.
//
// Concepts (see scheduler/DESIGN.md, "Block manager"):
//  * A block holds `block_size` consecutive token positions of one sequence in
//    every layer. A sequence's block table lists its blocks in position order;
//    position p lives in table[p / block_size] at offset p % block_size.
//  * Tables own their blocks through BlockRef handles (refcounts). Several
//    tables may share a block (prefix hit, Fork()); a shared block is never
//    written: appending into it first copies it (copy-on-write).
//  * Full blocks whose tokens are computed get a chain hash (prefix_hash.h)
//    and enter the prefix index; when no table holds them any more they stay
//    cached (LRU) and a later sequence with the same prefix reuses them.
//  * A table lives on the GPU (running) or on the CPU (swapped out).
//
// Block-level states and transitions are documented in block_pool.h. This
// class adds the sequence-level ones:
//   (none) -> gpu table        Admit()
//   gpu table -> cpu table     SwapOut(): every block copied GPU->CPU
//   cpu table -> gpu table     SwapIn(): blocks copied back or re-found cached
//   any table -> (none)        Free()
//
// Every operation that allocates is all-or-nothing: it checks capacity first
// and returns RESOURCE_EXHAUSTED (retryable once blocks are freed) without
// changing anything. Misuse (unknown or wrong-state sequence) is a bug and
// CHECK-fails. Threading: owned by the engine thread; no locking.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "runtime/block_pool.h"
#include "runtime/ids.h"
#include "runtime/prefix_hash.h"

namespace strata {

struct BlockManagerOptions {
  int32_t num_gpu_blocks = 0;
  int32_t num_cpu_blocks = 0;
  int32_t block_size = 16;
  bool enable_prefix_caching = true;
  BlockHash hash_seed = 0;      // PrefixHashSeed(model id, kv format)
  int64_t bytes_per_block = 0;  // KvBytesPerBlock(); only for the swap byte counters
  BlockFault fault;             // test-only accounting bugs
};

// One (src, dst) block pair for the worker: a swap (GPU->CPU or CPU->GPU) or
// a GPU->GPU copy.
struct BlockCopy {
  BlockId src;
  BlockId dst;
  friend bool operator==(const BlockCopy&, const BlockCopy&) = default;
};

// Result of MatchPrefix: the leading full blocks of a token sequence found in
// the prefix cache.
struct PrefixMatch {
  std::vector<BlockId> blocks;
  std::vector<BlockHash> hashes;
  int32_t num_cached_hits = 0;  // hits on refcount-0 blocks (they leave the allocatable pool)
  int32_t num_tokens() const { return static_cast<int32_t>(blocks.size()) * block_size; }
  int32_t block_size = 0;
};

struct BlockManagerStats {
  int32_t gpu_total = 0, gpu_used = 0, gpu_cached = 0, gpu_free = 0;
  int32_t cpu_total = 0, cpu_used = 0;
  int64_t prefix_queried_tokens = 0;  // tokens offered to the prefix cache on admission
  int64_t prefix_hit_tokens = 0;      // of those, found cached
  int64_t blocks_swapped_out = 0, blocks_swapped_in = 0;
  int64_t bytes_swapped_out = 0, bytes_swapped_in = 0;
  int64_t cow_copies = 0;
  int64_t evictions = 0;
};

class BlockManager {
 public:
  explicit BlockManager(const BlockManagerOptions& options);
  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;

  const BlockManagerOptions& options() const { return options_; }
  int32_t block_size() const { return options_.block_size; }
  int32_t BlocksForTokens(int64_t n) const {
    return static_cast<int32_t>((n + options_.block_size - 1) / options_.block_size);
  }
  const BlockPool& gpu() const { return gpu_; }
  const BlockPool& cpu() const { return cpu_; }

  // --- admission ---------------------------------------------------------
  // Leading full blocks of `tokens` present in the prefix cache (none when
  // caching is off). No side effects.
  PrefixMatch MatchPrefix(std::span<const int32_t> tokens) const;
  // GPU blocks Admit()+AppendSlots(seq, write_start, end) would take from
  // the allocatable pool (cached hits included: they stop being evictable).
  int32_t AdmissionCost(const PrefixMatch& match, int32_t write_start, int32_t end) const;
  // Creates the GPU table of `seq` holding the matched blocks (cached ->
  // active). `queried_tokens` feeds the hit-rate counters.
  void Admit(SeqId seq, const PrefixMatch& match, int32_t queried_tokens);

  // --- running sequences -------------------------------------------------
  // Blocks AppendSlots(seq, write_start, end) would allocate.
  int32_t AppendCost(SeqId seq, int32_t write_start, int32_t end) const;
  // Makes positions [write_start, end) writable: copies-on-write the shared
  // blocks that the write touches (pairs appended to `copies`) and appends
  // blocks up to BlocksForTokens(end). RESOURCE_EXHAUSTED if the pool lacks
  // AppendCost() blocks (nothing changed).
  absl::Status AppendSlots(SeqId seq, int32_t write_start, int32_t end,
                           std::vector<BlockCopy>* copies);
  // Positions [0, num_computed) of `tokens` now hold computed KV: full blocks
  // get their chain hash and enter the prefix index.
  void CommitComputed(SeqId seq, std::span<const int32_t> tokens, int32_t num_computed);
  // `child` gets a GPU table sharing every block of `parent` (refcount + 1),
  // so either appending into the shared last block copies it first.
  // FAILED_PRECONDITION if parent is swapped out.
  absl::Status Fork(SeqId parent, SeqId child);
  // Releases every block of the table (any device) and forgets `seq`.
  void Free(SeqId seq);

  // --- swapping ------------------------------------------------------------
  bool CanSwapOut(SeqId seq) const;
  // GPU -> CPU: one CPU block per table entry; (gpu, cpu) pairs appended to
  // `pairs`; the GPU references are released (shared ones stay with their
  // other holders, hashed ones become cached). RESOURCE_EXHAUSTED if the CPU
  // pool is short.
  absl::Status SwapOut(SeqId seq, std::vector<BlockCopy>* pairs);
  // GPU blocks SwapIn() would take from the allocatable pool.
  int32_t SwapInCost(SeqId seq, std::span<const int32_t> tokens) const;
  // CPU -> GPU: full blocks still cached on the GPU are re-acquired without a
  // copy; the others get fresh blocks and (cpu, gpu) pairs in `pairs`.
  absl::Status SwapIn(SeqId seq, std::span<const int32_t> tokens, std::vector<BlockCopy>* pairs);

  // --- step scope ----------------------------------------------------------
  // Called once a step's plan is complete (copy sources may be reused).
  void EndStep() { gpu_.EndStep(); }

  // --- queries -------------------------------------------------------------
  bool HasSeq(SeqId seq) const { return tables_.contains(seq); }
  Device SeqDevice(SeqId seq) const;
  int32_t NumSeqBlocks(SeqId seq) const;
  // Appends the table's block ids to `out`.
  void AppendBlockIds(SeqId seq, std::vector<BlockId>* out) const;
  std::vector<BlockId> BlockIds(SeqId seq) const;
  int32_t num_seqs() const { return static_cast<int32_t>(tables_.size()); }
  BlockManagerStats Stats() const;

  // Every table reference is counted, pools checked against the counts, each
  // table is on one device with no duplicate blocks and a hash chain that
  // matches its blocks. Call between steps (no pinned blocks).
  absl::Status CheckInvariants() const;

 private:
  struct SeqTable {
    Device device = Device::kGpu;
    std::vector<BlockRef> blocks;
    std::vector<BlockHash> hashes;  // chain hashes of the leading full computed blocks
    int32_t commit_cursor = 0;      // blocks [0, cursor) were offered to the index
  };
  SeqTable& Table(SeqId seq);
  const SeqTable& Table(SeqId seq) const;
  BlockHash ParentHash(const SeqTable& t, size_t i) const {
    return i == 0 ? options_.hash_seed : t.hashes[i - 1];
  }
  // Block `i` of a swapped table is still cached on the GPU.
  BlockId FindOnGpu(const SeqTable& t, size_t i, std::span<const int32_t> tokens) const;
  void ForgetHashesFrom(SeqTable& t, size_t i);

  BlockManagerOptions options_;
  BlockPool gpu_;
  BlockPool cpu_;
  // Declared after the pools: tables release their references first.
  absl::flat_hash_map<SeqId, SeqTable> tables_;
  int64_t prefix_queried_tokens_ = 0, prefix_hit_tokens_ = 0;
  int64_t blocks_swapped_out_ = 0, blocks_swapped_in_ = 0, cow_copies_ = 0;
};

}  // namespace strata
