// Tests for runtime/tokenizer.h against the real SentencePiece (Python module,
// run as a separate process by tests/tools/spm_reference.py), the golden
// llama2.c outputs in shared/data, and llama2.c's tokenizer.bin.
#include "runtime/tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace strata {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kPython = "/usr/bin/python3";

std::string SourceDir() {
  if (const char* env = std::getenv("STRATA_SOURCE_DIR"); env != nullptr && *env) return env;
  // runtime/tokenizer_test.cc -> the repository root.
  return fs::path(__FILE__).parent_path().parent_path().string();
}

std::string DataDir() {
  if (const char* env = std::getenv("STRATA_DATA_DIR"); env != nullptr && *env) return env;
  return (fs::path(SourceDir()) / ".." / "shared" / "data").lexically_normal().string();
}

std::string ModelPath() { return DataDir() + "/models/stories15M/tokenizer.model"; }
std::string Llama2cPath() { return DataDir() + "/models/stories15M-llama2c/tokenizer.bin"; }

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, std::string_view data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

std::vector<std::string> MobyDickLines() {
  std::vector<std::string> lines;
  std::istringstream in(ReadFile(DataDir() + "/text/moby_dick.txt"));
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

json Golden() {
  const std::string text = ReadFile(DataDir() + "/golden/stories15M_greedy.json");
  return json::parse(text);
}

std::vector<int32_t> Ids(const json& j) { return j.get<std::vector<int32_t>>(); }

std::string TempPath(const std::string& name) {
  static int counter = 0;
  return (fs::temp_directory_path() /
          ("strata_tokenizer_test_" + std::to_string(getpid()) + "_" +
           std::to_string(counter++) + "_" + name))
      .string();
}

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Runs `command`, returning its stdout and exit status.
std::pair<std::string, int> RunCommand(const std::string& command) {
  std::string output;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return {"", -1};
  char buf[1 << 16];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), pipe)) > 0;) output.append(buf, n);
  const int status = pclose(pipe);
  return {output, WIFEXITED(status) ? WEXITSTATUS(status) : -1};
}

std::string ReferenceScript() { return SourceDir() + "/tests/tools/spm_reference.py"; }

bool ReferenceAvailable(std::string* why) {
  if (!fs::exists(kPython)) {
    *why = std::string(kPython) + " is missing";
    return false;
  }
  const auto [out, rc] =
      RunCommand(std::string(kPython) + " " + ShellQuote(ReferenceScript()) + " --check");
  if (rc == 3) {
    *why = std::string(kPython) + " has no sentencepiece module (apt install python3-sentencepiece)";
    return false;
  }
  return true;  // any other failure shows up (and fails) in the real run
}

bool IsValidUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<uint8_t>(s[i]);
    int n = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + static_cast<size_t>(n) > s.size()) return false;
    for (int k = 1; k < n; ++k) {
      if ((static_cast<uint8_t>(s[i + static_cast<size_t>(k)]) & 0xC0) != 0x80) return false;
    }
    i += static_cast<size_t>(n);
  }
  return true;
}

std::string IdsToString(const std::vector<int32_t>& ids, size_t limit = 40) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size() && i < limit; ++i) {
    if (i > 0) out += ',';
    out += std::to_string(ids[i]);
  }
  if (ids.size() > limit) out += ",...(" + std::to_string(ids.size()) + " ids)";
  return out + "]";
}

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto spm = Tokenizer::LoadSentencePiece(ModelPath());
    ASSERT_TRUE(spm.ok()) << spm.status();
    spm_ = std::move(spm).value().release();
  }
  static void TearDownTestSuite() {
    delete spm_;
    spm_ = nullptr;
  }
  static const Tokenizer& tok() { return *spm_; }
  static Tokenizer* spm_;
};
Tokenizer* TokenizerTest::spm_ = nullptr;

TEST_F(TokenizerTest, VocabularyBasics) {
  EXPECT_EQ(tok().vocab_size(), 32000);
  EXPECT_EQ(tok().unk_id(), 0);
  EXPECT_EQ(tok().bos_id(), 1);
  EXPECT_EQ(tok().eos_id(), 2);
  EXPECT_EQ(tok().Piece(1), "<s>");
  EXPECT_EQ(tok().Piece(29871), "\xE2\x96\x81");
  EXPECT_EQ(tok().Piece(-1), "");
  EXPECT_EQ(tok().Piece(32000), "");
  EXPECT_EQ(tok().PieceToId("<0x0A>"), 13);
  EXPECT_EQ(tok().PieceToId("\xE2\x96\x81hello"), 22172);
  EXPECT_EQ(tok().PieceToId("no such piece"), std::nullopt);
  EXPECT_TRUE(tok().IsByte(3));
  EXPECT_TRUE(tok().IsByte(258));
  EXPECT_FALSE(tok().IsByte(259));
  EXPECT_TRUE(tok().IsControl(1));
  EXPECT_FALSE(tok().IsControl(0));
  EXPECT_FALSE(tok().IsControl(32000));
  EXPECT_TRUE(tok().normalizer().add_dummy_prefix);
  EXPECT_FALSE(tok().normalizer().remove_extra_whitespaces);
}

TEST_F(TokenizerTest, SmallCases) {
  // Known SentencePiece results (checked with sp.encode).
  EXPECT_EQ(tok().Encode(""), std::vector<int32_t>{});
  EXPECT_EQ(tok().Encode(" hello"), (std::vector<int32_t>{29871, 22172}));
  EXPECT_EQ(tok().Encode("\n"), (std::vector<int32_t>{29871, 13}));
  EXPECT_EQ(tok().Encode("\xF0\x9F\x90\xB6"), (std::vector<int32_t>{29871, 243, 162, 147, 185}));
  EXPECT_EQ(tok().Encode("<s>"), (std::vector<int32_t>{529, 29879, 29958}));
  EXPECT_EQ(tok().Decode({29871, 29871, 22172}), "  hello");  // only one dummy space dropped
  EXPECT_EQ(tok().Decode({1, 29871, 22172}), " hello");
  EXPECT_EQ(tok().Decode({243, 162}), "\xEF\xBF\xBD\xEF\xBF\xBD");  // incomplete: U+FFFD per byte
  EXPECT_EQ(tok().Decode({0, 5}), " \xE2\x81\x87 \x02");
  // Malformed UTF-8 input is read as U+FFFD per byte, which is in the vocab.
  const std::vector<int32_t> replacement = tok().Encode("\xEF\xBF\xBD");
  EXPECT_EQ(tok().Encode("\xFF"), replacement);
  // Control pieces are never produced from text.
  for (int32_t id : tok().Encode("<s></s><unk> <s>")) EXPECT_FALSE(tok().IsControl(id));
}

// Test 1: every Moby-Dick line, the golden prompts and edge cases against
// Python SentencePiece; also Decode of golden and random id sequences.
TEST_F(TokenizerTest, MatchesPythonSentencePiece) {
  std::string why;
  if (!ReferenceAvailable(&why)) GTEST_SKIP() << why;

  std::vector<std::string> texts = MobyDickLines();
  const size_t num_moby_lines = texts.size();
  ASSERT_GT(num_moby_lines, 20000u);
  const json golden = Golden();
  for (const auto& c : golden["cases"]) texts.push_back(c["prompt"].get<std::string>());
  for (const char* edge :
       {"", " ", "  ", "   ", " a", "a ", "  leading and trailing  ", "multiple   inner    spaces",
        "\n", "\n\n", "\t", " \n ", "line\nbreak", "\r\n", "emoji \xF0\x9F\x90\xB6\xF0\x9F\x98\x80!",
        "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE6\x96\x87\xE7\xAB\xA0",  // CJK
        "caf\xC3\xA9 na\xC3\xAFve \xC3\x85ngstr\xC3\xB6m", "\xE2\x96\x81" "already escaped",
        "<s> </s> <unk> <0x41>", "1234567890 3.14159", "\x01\x02\x7F",
        "\xEF\xBF\xBD", "\xC3\x97\xE2\x80\x94\xE2\x80\x9Cquoted\xE2\x80\x9D",
        // Equal-score merges at several positions (the leftmost must win).
        "aaa bbb ccc ddd eee fff ggg hhh iii jjj kkk lll mmm nnn ooo ppp qqq rrr sss ttt uuu",
        "vvv www xxx yyy zzz AAA EEE OOO", "ooooo eeeee sssss", "!!! ??? ... --- === ***",
        "!!!!! ????? ..... ----- ===== *****", "\xE2\x80\x94\xE2\x80\x94\xE2\x80\x94"}) {
    texts.push_back(edge);
  }
  texts.push_back(ReadFile(DataDir() + "/text/moby_dick.txt"));  // the whole book at once

  // Id sequences for decode: golden outputs (with BOS inside) and random ones.
  std::vector<std::vector<int32_t>> id_lists;
  for (const auto& c : golden["cases"]) {
    id_lists.push_back(Ids(c["output_ids_ignore_bos"]));
    std::vector<int32_t> all = Ids(c["prompt_ids"]);
    for (int32_t id : Ids(c["output_ids"])) all.push_back(id);
    id_lists.push_back(all);
  }
  std::mt19937 rng(1234);
  for (int n = 0; n < 500; ++n) {
    std::vector<int32_t> ids;
    const int len = static_cast<int>(rng() % 12);
    for (int k = 0; k < len; ++k) {
      switch (rng() % 4) {
        case 0: ids.push_back(static_cast<int32_t>(3 + rng() % 256)); break;  // byte piece
        case 1: ids.push_back(static_cast<int32_t>(rng() % 3)); break;        // unk / control
        case 2: ids.push_back(29871); break;                                  // lone U+2581
        default: ids.push_back(static_cast<int32_t>(rng() % 32000)); break;
      }
    }
    id_lists.push_back(ids);
  }

  const std::string input_path = TempPath("reference_in.json");
  WriteFile(input_path, json{{"texts", texts}, {"id_lists", id_lists}}.dump());
  const auto [out, rc] = RunCommand(std::string(kPython) + " " + ShellQuote(ReferenceScript()) +
                                    " --model " + ShellQuote(ModelPath()) + " --input " +
                                    ShellQuote(input_path));
  fs::remove(input_path);
  ASSERT_EQ(rc, 0) << "spm_reference.py failed; output: " << out.substr(0, 2000);
  const json ref = json::parse(out);
  ASSERT_EQ(ref["ids"].size(), texts.size());
  ASSERT_EQ(ref["decoded_id_lists"].size(), id_lists.size());

  int encode_mismatches = 0, decode_mismatches = 0;
  size_t reference_tokens = 0;
  std::ostringstream report;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::vector<int32_t> want = Ids(ref["ids"][i]);
    reference_tokens += want.size();
    const std::vector<int32_t> got = tok().Encode(texts[i]);
    if (got != want && ++encode_mismatches <= 5) {
      report << "encode mismatch, text " << i << " '" << texts[i].substr(0, 100)
             << "':\n  got  " << IdsToString(got) << "\n  want " << IdsToString(want) << "\n";
    }
    const std::string want_text = ref["decoded"][i].get<std::string>();
    if (tok().Decode(want) != want_text && ++decode_mismatches <= 5) {
      report << "decode mismatch, text " << i << ": got '" << tok().Decode(want).substr(0, 100)
             << "' want '" << want_text.substr(0, 100) << "'\n";
    }
  }
  for (size_t i = 0; i < id_lists.size(); ++i) {
    const std::string want = ref["decoded_id_lists"][i].get<std::string>();
    const std::string got = tok().Decode(id_lists[i]);
    if (got != want && ++decode_mismatches <= 5) {
      report << "decode mismatch, id list " << i << " " << IdsToString(id_lists[i]) << ": got '"
             << got.substr(0, 100) << "' want '" << want.substr(0, 100) << "'\n";
    }
  }
  std::printf(
      "[ reference ] sentencepiece %s: %zu texts (%zu Moby-Dick lines + prompts + edge cases + "
      "whole book; %zu reference tokens) and %zu id lists compared; %d encode and %d decode "
      "mismatches\n",
      ref["sentencepiece_version"].get<std::string>().c_str(), texts.size(), num_moby_lines,
      reference_tokens, id_lists.size(), encode_mismatches, decode_mismatches);
  EXPECT_EQ(encode_mismatches, 0) << report.str();
  EXPECT_EQ(decode_mismatches, 0) << report.str();
}

// Test 2: [BOS] + Encode(prompt) == prompt_ids of the golden llama2.c runs, and
// Decode(prompt + output) == the golden text.
TEST_F(TokenizerTest, GoldenPrompts) {
  const json golden = Golden();
  ASSERT_EQ(golden["cases"].size(), 8u);
  for (const auto& c : golden["cases"]) {
    SCOPED_TRACE(c["id"].get<std::string>());
    std::vector<int32_t> ids = {tok().bos_id()};
    for (int32_t id : tok().Encode(c["prompt"].get<std::string>())) ids.push_back(id);
    EXPECT_EQ(ids, Ids(c["prompt_ids"]));
    std::vector<int32_t> all = Ids(c["prompt_ids"]);
    for (int32_t id : Ids(c["output_ids"])) all.push_back(id);
    EXPECT_EQ(tok().Decode(all), c["text"].get<std::string>());
  }
}

// Test 3: llama2.c's tokenizer.bin is the same tokenizer.
TEST_F(TokenizerTest, Llama2cMatchesSentencePiece) {
  auto bin = Tokenizer::LoadLlama2c(Llama2cPath(), 32000);
  ASSERT_TRUE(bin.ok()) << bin.status();
  const Tokenizer& b = **bin;
  ASSERT_EQ(b.vocab_size(), tok().vocab_size());
  EXPECT_EQ(b.bos_id(), tok().bos_id());
  EXPECT_EQ(b.eos_id(), tok().eos_id());
  EXPECT_EQ(b.unk_id(), tok().unk_id());
  int piece_mismatches = 0;
  for (int32_t id = 0; id < b.vocab_size(); ++id) {
    if (b.Piece(id) != tok().Piece(id) || b.Score(id) != tok().Score(id) ||
        b.IsByte(id) != tok().IsByte(id) || b.IsControl(id) != tok().IsControl(id)) {
      if (++piece_mismatches <= 5) {
        ADD_FAILURE() << "id " << id << ": '" << b.Piece(id) << "' vs '" << tok().Piece(id) << "'";
      }
    }
  }
  EXPECT_EQ(piece_mismatches, 0);

  std::vector<std::string> texts;
  for (const auto& c : Golden()["cases"]) texts.push_back(c["prompt"].get<std::string>());
  const std::vector<std::string> lines = MobyDickLines();
  for (size_t i = 0; i < lines.size(); i += 7) texts.push_back(lines[i]);
  int mismatches = 0;
  for (const std::string& t : texts) {
    if (b.Encode(t) != tok().Encode(t) && ++mismatches <= 5) {
      ADD_FAILURE() << "encode differs for '" << t << "'";
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << texts.size() << " texts";

  // LoadFromDirectory prefers tokenizer.model and falls back to tokenizer.bin.
  auto from_dir = Tokenizer::LoadFromDirectory(DataDir() + "/models/stories15M-llama2c");
  ASSERT_TRUE(from_dir.ok()) << from_dir.status();
  EXPECT_EQ((*from_dir)->Encode("Once upon a time"), tok().Encode("Once upon a time"));
  auto from_model_dir = Tokenizer::LoadFromDirectory(DataDir() + "/models/stories15M");
  ASSERT_TRUE(from_model_dir.ok()) << from_model_dir.status();
  EXPECT_EQ((*from_model_dir)->vocab_size(), 32000);
}

// Pushes ids one at a time; checks that every delta is valid UTF-8 and
// returns the concatenation.
std::string StreamAll(const Tokenizer& t, const std::vector<int32_t>& ids, bool check_utf8) {
  StreamDecoder dec(t);
  std::string all;
  for (int32_t id : ids) {
    const std::string delta = dec.Push(id);
    if (check_utf8) {
      EXPECT_TRUE(IsValidUtf8(delta)) << "delta after id " << id;
    }
    all += delta;
  }
  all += dec.Flush();
  return all;
}

// Test 4: streaming deltas concatenate to Decode().
TEST_F(TokenizerTest, StreamDecoderMatchesDecode) {
  for (const auto& c : Golden()["cases"]) {
    SCOPED_TRACE(c["id"].get<std::string>());
    const std::vector<int32_t> out = Ids(c["output_ids_ignore_bos"]);
    EXPECT_EQ(StreamAll(tok(), out, true), tok().Decode(out));
    std::vector<int32_t> all = Ids(c["prompt_ids"]);
    for (int32_t id : out) all.push_back(id);
    EXPECT_EQ(StreamAll(tok(), all, true), tok().Decode(all));
  }
  // The emoji's four byte pieces: nothing until the character is complete.
  StreamDecoder dec(tok());
  EXPECT_EQ(dec.Push(1), "");
  EXPECT_EQ(dec.Push(29871), "");  // dummy-prefix space dropped
  EXPECT_EQ(dec.Push(243), "");
  EXPECT_EQ(dec.Push(162), "");
  EXPECT_EQ(dec.Push(147), "");
  EXPECT_EQ(dec.Push(185), "\xF0\x9F\x90\xB6");
  EXPECT_EQ(dec.Push(29871), " ");
  EXPECT_EQ(dec.Push(3 + 0xC3), "");
  EXPECT_EQ(dec.Flush(), "\xEF\xBF\xBD");  // incomplete at the end
  // A byte that can never start a character is emitted at once.
  StreamDecoder dec2(tok());
  EXPECT_EQ(dec2.Push(3 + 0xFF), "\xEF\xBF\xBD");

  // Random sequences, rich in byte pieces and (invalid) UTF-8 fragments.
  std::mt19937 rng(99);
  for (int n = 0; n < 3000; ++n) {
    std::vector<int32_t> ids;
    const int len = static_cast<int>(rng() % 16);
    for (int k = 0; k < len; ++k) {
      const uint32_t r = rng() % 8;
      if (r < 4) {
        static const int kLeads[] = {0xC3, 0xE2, 0xE6, 0xF0, 0xF4, 0xED, 0xE0, 0x80, 0x41};
        ids.push_back(3 + (r == 0 ? kLeads[rng() % 9] : static_cast<int>(0x80 + rng() % 64)));
      } else if (r == 4) {
        ids.push_back(static_cast<int32_t>(rng() % 259));
      } else if (r == 5) {
        ids.push_back(29871);
      } else {
        ids.push_back(static_cast<int32_t>(rng() % 32000));
      }
    }
    ASSERT_EQ(StreamAll(tok(), ids, false), tok().Decode(ids)) << IdsToString(ids);
  }
}

// Test 5: bad files give an error naming the file, never a crash.
TEST(TokenizerBadFiles, ErrorsNameTheFile) {
  auto expect_error = [](const absl::Status& s, const std::string& path) {
    EXPECT_FALSE(s.ok()) << path;
    EXPECT_NE(s.message().find(path), std::string_view::npos) << s;
  };
  const std::string missing = TempPath("does_not_exist.model");
  expect_error(Tokenizer::LoadSentencePiece(missing).status(), missing);
  EXPECT_EQ(Tokenizer::LoadSentencePiece(missing).status().code(), absl::StatusCode::kNotFound);
  expect_error(Tokenizer::LoadLlama2c(missing).status(), missing);
  const std::string empty_dir = TempPath("empty_dir");
  fs::create_directories(empty_dir);
  expect_error(Tokenizer::LoadFromDirectory(empty_dir).status(), empty_dir);
  expect_error(Tokenizer::LoadSentencePiece(empty_dir).status(), empty_dir);

  const std::string model = ReadFile(ModelPath());
  const std::string bin = ReadFile(Llama2cPath());
  ASSERT_GT(model.size(), 1000u);
  ASSERT_GT(bin.size(), 1000u);
  std::mt19937 rng(7);
  std::string random(100000, '\0');
  for (char& c : random) c = static_cast<char>(rng());

  struct Case {
    std::string name, data;
  };
  std::vector<Case> cases = {
      {"empty", ""},
      {"random", random},
      {"random_small", random.substr(0, 7)},
      {"model_half", model.substr(0, model.size() / 2)},
      {"model_minus1", model.substr(0, model.size() - 1)},
      {"model_minus2", model.substr(0, model.size() - 2)},
      {"model_minus40", model.substr(0, model.size() - 40)},
      {"bin_half", bin.substr(0, bin.size() / 2)},
      {"bin_minus3", bin.substr(0, bin.size() - 3)},
  };
  for (int k = 0; k < 20; ++k) {  // more random prefixes of the real files
    cases.push_back({"model_cut" + std::to_string(k), model.substr(0, rng() % model.size())});
    cases.push_back({"bin_cut" + std::to_string(k), bin.substr(0, rng() % bin.size())});
  }
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = TempPath(c.name);
    WriteFile(path, c.data);
    // Every case is a bad SentencePiece model. tokenizer.bin cuts are caught
    // whenever they split an entry, or by the expected vocabulary size.
    expect_error(Tokenizer::LoadSentencePiece(path).status(), path);
    if (c.name.rfind("model", 0) != 0) {
      expect_error(Tokenizer::LoadLlama2c(path, 32000).status(), path);
    }
    if (c.name.rfind("bin", 0) != 0) {
      expect_error(Tokenizer::LoadLlama2c(path).status(), path);
    }
    fs::remove(path);
  }
  // The real files the wrong way round.
  expect_error(Tokenizer::LoadSentencePiece(Llama2cPath()).status(), Llama2cPath());
  expect_error(Tokenizer::LoadLlama2c(ModelPath()).status(), ModelPath());
  fs::remove_all(empty_dir);
}

TEST_F(TokenizerTest, EncodeSpeed) {
  const std::vector<std::string> lines = MobyDickLines();
  const std::string book = ReadFile(DataDir() + "/text/moby_dick.txt");
  auto t0 = std::chrono::steady_clock::now();
  size_t line_tokens = 0;
  for (const std::string& line : lines) line_tokens += tok().Encode(line).size();
  auto t1 = std::chrono::steady_clock::now();
  const size_t book_tokens = tok().Encode(book).size();
  auto t2 = std::chrono::steady_clock::now();
  const double line_s = std::chrono::duration<double>(t1 - t0).count();
  const double book_s = std::chrono::duration<double>(t2 - t1).count();
  std::printf(
      "[ speed ] moby_dick %zu bytes: per line %zu tokens in %.3f s (%.0f tokens/s, %.1f MB/s); "
      "whole book %zu tokens in %.3f s (%.0f tokens/s)\n",
      book.size(), line_tokens, line_s, line_tokens / line_s, book.size() / line_s / 1e6,
      book_tokens, book_s, book_tokens / book_s);
  EXPECT_LT(book_s, 10.0) << "encoding looks super-linear";
}

}  // namespace
}  // namespace strata
