// exp, SiLU and softplus in float32, and the conversions of bfloat16, inlined so that the
// kernels' loops over channels vectorise without a library call or a branch per element or
// per vector. GCC's vector expf (a libmvec call per 8 or 16 lanes) made the Mamba-1 scan
// markedly slower on an AVX2 CPU, and log1pf has no vector form.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mambastep {

#if defined(__AVX2__)
// The sum of a vector's 8 lanes.
inline float sum_lanes(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// exp(v): within 3.1e-7 relative of exp on [-87.3, 88.3] (about 3 ulp); exp(-87.3) = 1.2e-38
// below (where exp is denormal or 0) and exp(88.3) above. v = k ln2 + r: adding 1.5 * 2^23 to
// v / ln2 rounds it to the integer k in the low mantissa bits, so k costs an fma and a
// subtraction (std::fma keeps -ffast-math from folding the addition and the subtraction away)
// and 2^k an integer shift and add into exp(r)'s exponent bits. r = v - k ln2 in one fma with
// float ln2 (ln2 split in two parts would be more exact, but -ffast-math folds the parts back
// together differently in scalar and vector code); exp(r) = 1 + r + r^2 q(r) with q a degree-4
// fit of the relative error on |r| <= ln2 / 2 (3.8e-9 with these float coefficients).
inline float exp_inline(float v) {
  const float u = std::min(std::max(v, -87.3f), 88.3f);
  const float shifted = std::fma(u, 1.44269504088896341f, 12582912.f);  // 1.5 * 2^23 + k
  const float k = shifted - 12582912.f;
  const float r = std::fma(k, -0.693147180559945f, u);  // |r| <= ln2 / 2
  const float q = (((1.381461276e-3f * r + 8.368710056e-3f) * r + 4.166838899e-2f) * r +
                   1.666652113e-1f) * r + 4.999999404e-1f;
  const float p = std::fma(q, r * r, r) + 1.f;  // exp(r), in [0.7, 1.42]
  int32_t k_bits, p_bits;
  std::memcpy(&k_bits, &shifted, sizeof k_bits);
  std::memcpy(&p_bits, &p, sizeof p_bits);
  p_bits += k_bits << 23;  // k's bits are the low ones of `shifted`: the shift keeps only k << 23
  float out;
  std::memcpy(&out, &p_bits, sizeof out);
  return out;
}

// log(1 + t) for t in [0, 1]. 1 + t = 2^k (1 + f) with k in {0, 1} and f in [-0.293, 0.415],
// f taken from t itself (t, or (t - 1) / 2), so small t keep their precision, which 1 + t
// would round away; then Cephes' logf polynomial for log(1 + f).
inline float log1p_unit(float t) {
  const bool halve = t > 0.41421356f;  // 1 + t > sqrt(2)
  const float f = halve ? (t - 1.f) * 0.5f : t;
  const float k = halve ? 1.f : 0.f;
  const float f2 = f * f;
  const float p = ((((((((7.0376836292e-2f * f - 1.1514610310e-1f) * f + 1.1676998740e-1f) * f -
                        1.2420140846e-1f) * f + 1.4249322787e-1f) * f - 1.6668057665e-1f) * f +
                     2.0000714765e-1f) * f - 2.4999993993e-1f) * f + 3.3333331174e-1f) * f * f2;
  return f + (p - k * 2.12194440e-4f - 0.5f * f2) + k * 0.693359375f;
}

// softplus(v) = log(1 + exp(v)), and v itself above 20, as PyTorch's F.softplus.
inline float softplus_inline(float v) {
  return v > 20.f ? v : std::max(v, 0.f) + log1p_unit(exp_inline(-std::fabs(v)));
}

// SiLU(v) = v sigmoid(v).
inline float silu_inline(float v) { return v / (1.f + exp_inline(-v)); }

// The bfloat16 nearest to f (ties to even), as PyTorch rounds.
inline uint16_t bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;  // stays NaN (quiet); a select, not a branch
  return static_cast<uint16_t>(nan ? (bits >> 16) | 0x40u : (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float bf16_value(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// A value of the kernels' storage types as float32, and float32 rounded to them (c10's
// bfloat16 conversions take a branch per value, which keeps the loops around them scalar).
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return bf16_value(v.x); }
inline float widen(c10::Half v) { return static_cast<float>(v); }
template <typename T>
inline T narrow(float f) {
  return static_cast<T>(f);
}
template <>
inline c10::BFloat16 narrow(float f) {
  return c10::BFloat16(bf16_bits(f), c10::BFloat16::from_bits());
}

}  // namespace mambastep
