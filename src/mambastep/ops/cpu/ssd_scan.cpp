// Fused Mamba-2 scan (SSD with a scalar decay per head) for the CPU, inference only.
//
//   h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t,   y_t = h_t · C_t + D x_t  (times SiLU(z_t): the gate)
//
// run token by token in float32, one pass over the sequence per (sequence, head, block of
// kRows head channels). The block's state, (n, kRows) with the channels innermost, stays in
// L1 and its channel loops vectorise without horizontal sums. Nothing of size (q, q) or
// (l, h, p, n) is ever written, and the decay is one exp per head and token. Tokens go two at
// a time, so each state entry is loaded and stored once per pair.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int64_t kRows = 16;  // head channels per work item

using mambastep::widen;

// One head's view of the inputs of one sequence, each pointer at token 0 and channel 0 of it.
// T is float, or bfloat16 or half, widened as they are read.
template <typename T>
struct HeadInputs {
  const T* x;       // token t, channel i at x[t * x_stride + i]
  const float* dt;  // token t at dt[t * dt_stride]
  const T* B;       // token t, state j at B[t * B_stride + j]
  const T* C;       // token t, state j at C[t * C_stride + j]
  const T* z;       // the gate's input like x (at z[t * z_stride + i]), or null: y = (h . C + D x) SiLU(z)
  int64_t x_stride, dt_stride, B_stride, C_stride, z_stride, y_stride;
};

// Channels [0, w) of one token, zero-padded to kRows lanes, times dt.
template <typename T>
inline void load_dx(const T* x, float dt, float* dx, int64_t w) {
  for (int64_t i = 0; i < kRows; ++i) dx[i] = i < w ? dt * widen(x[i]) : 0.f;
}

// A row of n values of B or C as float: the row itself for float32 inputs, else widened into
// `buffer` (n floats), once per token rather than once per state update.
inline const float* as_float(const float* row, float*, int64_t) { return row; }
template <typename T>
inline const float* as_float(const T* row, float* buffer, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) buffer[j] = widen(row[j]);
  return buffer;
}

// Advance the block state hb (n, kRows) over the kTokens tokens from t, writing their y: the
// state is loaded and stored once for all of them. rows: room for 2 * kTokens rows of n floats.
template <int kTokens, typename T>
void scan_tokens(const HeadInputs<T>& in, float A, const float* D, float* hb, float* y, int64_t t,
                 int64_t n, int64_t w, float* rows) {
  float decay[kTokens], dx[kTokens][kRows], acc[kTokens][kRows] = {};
  const float *B[kTokens], *C[kTokens];
  for (int k = 0; k < kTokens; ++k) {
    const float d = in.dt[(t + k) * in.dt_stride];
    decay[k] = mambastep::exp_inline(d * A);
    load_dx(in.x + (t + k) * in.x_stride, d, dx[k], w);
    B[k] = as_float(in.B + (t + k) * in.B_stride, rows + 2 * k * n, n);
    C[k] = as_float(in.C + (t + k) * in.C_stride, rows + (2 * k + 1) * n, n);
  }
  for (int64_t j = 0; j < n; ++j) {
    float* h_j = hb + j * kRows;
#pragma omp simd
    for (int64_t i = 0; i < kRows; ++i) {
      float s = h_j[i];
      for (int k = 0; k < kTokens; ++k) {
        s = decay[k] * s + dx[k][i] * B[k][j];
        acc[k][i] += s * C[k][j];
      }
      h_j[i] = s;
    }
  }
  for (int k = 0; k < kTokens; ++k) {
    const T* x = in.x + (t + k) * in.x_stride;
    float* y_t = y + (t + k) * in.y_stride;
    for (int64_t i = 0; i < w; ++i) y_t[i] = acc[k][i] + (D ? D[i] * widen(x[i]) : 0.f);
    if (in.z) {
      const T* z = in.z + (t + k) * in.z_stride;
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) y_t[i] *= mambastep::silu_inline(widen(z[i]));
    }
  }
}

// Scan channels [0, w) (w <= kRows) of one head over l tokens. state (w, n) rows of the head's
// state, updated in place; y written at y + t * y_stride; D (w,) or null.
template <typename T>
void scan_rows(const HeadInputs<T>& in, float A, const float* D, float* state, float* y, int64_t l,
               int64_t n, int64_t w) {
  std::vector<float> hb(n * kRows, 0.f);  // (n, kRows)
  std::vector<float> rows(4 * n);         // B and C of two tokens, widened
  for (int64_t i = 0; i < w; ++i)
    for (int64_t j = 0; j < n; ++j) hb[j * kRows + i] = state[i * n + j];
  int64_t t = 0;
  for (; t + 1 < l; t += 2) scan_tokens<2>(in, A, D, hb.data(), y, t, n, w, rows.data());
  if (t < l) scan_tokens<1>(in, A, D, hb.data(), y, t, n, w, rows.data());
  for (int64_t i = 0; i < w; ++i)
    for (int64_t j = 0; j < n; ++j) state[i * n + j] = hb[j * kRows + i];
}

// A tensor of `dtype` and `shape`: contiguous, or, where rows may be strided (x, B, C, z:
// (b, l, *, *)), with each token's last two dimensions contiguous.
void check(const torch::Tensor& t, const char* name, c10::IntArrayRef shape, bool rows_strided = false,
           torch::ScalarType dtype = torch::kFloat32) {
  TORCH_CHECK(t.scalar_type() == dtype, "ssd_scan_fused: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "ssd_scan_fused: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  if (rows_strided) {
    TORCH_CHECK(t.stride(3) == 1 && t.stride(2) == t.size(3), "ssd_scan_fused: ", name,
                " must have each token's last two dimensions contiguous");
  } else {
    TORCH_CHECK(t.is_contiguous(), "ssd_scan_fused: ", name, " must be contiguous");
  }
}

}  // namespace

// x: (b, l, h, p); dt: (b, l, h) after softplus and clamping; A: (h,); B, C: (b, l, g, n), head
// hd reading group hd / (h / g); D: (h, p) or empty; z: (b, l, h, p) or empty; state:
// (b, h, p, n). x, B, C and z of one dtype, float32, bfloat16 or float16, with rows at any
// stride (each token's last two dimensions contiguous); the others float32 and contiguous.
// With z, y = (h . C + D x) SiLU(z). Returns y (b, l, h, p) and the state after the last token
// (b, h, p, n), both float32.
std::vector<torch::Tensor> ssd_scan_fused(const torch::Tensor& x, const torch::Tensor& dt,
                                          const torch::Tensor& A, const torch::Tensor& B,
                                          const torch::Tensor& C, const torch::Tensor& D,
                                          const torch::Tensor& z, const torch::Tensor& state) {
  TORCH_CHECK(x.dim() == 4 && B.dim() == 4, "ssd_scan_fused: x must be (b, l, h, p) and B (b, l, g, n), got ",
              x.sizes(), " and ", B.sizes());
  const int64_t b = x.size(0), l = x.size(1), h = x.size(2), p = x.size(3);
  const int64_t g = B.size(2), n = B.size(3);
  TORCH_CHECK(g >= 1 && h % g == 0, "ssd_scan_fused: ", h, " heads do not split into ", g, " groups");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "ssd_scan_fused: x must be float32, bfloat16 or float16, got ", dtype);
  check(x, "x (b, l, h, p)", {b, l, h, p}, true, dtype);
  check(dt, "dt (b, l, h)", {b, l, h});
  check(A, "A (h,)", {h});
  check(B, "B (b, l, g, n)", {b, l, g, n}, true, dtype);
  check(C, "C (b, l, g, n)", {b, l, g, n}, true, dtype);
  if (D.numel()) check(D, "D (h, p)", {h, p});
  if (z.numel()) check(z, "z (b, l, h, p)", {b, l, h, p}, true, dtype);
  check(state, "state (b, h, p, n)", {b, h, p, n});
  auto next = state.clone();
  auto y = torch::empty({b, l, h, p}, state.options());
  const int64_t blocks = (p + kRows - 1) / kRows, heads_per_group = h / g;
  const float* D_ptr = D.numel() ? D.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ssd_scan", [&] {
    const scalar_t* z_ptr = z.numel() ? z.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, b * h * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / (h * blocks), hd = (item / blocks) % h, i0 = (item % blocks) * kRows;
        const int64_t group = hd / heads_per_group;
        const HeadInputs<scalar_t> in{x.data_ptr<scalar_t>() + bi * x.stride(0) + hd * p + i0,
                                      dt.data_ptr<float>() + bi * l * h + hd,
                                      B.data_ptr<scalar_t>() + bi * B.stride(0) + group * n,
                                      C.data_ptr<scalar_t>() + bi * C.stride(0) + group * n,
                                      z_ptr ? z_ptr + bi * z.stride(0) + hd * p + i0 : nullptr,
                                      x.stride(1), h, B.stride(1), C.stride(1), z_ptr ? z.stride(1) : 0,
                                      h * p};
        scan_rows(in, A.data_ptr<float>()[hd], D_ptr ? D_ptr + hd * p + i0 : nullptr,
                  next.data_ptr<float>() + ((bi * h + hd) * p + i0) * n,
                  y.data_ptr<float>() + (bi * l * h + hd) * p + i0, l, n, std::min(kRows, p - i0));
      }
    });
  });
  return {y, next};
}

TORCH_LIBRARY_IMPL(mambastep, CPU, m) { m.impl("ssd_scan", &ssd_scan_fused); }
