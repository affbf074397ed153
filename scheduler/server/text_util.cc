#include "scheduler/server/text_util.h"

#include <algorithm>
#include <cstdint>

namespace strata::serving {

std::optional<size_t> FindInvalidUtf8(std::string_view text) {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len = 0;
    uint32_t cp = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07;
    } else {
      return i;  // continuation byte or 0xF8..0xFF as a lead byte
    }
    if (i + len > n) return i;
    for (int k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::nullopt;
}

StopStringMatcher::Result StopStringMatcher::Push(std::string_view delta) {
  Result r;
  if (matched_) return r;
  if (stops_.empty()) {
    r.text = std::string(delta);
    return r;
  }
  held_.append(delta);
  // Every occurrence not yet seen starts inside held_: what was emitted before
  // had no suffix that could begin a stop string.
  size_t best = std::string::npos;
  for (size_t i = 0; i < stops_.size(); ++i) {
    const size_t p = held_.find(stops_[i]);
    if (p != std::string::npos && (best == std::string::npos || p < best)) {
      best = p;
      r.matched = i;
    }
  }
  if (r.matched) {
    r.text = held_.substr(0, best);
    held_.clear();
    matched_ = true;
    return r;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string.
  // Such a suffix starts at a character boundary (a stop string is valid
  // UTF-8), so what is emitted is whole characters.
  size_t keep = 0;
  for (const std::string& stop : stops_) {
    const size_t max_len = std::min(held_.size(), stop.size() - 1);
    for (size_t len = max_len; len > keep; --len) {
      if (held_.compare(held_.size() - len, len, stop, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  r.text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return r;
}

std::string StopStringMatcher::Flush() {
  std::string out;
  out.swap(held_);
  return matched_ ? std::string() : out;
}

}  // namespace strata::serving
