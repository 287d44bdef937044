// The causal depthwise conv over a prompt, then SiLU, in one pass for the CPU, and its backward:
//
//   y[t, c] = SiLU(bias[c] + sum_i w[c, i] window[t + i, c]),   window = [state; x]  (k - 1 + l rows)
//
// x is read where it lies (a slice of the in_proj output: rows of any stride, channels
// contiguous), and y is written contiguous, the layout the scan and the next product read.
// float32, bfloat16 or float16 inputs; the sums are float32, y is rounded to x's dtype once.
// PyTorch's path (concatenate the state, transpose, conv1d, transpose back, SiLU, copy to
// contiguous) moves the (l, c) activations five or six times, and its backward as often again.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int64_t kTokens = 32;  // tokens per work item: their rows stay in cache for the k taps

void check(const torch::Tensor& t, const char* name, int64_t dim, c10::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, "causal_conv_silu: ", name, " must be a ",
              dtype, " CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == dim, "causal_conv_silu: ", name, " must have ", dim, " dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(t.stride(dim - 1) == 1, "causal_conv_silu: ", name, " must have contiguous channels");
}

// acc[ch] += sum_i w[i * w_stride + ch] window_row(t + i)[ch] for ch < width: the conv of
// output t over its k window rows, added to what acc holds (the bias).
template <typename T, typename Rows>
inline void add_taps(float* acc, const float* w, int64_t w_stride, const Rows& window_row, int64_t t, int64_t k,
                     int64_t width) {
  for (int64_t i = 0; i < k; ++i) {  // output t reads window rows t .. t + k - 1
    const T* row = window_row(t + i);
    const float* w_i = w + i * w_stride;
#pragma omp simd
    for (int64_t ch = 0; ch < width; ++ch) acc[ch] += w_i[ch] * mambastep::widen(row[ch]);
  }
}

template <typename T>
void conv_silu(const T* xp, const T* sp, const float* w, const float* bp, T* yp, T* np, int64_t b,
               int64_t l, int64_t c, int64_t k, int64_t xs0, int64_t xs1, int64_t ss0, int64_t ss1) {
  // Row r of sequence bi's window: the state's rows first, then x's.
  auto window_row = [&](int64_t bi, int64_t r) {
    return r < k - 1 ? sp + bi * ss0 + r * ss1 : xp + bi * xs0 + (r - (k - 1)) * xs1;
  };
  const int64_t tiles = (l + kTokens - 1) / kTokens;
  at::parallel_for(0, b * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(c);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bi = item / tiles, t0 = (item % tiles) * kTokens, t1 = std::min(t0 + kTokens, l);
      for (int64_t t = t0; t < t1; ++t) {
        std::copy(bp, bp + c, acc.begin());
        add_taps<T>(acc.data(), w, c, [&](int64_t r) { return window_row(bi, r); }, t, k, c);
        T* y_t = yp + (bi * l + t) * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) y_t[ch] = mambastep::narrow<T>(mambastep::silu_inline(acc[ch]));
      }
    }
  });
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t r = 0; r < k - 1; ++r) {  // window rows l .. l + k - 2
      const T* row = window_row(bi, l + r);
      std::copy(row, row + c, np + (bi * (k - 1) + r) * c);
    }
}

// The backward of conv_silu for channels [c0, c0 + width) of sequence bi, width <= kChannels: with
// s = sigmoid(pre), the gradient of the conv's output is gpre[t] = gy[t] s (1 + pre (1 - s)),
// and then
//   dwindow[r] = sum_i w[i] gpre[r - i] (0 <= r - i < l)   (+ gnext[r - l] for the rows the
//   next state copies),  dw[i] += gpre[t] window[t + i],  dbias += gpre[t].
// gpre lives in a ring of the last k rows, so x, gy and the outputs are each passed over once.
// dx (l, c) and dstate (k - 1, c) rows of sequence bi (contiguous); dw (k, c) and db (c,) this
// sequence's partials.
constexpr int64_t kChannels = 64;

template <typename T>
void conv_silu_backward(const T* xp, const T* sp, const T* gp, const T* gnp, const float* w, const float* bp,
                        T* dxp, T* dsp, float* dw, float* db, int64_t bi, int64_t l, int64_t c, int64_t k,
                        int64_t xs0, int64_t xs1, int64_t c0, int64_t width) {
  auto window_row = [&](int64_t r) {
    return r < k - 1 ? sp + (bi * (k - 1) + r) * c + c0 : xp + bi * xs0 + (r - (k - 1)) * xs1 + c0;
  };
  std::vector<float> ring(k * kChannels, 0.f);  // gpre of tokens t - k + 1 .. t, row t % k
  std::vector<float> dw_acc(k * kChannels, 0.f);  // (k, kChannels)
  float db_acc[kChannels] = {}, acc[kChannels];
  // Window row r's gradient, from the ring holding gpre[r - k + 1 .. r] (those in [0, l)).
  auto window_grad = [&](int64_t r, float* out) {
    std::fill(out, out + kChannels, 0.f);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t t = r - i;
      if (t < 0 || t >= l) continue;
      const float* g_t = ring.data() + (t % k) * kChannels;
      const float* w_i = w + i * c + c0;
#pragma omp simd
      for (int64_t ch = 0; ch < width; ++ch) out[ch] += w_i[ch] * g_t[ch];
    }
  };
  auto store = [&](T* dst, const float* src) {
#pragma omp simd
    for (int64_t ch = 0; ch < width; ++ch) dst[ch] = mambastep::narrow<T>(src[ch]);
  };
  for (int64_t t = 0; t < l + k - 1; ++t) {
    if (t < l) {  // gpre[t], from window rows t .. t + k - 1
      std::copy(bp + c0, bp + c0 + width, acc);
      add_taps<T>(acc, w + c0, c, window_row, t, k, width);
      const T* gy = gp + (bi * l + t) * c + c0;
      float* g_t = ring.data() + (t % k) * kChannels;
#pragma omp simd
      for (int64_t ch = 0; ch < width; ++ch) {
        const float pre = acc[ch], sig = 1.f / (1.f + mambastep::exp_inline(-pre));
        g_t[ch] = mambastep::widen(gy[ch]) * sig * (1.f + pre * (1.f - sig));
        db_acc[ch] += g_t[ch];
      }
      for (int64_t i = 0; i < k; ++i) {
        const T* row = window_row(t + i);
        float* dw_i = dw_acc.data() + i * kChannels;
#pragma omp simd
        for (int64_t ch = 0; ch < width; ++ch) dw_i[ch] += g_t[ch] * mambastep::widen(row[ch]);
      }
    }
    // Window row t is complete once gpre[t] is known (it reads gpre[t - k + 1 .. t]).
    window_grad(t, acc);
    if (t >= l) {  // a row the next state copies: its gradient arrives from there too
      const T* gn = gnp + (bi * (k - 1) + t - l) * c + c0;
#pragma omp simd
      for (int64_t ch = 0; ch < width; ++ch) acc[ch] += mambastep::widen(gn[ch]);
    }
    store(t < k - 1 ? dsp + (bi * (k - 1) + t) * c + c0 : dxp + (bi * l + t - (k - 1)) * c + c0, acc);
  }
  for (int64_t i = 0; i < k; ++i) {
    const float* dw_i = dw_acc.data() + i * kChannels;
    std::copy(dw_i, dw_i + width, dw + i * c + c0);
  }
  std::copy(db_acc, db_acc + width, db + c0);
}

// Checks the conv's inputs (bias may be empty) and returns (b, l, c, k).
std::vector<int64_t> check_inputs(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                  const torch::Tensor& state) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "causal_conv_silu: x must be float32, bfloat16 or float16, got ", dtype);
  check(x, "x", 3, dtype);
  check(weight, "weight", 2, torch::kFloat32);
  check(state, "state", 3, dtype);
  const int64_t b = x.size(0), l = x.size(1), c = x.size(2), k = weight.size(1);
  TORCH_CHECK(weight.size(0) == c && k >= 1, "causal_conv_silu: weight must be (", c, ", k), got ",
              weight.sizes());
  TORCH_CHECK(state.sizes() == c10::IntArrayRef({b, k - 1, c}), "causal_conv_silu: state must be (", b,
              ", ", k - 1, ", ", c, "), got ", state.sizes());
  if (bias.numel()) {
    check(bias, "bias", 1, torch::kFloat32);
    TORCH_CHECK(bias.size(0) == c, "causal_conv_silu: bias must be (", c, ",), got ", bias.sizes());
  }
  return {b, l, c, k};
}

}  // namespace

// x: (b, l, c), channels contiguous, rows at any stride; weight: (c, k) float32; bias: (c,)
// float32 or empty; state: (b, k - 1, c), the k - 1 inputs before x, oldest first, in x's
// dtype (float32, bfloat16 or float16). Returns SiLU(conv) (b, l, c) contiguous and the next
// state (b, k - 1, c): the last k - 1 rows of the window, both in x's dtype.
std::vector<torch::Tensor> causal_conv_silu(const torch::Tensor& x, const torch::Tensor& weight,
                                            const torch::Tensor& bias, const torch::Tensor& state) {
  const auto s = check_inputs(x, weight, bias, state);
  const int64_t b = s[0], l = s[1], c = s[2], k = s[3];
  const auto dtype = x.scalar_type();
  auto y = torch::empty({b, l, c}, x.options().memory_format(at::MemoryFormat::Contiguous));
  auto next = torch::empty_like(state, at::MemoryFormat::Contiguous);
  auto wt = weight.t().contiguous();  // (k, c): tap i's weights contiguous over channels
  auto bias_or_zeros = bias.numel() ? bias.contiguous() : torch::zeros({c}, weight.options());
  const float* w = wt.data_ptr<float>();
  const float* bp = bias_or_zeros.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "causal_conv_silu", [&] {
    conv_silu<scalar_t>(x.data_ptr<scalar_t>(), state.data_ptr<scalar_t>(), w, bp,
                        y.data_ptr<scalar_t>(), next.data_ptr<scalar_t>(), b, l, c, k, x.stride(0),
                        x.stride(1), state.stride(0), state.stride(1));
  });
  return {y, next};
}

// The gradients of causal_conv_silu given gy (b, l, c) = dL/dy and gnext (b, k - 1, c) =
// dL/d(next state), both in x's dtype and contiguous; x, weight, bias and state as there.
// Returns dx (b, l, c) and dstate (b, k - 1, c) in x's dtype, and this sequence's partials
// dweight (b, k, c) and dbias (b, c) in float32, summed over the sequences by the caller.
std::vector<torch::Tensor> causal_conv_silu_backward(const torch::Tensor& x, const torch::Tensor& weight,
                                                     const torch::Tensor& bias, const torch::Tensor& state,
                                                     const torch::Tensor& gy, const torch::Tensor& gnext) {
  const auto s = check_inputs(x, weight, bias, state);
  const int64_t b = s[0], l = s[1], c = s[2], k = s[3];
  const auto dtype = x.scalar_type();
  TORCH_CHECK(state.is_contiguous(), "causal_conv_silu: the state must be contiguous for the backward");
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.scalar_type() == dtype && gy.is_contiguous(),
              "causal_conv_silu: the gradient of y must be contiguous, like x");
  TORCH_CHECK(gnext.sizes() == state.sizes() && gnext.scalar_type() == dtype && gnext.is_contiguous(),
              "causal_conv_silu: the gradient of the next state must be contiguous, like the state");
  auto dx = torch::empty({b, l, c}, x.options().memory_format(at::MemoryFormat::Contiguous));
  auto dstate = torch::empty_like(state, at::MemoryFormat::Contiguous);
  auto dweight = torch::empty({b, k, c}, weight.options()), dbias = torch::empty({b, c}, weight.options());
  auto wt = weight.t().contiguous();  // (k, c)
  auto bias_or_zeros = bias.numel() ? bias.contiguous() : torch::zeros({c}, weight.options());
  const int64_t blocks = (c + kChannels - 1) / kChannels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "causal_conv_silu_backward", [&] {
    at::parallel_for(0, b * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / blocks, c0 = (item % blocks) * kChannels;
        conv_silu_backward<scalar_t>(x.data_ptr<scalar_t>(), state.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
                                     gnext.data_ptr<scalar_t>(), wt.data_ptr<float>(),
                                     bias_or_zeros.data_ptr<float>(), dx.data_ptr<scalar_t>(),
                                     dstate.data_ptr<scalar_t>(), dweight.data_ptr<float>() + bi * k * c,
                                     dbias.data_ptr<float>() + bi * c, bi, l, c, k, x.stride(0), x.stride(1), c0,
                                     std::min(kChannels, c - c0));
      }
    });
  });
  return {dx, dstate, dweight, dbias};
}

TORCH_LIBRARY_IMPL(mambastep, CPU, m) {
  m.impl("causal_conv_silu", &causal_conv_silu);
  m.impl("causal_conv_silu_backward", &causal_conv_silu_backward);
}
