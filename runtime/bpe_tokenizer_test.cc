// Tests for the byte-level BPE (runtime/bpe_tokenizer.h) and
// Tokenizer::LoadFromGguf: the pre-tokenizer regex on hand-derived cases,
// merge ranking on a toy vocabulary, and, with SmolLM2's GGUF
// (tools/fetch_smollm2.sh), id-for-id equality with Hugging Face's
// `tokenizers` on the whole of Moby-Dick, run as a separate process by
// tests/tools/bpe_reference.py (interpreter: tests/tools/make_reference_venv.py).
#include "runtime/bpe_tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "runtime/tokenizer.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string SourceDir() {
  if (const char* env = std::getenv("STRATA_SOURCE_DIR"); env != nullptr && *env) return env;
  return fs::path(__FILE__).parent_path().parent_path().string();
}

std::string DataDir() {
  if (const char* env = std::getenv("STRATA_DATA_DIR"); env != nullptr && *env) return env;
  return (fs::path(SourceDir()) / ".." / "shared" / "data").lexically_normal().string();
}

std::string SmolLm2Path() {
  if (const char* p = std::getenv("STRATA_SMOLLM2_GGUF"); p != nullptr && *p) return p;
  std::string cache;
  if (const char* c = std::getenv("STRATA_MODEL_CACHE"); c != nullptr && *c) {
    cache = c;
  } else if (const char* home = std::getenv("HOME"); home != nullptr) {
    cache = std::string(home) + "/.cache/strata/models";
  }
  return cache + "/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf";
}

std::string ReferencePython() {
  if (const char* p = std::getenv("STRATA_REF_PYTHON"); p != nullptr && *p) return p;
  std::string venv;
  if (const char* v = std::getenv("STRATA_REF_VENV"); v != nullptr && *v) {
    venv = v;
  } else if (const char* home = std::getenv("HOME"); home != nullptr) {
    venv = std::string(home) + "/.cache/strata/venv";
  }
  if (fs::exists(venv + "/bin/python")) return venv + "/bin/python";
  return "/usr/bin/python3";
}

std::pair<std::string, int> RunCommand(const std::string& command) {
  std::string output;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return {"", -1};
  char buf[1 << 16];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), pipe)) > 0;) output.append(buf, n);
  const int status = pclose(pipe);
  return {output, WIFEXITED(status) ? WEXITSTATUS(status) : -1};
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A toy byte-level vocabulary: the 256 byte tokens, then merged tokens.
std::vector<std::string> ToyTokens(const std::vector<std::string>& extra) {
  const auto& a = bpe::ByteLevelBpe::ByteAlphabet();
  std::vector<std::string> t(a.begin(), a.end());
  t.insert(t.end(), extra.begin(), extra.end());
  return t;
}

std::unique_ptr<bpe::ByteLevelBpe> Toy(const std::vector<std::string>& extra,
                                       const std::vector<std::string>& merges) {
  auto t = bpe::ByteLevelBpe::Create(ToyTokens(extra), merges, {}, "toy");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

TEST(ByteLevelBpe, ByteAlphabetIsGpt2s) {
  const auto& a = bpe::ByteLevelBpe::ByteAlphabet();
  std::set<std::string> distinct(a.begin(), a.end());
  EXPECT_EQ(distinct.size(), 256u);
  EXPECT_EQ(a[' '], "\xC4\xA0");   // U+0120 'Ġ'
  EXPECT_EQ(a['\n'], "\xC4\x8A");  // U+010A 'Ċ'
  EXPECT_EQ(a['A'], "A");
  EXPECT_EQ(a[0xAD], "\xC5\x83");  // soft hyphen -> U+0143, the last remapped byte
}

TEST(ByteLevelBpe, PreTokenizerFollowsTheRegex) {
  auto t = Toy({}, {});
  ASSERT_NE(t, nullptr);
  auto split = [&](std::string_view s) {
    std::vector<std::string> out;
    for (auto p : t->PreTokenize(s)) out.emplace_back(p);
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(split("Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(split("I'm here, don't"), (V{"I", "'m", " here", ",", " don", "'t"}));
  EXPECT_EQ(split("they're we'll"), (V{"they", "'re", " we", "'ll"}));
  EXPECT_EQ(split("a  b"), (V{"a", " ", " b"}));         // last space joins the word
  EXPECT_EQ(split("a\n\nb"), (V{"a", "\n", "\n", "b"}));  // (?!\S) backs off one
  EXPECT_EQ(split("x   "), (V{"x", "   "}));              // trailing run stays whole
  EXPECT_EQ(split("abc 123"), (V{"abc", " ", "1", "2", "3"}));  // digits one by one
  EXPECT_EQ(split("$$$ ok!?"), (V{"$$$", " ok", "!?"}));
  EXPECT_EQ(split(" 'S"), (V{" '", "S"}));  // contractions are lower-case only
  EXPECT_EQ(split("caf\xC3\xA9 na\xC3\xAFve \xE2\x82\xAC" "5"),
            (V{"caf\xC3\xA9", " na\xC3\xAFve", " \xE2\x82\xAC", "5"}));
  EXPECT_EQ(split("\xFF\xFEz"), (V{"\xFF\xFE", "z"}));  // malformed bytes are "other"
  EXPECT_TRUE(split("").empty());
}

TEST(ByteLevelBpe, MergesByRankLeftmostFirst) {
  // Ranks: "a a" (0) beats "b c" (1) beats "ab c" (2); "a b" (3).
  auto t = Toy({"aa", "bc", "abc", "ab"}, {"a a", "b c", "ab c", "a b"});
  ASSERT_NE(t, nullptr);
  const int aa = 256, bc = 257, abc = 258, ab = 259;
  EXPECT_EQ(t->Encode("aaa"), (std::vector<int32_t>{aa, 'a'}));  // leftmost pair first
  // "abc": "b c" (rank 1) applies before "a b" (rank 3): a + bc, and no merge makes "abc".
  EXPECT_EQ(t->Encode("abc"), (std::vector<int32_t>{'a', bc}));
  EXPECT_EQ(t->Encode("ab"), (std::vector<int32_t>{ab}));
  (void)abc;
  EXPECT_EQ(t->TokenBytes(ab), "ab");
  EXPECT_EQ(t->TokenBytes(0), std::string(1, '\0'));  // token b stands for byte b here
  EXPECT_EQ(t->TokenBytes(' '), " ");
}

TEST(ByteLevelBpe, BadVocabulariesAreRejected) {
  auto missing_byte = ToyTokens({});
  missing_byte.erase(missing_byte.begin());  // byte 0: dropped when encoding
  auto m = bpe::ByteLevelBpe::Create(missing_byte, {}, {}, "v");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->Encode(std::string("A\0B", 3)), (std::vector<int32_t>{'A' - 1, 'B' - 1}));
  EXPECT_EQ(bpe::ByteLevelBpe::Create(ToyTokens({}), {"a"}, {}, "v").status().code(),
            absl::StatusCode::kInvalidArgument);
  auto s = bpe::ByteLevelBpe::Create(ToyTokens({}), {"a b"}, {}, "v.gguf");  // "ab" not in vocab
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("v.gguf: merge 0"), std::string::npos) << s.status();
  EXPECT_EQ(bpe::ByteLevelBpe::Create(ToyTokens({"A"}), {}, {}, "v").status().code(),
            absl::StatusCode::kInvalidArgument);  // duplicate token
}

class SmolLm2TokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = SmolLm2Path();
    if (!fs::exists(path_)) {
      GTEST_SKIP() << path_ << " is absent: run tools/fetch_smollm2.sh (or set STRATA_SMOLLM2_GGUF)";
    }
    auto t = Tokenizer::LoadFromGguf(path_);
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = std::move(*t);
  }
  std::string path_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(SmolLm2TokenizerTest, Vocabulary) {
  EXPECT_TRUE(tok_->byte_level());
  EXPECT_EQ(tok_->vocab_size(), 49152);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_FALSE(tok_->add_bos());
  EXPECT_EQ(tok_->Piece(1), "<|im_start|>");
  EXPECT_TRUE(tok_->IsControl(1));
  EXPECT_EQ(tok_->Decode({1, 19556, 905, 2}), "Hello world");  // controls are invisible
  // The directory loader finds the .gguf beside the model.
  auto d = Tokenizer::LoadFromDirectory(fs::path(path_).parent_path().string());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ((*d)->vocab_size(), 49152);
}

TEST_F(SmolLm2TokenizerTest, MatchesHuggingFaceTokenizersOnMobyDick) {
  const std::string python = ReferencePython();
  const std::string script = SourceDir() + "/tests/tools/bpe_reference.py";
  if (RunCommand(python + " " + script + " --check 2>&1").second != 0) {
    GTEST_SKIP() << python << " lacks the PyPI modules tokenizers and gguf: run "
                 << "/usr/bin/python3 tests/tools/make_reference_venv.py";
  }
  const std::string moby = DataDir() + "/text/moby_dick.txt";
  const std::vector<std::string> texts = {
      "Hello world",
      "Call me Ishmael. Some years ago\xE2\x80\x94never mind how long precisely\xE2\x80\x94",
      "  leading spaces, trailing   \n\n\n tabs\tand 1234567 digits 3.14",
      "caf\xC3\xA9 na\xC3\xAFve \xE2\x82\xAC" "5 \xF0\x9F\x90\xB6 \xE4\xB8\xAD\xE6\x96\x87 I'm they're 'S",
      "<|im_start|>user\nhi<|im_end|>",  // special tokens are plain text in Encode
      "",
  };
  json request = {{"texts", texts}, {"files", {moby}}, {"split_digits", true}};
  const std::string in = (fs::temp_directory_path() /
                          ("strata_bpe_ref_" + std::to_string(getpid()) + ".json")).string();
  std::ofstream(in) << request.dump();
  const auto [out, rc] = RunCommand(python + " " + script + " --gguf '" + path_ + "' --input " + in);
  fs::remove(in);
  ASSERT_EQ(rc, 0) << out;
  const json ref = json::parse(out);
  std::vector<std::string> all = texts;
  all.push_back(ReadFile(moby));
  ASSERT_GT(all.back().size(), 1000000u) << moby;
  ASSERT_EQ(ref["ids"].size(), all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    const auto want = ref["ids"][i].get<std::vector<int32_t>>();
    const auto got = tok_->Encode(all[i]);
    size_t k = 0;
    while (k < want.size() && k < got.size() && want[k] == got[k]) ++k;
    EXPECT_EQ(got.size(), want.size()) << "text " << i;
    EXPECT_EQ(k, want.size()) << "text " << i << ": first difference at id " << k << " of "
                              << want.size();
    EXPECT_EQ(tok_->Decode(got), all[i]) << "text " << i;  // byte-level BPE is lossless
    EXPECT_EQ(ref["decoded"][i].get<std::string>(), all[i]) << "reference decode, text " << i;
  }
  std::printf("Moby-Dick: %zu bytes -> %zu tokens (tokenizers %s)\n", all.back().size(),
              ref["ids"].back().size(), ref["tokenizers_version"].get<std::string>().c_str());
}

TEST_F(SmolLm2TokenizerTest, StreamDecoderMatchesDecode) {
  // Multi-byte characters split across tokens must be held back, not broken.
  const std::string text = "na\xC3\xAFve \xF0\x9F\x90\xB6\xF0\x9F\x90\xB1 \xE4\xB8\xAD\xE6\x96\x87, fin.";
  const auto ids = tok_->Encode(text);
  StreamDecoder dec(*tok_);
  std::string streamed;
  for (int32_t id : ids) {
    const std::string piece = dec.Push(id);
    streamed += piece;
  }
  streamed += dec.Flush();
  EXPECT_EQ(streamed, text);
  EXPECT_EQ(tok_->Decode(ids), text);
}

}  // namespace
}  // namespace strata
