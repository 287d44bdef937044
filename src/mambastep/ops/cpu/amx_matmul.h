// The kernels on AMX tiles (Intel's matrix engine): products of a few activation rows and a
// weight matrix, for bfloat16 and int8 weights (amx_matmul.cpp, chosen by matvec.cpp), and the
// Mamba-2 scan of a bfloat16 prompt in chunks (amx_ssd.cpp, chosen by ssd_scan.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <new>
#include <vector>

#include "vector_math.h"

// AMX kernels where the build may use the tiles (Linux grants them per process, on request).
#if defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__linux__)
#define MAMBASTEP_AMX 1
#include <immintrin.h>
#endif
// The scan on the tiles also splits float32 values with AVX512-BF16's conversions, which every
// CPU with AMX has.
#if defined(MAMBASTEP_AMX) && defined(__AVX512BF16__)
#define MAMBASTEP_AMX_SCAN 1
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

// GCC's tile intrinsics name only the first 8 bytes of the memory they read or write, so the
// compiler may drop stores into a buffer before a tile reads it, or keep stale values of one
// a tile wrote: every such buffer is passed through this barrier.
inline void memory_barrier() { asm volatile("" ::: "memory"); }

// The tiles' shapes for this thread while it lives (tile t takes the t-th shape: rows of bytes
// each), released at its end. The configuration belongs to the thread, so each share of a
// parallel loop that uses the tiles holds one.
struct TileShape {
  uint8_t rows;
  uint16_t bytes;
};
class Tiles {
 public:
  explicit Tiles(std::initializer_list<TileShape> shapes) {
    struct alignas(64) {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t colsb[16] = {};
      uint8_t rows[16] = {};
    } config;
    int t = 0;
    for (const TileShape& shape : shapes) {
      config.rows[t] = shape.rows;
      config.colsb[t++] = shape.bytes;
    }
    memory_barrier();
    _tile_loadconfig(&config);
  }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

// Buffers the tiles load from or store to start on a cache line: a tile row that straddles
// two lines costs both, and made the scan's products three times slower.
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(std::size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  friend bool operator==(const LineAllocator&, const LineAllocator&) { return true; }
  friend bool operator!=(const LineAllocator&, const LineAllocator&) { return false; }
};
template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

// y (m, n) = x (m, k) W^T + bias (n,) or none, each x as bf16_pair takes it; W (n, k)
// bfloat16 bits; float32 sums.
void matmul_bf16(const float* x, const uint16_t* w, const float* bias, float* y, int64_t m, int64_t k,
                 int64_t n);

// y (m, n) = (q (m, k) W^T) * q_scale[row] * w_scale (n,) + bias (n,) or none; q: integers of
// at most kActivationMax, W (n, k) int8; exact integer sums, each rounded once to float32.
void matmul_int8(const int16_t* q, const float* q_scale, const int8_t* w, const float* w_scale,
                 const float* bias, float* y, int64_t m, int64_t k, int64_t n);

#if defined(MAMBASTEP_AMX_SCAN)
// The inputs of a Mamba-2 scan (ssd_scan.cpp's contract) with x, B, C and z in bfloat16: x and
// z (b, l, h, p), B and C (b, l, g, n), each token's last two dimensions contiguous, at the
// given strides (elements) between sequences and between tokens; dt (b, l, h), A (h,) and D
// (h, p) or null, float32 and contiguous; z null where there is no gate; y (b, l, h, p) float32.
struct SsdBf16 {
  const c10::BFloat16 *x, *B, *C, *z;
  const float *dt, *A, *D;
  float* y;
  int64_t b, l, h, p, g, n;
  int64_t x_batch_stride, x_stride, B_batch_stride, B_stride, C_batch_stride, C_stride, z_batch_stride, z_stride;
};

// Tokens per chunk of the scan on the tiles: a multiple of 32 (a tile row of bfloat16).
constexpr int64_t kScanChunk = 64;

// The scan in chunks on the tiles: y = (h . C + D x) SiLU(z), and `state` (b, h, p, n) float32
// advanced in place over the l tokens; the sequential scan's values to the precision of the
// products' operands computed in float32, 16 significant bits (about 1e-5 relative).
void ssd_scan_bf16(const SsdBf16& scan, float* state);
#endif

}  // namespace amx
#endif
}  // namespace mambastep
