#include "runtime/bpe_tokenizer.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "runtime/bpe_unicode.h"

namespace strata::bpe {
namespace {

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Decodes the character at the start of `s`: its code point and byte length.
// A malformed or truncated sequence is one byte with code point U+FFFFFFFF
// (classified as "other").
struct Char {
  uint32_t cp;
  uint32_t len;
};
Char DecodeUtf8(std::string_view s) {
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (b0 < 0x80) return {b0, 1};
  int n = 0;
  uint32_t cp = 0;
  uint8_t lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2, cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3, cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4, cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {0xFFFFFFFFu, 1};
  }
  if (s.size() < static_cast<size_t>(n)) return {0xFFFFFFFFu, 1};
  for (int i = 1; i < n; ++i) {
    const auto b = static_cast<uint8_t>(s[static_cast<size_t>(i)]);
    if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return {0xFFFFFFFFu, 1};
    cp = (cp << 6) | (b & 0x3F);
  }
  return {cp, static_cast<uint32_t>(n)};
}

struct CharInfo {
  uint32_t cp;
  uint32_t begin;  // byte offset
  CharClass cls;
};

// GPT-2's regex over chars [b, e) of one Digits piece, appending the matches.
void SplitGpt2(const std::vector<CharInfo>& c, size_t b, size_t e, size_t text_end,
               std::string_view text, std::vector<std::string_view>* out) {
  auto byte_at = [&](size_t i) { return i < e ? c[i].begin : (e < c.size() ? c[e].begin : text_end); };
  auto is = [&](size_t i, CharClass k) { return i < e && c[i].cls == k; };
  auto cp_is = [&](size_t i, uint32_t ch) { return i < e && c[i].cp == ch; };
  size_t i = b;
  while (i < e) {
    size_t j = i;  // end of the match
    // 's|'t|'re|'ve|'m|'ll|'d
    if (cp_is(i, '\'')) {
      if (cp_is(i + 1, 's') || cp_is(i + 1, 't') || cp_is(i + 1, 'm') || cp_is(i + 1, 'd')) {
        j = i + 2;
      } else if ((cp_is(i + 1, 'r') && cp_is(i + 2, 'e')) || (cp_is(i + 1, 'v') && cp_is(i + 2, 'e')) ||
                 (cp_is(i + 1, 'l') && cp_is(i + 2, 'l'))) {
        j = i + 3;
      }
    }
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
    if (j == i) {
      for (CharClass k : {CharClass::kLetter, CharClass::kNumber, CharClass::kOther}) {
        size_t s = i;
        if (cp_is(s, ' ') && is(s + 1, k)) ++s;
        if (!is(s, k)) continue;
        while (is(s, k)) ++s;
        j = s;
        break;
      }
    }
    // `\s+(?!\S)|\s+`
    if (j == i) {
      size_t k = i;
      while (is(k, CharClass::kSpace)) ++k;
      // Always at least one: a char that is not L, N or other is a space.
      if (k == e || k - i == 1) {
        j = k;
      } else {
        j = k - 1;  // leave the last space to prefix the next word
      }
    }
    out->push_back(text.substr(byte_at(i), byte_at(j) - byte_at(i)));
    i = j;
  }
}

}  // namespace

const std::array<std::string, 256>& ByteLevelBpe::ByteAlphabet() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      AppendUtf8(printable ? static_cast<uint32_t>(b) : next++, &t[static_cast<size_t>(b)]);
    }
    return t;
  }();
  return table;
}

absl::StatusOr<std::unique_ptr<ByteLevelBpe>> ByteLevelBpe::Create(
    const std::vector<std::string>& tokens, const std::vector<std::string>& merges,
    const ByteLevelOptions& options, const std::string& source) {
  if (tokens.empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": empty vocabulary"));
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": vocabulary too large"));
  }
  std::unique_ptr<ByteLevelBpe> t(new ByteLevelBpe());
  t->options_ = options;
  std::unordered_map<std::string_view, int32_t> vocab;
  vocab.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (!vocab.emplace(tokens[i], static_cast<int32_t>(i)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": token ", i, " ('", tokens[i], "') is defined twice"));
    }
  }
  // Reverse of the byte alphabet: code point -> byte.
  const auto& alphabet = ByteAlphabet();
  std::unordered_map<uint32_t, uint8_t> char_to_byte;
  for (int b = 0; b < 256; ++b) {
    const std::string& s = alphabet[static_cast<size_t>(b)];
    char_to_byte[DecodeUtf8(s).cp] = static_cast<uint8_t>(b);
    // Some vocabularies (SmolLM2's) lack a few control bytes; such bytes are
    // dropped when encoding, as Hugging Face's BPE does without an unk token.
    auto it = vocab.find(s);
    t->byte_token_[static_cast<size_t>(b)] = it == vocab.end() ? -1 : it->second;
  }
  t->token_bytes_.reserve(tokens.size());
  for (const std::string& tok : tokens) {
    std::string bytes;
    bool in_alphabet = true;
    for (size_t p = 0; p < tok.size();) {
      const Char ch = DecodeUtf8(std::string_view(tok).substr(p));
      auto it = char_to_byte.find(ch.cp);
      if (it == char_to_byte.end()) {
        in_alphabet = false;
        break;
      }
      bytes.push_back(static_cast<char>(it->second));
      p += ch.len;
    }
    t->token_bytes_.push_back(in_alphabet ? bytes : tok);
  }
  t->merges_.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string& m = merges[r];
    const size_t sp = m.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 >= m.size() ||
        m.find(' ', sp + 1) != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": merge ", r, " ('", m, "') is not 'left right'"));
    }
    const std::string_view left = std::string_view(m).substr(0, sp);
    const std::string_view right = std::string_view(m).substr(sp + 1);
    const std::string merged = std::string(left) + std::string(right);
    auto l = vocab.find(left), rt = vocab.find(right), res = vocab.find(merged);
    if (l == vocab.end() || rt == vocab.end() || res == vocab.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": merge ", r, " ('", m, "') uses or makes a token not in the vocabulary"));
    }
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(l->second)) << 32) |
                         static_cast<uint32_t>(rt->second);
    // A repeated pair keeps its first (best) rank, as in Hugging Face's BPE.
    t->merges_.emplace(key, Merge{static_cast<int32_t>(r), res->second});
  }
  return t;
}

std::vector<std::string_view> ByteLevelBpe::PreTokenize(std::string_view text) const {
  std::vector<CharInfo> chars;
  chars.reserve(text.size());
  for (size_t p = 0; p < text.size();) {
    const Char ch = DecodeUtf8(text.substr(p));
    chars.push_back({ch.cp, static_cast<uint32_t>(p), Classify(ch.cp)});
    p += ch.len;
  }
  std::vector<std::string_view> out;
  size_t b = 0;
  for (size_t i = 0; i <= chars.size(); ++i) {
    const bool digit = i < chars.size() && options_.split_digits && chars[i].cls == CharClass::kNumber;
    if (i == chars.size() || digit) {
      if (i > b) SplitGpt2(chars, b, i, text.size(), text, &out);
      if (digit) {
        const size_t end = i + 1 < chars.size() ? chars[i + 1].begin : text.size();
        out.push_back(text.substr(chars[i].begin, end - chars[i].begin));
      }
      b = i + 1;
    }
  }
  return out;
}

void ByteLevelBpe::EncodePiece(std::string_view piece, std::vector<int32_t>* out) const {
  std::vector<int32_t> sym;
  sym.reserve(piece.size());
  for (char ch : piece) {
    const int32_t id = byte_token_[static_cast<uint8_t>(ch)];
    if (id >= 0) sym.push_back(id);
  }
  // Merge the lowest-ranked adjacent pair (leftmost on ties) until none is left.
  while (sym.size() > 1) {
    int32_t best_rank = std::numeric_limits<int32_t>::max(), best_result = -1;
    size_t best = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(sym[i])) << 32) |
                           static_cast<uint32_t>(sym[i + 1]);
      auto it = merges_.find(key);
      if (it != merges_.end() && it->second.rank < best_rank) {
        best_rank = it->second.rank, best_result = it->second.result, best = i;
      }
    }
    if (best_result < 0) break;
    sym[best] = best_result;
    sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  out->insert(out->end(), sym.begin(), sym.end());
}

std::vector<int32_t> ByteLevelBpe::Encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  // Words repeat a lot in real text; remember short ones for this call.
  std::unordered_map<std::string_view, std::pair<size_t, size_t>> cache;
  for (std::string_view piece : PreTokenize(text)) {
    if (piece.size() <= 32) {
      if (auto it = cache.find(piece); it != cache.end()) {
        const auto [begin, len] = it->second;
        for (size_t k = 0; k < len; ++k) ids.push_back(ids[begin + k]);
        continue;
      }
    }
    const size_t begin = ids.size();
    EncodePiece(piece, &ids);
    if (piece.size() <= 32) cache.emplace(piece, std::make_pair(begin, ids.size() - begin));
  }
  return ids;
}

}  // namespace strata::bpe
