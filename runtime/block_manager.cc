#include "runtime/block_manager.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "runtime/check.h"

namespace strata {

BlockManager::BlockManager(const BlockManagerOptions& options)
    : options_(options),
      gpu_(Device::kGpu, options.num_gpu_blocks, options.block_size, options.fault),
      cpu_(Device::kCpu, options.num_cpu_blocks, options.block_size, options.fault) {}

BlockManager::SeqTable& BlockManager::Table(SeqId seq) {
  auto it = tables_.find(seq);
  STRATA_CHECK(it != tables_.end()) << "no block table for sequence " << seq;
  return it->second;
}

const BlockManager::SeqTable& BlockManager::Table(SeqId seq) const {
  auto it = tables_.find(seq);
  STRATA_CHECK(it != tables_.end()) << "no block table for sequence " << seq;
  return it->second;
}

Device BlockManager::SeqDevice(SeqId seq) const { return Table(seq).device; }

int32_t BlockManager::NumSeqBlocks(SeqId seq) const {
  return static_cast<int32_t>(Table(seq).blocks.size());
}

void BlockManager::AppendBlockIds(SeqId seq, std::vector<BlockId>* out) const {
  const SeqTable& t = Table(seq);
  out->reserve(out->size() + t.blocks.size());
  for (const BlockRef& r : t.blocks) out->push_back(r.id());
}

std::vector<BlockId> BlockManager::BlockIds(SeqId seq) const {
  std::vector<BlockId> ids;
  AppendBlockIds(seq, &ids);
  return ids;
}

// --- admission ---------------------------------------------------------------

PrefixMatch BlockManager::MatchPrefix(std::span<const int32_t> tokens) const {
  PrefixMatch m;
  m.block_size = options_.block_size;
  if (!options_.enable_prefix_caching) return m;
  const size_t bs = static_cast<size_t>(options_.block_size);
  BlockHash parent = options_.hash_seed;
  for (size_t k = 0; (k + 1) * bs <= tokens.size(); ++k) {
    const auto chunk = tokens.subspan(k * bs, bs);
    const BlockHash h = HashBlockTokens(parent, chunk);
    const BlockId b = gpu_.Lookup(h, parent, chunk);
    if (!b.valid()) break;
    m.blocks.push_back(b);
    m.hashes.push_back(h);
    if (gpu_.state(b) == BlockState::kCached) ++m.num_cached_hits;
    parent = h;
  }
  return m;
}

int32_t BlockManager::AdmissionCost(const PrefixMatch& match, int32_t write_start,
                                    int32_t end) const {
  const int32_t hits = static_cast<int32_t>(match.blocks.size());
  const int32_t need = BlocksForTokens(end);
  int32_t cost = std::max(0, need - hits) + match.num_cached_hits;
  // Writing into a matched block that other tables also hold needs a copy.
  for (int32_t i = write_start / options_.block_size; i < std::min(hits, need); ++i) {
    if (gpu_.refcount(match.blocks[i]) > 0) ++cost;
  }
  return cost;
}

void BlockManager::Admit(SeqId seq, const PrefixMatch& match, int32_t queried_tokens) {
  STRATA_CHECK(!tables_.contains(seq)) << "sequence " << seq << " already has a block table";
  SeqTable& t = tables_[seq];
  t.device = Device::kGpu;
  t.blocks.reserve(match.blocks.size() + 1);
  // cached -> active / active -> active (prefix hit)
  for (const BlockId b : match.blocks) t.blocks.push_back(gpu_.Acquire(b));
  t.hashes = match.hashes;
  t.commit_cursor = static_cast<int32_t>(match.blocks.size());
  prefix_queried_tokens_ += queried_tokens;
  prefix_hit_tokens_ += match.num_tokens();
}

// --- running sequences ---------------------------------------------------------

int32_t BlockManager::AppendCost(SeqId seq, int32_t write_start, int32_t end) const {
  const SeqTable& t = Table(seq);
  STRATA_CHECK(t.device == Device::kGpu) << "append to swapped-out sequence " << seq;
  const int32_t have = static_cast<int32_t>(t.blocks.size());
  const int32_t need = BlocksForTokens(end);
  int32_t cost = std::max(0, need - have);
  for (int32_t i = write_start / options_.block_size; i < std::min(have, need); ++i) {
    if (gpu_.refcount(t.blocks[i].id()) > 1) ++cost;
  }
  return cost;
}

void BlockManager::ForgetHashesFrom(SeqTable& t, size_t i) {
  if (t.hashes.size() > i) t.hashes.resize(i);
  t.commit_cursor = std::min(t.commit_cursor, static_cast<int32_t>(i));
}

absl::Status BlockManager::AppendSlots(SeqId seq, int32_t write_start, int32_t end,
                                       std::vector<BlockCopy>* copies) {
  STRATA_CHECK_LE(write_start, end);
  const int32_t cost = AppendCost(seq, write_start, end);
  if (cost > gpu_.num_allocatable()) {
    return absl::ResourceExhaustedError(absl::StrCat("sequence ", seq.value(), " needs ", cost,
                                                     " GPU blocks, ", gpu_.num_allocatable(),
                                                     " allocatable"));
  }
  SeqTable& t = Table(seq);
  const int32_t have = static_cast<int32_t>(t.blocks.size());
  const int32_t need = BlocksForTokens(end);
  for (int32_t i = write_start / options_.block_size; i < std::min(have, need); ++i) {
    const BlockId old = t.blocks[i].id();
    if (gpu_.refcount(old) > 1) {
      // Copy-on-write: the block is shared, so this table gets a private copy
      // (free -> active for the copy; the original loses one sharer and is
      // pinned as a copy source until the plan is complete).
      BlockRef copy = gpu_.Allocate();
      copies->push_back({old, copy.id()});
      gpu_.PinAsCopySource(old);
      t.blocks[i] = std::move(copy);
      ForgetHashesFrom(t, i);
      ++cow_copies_;
    } else if (gpu_.hashed(old)) {
      // Sole holder of a hashed block about to be rewritten: it leaves the
      // prefix index (active+hashed -> active) instead of being copied.
      gpu_.Unregister(old);
      ForgetHashesFrom(t, i);
    }
  }
  for (int32_t i = have; i < need; ++i) t.blocks.push_back(gpu_.Allocate());  // free -> active
  return absl::OkStatus();
}

void BlockManager::CommitComputed(SeqId seq, std::span<const int32_t> tokens,
                                  int32_t num_computed) {
  if (!options_.enable_prefix_caching) return;
  SeqTable& t = Table(seq);
  STRATA_CHECK(t.device == Device::kGpu) << "commit on swapped-out sequence " << seq;
  STRATA_CHECK_LE(static_cast<size_t>(num_computed), tokens.size());
  const size_t bs = static_cast<size_t>(options_.block_size);
  const size_t full = std::min(static_cast<size_t>(num_computed) / bs, t.blocks.size());
  while (t.hashes.size() < full) {
    const size_t k = t.hashes.size();
    t.hashes.push_back(HashBlockTokens(ParentHash(t, k), tokens.subspan(k * bs, bs)));
  }
  for (size_t k = static_cast<size_t>(t.commit_cursor); k < full; ++k) {
    const BlockId b = t.blocks[k].id();
    // A block whose hash another block already holds stays unhashed (it is
    // freed, not cached, when released).
    if (!gpu_.hashed(b)) gpu_.Register(b, t.hashes[k], ParentHash(t, k), tokens.subspan(k * bs, bs));
  }
  t.commit_cursor = std::max(t.commit_cursor, static_cast<int32_t>(full));
}

absl::Status BlockManager::Fork(SeqId parent, SeqId child) {
  STRATA_CHECK(!tables_.contains(child)) << "sequence " << child << " already has a block table";
  const SeqTable& p = Table(parent);
  if (p.device != Device::kGpu) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot fork sequence ", parent.value(), ": it is swapped out"));
  }
  SeqTable c;
  c.device = Device::kGpu;
  c.blocks.reserve(p.blocks.size() + 1);
  for (const BlockRef& r : p.blocks) c.blocks.push_back(gpu_.Acquire(r.id()));  // active -> active
  c.hashes = p.hashes;
  c.commit_cursor = p.commit_cursor;
  tables_.emplace(child, std::move(c));
  return absl::OkStatus();
}

void BlockManager::Free(SeqId seq) {
  auto it = tables_.find(seq);
  STRATA_CHECK(it != tables_.end()) << "Free() of unknown sequence " << seq;
  // Release tail first: the tail of a sequence is the least likely prefix of
  // another request, so it should be evicted before the head.
  std::vector<BlockRef>& blocks = it->second.blocks;
  while (!blocks.empty()) blocks.pop_back();  // active -> free / cached / pinned (or -1 sharer)
  tables_.erase(it);
}

// --- swapping ------------------------------------------------------------------

bool BlockManager::CanSwapOut(SeqId seq) const {
  const SeqTable& t = Table(seq);
  return t.device == Device::kGpu &&
         static_cast<int64_t>(t.blocks.size()) <= cpu_.num_allocatable();
}

absl::Status BlockManager::SwapOut(SeqId seq, std::vector<BlockCopy>* pairs) {
  SeqTable& t = Table(seq);
  STRATA_CHECK(t.device == Device::kGpu) << "sequence " << seq << " is already swapped out";
  if (static_cast<int64_t>(t.blocks.size()) > cpu_.num_allocatable()) {
    return absl::ResourceExhaustedError(absl::StrCat("swap-out of sequence ", seq.value(),
                                                     " needs ", t.blocks.size(), " CPU blocks, ",
                                                     cpu_.num_allocatable(), " free"));
  }
  std::vector<BlockRef> cpu_blocks;
  cpu_blocks.reserve(t.blocks.size());
  for (const BlockRef& g : t.blocks) {
    cpu_blocks.push_back(cpu_.Allocate());  // cpu: free -> active
    pairs->push_back({g.id(), cpu_blocks.back().id()});
  }
  blocks_swapped_out_ += static_cast<int64_t>(t.blocks.size());
  // gpu: active -> free / cached / pinned (or -1 sharer); tail first.
  while (!t.blocks.empty()) t.blocks.pop_back();
  t.blocks = std::move(cpu_blocks);
  t.device = Device::kCpu;  // gpu table -> cpu table
  return absl::OkStatus();
}

BlockId BlockManager::FindOnGpu(const SeqTable& t, size_t i,
                                std::span<const int32_t> tokens) const {
  const size_t bs = static_cast<size_t>(options_.block_size);
  if (!options_.enable_prefix_caching || i >= t.hashes.size() || (i + 1) * bs > tokens.size()) {
    return BlockId();
  }
  return gpu_.Lookup(t.hashes[i], ParentHash(t, i), tokens.subspan(i * bs, bs));
}

int32_t BlockManager::SwapInCost(SeqId seq, std::span<const int32_t> tokens) const {
  const SeqTable& t = Table(seq);
  STRATA_CHECK(t.device == Device::kCpu) << "sequence " << seq << " is not swapped out";
  int32_t cost = 0;
  for (size_t i = 0; i < t.blocks.size(); ++i) {
    const BlockId b = FindOnGpu(t, i, tokens);
    if (!b.valid() || gpu_.state(b) == BlockState::kCached) ++cost;
  }
  return cost;
}

absl::Status BlockManager::SwapIn(SeqId seq, std::span<const int32_t> tokens,
                                  std::vector<BlockCopy>* pairs) {
  const int32_t cost = SwapInCost(seq, tokens);
  if (cost > gpu_.num_allocatable()) {
    return absl::ResourceExhaustedError(absl::StrCat("swap-in of sequence ", seq.value(),
                                                     " needs ", cost, " GPU blocks, ",
                                                     gpu_.num_allocatable(), " allocatable"));
  }
  SeqTable& t = Table(seq);
  std::vector<BlockRef> gpu_blocks(t.blocks.size());
  // Re-find cached copies first, so that allocating the others cannot evict them.
  for (size_t i = 0; i < t.blocks.size(); ++i) {
    const BlockId b = FindOnGpu(t, i, tokens);
    if (b.valid()) gpu_blocks[i] = gpu_.Acquire(b);  // cached -> active / active -> active
  }
  for (size_t i = 0; i < t.blocks.size(); ++i) {
    if (gpu_blocks[i].valid()) continue;
    gpu_blocks[i] = gpu_.Allocate();  // free -> active
    pairs->push_back({t.blocks[i].id(), gpu_blocks[i].id()});
    ++blocks_swapped_in_;
  }
  while (!t.blocks.empty()) t.blocks.pop_back();  // cpu: active -> free
  t.blocks = std::move(gpu_blocks);
  t.device = Device::kGpu;  // cpu table -> gpu table
  t.commit_cursor = 0;      // offer the copied-back full blocks to the index again
  return absl::OkStatus();
}

// --- queries -------------------------------------------------------------------

BlockManagerStats BlockManager::Stats() const {
  BlockManagerStats s;
  s.gpu_total = gpu_.num_blocks();
  s.gpu_used = gpu_.num_blocks() - gpu_.num_allocatable();
  s.gpu_cached = gpu_.num_cached();
  s.gpu_free = gpu_.num_free();
  s.cpu_total = cpu_.num_blocks();
  s.cpu_used = cpu_.num_blocks() - cpu_.num_allocatable();
  s.prefix_queried_tokens = prefix_queried_tokens_;
  s.prefix_hit_tokens = prefix_hit_tokens_;
  s.blocks_swapped_out = blocks_swapped_out_;
  s.blocks_swapped_in = blocks_swapped_in_;
  s.bytes_swapped_out = blocks_swapped_out_ * options_.bytes_per_block;
  s.bytes_swapped_in = blocks_swapped_in_ * options_.bytes_per_block;
  s.cow_copies = cow_copies_;
  s.evictions = gpu_.num_evictions();
  return s;
}

absl::Status BlockManager::CheckInvariants() const {
  if (gpu_.num_pinned() != 0) {
    return absl::InternalError(absl::StrCat(gpu_.num_pinned(),
                                            " GPU blocks still pinned: EndStep() was not called"));
  }
  std::vector<int32_t> gpu_refs(gpu_.num_blocks(), 0), cpu_refs(cpu_.num_blocks(), 0);
  std::vector<int64_t> gpu_seen(gpu_.num_blocks(), -1), cpu_seen(cpu_.num_blocks(), -1);
  int64_t table_index = 0;
  for (const auto& [seq, t] : tables_) {
    const bool on_gpu = t.device == Device::kGpu;
    const BlockPool& pool = on_gpu ? gpu_ : cpu_;
    std::vector<int32_t>& refs = on_gpu ? gpu_refs : cpu_refs;
    std::vector<int64_t>& seen = on_gpu ? gpu_seen : cpu_seen;
    for (const BlockRef& r : t.blocks) {
      if (!r.valid() || r.pool() != &pool) {
        return absl::InternalError(absl::StrCat("sequence ", seq.value(), " on ",
                                                DeviceName(t.device),
                                                " holds a block of the wrong pool or an empty handle"));
      }
      const int32_t b = r.id().value();
      if (b < 0 || b >= pool.num_blocks()) {
        return absl::InternalError(absl::StrCat("sequence ", seq.value(), " holds block ", b,
                                                " outside the ", DeviceName(t.device), " pool"));
      }
      if (seen[b] == table_index) {
        return absl::InternalError(absl::StrCat("sequence ", seq.value(), " holds ",
                                                DeviceName(t.device), " block ", b, " twice"));
      }
      seen[b] = table_index;
      ++refs[b];
    }
    if (t.hashes.size() > t.blocks.size() || t.commit_cursor < 0 ||
        static_cast<size_t>(t.commit_cursor) > t.blocks.size()) {
      return absl::InternalError(absl::StrCat("sequence ", seq.value(), " has ", t.hashes.size(),
                                              " hashes, cursor ", t.commit_cursor, " for ",
                                              t.blocks.size(), " blocks"));
    }
    if (on_gpu) {
      for (size_t k = 0; k < t.hashes.size(); ++k) {
        const BlockId b = t.blocks[k].id();
        if (gpu_.hashed(b) && gpu_.hash(b) != t.hashes[k]) {
          return absl::InternalError(absl::StrCat("sequence ", seq.value(), " block ", k,
                                                  " (gpu ", b.value(),
                                                  ") is indexed under another hash than its chain"));
        }
      }
    }
    ++table_index;
  }
  if (absl::Status s = gpu_.CheckInvariants(gpu_refs); !s.ok()) return s;
  return cpu_.CheckInvariants(cpu_refs);
}

}  // namespace strata
