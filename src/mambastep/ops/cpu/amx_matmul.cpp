// AMX products for matvec.cpp: y = x W^T for up to 16 activation rows at a time.
//
// A tile multiply takes 16 weight rows x 64 bytes of them (32 bfloat16 or 64 int8 weights per
// row) against the same stretch of every activation row, so a decode step's products cost the
// weights' reading and almost nothing else: the FMAs of a batch of 8 sequences, which bound
// the AVX-512 kernels, are gone. The activations are laid out as the tiles want them (pairs of
// bfloat16, quadruples of int8, per activation row) once per call; the weights are read as
// they are stored. Result tile: 16 weight rows x the activation rows, float32 or int32.
#include "amx_matmul.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(MAMBASTEP_AMX)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(MAMBASTEP_AMX)
namespace mambastep::amx {
namespace {

constexpr int kTileRows = 16;   // weight rows per tile multiply
constexpr int kTileBytes = 64;  // bytes of each of them per tile multiply
constexpr int kMaxCols = 16;    // activation rows per result tile

// Tiles 0 and 1: results (weight rows x activation rows, 4 bytes each); 2: weights; 3 and 4:
// activations.
Tiles product_tiles(int cols) {
  const TileShape activations{kTileRows, static_cast<uint16_t>(4 * cols)};
  return Tiles{activations, activations, {kTileRows, kTileBytes}, activations, activations};
}

// The weights of one block of 16 rows: the matrix's own rows, or (for a last block of fewer)
// a zero-padded copy; and the last stretch of each row zero-padded to a whole tile. While the
// first pass over a block loads it, the next block's lines are asked into L2 at the same pace.
template <typename W>
class WeightBlock {
 public:
  static constexpr int64_t kStep = kTileBytes / sizeof(W);  // weights of a row per tile multiply

  WeightBlock(const W* w, int64_t k, int64_t n) : k_(k), w_(w), end_(reinterpret_cast<const char*>(w + n * k)) {}

  // Points at the block of rows from `row`, `rows` of them (<= 16).
  void select(int64_t row, int rows) {
    rows_ = w_ + row * k_;
    next_ = reinterpret_cast<const char*>(rows_ + kTileRows * k_);
    if (rows < kTileRows) {
      padded_.assign(kTileRows * k_, W(0));
      std::copy(rows_, rows_ + rows * k_, padded_.begin());
      rows_ = padded_.data();
    }
  }
  // Loads the stretch from column i into tile 2; with `ahead`, asks for the next block's
  // share of lines for this stretch.
  void load(int64_t i, bool ahead) {
    if (ahead) {
      const char* line = next_ + (i / kStep) * kTileRows * kTileBytes;
      for (int l = 0; l < kTileRows && line < end_; ++l, line += kTileBytes) _mm_prefetch(line, _MM_HINT_T1);
    }
    if (i + kStep <= k_) {
      _tile_loadd(2, rows_ + i, k_ * sizeof(W));
      return;
    }
    std::fill(&edge_[0][0], &edge_[0][0] + kTileRows * kStep, W(0));
    for (int r = 0; r < kTileRows; ++r) std::copy(rows_ + r * k_ + i, rows_ + (r + 1) * k_, edge_[r]);
    memory_barrier();
    _tile_loadd(2, edge_, kTileBytes);
  }

 private:
  int64_t k_;
  const W* w_;
  const char* end_;
  const W* rows_ = nullptr;
  const char* next_ = nullptr;
  std::vector<W> padded_;
  alignas(64) W edge_[kTileRows][kStep];
};

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// The activations (m, k) as the tiles take them, each value split in two parts (first and
// second): by groups of `cols` rows (up to 16, the result tile's columns), per group (kp / per,
// cols, per) for the `per` values of a row in 4 bytes, kp = k rounded up to whole tiles; rows
// past m and columns past k are zeros.
template <typename T>
class PackedActivations {
 public:
  // split_row(r, first, second) writes row r's k parts contiguously (a loop that vectorises);
  // each group's rows are then transposed 4 bytes at a time, reading `cols` rows in step and
  // writing the packed parts in order.
  template <typename SplitRow>
  PackedActivations(int64_t m, int64_t k, SplitRow split_row)
      : cols_(static_cast<int>(std::min<int64_t>(m, kMaxCols))),
        groups_((m + cols_ - 1) / cols_),
        kp_(round_up(k, kTileBytes / sizeof(T))) {
    const int cols = cols_;
    const int64_t kp = kp_, words = kp / kPer;
    std::vector<T> rows_first(m * kp, T(0)), rows_second(m * kp, T(0));  // (m, kp); zeros past k
    for (int64_t r = 0; r < m; ++r) split_row(r, &rows_first[r * kp], &rows_second[r * kp]);
    first_.assign(groups_ * kp * cols, T(0));
    second_.assign(groups_ * kp * cols, T(0));
    for (int64_t g = 0; g < groups_; ++g) {
      const int64_t r0 = g * cols, rows = std::min<int64_t>(cols, m - r0);
      for (int64_t word = 0; word < words; ++word) {
        const int64_t to = (g * words + word) * cols * kPer;
        for (int64_t c = 0; c < rows; ++c) {
          const int64_t from = (r0 + c) * kp + word * kPer;
          std::memcpy(&first_[to + c * kPer], &rows_first[from], 4);
          std::memcpy(&second_[to + c * kPer], &rows_second[from], 4);
        }
      }
    }
    memory_barrier();  // the tiles read these parts
  }

  int cols() const { return cols_; }
  int64_t groups() const { return groups_; }

  // Group g's stretch from column i: the first parts into tile 3, the second into tile 4.
  void load(int64_t g, int64_t i) const {
    const int64_t at = g * kp_ * cols_ + i * cols_;
    _tile_loadd(3, first_.data() + at, 4 * cols_);
    _tile_loadd(4, second_.data() + at, 4 * cols_);
  }

 private:
  static constexpr int64_t kPer = 4 / sizeof(T);
  int cols_;
  int64_t groups_, kp_;
  std::vector<T> first_, second_;
};

// For each block of 16 weight rows (threads split them) and each group of activation rows in
// x: results zeroed; for every stretch i of k, the weights into tile 2, the activations into
// tiles 3 and 4, then multiply(); then emit(group, first weight row, weight rows). A block's
// weights are read from memory once, for the first group; the others find them in cache. x's
// parts have W's size, so a stretch of the weights and of the activations cover the same k.
template <typename W, typename Multiply, typename Emit>
void tile_products(const W* w, int64_t k, int64_t n, const PackedActivations<W>& x, Multiply multiply, Emit emit) {
  constexpr int64_t kStep = WeightBlock<W>::kStep;
  const int64_t kp = round_up(k, kStep);
  const int64_t blocks = (n + kTileRows - 1) / kTileRows;
  // Blocks per thread task: enough weights (~16k) to be worth a thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / (kTileRows * std::max<int64_t>(k, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const Tiles tiles = product_tiles(x.cols());
    WeightBlock<W> weights(w, k, n);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o = block * kTileRows;
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, n - o));
      weights.select(o, rows);
      for (int64_t g = 0; g < x.groups(); ++g) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t i = 0; i < kp; i += kStep) {
          weights.load(i, g == 0 && block + 1 < end);
          x.load(g, i);
          multiply();
        }
        emit(g, o, rows);
      }
    }
  });
}

}  // namespace

bool available() {
  // Linux hands out the tiles' 8 KiB of register state per process on request.
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                        18 /* XFEATURE_XTILEDATA */) == 0;
  return permitted;
}

// Activation rows go by groups of up to 16 (the result tile's columns), packed by PackedActivations.
void matmul_bf16(const float* x, const uint16_t* w, const float* bias, float* y, int64_t m, int64_t k,
                 int64_t n) {
  // x = high + low, both bfloat16, multiplied separately.
  const PackedActivations<uint16_t> x_pairs(m, k, [&](int64_t r, uint16_t* hi, uint16_t* lo) {
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) {
      const auto pair = bf16_pair(x[r * k + i]);
      hi[i] = pair.high;
      lo[i] = pair.low;
    }
  });
  const int cols = x_pairs.cols();
  tile_products(
      w, k, n, x_pairs,
      [] {
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(0, 2, 4);
      },
      [&](int64_t g, int64_t o, int rows) {
        alignas(64) float out[kTileRows][kMaxCols];
        _tile_stored(0, out, sizeof out[0]);
        memory_barrier();
        for (int64_t c = 0; c < cols && g * cols + c < m; ++c)
          for (int r = 0; r < rows; ++r) y[(g * cols + c) * n + o + r] = out[r][c] + (bias ? bias[o + r] : 0.f);
      });
}

void matmul_int8(const int16_t* q, const float* q_scale, const int8_t* w, const float* w_scale,
                 const float* bias, float* y, int64_t m, int64_t k, int64_t n) {
  // q = 128 hi + lo, both signed bytes, multiplied separately.
  const PackedActivations<int8_t> q_bytes(m, k, [&](int64_t r, int8_t* high, int8_t* low) {
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) {
      const int v = q[r * k + i], rest = ((v + 64) & 127) - 64;
      high[i] = static_cast<int8_t>((v - rest) >> 7);  // v - rest: a multiple of 128
      low[i] = static_cast<int8_t>(rest);
    }
  });
  const int cols = q_bytes.cols();
  tile_products(
      w, k, n, q_bytes,
      [] {
        _tile_dpbssd(0, 2, 3);
        _tile_dpbssd(1, 2, 4);
      },
      [&](int64_t g, int64_t o, int rows) {
        alignas(64) int32_t out_hi[kTileRows][kMaxCols], out_lo[kTileRows][kMaxCols];
        _tile_stored(0, out_hi, sizeof out_hi[0]);
        _tile_stored(1, out_lo, sizeof out_lo[0]);
        memory_barrier();
        for (int64_t c = 0; c < cols && g * cols + c < m; ++c)
          for (int r = 0; r < rows; ++r) {
            const auto sum = static_cast<float>(int64_t{out_hi[r][c]} * 128 + out_lo[r][c]);
            y[(g * cols + c) * n + o + r] = sum * q_scale[g * cols + c] * w_scale[o + r] + (bias ? bias[o + r] : 0.f);
          }
      });
}

}  // namespace mambastep::amx
#endif
