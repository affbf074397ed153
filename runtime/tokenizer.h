// Llama's SentencePiece BPE tokenizer, implemented here rather than linked,
// and GGUF byte-level (GPT-2 style) BPE vocabularies (runtime/bpe_tokenizer.h).
//
// Why not libsentencepiece: Debian's library embeds its own protobuf 3.14
// runtime and aborts or crashes in any process that also uses the system
// protobuf 3.21 that gRPC needs (shared/BUILD-NOTES.md). So this file reads
// tokenizer.model with our own subset of its schema
// (proto/sentencepiece_model.proto) and reproduces SentencePiece's BPE
// encoder and decoder. runtime/tokenizer_test.cc checks it id-for-id against
// the Python `sentencepiece` module, which runs in its own process.
//
// What is implemented (and what the loaders reject with UNIMPLEMENTED):
//  * model_type BPE only (no unigram / word / char models);
//  * normalizer: the identity normalizer with add_dummy_prefix,
//    remove_extra_whitespaces and escape_whitespaces (' ' -> U+2581); a
//    non-empty precompiled_charsmap (NFKC tables) or denormalizer, user-defined
//    pieces and treat_whitespace_as_suffix are rejected;
//  * byte fallback (<0xNN> pieces), UNUSED pieces (re-segmented as
//    SentencePiece does), control and unknown pieces.
//
// Thread safety: a loaded Tokenizer is immutable; Encode/Decode may be called
// concurrently. A StreamDecoder belongs to one sequence (one owner thread).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace strata {

namespace bpe {
class ByteLevelBpe;
}

class Tokenizer {
 public:
  // SentencePiece piece types; numbers as in sentencepiece_model.proto.
  enum class PieceType : uint8_t {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,
    kUserDefined = 4,
    kUnused = 5,
    kByte = 6,
  };

  // Loads a SentencePiece `tokenizer.model` (a serialized ModelProto).
  // Errors (the message names `path`): NOT_FOUND if the file cannot be
  // opened; INVALID_ARGUMENT if it is not a well-formed model (truncated,
  // garbage, empty, inconsistent pieces); UNIMPLEMENTED for model features
  // listed at the top of this file. All are permanent.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& path);

  // Loads llama2.c's `tokenizer.bin`: int32 max_token_length, then per id
  // float32 score, int32 len, len bytes. Pieces there use ' ' for U+2581 and
  // "\n<s>\n" / "\n</s>\n" for BOS / EOS; they are mapped back, so Piece()
  // and Encode() agree with the equivalent tokenizer.model. The format does
  // not store the vocabulary size: pass `expected_vocab_size` to detect a file
  // truncated exactly at an entry boundary. Piece types are inferred: "<unk>"
  // is unknown, "<s>"/"</s>" control, "<0xNN>" byte pieces; byte fallback is
  // on when all 256 byte pieces exist. Normalization is Llama's
  // (add_dummy_prefix, no whitespace removal).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadLlama2c(
      const std::string& path, std::optional<int32_t> expected_vocab_size = std::nullopt);

  // Loads the vocabulary of a GGUF model file (tokenizer.ggml.*). Supported:
  // tokenizer.ggml.model "gpt2" (byte-level BPE: tokens, token_type, merges
  // ranked by order) with tokenizer.ggml.pre "smollm" (and its aliases that
  // split digits individually: "starcoder", "refact", "codeshell") or
  // "gpt-2"/"default" (no digit split); others are UNIMPLEMENTED. Control
  // tokens (token_type 3) are never produced by Encode and are invisible in
  // Decode. bos/eos/unk ids and add_bos come from the file.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromGguf(const std::string& path);

  // Loads <dir>/tokenizer.model, else <dir>/tokenizer.bin, else the only
  // *.gguf file in <dir>; `dir` may also be a .gguf file. NOT_FOUND if none
  // exists.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromDirectory(const std::string& dir);

  // Like Python's sp.encode(text): no BOS/EOS, dummy prefix, byte fallback.
  // Accepts any bytes: malformed UTF-8 is read one byte at a time as U+FFFD,
  // as SentencePiece's normalizer does. Control ids are never produced.
  // `text` must have fewer than 2^31 characters (bound request sizes at
  // admission); cost is O(n log n) in its length.
  std::vector<int32_t> Encode(std::string_view text) const;

  // Like Python's sp.decode(ids): control pieces are invisible, <unk> renders
  // as the unknown surface (" \u2047 "), runs of byte pieces are decoded as
  // UTF-8 with one U+FFFD per malformed byte, and the U+2581 of the first
  // visible piece is dropped when the model adds a dummy prefix. Ids outside
  // [0, vocab_size) (which sp.decode rejects) render as the unknown surface;
  // validate ids at admission if that matters.
  std::string Decode(const std::vector<int32_t>& ids) const;

  int32_t vocab_size() const { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const { return bos_id_; }  // -1 if the model has none
  int32_t eos_id() const { return eos_id_; }  // -1 if the model has none
  int32_t unk_id() const { return unk_id_; }
  // Whether a sequence should start with bos_id() (SentencePiece/llama2.c:
  // true, Llama's convention; GGUF: tokenizer.ggml.add_bos_token, default
  // false for byte-level vocabularies).
  bool add_bos() const { return add_bos_; }
  // True for GGUF byte-level BPE vocabularies. Their Piece() is the
  // byte-level form ("\u0120the" for " the"); TokenBytes() gives the bytes.
  bool byte_level() const { return bpe_ != nullptr; }
  // The bytes token `id` decodes to, for byte-level vocabularies (empty for
  // control tokens, out-of-range ids, or a SentencePiece vocabulary).
  std::string_view TokenBytes(int32_t id) const;

  // The raw piece, with U+2581 for spaces; empty for an out-of-range id.
  std::string_view Piece(int32_t id) const;
  float Score(int32_t id) const;
  std::optional<int32_t> PieceToId(std::string_view piece) const;
  bool IsByte(int32_t id) const { return TypeIs(id, PieceType::kByte); }
  bool IsControl(int32_t id) const { return TypeIs(id, PieceType::kControl); }
  bool IsUnknown(int32_t id) const { return TypeIs(id, PieceType::kUnknown); }
  // The byte a byte piece stands for; only meaningful when IsByte(id).
  uint8_t ByteValue(int32_t id) const { return byte_value_[static_cast<size_t>(id)]; }

  // Normalizer options in effect (from the file, or Llama's for llama2.c).
  struct NormalizerOptions {
    bool add_dummy_prefix = true;
    bool remove_extra_whitespaces = false;
    bool escape_whitespaces = true;
  };
  const NormalizerOptions& normalizer() const { return normalizer_; }

  // Renders one non-byte piece as sp.decode does, appending to `out`.
  // `strip_leading_space` asks to drop a leading U+2581 (the dummy prefix).
  // Returns whether a leading U+2581 was dropped in a way that ends the
  // "beginning of text" state (SentencePiece's `has_bos_ws`).
  bool AppendDecodedPiece(int32_t id, bool strip_leading_space, std::string* out) const;

 private:
  struct PieceSpec {
    std::string piece;
    float score = 0;
    PieceType type = PieceType::kNormal;
  };
  struct Options {
    NormalizerOptions normalizer;
    bool byte_fallback = false;
    std::string unk_surface = " \xE2\x81\x87 ";
    std::string bos_piece = "<s>", eos_piece = "</s>";
  };
  // Validates the vocabulary and builds the lookup tables. `source` names the
  // file in error messages.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Build(const std::string& source,
                                                          std::vector<PieceSpec> specs,
                                                          Options options);
  Tokenizer() = default;

  bool TypeIs(int32_t id, PieceType type) const {
    return id >= 0 && id < vocab_size() && types_[static_cast<size_t>(id)] == type;
  }
  // SentencePiece's PieceToId: reserved (control/unknown/byte) pieces first,
  // then mergeable pieces, else unk.
  int32_t LookupOrUnk(std::string_view piece) const;
  std::string Normalize(std::string_view text) const;
  void IndexSurfaces();  // fills surfaces_ / leading_space_ from pieces_

  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  using PieceMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<PieceType> types_;
  std::vector<uint8_t> byte_value_;  // per id; valid for byte pieces
  // Decoding (SentencePiece vocabularies): each piece with U+2581 as ' ',
  // and whether the piece starts with U+2581 (the surface's first byte is
  // then that space). Built once so decoding a token is one append.
  std::vector<std::string> surfaces_;
  std::vector<uint8_t> leading_space_;
  PieceMap mergeable_;               // normal, user-defined and unused pieces
  PieceMap reserved_;                // control, unknown and byte pieces
  std::array<int32_t, 256> byte_to_id_{};
  bool byte_fallback_ = false;
  bool has_unused_ = false;
  NormalizerOptions normalizer_;
  std::string unk_surface_;
  int32_t unk_id_ = 0;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  bool add_bos_ = true;
  std::shared_ptr<const bpe::ByteLevelBpe> bpe_;  // set for byte-level vocabularies
};

// Incremental detokenizer for streaming one sequence. Push ids one at a time;
// each call returns the newly completed text, always whole UTF-8 characters:
// bytes of an incomplete UTF-8 sequence (from byte-fallback pieces) are held
// back until the sequence completes or can no longer complete (then it
// becomes U+FFFD per malformed byte, as Decode does). The concatenation of
// all Push() results followed by Flush() equals tokenizer.Decode(all ids).
// The Tokenizer must outlive the decoder.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}
  std::string Push(int32_t id);
  // Emits held-back bytes (as U+FFFD) at the end of the sequence.
  std::string Flush();

 private:
  // Moves the decidable prefix of pending_ to `out`; with `at_end`, all of it.
  void DrainPending(bool at_end, std::string* out);

  const Tokenizer& tokenizer_;
  std::string pending_;         // bytes from byte pieces not yet emitted
  bool text_nonempty_ = false;  // anything emitted (or pending) so far
  bool is_bos_ws_ = true;       // SentencePiece's is_bos_ws
  bool bos_ws_seen_ = false;    // SentencePiece's bos_ws_seen
};

}  // namespace strata
