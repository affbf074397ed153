// Text helpers for the serving path: UTF-8 validation of request fields and
// stop-string matching over a stream of text deltas.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace strata::serving {

// Offset of the first byte that is not part of a well-formed UTF-8 sequence
// (overlong forms, surrogates and code points above U+10FFFF are malformed),
// or nullopt when `text` is valid UTF-8.
std::optional<size_t> FindInvalidUtf8(std::string_view text);

// Finds stop strings in text that arrives in pieces. Text that might be the
// start of a stop string is held back until it is decided, so a caller that
// streams Push() results never has to take text back. Push() and Flush()
// results concatenate to the input text, cut right before the first stop
// string (the stop string itself and anything after it are dropped).
// One owner thread.
class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}

  struct Result {
    std::string text;                  // safe to emit now
    std::optional<size_t> matched;     // index into stops when one was found
  };
  // After a match the matcher is spent: later calls return nothing.
  Result Push(std::string_view delta);
  // The held-back text, at the end of the stream.
  std::string Flush();

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool matched_ = false;
};

}  // namespace strata::serving
