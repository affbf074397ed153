// Strong integer ids. A BlockId cannot be passed where a SeqId is expected.
#pragma once

#include <cstdint>
#include <functional>
#include <ostream>

namespace strata {

template <typename Tag, typename Rep = int32_t>
class StrongId {
 public:
  using rep_type = Rep;
  constexpr StrongId() = default;
  constexpr explicit StrongId(Rep value) : value_(value) {}
  constexpr Rep value() const { return value_; }
  constexpr bool valid() const { return value_ >= 0; }
  friend constexpr bool operator==(StrongId a, StrongId b) { return a.value_ == b.value_; }
  friend constexpr bool operator!=(StrongId a, StrongId b) { return a.value_ != b.value_; }
  friend constexpr bool operator<(StrongId a, StrongId b) { return a.value_ < b.value_; }
  friend std::ostream& operator<<(std::ostream& os, StrongId id) { return os << id.value_; }
  template <typename H>
  friend H AbslHashValue(H h, StrongId id) {
    return H::combine(std::move(h), id.value_);
  }

 private:
  Rep value_ = -1;
};

struct BlockIdTag {};
struct SeqIdTag {};
struct LayerIdTag {};
struct RankTag {};
struct RequestIdTag {};

using BlockId = StrongId<BlockIdTag, int32_t>;  // index into a KV block pool
using SeqId = StrongId<SeqIdTag, int64_t>;      // one sequence being generated
using LayerId = StrongId<LayerIdTag, int32_t>;  // transformer layer index
using Rank = StrongId<RankTag, int32_t>;        // tensor-parallel rank
using RequestId = StrongId<RequestIdTag, int64_t>;

}  // namespace strata

namespace std {
template <typename Tag, typename Rep>
struct hash<strata::StrongId<Tag, Rep>> {
  size_t operator()(strata::StrongId<Tag, Rep> id) const noexcept {
    return std::hash<Rep>()(id.value());
  }
};
}  // namespace std
