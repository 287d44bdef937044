// Products of a few activation rows and a weight matrix on AMX tiles (Intel's matrix engine),
// for bfloat16 and int8 weights; declared here for matvec.cpp, which chooses them.
#pragma once

#include <cstdint>
#include <cstring>

#include "vector_math.h"

// AMX kernels where the build may use the tiles (Linux grants them per process, on request).
#if defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__linux__)
#define MAMBASTEP_AMX 1
#endif

namespace mambastep {

// The activations that multiply bfloat16 weights: f as the sum of two bfloat16, high = the
// nearest to f and low = the nearest to the rest (16 significant bits; f itself where it is
// a bfloat16 already, as in a bfloat16 model). A finite f beyond the largest bfloat16 takes
// that largest one as its high part; an infinity or a NaN is its own high part, with no rest.
// (The bit tests stand where f == f would: -ffast-math folds that to true.)
struct Bf16Pair {
  uint16_t high, low;
};
inline Bf16Pair bf16_pair(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const bool special = (bits & 0x7f800000u) == 0x7f800000u;  // selects, not branches: loops over
  const uint16_t nearest = bf16_bits(f);                      // activations vectorise
  const bool overflows = !special && (nearest & 0x7f80u) == 0x7f80u;  // rounded up to infinity
  const uint16_t high = overflows ? static_cast<uint16_t>(bits >> 16) : nearest;
  const uint16_t low = bf16_bits(f - bf16_value(high));
  return {high, special ? uint16_t{0} : low};
}

// The activations that multiply int8 weights are integers of at most this magnitude times a
// float32 scale per row (about 15 bits): each splits exactly into a high and a low signed
// byte, q = 128 hi + lo with |hi| <= 127 and -64 <= lo < 64.
constexpr int kActivationMax = 127 * 128;

#if defined(MAMBASTEP_AMX)
namespace amx {

// Whether the OS lets this process use the tiles (asked once).
bool available();

// y (m, n) = x (m, k) W^T + bias (n,) or none, each x as bf16_pair takes it; W (n, k)
// bfloat16 bits; float32 sums.
void matmul_bf16(const float* x, const uint16_t* w, const float* bias, float* y, int64_t m, int64_t k,
                 int64_t n);

// y (m, n) = (q (m, k) W^T) * q_scale[row] * w_scale (n,) + bias (n,) or none; q: integers of
// at most kActivationMax, W (n, k) int8; exact integer sums, each rounded once to float32.
void matmul_int8(const int16_t* q, const float* q_scale, const int8_t* w, const float* w_scale,
                 const float* bias, float* y, int64_t m, int64_t k, int64_t n);

}  // namespace amx
#endif
}  // namespace mambastep
