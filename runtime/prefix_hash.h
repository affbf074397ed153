// Hash chain that names full KV blocks for prefix caching.
//
// A full block's hash is H(parent hash, its block_size token ids); the chain
// starts from a seed that mixes the model id, the KV dtype and the scale mode,
// so caches of different models or formats never alias. The hash is a fixed,
// process-independent 64-bit function (splitmix64 mixing), not a
// cryptographic one: the block manager stores each cached block's parent hash
// and tokens and compares them on every hit, so a 64-bit collision cannot
// hand a sequence another sequence's block (see BlockManager::MatchPrefix).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "runtime/kv_format.h"

namespace strata {

using BlockHash = uint64_t;

// Root of every chain for one (model, KV format).
BlockHash PrefixHashSeed(std::string_view model_id, KvFormat format);

// Hash of a full block whose predecessor in the sequence has `parent`
// (the seed for the first block).
BlockHash HashBlockTokens(BlockHash parent, std::span<const int32_t> tokens);

}  // namespace strata
