// The Mamba-2 scan of a bfloat16 prompt on AMX tiles: the chunked form of SSD (Dao and Gu,
// "Transformers are SSMs", arXiv 2405.21060).
//
// ssd_scan.cpp updates every state entry token by token on the vector units, 2 p n
// multiply-adds per head and token, and is bound by their rate. Cut into chunks of kChunk
// tokens, the same scan is a few small matrix products per head and chunk, which the tiles run
// many times faster. With a_t = dt_t A, cum_t = a_0 + ... + a_t within the chunk, h_in the
// state entering it (kept transposed, (n, p)) and X the chunk's inputs (q, p):
//
//   G       = C B^T                                      (q, q)  per group, shared by its heads
//   M[t, s] = G[t, s] exp(cum_t - cum_s) dt_s            (q, q)  s <= t, else 0
//   y       = M X + exp(cum_t) (C h_in)_t  (+ D x_t, times SiLU(z_t))                (q, p)
//   h_out   = exp(cum_{q-1}) h_in + B^T U,  U[s] = exp(cum_{q-1} - cum_s) dt_s X[s]   (n, p)
//
// Operands that are bfloat16 already (x, B and C of a bfloat16 model) go to the tiles as they
// lie; those computed in float32 (M, U and the state) as the sum of two bfloat16 (bf16_pair: 16
// significant bits), multiplied one after the other into float32 sums. The state stays float32
// between chunks, and the prefix sums cum are taken in double, so a difference of two of them
// loses nothing to cancellation. A window of chunks at a time (up to 16 of each sequence, and
// 64 of all the sequences' groups together): first the group operands (C, B in the two
// layouts the products take, G) of every chunk of the window, then each head walks its chunks,
// so the buffers grow neither with the prompt nor with the batch.
#include "amx_matmul.h"

#if defined(MAMBASTEP_AMX_SCAN)
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace mambastep::amx {
namespace {

constexpr int64_t kChunk = kScanChunk;  // tokens per chunk
constexpr int64_t kWindowChunks = 16;  // chunks of a sequence in a window
constexpr int64_t kWindowGroups = 64;  // chunks of all the sequences' groups in a window (~4 MiB at 128 states)
constexpr int64_t kTile = 16;         // rows of a tile, and float32 columns of a result tile
constexpr int64_t kDepth = 32;        // bfloat16 of a row of an operand tile: the products' k step

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Every tile 16 rows x 64 bytes: tiles 0 to 3 gather a 2 x 2 block of results (four independent
// chains of products, so one's latency hides behind the others), 4 and 5 take two row blocks of
// the left operand, 6 and 7 two column blocks of the right.
constexpr TileShape kShape{kTile, 64};

// One term of a product: left (m, k) bfloat16 rows `left_stride` apart; right (k, n) as the
// tiles take it, pairs along k: (k / 2, n, 2), rows of pairs `right_stride` bfloat16 apart.
struct Term {
  const uint16_t* left;
  int64_t left_stride;
  const uint16_t* right;
  int64_t right_stride;
};

// out (m, n) float32, rows out_stride apart, = the sum of the terms' products; m, n and k
// multiples of 32.
template <int kTerms>
void products(const Term (&terms)[kTerms], float* out, int64_t out_stride, int64_t m, int64_t n, int64_t k) {
  memory_barrier();  // the tiles read the operands just written
  for (int64_t i = 0; i < m; i += 2 * kTile)
    for (int64_t j = 0; j < n; j += 2 * kTile) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (const Term& term : terms)
        for (int64_t d = 0; d < k; d += kDepth) {
          const uint16_t* left = term.left + i * term.left_stride + d;
          const uint16_t* right = term.right + (d / 2) * term.right_stride + 2 * j;
          _tile_loadd(4, left, 2 * term.left_stride);
          _tile_loadd(5, left + kTile * term.left_stride, 2 * term.left_stride);
          _tile_loadd(6, right, 2 * term.right_stride);
          _tile_loadd(7, right + 2 * kTile, 2 * term.right_stride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      float* block = out + i * out_stride + j;
      _tile_stored(0, block, 4 * out_stride);
      _tile_stored(1, block + kTile, 4 * out_stride);
      _tile_stored(2, block + kTile * out_stride, 4 * out_stride);
      _tile_stored(3, block + kTile * out_stride + kTile, 4 * out_stride);
    }
  memory_barrier();  // the results are read next
}

// The group operands of one chunk: C (kChunk, np); B^T as right operand, pairs along the state
// (np / 2, kChunk, 2); B^T as left operand (np, kChunk); G = C B^T (kChunk, kChunk). Rows past
// the chunk's tokens and states past n are zeros.
struct GroupChunk {
  explicit GroupChunk(int64_t np) : c(kChunk * np), b_pairs(np * kChunk), b_t(np * kChunk), scores(kChunk * kChunk) {}
  LineVector<uint16_t> c, b_pairs, b_t;
  LineVector<float> scores;
};

// A head's buffers for one chunk: M (kChunk, kChunk) in two parts; X as rows (kChunk, pp) and as
// a right operand (kChunk / 2, pp, 2); U in two parts, the same layout; the state entering in
// two parts, as right operands (np / 2, pp, 2); the head's state (np, pp), float32; y's two
// parts (kChunk, pp); B^T U (np, pp); two rows of float32 values being split.
struct HeadChunk {
  HeadChunk(int64_t pp, int64_t np)
      : m_hi(kChunk * kChunk), m_lo(kChunk * kChunk), x_rows(kChunk * pp), x_pairs(kChunk * pp),
        u_hi(kChunk * pp), u_lo(kChunk * pp), h_hi(np * pp), h_lo(np * pp), state(np * pp, 0.f),
        y_own(kChunk * pp), y_in(kChunk * pp), h_own(np * pp), row(2 * std::max(kChunk, pp)) {}
  LineVector<uint16_t> m_hi, m_lo, x_rows, x_pairs, u_hi, u_lo, h_hi, h_lo;
  LineVector<float> state, y_own, y_in, h_own, row;
  double cum[kChunk];
  float dt[kChunk], decay_in[kChunk], decay_out[kChunk];
};

uint16_t bits(c10::BFloat16 v) { return v.x; }

// The group operands of the chunk of q tokens from C's and B's rows at c and b.
void prepare_group(const c10::BFloat16* c, int64_t c_stride, const c10::BFloat16* b, int64_t b_stride, int64_t q,
                   int64_t n, int64_t np, GroupChunk& out) {
  std::fill(out.c.begin(), out.c.end(), 0);
  std::fill(out.b_pairs.begin(), out.b_pairs.end(), 0);
  std::fill(out.b_t.begin(), out.b_t.end(), 0);
  for (int64_t t = 0; t < q; ++t)
    for (int64_t j = 0; j < n; ++j) {
      out.c[t * np + j] = bits(c[t * c_stride + j]);
      const uint16_t v = bits(b[t * b_stride + j]);
      out.b_pairs[(j / 2) * 2 * kChunk + 2 * t + j % 2] = v;
      out.b_t[j * kChunk + t] = v;
    }
  products<1>({{out.c.data(), np, out.b_pairs.data(), 2 * kChunk}}, out.scores.data(), kChunk, kChunk, kChunk, np);
}

// Two rows of 16-bit values (r0 and r1, `width` of them) as the tiles take a right operand:
// pairs along k, r0's value in the low half of each 4-byte word.
inline void interleave(const uint16_t* r0, const uint16_t* r1, int64_t width, uint16_t* out) {
  uint32_t* words = reinterpret_cast<uint32_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) words[i] = uint32_t{r0[i]} | uint32_t{r1[i]} << 16;
}

// bf16_pair of 16 values at once, each rounding one instruction (which takes a denormal for
// zero, as the tiles take a denormal operand anyway).
struct Parts16 {
  __m256i high, low;
};
inline Parts16 parts16(__m512 f) {
  const __m512i bits = _mm512_castps_si512(f), exponent = _mm512_set1_epi32(0x7f800000);
  const __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exponent), exponent);
  __m256i high = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(f));
  const __m256i top = _mm256_set1_epi16(0x7f80);
  const __mmask16 overflows = _mm256_cmpeq_epi16_mask(_mm256_and_si256(high, top), top) & ~special;
  high = _mm256_mask_mov_epi16(high, overflows, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
  const __m512 high_value = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(high), 16));
  const __m256i low = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(f, high_value)));
  return {high, _mm256_maskz_mov_epi16(~special, low)};
}

// `width` float32 values (a multiple of 16) as two bfloat16 parts (bf16_pair).
inline void split(const float* v, int64_t width, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < width; i += 16) {
    const Parts16 parts = parts16(_mm512_loadu_ps(v + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + i), parts.high);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + i), parts.low);
  }
}

// Two rows of float32 values (r0 and r1, `width` of them, a multiple of 16) as two bfloat16
// parts each, pairs along k as the tiles take a right operand (interleave's layout).
inline void split_pairs(const float* r0, const float* r1, int64_t width, uint16_t* hi, uint16_t* lo) {
  // 16 values of r0 then 16 of r1, as pairs (r0[i], r1[i])
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const auto pairs = [&](__m256i a, __m256i b) {
    return _mm512_permutexvar_epi16(order, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
  };
  for (int64_t i = 0; i < width; i += 16) {
    const Parts16 a = parts16(_mm512_loadu_ps(r0 + i)), b = parts16(_mm512_loadu_ps(r1 + i));
    _mm512_storeu_si512(hi + 2 * i, pairs(a.high, b.high));
    _mm512_storeu_si512(lo + 2 * i, pairs(a.low, b.low));
  }
}

// One head's scan over the chunk of q tokens from t0, the group's operands in g.
void head_chunk(const SsdBf16& s, int64_t bi, int64_t hd, int64_t t0, int64_t q, const GroupChunk& g,
                HeadChunk& w, int64_t pp, int64_t np) {
  const int64_t p = s.p, n = s.n, h = s.h;
  const float A = s.A[hd];
  const auto* x = s.x + bi * s.x_batch_stride + t0 * s.x_stride + hd * p;
  const float* dt = s.dt + (bi * s.l + t0) * h + hd;
  double total = 0;
  for (int64_t t = 0; t < kChunk; ++t) {
    w.dt[t] = t < q ? dt[t * h] : 0.f;
    total += t < q ? static_cast<double>(w.dt[t] * A) : 0.0;
    w.cum[t] = total;
  }
  for (int64_t t = 0; t < kChunk; ++t) {
    w.decay_in[t] = exp_inline(static_cast<float>(w.cum[t]));
    w.decay_out[t] = t < q ? exp_inline(static_cast<float>(total - w.cum[t])) * w.dt[t] : 0.f;
  }
  // M, lower-triangular, in two parts.
  float* row = w.row.data();
  for (int64_t t = 0; t < kChunk; ++t) {
    const float* scores = g.scores.data() + t * kChunk;
    const double cum_t = w.cum[t];
#pragma omp simd
    for (int64_t u = 0; u < kChunk; ++u) {
      const float decay = exp_inline(static_cast<float>(cum_t - w.cum[u]));
      row[u] = u <= t && t < q ? scores[u] * decay * w.dt[u] : 0.f;
    }
    split(row, kChunk, w.m_hi.data() + t * kChunk, w.m_lo.data() + t * kChunk);
  }
  // X (as stored, zero past q and p) by rows of tokens, and pairs of them; U = X decayed to the
  // chunk's end in two parts, pairs of rows.
  uint16_t* x_rows = w.x_rows.data();
  for (int64_t t = 0; t < kChunk; ++t) {
    uint16_t* x_t = x_rows + t * pp;
    std::fill(x_t, x_t + pp, 0);
    if (t < q) std::memcpy(x_t, x + t * s.x_stride, p * sizeof(uint16_t));
  }
  float *u0 = w.row.data(), *u1 = u0 + pp;
  for (int64_t t = 0; t < kChunk; t += 2) {
    interleave(x_rows + t * pp, x_rows + (t + 1) * pp, pp, w.x_pairs.data() + t * pp);
#pragma omp simd
    for (int64_t i = 0; i < pp; ++i) {
      u0[i] = w.decay_out[t] * bf16_value(x_rows[t * pp + i]);
      u1[i] = w.decay_out[t + 1] * bf16_value(x_rows[(t + 1) * pp + i]);
    }
    split_pairs(u0, u1, pp, w.u_hi.data() + t * pp, w.u_lo.data() + t * pp);
  }
  // The state entering, in two parts, pairs of rows (along the states).
  for (int64_t j = 0; j < np; j += 2)
    split_pairs(w.state.data() + j * pp, w.state.data() + (j + 1) * pp, pp, w.h_hi.data() + j * pp,
                w.h_lo.data() + j * pp);
  products<2>({{w.m_hi.data(), kChunk, w.x_pairs.data(), 2 * pp}, {w.m_lo.data(), kChunk, w.x_pairs.data(), 2 * pp}},
              w.y_own.data(), pp, kChunk, pp, kChunk);
  products<2>({{g.c.data(), np, w.h_hi.data(), 2 * pp}, {g.c.data(), np, w.h_lo.data(), 2 * pp}}, w.y_in.data(), pp,
              kChunk, pp, np);
  products<2>({{g.b_t.data(), kChunk, w.u_hi.data(), 2 * pp}, {g.b_t.data(), kChunk, w.u_lo.data(), 2 * pp}},
              w.h_own.data(), pp, np, pp, kChunk);
  // y, and the state leaving.
  const float* D = s.D ? s.D + hd * p : nullptr;
  const auto* z = s.z ? s.z + bi * s.z_batch_stride + t0 * s.z_stride + hd * p : nullptr;
  float* y = s.y + (bi * s.l + t0) * h * p + hd * p;
  for (int64_t t = 0; t < q; ++t) {
    const float *own = w.y_own.data() + t * pp, *in = w.y_in.data() + t * pp;
    const uint16_t* x_t = x_rows + t * pp;
    const float decay = w.decay_in[t];
    float* y_t = y + t * h * p;
#pragma omp simd
    for (int64_t i = 0; i < p; ++i) y_t[i] = own[i] + decay * in[i];
    if (D) {
#pragma omp simd
      for (int64_t i = 0; i < p; ++i) y_t[i] += D[i] * bf16_value(x_t[i]);
    }
    if (z) {
      const uint16_t* z_t = reinterpret_cast<const uint16_t*>(z + t * s.z_stride);
#pragma omp simd
      for (int64_t i = 0; i < p; ++i) y_t[i] *= silu_inline(bf16_value(z_t[i]));
    }
  }
  const float decay = w.decay_in[q - 1];
  float* __restrict state = w.state.data();
  const float* __restrict own = w.h_own.data();
#pragma omp simd
  for (int64_t e = 0; e < n * pp; ++e) state[e] = decay * state[e] + own[e];
}

}  // namespace

void ssd_scan_bf16(const SsdBf16& s, float* state) {
  const int64_t pp = round_up(s.p, kDepth), np = round_up(s.n, kDepth), heads_per_group = s.h / s.g;
  const int64_t chunks = (s.l + kChunk - 1) / kChunk;
  const int64_t per_window = std::clamp<int64_t>(kWindowGroups / (s.b * s.g), 1, kWindowChunks);
  std::vector<GroupChunk> groups(s.b * s.g * per_window, GroupChunk(np));
  for (int64_t first = 0; first < chunks; first += per_window) {
    const int64_t window = std::min(per_window, chunks - first);
    at::parallel_for(0, s.b * s.g * window, 1, [&](int64_t begin, int64_t end) {
      const Tiles tiles{kShape, kShape, kShape, kShape, kShape, kShape, kShape, kShape};
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / (s.g * window), gi = (item / window) % s.g, k = item % window;
        const int64_t t0 = (first + k) * kChunk, q = std::min(kChunk, s.l - t0);
        prepare_group(s.C + bi * s.C_batch_stride + t0 * s.C_stride + gi * s.n, s.C_stride,
                      s.B + bi * s.B_batch_stride + t0 * s.B_stride + gi * s.n, s.B_stride, q, s.n, np,
                      groups[(bi * s.g + gi) * per_window + k]);
      }
    });
    at::parallel_for(0, s.b * s.h, 1, [&](int64_t begin, int64_t end) {
      const Tiles tiles{kShape, kShape, kShape, kShape, kShape, kShape, kShape, kShape};
      HeadChunk w(pp, np);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / s.h, hd = item % s.h, gi = hd / heads_per_group;
        float* head_state = state + item * s.p * s.n;  // (p, n), kept as (n, pp) meanwhile
        std::fill(w.state.begin(), w.state.end(), 0.f);
        for (int64_t i = 0; i < s.p; ++i)
          for (int64_t j = 0; j < s.n; ++j) w.state[j * pp + i] = head_state[i * s.n + j];
        for (int64_t k = 0; k < window; ++k) {
          const int64_t t0 = (first + k) * kChunk;
          head_chunk(s, bi, hd, t0, std::min(kChunk, s.l - t0), groups[(bi * s.g + gi) * per_window + k], w, pp,
                     np);
        }
        for (int64_t i = 0; i < s.p; ++i)
          for (int64_t j = 0; j < s.n; ++j) head_state[i * s.n + j] = w.state[j * pp + i];
      }
    });
  }
}

}  // namespace mambastep::amx
#endif
