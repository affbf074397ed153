// Compares every CUDA KV-cache kernel with its CPU reference
// (kernels/cpu/kv_cache_cpu.h) across KV format x head_dim {48, 64, 128} x
// block size {16, 32} x GQA ratio {1, 4, 8}, contexts up to 8200 tokens.
// Cache writes must be bit-identical; attention is compared per (token, head)
// by relative L2 error with a per-dtype tolerance. Skips when no GPU is present.
#include "kernels/cuda/kv_cache_cuda.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/kv_cache_cpu.h"
#include "kernels/kv_cache_view_util.h"
#include "kernels/quant_math.h"

namespace strata::cuda {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device"
#define ASSERT_CUDA(expr)                                                       \
  do {                                                                          \
    const cudaError_t err_ = (expr);                                            \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

template <class T>
class DeviceBuf {
 public:
  DeviceBuf() = default;
  explicit DeviceBuf(size_t n) { Resize(n); }
  ~DeviceBuf() { cudaFree(p_); }
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
  void Resize(size_t n) {
    cudaFree(p_);
    p_ = nullptr;
    n_ = n;
    if (n > 0 && cudaMalloc(&p_, n * sizeof(T)) != cudaSuccess) p_ = nullptr;
  }
  void Upload(const std::vector<T>& v) {
    Resize(v.size());
    if (!v.empty()) cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  std::vector<T> Download() const {
    std::vector<T> v(n_);
    if (n_ > 0) cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

std::vector<KvFormat> AllFormats() {
  std::vector<KvFormat> f;
#define STRATA_LIST_(D, M) f.push_back(KvFormat{D, M});
  STRATA_FOR_EACH_KV_FORMAT(STRATA_LIST_)
#undef STRATA_LIST_
  return f;
}

std::string FormatName(KvFormat f) {
  static const char* dtypes[] = {"fp32", "fp16", "bf16", "e4m3", "e5m2", "int8", "int4"};
  static const char* modes[] = {"none", "static", "dynamic"};
  return std::string(dtypes[static_cast<int>(f.dtype)]) + "_" + modes[static_cast<int>(f.scale_mode)];
}

// Relative L2 tolerance of GPU vs CPU attention over the same (dequantized)
// cache. Both compute in fp32 (the GPU's 8/4-bit path feeds tensor cores with
// exact fp16 codes and hi+lo fp16 splits of the fp32 query and weights), so
// the difference is fp32 rounding, amplified by the test data: rows scaled by
// 4-8 give logits of tens and peaky softmaxes, where fp32 logit rounding alone
// moves the CPU result ~1e-4 away from a float64 reference at 8K contexts
// (measured). Integer formats add the per-token zero-point fold.
double AttentionTolerance(KvFormat f) {
  return KvDtypeIsInteger(f.dtype) ? 6e-4 : 4e-4;
}

// A host cache (written by the CPU kernel) and its device mirror.
struct Caches {
  std::vector<uint8_t> host_storage;
  std::vector<float> k_scale, k_zero, v_scale, v_zero;
  KvCacheView host;
  DeviceBuf<uint8_t> dev_pool;
  DeviceBuf<float> dk_scale, dk_zero, dv_scale, dv_zero;
  KvCacheView dev;

  Caches(KvFormat f, int block_size, int kv_heads, int head_dim, int num_blocks, float amax,
         std::mt19937& rng) {
    const size_t block_bytes = KvBlockBytes(f, block_size, kv_heads, head_dim);
    host_storage.assign(block_bytes * num_blocks + 16, 0xA5);  // poison
    uintptr_t a = reinterpret_cast<uintptr_t>(host_storage.data());
    uint8_t* pool = host_storage.data() + ((16 - a % 16) % 16);
    if (f.scale_mode == KvScaleMode::kStatic) {
      std::uniform_real_distribution<float> jitter(0.8f, 1.3f);
      const float qmax = f.dtype == KvDtype::kInt8 ? 127.0f : f.dtype == KvDtype::kFp8E4M3 ? 448.0f : 896.0f;
      for (int h = 0; h < kv_heads; ++h) {
        k_scale.push_back(amax / qmax * jitter(rng));
        v_scale.push_back(amax / qmax * jitter(rng));
        if (f.dtype == KvDtype::kInt8) {
          k_zero.push_back(0.37f * h - 0.5f);
          v_zero.push_back(-0.21f * h + 1.25f);
        }
      }
    }
    KvCacheViewOptions o;
    o.format = f;
    o.block_size = block_size;
    o.num_kv_heads = kv_heads;
    o.head_dim = head_dim;
    o.num_blocks = num_blocks;
    o.pool = pool;
    if (!k_scale.empty()) {
      o.k_scale = k_scale.data();
      o.v_scale = v_scale.data();
    }
    if (!k_zero.empty()) {
      o.k_zero = k_zero.data();
      o.v_zero = v_zero.data();
    }
    auto hv = MakeKvCacheView(o);
    EXPECT_TRUE(hv.ok()) << hv.status();
    host = *hv;
    dev_pool.Resize(block_bytes * num_blocks);
    dk_scale.Upload(k_scale);
    dv_scale.Upload(v_scale);
    dk_zero.Upload(k_zero);
    dv_zero.Upload(v_zero);
    o.pool = dev_pool.get();
    o.k_scale = k_scale.empty() ? nullptr : dk_scale.get();
    o.v_scale = v_scale.empty() ? nullptr : dv_scale.get();
    o.k_zero = k_zero.empty() ? nullptr : dk_zero.get();
    o.v_zero = v_zero.empty() ? nullptr : dv_zero.get();
    auto dv = MakeKvCacheView(o);
    EXPECT_TRUE(dv.ok()) << dv.status();
    dev = *dv;
    cudaMemcpy(dev.pool, host.pool, block_bytes * num_blocks, cudaMemcpyHostToDevice);
  }
  size_t pool_bytes() const { return size_t(host.layout.block_bytes) * host.num_blocks; }
  void UploadPool() { cudaMemcpy(dev.pool, host.pool, pool_bytes(), cudaMemcpyHostToDevice); }
};

// Rows with varied statistics: all-positive, tiny, outliers, large.
void FillRows(std::vector<float>& x, int hd, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  for (size_t i = 0; i < x.size(); ++i) {
    const size_t row = i / hd;
    float v = nd(rng);
    switch (row % 6) {
      case 1: v = std::fabs(v) + 0.5f; break;
      case 2: v *= 1e-3f; break;
      case 3: if (i % 17 == 0) v *= 8.0f; break;
      case 4: v *= 4.0f; break;
      default: break;
    }
    x[i] = v;
  }
}

struct SeqSpec {
  int32_t context_len;
  int32_t new_tokens;
};

// A randomly paged step whose cached prefix and new tokens are written by the
// CPU kernel, with host and device copies of the batch arrays.
struct Step {
  std::vector<int32_t> tables, ctx, qs;
  std::vector<int64_t> slots;
  std::vector<float> q;
  int max_blocks = 0, num_tokens = 0, total_tokens = 0, max_new = 0, max_ctx = 0;
  DeviceBuf<int32_t> d_tables, d_ctx, d_qs;
  DeviceBuf<float> d_q, d_out;
  PagedBatchView host_batch, dev_batch;
};

int BlocksNeeded(const std::vector<SeqSpec>& seqs, int bs) {
  int total = 0;
  for (const auto& s : seqs) total += (s.context_len + bs - 1) / bs;
  return total;
}

void BuildStep(Caches& c, const std::vector<SeqSpec>& seqs, int padding, int num_heads,
               std::mt19937& rng, Step& st) {
  const KvBlockLayout& l = c.host.layout;
  const int bs = l.block_size, hd = l.head_dim;
  const int num_seqs = static_cast<int>(seqs.size());
  for (const auto& s : seqs) {
    st.max_blocks = std::max(st.max_blocks, (s.context_len + bs - 1) / bs);
    st.num_tokens += s.new_tokens;
    st.max_new = std::max(st.max_new, s.new_tokens);
    st.max_ctx = std::max(st.max_ctx, s.context_len);
  }
  std::vector<int32_t> ids(c.host.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  st.tables.assign(size_t(num_seqs) * st.max_blocks, 0);
  st.ctx.resize(num_seqs);
  st.qs.assign(num_seqs + 1, 0);
  int next = 0;
  for (int s = 0; s < num_seqs; ++s) {
    st.ctx[s] = seqs[s].context_len;
    st.qs[s + 1] = st.qs[s] + seqs[s].new_tokens;
    for (int b = 0; b < (st.ctx[s] + bs - 1) / bs; ++b) st.tables[size_t(s) * st.max_blocks + b] = ids[next++];
  }
  auto slot_of = [&](int s, int pos) {
    return int64_t{st.tables[size_t(s) * st.max_blocks + pos / bs]} * bs + pos % bs;
  };
  std::vector<int64_t> prefix;
  for (int s = 0; s < num_seqs; ++s) {
    for (int p = 0; p < st.ctx[s] - seqs[s].new_tokens; ++p) prefix.push_back(slot_of(s, p));
  }
  const size_t row = size_t(l.num_kv_heads) * hd;
  std::vector<float> k(prefix.size() * row), v(k.size());
  FillRows(k, hd, rng);
  FillRows(v, hd, rng);
  cpu::WriteKvCache(c.host, k.data(), v.data(), prefix.data(), static_cast<int32_t>(prefix.size()));
  st.total_tokens = st.num_tokens + padding;
  st.slots.assign(st.total_tokens, -1);
  for (int s = 0; s < num_seqs; ++s) {
    for (int i = 0; i < seqs[s].new_tokens; ++i) {
      st.slots[st.qs[s] + i] = slot_of(s, st.ctx[s] - seqs[s].new_tokens + i);
    }
  }
  k.assign(size_t(st.total_tokens) * row, 0.0f);
  v.assign(k.size(), 0.0f);
  FillRows(k, hd, rng);
  FillRows(v, hd, rng);
  cpu::WriteKvCache(c.host, k.data(), v.data(), st.slots.data(), st.total_tokens);
  c.UploadPool();

  st.q.resize(size_t(st.total_tokens) * num_heads * hd);
  std::normal_distribution<float> nd;
  for (auto& x : st.q) x = nd(rng);
  st.host_batch.num_seqs = num_seqs;
  st.host_batch.num_tokens = st.total_tokens;
  st.host_batch.max_blocks_per_seq = st.max_blocks;
  st.host_batch.block_tables = st.tables.data();
  st.host_batch.context_lens = st.ctx.data();
  st.host_batch.query_start = st.qs.data();
  st.host_batch.slot_mapping = st.slots.data();
  st.d_tables.Upload(st.tables);
  st.d_ctx.Upload(st.ctx);
  st.d_qs.Upload(st.qs);
  st.d_q.Upload(st.q);
  st.d_out.Upload(std::vector<float>(st.q.size(), std::nanf("")));  // poison
  st.dev_batch = st.host_batch;
  st.dev_batch.block_tables = st.d_tables.get();
  st.dev_batch.context_lens = st.d_ctx.get();
  st.dev_batch.query_start = st.d_qs.get();
  st.dev_batch.slot_mapping = nullptr;
}

// Attention over a built step's device cache, queries and output.
AttentionArgs ArgsFor(const Caches& c, const Step& st, int num_heads, float softmax_scale) {
  AttentionArgs a;
  a.cache = c.dev;
  a.batch = st.dev_batch;
  a.query = st.d_q.get();
  a.out = st.d_out.get();
  a.num_heads = num_heads;
  a.softmax_scale = softmax_scale;
  return a;
}

// The CPU kernel's attention over a built step (the reference).
std::vector<float> CpuAttention(const Caches& c, const Step& st, int num_heads, float softmax_scale) {
  std::vector<float> out(st.q.size());
  cpu::PagedAttention(c.host, st.host_batch, st.q.data(), num_heads, softmax_scale, out.data());
  return out;
}

// Max relative L2 error per (token, head) over the sequences' tokens.
double CompareAttention(const Step& st, const std::vector<float>& got, const std::vector<float>& want,
                        int num_heads, int hd, std::string* where) {
  double worst = 0;
  for (int t = 0; t < st.num_tokens; ++t) {
    for (int h = 0; h < num_heads; ++h) {
      double num = 0, den = 0;
      bool finite = true;
      for (int d = 0; d < hd; ++d) {
        const size_t i = (size_t(t) * num_heads + h) * hd + d;
        finite &= std::isfinite(got[i]);
        num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
        den += double(want[i]) * want[i];
      }
      const double rel = finite ? std::sqrt(num / std::max(den, 1e-30)) : 1e30;
      if (rel > worst) {
        worst = rel;
        *where = "token " + std::to_string(t) + " head " + std::to_string(h);
      }
    }
  }
  return worst;
}

// ---------------------------------------------------------------------------

TEST(KernelDispatch, SupportedMatrixAndErrors) {
  for (int d = 0; d <= 6; ++d) {
    for (int m = 0; m <= 2; ++m) {
      for (int hd : {32, 48, 64, 96, 128, 256}) {
        const KernelDesc desc{static_cast<KvDtype>(d), static_cast<KvScaleMode>(m), hd};
        const bool want = KvFormatSupported({desc.dtype, desc.scale_mode}) &&
                          (hd == 48 || hd == 64 || hd == 128);
        EXPECT_EQ(KernelSupported(desc), want ? cudaSuccess : cudaErrorNotSupported)
            << d << "/" << m << "/" << hd;
      }
    }
  }
  // Unsupported head_dim: an error status, no launch.
  KvCacheView v;
  v.layout = MakeKvBlockLayout({KvDtype::kFp16, KvScaleMode::kNone}, 16, 2, 96);
  v.pool = reinterpret_cast<uint8_t*>(uintptr_t{256});
  v.num_blocks = 1;
  float dummy = 0;
  int64_t slot = 0;
  EXPECT_EQ(WriteKvCache(v, &dummy, &dummy, &slot, 1, nullptr), cudaErrorNotSupported);
  AttentionArgs a;
  a.cache = v;
  a.query = a.out = &dummy;
  a.num_heads = 3;  // not a multiple of 2 kv heads
  a.softmax_scale = 1.0f;
  EXPECT_EQ(PagedPrefillAttention(a, 1, nullptr), cudaErrorInvalidValue);
  a.num_heads = 4;
  // More indexed sequences than the batch has: an error, no launch; none: nothing to do.
  const int32_t index[1] = {0};
  a.seq_index = index;
  a.num_indexed_seqs = 1;
  EXPECT_EQ(PagedPrefillAttention(a, 1, nullptr), cudaErrorInvalidValue);
  a.num_indexed_seqs = 0;
  EXPECT_EQ(PagedPrefillAttention(a, 1, nullptr), cudaSuccess);
  a.seq_index = nullptr;
  DecodePlan bad;  // partition 0
  EXPECT_EQ(PagedDecodeAttention(a, bad, nullptr, nullptr), cudaErrorInvalidValue);
  const DecodePlan plan = PlanDecode(v, 8, 4, 5000, 132);
  EXPECT_EQ(plan.partition_size % 256, 0);
  EXPECT_GE(int64_t{plan.partition_size} * plan.max_splits, 5000);
  EXPECT_LE(plan.partition_size, MaxDecodePartition(v));
}

// Which caches decode on the tensor-core kernel (4096-token partitions): the
// 8-bit and 4-bit formats, and fp16 / bf16 at head_dim 128, each with blocks
// of >= 16 tokens; fp32, other 16-bit head dims and smaller blocks take the
// CUDA-core kernel (2048). Host only (no GPU needed).
TEST(KernelDispatch, TensorCoreDecodeFormats) {
  struct Case {
    KvFormat f;
    int hd, bs;
    bool mma;
  };
  const KvFormat fp16{KvDtype::kFp16, KvScaleMode::kNone}, bf16{KvDtype::kBf16, KvScaleMode::kNone};
  const KvFormat fp32{KvDtype::kFp32, KvScaleMode::kNone}, int8{KvDtype::kInt8, KvScaleMode::kDynamic};
  const KvFormat int4{KvDtype::kInt4, KvScaleMode::kDynamic}, e5m2{KvDtype::kFp8E5M2, KvScaleMode::kNone};
  for (const Case& k : {Case{fp16, 128, 16, true}, Case{fp16, 128, 32, true}, Case{bf16, 128, 16, true},
                        Case{fp16, 64, 16, false}, Case{bf16, 48, 16, false}, Case{fp16, 128, 8, false},
                        Case{fp32, 128, 16, false}, Case{int8, 64, 16, true}, Case{int4, 48, 32, true},
                        Case{e5m2, 128, 16, true}, Case{int8, 128, 8, false}}) {
    KvCacheView v;
    v.layout = MakeKvBlockLayout(k.f, k.bs, 8, k.hd);
    EXPECT_EQ(MaxDecodePartition(v), k.mma ? kMaxPartitionMma : kMaxPartition)
        << FormatName(k.f) << " head_dim " << k.hd << " block " << k.bs;
  }
  // 64 sequences x 8 kv heads (GQA 4) at 4K on 132 SMs: fp16 takes one split
  // (512 thread blocks, one wave of 4 per SM), no merge.
  KvCacheView v;
  v.layout = MakeKvBlockLayout(fp16, 16, 8, 128);
  const DecodePlan plan = PlanDecode(v, 64, 32, 4096, 132);
  EXPECT_EQ(plan.partition_size, 4096);
  EXPECT_EQ(plan.max_splits, 1);
  EXPECT_EQ(plan.workspace_bytes, 0);
}

using Param = std::tuple<KvFormat, int, int, int>;  // format, head_dim, block size, GQA ratio
std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  return FormatName(std::get<0>(info.param)) + "_hd" + std::to_string(std::get<1>(info.param)) +
         "_bs" + std::to_string(std::get<2>(info.param)) + "_g" +
         std::to_string(std::get<3>(info.param));
}

class CudaKvTest : public ::testing::TestWithParam<Param> {};

// The write does not depend on the GQA ratio: format x head_dim x block size.
using WriteParam = std::tuple<KvFormat, int, int>;
class CudaWriteTest : public ::testing::TestWithParam<WriteParam> {};

TEST_P(CudaWriteTest, BitIdenticalToCpu) {
  SKIP_WITHOUT_GPU();
  const auto [f, hd, bs] = GetParam();
  std::mt19937 rng(11 + hd + bs);
  const int kv_heads = 3, blocks = 12, tokens = 150;
  Caches c(f, bs, kv_heads, hd, blocks, 4.0f, rng);
  std::vector<float> k(size_t(tokens) * kv_heads * hd), v(k.size());
  FillRows(k, hd, rng);
  FillRows(v, hd, rng);
  if (f.scale_mode == KvScaleMode::kStatic) {  // some saturating values
    for (size_t i = 0; i < k.size(); i += 53) k[i] = 1e4f * (i % 2 ? 1 : -1);
  }
  std::vector<int64_t> slots(tokens);
  std::vector<int64_t> all(int64_t{blocks} * bs);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  for (int t = 0; t < tokens; ++t) slots[t] = (t % 7 == 3) ? -1 : all[t];
  cpu::WriteKvCache(c.host, k.data(), v.data(), slots.data(), tokens);
  DeviceBuf<float> dk, dv;
  DeviceBuf<int64_t> ds;
  dk.Upload(k);
  dv.Upload(v);
  ds.Upload(slots);
  ASSERT_CUDA(WriteKvCache(c.dev, dk.get(), dv.get(), ds.get(), tokens, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<uint8_t> got(c.pool_bytes());
  ASSERT_CUDA(cudaMemcpy(got.data(), c.dev.pool, got.size(), cudaMemcpyDeviceToHost));
  size_t mismatches = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != c.host.pool[i]) {
      if (mismatches++ == 0) first = i;
    }
  }
  EXPECT_EQ(mismatches, 0u) << "first mismatch at byte " << first << " of block "
                            << first / c.host.layout.block_bytes << " (offset "
                            << first % c.host.layout.block_bytes << ")";
}

INSTANTIATE_TEST_SUITE_P(Matrix, CudaWriteTest,
                         ::testing::Combine(::testing::ValuesIn(AllFormats()),
                                            ::testing::Values(48, 64, 128),
                                            ::testing::Values(16, 32)),
                         [](const ::testing::TestParamInfo<WriteParam>& info) {
                           return FormatName(std::get<0>(info.param)) + "_hd" +
                                  std::to_string(std::get<1>(info.param)) + "_bs" +
                                  std::to_string(std::get<2>(info.param));
                         });

TEST_P(CudaKvTest, DecodeMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const auto [f, hd, bs, group] = GetParam();
  std::mt19937 rng(21 + hd * 3 + bs + group);
  const int kv_heads = 2, heads = kv_heads * group;
  const std::vector<SeqSpec> seqs = {{1, 1},   {17, 1},   {300, 1},  {1000, 1},
                                     {2049, 1}, {4100, 1}, {8200, 1}};
  Caches c(f, bs, kv_heads, hd, BlocksNeeded(seqs, bs) + 2, 4.0f, rng);
  Step st;
  BuildStep(c, seqs, 0, heads, rng, st);
  const float scale = 1.0f / std::sqrt(float(hd));
  const std::vector<float> want = CpuAttention(c, st, heads, scale);

  AttentionArgs a = ArgsFor(c, st, heads, scale);
  int dev = 0, sms = 0;
  ASSERT_CUDA(cudaGetDevice(&dev));
  ASSERT_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  // The planner's choice, and forced small / large partitions (many splits, few splits).
  for (int forced : {0, 256, 2048, MaxDecodePartition(c.dev)}) {
    const DecodePlan plan = forced ? PlanDecodeWithPartition(c.dev, st.host_batch.num_seqs, heads, st.max_ctx, forced)
                                   : PlanDecode(c.dev, st.host_batch.num_seqs, heads, st.max_ctx, sms);
    DeviceBuf<uint8_t> ws(plan.workspace_bytes);
    ASSERT_CUDA(cudaMemset(a.out, 0xFF, st.q.size() * sizeof(float)));  // NaN poison
    ASSERT_CUDA(PagedDecodeAttention(a, plan, ws.get(), nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    const std::vector<float> got = st.d_out.Download();
    std::string where;
    const double err = CompareAttention(st, got, want, heads, hd, &where);
    EXPECT_LE(err, AttentionTolerance(f)) << "partition " << plan.partition_size << " splits "
                                          << plan.max_splits << " worst at " << where;
  }
}

TEST_P(CudaKvTest, PrefillMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const auto [f, hd, bs, group] = GetParam();
  std::mt19937 rng(31 + hd * 5 + bs + group);
  const int kv_heads = 2, heads = kv_heads * group;
  // Fresh prefill, chunked prefill on a cached prefix, decode tokens, a chunk
  // over a context beyond 8192, a sequence with no new tokens; 2 padding tokens.
  const std::vector<SeqSpec> seqs = {{150, 150}, {1064, 64}, {600, 1}, {8300, 3}, {40, 0}, {1, 1}};
  Caches c(f, bs, kv_heads, hd, BlocksNeeded(seqs, bs) + 2, 4.0f, rng);
  Step st;
  BuildStep(c, seqs, 2, heads, rng, st);
  const float scale = 1.0f / std::sqrt(float(hd));
  const std::vector<float> want = CpuAttention(c, st, heads, scale);
  AttentionArgs a = ArgsFor(c, st, heads, scale);
  ASSERT_CUDA(PagedPrefillAttention(a, st.max_new, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<float> got = st.d_out.Download();
  std::string where;
  EXPECT_LE(CompareAttention(st, got, want, heads, hd, &where), AttentionTolerance(f))
      << "worst at " << where;
  // Padding tokens are left untouched (still NaN poison).
  for (size_t i = size_t(st.num_tokens) * heads * hd; i < got.size(); ++i) {
    ASSERT_TRUE(std::isnan(got[i])) << "padding output written";
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, CudaKvTest,
                         ::testing::Combine(::testing::ValuesIn(AllFormats()),
                                            ::testing::Values(48, 64, 128),
                                            ::testing::Values(16, 32),
                                            ::testing::Values(1, 4, 8)),
                         ParamName);

TEST(CudaKvExtra, OddGqaRatiosAndLongDecode) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(5);
  for (int group : {3, 6}) {
    for (KvFormat f : {KvFormat{KvDtype::kFp16, KvScaleMode::kNone},
                       KvFormat{KvDtype::kInt4, KvScaleMode::kDynamic}}) {
      const int kv_heads = 2, heads = kv_heads * group, hd = 128, bs = 16;
      const std::vector<SeqSpec> seqs = {{5000, 1}, {33, 1}};
      Caches c(f, bs, kv_heads, hd, BlocksNeeded(seqs, bs), 4.0f, rng);
      Step st;
      BuildStep(c, seqs, 0, heads, rng, st);
      const std::vector<float> want = CpuAttention(c, st, heads, 0.1f);
      AttentionArgs a = ArgsFor(c, st, heads, 0.1f);
      const DecodePlan plan = PlanDecode(c.dev, 2, heads, st.max_ctx, 132);
      DeviceBuf<uint8_t> ws(plan.workspace_bytes);
      ASSERT_CUDA(PagedDecodeAttention(a, plan, ws.get(), nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      std::string where;
      EXPECT_LE(CompareAttention(st, st.d_out.Download(), want, heads, hd, &where),
                AttentionTolerance(f))
          << FormatName(f) << " group " << group << " decode, worst at " << where;
      ASSERT_CUDA(cudaMemset(a.out, 0xFF, st.q.size() * sizeof(float)));
      ASSERT_CUDA(PagedPrefillAttention(a, st.max_new, nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      EXPECT_LE(CompareAttention(st, st.d_out.Download(), want, heads, hd, &where),
                AttentionTolerance(f))
          << FormatName(f) << " group " << group << " prefill, worst at " << where;
    }
  }
}

// The engine's mixed step: the prefill kernel with skip_single_token (and, as
// the engine runs it, with thread blocks only for the multi-token sequences,
// `seq_index`) leaves the one-token sequences' rows untouched, and the decode
// kernel on a sub-batch (their rows in query_start, their context lengths and
// tables gathered) writes them in place; together they match the CPU kernel
// on every row.
TEST(CudaKvExtra, MixedStepSplitsOneTokenSequencesToTheDecodeKernel) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  for (const bool indexed : {false, true})
  for (KvFormat f : {KvFormat{KvDtype::kFp16, KvScaleMode::kNone},
                     KvFormat{KvDtype::kInt8, KvScaleMode::kDynamic},
                     KvFormat{KvDtype::kInt4, KvScaleMode::kDynamic},
                     KvFormat{KvDtype::kFp32, KvScaleMode::kNone}}) {
    SCOPED_TRACE(indexed ? "prefill blocks for the multi-token sequences only" : "all sequences");
    const int kv_heads = 2, group = 4, heads = kv_heads * group, hd = 128, bs = 16;
    // Decodes first, between and after prefill chunks, one at a long context.
    const std::vector<SeqSpec> seqs = {{700, 1}, {300, 300}, {4100, 1}, {96, 32}, {17, 1}};
    Caches c(f, bs, kv_heads, hd, BlocksNeeded(seqs, bs), 4.0f, rng);
    Step st;
    BuildStep(c, seqs, 0, heads, rng, st);
    const std::vector<float> want = CpuAttention(c, st, heads, 0.09f);
    AttentionArgs a = ArgsFor(c, st, heads, 0.09f);
    a.skip_single_token = true;
    std::vector<int32_t> multi;  // the prefill kernel's sequences, as the engine lists them
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (seqs[i].new_tokens != 1) multi.push_back(static_cast<int32_t>(i));
    }
    DeviceBuf<int32_t> d_multi;
    d_multi.Upload(multi);
    if (indexed) {
      a.seq_index = d_multi.get();
      a.num_indexed_seqs = static_cast<int32_t>(multi.size());
    }
    ASSERT_CUDA(PagedPrefillAttention(a, st.max_new, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    std::vector<float> got = st.d_out.Download();
    std::vector<int32_t> rows, ctx, tables;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const bool one = seqs[i].new_tokens == 1;
      const size_t r0 = size_t(st.qs[i]) * heads * hd;
      const size_t r1 = size_t(st.qs[i + 1]) * heads * hd;
      for (size_t k = r0; k < r1; ++k) {
        ASSERT_EQ(std::isnan(got[k]), one) << FormatName(f) << " sequence " << i;
      }
      if (!one) continue;
      rows.push_back(st.qs[i]);
      ctx.push_back(st.ctx[i]);
      tables.insert(tables.end(), st.tables.begin() + i * st.max_blocks,
                    st.tables.begin() + (i + 1) * st.max_blocks);
    }
    DeviceBuf<int32_t> d_rows, d_ctx, d_tables;
    d_rows.Upload(rows);
    d_ctx.Upload(ctx);
    d_tables.Upload(tables);
    AttentionArgs da = a;
    da.skip_single_token = false;
    da.batch.num_seqs = da.batch.num_tokens = static_cast<int32_t>(rows.size());
    da.batch.query_start = d_rows.get();
    da.batch.context_lens = d_ctx.get();
    da.batch.block_tables = d_tables.get();
    const DecodePlan plan = PlanDecode(c.dev, da.batch.num_seqs, heads, st.max_ctx, 132);
    DeviceBuf<uint8_t> ws(plan.workspace_bytes);
    ASSERT_CUDA(PagedDecodeAttention(da, plan, ws.get(), nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    got = st.d_out.Download();
    std::string where;
    EXPECT_LE(CompareAttention(st, got, want, heads, hd, &where), AttentionTolerance(f))
        << FormatName(f) << ", worst at " << where;
  }
}

// Blocks smaller than a 16-token tile: the 8/4-bit formats fall back from the
// tensor-core decode kernel to the CUDA-core one.
TEST(CudaKvExtra, SmallBlocksUseTheCudaCoreDecodeKernel) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(7);
  for (KvFormat f : {KvFormat{KvDtype::kInt8, KvScaleMode::kDynamic},
                     KvFormat{KvDtype::kInt4, KvScaleMode::kDynamic},
                     KvFormat{KvDtype::kFp8E4M3, KvScaleMode::kStatic}}) {
    for (int bs : {4, 8}) {
      const int kv_heads = 2, group = 4, heads = kv_heads * group, hd = 64;
      const std::vector<SeqSpec> seqs = {{3000, 1}, {77, 1}, {9, 1}};
      Caches c(f, bs, kv_heads, hd, BlocksNeeded(seqs, bs), 4.0f, rng);
      Step st;
      BuildStep(c, seqs, 0, heads, rng, st);
      const std::vector<float> want = CpuAttention(c, st, heads, 0.125f);
      AttentionArgs a = ArgsFor(c, st, heads, 0.125f);
      const DecodePlan plan = PlanDecodeWithPartition(c.dev, 3, heads, st.max_ctx, 512);
      DeviceBuf<uint8_t> ws(plan.workspace_bytes);
      ASSERT_CUDA(PagedDecodeAttention(a, plan, ws.get(), nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      std::string where;
      EXPECT_LE(CompareAttention(st, st.d_out.Download(), want, heads, hd, &where),
                AttentionTolerance(f))
          << FormatName(f) << " block " << bs << ", worst at " << where;
    }
  }
}

TEST(CudaKvExtra, ContextBeyondPlanGivesNan) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(6);
  const KvFormat f{KvDtype::kFp16, KvScaleMode::kNone};
  const std::vector<SeqSpec> seqs = {{700, 1}, {100, 1}};
  Caches c(f, 16, 1, 64, BlocksNeeded(seqs, 16), 4.0f, rng);
  Step st;
  BuildStep(c, seqs, 0, 4, rng, st);
  AttentionArgs a = ArgsFor(c, st, 4, 0.125f);
  const DecodePlan plan = PlanDecodeWithPartition(c.dev, 2, 4, 512, 256);  // too short for 700
  DeviceBuf<uint8_t> ws(plan.workspace_bytes);
  ASSERT_CUDA(PagedDecodeAttention(a, plan, ws.get(), nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<float> got = st.d_out.Download();
  EXPECT_TRUE(std::isnan(got[0]));
  EXPECT_TRUE(std::isfinite(got[4 * 64]));  // second sequence is fine
}

class CudaBlockTest : public ::testing::TestWithParam<KvFormat> {};

TEST_P(CudaBlockTest, CopyBlocksMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const KvFormat f = GetParam();
  std::mt19937 rng(41);
  const int bs = 16, kv_heads = 4, hd = 128, blocks = 20;
  Caches c(f, bs, kv_heads, hd, blocks, 4.0f, rng);
  const int tokens = 10 * bs;
  std::vector<float> k(size_t(tokens) * kv_heads * hd), v(k.size());
  FillRows(k, hd, rng);
  FillRows(v, hd, rng);
  std::vector<int64_t> slots(tokens);
  std::iota(slots.begin(), slots.end(), 0);
  cpu::WriteKvCache(c.host, k.data(), v.data(), slots.data(), tokens);
  c.UploadPool();
  const std::vector<int32_t> src = {0, 1, 2, 7, 9}, dst = {10, 11, 12, 15, 19};
  cpu::CopyBlocks(c.host, src.data(), dst.data(), static_cast<int32_t>(src.size()));
  DeviceBuf<int32_t> ds, dd;
  ds.Upload(src);
  dd.Upload(dst);
  ASSERT_CUDA(CopyBlocks(c.dev, ds.get(), dd.get(), static_cast<int32_t>(src.size()), nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<uint8_t> got(c.pool_bytes());
  ASSERT_CUDA(cudaMemcpy(got.data(), c.dev.pool, got.size(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(std::memcmp(got.data(), c.host.pool, got.size()), 0);
}

TEST_P(CudaBlockTest, SwapOutAndInRoundTrips) {
  SKIP_WITHOUT_GPU();
  const KvFormat f = GetParam();
  std::mt19937 rng(43);
  const int bs = 32, kv_heads = 2, hd = 64, blocks = 16, host_blocks = 10;
  Caches c(f, bs, kv_heads, hd, blocks, 4.0f, rng);
  const int tokens = blocks * bs;
  std::vector<float> k(size_t(tokens) * kv_heads * hd), v(k.size());
  FillRows(k, hd, rng);
  FillRows(v, hd, rng);
  std::vector<int64_t> slots(tokens);
  std::iota(slots.begin(), slots.end(), 0);
  cpu::WriteKvCache(c.host, k.data(), v.data(), slots.data(), tokens);
  c.UploadPool();
  const size_t bb = c.host.layout.block_bytes;
  uint8_t* host_pool = nullptr;
  ASSERT_CUDA(cudaMallocHost(&host_pool, bb * host_blocks));
  std::memset(host_pool, 0, bb * host_blocks);
  cudaStream_t stream;
  ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Out: runs (3,4,5)->(0,1,2) and singles; batched API on a real stream.
  const std::vector<int32_t> out_src = {3, 4, 5, 9, 12}, out_dst = {0, 1, 2, 7, 4};
  ASSERT_CUDA(SwapBlocks(c.dev, host_pool, host_blocks, out_src.data(), out_dst.data(), 5,
                         SwapDirection::kDeviceToHost, stream));
  ASSERT_CUDA(cudaStreamSynchronize(stream));
  for (size_t i = 0; i < out_src.size(); ++i) {
    EXPECT_EQ(std::memcmp(host_pool + out_dst[i] * bb, c.host.block(out_src[i]), bb), 0) << i;
  }
  // In: to other device blocks, on the legacy stream (per-run memcpy path).
  const std::vector<int32_t> in_src = {0, 1, 7}, in_dst = {13, 14, 15};
  ASSERT_CUDA(SwapBlocks(c.dev, host_pool, host_blocks, in_src.data(), in_dst.data(), 3,
                         SwapDirection::kHostToDevice, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<uint8_t> got(c.pool_bytes());
  ASSERT_CUDA(cudaMemcpy(got.data(), c.dev.pool, got.size(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(std::memcmp(got.data() + 13 * bb, c.host.block(3), bb), 0);
  EXPECT_EQ(std::memcmp(got.data() + 14 * bb, c.host.block(4), bb), 0);
  EXPECT_EQ(std::memcmp(got.data() + 15 * bb, c.host.block(9), bb), 0);
  EXPECT_EQ(std::memcmp(got.data(), c.host.pool, 13 * bb), 0);  // others untouched
  // Bad ids: rejected before anything is enqueued.
  const int32_t bad = host_blocks;
  EXPECT_EQ(SwapBlocks(c.dev, host_pool, host_blocks, in_src.data(), &bad, 1,
                       SwapDirection::kDeviceToHost, stream),
            cudaErrorInvalidValue);
  cudaStreamDestroy(stream);
  cudaFreeHost(host_pool);
}

INSTANTIATE_TEST_SUITE_P(AllFormats, CudaBlockTest, ::testing::ValuesIn(AllFormats()),
                         [](const auto& info) { return FormatName(info.param); });

}  // namespace
}  // namespace strata::cuda
