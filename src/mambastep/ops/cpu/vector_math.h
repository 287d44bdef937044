// exp, SiLU and softplus in float32, inlined so that the kernels' loops over channels vectorise
// without a library call per element or per vector. GCC's vector expf (a libmvec call per 8 or
// 16 lanes) made the Mamba-1 scan 1.4-1.6x slower on an AVX2 CPU, and log1pf has no vector form.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace mambastep {

// exp(v): within 3e-7 relative of exp on [-87.3, 88.3] (about 3 ulp), 0 below (where exp is
// denormal, which -ffast-math flushes to 0 anyway); above, exp(88.3). Range reduction
// v = k ln2 + r in one fused multiply-add (ln2 split in two parts would be more exact, but
// -ffast-math folds the parts back together differently in scalar and vector code, and two
// fmas made the scan 8-12% slower), Cephes' expf polynomial for exp(r), and 2^k put into the
// exponent bits.
inline float exp_inline(float v) {
  const float u = std::min(std::max(v, -87.3f), 88.3f);
  const float k = floorf(u * 1.44269504088896341f + 0.5f);  // round(u / ln2)
  const float r = std::fma(k, -0.693147180559945f, u);     // u - k ln2, |r| <= ln2 / 2
  const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                     4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return v < -87.3f ? 0.f : p * scale;
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

}  // namespace mambastep
