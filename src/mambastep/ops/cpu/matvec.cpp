// Matrix-vector products for decoding on the CPU: y = x W^T (* scale) + bias for a few rows x.
//
// A decode step multiplies one activation row per sequence by every weight matrix once, so
// its speed is the speed at which the weights stream from memory. This kernel reads each
// weight element once per call, whatever its storage (float32, bfloat16, or int8 with a
// float32 scale per output row), converts it to float32 in registers and multiplies it into
// up to kGroup activation rows at a time, accumulating in float32. A weight row is re-read
// from L1 for each further group of kGroup activation rows. Threads split the output rows.
//
// What the weights multiply, in every path: float32 weights the activations as they are;
// bfloat16 weights the activations as the sum of two bfloat16 (16 significant bits; a
// bfloat16 model's activations as they are); int8 weights the activations rounded per row to
// integers of about 15 bits times a scale. These forms let CPUs with AMX multiply in tiles
// (amx_matmul.cpp), where a batch of sequences costs the weights' reading alone; elsewhere the
// same values go through the float32 kernels, so that every path computes the same products.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "amx_matmul.h"
#include "vector_math.h"

namespace {

using mambastep::kActivationMax;

constexpr int kGroup = 8;  // activation rows multiplied per pass over a weight row
// From this many activation rows (a batch of sequences) the products go by blocks of activation
// rows x weight rows (where the build has vector instructions; SimdF32::BlockShape).
constexpr int64_t kBlockedFrom = 16;

inline float to_float(float w) { return w; }
inline float to_float(int8_t w) { return static_cast<float>(w); }
inline float to_float(uint16_t w) { return mambastep::bf16_value(w); }  // bfloat16 bits

// The vector instructions a build has: SimdF32 holds kLanes floats and loads kLanes weights
// of any storage as floats. AVX-512 and AVX2 (with FMA) builds get one; others the portable loop.
#if defined(__AVX512F__)
#define MAMBASTEP_SIMD 1
struct SimdF32 {
  static constexpr int kLanes = 16;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const uint16_t* p) {  // bfloat16 -> the high halves of float32 lanes
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static V load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
  // How far ahead of its reads a thread asks for weights of type W, multiplied into M
  // activation rows at a time (0: it does not). Rows are contiguous, so running past a row's
  // end fetches the next one. On an Intel AVX-512 CPU the hardware prefetcher alone kept too
  // few lines in flight to stream bfloat16 and int8 weights (more weights per byte) at full
  // speed; 4 KiB ahead streamed them faster (BENCHMARKS.md).
  template <typename W, int M>
  static constexpr int64_t prefetch_bytes() { return 4096; }
  // The same into L2 only, further ahead (0: none). int8 weights into fewer than 4 rows, 8 KiB
  // ahead as on AVX2: a batch-1 int8 decode step ran 13% faster with it on an Intel AVX-512 CPU
  // (interleaved runs, BENCHMARKS.md); the others were not measured with it.
  template <typename W, int M>
  static constexpr int64_t prefetch_l2_bytes() { return sizeof(W) == 1 && M < 4 ? 8192 : 0; }
  // Whether the blocked product asks for the next block's weights of type W into L2 (see the
  // AVX2 version; not measured here).
  template <typename W>
  static constexpr bool prefetch_next_block() { return false; }
  // The blocked product's activation rows x weight rows for weights of type W (see the AVX2
  // version; not measured here).
  template <typename W>
  struct BlockShape {
    static constexpr int kRows = 4, kCols = 3;
  };
};
#elif defined(__AVX2__) && defined(__FMA__)
#define MAMBASTEP_SIMD 1
struct SimdF32 {
  static constexpr int kLanes = 8;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static V load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V a) { return mambastep::sum_lanes(a); }
  // As for AVX-512, chosen on an AVX2 CPU (BENCHMARKS.md, prefetch distances): 4 KiB ahead
  // streamed slower than these distances; float32 streams fastest on the hardware prefetcher
  // alone, bfloat16 and int8 a little ahead of it. Multiplied into 4 or more rows, float32
  // weights stream faster 2 KiB ahead: with the FMAs of several rows between its reads, the
  // hardware prefetcher alone let the memory stream pause.
  template <typename W, int M>
  static constexpr int64_t prefetch_bytes() {
    return sizeof(W) == 4 ? (M >= 4 ? 2048 : 0) : sizeof(W) == 2 ? 1024 : 2048;
  }
  // int8 weights (a quarter of float32's bytes per FMA) also streamed faster with lines asked
  // into L2 8 KiB ahead, the more so while the machine had bandwidth to spare; bfloat16 slower,
  // so only int8, and only into fewer than 4 rows: into 4 and 8 rows int8 streamed faster
  // without it.
  template <typename W, int M>
  static constexpr int64_t prefetch_l2_bytes() { return sizeof(W) == 1 && M < 4 ? 8192 : 0; }
  // Whether the blocked product (16 rows and more) asks for the next block's weights of type W
  // into L2 as it starts a block: int8 and bfloat16 decode steps at 16-32 sequences ran
  // faster with it, float32 products slower.
  template <typename W>
  static constexpr bool prefetch_next_block() { return sizeof(W) < 4; }
  // The blocked product's activation rows x weight rows for weights of type W. float32 weights
  // go 2 x 6: each activation vector serves six weight rows, so fewer of them come from L2
  // (decode steps of 16-64 sequences ran faster than with 4 x 3). bfloat16 and int8 weights
  // take two more instructions to load, so 4 x 3, which loads a weight vector per four FMAs,
  // was faster for them (BENCHMARKS.md, float32 blocks of 2 x 6).
  template <typename W>
  struct BlockShape {
    static constexpr int kRows = sizeof(W) == 4 ? 2 : 4, kCols = sizeof(W) == 4 ? 6 : 3;
  };
};
#endif

// x . w over [from, k): the end of a dot product past its last full vector.
template <typename W>
float dot_tail(const float* x, const W* w, int64_t from, int64_t k) {
  float sum = 0.f;
  for (int64_t j = from; j < k; ++j) sum += x[j] * to_float(w[j]);
  return sum;
}

#if defined(MAMBASTEP_SIMD)
// Asks for the cache lines `distance` bytes past the `count` weights at w, into the cache level
// `hint` names; nothing where the distance is 0.
template <int64_t distance, int hint, typename W>
inline void prefetch(const W* w, int64_t count) {
  if constexpr (distance > 0) {
    const char* ahead = reinterpret_cast<const char*>(w) + distance;
    for (int64_t line = 0; line < static_cast<int64_t>(sizeof(W)) * count; line += 64)
      _mm_prefetch(ahead + line, static_cast<decltype(_MM_HINT_T0)>(hint));
  }
}

// out[r] = x[r] . row for the M rows of x (each of length k, stride k). U vectors of the row
// per iteration give M * U independent accumulators, enough to hide the latency of the FMAs;
// the last k % kLanes weights are added one by one.
template <typename W, int M, int U>
void dot_rows(const float* x, const W* row, int64_t k, float* out) {
  using S = SimdF32;
  constexpr int L = S::kLanes;
  typename S::V acc[M][U];
  for (int r = 0; r < M; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = S::zero();
  int64_t i = 0;
  for (; i + L * U <= k; i += L * U) {
    prefetch<S::template prefetch_bytes<W, M>(), _MM_HINT_T0>(row + i, L * U);
    prefetch<S::template prefetch_l2_bytes<W, M>(), _MM_HINT_T1>(row + i, L * U);
    for (int u = 0; u < U; ++u) {
      const auto w = S::load(row + i + L * u);
      for (int r = 0; r < M; ++r) acc[r][u] = S::fma(S::load(x + r * k + i + L * u), w, acc[r][u]);
    }
  }
  for (; i + L <= k; i += L) {
    const auto w = S::load(row + i);
    for (int r = 0; r < M; ++r) acc[r][0] = S::fma(S::load(x + r * k + i), w, acc[r][0]);
  }
  for (int r = 0; r < M; ++r) {
    for (int u = 1; u < U; ++u) acc[r][0] = S::add(acc[r][0], acc[r][u]);
    out[r] = S::sum(acc[r][0]) + dot_tail(x + r * k, row, i, k);
  }
}

// out[r][c] = x[r] . w[c] for R rows of x and C rows of W (each of length k, stride k), into
// an array of BR x BC. Each weight vector loaded is multiplied into R activation rows and each
// activation vector into C weight rows: R * C accumulators in registers, and fewer loads per
// FMA than dot_rows, so a batch is bound by the FMAs.
template <typename W, int R, int C, int BR, int BC>
void dot_block(const float* x, const W* w, int64_t k, float (&out)[BR][BC]) {
  using S = SimdF32;
  constexpr int L = S::kLanes;
  typename S::V acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = S::zero();
  int64_t i = 0;
  for (; i + L <= k; i += L) {
    typename S::V wv[C];
    for (int c = 0; c < C; ++c) wv[c] = S::load(w + c * k + i);
    for (int r = 0; r < R; ++r) {
      const auto xv = S::load(x + r * k + i);
      for (int c = 0; c < C; ++c) acc[r][c] = S::fma(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r][c] = S::sum(acc[r][c]) + dot_tail(x + r * k, w + c * k, i, k);
}

// dot_block for `rows` <= BR activation rows and C weight rows.
template <typename W, int BR, int BC, int C, int R = BR>
void dot_block_rows(const float* x, const W* w, int64_t k, int rows, float (&out)[BR][BC]) {
  if constexpr (R > 1)
    if (rows < R) return dot_block_rows<W, BR, BC, C, R - 1>(x, w, k, rows, out);
  dot_block<W, R, C, BR, BC>(x, w, k, out);
}

// dot_block for `rows` <= BR activation rows and `cols` <= BC weight rows.
template <typename W, int BR, int BC, int C = BC>
void dot_block_any(const float* x, const W* w, int64_t k, int rows, int cols, float (&out)[BR][BC]) {
  if constexpr (C > 1)
    if (cols < C) return dot_block_any<W, BR, BC, C - 1>(x, w, k, rows, cols, out);
  dot_block_rows<W, BR, BC, C>(x, w, k, rows, out);
}

// y (m, n) = x (m, k) W^T * scale + bias by blocks (see dot_block); threads split the weight rows.
template <typename W>
void matmul_blocked(const float* x, const W* w, const float* scale, const float* bias, float* y,
                    int64_t m, int64_t k, int64_t n) {
  constexpr int kRows = SimdF32::BlockShape<W>::kRows, kCols = SimdF32::BlockShape<W>::kCols;
  const int64_t blocks = (n + kCols - 1) / kCols;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    float out[kRows][kCols];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o = block * kCols;
      const int cols = static_cast<int>(std::min<int64_t>(kCols, n - o));
      if (SimdF32::prefetch_next_block<W>() && block + 1 < end) {  // the next block's rows, contiguous
        const char* next = reinterpret_cast<const char*>(w + (o + kCols) * k);
        const int64_t bytes = static_cast<int64_t>(sizeof(W)) * std::min<int64_t>(kCols, n - o - kCols) * k;
        for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(next + line, _MM_HINT_T1);
      }
      for (int64_t r0 = 0; r0 < m; r0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, m - r0));
        dot_block_any(x + r0 * k, w + o * k, k, rows, cols, out);
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < cols; ++c)
            y[(r0 + r) * n + o + c] = out[r][c] * (scale ? scale[o + c] : 1.f) + (bias ? bias[o + c] : 0.f);
      }
    }
  });
}
#else
// Portable version: out[r] = x[r] . row, left to the compiler to vectorise.
template <typename W, int M, int U>
void dot_rows(const float* x, const W* row, int64_t k, float* out) {
  for (int r = 0; r < M; ++r) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < k; ++i) sum += x[r * k + i] * to_float(row[i]);
    out[r] = sum;
  }
}
#endif

template <typename W>
void dot_group(const float* x, const W* row, int64_t k, int rows, float* out) {
  switch (rows) {
    case 1: return dot_rows<W, 1, 4>(x, row, k, out);
    case 2: return dot_rows<W, 2, 2>(x, row, k, out);
    case 3: return dot_rows<W, 3, 2>(x, row, k, out);
    case 4: return dot_rows<W, 4, 1>(x, row, k, out);
    case 5: return dot_rows<W, 5, 1>(x, row, k, out);
    case 6: return dot_rows<W, 6, 1>(x, row, k, out);
    case 7: return dot_rows<W, 7, 1>(x, row, k, out);
    default: return dot_rows<W, kGroup, 1>(x, row, k, out);
  }
}

// y (m, n) = x (m, k) W^T for W (n, k), then * scale (n,) and + bias (n,) where given.
template <typename W>
void matvec_impl(const float* x, const W* w, const float* scale, const float* bias, float* y,
                 int64_t m, int64_t k, int64_t n) {
#if defined(MAMBASTEP_SIMD)
  if (m >= kBlockedFrom) return matmul_blocked(x, w, scale, bias, y, m, k, n);
#endif
  // Enough rows per task that a thread's share is worth waking it for (~16k weights).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    float out[kGroup];
    for (int64_t o = begin; o < end; ++o) {
      const W* row = w + o * k;
      const float s = scale ? scale[o] : 1.f, b = bias ? bias[o] : 0.f;
      for (int64_t r0 = 0; r0 < m; r0 += kGroup) {
        const int rows = static_cast<int>(std::min<int64_t>(kGroup, m - r0));
        dot_group(x + r0 * k, row, k, rows, out);
        for (int r = 0; r < rows; ++r) y[(r0 + r) * n + o] = out[r] * s + b;
      }
    }
  });
}

// x as the sum of two bfloat16 (bf16_pair), as float32 (exact): what bfloat16 weights multiply.
std::vector<float> as_bf16_pairs(const float* x, int64_t count) {
  std::vector<float> out(count);
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const auto pair = mambastep::bf16_pair(x[i]);
    out[i] = mambastep::bf16_value(pair.high) + mambastep::bf16_value(pair.low);
  }
  return out;
}

// x (m, k) as integers q of at most kActivationMax times a scale per row: what int8 weights
// multiply. A row holding a NaN or an infinity gets a NaN scale, so its products are NaN.
struct QuantizedRows {
  std::vector<int16_t> q;     // (m, k)
  std::vector<float> scale;   // (m,)
};

QuantizedRows quantize_rows(const float* x, int64_t m, int64_t k) {
  QuantizedRows out{std::vector<int16_t>(m * k), std::vector<float>(m)};
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    float largest = 0.f;
    uint32_t special = 0;  // an infinity or a NaN in the row (bit tests: -ffast-math assumes none)
#pragma omp simd reduction(max : largest) reduction(| : special)
    for (int64_t i = 0; i < k; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &row[i], sizeof bits);
      special |= (bits & 0x7f800000u) == 0x7f800000u;
      largest = std::max(largest, std::abs(row[i]));
    }
    int16_t* q = out.q.data() + r * k;
    if (special) {  // its products are NaN whatever q holds
      out.scale[r] = std::numeric_limits<float>::quiet_NaN();
      std::fill(q, q + k, int16_t{0});
      continue;
    }
    out.scale[r] = largest / kActivationMax;
    const float inverse = largest > 0.f ? kActivationMax / largest : 0.f;
    constexpr float kMax = kActivationMax;
#pragma omp simd
    for (int64_t i = 0; i < k; ++i)  // to nearest, ties to even
      q[i] = static_cast<int16_t>(std::clamp(std::nearbyint(row[i] * inverse), -kMax, kMax));
  }
  return out;
}

// q * scale per row, as float32: the quantized activations for the float32 kernels.
std::vector<float> dequantized(const QuantizedRows& x, int64_t m, int64_t k) {
  std::vector<float> out(m * k);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) out[r * k + i] = x.q[r * k + i] * x.scale[r];
  return out;
}

#if defined(MAMBASTEP_AMX)
// From this many activation rows products with bfloat16 and int8 weights go to the AMX tiles
// where the OS grants them. A single row streams its weights faster through the vector
// kernels (BENCHMARKS.md, "Batches on AMX tiles").
constexpr int64_t kAmxFrom = 2;
bool takes_amx(int64_t m) { return m >= kAmxFrom && mambastep::amx::available(); }
#endif

}  // namespace

// x: (m, k) float32; weight: (n, k) float32, bfloat16 or int8; scale: (n,) float32, required
// for int8 weights and refused otherwise; bias: (n,) float32 or None. Returns (m, n) float32.
torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& weight,
                     const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "matvec: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "matvec: x must be a contiguous float32 (m, k) matrix");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
              "matvec: weight must be a contiguous (n, k) matrix with k = ", x.size(1),
              ", got shape ", weight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const bool int8 = weight.scalar_type() == torch::kInt8;
  TORCH_CHECK(int8 == (scale.has_value() && scale->defined()),
              "matvec: a scale goes with int8 weights, and only with them");
  const float* scale_ptr = nullptr;
  if (int8) {
    TORCH_CHECK(scale->scalar_type() == torch::kFloat32 && scale->is_contiguous() &&
                    scale->numel() == n, "matvec: scale must be float32 (n,) with n = ", n);
    scale_ptr = scale->data_ptr<float>();
  }
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() &&
                    bias->numel() == n, "matvec: bias must be float32 (n,) with n = ", n);
    bias_ptr = bias->data_ptr<float>();
  }
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (weight.scalar_type()) {
    case torch::kFloat32:
      matvec_impl(xp, weight.data_ptr<float>(), scale_ptr, bias_ptr, yp, m, k, n);
      break;
    case torch::kBFloat16: {
      const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
#if defined(MAMBASTEP_AMX)
      if (takes_amx(m)) {
        mambastep::amx::matmul_bf16(xp, w, bias_ptr, yp, m, k, n);
        break;
      }
#endif
      matvec_impl(as_bf16_pairs(xp, m * k).data(), w, scale_ptr, bias_ptr, yp, m, k, n);
      break;
    }
    case torch::kInt8: {
      const auto quantized = quantize_rows(xp, m, k);
      const int8_t* w = weight.data_ptr<int8_t>();
#if defined(MAMBASTEP_AMX)
      if (takes_amx(m)) {
        mambastep::amx::matmul_int8(quantized.q.data(), quantized.scale.data(), w, scale_ptr, bias_ptr, yp,
                                    m, k, n);
        break;
      }
#endif
      matvec_impl(dequantized(quantized, m, k).data(), w, scale_ptr, bias_ptr, yp, m, k, n);
      break;
    }
    default:
      TORCH_CHECK(false, "matvec: weights must be float32, bfloat16 or int8, got ",
                  weight.scalar_type());
  }
  return y;
}

// The widest instruction set this build's kernels use: what the tests report and check.
std::string cpu_kernels_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

// The path each weight type's products take on this CPU, e.g. "float32 avx512, bfloat16 amx
// from 2 rows, int8 amx from 2 rows": what a benchmark records beside its figures.
std::string cpu_matvec_paths() {
  std::string vector = cpu_kernels_isa(), tiles = vector;
#if defined(MAMBASTEP_AMX)
  if (mambastep::amx::available()) tiles = "amx from " + std::to_string(kAmxFrom) + " rows";
#endif
  return "float32 " + vector + ", bfloat16 " + tiles + ", int8 " + tiles;
}

TORCH_LIBRARY_IMPL(mambastep, CPU, m) { m.impl("matvec", &matvec); }
TORCH_LIBRARY_IMPL(mambastep, CompositeExplicitAutograd, m) {
  m.impl("cpu_kernels_isa", &cpu_kernels_isa);
  m.impl("cpu_matvec_paths", &cpu_matvec_paths);
}
