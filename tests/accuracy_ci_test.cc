// Accuracy in CI: the perplexity harness (worker/eval_ppl.h) on small budgets.
//  * The harness itself: scored through prefill + decode steps, its mean NLL
//    on the golden Moby-Dick tokens equals run.c's teacher-forced log-probs.
//  * stories15M on Moby-Dick, a few hundred tokens: int8/dynamic must stay
//    within its perplexity bound vs the fp16 cache (docs/accuracy.md), and
//    static int8 calibrated on other text within its own.
//  * SmolLM2-135M (GGUF, GQA), when fetched (tools/fetch_smollm2.sh): logits
//    for a short prompt match an independent numpy forward pass
//    (tests/tools/smollm2_reference.py), and perplexity on Moby-Dick is sane.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <sys/wait.h>
#include <unistd.h>

#include "gtest/gtest.h"
#include "runtime/kv_format_util.h"
#include "runtime/tokenizer.h"
#include "runtime/weights.h"
#include "tests/test_data.h"
#include "worker/calibrate.h"
#include "worker/cpu_engine.h"
#include "worker/eval_ppl.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

// Relative perplexity increase vs the fp16 cache allowed in CI. The target in
// docs/accuracy.md is 0.2% for int8/dynamic; on this short text the measured
// value is far below it, so exceeding the target is a real regression.
constexpr double kInt8DynamicBound = 0.002;
constexpr double kInt8StaticBound = 0.01;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const ModelWeights& Stories15M() {
  static const ModelWeights* w = [] {
    auto r = LoadModelWeights(testing::DataPath("models/stories15M"));
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      std::abort();
    }
    return new ModelWeights(std::move(*r));
  }();
  return *w;
}

TEST(AccuracyCi, HarnessMatchesRunCLogprobs) {
  const auto md = testing::LoadJson("golden/stories15M_moby_dick_logprobs.json");
  const auto ids = md["token_ids"].get<std::vector<int32_t>>();   // BOS + 251 tokens
  const auto lps = md["logprobs"].get<std::vector<double>>();     // 251 values
  ASSERT_EQ(ids[0], 1);
  EvalPplOptions o;
  o.bos_id = 1;
  o.context = static_cast<int32_t>(ids.size());  // one window: BOS + all 251 tokens
  o.stride = o.context - 2;                      // prefill BOS + 1 token, decode the rest
  o.prefill_chunk = 1;                           // exercises chunked prefill too
  o.greedy_continuations = 0;
  auto ev = PplEvaluator::Create(Stories15M(), {ids.begin() + 1, ids.end()}, o);
  ASSERT_TRUE(ev.ok()) << ev.status();
  ASSERT_EQ((*ev)->num_windows(), 1);
  auto r = (*ev)->Reference();  // fp32 cache
  ASSERT_TRUE(r.ok()) << r.status();
  double want = 0;
  for (size_t i = 1; i < lps.size(); ++i) want -= lps[i];  // the first target is in the prefill
  want /= static_cast<double>(lps.size() - 1);
  EXPECT_EQ(r->scored_tokens, static_cast<int64_t>(lps.size() - 1));
  EXPECT_NEAR(r->mean_nll, want, 1e-4) << "harness NLL vs run.c";
}

TEST(AccuracyCi, Stories15MInt8WithinBounds) {
  auto tok = Tokenizer::LoadSentencePiece(testing::DataPath("models/stories15M/tokenizer.model"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::string text = ReadFile(testing::DataPath("text/moby_dick.txt"));
  ASSERT_GT(text.size(), 100000u);
  const std::vector<int32_t> tokens = (*tok)->Encode(text);
  // Static scales calibrated on text far from the evaluated part.
  CalibrateOptions co;
  co.bos_id = 1;
  co.context = 256;
  co.offset = static_cast<int64_t>(tokens.size()) / 2;
  co.max_tokens = 1024;
  auto params = CalibrateKvQuantParams(Stories15M(), tokens, co, KvDtype::kInt8, /*per_head=*/true);
  ASSERT_TRUE(params.ok()) << params.status();

  EvalPplOptions o;
  o.bos_id = 1;
  o.context = 256;
  o.stride = 64;
  o.max_tokens = 255 + 3 * 64;  // 4 windows, 256 scored tokens
  o.greedy_continuations = 4;
  o.greedy_tokens = 16;
  o.greedy_prompt = 64;
  auto ev = PplEvaluator::Create(Stories15M(), tokens, o);
  ASSERT_TRUE(ev.ok()) << ev.status();
  std::vector<PplResult> results;
  for (KvFormatSpec spec : {KvFormatSpec{{KvDtype::kFp16, KvScaleMode::kNone}, std::nullopt, ""},
                            KvFormatSpec{{KvDtype::kInt8, KvScaleMode::kDynamic}, std::nullopt, ""},
                            KvFormatSpec{{KvDtype::kInt8, KvScaleMode::kStatic}, *params, ""}}) {
    auto r = (*ev)->Evaluate(spec);
    ASSERT_TRUE(r.ok()) << r.status();
    results.push_back(*r);
  }
  auto ref = (*ev)->Reference();
  ASSERT_TRUE(ref.ok());
  results.insert(results.begin(), *ref);
  std::printf("%s", PplResultsMarkdown(results).c_str());
  const double fp16 = results[1].perplexity;
  EXPECT_GT(results[0].perplexity, 5.0);  // Melville is far outside TinyStories
  EXPECT_LT(results[0].perplexity, 1e4);
  EXPECT_NEAR(fp16 / results[0].perplexity, 1.0, 1e-3);
  EXPECT_LE(results[2].perplexity / fp16 - 1, kInt8DynamicBound) << "int8/dynamic";
  EXPECT_LE(results[3].perplexity / fp16 - 1, kInt8StaticBound) << "int8/static";
  EXPECT_LT(results[2].mean_kl, 1e-3);
  EXPECT_GT(results[2].top1_agreement, 0.95);
}

// --- SmolLM2 ---------------------------------------------------------------------

// The repository root: $STRATA_SOURCE_DIR, else from this file's path (ctest
// does not always pass the variable through).
std::string SourceDir() {
  if (const char* env = std::getenv("STRATA_SOURCE_DIR"); env != nullptr && *env) return env;
  return fs::path(__FILE__).parent_path().parent_path().string();
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

// Runs `command` through the shell; its output (stdout and stderr) and exit status.
std::pair<std::string, int> RunCommand(const std::string& command) {
  std::string output;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return {"popen failed", -1};
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), pipe)) > 0;) output.append(buf, n);
  const int status = pclose(pipe);
  return {output, WIFEXITED(status) ? WEXITSTATUS(status) : -1};
}

class SmolLm2Accuracy : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!fs::exists(SmolLm2Path())) return;
    auto w = LoadModelWeights(SmolLm2Path());
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = new ModelWeights(std::move(*w));
    auto t = Tokenizer::LoadFromGguf(SmolLm2Path());
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = t->release();
  }
  void SetUp() override {
    if (weights_ == nullptr) {
      GTEST_SKIP() << SmolLm2Path() << " is absent: run tools/fetch_smollm2.sh (or set STRATA_SMOLLM2_GGUF)";
    }
  }
  static inline ModelWeights* weights_ = nullptr;
  static inline Tokenizer* tok_ = nullptr;
};

TEST_F(SmolLm2Accuracy, LogitsMatchNumpyReference) {
  const std::string python = ReferencePython();
  const std::string script = SourceDir() + "/tests/tools/smollm2_reference.py";
  if (const auto [out, rc] = RunCommand(python + " " + script + " --check"); rc == 3) {
    GTEST_SKIP() << python << " lacks the PyPI module gguf: run "
                 << "/usr/bin/python3 tests/tools/make_reference_venv.py (" << out << ")";
  } else {
    ASSERT_EQ(rc, 0) << out;
  }
  const std::vector<int32_t> ids = tok_->Encode("Call me Ishmael. Some years ago, never mind how long");
  std::string list;
  for (int32_t id : ids) list += (list.empty() ? "" : ",") + std::to_string(id);
  const std::string out = (fs::temp_directory_path() / ("strata_smollm2_ref_" + std::to_string(getpid()) + ".f32")).string();
  const auto [ref_out, ref_rc] =
      RunCommand(python + " " + script + " --gguf '" + SmolLm2Path() + "' --ids " + list + " --out " + out);
  ASSERT_EQ(ref_rc, 0) << ref_out;
  std::ifstream in(out, std::ios::binary);
  const int64_t V = weights_->config.vocab_size;
  std::vector<float> ref(ids.size() * V);
  in.read(reinterpret_cast<char*>(ref.data()), static_cast<std::streamsize>(ref.size() * 4));
  ASSERT_TRUE(in) << "short reference output";
  fs::remove(out);

  EngineOptions eo;
  eo.kv_format = {KvDtype::kFp32, KvScaleMode::kNone};
  eo.num_gpu_blocks = 8;
  auto engine = CpuEngine::Create(*weights_, eo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  StepInput step;
  SeqStepInput& s = step.seqs.emplace_back();
  s.tokens = ids;
  s.block_table = {0, 1, 2, 3};
  s.logits = SeqStepInput::Logits::kAll;
  StepOutput got;
  ASSERT_TRUE((*engine)->Step(step, &got).ok());
  ASSERT_EQ(got.logits.size(), ref.size());
  double max_diff = 0, max_abs = 0;
  int argmax_equal = 0;
  for (size_t t = 0; t < ids.size(); ++t) {
    const float* a = got.logits.data() + t * V;
    const float* b = ref.data() + t * V;
    for (int64_t v = 0; v < V; ++v) {
      max_diff = std::max(max_diff, std::fabs(double(a[v]) - b[v]));
      max_abs = std::max(max_abs, std::fabs(double(b[v])));
    }
    argmax_equal += std::max_element(a, a + V) - a == std::max_element(b, b + V) - b;
  }
  std::printf("SmolLM2 logits vs numpy: max |diff| %.3g (max |logit| %.1f), argmax equal %d/%zu\n",
              max_diff, max_abs, argmax_equal, ids.size());
  EXPECT_LT(max_diff, 2e-2);
  EXPECT_EQ(argmax_equal, static_cast<int>(ids.size()));
}

TEST_F(SmolLm2Accuracy, PerplexityOnMobyDickIsSane) {
  const std::string text = ReadFile(testing::DataPath("text/moby_dick.txt"));
  const std::vector<int32_t> tokens = tok_->Encode(text.substr(0, 20000));
  EvalPplOptions o;
  o.bos_id = -1;  // SmolLM2 adds no BOS
  o.context = 256;
  o.stride = 128;
  o.max_tokens = 256 + 128;
  o.greedy_continuations = 0;
  auto ev = PplEvaluator::Create(*weights_, tokens, o);
  ASSERT_TRUE(ev.ok()) << ev.status();
  auto r = (*ev)->Reference();
  ASSERT_TRUE(r.ok()) << r.status();
  std::printf("SmolLM2 perplexity on %lld Moby-Dick tokens: %.3f\n",
              static_cast<long long>(r->scored_tokens), r->perplexity);
  // A 135M instruct model with Q4_1 weights on 19th-century prose, 128+
  // tokens of context: about 73 when this was written (docs/accuracy.md);
  // a broken RoPE, permutation or tokenizer gives hundreds or more.
  EXPECT_GT(r->perplexity, 3.0);
  EXPECT_LT(r->perplexity, 150.0);
}

}  // namespace
}  // namespace strata
