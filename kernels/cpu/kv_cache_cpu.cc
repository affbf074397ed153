// CPU kernels over the paged, quantized KV cache (see kv_cache_cpu.h).
//
// Quantization is the scalar math of kernels/quant_math.h, so a cache written
// here is bit-identical to one written by the CUDA kernels. Attention is plain
// fp32 with a two-pass (max, then exp/sum) softmax per query row; for an fp32
// cache nothing is lost to conversions.
#include "kernels/cpu/kv_cache_cpu.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/quant_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "runtime/check.h"

namespace strata::cpu {
namespace {

using qmath::KvCodec;

// Calls fn(KvCodec<D, M>{}) for the cache's format.
template <class Fn>
void VisitFormat(KvFormat f, Fn&& fn) {
#define STRATA_VISIT_(D, M)        \
  if (f == KvFormat{D, M}) {       \
    fn(KvCodec<D, M>{});           \
    return;                        \
  }
  STRATA_FOR_EACH_KV_FORMAT(STRATA_VISIT_)
#undef STRATA_VISIT_
  STRATA_CHECK(false) << "unsupported KV format " << static_cast<int>(f.dtype) << "/"
                      << static_cast<int>(f.scale_mode);
}

// Addresses of one (token, kv head) row of K or V inside a block.
struct RowRef {
  uint8_t* data = nullptr;
  uint16_t* scale = nullptr;  // dynamic mode only
  uint8_t* zero = nullptr;    // dynamic integer formats only
};

RowRef Row(const KvCacheView& c, int64_t block, int off, int h, bool is_v) {
  const KvBlockLayout& l = c.layout;
  uint8_t* b = c.block(static_cast<int32_t>(block));
  RowRef r;
  r.data = b + (is_v ? l.v_data : l.k_data) + l.data_row(h, off);
  if (l.has_token_scale()) {
    r.scale = reinterpret_cast<uint16_t*>(b + (is_v ? l.v_scale : l.k_scale)) + l.scale_index(h, off);
  }
  if (l.has_token_zero()) r.zero = b + (is_v ? l.v_zero : l.k_zero) + l.scale_index(h, off);
  return r;
}

// Scale and zero point used to decode a stored row.
template <class C>
void RowScale(const KvCacheView& c, const RowRef& r, int h, bool is_v, float* s, float* z) {
  *s = 1.0f;
  *z = 0.0f;
  if constexpr (C::kMode == KvScaleMode::kStatic) {
    *s = (is_v ? c.v_scale : c.k_scale)[h];
    if constexpr (C::kHasZero) *z = (is_v ? c.v_zero : c.k_zero)[h];
  } else if constexpr (C::kMode == KvScaleMode::kDynamic) {
    uint16_t bits;
    std::memcpy(&bits, r.scale, sizeof(bits));
    *s = qmath::HalfBitsToFloat(bits);
    if constexpr (C::kHasZero) *z = qmath::ZeroFromBits(C::kDtype, *r.zero);
  }
}

template <class C>
void EncodeRow(const float* x, int hd, float s, float z, uint8_t* data) {
  if constexpr (C::kBits == 4) {
    for (int i = 0; i < hd; i += 2) {
      data[i / 2] = static_cast<uint8_t>(C::Encode(x[i], s, z) | (C::Encode(x[i + 1], s, z) << 4));
    }
  } else if constexpr (C::kBits == 8) {
    for (int i = 0; i < hd; ++i) data[i] = static_cast<uint8_t>(C::Encode(x[i], s, z));
  } else if constexpr (C::kBits == 16) {
    for (int i = 0; i < hd; ++i) {
      const uint16_t v = static_cast<uint16_t>(C::Encode(x[i], s, z));
      std::memcpy(data + 2 * i, &v, 2);
    }
  } else {
    std::memcpy(data, x, sizeof(float) * hd);
  }
}

#if defined(__AVX512F__)
// 16 integer codes as floats: int8 (signed bytes) or int4 (8 bytes of
// nibbles, low first: lane j takes byte j / 2, nibble j % 2). The maskz forms
// of the intrinsics: GCC 12 flags the plain ones' undefined passthrough.
inline __m512 Int8Codes16(const uint8_t* data) {
  const __mmask16 all = 0xffff;
  const __m512i c =
      _mm512_maskz_cvtepi8_epi32(all, _mm_loadu_si128(reinterpret_cast<const __m128i*>(data)));
  return _mm512_maskz_cvtepi32_ps(all, c);
}
inline __m512 Int4Codes16(const uint8_t* data) {
  const __mmask16 all = 0xffff;
  const __m512i idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const __m512i bytes =
      _mm512_maskz_cvtepu8_epi32(all, _mm_loadl_epi64(reinterpret_cast<const __m128i*>(data)));
  const __m512i c = _mm512_and_si512(
      _mm512_maskz_srlv_epi32(all, _mm512_maskz_permutexvar_epi32(all, idx, bytes), shift),
      _mm512_set1_epi32(15));
  return _mm512_maskz_cvtepi32_ps(all, c);
}
// Codes i .. i + 15 of an int8 or int4 row, as floats.
template <class C>
inline __m512 Codes16(const uint8_t* row, int i) {
  return C::kDtype == KvDtype::kInt8 ? Int8Codes16(row + i) : Int4Codes16(row + i / 2);
}
#endif

template <class C>
void DecodeRow(const uint8_t* data, int hd, float s, float z, float* out) {
  if constexpr (C::kBits == 4) {
    int i = 0;
#if defined(__AVX512F__)
    // (code - z) * s as in Decode (no FMA: the same rounding), 16 at a time.
    if constexpr (C::kDtype == KvDtype::kInt4) {
      const __m512 zv = _mm512_set1_ps(z), sv = _mm512_set1_ps(s);
      for (; i + 16 <= hd; i += 16) {
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_sub_ps(Int4Codes16(data + i / 2), zv), sv));
      }
    }
#endif
    for (; i < hd; i += 2) {
      out[i] = C::Decode(data[i / 2] & 0xFu, s, z);
      out[i + 1] = C::Decode(data[i / 2] >> 4, s, z);
    }
  } else if constexpr (C::kBits == 8) {
    int i = 0;
#if defined(__AVX512F__)
    if constexpr (C::kDtype == KvDtype::kInt8) {  // (float(int8 code) - z) * s, 16 at a time
      const __m512 zv = _mm512_set1_ps(z), sv = _mm512_set1_ps(s);
      for (; i + 16 <= hd; i += 16) {
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_sub_ps(Int8Codes16(data + i), zv), sv));
      }
    }
#endif
    if constexpr (C::kDtype == KvDtype::kFp8E4M3 || C::kDtype == KvDtype::kFp8E5M2) {
      // fp8: the code's value from a table of all 256 (the conversion is
      // branchy), times the scale as in Decode: the same bits.
      static const std::array<float, 256> kValue = [] {
        std::array<float, 256> t{};
        for (int c = 0; c < 256; ++c) t[c] = C::Decode(static_cast<uint32_t>(c), 1.0f, 0.0f);
        return t;
      }();
      if constexpr (C::kDtype == KvDtype::kFp8E5M2 && !C::kScaled) {
        for (; i < hd; ++i) out[i] = kValue[data[i]];
      } else {
        for (; i < hd; ++i) out[i] = kValue[data[i]] * s;
      }
    }
    for (; i < hd; ++i) out[i] = C::Decode(data[i], s, z);
  } else if constexpr (C::kBits == 16) {
    int i = 0;
#if defined(__AVX512F__) && defined(__F16C__)
    // IEEE half -> float, 16 at a time (vcvtph2ps is exact; it differs from
    // HalfBitsToFloat only in quieting signaling NaNs).
    if constexpr (C::kDtype == KvDtype::kFp16) {
      for (; i + 16 <= hd; i += 16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + 2 * i));
        // The maskz form: GCC 12 flags _mm512_cvtph_ps's undefined passthrough.
        _mm512_storeu_ps(out + i, _mm512_maskz_cvtph_ps(__mmask16(0xffff), h));
      }
    }
#endif
    for (; i < hd; ++i) {
      uint16_t v;
      std::memcpy(&v, data + 2 * i, 2);
      out[i] = C::Decode(v, s, z);
    }
  } else {
    std::memcpy(out, data, sizeof(float) * hd);
  }
}

template <class C>
void QuantizeRow(const KvCacheView& c, int64_t block, int off, int h, bool is_v, const float* x) {
  const int hd = c.layout.head_dim;
  const RowRef r = Row(c, block, off, h, is_v);
  float s = 1.0f, z = 0.0f;
  if constexpr (C::kMode == KvScaleMode::kStatic) {
    RowScale<C>(c, r, h, is_v, &s, &z);
  } else if constexpr (C::kMode == KvScaleMode::kDynamic) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < hd; ++i) {
      mn = std::fmin(mn, x[i]);
      mx = std::fmax(mx, x[i]);
    }
    const qmath::RowParams p = qmath::DynamicRowParams(C::kDtype, mn, mx);
    s = p.scale;
    z = p.zero;
    std::memcpy(r.scale, &p.scale_bits, sizeof(p.scale_bits));
    if constexpr (C::kHasZero) *r.zero = p.zero_bits;
  }
  EncodeRow<C>(x, hd, s, z, r.data);
}

// Dequantized row; for fp32 a pointer into the pool (no copy).
template <class C>
const float* ReadRow(const KvCacheView& c, int64_t block, int off, int h, bool is_v, float* buf) {
  const RowRef r = Row(c, block, off, h, is_v);
  if constexpr (C::kDtype == KvDtype::kFp32) {
    return reinterpret_cast<const float*>(r.data);
  } else {
    float s, z;
    RowScale<C>(c, r, h, is_v, &s, &z);
    DecodeRow<C>(r.data, c.layout.head_dim, s, z, buf);
    return buf;
  }
}

// fp32 dot product with 16 independent partial sums (one vector register;
// vectorizes without reassociation flags), summed as a tree.
inline float Dot(const float* a, const float* b, int n) {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k];
  }
  for (int k = 0; i < n; ++i, ++k) acc[k] += a[i] * b[i];
  for (int w = 8; w >= 1; w /= 2) {
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  }
  return acc[0];
}

// x as computed, never fused into the add or subtract that uses it (with
// -ffp-contract the compiler would decide per build and call site): the
// integer K pass rounds z * sum(q) on its own in every path.
inline float Unfused(float x) {
#if defined(__x86_64__)
  asm("" : "+x"(x));
#endif
  return x;
}

// q . c for one row of integer codes (int8: signed bytes, int4: nibbles,
// low first), as floats; AVX-512 takes 16 codes at a time.
template <class C>
inline float DotCodes(const float* q, const uint8_t* data, int hd) {
  int i = 0;
  float tail = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= hd; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), Codes16<C>(data, i), acc);
  alignas(64) float lanes[16];  // (not _mm512_reduce_add_ps: GCC 12 flags its passthrough)
  _mm512_store_ps(lanes, acc);
  for (int w = 8; w >= 1; w /= 2) {
    for (int k = 0; k < w; ++k) lanes[k] += lanes[k + w];
  }
  tail = lanes[0];
#endif
  for (; i < hd; ++i) {
    const uint32_t code = C::kBits == 4 ? (data[i / 2] >> (4 * (i & 1))) & 0xFu : data[i];
    const float c = C::kDtype == KvDtype::kInt8
                        ? static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(code)))
                        : static_cast<float>(code);
    tail += q[i] * c;
  }
  return tail;
}

// out[0, 16) = sum over positions t in [0, n) of p[t] * v[t * stride + (0, 16)],
// with four partial sums over t so the additions do not wait on each other.
inline void WeightedRows16(const float* p, const float* v, int64_t stride, int32_t n, float* out) {
  float a0[16] = {}, a1[16] = {}, a2[16] = {}, a3[16] = {};
  int32_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const float* r = v + t * stride;
    for (int x = 0; x < 16; ++x) {
      a0[x] += p[t] * r[x];
      a1[x] += p[t + 1] * r[stride + x];
      a2[x] += p[t + 2] * r[2 * stride + x];
      a3[x] += p[t + 3] * r[3 * stride + x];
    }
  }
  for (; t < n; ++t) {
    for (int x = 0; x < 16; ++x) a0[x] += p[t] * v[t * stride + x];
  }
  for (int x = 0; x < 16; ++x) out[x] += (a0[x] + a1[x]) + (a2[x] + a3[x]);
}

// WeightedRows16 over hd (a multiple of 16) dims: with AVX-512, up to four
// 16-dim chunks per pass over the rows, so each weight is broadcast once per
// pass instead of once per chunk; the same operations per element (four
// partial sums by position mod 4, then (a0 + a1) + (a2 + a3)), the same bits.
#if defined(__AVX512F__)
template <int K>
inline void WeightedRowsK(const float* p, const float* v, int64_t stride, int32_t n, float* out) {
  __m512 a[4][K];
  for (int j = 0; j < 4; ++j) {
    for (int k = 0; k < K; ++k) a[j][k] = _mm512_setzero_ps();
  }
  int32_t t = 0;
  for (; t + 4 <= n; t += 4) {
    for (int j = 0; j < 4; ++j) {
      const __m512 w = _mm512_set1_ps(p[t + j]);
      const float* r = v + (t + j) * stride;
      for (int k = 0; k < K; ++k) a[j][k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(r + 16 * k), a[j][k]);
    }
  }
  for (; t < n; ++t) {
    const __m512 w = _mm512_set1_ps(p[t]);
    for (int k = 0; k < K; ++k) a[0][k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + t * stride + 16 * k), a[0][k]);
  }
  for (int k = 0; k < K; ++k) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a[0][k], a[1][k]), _mm512_add_ps(a[2][k], a[3][k]));
    _mm512_storeu_ps(out + 16 * k, _mm512_add_ps(_mm512_loadu_ps(out + 16 * k), sum));
  }
}
#endif

inline void WeightedRows(const float* p, const float* v, int64_t stride, int32_t n, int hd, float* out) {
  int d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 64 <= hd; d0 += 64) WeightedRowsK<4>(p, v + d0, stride, n, out + d0);
  switch ((hd - d0) / 16) {
    case 3: WeightedRowsK<3>(p, v + d0, stride, n, out + d0); break;
    case 2: WeightedRowsK<2>(p, v + d0, stride, n, out + d0); break;
    case 1: WeightedRowsK<1>(p, v + d0, stride, n, out + d0); break;
    default: break;
  }
#else
  for (; d0 < hd; d0 += 16) WeightedRows16(p, v + d0, stride, n, out + d0);
#endif
}

inline void Axpy(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

// Query tokens of one sequence processed together (they share K/V decoding).
constexpr int kQueryTile = 16;

struct WorkItem {
  int32_t seq;
  int32_t first;  // index of the tile's first token among the sequence's new tokens
  int32_t kv_head;
};

struct Scratch {
  std::vector<float> scores;  // [rows][positions]
  std::vector<float> acc;     // [rows][head_dim]
  std::vector<float> sums;    // [rows]
  std::vector<float> row;     // [head_dim]
  std::vector<float> vblock;  // [block_size][head_dim]: a block's decoded V rows
  std::vector<float> kblock;  // [16][head_dim]: decoded K rows (non-fp32 formats)
  std::vector<float> qsum;    // [rows]: sum of each query row (integer formats)
  std::vector<const float*> qrows;  // [rows]: query row r
};

// Asks for one head's K (or V) rows of a block ahead of use: blocks are
// scattered, so the hardware prefetcher starts cold on each. kLocality: 3
// (all cache levels) for rows used next, 2 (L2 and out) for rows of the
// second pass.
template <int kLocality = 3>
inline void PrefetchHeadRows(const KvCacheView& c, int32_t block, int h, bool is_v) {
  const KvBlockLayout& l = c.layout;
  const uint8_t* p = c.block(block) + (is_v ? l.v_data : l.k_data) + l.data_row(h, 0);
  const int64_t bytes = int64_t{l.block_size} * l.token_bytes;
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, kLocality);
}
#if defined(__AVX512F__)
// 128-bit lanes of a and b (the maskz form: GCC 12 flags the plain one's
// undefined passthrough).
template <int kImm>
inline __m512 Shuf128(__m512 a, __m512 b) {
  return _mm512_maskz_shuffle_f32x4(__mmask16(0xffff), a, b, kImm);
}

// The lane sums of 16 vectors, summed in the order of Dot's tree (lanes k and
// k + 8, then k + 4, k + 2, k + 1), so each equals Dot's result bit for bit;
// lane t of the result is the sum of v[t].
inline __m512 LaneSums16(__m512 (&v)[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {  // lanes 0-7: v[2i]'s k + k+8; 8-15: v[2i+1]'s
    b[i] = _mm512_add_ps(Shuf128<0x44>(v[2 * i], v[2 * i + 1]),
                         Shuf128<0xEE>(v[2 * i], v[2 * i + 1]));
  }
  for (int j = 0; j < 4; ++j) {  // 128-bit lane L: vector 4j + L's k + k+4
    c[j] = _mm512_add_ps(Shuf128<0x88>(b[2 * j], b[2 * j + 1]),
                         Shuf128<0xDD>(b[2 * j], b[2 * j + 1]));
  }
  for (int m = 0; m < 2; ++m) {  // lane L: k + k+2 of vectors 8m + L, 8m + 4 + L
    d[m] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0x44),
                         _mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0xEE));
  }
  // Lane 4L + p: the sum of vector L + 4p.
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  const __m512i to_row = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_maskz_permutexvar_ps(__mmask16(0xffff), to_row, e);
}

// The dot products of q with rows t < n <= 16 (hd a multiple of 16), lane t
// of the result; row(t, i) gives dims i .. i + 15 of row t. Each sum has the
// bits of the one-row version (Dot, DotCodes): the same FMAs per lane and
// LaneSums16's tree, with the 16 rows' loads and FMAs interleaved instead of
// one dependent chain per row.
template <class RowChunk>
inline __m512 Dots16(const float* q, int n, int hd, RowChunk row) {
  __m512 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  for (int i = 0; i < hd; i += 16) {
    const __m512 qv = _mm512_loadu_ps(q + i);
    for (int t = 0; t < n; ++t) acc[t] = _mm512_fmadd_ps(qv, row(t, i), acc[t]);
  }
  return LaneSums16(acc);
}
inline void StoreFirst(float* out, int n, __m512 v) {
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1), v);
}
#endif

// Blocks of K (pass 1) and V (pass 2) requested ahead of the one in use. At
// batch 16 the cache of a step (24 MB for stories15M at ~100 positions) comes
// from memory, as the streamed weights evict it: one block of lead left both
// passes waiting on loads (perf: most of the attention time on the first
// load of a row); a few blocks keep enough lines in flight.
constexpr int kPrefetchBlocks = 4;

// Normalized output rows of a tile (row r = token i * group + g).
void WriteRows(const Scratch& sc, int rows, int group, int32_t first_token, int num_heads,
               int kv_head, int hd, float* out) {
  for (int r = 0; r < rows; ++r) {
    const int i = r / group, g = r % group;
    float* o = out + (int64_t{first_token + i} * num_heads + kv_head * group + g) * hd;
    const float* a = &sc.acc[static_cast<size_t>(r) * hd];
    for (int d = 0; d < hd; ++d) o[d] = a[d] / sc.sums[r];
  }
}

template <class C>
void AttendTile(const KvCacheView& cache, const PagedBatchView& batch, const WorkItem& it,
                const float* query, int num_heads, int group, float softmax_scale, float* out,
                Scratch& sc) {
  const KvBlockLayout& l = cache.layout;
  const int hd = l.head_dim;
  const int bs = l.block_size;
  const int32_t q0 = batch.query_start[it.seq];
  const int32_t n = batch.query_start[it.seq + 1] - q0;
  const int32_t ctx = batch.context_lens[it.seq];
  STRATA_CHECK(ctx >= n) << "context_len " << ctx << " < new tokens " << n;
  const int nt = std::min(kQueryTile, n - it.first);
  const int32_t pos0 = ctx - n + it.first;  // position of the tile's first token
  const int32_t npos = pos0 + nt;           // positions [0, npos) are read
  const int rows = nt * group;              // row r = i * group + g
  const int32_t* table = batch.block_tables + int64_t{it.seq} * batch.max_blocks_per_seq;
  STRATA_CHECK_LE((npos + bs - 1) / bs, batch.max_blocks_per_seq);

  sc.qrows.resize(rows);
  for (int r = 0; r < rows; ++r) {
    const int i = r / group, g = r % group;
    sc.qrows[r] = query + (int64_t{q0 + it.first + i} * num_heads + it.kv_head * group + g) * hd;
  }
  const float* const* qrow = sc.qrows.data();
  sc.scores.resize(static_cast<size_t>(rows) * npos);
  sc.acc.assign(static_cast<size_t>(rows) * hd, 0.0f);
  sc.sums.resize(rows);
  sc.row.resize(hd);
  if constexpr (C::kDtype != KvDtype::kFp32 && !C::kHasZero) sc.kblock.resize(static_cast<size_t>(16) * hd);
  if constexpr (C::kHasZero) {
    sc.qsum.resize(rows);
    for (int r = 0; r < rows; ++r) {
      float t = 0.0f;
      for (int e = 0; e < hd; ++e) t += qrow[r][e];
      sc.qsum[r] = t;
    }
  }

  // Pass 1: scores, block by block. Token i sees positions [0, pos0 + i].
  // K runs kPrefetchBlocks blocks ahead; V's blocks are asked for into L2 on
  // the way, for pass 2.
  const int32_t nblocks = (npos + bs - 1) / bs;
  for (int32_t b = 0; b < std::min(nblocks, kPrefetchBlocks); ++b) {
    PrefetchHeadRows(cache, table[b], it.kv_head, false);
    PrefetchHeadRows<2>(cache, table[b], it.kv_head, true);
  }
  for (int32_t b0 = 0; b0 < npos; b0 += bs) {
    const int32_t block = table[b0 / bs];
    STRATA_DCHECK(block >= 0 && block < cache.num_blocks);
    const int32_t end = std::min(npos, b0 + bs);
    if (const int32_t ahead = b0 / bs + kPrefetchBlocks; ahead < nblocks) {
      PrefetchHeadRows(cache, table[ahead], it.kv_head, false);
      PrefetchHeadRows<2>(cache, table[ahead], it.kv_head, true);
    }
    if constexpr (C::kHasZero) {
      // Integer codes: q . ((c - z) s) = s (q . c - z sum(q)), the dot product
      // taken on the codes directly (no decoded row).
#if defined(__AVX512F__)
      if (hd % 16 == 0) {  // 16 positions at a time, as below
        for (int32_t j0 = b0; j0 < end; j0 += 16) {
          const int cnt = std::min(16, end - j0);
          const RowRef r0 = Row(cache, block, j0 - b0, it.kv_head, false);
          float ks[16], kz[16], dots[16];
          for (int t = 0; t < cnt; ++t) {
            RowScale<C>(cache, Row(cache, block, j0 - b0 + t, it.kv_head, false), it.kv_head, false,
                        &ks[t], &kz[t]);
          }
          for (int r = std::max(0, j0 - pos0) * group; r < rows; ++r) {
            StoreFirst(dots, cnt, Dots16(qrow[r], cnt, hd, [&](int t, int i) {
              return Codes16<C>(r0.data + t * l.token_bytes, i);
            }));
            float* out_r = &sc.scores[static_cast<size_t>(r) * npos + j0];
            for (int t = 0; t < cnt; ++t) {
              out_r[t] = (dots[t] - Unfused(kz[t] * sc.qsum[r])) * ks[t] * softmax_scale;
            }
          }
        }
        continue;
      }
#endif
      for (int32_t j = b0; j < end; ++j) {
        const RowRef rr = Row(cache, block, j - b0, it.kv_head, false);
        float ks, kz;
        RowScale<C>(cache, rr, it.kv_head, false, &ks, &kz);
        for (int r = std::max(0, j - pos0) * group; r < rows; ++r) {
          const float dot = DotCodes<C>(qrow[r], rr.data, hd);
          sc.scores[static_cast<size_t>(r) * npos + j] = (dot - Unfused(kz * sc.qsum[r])) * ks * softmax_scale;
        }
      }
      continue;
    }
#if defined(__AVX512F__)
    // 16 positions at a time (every row gets all of them: a score past a
    // row's causal end is written but never read).
    if (hd % 16 == 0) {
      for (int32_t j0 = b0; j0 < end; j0 += 16) {
        const int cnt = std::min(16, end - j0);
        const float* k;
        if constexpr (C::kDtype == KvDtype::kFp32) {
          k = ReadRow<C>(cache, block, j0 - b0, it.kv_head, false, nullptr);  // rows contiguous
        } else {
          for (int t = 0; t < cnt; ++t) {
            ReadRow<C>(cache, block, j0 - b0 + t, it.kv_head, false, &sc.kblock[static_cast<size_t>(t) * hd]);
          }
          k = sc.kblock.data();
        }
        for (int r = std::max(0, j0 - pos0) * group; r < rows; ++r) {
          const __m512 d =
              Dots16(qrow[r], cnt, hd, [&](int t, int i) { return _mm512_loadu_ps(k + t * hd + i); });
          StoreFirst(&sc.scores[static_cast<size_t>(r) * npos + j0], cnt,
                     _mm512_mul_ps(d, _mm512_set1_ps(softmax_scale)));
        }
      }
      continue;
    }
#endif
    for (int32_t j = b0; j < end; ++j) {
      const float* k = ReadRow<C>(cache, block, j - b0, it.kv_head, false, sc.row.data());
      for (int r = std::max(0, j - pos0) * group; r < rows; ++r) {
        sc.scores[static_cast<size_t>(r) * npos + j] = Dot(qrow[r], k, hd) * softmax_scale;
      }
    }
  }
  // Softmax per row (fp32, max-subtracted).
  for (int r = 0; r < rows; ++r) {
    float* s = &sc.scores[static_cast<size_t>(r) * npos];
    const int32_t len = pos0 + r / group + 1;
    float m = s[0];
    for (int32_t j = 1; j < len; ++j) m = std::max(m, s[j]);
    float sum = 0.0f;
    for (int32_t j = 0; j < len; ++j) {
      s[j] = std::exp(s[j] - m);
      sum += s[j];
    }
    sc.sums[r] = sum;
  }
  // Pass 2: weighted sum of V (its blocks were asked for into L2 in pass 1).
  if (npos > 0) PrefetchHeadRows(cache, table[0], it.kv_head, true);
  if constexpr (C::kDtype == KvDtype::kFp32) {
    // Rows of one head are contiguous inside a block, and reading them costs
    // nothing: go row by row, 16 dims at a time, sums in registers.
    if (hd % 16 == 0) {
      for (int r = 0; r < rows; ++r) {
        const float* p = &sc.scores[static_cast<size_t>(r) * npos];
        const int32_t len = pos0 + r / group + 1;
        float* acc = &sc.acc[static_cast<size_t>(r) * hd];
        for (int32_t b0 = 0; b0 < len; b0 += bs) {
          const float* v = ReadRow<C>(cache, table[b0 / bs], 0, it.kv_head, true, nullptr);
          const int32_t cnt = std::min(len, b0 + bs) - b0;
          if (b0 + bs < len) PrefetchHeadRows(cache, table[(b0 + bs) / bs], it.kv_head, true);
          WeightedRows(p + b0, v, hd, cnt, hd, acc);
        }
      }
      WriteRows(sc, rows, group, q0 + it.first, num_heads, it.kv_head, hd, out);
      return;
    }
  }
  if (C::kDtype != KvDtype::kFp32 && hd % 16 == 0) {
    // Other formats: decode a block's rows once into scratch, then the same
    // register-blocked sums for every query row.
    sc.vblock.resize(static_cast<size_t>(bs) * hd);
    for (int32_t b0 = 0; b0 < npos; b0 += bs) {
      const int32_t block = table[b0 / bs];
      const int32_t end = std::min(npos, b0 + bs);
      if (end < npos) PrefetchHeadRows(cache, table[end / bs], it.kv_head, true);
      for (int32_t j = b0; j < end; ++j) {  // a non-fp32 row is decoded into the buffer given
        ReadRow<C>(cache, block, j - b0, it.kv_head, true, &sc.vblock[static_cast<size_t>(j - b0) * hd]);
      }
      for (int r = 0; r < rows; ++r) {
        const int32_t cnt = std::min(pos0 + r / group + 1, end) - b0;  // causal: positions < len
        if (cnt <= 0) continue;
        const float* p = &sc.scores[static_cast<size_t>(r) * npos + b0];
        float* acc = &sc.acc[static_cast<size_t>(r) * hd];
        WeightedRows(p, sc.vblock.data(), hd, cnt, hd, acc);
      }
    }
    WriteRows(sc, rows, group, q0 + it.first, num_heads, it.kv_head, hd, out);
    return;
  }
  for (int32_t b0 = 0; b0 < npos; b0 += bs) {
    const int32_t block = table[b0 / bs];
    const int32_t end = std::min(npos, b0 + bs);
    for (int32_t j = b0; j < end; ++j) {
      const float* v = ReadRow<C>(cache, block, j - b0, it.kv_head, true, sc.row.data());
      for (int r = std::max(0, j - pos0) * group; r < rows; ++r) {
        Axpy(sc.scores[static_cast<size_t>(r) * npos + j], v, &sc.acc[static_cast<size_t>(r) * hd], hd);
      }
    }
  }
  WriteRows(sc, rows, group, q0 + it.first, num_heads, it.kv_head, hd, out);
}

}  // namespace

void WriteKvCache(const KvCacheView& cache, const float* key, const float* value,
                  const int64_t* slot_mapping, int32_t num_tokens) {
  const KvBlockLayout& l = cache.layout;
  const int64_t num_slots = int64_t{cache.num_blocks} * l.block_size;
  const int64_t row_stride = int64_t{l.num_kv_heads} * l.head_dim;
  VisitFormat(l.format, [&](auto codec) {
    using C = decltype(codec);
    // A decode step's few rows are not worth waking the thread team.
#pragma omp parallel for schedule(static) if (int64_t{num_tokens} * row_stride >= 16384)
    for (int32_t t = 0; t < num_tokens; ++t) {
      const int64_t slot = slot_mapping[t];
      if (slot < 0) continue;  // padding
      STRATA_CHECK_LT(slot, num_slots);
      const int64_t block = slot / l.block_size;
      const int off = static_cast<int>(slot % l.block_size);
      for (int h = 0; h < l.num_kv_heads; ++h) {
        QuantizeRow<C>(cache, block, off, h, false, key + t * row_stride + int64_t{h} * l.head_dim);
        QuantizeRow<C>(cache, block, off, h, true, value + t * row_stride + int64_t{h} * l.head_dim);
      }
    }
  });
}

void PagedAttention(const KvCacheView& cache, const PagedBatchView& batch, const float* query,
                    int32_t num_heads, float softmax_scale, float* out) {
  const KvBlockLayout& l = cache.layout;
  STRATA_CHECK(num_heads > 0 && num_heads % l.num_kv_heads == 0)
      << "num_heads " << num_heads << " vs num_kv_heads " << l.num_kv_heads;
  const int group = num_heads / l.num_kv_heads;
  const int64_t token_stride = int64_t{num_heads} * l.head_dim;

  std::vector<WorkItem> items;
  for (int32_t s = 0; s < batch.num_seqs; ++s) {
    const int32_t n = batch.query_start[s + 1] - batch.query_start[s];
    for (int32_t first = 0; first < n; first += kQueryTile) {
      for (int32_t h = 0; h < l.num_kv_heads; ++h) items.push_back({s, first, h});
    }
  }
  // Padding tokens after the last sequence get zeros.
  const int32_t used = batch.num_seqs > 0 ? batch.query_start[batch.num_seqs] : 0;
  STRATA_CHECK_LE(used, batch.num_tokens);
  std::fill(out + used * token_stride, out + batch.num_tokens * token_stride, 0.0f);

  VisitFormat(l.format, [&](auto codec) {
    using C = decltype(codec);
    const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel
    {
      Scratch scratch;
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < num_items; ++i) {
        AttendTile<C>(cache, batch, items[i], query, num_heads, group, softmax_scale, out, scratch);
      }
    }
  });
}

void CopyBlocks(const KvCacheView& cache, const int32_t* src, const int32_t* dst, int32_t n) {
  const size_t bytes = cache.layout.block_bytes;
#pragma omp parallel for schedule(static)
  for (int32_t i = 0; i < n; ++i) {
    STRATA_CHECK(src[i] >= 0 && src[i] < cache.num_blocks && dst[i] >= 0 &&
                 dst[i] < cache.num_blocks)
        << "block copy " << src[i] << " -> " << dst[i] << " out of range";
    if (src[i] != dst[i]) std::memcpy(cache.block(dst[i]), cache.block(src[i]), bytes);
  }
}

void ReadKvToken(const KvCacheView& cache, int64_t slot, float* k_out, float* v_out) {
  const KvBlockLayout& l = cache.layout;
  STRATA_CHECK(slot >= 0 && slot < int64_t{cache.num_blocks} * l.block_size) << "slot " << slot;
  const int64_t block = slot / l.block_size;
  const int off = static_cast<int>(slot % l.block_size);
  VisitFormat(l.format, [&](auto codec) {
    using C = decltype(codec);
    for (int h = 0; h < l.num_kv_heads; ++h) {
      float* k = k_out + int64_t{h} * l.head_dim;
      float* v = v_out + int64_t{h} * l.head_dim;
      const float* kr = ReadRow<C>(cache, block, off, h, false, k);
      if (kr != k) std::memcpy(k, kr, sizeof(float) * l.head_dim);
      const float* vr = ReadRow<C>(cache, block, off, h, true, v);
      if (vr != v) std::memcpy(v, vr, sizeof(float) * l.head_dim);
    }
  });
}

}  // namespace strata::cpu
