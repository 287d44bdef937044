// Fused Mamba-1 selective scan for the CPU: forward and backward.
//
// One pass over the sequence per block of channels: the decay exp(dt A), the
// input dt B x, the state update and the read-out C . h are computed together,
// so nothing of size (l, e, n) is ever written to memory. Threads split the
// (batch, channel-block) pairs; within a block the state lives in registers/L1.
//
// Training: the forward can also save the state at the start of every chunk of
// `chunk` tokens (checkpoints, (b, ceil(l / chunk), e, n)). The backward walks
// the chunks in reverse: it recomputes the chunk's states forward from its
// checkpoint into a small buffer, then runs the reverse recurrence over the
// chunk. The previous state h_{t-1} is never recovered by dividing by the decay
// (which underflows to 0 for very negative dt A).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "vector_math.h"

namespace {

using mambastep::exp_inline;

constexpr int64_t kBlock = 16;  // channels per work item: one 512-bit vector of floats

// ---------------------------------------------------------------------------------------------
// State layout helpers. The global state is (e, n); a block's copy is (n, kBlock), channels
// innermost, lanes c >= w zero.

void load_state(const float* h, float* hb, int64_t n, int64_t e0, int64_t w) {
  std::fill(hb, hb + n * kBlock, 0.f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < w; ++c) hb[j * kBlock + c] = h[(e0 + c) * n + j];
}

void store_state(const float* hb, float* h, int64_t n, int64_t e0, int64_t w) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < w; ++c) h[(e0 + c) * n + j] = hb[j * kBlock + c];
}

// ---------------------------------------------------------------------------------------------
// Forward.

// One sequence's inputs, each pointer at token 0, channel 0: token t's row of x is at
// x + t * x_stride, and so on; within a row the channels (or states) are contiguous. T is
// float, or bfloat16 or half, widened as they are read.
template <typename T>
struct SequenceInputs {
  const T* x;
  const T* dt;  // Δ, or its pre-activation when dt_softplus
  const T* B;
  const T* C;
  const T* z;  // the gate's input, or null: y = (C . h + D x) SiLU(z)
  int64_t x_stride, dt_stride, B_stride, C_stride, z_stride;
  bool dt_softplus;  // Δ = softplus(dt)
};

// Advance the block state hb (n, kBlock) over tokens [t0, t1), writing y (l, e) for those tokens.
// The innermost loop runs over channels, so it vectorises without horizontal sums.
// AT is A transposed: (n, e).
template <typename T>
void scan_tokens(const SequenceInputs<T>& in, const float* AT, const float* D, float* hb, float* y,
                 int64_t t0, int64_t t1, int64_t e, int64_t n, int64_t e0, int64_t w) {
  using mambastep::widen;
  float acc[kBlock], d[kBlock], xv[kBlock], dx[kBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const T* x_t = in.x + t * in.x_stride + e0;
    const T* dt_t = in.dt + t * in.dt_stride + e0;
    const T* B_t = in.B + t * in.B_stride;
    const T* C_t = in.C + t * in.C_stride;
    if (in.dt_softplus) {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) d[c] = mambastep::softplus_inline(widen(dt_t[c]));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) d[c] = widen(dt_t[c]);
    }
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      xv[c] = widen(x_t[c]);
      dx[c] = d[c] * xv[c];
      acc[c] = 0.f;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float b_tj = widen(B_t[j]), c_tj = widen(C_t[j]);
      const float* A_j = AT + j * e + e0;
      float* h_j = hb + j * kBlock;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) {
        const float hj = exp_inline(d[c] * A_j[c]) * h_j[c] + dx[c] * b_tj;
        h_j[c] = hj;
        acc[c] += hj * c_tj;
      }
    }
    float* y_t = y + t * e + e0;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) y_t[c] = acc[c] + (D ? D[e0 + c] * xv[c] : 0.f);
    if (in.z) {
      const T* z_t = in.z + t * in.z_stride + e0;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) y_t[c] *= mambastep::silu_inline(widen(z_t[c]));
    }
  }
}

// Scan channels [e0, e0 + w) of one sequence, w <= kBlock; h (e, n) is the starting state on
// entry and the final state on exit. With ckpt (ceil(l / chunk), e, n) non-null, the state
// before each chunk of `chunk` tokens is saved there.
template <typename T>
void scan_block(const SequenceInputs<T>& in, const float* AT, const float* D, float* h, float* y,
                float* ckpt, int64_t l, int64_t e, int64_t n, int64_t e0, int64_t w, int64_t chunk) {
  std::vector<float> hb(n * kBlock);  // (n, kBlock): this block's state
  load_state(h, hb.data(), n, e0, w);
  for (int64_t t0 = 0; t0 < l; t0 += chunk) {
    if (ckpt) store_state(hb.data(), ckpt + (t0 / chunk) * e * n, n, e0, w);
    scan_tokens(in, AT, D, hb.data(), y, t0, std::min(t0 + chunk, l), e, n, e0, w);
  }
  store_state(hb.data(), h, n, e0, w);
}

// ---------------------------------------------------------------------------------------------
// Backward. Inside it every per-channel array is padded to kBlock lanes with zeros (x, dt, gy,
// A, the states), so the channel loops have a constant trip count; a padded lane has decay
// exp(0) = 1, zero input and zero gradient, so it contributes nothing to any sum.

// Per-token channel values of this block, zero-padded: (kBlock,) each.
struct TokenLanes {
  float x[kBlock], dt[kBlock], gy[kBlock];
};

void load_lanes(const float* src, float* dst, int64_t w) {
  for (int64_t c = 0; c < kBlock; ++c) dst[c] = c < w ? src[c] : 0.f;
}

// Recompute the states of tokens [t0, t1) from hs[0] (the checkpoint, h_{t0-1}):
// hs (t1 - t0 + 1, n, kBlock), hs[i + 1] = h after token t0 + i. Ab is A as (n, kBlock).
void recompute_chunk(const float* x, const float* dt, const float* Ab, const float* B, float* hs,
                     int64_t t0, int64_t t1, int64_t e, int64_t n, int64_t e0, int64_t w) {
  float d[kBlock], xv[kBlock], dx[kBlock];
  for (int64_t t = t0; t < t1; ++t) {
    load_lanes(dt + t * e + e0, d, w);
    load_lanes(x + t * e + e0, xv, w);
#pragma omp simd
    for (int64_t c = 0; c < kBlock; ++c) dx[c] = d[c] * xv[c];
    const float* h_prev = hs + (t - t0) * n * kBlock;
    float* h_next = hs + (t - t0 + 1) * n * kBlock;
    for (int64_t j = 0; j < n; ++j) {
      const float b_tj = B[t * n + j];
#pragma omp simd
      for (int64_t c = 0; c < kBlock; ++c)
        h_next[j * kBlock + c] = exp_inline(d[c] * Ab[j * kBlock + c]) * h_prev[j * kBlock + c] + dx[c] * b_tj;
    }
  }
}

// Outputs of one work item of the backward, already offset to (batch bi, block starting at e0):
// dx, ddt point at (l, e) (write lanes [e0, e0 + w) of each token); dB, dC at this item's
// partial (l, n), summed over the block's channels.
struct BlockGrads {
  float* dx;
  float* ddt;
  float* dB;
  float* dC;
};

// One token t of the reverse recurrence, per state j and channel c, with g the gradient
// dL/dh_t excluding this token's read-out on entry (= a_{t+1} g_{t+1}, or dL/d(final state)):
//   g_t      = g + C_t[j] gy_t[c]
//   dC_t[j] += gy_t[c] h_t[c, j]                    dB_t[j] += g_t dt_t[c] x_t[c]
//   dx_t[c] += g_t dt_t[c] B_t[j]                   dA[c, j] += g_t dt_t[c] a_t h_{t-1}
//   ddt_t[c] += g_t (A[c, j] a_t h_{t-1} + B_t[j] x_t[c])
// and on exit g = a_t g_t, the gradient passed on to h_{t-1}. dx and ddt share the factor
// sum_j g_t B_t[j]; the D x skip's gradients are added by the caller.
// h_prev, h_cur: (n, kBlock) = h_{t-1}, h_t. g, dA: (n, kBlock). sgB, sAgah: (kBlock,) outputs.
void reverse_token(const TokenLanes& v, const float* Ab, const float* B_t, const float* C_t,
                   const float* h_prev, const float* h_cur, float* g, float* dA, float* dB_t,
                   float* dC_t, float* sgB, float* sAgah, int64_t n) {
  float dtx[kBlock];
#pragma omp simd
  for (int64_t c = 0; c < kBlock; ++c) {
    dtx[c] = v.dt[c] * v.x[c];
    sgB[c] = 0.f;
    sAgah[c] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float b_tj = B_t[j], c_tj = C_t[j];
    const float* A_j = Ab + j * kBlock;
    const float* hp_j = h_prev + j * kBlock;
    const float* hc_j = h_cur + j * kBlock;
    float* g_j = g + j * kBlock;
    float* dA_j = dA + j * kBlock;
    float sum_b = 0.f, sum_c = 0.f;
#pragma omp simd reduction(+ : sum_b, sum_c)
    for (int64_t c = 0; c < kBlock; ++c) {
      sum_c += v.gy[c] * hc_j[c];
      const float g_t = g_j[c] + c_tj * v.gy[c];
      const float a_t = exp_inline(v.dt[c] * A_j[c]);
      const float gah = g_t * a_t * hp_j[c];  // g_t a_t h_{t-1}: the gradient through exp(dt A)
      dA_j[c] += gah * v.dt[c];
      sAgah[c] += A_j[c] * gah;
      sgB[c] += g_t * b_tj;
      sum_b += g_t * dtx[c];
      g_j[c] = a_t * g_t;
    }
    dB_t[j] = sum_b;
    dC_t[j] = sum_c;
  }
}

// Backward of scan_block for channels [e0, e0 + w) of one sequence.
// Inputs: x, dt, gy (l, e); AT (n, e); B, C (l, n); D (e,) or null; ckpt (ceil(l / chunk), e, n);
// gh (e, n) the gradient of the final state. Outputs: grads (see BlockGrads); dA (e, n) and
// dD (e,) this sequence's partials; dh0 (e, n) the gradient of the starting state.
void scan_block_backward(const float* x, const float* dt, const float* AT, const float* B,
                         const float* C, const float* D, const float* ckpt, const float* gy,
                         const float* gh, const BlockGrads& grads, float* dA, float* dD, float* dh0,
                         int64_t l, int64_t e, int64_t n, int64_t e0, int64_t w, int64_t chunk) {
  const int64_t nb = n * kBlock;
  std::vector<float> Ab(nb, 0.f);  // (n, kBlock): A of this block
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < w; ++c) Ab[j * kBlock + c] = AT[j * e + e0 + c];
  std::vector<float> hs((chunk + 1) * nb);  // (chunk + 1, n, kBlock): one chunk's states
  std::vector<float> g(nb), dAb(nb, 0.f);   // (n, kBlock): running dL/dh, dA accumulator
  load_state(gh, g.data(), n, e0, w);
  float dDb[kBlock] = {0.f}, sgB[kBlock], sAgah[kBlock];
  TokenLanes v;
  const int64_t chunks = (l + chunk - 1) / chunk;
  for (int64_t k = chunks - 1; k >= 0; --k) {
    const int64_t t0 = k * chunk, t1 = std::min(t0 + chunk, l);
    load_state(ckpt + k * e * n, hs.data(), n, e0, w);
    recompute_chunk(x, dt, Ab.data(), B, hs.data(), t0, t1, e, n, e0, w);
    for (int64_t t = t1 - 1; t >= t0; --t) {
      load_lanes(x + t * e + e0, v.x, w);
      load_lanes(dt + t * e + e0, v.dt, w);
      load_lanes(gy + t * e + e0, v.gy, w);
      const float* h_prev = hs.data() + (t - t0) * nb;
      reverse_token(v, Ab.data(), B + t * n, C + t * n, h_prev, h_prev + nb, g.data(), dAb.data(),
                    grads.dB + t * n, grads.dC + t * n, sgB, sAgah, n);
      float* dx_t = grads.dx + t * e + e0;
      float* ddt_t = grads.ddt + t * e + e0;
      for (int64_t c = 0; c < w; ++c) {
        dx_t[c] = v.dt[c] * sgB[c] + (D ? D[e0 + c] * v.gy[c] : 0.f);
        ddt_t[c] = sAgah[c] + v.x[c] * sgB[c];
        dDb[c] += v.gy[c] * v.x[c];
      }
    }
  }
  store_state(dAb.data(), dA, n, e0, w);
  store_state(g.data(), dh0, n, e0, w);  // g = a_1 g_1 after the first token
  for (int64_t c = 0; c < w; ++c) dD[e0 + c] = dDb[c];
}

// ---------------------------------------------------------------------------------------------
// Argument checks.

// A CPU tensor of `dtype` and `dim` dimensions: contiguous, or, where rows may be strided, with
// unit stride over its last dimension (channels or states).
void check_tensor(const torch::Tensor& t, const char* name, int64_t dim, torch::ScalarType dtype,
                  bool rows_strided = false) {
  TORCH_CHECK(t.device().is_cpu(), "selective_scan_fused: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "selective_scan_fused: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "selective_scan_fused: ", name, " must have ", dim,
              " dimensions, got shape ", t.sizes());
  TORCH_CHECK(rows_strided ? t.stride(dim - 1) == 1 : t.is_contiguous(), "selective_scan_fused: ", name,
              rows_strided ? " must have a unit stride over its last dimension" : " must be contiguous");
}

void check_f32(const torch::Tensor& t, const char* name, int64_t dim, bool rows_strided = false) {
  check_tensor(t, name, dim, torch::kFloat32, rows_strided);
}

void check_shape(const torch::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "selective_scan_fused: ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

// Checks the scan's inputs; D may be empty (no skip); x, dt, B and C, all of x's dtype (float32
// unless `widened`: then also bfloat16 or half), may have strided rows when rows_strided.
// Returns (b, l, e, n).
std::vector<int64_t> check_inputs(const torch::Tensor& x, const torch::Tensor& dt,
                                  const torch::Tensor& A, const torch::Tensor& B,
                                  const torch::Tensor& C, const torch::Tensor& D,
                                  bool rows_strided, bool widened = false) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || (widened && (dtype == torch::kBFloat16 || dtype == torch::kHalf)),
              "selective_scan_fused: x must be float32", widened ? ", bfloat16 or float16" : "", ", got ",
              dtype);
  check_tensor(x, "x", 3, dtype, rows_strided);
  check_f32(A, "A", 2);
  const int64_t b = x.size(0), l = x.size(1), e = x.size(2), n = A.size(1);
  check_tensor(dt, "dt", 3, dtype, rows_strided);
  check_tensor(B, "B", 3, dtype, rows_strided);
  check_tensor(C, "C", 3, dtype, rows_strided);
  check_shape(dt, "dt (like x)", {b, l, e});
  check_shape(A, "A (e, n)", {e, n});
  check_shape(B, "B (b, l, n)", {b, l, n});
  check_shape(C, "C (b, l, n)", {b, l, n});
  if (D.numel()) {
    check_f32(D, "D", 1);
    check_shape(D, "D (e,)", {e});
  }
  return {b, l, e, n};
}

// Forward over all (batch, channel-block) items; z may be empty (no gate). With save, also
// returns the checkpoints (b, ceil(l / chunk), e, n); without, chunk is ignored and the
// sequence is one chunk.
std::vector<torch::Tensor> scan_forward(const torch::Tensor& x, const torch::Tensor& dt,
                                        const torch::Tensor& A, const torch::Tensor& B,
                                        const torch::Tensor& C, const torch::Tensor& D,
                                        const torch::Tensor& z, const torch::Tensor& state,
                                        bool dt_softplus, int64_t chunk, bool save) {
  const auto s = check_inputs(x, dt, A, B, C, D, /*rows_strided=*/true, /*widened=*/!save);
  const int64_t b = s[0], l = s[1], e = s[2], n = s[3];
  check_f32(state, "state", 3);
  check_shape(state, "state (b, e, n)", {b, e, n});
  if (z.numel()) {
    check_tensor(z, "z", 3, x.scalar_type(), /*rows_strided=*/true);
    check_shape(z, "z (like x)", {b, l, e});
  }
  TORCH_CHECK(chunk >= 1, "selective_scan_fused: chunk must be >= 1, got ", chunk);
  if (!save) chunk = std::max<int64_t>(l, 1);
  const int64_t chunks = (l + chunk - 1) / chunk;
  auto h = state.clone();
  auto y = torch::empty({b, l, e}, state.options());
  auto ckpt = save ? torch::empty({b, chunks, e, n}, state.options()) : torch::Tensor();
  float* ckpt_ptr = save ? ckpt.data_ptr<float>() : nullptr;
  const float* D_ptr = D.numel() ? D.data_ptr<float>() : nullptr;
  const int64_t blocks = (e + kBlock - 1) / kBlock;
  auto AT = A.t().contiguous();  // (n, e)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "selective_scan", [&] {
    const scalar_t* z_ptr = z.numel() ? z.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, b * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / blocks, e0 = (item % blocks) * kBlock;
        const SequenceInputs<scalar_t> in{x.data_ptr<scalar_t>() + bi * x.stride(0),
                                          dt.data_ptr<scalar_t>() + bi * dt.stride(0),
                                          B.data_ptr<scalar_t>() + bi * B.stride(0),
                                          C.data_ptr<scalar_t>() + bi * C.stride(0),
                                          z_ptr ? z_ptr + bi * z.stride(0) : nullptr,
                                          x.stride(1), dt.stride(1), B.stride(1), C.stride(1),
                                          z_ptr ? z.stride(1) : 0, dt_softplus};
        scan_block(in, AT.data_ptr<float>(), D_ptr, h.data_ptr<float>() + bi * e * n,
                   y.data_ptr<float>() + bi * l * e, save ? ckpt_ptr + bi * chunks * e * n : nullptr,
                   l, e, n, e0, std::min(kBlock, e - e0), chunk);
      }
    });
  });
  if (save) return {y, h, ckpt};
  return {y, h};
}

}  // namespace

// Inference. x, dt: (b, l, e); A: (e, n); B, C: (b, l, n); D: (e,) or empty; z: (b, l, e) or
// empty; state: (b, e, n). x, dt, B, C and z of one dtype, float32, bfloat16 or float16, with
// rows at any stride, channels (states) contiguous; A, D and state float32 and contiguous.
// With dt_softplus, Δ = softplus(dt); with z, y = (C . h + D x) SiLU(z). Returns y (b, l, e) and
// the final state (b, e, n), both float32.
std::vector<torch::Tensor> selective_scan_fused(torch::Tensor x, torch::Tensor dt, torch::Tensor A,
                                                torch::Tensor B, torch::Tensor C, torch::Tensor D,
                                                torch::Tensor z, torch::Tensor state,
                                                bool dt_softplus) {
  return scan_forward(x, dt, A, B, C, D, z, state, dt_softplus, /*chunk=*/1, /*save=*/false);
}

// As selective_scan_fused without softplus or gate, and also returns the checkpoints for the
// backward: the state before every chunk of `chunk` tokens, (b, ceil(l / chunk), e, n).
std::vector<torch::Tensor> selective_scan_fused_fwd(torch::Tensor x, torch::Tensor dt,
                                                    torch::Tensor A, torch::Tensor B,
                                                    torch::Tensor C, torch::Tensor D,
                                                    torch::Tensor state, int64_t chunk) {
  return scan_forward(x, dt, A, B, C, D, torch::Tensor(), state, /*dt_softplus=*/false, chunk, true);
}

// The gradients of the scan given gy (b, l, e) = dL/dy and gh (b, e, n) = dL/d(final state),
// with ckpt and chunk from selective_scan_fused_fwd. Returns
//   dx, ddt (b, l, e); dA (b, e, n) per sequence; dB, dC (b, blocks, l, n) per channel block;
//   dD (b, e) per sequence; dstate (b, e, n).
// The partials are summed by the caller (over dim 0 for dA, dD; dim 1 for dB, dC), so no two
// threads ever write the same element.
std::vector<torch::Tensor> selective_scan_fused_bwd(torch::Tensor x, torch::Tensor dt,
                                                    torch::Tensor A, torch::Tensor B,
                                                    torch::Tensor C, torch::Tensor D,
                                                    torch::Tensor ckpt, torch::Tensor gy,
                                                    torch::Tensor gh, int64_t chunk) {
  const auto s = check_inputs(x, dt, A, B, C, D, /*rows_strided=*/false);
  const int64_t b = s[0], l = s[1], e = s[2], n = s[3];
  TORCH_CHECK(chunk >= 1, "selective_scan_fused: chunk must be >= 1, got ", chunk);
  const int64_t chunks = (l + chunk - 1) / chunk, blocks = (e + kBlock - 1) / kBlock;
  check_f32(ckpt, "checkpoints", 4);
  check_shape(ckpt, "checkpoints (b, ceil(l / chunk), e, n)", {b, chunks, e, n});
  check_f32(gy, "grad of y", 3);
  check_shape(gy, "grad of y (b, l, e)", {b, l, e});
  check_f32(gh, "grad of state", 3);
  check_shape(gh, "grad of state (b, e, n)", {b, e, n});
  auto dx = torch::empty_like(x), ddt = torch::empty_like(dt);
  auto dA = torch::empty({b, e, n}, x.options()), dD = torch::empty({b, e}, x.options());
  auto dB = torch::empty({b, blocks, l, n}, x.options()), dC = torch::empty_like(dB);
  auto dh0 = torch::empty({b, e, n}, x.options());
  const float* D_ptr = D.numel() ? D.data_ptr<float>() : nullptr;
  auto AT = A.t().contiguous();  // (n, e)
  at::parallel_for(0, b * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bi = item / blocks, blk = item % blocks, e0 = blk * kBlock;
      const BlockGrads grads{dx.data_ptr<float>() + bi * l * e, ddt.data_ptr<float>() + bi * l * e,
                             dB.data_ptr<float>() + item * l * n,
                             dC.data_ptr<float>() + item * l * n};
      scan_block_backward(
          x.data_ptr<float>() + bi * l * e, dt.data_ptr<float>() + bi * l * e,
          AT.data_ptr<float>(), B.data_ptr<float>() + bi * l * n, C.data_ptr<float>() + bi * l * n,
          D_ptr, ckpt.data_ptr<float>() + bi * chunks * e * n, gy.data_ptr<float>() + bi * l * e,
          gh.data_ptr<float>() + bi * e * n, grads, dA.data_ptr<float>() + bi * e * n,
          dD.data_ptr<float>() + bi * e, dh0.data_ptr<float>() + bi * e * n, l, e, n, e0,
          std::min(kBlock, e - e0), chunk);
    }
  });
  return {dx, ddt, dA, dB, dC, dD, dh0};
}

TORCH_LIBRARY_IMPL(mambastep, CPU, m) {
  m.impl("selective_scan", &selective_scan_fused);
  m.impl("selective_scan_fwd", &selective_scan_fused_fwd);
  m.impl("selective_scan_bwd", &selective_scan_fused_bwd);
}
