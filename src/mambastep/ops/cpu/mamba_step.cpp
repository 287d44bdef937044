// One decode step of a whole Mamba-1 model's stack of layers in one call: for each layer,
// RMSNorm, in_proj, causal conv step, SiLU, x_proj, dt_proj, softplus, selective state update,
// gate, out_proj and the residual add.
//
// The four products of a layer go through the matvec kernel (matvec.cpp), so the weights keep
// their storage (float32, bfloat16 or int8 with a scale per row); everything between them is
// a pass over the channels. The residual stream, activations, conv window and SSM state are
// float32 here. An eager decode step made of ~35 small operators per layer spends as much time
// calling them as computing; this makes it one call per step. Eager steps use it; inside
// torch.compile the model's own operations are traced instead.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <math.h>
#include <algorithm>
#include <array>
#include <vector>

torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& weight,
                     const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& bias);

namespace {

constexpr int64_t kChannelGrain = 256;  // channels per task in the elementwise passes

inline float silu(float v) { return v / (1.f + expf(-v)); }
inline float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }  // as F.softplus

// `t` as contiguous float32 (itself when it already is), checked to have `shape`.
torch::Tensor f32(const torch::Tensor& t, const char* name, c10::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "mamba_layers_step: ", name, " must have shape ", shape,
              ", got ", t.sizes());
  return t.to(torch::kFloat32).contiguous();
}

bool present(const c10::optional<torch::Tensor>& t) { return t.has_value() && t->defined(); }

// An optional (e,) vector as float32, or zeros where it is missing: the channel loops stay branch-free.
torch::Tensor vector_or_zeros(const c10::optional<torch::Tensor>& t, const char* name, int64_t e) {
  return present(t) ? f32(*t, name, {e}) : torch::zeros({e}, torch::kFloat32);
}

// A bias for matvec: float32 where given.
c10::optional<torch::Tensor> opt_f32(const c10::optional<torch::Tensor>& t) {
  if (!present(t)) return c10::nullopt;
  return t->to(torch::kFloat32).contiguous();
}

// One layer's parameters, in the order of the flat list the operator takes.
enum Param {
  kNorm, kInW, kInScale, kInBias, kConvW, kConvB, kXW, kXScale, kDtW, kDtScale, kDtB, kALog, kD,
  kOutW, kOutScale, kOutBias, kParamsPerLayer
};

// (b, d) -> (b, d): x / sqrt(mean(x^2) + eps) * weight, row by row.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t b = x.size(0), d = x.size(1);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < b; ++r) {
    float sq = 0.f;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < d; ++i) sq += xp[r * d + i] * xp[r * d + i];
    const float inv = 1.f / sqrtf(sq / d + static_cast<float>(eps));
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yp[r * d + i] = xp[r * d + i] * inv * w[i];
  }
  return y;
}

// One layer's entries of the operator's flat parameter list.
class LayerParams {
 public:
  LayerParams(const c10::List<c10::optional<torch::Tensor>>& all, int64_t layer)
      : all_(all), layer_(layer) {}
  c10::optional<torch::Tensor> get(Param p) const { return all_.get(layer_ * kParamsPerLayer + p); }
  torch::Tensor required(Param p, const char* name) const {
    auto t = get(p);
    TORCH_CHECK(present(t), "mamba_layers_step: layer ", layer_, " has no ", name);
    return *t;
  }

 private:
  const c10::List<c10::optional<torch::Tensor>>& all_;
  int64_t layer_;
};

// One mixer's step. u: (b, d) the normed input, float32; conv_state: (b, k-1, e); ssm_state:
// (b, e, n). Returns the mixer's output (b, d), the next conv state and the next SSM state, all
// float32 and new tensors.
std::array<torch::Tensor, 3> mixer_step(const torch::Tensor& u, const LayerParams& layer,
                                        const torch::Tensor& conv_state_in,
                                        const torch::Tensor& ssm_state_in) {
  const auto in_w = layer.required(kInW, "in_proj weight");
  const auto x_w = layer.required(kXW, "x_proj weight");
  const auto dt_w = layer.required(kDtW, "dt_proj weight");
  const auto out_w = layer.required(kOutW, "out_proj weight");
  const auto conv_any = layer.required(kConvW, "conv weight");
  const auto A_any = layer.required(kALog, "A_log");
  const int64_t b = u.size(0), d = u.size(1), e = conv_any.size(0), k = conv_any.size(-1);
  const int64_t n = A_any.size(-1), r = dt_w.size(1);
  const auto conv_w = f32(conv_any.reshape({e, k}), "conv weight (e, k)", {e, k});  // from (e, 1, k)
  const auto A_log = f32(A_any, "A_log (e, n)", {e, n});
  const auto dt_b = f32(layer.required(kDtB, "dt_proj bias"), "dt bias (e,)", {e});
  const auto conv_state = f32(conv_state_in, "conv state (b, k-1, e)", {b, k - 1, e});
  const auto ssm_state = f32(ssm_state_in, "SSM state (b, e, n)", {b, e, n});
  TORCH_CHECK(in_w.size(0) == 2 * e && x_w.size(0) == r + 2 * n && x_w.size(1) == e &&
                  dt_w.size(0) == e && out_w.size(0) == d && out_w.size(1) == e,
              "mamba_layers_step: the linear layers' shapes do not fit d = ", d, ", e = ", e,
              ", n = ", n, ", r = ", r);
  const auto conv_bias = vector_or_zeros(layer.get(kConvB), "conv bias (e,)", e);
  const auto skip = vector_or_zeros(layer.get(kD), "D (e,)", e);

  const auto xz = matvec(u, in_w, layer.get(kInScale), opt_f32(layer.get(kInBias)));  // (b, 2e): x then z
  auto xs = torch::empty({b, e}, u.options());         // SiLU(conv(x)), the SSM's input
  auto next_conv = torch::empty_like(conv_state);
  const float* xz_p = xz.data_ptr<float>();
  const float* cw = conv_w.data_ptr<float>();
  const float* cb = conv_bias.data_ptr<float>();
  const float* cs = conv_state.data_ptr<float>();
  float* nc = next_conv.data_ptr<float>();
  float* xs_p = xs.data_ptr<float>();
  // The loops over channels are innermost, so they vectorise (SiLU's exp included).
  at::parallel_for(0, e, kChannelGrain, [&](int64_t c0, int64_t c1) {
    for (int64_t bi = 0; bi < b; ++bi) {
      const float* window = cs + bi * (k - 1) * e;  // (k-1, e), oldest first
      const float* x_new = xz_p + bi * 2 * e;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        float acc = cb[c] + cw[c * k + k - 1] * x_new[c];
        for (int64_t j = 0; j < k - 1; ++j) acc += cw[c * k + j] * window[j * e + c];
        xs_p[bi * e + c] = silu(acc);
      }
      float* shifted = nc + bi * (k - 1) * e;  // the window without its oldest row, then x
      for (int64_t j = 0; j + 1 < k - 1; ++j)
        std::copy(window + (j + 1) * e + c0, window + (j + 1) * e + c1, shifted + j * e + c0);
      if (k > 1) std::copy(x_new + c0, x_new + c1, shifted + (k - 2) * e + c0);
    }
  });

  const auto dbc = matvec(xs, x_w, layer.get(kXScale), c10::nullopt);  // (b, r + 2n): dt low rank, B, C
  const auto dt = matvec(dbc.narrow(1, 0, r).contiguous(), dt_w, layer.get(kDtScale), c10::nullopt);  // (b, e)
  auto y = torch::empty({b, e}, u.options());
  auto next_ssm = torch::empty_like(ssm_state);
  const float* dbc_p = dbc.data_ptr<float>();
  const float* dt_p = dt.data_ptr<float>();
  const float* dtb = dt_b.data_ptr<float>();
  const float* Al = A_log.data_ptr<float>();
  const float* Dp = skip.data_ptr<float>();
  const float* hs = ssm_state.data_ptr<float>();
  float* hn = next_ssm.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  at::parallel_for(0, e, kChannelGrain, [&](int64_t c0, int64_t c1) {
    std::vector<float> delta(c1 - c0), gate(c1 - c0), read(c1 - c0), A((c1 - c0) * n);
#pragma omp simd
    for (int64_t i = 0; i < (c1 - c0) * n; ++i) A[i] = -expf(Al[c0 * n + i]);  // once for every sequence
    for (int64_t bi = 0; bi < b; ++bi) {
      const float* Bt = dbc_p + bi * (r + 2 * n) + r;
      const float* Ct = Bt + n;
      const float* x = xs_p + bi * e;
      const float* z = xz_p + bi * 2 * e + e;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        delta[c - c0] = softplus(dt_p[bi * e + c] + dtb[c]);
        gate[c - c0] = silu(z[c]);
      }
      for (int64_t c = c0; c < c1; ++c) {  // the state update, vectorised over the state
        const float d = delta[c - c0], dx = d * x[c];
        const float* h = hs + (bi * e + c) * n;
        float* h_next = hn + (bi * e + c) * n;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const float hj = expf(d * A[(c - c0) * n + j]) * h[j] + dx * Bt[j];
          h_next[j] = hj;
          acc += hj * Ct[j];
        }
        read[c - c0] = acc;
      }
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) y_p[bi * e + c] = (read[c - c0] + Dp[c] * x[c]) * gate[c - c0];
    }
  });
  return {matvec(y, out_w, layer.get(kOutScale), opt_f32(layer.get(kOutBias))), next_conv, next_ssm};
}

}  // namespace

// residual: (b, d) float32, the residual stream entering the first layer; params:
// kParamsPerLayer entries per layer in the order of Param (None where a layer has no such
// tensor; the linear weights float32, bfloat16 or int8 as matvec takes them, the rest any float
// dtype); conv_states[i]: (b, k-1, e) and ssm_states[i]: (b, e, n), any float dtype; eps: the
// norms' epsilon. Returns 1 + 2 * layers new tensors: the residual stream after the last layer
// (b, d) float32, every layer's next conv state, then every layer's next SSM state, each in
// the dtype of the state it replaces.
std::vector<torch::Tensor> mamba_layers_step(const torch::Tensor& residual,
                                             const c10::List<c10::optional<torch::Tensor>>& params,
                                             const std::vector<torch::Tensor>& conv_states,
                                             const std::vector<torch::Tensor>& ssm_states,
                                             double eps) {
  const int64_t layers = static_cast<int64_t>(conv_states.size());
  TORCH_CHECK(residual.dim() == 2 && residual.scalar_type() == torch::kFloat32,
              "mamba_layers_step: the residual must be float32 (b, d), got ", residual.scalar_type(),
              " ", residual.sizes());
  TORCH_CHECK(static_cast<int64_t>(ssm_states.size()) == layers &&
                  static_cast<int64_t>(params.size()) == layers * kParamsPerLayer,
              "mamba_layers_step: ", kParamsPerLayer, " parameters and two states per layer, got ",
              params.size(), " parameters, ", layers, " conv states and ", ssm_states.size(),
              " SSM states");
  auto x = residual.contiguous().clone();  // (b, d), updated layer by layer
  std::vector<torch::Tensor> out(1 + 2 * layers);
  for (int64_t i = 0; i < layers; ++i) {
    const LayerParams layer(params, i);
    const auto norm_w = f32(layer.required(kNorm, "norm weight"), "norm weight (d,)", {x.size(1)});
    auto [y, conv, ssm] = mixer_step(rms_norm(x, norm_w, eps), layer, conv_states[i], ssm_states[i]);
    x.add_(y);
    out[1 + i] = conv.to(conv_states[i].scalar_type());
    out[1 + layers + i] = ssm.to(ssm_states[i].scalar_type());
  }
  out[0] = x;
  return out;
}

TORCH_LIBRARY_FRAGMENT(mambastep, m) {
  m.def("mamba_layers_step(Tensor residual, Tensor?[] params, Tensor[] conv_states, "
        "Tensor[] ssm_states, float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mambastep, CPU, m) { m.impl("mamba_layers_step", &mamba_layers_step); }
