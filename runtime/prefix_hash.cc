#include "runtime/prefix_hash.h"

namespace strata {
namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

// splitmix64 finalizer: a bijection with good avalanche.
inline uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

inline uint64_t Combine(uint64_t h, uint64_t v) { return Mix(h + kGolden + Mix(v ^ (h << 1))); }

}  // namespace

BlockHash PrefixHashSeed(std::string_view model_id, KvFormat format) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a over the model id
  for (const char c : model_id) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  h = Combine(Mix(h), model_id.size());
  h = Combine(h, static_cast<uint64_t>(format.dtype));
  h = Combine(h, static_cast<uint64_t>(format.scale_mode) | (uint64_t{1} << 40));
  return h;
}

BlockHash HashBlockTokens(BlockHash parent, std::span<const int32_t> tokens) {
  uint64_t h = Combine(parent, tokens.size());
  for (const int32_t t : tokens) h = Combine(h, static_cast<uint32_t>(t));
  return h;
}

}  // namespace strata
