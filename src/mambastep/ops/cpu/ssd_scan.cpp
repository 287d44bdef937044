// Fused Mamba-2 scan (SSD with a scalar decay per head) for the CPU: forward and backward.
//
//   h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t,   y_t = h_t · C_t + D x_t  (times SiLU(z_t): the gate)
//
// run token by token in float32, one pass over the sequence per (sequence, head, block of
// kRows head channels). The block's state, (n, kRows) with the channels innermost, stays in
// L1 and its channel loops vectorise without horizontal sums. Nothing of size (q, q) or
// (l, h, p, n) is ever written, and the decay is one exp per head and token. Tokens go two at
// a time, so each state entry is loaded and stored once per pair.
//
// Training: the forward can also save the state at the start of every chunk of `chunk` tokens
// (checkpoints, (b, ceil(l / chunk), h, p, n)). The backward takes one (sequence, head) at a
// time and walks its chunks in reverse: it recomputes a chunk's states from its checkpoint
// into a buffer that stays in L2, then runs the reverse recurrence over the chunk. It never
// divides by a decay, which may underflow to 0.
//
// A bfloat16 prompt for inference runs in chunks on AMX tiles instead, where the CPU has them
// (amx_ssd.cpp).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "amx_matmul.h"
#include "vector_math.h"

namespace {

constexpr int64_t kRows = 16;   // head channels per work item
constexpr int64_t kLanes = 16;  // state columns per block of the backward: one 512-bit vector of floats

using mambastep::widen;

#if defined(MAMBASTEP_AMX_SCAN)
// From this many tokens a bfloat16 scan for inference runs in chunks on the AMX tiles
// (amx_ssd.cpp) where the OS grants them.
constexpr int64_t kTilesFrom = 64;
#endif

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

// The block state hb (n, kRows) as rows (w, n) of a head's state, the layout of the state and
// checkpoint tensors.
void store_rows(const float* hb, float* rows, int64_t n, int64_t w) {
  for (int64_t i = 0; i < w; ++i)
    for (int64_t j = 0; j < n; ++j) rows[i * n + j] = hb[j * kRows + i];
}

// Scan channels [0, w) (w <= kRows) of one head over l tokens. state (w, n) rows of the head's
// state, updated in place; y written at y + t * y_stride; D (w,) or null. With ckpt non-null,
// the rows of the state before each chunk of `chunk` tokens are saved at ckpt + k * ckpt_stride
// (chunk k); without, chunk is ignored.
template <typename T>
void scan_rows(const HeadInputs<T>& in, float A, const float* D, float* state, float* y, int64_t l,
               int64_t n, int64_t w, float* ckpt, int64_t ckpt_stride, int64_t chunk) {
  std::vector<float> hb(n * kRows, 0.f);  // (n, kRows)
  std::vector<float> rows(4 * n);         // B and C of two tokens, widened
  for (int64_t i = 0; i < w; ++i)
    for (int64_t j = 0; j < n; ++j) hb[j * kRows + i] = state[i * n + j];
  if (!ckpt) chunk = std::max<int64_t>(l, 1);
  for (int64_t t0 = 0; t0 < l; t0 += chunk) {
    const int64_t t1 = std::min(t0 + chunk, l);
    if (ckpt) store_rows(hb.data(), ckpt + (t0 / chunk) * ckpt_stride, n, w);
    int64_t t = t0;
    for (; t + 1 < t1; t += 2) scan_tokens<2>(in, A, D, hb.data(), y, t, n, w, rows.data());
    if (t < t1) scan_tokens<1>(in, A, D, hb.data(), y, t, n, w, rows.data());
  }
  store_rows(hb.data(), state, n, w);
}

// ---------------------------------------------------------------------------------------------
// Backward: one head of one sequence, every tensor float32 and contiguous, the head's state
// (p, n) with the states innermost (the layout of the checkpoints and of the state tensors).

// One head's view of one sequence, each pointer at token 0 of it: token t's channels at
// x + t * x_stride (also gy and dx), its dt at dt[t * dt_stride] (also ddt), its B and C rows
// at B + t * B_stride (n floats each).
struct HeadBackward {
  const float *x, *dt, *B, *C, *gy;
  float *dx, *ddt;
  int64_t x_stride, dt_stride, B_stride;
};

// The states after tokens [t0, t1) from hs[0] = h_{t0-1}: hs (t1 - t0 + 1, p, n), hs[k + 1] =
// h after token t0 + k.
void recompute_states(const HeadBackward& v, float A, float* hs, int64_t t0, int64_t t1, int64_t p,
                      int64_t n) {
  for (int64_t t = t0; t < t1; ++t) {
    const float d = v.dt[t * v.dt_stride], a = mambastep::exp_inline(d * A);
    const float *x = v.x + t * v.x_stride, *B = v.B + t * v.B_stride;
    float* h_next = hs + (t - t0 + 1) * p * n;
    const float* h_prev = h_next - p * n;
    for (int64_t i = 0; i < p; ++i) {
      const float dx = d * x[i];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) h_next[i * n + j] = a * h_prev[i * n + j] + dx * B[j];
    }
  }
}

// One token of the reverse pass over the state columns [0, w) (w <= kLanes) of every row i of a
// head's state: with G = g + gy_i C (the gradient of h_t), the column sums of gy_i h_t (dC),
// dt x_i G (dB) and G h_{t-1} (gah), each row's partial sums of G B, one per column (gB_lanes,
// (p, kLanes), added to), and g <- a G. The pointers are at column 0 of the block, rows n
// apart. The column sums stay in registers over the rows: per row and vector of columns, three
// loads and the store of g, where the row-by-row form also loaded and stored every sum.
template <bool kFull>
inline void reverse_columns(int64_t w, float a, float d, const float* x, const float* gy, const float* B,
                            const float* C, const float* h_prev, const float* h_cur, float* g, float* dB,
                            float* dC, float* gah, float* gB_lanes, int64_t p, int64_t n) {
  if (kFull) w = kLanes;
  float dC_sum[kLanes] = {}, dB_sum[kLanes] = {}, gah_sum[kLanes] = {};
  for (int64_t i = 0; i < p; ++i) {
    const float gy_i = gy[i], dx_i = d * x[i];
    const float *hp = h_prev + i * n, *hc = h_cur + i * n;
    float *g_i = g + i * n, *lanes = gB_lanes + i * kLanes;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const float G = g_i[j] + gy_i * C[j];
      dC_sum[j] += gy_i * hc[j];
      dB_sum[j] += dx_i * G;
      gah_sum[j] += G * hp[j];
      lanes[j] += G * B[j];
      g_i[j] = a * G;
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    dC[j] = dC_sum[j];
    dB[j] = dB_sum[j];
    gah[j] = gah_sum[j];
  }
}

// The gradients of one head of one sequence. With G_t = dL/dh_t, gathered in g token by token
// from the last (g = dL/d(final state) on entry):
//   G_t        = g + gy_t ⊗ C_t                    g <- a_t G_t   (then dL/dh_{t-1})
//   dC_t[j]   += sum_i gy_t[i] h_t[i, j]           dB_t[j] += sum_i G_t[i, j] dt_t x_t[i]
//   dx_t[i]    = dt_t sum_j G_t[i, j] B_t[j] + D[i] gy_t[i]
//   ddt_t      = sum_i x_t[i] sum_j G_t[i, j] B_t[j] + A a_t sum_ij G_t[i, j] h_{t-1}[i, j]
//   dA        += dt_t a_t sum_ij G_t[i, j] h_{t-1}[i, j]          dD[i] += gy_t[i] x_t[i]
// ckpt: the head's checkpoint of chunk k at ckpt + k * ckpt_stride; g (p, n): dL/d(final state)
// on entry, the gradient of the starting state on exit. dB, dC (l, n) this head's partials;
// dD (p,) and *dA this sequence's; D (p,) or null.
void head_backward(const HeadBackward& v, float A, const float* D, const float* ckpt,
                   int64_t ckpt_stride, float* g, float* dB, float* dC, float* dD, float* dA, int64_t l,
                   int64_t p, int64_t n, int64_t chunk) {
  std::vector<float> hs((chunk + 1) * p * n);  // (chunk + 1, p, n): one chunk's states
  std::vector<float> gah(n);                   // sum over i of G_t h_{t-1}, per state
  std::vector<float> gB_lanes(p * kLanes);     // (p, kLanes): per row, sum over j of G_t B_t by lane
  std::fill(dD, dD + p, 0.f);
  float dA_sum = 0.f;
  for (int64_t k = (l + chunk - 1) / chunk - 1; k >= 0; --k) {
    const int64_t t0 = k * chunk, t1 = std::min(t0 + chunk, l);
    std::copy(ckpt + k * ckpt_stride, ckpt + k * ckpt_stride + p * n, hs.begin());
    recompute_states(v, A, hs.data(), t0, t1, p, n);
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const float d = v.dt[t * v.dt_stride], a = mambastep::exp_inline(d * A);
      const float *x = v.x + t * v.x_stride, *gy = v.gy + t * v.x_stride;
      const float *B = v.B + t * v.B_stride, *C = v.C + t * v.B_stride;
      const float* h_prev = hs.data() + (t - t0) * p * n;
      const float* h_cur = h_prev + p * n;
      float *dB_t = dB + t * n, *dC_t = dC + t * n, *dx = v.dx + t * v.x_stride;
      std::fill(gB_lanes.begin(), gB_lanes.end(), 0.f);
      for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
        const int64_t w = std::min(kLanes, n - j0);
        auto block = w == kLanes ? reverse_columns<true> : reverse_columns<false>;
        block(w, a, d, x, gy, B + j0, C + j0, h_prev + j0, h_cur + j0, g + j0, dB_t + j0, dC_t + j0,
              gah.data() + j0, gB_lanes.data(), p, n);
      }
      float xgB = 0.f;
      for (int64_t i = 0; i < p; ++i) {
        float gB = 0.f;
#pragma omp simd reduction(+ : gB)
        for (int64_t j = 0; j < kLanes; ++j) gB += gB_lanes[i * kLanes + j];
        dx[i] = d * gB + (D ? D[i] * gy[i] : 0.f);
        xgB += x[i] * gB;
        dD[i] += gy[i] * x[i];
      }
      float gah_sum = 0.f;
#pragma omp simd reduction(+ : gah_sum)
      for (int64_t j = 0; j < n; ++j) gah_sum += gah[j];
      v.ddt[t * v.dt_stride] = xgB + A * a * gah_sum;
      dA_sum += d * a * gah_sum;
    }
  }
  *dA = dA_sum;
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

// Checks the scan's inputs: x, B and C (rows strided where rows_strided) of x's dtype (float32,
// bfloat16 or float16 where `widened`, else float32), dt, A, D (which may be empty) float32.
// Returns (b, l, h, p, g, n).
std::vector<int64_t> check_inputs(const torch::Tensor& x, const torch::Tensor& dt, const torch::Tensor& A,
                                  const torch::Tensor& B, const torch::Tensor& C, const torch::Tensor& D,
                                  bool rows_strided, bool widened) {
  TORCH_CHECK(x.dim() == 4 && B.dim() == 4, "ssd_scan_fused: x must be (b, l, h, p) and B (b, l, g, n), got ",
              x.sizes(), " and ", B.sizes());
  const int64_t b = x.size(0), l = x.size(1), h = x.size(2), p = x.size(3);
  const int64_t g = B.size(2), n = B.size(3);
  TORCH_CHECK(g >= 1 && h % g == 0, "ssd_scan_fused: ", h, " heads do not split into ", g, " groups");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || (widened && (dtype == torch::kBFloat16 || dtype == torch::kHalf)),
              "ssd_scan_fused: x must be float32", widened ? ", bfloat16 or float16" : "", ", got ", dtype);
  check(x, "x (b, l, h, p)", {b, l, h, p}, rows_strided, dtype);
  check(dt, "dt (b, l, h)", {b, l, h});
  check(A, "A (h,)", {h});
  check(B, "B (b, l, g, n)", {b, l, g, n}, rows_strided, dtype);
  check(C, "C (b, l, g, n)", {b, l, g, n}, rows_strided, dtype);
  if (D.numel()) check(D, "D (h, p)", {h, p});
  return {b, l, h, p, g, n};
}

// The forward over all (sequence, head, block of rows) items; z may be empty (no gate). With
// save, also returns the checkpoints (b, ceil(l / chunk), h, p, n); without, chunk is ignored.
std::vector<torch::Tensor> ssd_forward(const torch::Tensor& x, const torch::Tensor& dt, const torch::Tensor& A,
                                       const torch::Tensor& B, const torch::Tensor& C, const torch::Tensor& D,
                                       const torch::Tensor& z, const torch::Tensor& state, int64_t chunk,
                                       bool save) {
  const auto s = check_inputs(x, dt, A, B, C, D, /*rows_strided=*/true, /*widened=*/true);
  const int64_t b = s[0], l = s[1], h = s[2], p = s[3], g = s[4], n = s[5];
  const auto dtype = x.scalar_type();
  if (z.numel()) check(z, "z (b, l, h, p)", {b, l, h, p}, true, dtype);
  check(state, "state (b, h, p, n)", {b, h, p, n});
  TORCH_CHECK(chunk >= 1, "ssd_scan_fused: chunk must be >= 1, got ", chunk);
  const int64_t chunks = save ? (l + chunk - 1) / chunk : 0;
  auto next = state.clone();
  auto y = torch::empty({b, l, h, p}, state.options());
#if defined(MAMBASTEP_AMX_SCAN)
  if (!save && dtype == at::kBFloat16 && l >= kTilesFrom && mambastep::amx::available()) {
    const bool gated = z.numel() > 0;
    const mambastep::amx::SsdBf16 scan{
        x.data_ptr<at::BFloat16>(), B.data_ptr<at::BFloat16>(), C.data_ptr<at::BFloat16>(),
        gated ? z.data_ptr<at::BFloat16>() : nullptr, dt.data_ptr<float>(), A.data_ptr<float>(),
        D.numel() ? D.data_ptr<float>() : nullptr, y.data_ptr<float>(), b, l, h, p, g, n,
        x.stride(0), x.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        gated ? z.stride(0) : 0, gated ? z.stride(1) : 0};
    mambastep::amx::ssd_scan_bf16(scan, next.data_ptr<float>());
    return {y, next};
  }
#endif
  auto ckpt = torch::empty({b, chunks, h, p, n}, state.options());
  float* ckpt_ptr = save ? ckpt.data_ptr<float>() : nullptr;
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
        float* item_ckpt = save ? ckpt_ptr + ((bi * chunks * h + hd) * p + i0) * n : nullptr;
        scan_rows(in, A.data_ptr<float>()[hd], D_ptr ? D_ptr + hd * p + i0 : nullptr,
                  next.data_ptr<float>() + ((bi * h + hd) * p + i0) * n,
                  y.data_ptr<float>() + (bi * l * h + hd) * p + i0, l, n, std::min(kRows, p - i0), item_ckpt,
                  h * p * n, chunk);
      }
    });
  });
  if (save) return {y, next, ckpt};
  return {y, next};
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
  return ssd_forward(x, dt, A, B, C, D, z, state, /*chunk=*/1, /*save=*/false);
}

// As ssd_scan_fused without the gate, and also returns the checkpoints for the backward: the
// state before every chunk of `chunk` tokens, (b, ceil(l / chunk), h, p, n).
std::vector<torch::Tensor> ssd_scan_fused_fwd(const torch::Tensor& x, const torch::Tensor& dt,
                                              const torch::Tensor& A, const torch::Tensor& B,
                                              const torch::Tensor& C, const torch::Tensor& D,
                                              const torch::Tensor& state, int64_t chunk) {
  return ssd_forward(x, dt, A, B, C, D, torch::Tensor(), state, chunk, /*save=*/true);
}

// The gradients of the scan given gy (b, l, h, p) = dL/dy and gh (b, h, p, n) = dL/d(final
// state), with ckpt and chunk from ssd_scan_fused_fwd; every tensor float32 and contiguous.
// Returns
//   dx (b, l, h, p); ddt (b, l, h); dA (b, h) per sequence; dB, dC (b, h, l, n) per head;
//   dD (b, h, p) per sequence; dstate (b, h, p, n).
// The partials are summed by the caller (dA, dD over the sequences; dB, dC over each group's
// heads), so no two threads ever write the same element.
std::vector<torch::Tensor> ssd_scan_fused_bwd(const torch::Tensor& x, const torch::Tensor& dt,
                                              const torch::Tensor& A, const torch::Tensor& B,
                                              const torch::Tensor& C, const torch::Tensor& D,
                                              const torch::Tensor& ckpt, const torch::Tensor& gy,
                                              const torch::Tensor& gh, int64_t chunk) {
  const auto s = check_inputs(x, dt, A, B, C, D, /*rows_strided=*/false, /*widened=*/false);
  const int64_t b = s[0], l = s[1], h = s[2], p = s[3], g = s[4], n = s[5];
  TORCH_CHECK(chunk >= 1, "ssd_scan_fused: chunk must be >= 1, got ", chunk);
  const int64_t chunks = (l + chunk - 1) / chunk;
  check(ckpt, "checkpoints (b, ceil(l / chunk), h, p, n)", {b, chunks, h, p, n});
  check(gy, "grad of y (b, l, h, p)", {b, l, h, p});
  check(gh, "grad of state (b, h, p, n)", {b, h, p, n});
  auto dx = torch::empty_like(x), ddt = torch::empty_like(dt);
  auto dA = torch::empty({b, h}, x.options()), dD = torch::empty({b, h, p}, x.options());
  auto dB = torch::empty({b, h, l, n}, x.options()), dC = torch::empty_like(dB);
  auto dstate = gh.clone();  // each head's gradient is gathered in place, from dL/d(final state)
  const int64_t heads_per_group = h / g;
  const float* D_ptr = D.numel() ? D.data_ptr<float>() : nullptr;
  at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bi = item / h, hd = item % h, group = hd / heads_per_group;
      const HeadBackward v{x.data_ptr<float>() + bi * l * h * p + hd * p,
                           dt.data_ptr<float>() + bi * l * h + hd,
                           B.data_ptr<float>() + bi * l * g * n + group * n,
                           C.data_ptr<float>() + bi * l * g * n + group * n,
                           gy.data_ptr<float>() + bi * l * h * p + hd * p,
                           dx.data_ptr<float>() + bi * l * h * p + hd * p,
                           ddt.data_ptr<float>() + bi * l * h + hd,
                           h * p, h, g * n};
      head_backward(v, A.data_ptr<float>()[hd], D_ptr ? D_ptr + hd * p : nullptr,
                    ckpt.data_ptr<float>() + (bi * chunks * h + hd) * p * n, h * p * n,
                    dstate.data_ptr<float>() + item * p * n, dB.data_ptr<float>() + item * l * n,
                    dC.data_ptr<float>() + item * l * n, dD.data_ptr<float>() + item * p,
                    dA.data_ptr<float>() + item, l, p, n, chunk);
    }
  });
  return {dx, ddt, dA, dB, dC, dD, dstate};
}

std::string cpu_kernels_isa();  // matvec.cpp

// The path the inference scan takes on this CPU, e.g. "bfloat16 from 64 tokens in chunks of 64
// on amx tiles, else avx512 token by token": what a benchmark records beside its figures.
std::string cpu_ssd_scan_path() {
  std::string path = cpu_kernels_isa() + " token by token";
#if defined(MAMBASTEP_AMX_SCAN)
  if (mambastep::amx::available())
    path = "bfloat16 from " + std::to_string(kTilesFrom) + " tokens in chunks of " +
           std::to_string(mambastep::amx::kScanChunk) + " on amx tiles, else " + path;
#endif
  return path;
}

TORCH_LIBRARY_IMPL(mambastep, CompositeExplicitAutograd, m) { m.impl("cpu_ssd_scan_path", &cpu_ssd_scan_path); }

TORCH_LIBRARY_IMPL(mambastep, CPU, m) {
  m.impl("ssd_scan", &ssd_scan_fused);
  m.impl("ssd_scan_fwd", &ssd_scan_fused_fwd);
  m.impl("ssd_scan_bwd", &ssd_scan_fused_bwd);
}
