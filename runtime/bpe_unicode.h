// Unicode character classes for the byte-level BPE pre-tokenizer
// (runtime/bpe_tokenizer.h): \p{L} (general category L*), \p{N} (Nd, Nl, No)
// and \s (the White_Space property). Tables in bpe_unicode.cc are generated
// by tests/tools/gen_bpe_unicode.py.
#pragma once

#include <cstdint>

namespace strata::bpe {

enum class CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

// Class of a Unicode code point; values above U+10FFFF are kOther.
CharClass Classify(uint32_t cp);

}  // namespace strata::bpe
