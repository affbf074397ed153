// Decode attention benchmark: batch 64, 32 query heads, 8 kv heads, head_dim
// 128, block 16 (or --block-size), contexts 512 / 4096 / 32768, every KV format.
//
// Time: CUDA events around each call (decode kernel + split-K merge), after a
// warm-up, median of many: calls queued back to back behind a GPU spin (the
// table's time; the FlashInfer peer script's method), and synchronous calls,
// which also include the launch latency ("sync call": the method of the
// result files before 2026-11-26's evening). Inputs: random K/V written through
// WriteKvCache (real scales / zero points), random queries; several cache copies with different
// block tables are rotated so that the bytes touched per call sequence exceed
// L2 several times. Achieved bandwidth = (K/V data + scale/zero bytes read +
// output written) / time, compared with cudaMemcpy device-to-device bandwidth
// (bytes read + written) measured in the same run.
//
// Usage: decode_attention_bench [--quick] [--sweep] [--prefill] [--ctx N] [--iters N] [--warmup N]
//   --quick   fewer iterations (smoke test)
//   --prefill also time prefill attention: a 2048-token chunk at the end of
//             4096- and 16384-token contexts (tensor-core kernel for fp16 /
//             bf16 / fp8 / int8 / int4)
//   --prefill-only  only that
//   --sweep   also time every partition size the format's kernel takes (256..8192;
//             at 32768 from 1024)
//   --ctx N   only this context length (e.g. under a profiler)
//   --iters N / --warmup N  timed / untimed calls per case
//   --block-size N  tokens per cache block (default 16, the issue's shape)
//   --plan-sweep  only this: PlanDecode's partition against every partition
//             size, over batch x context x (heads, kv heads) shapes of serving
//             (tensor-parallel shards, GQA and MHA), fp16 and int8 caches
//   --mixed   only the attention of mixed steps at tensor-parallel shard head
//             counts (llama-2-13b: 40 heads, no GQA; 20 / 10 per rank at tp=2 / 4):
//             the prefill kernel on the whole batch (one-token sequences
//             skipped) and on the multi-token sequences alone (seq_index), the
//             decode kernel on the one-token sub-batch, and both as the engine
//             runs them (side by side on two streams, and one after the other)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/kv_cache_cuda.h"
#include "kernels/quant_math.h"

namespace {

using strata::KvCacheView;
using strata::KvDtype;
using strata::KvFormat;
using strata::KvScaleMode;
namespace sc = strata::cuda;

#define CHECK_CUDA(expr)                                                             \
  do {                                                                               \
    const cudaError_t err_ = (expr);                                                 \
    if (err_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr,              \
                   cudaGetErrorString(err_));                                        \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

constexpr int kBatch = 64, kHeads = 32, kKvHeads = 8, kHeadDim = 128;
int g_block = 16;  // tokens per cache block (--block-size)

__device__ __forceinline__ uint32_t Hash(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Roughly normal values (sum of 4 uniforms), per-row offsets so that dynamic
// scales and zero points vary.
__global__ void FillRandom(float* x, int64_t n, uint64_t seed, int row) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    float s = 0.0f;
    for (int k = 0; k < 4; ++k) s += (Hash(seed * 0x9E3779B97F4A7C15ull + i * 4 + k) >> 8) * (1.0f / 16777216.0f);
    const uint32_t r = Hash(seed + (i / row) * 7919u);
    x[i] = (s - 2.0f) * 1.7f * (0.5f + (r & 255) / 256.0f) + ((r >> 8) & 3) * 0.25f;
  }
}

__global__ void Iota(int64_t* p, int64_t n, int64_t start) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    p[i] = start + i;
  }
}

struct FormatCase {
  KvFormat format;
  const char* name;
};

const FormatCase kFormats[] = {
    {{KvDtype::kFp16, KvScaleMode::kNone}, "fp16"},
    {{KvDtype::kBf16, KvScaleMode::kNone}, "bf16"},
    {{KvDtype::kFp32, KvScaleMode::kNone}, "fp32"},
    {{KvDtype::kFp8E4M3, KvScaleMode::kDynamic}, "fp8_e4m3 dyn"},
    {{KvDtype::kFp8E4M3, KvScaleMode::kStatic}, "fp8_e4m3 static"},
    {{KvDtype::kFp8E5M2, KvScaleMode::kNone}, "fp8_e5m2"},
    {{KvDtype::kInt8, KvScaleMode::kDynamic}, "int8 dyn"},
    {{KvDtype::kInt8, KvScaleMode::kStatic}, "int8 static"},
    {{KvDtype::kInt4, KvScaleMode::kDynamic}, "int4 dyn"},
};

struct Result {
  int ctx;
  std::string name;
  int partition;
  double us;       // queued
  double sync_us;  // sync
  double gbps;
  double frac;
  double rel_fp16;
  double sync_rel_fp16;
};

float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Spins for `ns` nanoseconds of GPU time (keeps the GPU busy while the host
// queues a group of timed calls).
__global__ void SpinKernel(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}

// Two timings of a call, each the median milliseconds over `iters` calls of
// call(i) (after `warmup` untimed ones) bracketed by CUDA events:
//   sync:   the host waits for each call before it launches the next, so the
//           time includes the launch latency of the call's first kernel (a few
//           microseconds; the method of the earlier result files);
//   queued: groups of 10 calls are queued behind a 2 ms GPU spin, so the
//           events bracket back-to-back GPU work only, as in a CUDA graph
//           replay and as bench/peer_flashinfer.py times FlashInfer.
struct Timing {
  float sync_ms = 0;
  float queued_ms = 0;
};

template <class Call>
Timing TimeCalls(int warmup, int iters, Call call) {
  Timing r;
  for (int i = 0; i < warmup; ++i) call(i);
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int i = warmup; i < warmup + iters; ++i) {
    CHECK_CUDA(cudaEventRecord(e0));
    call(i);
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float t;
    CHECK_CUDA(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  r.sync_ms = Median(ms);
  constexpr int kGroup = 10;
  std::vector<cudaEvent_t> ev(2 * kGroup);
  for (cudaEvent_t& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  ms.clear();
  for (int done = 0; done < iters; done += kGroup) {
    const int n = std::min(kGroup, iters - done);
    SpinKernel<<<1, 1>>>(2000000ull);
    CHECK_CUDA(cudaGetLastError());
    for (int j = 0; j < n; ++j) {
      CHECK_CUDA(cudaEventRecord(ev[2 * j]));
      call(warmup + done + j);
      CHECK_CUDA(cudaEventRecord(ev[2 * j + 1]));
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    for (int j = 0; j < n; ++j) {
      float t;
      CHECK_CUDA(cudaEventElapsedTime(&t, ev[2 * j], ev[2 * j + 1]));
      ms.push_back(t);
    }
  }
  for (cudaEvent_t& e : ev) CHECK_CUDA(cudaEventDestroy(e));
  r.queued_ms = Median(ms);
  return r;
}

// Exits when a device output holds a NaN or infinity.
void CheckFinite(const float* dev, size_t n, const char* what) {
  std::vector<float> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost));
  for (float x : h) {
    if (!std::isfinite(x)) {
      std::fprintf(stderr, "non-finite %s output\n", what);
      std::exit(1);
    }
  }
}

double CopyBandwidth(int iters) {
  const size_t bytes = size_t{2} << 30;  // 2 GiB
  void *a, *b;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  for (int i = 0; i < 2; ++i) CHECK_CUDA(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
  const float ms = TimeCalls(0, iters, [&](int i) {
    CHECK_CUDA(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice));
  }).sync_ms;
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  return 2.0 * bytes / (ms * 1e-3) / 1e9;  // read + write, GB/s
}

struct Setup {
  KvCacheView view;
  int copies = 1;
  std::vector<int32_t*> tables;  // per copy, [kBatch][blocks_per_seq]
  int32_t* ctx = nullptr;
  int32_t* qs = nullptr;
  float* q = nullptr;
  float* out = nullptr;
  float* scales = nullptr;
  int blocks_per_seq = 0;
};

// Cache copies of `bytes_one` bytes each that make the bytes touched by a
// sequence of calls exceed L2 4x (1..16).
int CopiesFor(double bytes_one, size_t l2_bytes) {
  return std::min(16, std::max(1, static_cast<int>(std::ceil(4.0 * l2_bytes / bytes_one))));
}

// A device copy of `h` (at least one element allocated). Free with cudaFree.
int32_t* UploadInts(const std::vector<int32_t>& h) {
  int32_t* d;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(int32_t)));
  CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  return d;
}

// Every slot of the view's pool written through WriteKvCache from random K/V
// (real codes, scales and zero points), in chunks of slots.
void FillCache(const strata::KvCacheView& view) {
  const int64_t slots = int64_t{view.num_blocks} * view.layout.block_size;
  const int64_t chunk = 1 << 16;
  const int64_t row = int64_t{view.layout.num_kv_heads} * view.layout.head_dim;
  float *k, *v;
  int64_t* sm;
  CHECK_CUDA(cudaMalloc(&k, chunk * row * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&v, chunk * row * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&sm, chunk * sizeof(int64_t)));
  for (int64_t s0 = 0; s0 < slots; s0 += chunk) {
    const int64_t n = std::min(chunk, slots - s0);
    FillRandom<<<1024, 256>>>(k, n * row, 2 * s0 + 1, view.layout.head_dim);
    FillRandom<<<1024, 256>>>(v, n * row, 2 * s0 + 2, view.layout.head_dim);
    Iota<<<256, 256>>>(sm, n, s0);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(sc::WriteKvCache(view, k, v, sm, static_cast<int32_t>(n), nullptr));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaFree(k));
  CHECK_CUDA(cudaFree(v));
  CHECK_CUDA(cudaFree(sm));
}

// Block ids first .. first + n - 1 in a random order (Fisher-Yates, LCG state *rng).
std::vector<int32_t> ShuffledIds(int64_t first, int64_t n, uint64_t* rng) {
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>(first + i);
  for (int64_t i = n - 1; i > 0; --i) {
    *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
    std::swap(ids[i], ids[(*rng >> 33) % (i + 1)]);
  }
  return ids;
}

// One device block table per cache copy: copy c's blocks [c n, (c + 1) n) shuffled.
std::vector<int32_t*> ShuffledTables(int64_t blocks_one, int copies, uint64_t seed) {
  std::vector<int32_t*> tables;
  for (int c = 0; c < copies; ++c) tables.push_back(UploadInts(ShuffledIds(c * blocks_one, blocks_one, &seed)));
  return tables;
}

// Allocates `copies` caches' worth of blocks in one pool, fills them with
// random data through WriteKvCache, and builds per-copy shuffled block tables.
Setup MakeSetup(KvFormat f, int ctx, size_t l2_bytes) {
  Setup s;
  s.view.layout = strata::MakeKvBlockLayout(f, g_block, kKvHeads, kHeadDim);
  s.blocks_per_seq = (ctx + g_block - 1) / g_block;
  const int64_t blocks_one = int64_t{kBatch} * s.blocks_per_seq;
  s.copies = CopiesFor(double(blocks_one) * s.view.layout.block_bytes, l2_bytes);
  const int64_t blocks = blocks_one * s.copies;
  s.view.num_blocks = static_cast<int32_t>(blocks);
  CHECK_CUDA(cudaMalloc(&s.view.pool, size_t(blocks) * s.view.layout.block_bytes));
  if (f.scale_mode == KvScaleMode::kStatic) {
    std::vector<float> h(4 * kKvHeads, 0.0f);
    const float qmax = f.dtype == KvDtype::kInt8 ? 127.0f : 448.0f;
    for (int i = 0; i < kKvHeads; ++i) h[i] = h[2 * kKvHeads + i] = 6.0f / qmax;
    CHECK_CUDA(cudaMalloc(&s.scales, h.size() * sizeof(float)));
    CHECK_CUDA(cudaMemcpy(s.scales, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
    s.view.k_scale = s.scales;
    s.view.v_scale = s.scales + 2 * kKvHeads;
    if (f.dtype == KvDtype::kInt8) {
      s.view.k_zero = s.scales + kKvHeads;
      s.view.v_zero = s.scales + 3 * kKvHeads;
    }
  }
  FillCache(s.view);
  s.tables = ShuffledTables(blocks_one, s.copies, 12345);
  std::vector<int32_t> qs(kBatch + 1);
  for (int i = 0; i <= kBatch; ++i) qs[i] = i;
  s.ctx = UploadInts(std::vector<int32_t>(kBatch, ctx));
  s.qs = UploadInts(qs);
  const size_t qn = size_t{kBatch} * kHeads * kHeadDim;
  CHECK_CUDA(cudaMalloc(&s.q, qn * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&s.out, qn * sizeof(float)));
  FillRandom<<<256, 256>>>(s.q, qn, 99, kHeadDim);
  CHECK_CUDA(cudaGetLastError());
  return s;
}

void FreeSetup(Setup& s) {
  CHECK_CUDA(cudaFree(s.view.pool));
  for (int32_t* t : s.tables) CHECK_CUDA(cudaFree(t));
  CHECK_CUDA(cudaFree(s.ctx));
  CHECK_CUDA(cudaFree(s.qs));
  CHECK_CUDA(cudaFree(s.q));
  CHECK_CUDA(cudaFree(s.out));
  if (s.scales) CHECK_CUDA(cudaFree(s.scales));
}

// Bytes a decode step must move: K/V data and per-token scale/zero sections
// of the context, plus the fp32 output.
double StepBytes(const KvCacheView& v, int ctx) {
  const auto& l = v.layout;
  double per_token = 2.0 * l.token_bytes;
  if (l.has_token_scale()) per_token += 2.0 * 2;
  if (l.has_token_zero()) per_token += 2.0 * 1;
  return double(kBatch) * ctx * kKvHeads * per_token + double(kBatch) * kHeads * kHeadDim * 4;
}

// Median time (ms, both methods) of one decode step with the given plan.
int g_warmup = 3;

// Random queries (seed 77, in *q) and an output buffer for `tokens` tokens of
// `heads` heads, and attention arguments over them and `view`; the caller
// sets the batch and frees *q and a.out.
sc::AttentionArgs ArgsWithQueries(const strata::KvCacheView& view, int64_t tokens, int heads,
                                  float** q_out) {
  const size_t qn = size_t(tokens) * heads * kHeadDim;
  float *q, *out;
  CHECK_CUDA(cudaMalloc(&q, qn * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&out, qn * sizeof(float)));
  FillRandom<<<1024, 256>>>(q, qn, 77, kHeadDim);
  CHECK_CUDA(cudaGetLastError());
  sc::AttentionArgs a;
  a.cache = view;
  a.query = q;
  a.out = out;
  a.num_heads = heads;
  a.softmax_scale = 1.0f / std::sqrt(float(kHeadDim));
  *q_out = q;
  return a;
}

Timing TimeDecode(Setup& s, const sc::DecodePlan& plan, int ctx, int iters) {
  void* ws = nullptr;
  if (plan.workspace_bytes > 0) CHECK_CUDA(cudaMalloc(&ws, plan.workspace_bytes));
  sc::AttentionArgs a;
  a.cache = s.view;
  a.batch.num_seqs = kBatch;
  a.batch.num_tokens = kBatch;
  a.batch.max_blocks_per_seq = s.blocks_per_seq;
  a.batch.context_lens = s.ctx;
  a.batch.query_start = s.qs;
  a.query = s.q;
  a.out = s.out;
  a.num_heads = kHeads;
  a.softmax_scale = 1.0f / std::sqrt(float(kHeadDim));
  const Timing t = TimeCalls(g_warmup, iters, [&](int i) {
    a.batch.block_tables = s.tables[i % s.copies];
    CHECK_CUDA(sc::PagedDecodeAttention(a, plan, ws, nullptr));
  });
  CheckFinite(s.out, size_t{kBatch} * kHeads * kHeadDim, "decode");
  if (ws) CHECK_CUDA(cudaFree(ws));
  return t;
}

// Prefill attention: `nseq` sequences of context `ctx`, each with a chunk of
// its last `chunk` positions as new tokens. Returns the median time (us).
double TimePrefill(Setup& s, int ctx, int chunk, int nseq, int iters) {
  const int64_t tokens = int64_t{nseq} * chunk;
  std::vector<int32_t> qs(nseq + 1), ctxs(nseq, ctx);
  for (int i = 0; i <= nseq; ++i) qs[i] = i * chunk;
  int32_t* dqs = UploadInts(qs);
  int32_t* dctx = UploadInts(ctxs);
  float* q;
  sc::AttentionArgs a = ArgsWithQueries(s.view, tokens, kHeads, &q);
  a.batch.num_seqs = nseq;
  a.batch.num_tokens = static_cast<int32_t>(tokens);
  a.batch.max_blocks_per_seq = s.blocks_per_seq;
  a.batch.context_lens = dctx;
  a.batch.query_start = dqs;
  a.batch.block_tables = s.tables[0];
  const float ms = TimeCalls(g_warmup, iters, [&](int) {
    CHECK_CUDA(sc::PagedPrefillAttention(a, chunk, nullptr));
  }).queued_ms;
  CheckFinite(a.out, size_t(tokens) * kHeads * kHeadDim, "prefill");
  CHECK_CUDA(cudaFree(dqs));
  CHECK_CUDA(cudaFree(dctx));
  CHECK_CUDA(cudaFree(q));
  CHECK_CUDA(cudaFree(a.out));
  return ms * 1e3;
}

// The attention of a mixed step as the engine runs it: `ndec` one-token
// sequences at context `dctx` and one sequence with `pnew` new tokens ending at
// context `pctx` (the batch's last), `heads` query = kv heads, head_dim 128.
void TimeMixed(KvFormat f, const char* fname, int heads, int ndec, int dctx, int pnew, int pctx,
               int num_sms, int iters) {
  strata::KvCacheView view;
  view.layout = strata::MakeKvBlockLayout(f, g_block, heads, kHeadDim);
  const int mbps = (std::max(dctx, pctx) + g_block - 1) / g_block;
  const int nseq = ndec + 1;
  const int nblocks = nseq * mbps;
  view.num_blocks = nblocks;
  CHECK_CUDA(cudaMalloc(&view.pool, size_t(nblocks) * view.layout.block_bytes));
  FillCache(view);
  uint64_t rng = 99;
  const std::vector<int32_t> tables = ShuffledIds(0, nblocks, &rng);  // [nseq][mbps]
  std::vector<int32_t> ctx(nseq), qs(nseq + 1), dec_rows(ndec);
  int t = 0;
  for (int s = 0; s < nseq; ++s) {
    qs[s] = t;
    ctx[s] = s == ndec ? pctx : dctx;
    t += s == ndec ? pnew : 1;
    if (s < ndec) dec_rows[s] = qs[s];
  }
  qs[nseq] = t;
  int32_t* d_tab = UploadInts(tables);
  int32_t* d_ctx = UploadInts(ctx);
  int32_t* d_qs = UploadInts(qs);
  int32_t* d_rows = UploadInts(dec_rows);
  int32_t* d_pf = UploadInts({ndec});  // the prefill sequence is the batch's last
  // The decode sub-batch: the first ndec sequences' tables and contexts.
  int32_t* d_dtab = UploadInts({tables.begin(), tables.begin() + size_t(ndec) * mbps});
  int32_t* d_dctx = UploadInts({ctx.begin(), ctx.begin() + ndec});
  float* q;
  sc::AttentionArgs a = ArgsWithQueries(view, t, heads, &q);
  a.batch.num_seqs = nseq;
  a.batch.num_tokens = t;
  a.batch.max_blocks_per_seq = mbps;
  a.batch.block_tables = d_tab;
  a.batch.context_lens = d_ctx;
  a.batch.query_start = d_qs;
  a.skip_single_token = true;
  sc::AttentionArgs ai = a;  // thread blocks for the multi-token sequence only
  ai.seq_index = d_pf;
  ai.num_indexed_seqs = 1;
  sc::AttentionArgs da = a;  // the one-token sub-batch, outputs in place
  da.skip_single_token = false;
  da.batch.num_seqs = da.batch.num_tokens = ndec;
  da.batch.query_start = d_rows;
  da.batch.context_lens = d_dctx;
  da.batch.block_tables = d_dtab;
  const sc::DecodePlan plan = sc::PlanDecode(view, ndec, heads, dctx, num_sms);
  void* ws = nullptr;
  if (plan.workspace_bytes > 0) CHECK_CUDA(cudaMalloc(&ws, plan.workspace_bytes));
  int lo = 0, hi = 0;
  CHECK_CUDA(cudaDeviceGetStreamPriorityRange(&lo, &hi));
  cudaStream_t side;
  CHECK_CUDA(cudaStreamCreateWithPriority(&side, cudaStreamNonBlocking, hi));
  cudaEvent_t fork, join;
  CHECK_CUDA(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  CHECK_CUDA(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  auto side_by_side = [&](const sc::AttentionArgs& pa) {
    CHECK_CUDA(cudaEventRecord(fork, nullptr));
    CHECK_CUDA(cudaStreamWaitEvent(side, fork, 0));
    CHECK_CUDA(sc::PagedPrefillAttention(pa, pnew, side));
    CHECK_CUDA(cudaEventRecord(join, side));
    CHECK_CUDA(sc::PagedDecodeAttention(da, plan, ws, nullptr));
    CHECK_CUDA(cudaStreamWaitEvent(nullptr, join, 0));
  };
  auto us = [&](auto call) { return TimeCalls(g_warmup, iters, [&](int) { call(); }).queued_ms * 1e3; };
  const double pf_all = us([&] { CHECK_CUDA(sc::PagedPrefillAttention(a, pnew, nullptr)); });
  const double pf_idx = us([&] { CHECK_CUDA(sc::PagedPrefillAttention(ai, pnew, nullptr)); });
  const double dec = us([&] { CHECK_CUDA(sc::PagedDecodeAttention(da, plan, ws, nullptr)); });
  const double sbs_all = us([&] { side_by_side(a); });
  const double sbs_idx = us([&] { side_by_side(ai); });
  const double ser_all = us([&] {
    CHECK_CUDA(sc::PagedDecodeAttention(da, plan, ws, nullptr));
    CHECK_CUDA(sc::PagedPrefillAttention(a, pnew, nullptr));
  });
  const double ser_idx = us([&] {
    CHECK_CUDA(sc::PagedDecodeAttention(da, plan, ws, nullptr));
    CHECK_CUDA(sc::PagedPrefillAttention(ai, pnew, nullptr));
  });
  CheckFinite(a.out, size_t(t) * heads * kHeadDim, "mixed-step");
  std::printf("| %s | %d | %d x %d + %d at %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", fname,
              heads, ndec, dctx, pnew, pctx, pf_all, pf_idx, dec, sbs_all, sbs_idx, ser_all, ser_idx);
  std::fflush(stdout);
  CHECK_CUDA(cudaEventDestroy(fork));
  CHECK_CUDA(cudaEventDestroy(join));
  CHECK_CUDA(cudaStreamDestroy(side));
  for (int32_t* p : {d_tab, d_ctx, d_qs, d_rows, d_pf, d_dtab, d_dctx}) CHECK_CUDA(cudaFree(p));
  if (ws) CHECK_CUDA(cudaFree(ws));
  CHECK_CUDA(cudaFree(q));
  CHECK_CUDA(cudaFree(a.out));
  CHECK_CUDA(cudaFree(view.pool));
}

// PlanDecode's choice against every partition size for one decode shape
// (batch sequences at context ctx, heads / kv_heads, head_dim 128); enough
// cache copies rotated that the bytes per call sequence exceed L2 4x.
void PlanSweep(KvFormat f, const char* fname, int batch, int ctx, int heads, int kv_heads,
               int num_sms, size_t l2_bytes) {
  strata::KvCacheView view;
  view.layout = strata::MakeKvBlockLayout(f, g_block, kv_heads, kHeadDim);
  const int mbps = (ctx + g_block - 1) / g_block;
  const int64_t blocks_one = int64_t{batch} * mbps;
  const int copies = CopiesFor(double(blocks_one) * view.layout.block_bytes, l2_bytes);
  const int64_t nblocks = blocks_one * copies;
  view.num_blocks = static_cast<int32_t>(nblocks);
  CHECK_CUDA(cudaMalloc(&view.pool, size_t(nblocks) * view.layout.block_bytes));
  FillCache(view);
  const std::vector<int32_t*> tables = ShuffledTables(blocks_one, copies, 4242);
  std::vector<int32_t> qs(batch + 1);
  for (int i = 0; i <= batch; ++i) qs[i] = i;
  int32_t* d_ctx = UploadInts(std::vector<int32_t>(batch, ctx));
  int32_t* d_qs = UploadInts(qs);
  float* q;
  sc::AttentionArgs a = ArgsWithQueries(view, batch, heads, &q);
  a.batch.num_seqs = a.batch.num_tokens = batch;
  a.batch.max_blocks_per_seq = mbps;
  a.batch.context_lens = d_ctx;
  a.batch.query_start = d_qs;
  auto time_plan = [&](const sc::DecodePlan& plan) {
    void* ws = nullptr;
    if (plan.workspace_bytes > 0) CHECK_CUDA(cudaMalloc(&ws, plan.workspace_bytes));
    const double us = TimeCalls(g_warmup, 30, [&](int i) {
      a.batch.block_tables = tables[i % copies];
      CHECK_CUDA(sc::PagedDecodeAttention(a, plan, ws, nullptr));
    }).queued_ms * 1e3;
    if (ws) CHECK_CUDA(cudaFree(ws));
    return us;
  };
  const sc::DecodePlan planned = sc::PlanDecode(view, batch, heads, ctx, num_sms);
  const double planned_us = time_plan(planned);
  double best_us = planned_us;
  int best_p = planned.partition_size;
  std::string all;
  for (int p = 256; p <= sc::MaxDecodePartition(view); p *= 2) {
    if (p % g_block != 0 || (p >= 2 * ctx && p != planned.partition_size)) continue;
    const double us = p == planned.partition_size ? planned_us
                                                   : time_plan(sc::PlanDecodeWithPartition(view, batch, heads, ctx, p));
    char buf[48];
    std::snprintf(buf, sizeof buf, " %d:%.1f", p, us);
    all += buf;
    if (us < best_us) best_us = us, best_p = p;
  }
  CheckFinite(a.out, size_t(batch) * heads * kHeadDim, "plan-sweep");
  std::printf("| %s | %d | %d | %d/%d | %d x%d | %.1f | %d | %.1f | %.3f |%s |\n", fname, batch, ctx, heads,
              kv_heads, planned.partition_size, planned.max_splits, planned_us, best_p, best_us,
              planned_us / best_us, all.c_str());
  std::fflush(stdout);
  for (int32_t* t : tables) CHECK_CUDA(cudaFree(t));
  CHECK_CUDA(cudaFree(d_ctx));
  CHECK_CUDA(cudaFree(d_qs));
  CHECK_CUDA(cudaFree(q));
  CHECK_CUDA(cudaFree(a.out));
  CHECK_CUDA(cudaFree(view.pool));
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, sweep = false, prefill = false, prefill_only = false, mixed = false,
       plan_sweep = false;
  int only_ctx = 0, iters_override = 0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--sweep")) sweep = true;
    if (!std::strcmp(argv[i], "--prefill")) prefill = true;
    if (!std::strcmp(argv[i], "--prefill-only")) prefill = prefill_only = true;
    if (!std::strcmp(argv[i], "--mixed")) mixed = true;
    if (!std::strcmp(argv[i], "--plan-sweep")) plan_sweep = true;
    if (!std::strcmp(argv[i], "--ctx") && i + 1 < argc) only_ctx = std::atoi(argv[++i]);
    if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) iters_override = std::atoi(argv[++i]);
    if (!std::strcmp(argv[i], "--warmup") && i + 1 < argc) g_warmup = std::atoi(argv[++i]);
    if (!std::strcmp(argv[i], "--block-size") && i + 1 < argc) g_block = std::atoi(argv[++i]);
  }
  if (g_block < 1 || g_block > 4096 || (g_block & (g_block - 1)) != 0) {
    std::fprintf(stderr, "--block-size %d: a power of two in [1, 4096]\n", g_block);
    return 2;
  }
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  const double copy_bw = CopyBandwidth(quick ? 3 : 10);
  std::printf("device: %s, %d SMs, L2 %.0f MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1e6);
  std::printf("cudaMemcpy D2D bandwidth (read+write): %.0f GB/s\n", copy_bw);
  if (plan_sweep) {
    std::printf("PlanDecode against every partition size, head_dim %d, block %d, queued timing (us)\n\n"
                "| KV | batch | context | heads/kv | planned | us | best P | us | planned / best | all (P:us) |\n"
                "|---|---:|---:|---|---|---:|---:|---:|---:|---|\n", kHeadDim, g_block);
    for (const FormatCase* fc : {&kFormats[0], &kFormats[6]}) {
      for (auto [heads, kvh] : {std::pair{40, 40}, std::pair{10, 10}, std::pair{32, 8}, std::pair{8, 2}}) {
        for (int batch : {16, 64, 256}) {
          for (int ctx : {512, 1024, 2048, 4096, 8192}) {
            const double gb = double(batch) * ctx * kvh * kHeadDim * 2 * 2 / 1e9;
            if (gb > 12.0) continue;
            PlanSweep(fc->format, fc->name, batch, ctx, heads, kvh, prop.multiProcessorCount, prop.l2CacheSize);
          }
        }
      }
    }
    return 0;
  }
  if (mixed) {
    std::printf("mixed steps, head_dim %d, block %d, queued timing (us per call)\n\n", kHeadDim, g_block);
    std::printf("| KV | heads | decodes x context + new tokens at context | prefill, all seqs | prefill, "
                "indexed | decode | side by side, all | side by side, indexed | serialized, all | "
                "serialized, indexed |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    const int it = quick ? 10 : 200;
    for (const FormatCase* fc : {&kFormats[0], &kFormats[6]}) {
      for (int heads : {40, 20, 10}) {
        TimeMixed(fc->format, fc->name, heads, 64, 512, 200, 200, prop.multiProcessorCount, it);
      }
      TimeMixed(fc->format, fc->name, 10, 256, 512, 512, 1024, prop.multiProcessorCount, it);
    }
    return 0;
  }
  std::printf("shape: batch %d, heads %d, kv heads %d, head_dim %d, block %d\n", kBatch, kHeads,
              kKvHeads, kHeadDim, g_block);
  std::fflush(stdout);

  std::vector<Result> results;
  for (int ctx : {512, 4096, 32768}) {
    if ((only_ctx && ctx != only_ctx) || prefill_only) continue;
    double fp16_us = 0, fp16_sync_us = 0;
    for (const FormatCase& fc : kFormats) {
      if (ctx == 32768 && fc.format.dtype == KvDtype::kFp32) continue;  // 34 GB of cache
      Setup s = MakeSetup(fc.format, ctx, prop.l2CacheSize);
      const sc::DecodePlan plan =
          sc::PlanDecode(s.view, kBatch, kHeads, ctx, prop.multiProcessorCount);
      const int iters =
          iters_override > 0 ? iters_override : quick ? 5 : (ctx == 32768 ? 30 : 100);
      const Timing t = TimeDecode(s, plan, ctx, iters);
      const double us = t.queued_ms * 1e3, sync_us = t.sync_ms * 1e3;
      if (fc.format.dtype == KvDtype::kFp16) fp16_us = us, fp16_sync_us = sync_us;
      const double gbps = StepBytes(s.view, ctx) / (us * 1e-6) / 1e9;
      results.push_back({ctx, fc.name, plan.partition_size, us, sync_us, gbps, gbps / copy_bw,
                         fp16_us > 0 ? us / fp16_us : 0,
                         fp16_sync_us > 0 ? sync_us / fp16_sync_us : 0});
      std::printf("ctx %5d %-16s P %4d x%-3d copies %2d: %9.1f us  %6.0f GB/s  %5.1f%% of copy"
                  "  (sync call %.1f us)\n",
                  ctx, fc.name, plan.partition_size, plan.max_splits, s.copies, us, gbps,
                  100 * gbps / copy_bw, sync_us);
      std::fflush(stdout);
      if (sweep) {
        for (int p : {256, 512, 1024, 2048, 4096, 8192}) {
          if (p > sc::MaxDecodePartition(s.view) || p >= 2 * ctx || (ctx == 32768 && p < 1024)) continue;
          const auto pp = sc::PlanDecodeWithPartition(s.view, kBatch, kHeads, ctx, p);
          const double t = TimeDecode(s, pp, ctx, quick ? 5 : (ctx == 32768 ? 30 : 50)).queued_ms * 1e3;
          std::printf("    sweep P %4d: %9.1f us  %6.0f GB/s\n", p, t,
                      StepBytes(s.view, ctx) / (t * 1e-6) / 1e9);
        }
      }
      FreeSetup(s);
    }
  }

  if (prefill) {
    // Attention FLOPs of the causal chunk (QK and PV, 2 per multiply-add).
    std::printf("\n| prefill: context | new tokens x seqs | format | time (ms) | TFLOP/s | time / fp16 |\n");
    std::printf("|---:|---|---|---:|---:|---:|\n");
    const FormatCase* pf[] = {&kFormats[0], &kFormats[1], &kFormats[3], &kFormats[6], &kFormats[8]};
    for (auto [ctx, chunk, nseq] : {std::tuple{4096, 2048, 2}, std::tuple{16384, 2048, 1}}) {
      if (only_ctx && ctx != only_ctx) continue;
      double fp16_us = 0;
      for (const FormatCase* fc : pf) {
        Setup s = MakeSetup(fc->format, ctx, 0);
        const double us = TimePrefill(s, ctx, chunk, nseq, quick ? 3 : 20);
        if (fc->format.dtype == KvDtype::kFp16) fp16_us = us;
        double pairs = 0;  // (query, key) pairs under the causal mask
        for (int t = ctx - chunk; t < ctx; ++t) pairs += t + 1;
        const double flops = 4.0 * pairs * nseq * kHeads * kHeadDim;
        std::printf("| %d | %d x %d | %s | %.3f | %.1f | %.3f |\n", ctx, chunk, nseq, fc->name,
                    us / 1e3, flops / (us * 1e-6) / 1e12, fp16_us > 0 ? us / fp16_us : 0.0);
        std::fflush(stdout);
        FreeSetup(s);
      }
    }
  }

  // Queued: back-to-back GPU time; sync call: also the launch latency (see TimeCalls).
  std::printf("\n| context | format | partition | time (us) | GB/s | %% of D2D copy | time / fp16 |"
              " sync call (us) | sync / fp16 |\n");
  std::printf("|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Result& r : results) {
    std::printf("| %d | %s | %d | %.1f | %.0f | %.1f%% | %.3f | %.1f | %.3f |\n", r.ctx,
                r.name.c_str(), r.partition, r.us, r.gbps, 100 * r.frac, r.rel_fp16, r.sync_us,
                r.sync_rel_fp16);
  }
  return 0;
}
