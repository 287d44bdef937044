// One decode step of a Mamba-1 mixer in one call: in_proj, causal conv step, SiLU, x_proj,
// dt_proj, softplus, selective state update, gate, out_proj.
//
// The four products go through the matvec kernel (matvec.cpp), so the weights keep their
// storage (float32, bfloat16 or int8 with a scale per row); everything between them is a pass
// over the channels. Activations, the conv window and the SSM state are float32. A decode
// step made of ~25 small operators per layer spends as much time calling them as computing;
// this makes it one call per layer. Eager steps use it; inside torch.compile the generated
// code for the same operations is a little faster, so compiled steps do not.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <math.h>
#include <algorithm>
#include <vector>

torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& weight,
                     const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& bias);

namespace {

constexpr int64_t kChannelGrain = 256;  // channels per task in the elementwise passes

inline float silu(float v) { return v / (1.f + expf(-v)); }
inline float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }  // as F.softplus

void check_f32(const torch::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.sizes() == shape,
              "mamba_step: ", name, " must be contiguous float32 of shape ", shape, ", got ",
              t.scalar_type(), " ", t.sizes());
}

// An optional (e,) float32 vector, or zeros where it is missing: the channel loops stay branch-free.
torch::Tensor vector_or_zeros(const c10::optional<torch::Tensor>& t, const char* name, int64_t e) {
  if (!t.has_value() || !t->defined()) return torch::zeros({e}, torch::kFloat32);
  check_f32(*t, name, {e});
  return *t;
}

}  // namespace

// u: (b, d) the normed input; *_w/*_scale/*_bias: the four linear layers as matvec takes them;
// conv_w: (e, k), conv_b: (e,) or None; A_log: (e, n); D: (e,) or None; dt_b: (e,);
// conv_state: (b, k-1, e); ssm_state: (b, e, n). All but the linear weights float32.
// Returns the mixer's output (b, d), the next conv state and the next SSM state (new tensors).
std::vector<torch::Tensor> mamba_step(
    const torch::Tensor& u, const torch::Tensor& in_w, const c10::optional<torch::Tensor>& in_scale,
    const c10::optional<torch::Tensor>& in_bias, const torch::Tensor& conv_w,
    const c10::optional<torch::Tensor>& conv_b, const torch::Tensor& x_w,
    const c10::optional<torch::Tensor>& x_scale, const torch::Tensor& dt_w,
    const c10::optional<torch::Tensor>& dt_scale, const torch::Tensor& dt_b,
    const torch::Tensor& A_log, const c10::optional<torch::Tensor>& D, const torch::Tensor& out_w,
    const c10::optional<torch::Tensor>& out_scale, const c10::optional<torch::Tensor>& out_bias,
    const torch::Tensor& conv_state, const torch::Tensor& ssm_state) {
  const int64_t b = u.size(0), e = conv_w.size(0), k = conv_w.size(1), n = A_log.size(1);
  const int64_t r = dt_w.size(1);
  check_f32(conv_w, "conv weight (e, k)", {e, k});
  check_f32(A_log, "A_log (e, n)", {e, n});
  check_f32(dt_b, "dt bias (e,)", {e});
  check_f32(conv_state, "conv state (b, k-1, e)", {b, k - 1, e});
  check_f32(ssm_state, "SSM state (b, e, n)", {b, e, n});
  TORCH_CHECK(in_w.size(0) == 2 * e && x_w.size(0) == r + 2 * n && x_w.size(1) == e &&
                  dt_w.size(0) == e && out_w.size(1) == e,
              "mamba_step: the linear layers' shapes do not fit e = ", e, ", n = ", n, ", r = ", r);

  const auto conv_bias = vector_or_zeros(conv_b, "conv bias (e,)", e);
  const auto skip = vector_or_zeros(D, "D (e,)", e);

  const auto xz = matvec(u, in_w, in_scale, in_bias);  // (b, 2e): x then z
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

  const auto dbc = matvec(xs, x_w, x_scale, c10::nullopt);  // (b, r + 2n): dt low rank, B, C
  const auto dt = matvec(dbc.narrow(1, 0, r).contiguous(), dt_w, dt_scale, c10::nullopt);  // (b, e)
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
    std::vector<float> delta(c1 - c0), gate(c1 - c0), read(c1 - c0);
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
          const float hj = expf(-d * expf(Al[c * n + j])) * h[j] + dx * Bt[j];
          h_next[j] = hj;
          acc += hj * Ct[j];
        }
        read[c - c0] = acc;
      }
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) y_p[bi * e + c] = (read[c - c0] + Dp[c] * x[c]) * gate[c - c0];
    }
  });
  return {matvec(y, out_w, out_scale, out_bias), next_conv, next_ssm};
}

TORCH_LIBRARY_FRAGMENT(mambastep, m) {
  m.def(
      "mamba_step(Tensor u, Tensor in_w, Tensor? in_scale, Tensor? in_bias, Tensor conv_w, "
      "Tensor? conv_b, Tensor x_w, Tensor? x_scale, Tensor dt_w, Tensor? dt_scale, Tensor dt_b, "
      "Tensor A_log, Tensor? D, Tensor out_w, Tensor? out_scale, Tensor? out_bias, "
      "Tensor conv_state, Tensor ssm_state) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mambastep, CPU, m) { m.impl("mamba_step", &mamba_step); }
