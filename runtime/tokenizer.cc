#include "runtime/tokenizer.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
// proto/CMakeLists.txt's protobuf_generate (CMake 3.25, run from proto/ with
// -I proto first) currently writes the header to the top of the build tree;
// accept both that and the intended "proto/..." location.
#include "proto/sentencepiece_model.pb.h"
#include "runtime/bpe_tokenizer.h"
#include "runtime/gguf.h"
#include "runtime/status_macros.h"

namespace strata {
namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // U+2581
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Length of the well-formed UTF-8 character at the start of `s` (1..4), 0 if
// `s` starts with a malformed sequence (SentencePiece then consumes 1 byte as
// U+FFFD), or -1 if `s` is a proper prefix of a well-formed character (more
// bytes could complete it). Same acceptance as SentencePiece's DecodeUTF8 +
// IsValidDecodeUTF8: no overlong forms, no surrogates, nothing above U+10FFFF.
int ScanUtf8(std::string_view s) {
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (b0 < 0x80) return 1;
  int n = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;  // overlong
    if (b0 == 0xED) hi = 0x9F;  // surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;  // overlong
    if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    return 0;
  }
  for (int i = 1; i < n; ++i) {
    if (static_cast<size_t>(i) >= s.size()) return -1;
    const auto b = static_cast<uint8_t>(s[static_cast<size_t>(i)]);
    if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return 0;
  }
  return n;
}

// Appends `bytes` (one run of byte pieces) as SentencePiece's
// ProcessBytePieces does: whole characters as they are, one U+FFFD for each
// byte that does not start a well-formed character.
void AppendBytesAsUtf8(std::string_view bytes, std::string* out) {
  size_t off = 0;
  while (off < bytes.size()) {
    const int len = ScanUtf8(bytes.substr(off));
    if (len > 0) {
      out->append(bytes.substr(off, static_cast<size_t>(len)));
      off += static_cast<size_t>(len);
    } else {
      out->append(kReplacementChar);
      off += 1;
    }
  }
}

// "<0x41>" -> 0x41; -1 if `piece` is not exactly of that (upper-case) form.
int ParseBytePiece(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  int value = 0;
  for (size_t i = 3; i < 5; ++i) {
    const char c = piece[i];
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": is a directory, not a tokenizer file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return data;
}

}  // namespace

// --- loading -----------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadSentencePiece(const std::string& path) {
  ASSIGN_OR_RETURN(std::string data, ReadWholeFile(path));
  if (data.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": empty file, not a SentencePiece model"));
  }
  spm::ModelProto model;
  if (!model.ParseFromString(data)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a SentencePiece model (protobuf parse failed; truncated or corrupt?)"));
  }
  // Protobuf writes fields in number order: pieces, trainer_spec,
  // normalizer_spec. A file cut at a field boundary parses but lacks the specs.
  if (model.pieces_size() == 0 || !model.has_trainer_spec() || !model.has_normalizer_spec()) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a complete SentencePiece model (", model.pieces_size(),
        " pieces, trainer_spec ", model.has_trainer_spec() ? "present" : "missing",
        ", normalizer_spec ", model.has_normalizer_spec() ? "present" : "missing", ")"));
  }
  const spm::TrainerSpec& trainer = model.trainer_spec();
  const spm::NormalizerSpec& norm = model.normalizer_spec();
  if (trainer.model_type() != spm::TrainerSpec::BPE) {
    return absl::UnimplementedError(absl::StrCat(
        path, ": model_type ", spm::TrainerSpec::ModelType_Name(trainer.model_type()),
        " is not supported (only BPE)"));
  }
  if (trainer.has_vocab_size() && trainer.vocab_size() != model.pieces_size()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": trainer_spec.vocab_size is ",
                                                   trainer.vocab_size(), " but the file has ",
                                                   model.pieces_size(), " pieces"));
  }
  if (trainer.treat_whitespace_as_suffix()) {
    return absl::UnimplementedError(
        absl::StrCat(path, ": treat_whitespace_as_suffix is not supported"));
  }
  if (!norm.precompiled_charsmap().empty() ||
      (model.has_denormalizer_spec() && !model.denormalizer_spec().precompiled_charsmap().empty())) {
    return absl::UnimplementedError(absl::StrCat(
        path, ": normalizer '", norm.name(),
        "' uses a precompiled character map, which is not supported (identity only)"));
  }

  Options options;
  options.normalizer.add_dummy_prefix = norm.add_dummy_prefix();
  options.normalizer.remove_extra_whitespaces = norm.remove_extra_whitespaces();
  options.normalizer.escape_whitespaces = norm.escape_whitespaces();
  options.byte_fallback = trainer.byte_fallback();
  options.unk_surface = trainer.unk_surface();
  options.bos_piece = trainer.bos_piece();
  options.eos_piece = trainer.eos_piece();

  std::vector<PieceSpec> specs;
  specs.reserve(static_cast<size_t>(model.pieces_size()));
  for (const auto& p : model.pieces()) {
    specs.push_back({p.piece(), p.score(), static_cast<PieceType>(p.type())});
  }
  return Build(path, std::move(specs), std::move(options));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadLlama2c(
    const std::string& path, std::optional<int32_t> expected_vocab_size) {
  const absl::StatusOr<std::string> file = ReadWholeFile(path);
  if (!file.ok()) return file.status();
  const std::string_view data = *file;
  if (data.size() < sizeof(int32_t)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": ", data.size(), " bytes is too short for a llama2.c tokenizer.bin"));
  }
  size_t off = 0;
  auto read_i32 = [&]() {
    int32_t v;
    std::memcpy(&v, data.data() + off, sizeof(v));
    off += sizeof(v);
    return v;
  };
  const int32_t max_token_length = read_i32();
  if (max_token_length <= 0 || max_token_length > (1 << 16)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": implausible max_token_length ", max_token_length, " (not a tokenizer.bin?)"));
  }
  std::vector<PieceSpec> specs;
  while (off < data.size()) {
    const size_t id = specs.size();
    if (data.size() - off < 2 * sizeof(int32_t)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": truncated in the header of piece ", id));
    }
    float score;
    std::memcpy(&score, data.data() + off, sizeof(score));
    off += sizeof(score);
    const int32_t len = read_i32();
    if (len <= 0 || len > max_token_length) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": piece ", id, " has length ", len,
                                                     " (max_token_length ", max_token_length,
                                                     "); corrupt file?"));
    }
    if (data.size() - off < static_cast<size_t>(len)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": truncated in the bytes of piece ", id));
    }
    if (!std::isfinite(score)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": piece ", id, " has score ", score));
    }
    const std::string_view raw = data.substr(off, static_cast<size_t>(len));
    off += static_cast<size_t>(len);
    PieceSpec spec;
    spec.score = score;
    if (raw == "\n<s>\n" || raw == "<s>") {
      spec.piece = "<s>";
      spec.type = PieceType::kControl;
    } else if (raw == "\n</s>\n" || raw == "</s>") {
      spec.piece = "</s>";
      spec.type = PieceType::kControl;
    } else if (raw == "<unk>") {
      spec.piece = raw;
      spec.type = PieceType::kUnknown;
    } else if (ParseBytePiece(raw) >= 0) {
      spec.piece = raw;
      spec.type = PieceType::kByte;
    } else {
      for (const char c : raw) {  // llama2.c wrote U+2581 as ' '
        if (c == ' ') {
          spec.piece.append(kSpaceSymbol);
        } else {
          spec.piece.push_back(c);
        }
      }
    }
    specs.push_back(std::move(spec));
  }
  if (expected_vocab_size.has_value() &&
      static_cast<int64_t>(specs.size()) != *expected_vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": has ", specs.size(),
                                                   " pieces, expected ", *expected_vocab_size));
  }
  int byte_pieces = 0;
  for (const auto& s : specs) byte_pieces += s.type == PieceType::kByte;
  Options options;  // Llama's normalizer; the defaults of Options.
  options.byte_fallback = byte_pieces == 256;
  if (byte_pieces != 0 && byte_pieces != 256) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": has ", byte_pieces, " byte pieces; expected 0 or 256"));
  }
  return Build(path, std::move(specs), std::move(options));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadFromDirectory(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_regular_file(dir, ec) && fs::path(dir).extension() == ".gguf") return LoadFromGguf(dir);
  const fs::path base(dir);
  const std::string model = (base / "tokenizer.model").string();
  if (fs::exists(model, ec)) return LoadSentencePiece(model);
  const std::string bin = (base / "tokenizer.bin").string();
  if (fs::exists(bin, ec)) return LoadLlama2c(bin);
  std::vector<fs::path> ggufs;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".gguf") ggufs.push_back(e.path());
  }
  if (ggufs.size() == 1) return LoadFromGguf(ggufs[0].string());
  return absl::NotFoundError(absl::StrCat(
      dir, ": has neither tokenizer.model nor tokenizer.bin (nor exactly one .gguf file)"));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadFromGguf(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> f, GgufFile::Open(path));
  ASSIGN_OR_RETURN(std::string model, f->GetString("tokenizer.ggml.model"));
  if (model != "gpt2") {
    return absl::UnimplementedError(absl::StrCat(
        path, ": tokenizer.ggml.model '", model, "' is not supported (only byte-level BPE, 'gpt2')"));
  }
  std::string pre = "default";
  if (f->Has("tokenizer.ggml.pre")) {
    ASSIGN_OR_RETURN(pre, f->GetString("tokenizer.ggml.pre"));
  }
  bpe::ByteLevelOptions options;
  if (pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "codeshell") {
    options.split_digits = true;
  } else if (pre == "gpt-2" || pre == "default") {
    options.split_digits = false;
  } else {
    return absl::UnimplementedError(absl::StrCat(
        path, ": pre-tokenizer '", pre, "' is not supported (smollm, starcoder, gpt-2, default)"));
  }
  ASSIGN_OR_RETURN(const std::vector<std::string>* tokens, f->GetStringArray("tokenizer.ggml.tokens"));
  static const std::vector<std::string> kNoMerges;
  const std::vector<std::string>* merges = &kNoMerges;
  if (f->Has("tokenizer.ggml.merges")) {
    ASSIGN_OR_RETURN(merges, f->GetStringArray("tokenizer.ggml.merges"));
  }
  const std::vector<int64_t>* types = nullptr;
  if (f->Has("tokenizer.ggml.token_type")) {
    ASSIGN_OR_RETURN(types, f->GetIntArray("tokenizer.ggml.token_type"));
    if (types->size() != tokens->size()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", types->size(), " token types for ",
                                                     tokens->size(), " tokens"));
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<bpe::ByteLevelBpe> encoder,
                   bpe::ByteLevelBpe::Create(*tokens, *merges, options, path));
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  const size_t n = tokens->size();
  t->pieces_ = *tokens;
  t->scores_.assign(n, 0.0f);
  t->types_.assign(n, PieceType::kNormal);
  t->byte_value_.assign(n, 0);
  t->byte_to_id_.fill(-1);
  for (size_t i = 0; i < n; ++i) {
    int64_t type = types != nullptr ? (*types)[i] : 1;
    if (type < 1 || type > 6) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": token ", i, " has unknown token_type ", type));
    }
    // Byte-level vocabularies have no byte-fallback pieces; every token is bytes.
    if (type == static_cast<int64_t>(PieceType::kByte)) type = static_cast<int64_t>(PieceType::kNormal);
    t->types_[i] = static_cast<PieceType>(type);
    const bool reserved = t->types_[i] == PieceType::kControl || t->types_[i] == PieceType::kUnknown;
    (reserved ? t->reserved_ : t->mergeable_).emplace((*tokens)[i], static_cast<int32_t>(i));
  }
  auto id_or = [&](const char* key, int32_t fallback) -> absl::StatusOr<int32_t> {
    if (!f->Has(key)) return fallback;
    ASSIGN_OR_RETURN(int64_t v, f->GetInt(key));
    if (v < 0 || v >= static_cast<int64_t>(n)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", key, " = ", v, " is out of range"));
    }
    return static_cast<int32_t>(v);
  };
  ASSIGN_OR_RETURN(t->bos_id_, id_or("tokenizer.ggml.bos_token_id", -1));
  ASSIGN_OR_RETURN(t->eos_id_, id_or("tokenizer.ggml.eos_token_id", -1));
  ASSIGN_OR_RETURN(t->unk_id_, id_or("tokenizer.ggml.unknown_token_id", 0));
  t->add_bos_ = false;
  if (f->Has("tokenizer.ggml.add_bos_token")) {
    ASSIGN_OR_RETURN(t->add_bos_, f->GetBool("tokenizer.ggml.add_bos_token"));
  }
  t->normalizer_ = {/*add_dummy_prefix=*/false, /*remove_extra_whitespaces=*/false,
                    /*escape_whitespaces=*/false};
  t->unk_surface_ = "\xEF\xBF\xBD";
  t->bpe_ = std::move(encoder);
  t->IndexSurfaces();  // (byte-level decoding does not use them; kept complete)
  return t;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Build(const std::string& source,
                                                            std::vector<PieceSpec> specs,
                                                            Options options) {
  if (specs.empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": no pieces"));
  if (specs.size() > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": too many pieces"));
  }
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->normalizer_ = options.normalizer;
  t->byte_fallback_ = options.byte_fallback;
  t->unk_surface_ = std::move(options.unk_surface);
  t->byte_to_id_.fill(-1);
  const size_t n = specs.size();
  t->pieces_.reserve(n);
  t->scores_.reserve(n);
  t->types_.reserve(n);
  t->byte_value_.assign(n, 0);
  t->mergeable_.reserve(n);
  int32_t unk_id = -1;
  for (size_t i = 0; i < n; ++i) {
    PieceSpec& s = specs[i];
    const auto id = static_cast<int32_t>(i);
    const auto type_number = static_cast<int>(s.type);
    if (type_number < 1 || type_number > 6) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": piece ", id, " has unknown type ", type_number));
    }
    if (s.piece.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": piece ", id, " is empty"));
    }
    if (!std::isfinite(s.score)) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": piece ", id, " has non-finite score ", s.score));
    }
    switch (s.type) {
      case PieceType::kUserDefined:
        return absl::UnimplementedError(absl::StrCat(
            source, ": user-defined piece ", id, " ('", s.piece, "') is not supported"));
      case PieceType::kUnknown:
        if (unk_id >= 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(source, ": more than one unknown piece (", unk_id, " and ", id, ")"));
        }
        unk_id = id;
        break;
      case PieceType::kByte: {
        const int b = ParseBytePiece(s.piece);
        if (b < 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              source, ": byte piece ", id, " ('", s.piece, "') is not of the form <0xNN>"));
        }
        if (!options.byte_fallback) {
          return absl::InvalidArgumentError(absl::StrCat(
              source, ": byte piece ", id, " present although byte_fallback is false"));
        }
        t->byte_value_[i] = static_cast<uint8_t>(b);
        t->byte_to_id_[static_cast<size_t>(b)] = id;
        break;
      }
      case PieceType::kUnused:
        t->has_unused_ = true;
        break;
      default:
        break;
    }
    const bool mergeable = s.type == PieceType::kNormal || s.type == PieceType::kUnused;
    if (!(mergeable ? t->mergeable_ : t->reserved_).emplace(s.piece, id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": piece ", id, " ('", s.piece, "') is defined twice"));
    }
    t->pieces_.push_back(std::move(s.piece));
    t->scores_.push_back(s.score);
    t->types_.push_back(s.type);
  }
  if (unk_id < 0) return absl::InvalidArgumentError(absl::StrCat(source, ": no unknown piece"));
  if (options.byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      if (t->byte_to_id_[static_cast<size_t>(b)] < 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: byte_fallback is on but byte piece <0x%02X> is missing", source, b));
      }
    }
  }
  t->unk_id_ = unk_id;
  // As SentencePieceProcessor::bos_id(): the piece's id if it is a control.
  auto control_id = [&](const std::string& piece) {
    const auto it = t->reserved_.find(piece);
    return it != t->reserved_.end() && t->IsControl(it->second) ? it->second : -1;
  };
  t->bos_id_ = control_id(options.bos_piece);
  t->eos_id_ = control_id(options.eos_piece);
  t->IndexSurfaces();
  return t;
}

void Tokenizer::IndexSurfaces() {
  surfaces_.resize(pieces_.size());
  leading_space_.assign(pieces_.size(), 0);
  for (size_t id = 0; id < pieces_.size(); ++id) {
    const std::string_view piece = pieces_[id];
    std::string& s = surfaces_[id];
    s.clear();
    leading_space_[id] = piece.substr(0, kSpaceSymbol.size()) == kSpaceSymbol ? 1 : 0;
    for (size_t pos = 0; pos < piece.size();) {
      if (piece.substr(pos, kSpaceSymbol.size()) == kSpaceSymbol) {
        s.push_back(' ');
        pos += kSpaceSymbol.size();
      } else {
        s.push_back(piece[pos++]);
      }
    }
  }
}

// --- lookups -------------------------------------------------------------------

std::string_view Tokenizer::Piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return pieces_[static_cast<size_t>(id)];
}

float Tokenizer::Score(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return 0;
  return scores_[static_cast<size_t>(id)];
}

std::optional<int32_t> Tokenizer::PieceToId(std::string_view piece) const {
  if (auto it = reserved_.find(piece); it != reserved_.end()) return it->second;
  if (auto it = mergeable_.find(piece); it != mergeable_.end()) return it->second;
  return std::nullopt;
}

int32_t Tokenizer::LookupOrUnk(std::string_view piece) const {
  return PieceToId(piece).value_or(unk_id_);
}

// --- encoding ------------------------------------------------------------------

// SentencePiece's Normalizer::Normalize for an identity normalizer (no
// character map): optional removal of leading/trailing/repeated spaces, the
// dummy-prefix space, ' ' -> U+2581, and malformed UTF-8 -> U+FFFD per byte.
std::string Tokenizer::Normalize(std::string_view text) const {
  std::string out;
  const bool remove_ws = normalizer_.remove_extra_whitespaces;
  size_t pos = 0;
  if (remove_ws) {
    while (pos < text.size() && text[pos] == ' ') ++pos;
  }
  if (pos == text.size()) return out;  // empty, or only spaces that are removed
  out.reserve((text.size() - pos) * 3 / 2 + 3);
  const std::string_view space = normalizer_.escape_whitespaces ? kSpaceSymbol : " ";
  if (normalizer_.add_dummy_prefix) out.append(space);
  bool is_prev_space = remove_ws;
  while (pos < text.size()) {
    const int len = ScanUtf8(text.substr(pos));
    std::string_view ch = len > 0 ? text.substr(pos, static_cast<size_t>(len)) : kReplacementChar;
    pos += len > 0 ? static_cast<size_t>(len) : 1;
    if (is_prev_space && ch == " ") ch = {};
    if (!ch.empty()) {
      if (ch == " ") {
        out.append(space);
      } else {
        out.append(ch);
      }
      is_prev_space = ch == " ";
    }
    if (!remove_ws) is_prev_space = false;
  }
  if (remove_ws) {
    while (out.size() >= space.size() &&
           std::string_view(out).substr(out.size() - space.size()) == space) {
      out.resize(out.size() - space.size());
    }
  }
  return out;
}

// SentencePiece's bpe::Model::Encode: start from one symbol per character and
// repeatedly merge the adjacent pair whose concatenation is the vocabulary
// piece with the highest score (ties: leftmost), using a doubly linked list of
// symbols and a priority queue of candidate pairs. Stale queue entries are
// recognized by their length no longer matching. O(n log n).
std::vector<int32_t> Tokenizer::Encode(std::string_view text) const {
  if (bpe_) return bpe_->Encode(text);
  std::vector<int32_t> ids;
  const std::string norm = Normalize(text);
  if (norm.empty()) return ids;

  struct Symbol {
    int32_t prev;
    int32_t next;
    size_t begin;  // byte offset in `norm`
    uint32_t len;  // 0 once merged into its left neighbour
  };
  std::vector<Symbol> symbols;
  symbols.reserve(norm.size());
  for (size_t pos = 0; pos < norm.size();) {
    int len = ScanUtf8(std::string_view(norm).substr(pos));
    if (len <= 0) len = 1;  // cannot happen: Normalize() output is well-formed
    const auto index = static_cast<int32_t>(symbols.size());
    pos += static_cast<size_t>(len);
    symbols.push_back({index - 1, pos < norm.size() ? index + 1 : -1,
                       pos - static_cast<size_t>(len), static_cast<uint32_t>(len)});
  }
  auto view = [&](const Symbol& s) { return std::string_view(norm).substr(s.begin, s.len); };

  struct Pair {
    float score;
    int32_t left;
    int32_t right;
    uint32_t len;
  };
  struct PairOrder {  // top(): highest score, then smallest left index
    bool operator()(const Pair& a, const Pair& b) const {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    }
  };
  std::vector<Pair> storage;
  storage.reserve(symbols.size());
  std::priority_queue<Pair, std::vector<Pair>, PairOrder> agenda(PairOrder{}, std::move(storage));
  // Merged piece -> its two halves, for UNUSED pieces that must be split again.
  std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> rev_merge;

  auto maybe_add_pair = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const Symbol& l = symbols[static_cast<size_t>(left)];
    const Symbol& r = symbols[static_cast<size_t>(right)];
    const std::string_view merged = std::string_view(norm).substr(l.begin, l.len + r.len);
    const auto it = mergeable_.find(merged);
    if (it == mergeable_.end()) return;
    agenda.push({scores_[static_cast<size_t>(it->second)], left, right, l.len + r.len});
    if (has_unused_ && types_[static_cast<size_t>(it->second)] == PieceType::kUnused) {
      rev_merge[merged] = {view(l), view(r)};
    }
  };
  for (size_t i = 1; i < symbols.size(); ++i) {
    maybe_add_pair(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));
  }
  while (!agenda.empty()) {
    const Pair top = agenda.top();
    agenda.pop();
    Symbol& l = symbols[static_cast<size_t>(top.left)];
    Symbol& r = symbols[static_cast<size_t>(top.right)];
    if (l.len == 0 || r.len == 0 || l.len + r.len != top.len) continue;  // stale
    l.len += r.len;  // l absorbs r
    l.next = r.next;
    if (r.next >= 0) symbols[static_cast<size_t>(r.next)].prev = top.left;
    r.len = 0;
    maybe_add_pair(l.prev, top.left);
    maybe_add_pair(top.left, l.next);
  }

  ids.reserve(symbols.size());
  bool prev_unk = false;
  auto emit = [&](std::string_view piece, auto& self) -> void {
    const int32_t id = LookupOrUnk(piece);
    if (has_unused_ && types_[static_cast<size_t>(id)] == PieceType::kUnused) {
      if (auto it = rev_merge.find(piece); it != rev_merge.end()) {
        self(it->second.first, self);
        self(it->second.second, self);
        return;
      }
    }
    const bool is_unk = id == unk_id_;
    if (is_unk && byte_fallback_) {
      for (const char c : piece) ids.push_back(byte_to_id_[static_cast<uint8_t>(c)]);
    } else if (!(is_unk && prev_unk)) {  // without byte fallback, runs of unk merge
      ids.push_back(id);
    }
    prev_unk = is_unk;
  };
  for (int32_t i = 0; i >= 0; i = symbols[static_cast<size_t>(i)].next) {
    emit(view(symbols[static_cast<size_t>(i)]), emit);
  }
  return ids;
}

// --- decoding ------------------------------------------------------------------

bool Tokenizer::AppendDecodedPiece(int32_t id, bool strip_leading_space, std::string* out) const {
  if (id < 0 || id >= vocab_size() || IsUnknown(id)) {
    out->append(unk_surface_);
    return false;
  }
  if (IsControl(id)) return false;  // invisible
  if (IsByte(id)) {  // callers group byte pieces; a lone one is its raw byte
    AppendBytesAsUtf8(std::string_view(reinterpret_cast<const char*>(&byte_value_[static_cast<size_t>(id)]), 1), out);
    return false;
  }
  std::string_view surface = surfaces_[static_cast<size_t>(id)];  // U+2581 already ' '
  bool has_bos_ws = false;
  if (strip_leading_space &&
      (normalizer_.add_dummy_prefix || normalizer_.remove_extra_whitespaces)) {
    if (leading_space_[static_cast<size_t>(id)] != 0) {
      surface.remove_prefix(1);
      has_bos_ws = true;
    }
    // With whitespace removal, every leading space of the text is dropped.
    if (normalizer_.remove_extra_whitespaces) has_bos_ws = false;
  }
  out->append(surface);
  return has_bos_ws;
}

// SentencePieceProcessor::Decode: runs of byte pieces are decoded together;
// the dummy-prefix U+2581 is dropped from the first piece while the text is
// still empty and no such space has been dropped yet.
std::string_view Tokenizer::TokenBytes(int32_t id) const {
  if (!bpe_ || id < 0 || id >= vocab_size() || IsControl(id)) return {};
  return bpe_->TokenBytes(id);
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string text;
  if (bpe_) {  // byte-level: concatenate the bytes, then repair malformed UTF-8
    std::string bytes;
    for (const int32_t id : ids) {
      if (id < 0 || id >= vocab_size()) {
        AppendBytesAsUtf8(bytes, &text);
        bytes.clear();
        text.append(unk_surface_);
      } else {
        bytes.append(TokenBytes(id));
      }
    }
    AppendBytesAsUtf8(bytes, &text);
    return text;
  }
  std::string bytes;
  bool is_bos_ws = true;
  bool bos_ws_seen = false;
  for (const int32_t id : ids) {
    if (IsByte(id)) {
      bytes.push_back(static_cast<char>(byte_value_[static_cast<size_t>(id)]));
      continue;
    }
    AppendBytesAsUtf8(bytes, &text);
    bytes.clear();
    if (bos_ws_seen || !text.empty()) is_bos_ws = false;
    bos_ws_seen = AppendDecodedPiece(id, is_bos_ws, &text);
  }
  AppendBytesAsUtf8(bytes, &text);
  return text;
}

void StreamDecoder::DrainPending(bool at_end, std::string* out) {
  size_t off = 0;
  while (off < pending_.size()) {
    const int len = ScanUtf8(std::string_view(pending_).substr(off));
    if (len < 0 && !at_end) break;  // could still complete: hold back
    if (len > 0) {
      out->append(pending_, off, static_cast<size_t>(len));
      off += static_cast<size_t>(len);
    } else {  // malformed, or incomplete at the end of the run
      out->append(kReplacementChar);
      off += 1;
    }
  }
  pending_.erase(0, off);
}

std::string StreamDecoder::Push(int32_t id) {
  std::string out;
  if (tokenizer_.byte_level()) {
    if (id < 0 || id >= tokenizer_.vocab_size()) {
      DrainPending(/*at_end=*/true, &out);
      out.append("\xEF\xBF\xBD");
    } else {
      pending_.append(tokenizer_.TokenBytes(id));
      DrainPending(/*at_end=*/false, &out);
    }
  } else if (tokenizer_.IsByte(id)) {
    pending_.push_back(static_cast<char>(tokenizer_.ByteValue(id)));
    DrainPending(/*at_end=*/false, &out);
  } else {
    DrainPending(/*at_end=*/true, &out);  // a non-byte piece ends a byte run
    if (!out.empty()) text_nonempty_ = true;
    if (bos_ws_seen_ || text_nonempty_) is_bos_ws_ = false;
    bos_ws_seen_ = tokenizer_.AppendDecodedPiece(id, is_bos_ws_, &out);
  }
  if (!out.empty()) text_nonempty_ = true;
  return out;
}

std::string StreamDecoder::Flush() {
  std::string out;
  DrainPending(/*at_end=*/true, &out);
  if (!out.empty()) text_nonempty_ = true;
  return out;
}

}  // namespace strata
