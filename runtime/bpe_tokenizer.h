// Byte-level BPE (GPT-2 style), as used by SmolLM2 and other GGUF models whose
// tokenizer.ggml.model is "gpt2". Implemented here because no library in
// Debian 12 provides it to C++; runtime/bpe_tokenizer_test.cc checks it
// id-for-id against Hugging Face's `tokenizers` (PyPI), run in its own process
// by tests/tools/bpe_reference.py.
//
// Encoding, as Hugging Face's tokenizers does for SmolLM2's tokenizer.json:
//  1. pre-tokenization (split_digits = true: "smollm"): every \p{N} character
//     is its own piece (pre_tokenizers.Digits(individual_digits=True)); then,
//     inside each piece, GPT-2's regex
//       's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//     (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True));
//  2. each piece's UTF-8 bytes are mapped to GPT-2's printable byte alphabet
//     (bytes_to_unicode) and merged by BPE: repeatedly the adjacent pair with
//     the lowest merge rank (rank = position in the merges list; ties: the
//     leftmost pair) until none applies.
// Special tokens written in the text are not recognized (they are encoded as
// plain text, like `parse_special = false` in llama.cpp); malformed UTF-8 is
// accepted, each bad byte being one "other" character.
//
// Thread safety: immutable after Create(); Encode() may run concurrently.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace strata::bpe {

struct ByteLevelOptions {
  bool split_digits = true;  // the Digits(individual_digits) pre-tokenizer step
};

class ByteLevelBpe {
 public:
  // `tokens`: the vocabulary in byte-level form ("Ġthe"); `merges`: "left
  // right" pairs, best first. INVALID_ARGUMENT (naming `source`) for a
  // duplicate token, a malformed merge, or a merge whose parts or result are
  // not in the vocabulary. Bytes without a single-character token are
  // dropped by Encode (as Hugging Face's BPE does without an unk token).
  static absl::StatusOr<std::unique_ptr<ByteLevelBpe>> Create(
      const std::vector<std::string>& tokens, const std::vector<std::string>& merges,
      const ByteLevelOptions& options, const std::string& source);

  std::vector<int32_t> Encode(std::string_view text) const;

  // The pre-tokenizer's pieces of `text`, in order (views into `text`).
  std::vector<std::string_view> PreTokenize(std::string_view text) const;

  // The raw bytes a token stands for (the byte alphabet mapped back); a
  // token with characters outside the alphabet (an added token such as
  // "<|im_start|>" may have them) is returned as its UTF-8 text.
  const std::string& TokenBytes(int32_t id) const { return token_bytes_[static_cast<size_t>(id)]; }
  int32_t vocab_size() const { return static_cast<int32_t>(token_bytes_.size()); }

  // GPT-2's bytes_to_unicode: the UTF-8 of the character standing for byte b.
  static const std::array<std::string, 256>& ByteAlphabet();

 private:
  ByteLevelBpe() = default;
  void EncodePiece(std::string_view piece, std::vector<int32_t>* out) const;

  struct PairHash {
    size_t operator()(uint64_t k) const { return std::hash<uint64_t>{}(k * 0x9E3779B97F4A7C15ull); }
  };
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  ByteLevelOptions options_;
  std::array<int32_t, 256> byte_token_{};  // id of each byte's single-character token, or -1
  std::unordered_map<uint64_t, Merge, PairHash> merges_;  // (left id << 32 | right id)
  std::vector<std::string> token_bytes_;
};

}  // namespace strata::bpe
