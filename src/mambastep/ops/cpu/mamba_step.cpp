// One decode step of a whole stack of Mamba-1 or Mamba-2 layers in one call: for each layer,
// RMSNorm, the mixer's step (its products, causal conv step, SiLU, softplus, state update, gate)
// and the residual add; then, if given, the model's final RMSNorm and output layer.
//
// A layer's products go through the matvec kernel (matvec.cpp), so the weights keep
// their storage (float32, bfloat16 or int8 with a scale per row); everything between them is
// a pass over the channels. The residual stream, activations, conv window and SSM state are
// float32 here. An eager decode step made of ~35 small operators per layer spends as much time
// calling them as computing; this makes it one call per step. Eager steps use it; inside
// torch.compile the model's own operations are traced instead.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <math.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "vector_math.h"

torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& weight,
                     const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& bias);

namespace {

// Memory for large next SSM states, reused from step to step. In a decode loop the state of
// step t-1 is dropped while step t's is in use, so step t+1 can write into its memory. A
// fresh block would come from the allocator; above glibc's largest mmap threshold (32 MiB)
// that is a new mapping each step, whose page faults and zeroing cost a Mamba-2 model at
// batch 64 half its step. A block is reused only once no tensor or view holds it; blocks no
// call has taken since the previous call are freed at the end of each call, so beyond the
// states in use it keeps at most the last state's blocks, until the next call.
class StatePool {
 public:
  torch::Tensor take(c10::IntArrayRef sizes) {
    const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(sizeof(float));
    std::shared_ptr<Block> block;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& b : blocks_)
        if (b->bytes == bytes && !b->in_use) {
          block = b;
          break;
        }
      if (!block) blocks_.push_back(block = std::make_shared<Block>(bytes));
      block->in_use = true;
      block->taken = true;
    }
    return torch::from_blob(block->data.get(), sizes, [block](void*) { block->in_use = false; },
                            torch::kFloat32);
  }

  void trim() {  // frees the free blocks that no call took since the last trim
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::shared_ptr<Block>> kept;
    for (const auto& b : blocks_) {
      if (b->in_use || b->taken) kept.push_back(b);
      b->taken = false;
    }
    blocks_.swap(kept);
  }

 private:
  struct Block {
    explicit Block(int64_t n) : bytes(n), data(c10::GetCPUAllocator()->allocate(n)) {}
    const int64_t bytes;
    const c10::DataPtr data;
    std::atomic<bool> in_use{false};  // cleared when the last tensor on it is freed
    bool taken = false;
  };
  std::mutex mutex_;
  std::vector<std::shared_ptr<Block>> blocks_;
};

StatePool& state_pool() {
  static auto* pool = new StatePool;  // never destroyed: tensors on its blocks may outlive it
  return *pool;
}

constexpr int64_t kChannelGrain = 256;  // channels per task in the elementwise passes

using mambastep::exp_inline;
using mambastep::silu_inline;
using mambastep::softplus_inline;  // as F.softplus

// `t` as contiguous float32 (itself when it already is), checked to have `shape`.
torch::Tensor f32(const torch::Tensor& t, const char* name, c10::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "fused step: ", name, " must have shape ", shape,
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

// One layer's parameters, in the order of the flat list each operator takes.
enum MambaParam {
  kNorm, kInW, kInScale, kInBias, kConvTaps, kConvB, kXW, kXScale, kDtW, kDtScale, kDtB, kA, kD,
  kOutW, kOutScale, kOutBias, kMambaParams
};
// The final norm and the output product, after the last layer.
enum HeadParam { kHeadNorm, kHeadW, kHeadScale, kHeadBias, kHeadParams };
enum Mamba2Param {
  k2Norm, k2InW, k2InScale, k2InBias, k2ConvTaps, k2ConvB, k2DtBias, k2A, k2D, k2GateNorm, k2OutW,
  k2OutScale, k2OutBias, kMamba2Params
};

// y = x / sqrt(mean(x^2) + eps) * weight over each group of `group` channels of x (values
// contiguous, groups * group of them), normalised in float32; weight (d,) and y in W. A 16-bit
// W rounds the normalised value to W before the product, which is rounded too: what PyTorch's
// `weight * h.to(weight.dtype)` gives. Threads split the groups of prompts; a decode step's few
// rows stay on the calling thread.
template <typename X, typename W>
void rms_norm_groups(const X* x, const W* weight, W* y, int64_t groups, int64_t group, int64_t d, float eps) {
  using mambastep::narrow;
  using mambastep::widen;
  const int64_t grain = std::max<int64_t>(1, 65536 / group);  // groups per task: ~64k values
  at::parallel_for(0, groups, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const X* xr = x + r * group;
      const W* wr = weight + (r * group) % d;
      W* yr = y + r * group;
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < group; ++i) sq += widen(xr[i]) * widen(xr[i]);
      const float inv = 1.f / sqrtf(sq / group + eps);
#pragma omp simd
      for (int64_t i = 0; i < group; ++i) yr[i] = narrow<W>(widen(narrow<W>(widen(xr[i]) * inv)) * widen(wr[i]));
    }
  });
}

// (rows, d) -> (rows, d): rms_norm_groups with x and weight (d,) float32 and contiguous.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, int64_t group) {
  auto y = torch::empty_like(x);
  rms_norm_groups(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), x.numel() / group, group,
                  weight.numel(), static_cast<float>(eps));
  return y;
}

// f(T{}) for the T of a float32, bfloat16 or float16 tensor.
template <typename F>
void with_float_type(const torch::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return f(float{});
    case torch::kBFloat16: return f(c10::BFloat16{});
    case torch::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// The causal conv's step over c channels, then SiLU. x_new: row bi's new input at
// x_new + bi * stride; taps: (k, c), tap j of every channel contiguous; conv_b: (c,);
// conv_state: (b, k-1, c), oldest first. Returns SiLU(conv) (b, c) and the next conv state
// (b, k-1, c).
std::array<torch::Tensor, 2> conv_step_silu(const float* x_new, int64_t stride, int64_t b,
                                            const torch::Tensor& taps, const torch::Tensor& conv_b,
                                            const torch::Tensor& conv_state) {
  const int64_t k = taps.size(0), c = taps.size(1);
  auto out = torch::empty({b, c}, conv_state.options());
  auto next = torch::empty_like(conv_state);
  const float* tp = taps.data_ptr<float>();
  const float* cb = conv_b.data_ptr<float>();
  const float* cs = conv_state.data_ptr<float>();
  float* nc = next.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // A loop of taps around each loop of channels: the channel loops vectorise (SiLU's exp included).
  at::parallel_for(0, c, kChannelGrain, [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    std::vector<float> sums(width);
    float* acc = sums.data();
    for (int64_t bi = 0; bi < b; ++bi) {
      const float* window = cs + bi * (k - 1) * c + c0;
      const float* x = x_new + bi * stride + c0;
      const float* last = tp + (k - 1) * c + c0;  // the tap of the new input
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) acc[i] = cb[c0 + i] + last[i] * x[i];
      for (int64_t j = 0; j < k - 1; ++j) {
        const float* tap = tp + j * c + c0;
        const float* row = window + j * c;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) acc[i] += tap[i] * row[i];
      }
      float* o = op + bi * c + c0;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) o[i] = silu_inline(acc[i]);
      float* shifted = nc + bi * (k - 1) * c + c0;  // the window without its oldest row, then x
      for (int64_t j = 0; j + 1 < k - 1; ++j)
        std::copy(window + (j + 1) * c, window + (j + 1) * c + width, shifted + j * c);
      if (k > 1) std::copy(x, x + width, shifted + (k - 2) * c);
    }
  });
  return {out, next};
}

// One row of the state update: h_next = decay * h + dx * B over n states; returns h_next . C.
// decay: n values, or one for all n (kScalarDecay). In AVX-512 and AVX2 builds, rows of whole
// vectors (16 or 8 states) whose h_next is aligned to a vector are written with streaming
// stores (the 512-bit form: one vector and one horizontal sum per row of Mamba-1's 16 states,
// 2-4% off a batch-8 step): the next state goes to memory
// without its old lines being read into cache first (a step's weights flush the cache before
// the state is read again). At 64 sequences of Mamba-2 that read was a third of the step's
// memory traffic. A caller ends its writes with streaming_stores_done().
template <bool kScalarDecay>
inline float update_state_row(const float* h, const float* decay, float dx, const float* B,
                              const float* C, float* h_next, int64_t n) {
#if defined(__AVX512F__)
  if (n % 16 == 0 && reinterpret_cast<uintptr_t>(h_next) % 64 == 0) {
    const __m512 dxv = _mm512_set1_ps(dx);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 dv = kScalarDecay ? _mm512_set1_ps(*decay) : _mm512_loadu_ps(decay + j);
      const __m512 s = _mm512_fmadd_ps(dv, _mm512_loadu_ps(h + j), _mm512_mul_ps(dxv, _mm512_loadu_ps(B + j)));
      _mm512_stream_ps(h_next + j, s);
      acc = _mm512_fmadd_ps(s, _mm512_loadu_ps(C + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (n % 8 == 0 && reinterpret_cast<uintptr_t>(h_next) % 32 == 0) {
    const __m256 dxv = _mm256_set1_ps(dx);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // two chains of FMAs
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 dv = kScalarDecay ? _mm256_set1_ps(*decay) : _mm256_loadu_ps(decay + j);
      const __m256 s = _mm256_fmadd_ps(dv, _mm256_loadu_ps(h + j), _mm256_mul_ps(dxv, _mm256_loadu_ps(B + j)));
      _mm256_stream_ps(h_next + j, s);
      acc[(j / 8) % 2] = _mm256_fmadd_ps(s, _mm256_loadu_ps(C + j), acc[(j / 8) % 2]);
    }
    return mambastep::sum_lanes(_mm256_add_ps(acc[0], acc[1]));
  }
#endif
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const float hj = decay[kScalarDecay ? 0 : j] * h[j] + dx * B[j];
    h_next[j] = hj;
    acc += hj * C[j];
  }
  return acc;
}

// Orders a thread's streaming stores before what follows (the end of a parallel region).
inline void streaming_stores_done() {
#if defined(__AVX2__) && defined(__FMA__)
  _mm_sfence();
#endif
}

// One layer's entries of the operator's flat parameter list.
class LayerParams {
 public:
  LayerParams(const c10::List<c10::optional<torch::Tensor>>& all, int64_t layer, int64_t per_layer)
      : all_(all), layer_(layer), per_layer_(per_layer) {}
  c10::optional<torch::Tensor> get(int p) const { return all_.get(layer_ * per_layer_ + p); }
  torch::Tensor required(int p, const char* name) const {
    auto t = get(p);
    TORCH_CHECK(present(t), "fused step: layer ", layer_, " has no ", name);
    return *t;
  }

 private:
  const c10::List<c10::optional<torch::Tensor>>& all_;
  int64_t layer_, per_layer_;
};

// One Mamba-1 mixer's step. u: (b, d) the normed input, float32; conv_state: (b, k-1, e);
// ssm_state: (b, e, n); next_ssm: float32, its shape, written with the next SSM state.
// Returns the mixer's output (b, d) and the next conv state, float32 and new tensors.
std::array<torch::Tensor, 2> mamba_mixer_step(const torch::Tensor& u, const LayerParams& layer,
                                              const torch::Tensor& conv_state_in,
                                              const torch::Tensor& ssm_state_in,
                                              const torch::Tensor& next_ssm) {
  const auto in_w = layer.required(kInW, "in_proj weight");
  const auto x_w = layer.required(kXW, "x_proj weight");
  const auto dt_w = layer.required(kDtW, "dt_proj weight");
  const auto out_w = layer.required(kOutW, "out_proj weight");
  const auto taps_any = layer.required(kConvTaps, "conv taps");
  const auto A_any = layer.required(kA, "A");
  TORCH_CHECK(taps_any.dim() == 2, "mamba_layers_step: the conv taps must be (k, e), got ", taps_any.sizes());
  const int64_t b = u.size(0), d = u.size(1), k = taps_any.size(0), e = taps_any.size(1);
  const int64_t n = A_any.size(-1), r = dt_w.size(1);
  const auto taps = f32(taps_any, "conv taps (k, e)", {k, e});
  const auto A = f32(A_any, "A (e, n)", {e, n});
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
  const float* xz_p = xz.data_ptr<float>();
  const auto [xs, next_conv] = conv_step_silu(xz_p, 2 * e, b, taps, conv_bias, conv_state);  // the SSM's input
  const float* xs_p = xs.data_ptr<float>();

  const auto dbc = matvec(xs, x_w, layer.get(kXScale), c10::nullopt);  // (b, r + 2n): dt low rank, B, C
  const auto dt = matvec(dbc.narrow(1, 0, r).contiguous(), dt_w, layer.get(kDtScale), c10::nullopt);  // (b, e)
  auto y = torch::empty({b, e}, u.options());
  const float* dbc_p = dbc.data_ptr<float>();
  const float* dt_p = dt.data_ptr<float>();
  const float* dtb = dt_b.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  const float* Dp = skip.data_ptr<float>();
  const float* hs = ssm_state.data_ptr<float>();
  float* hn = next_ssm.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  at::parallel_for(0, e, kChannelGrain, [&](int64_t c0, int64_t c1) {
    std::vector<float> delta(c1 - c0), gate(c1 - c0), read(c1 - c0), decay((c1 - c0) * n);
    float* dA = decay.data();  // (c1 - c0, n): exp(delta A) of this block's channels
    const float* A_block = Ap + c0 * n;
    const int64_t block = (c1 - c0) * n;
    for (int64_t bi = 0; bi < b; ++bi) {
      const float* Bt = dbc_p + bi * (r + 2 * n) + r;
      const float* Ct = Bt + n;
      const float* x = xs_p + bi * e;
      const float* z = xz_p + bi * 2 * e + e;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        delta[c - c0] = softplus_inline(dt_p[bi * e + c] + dtb[c]);
        gate[c - c0] = silu_inline(z[c]);
      }
      // The decays first, in one flat pass: the exps are most of the update's work, and
      // computed in the loop of n per channel below, the update ran slower.
      for (int64_t c = 0; c < c1 - c0; ++c)
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) dA[c * n + j] = delta[c] * A_block[c * n + j];
#pragma omp simd
      for (int64_t i = 0; i < block; ++i) dA[i] = exp_inline(dA[i]);
      for (int64_t c = c0; c < c1; ++c)  // the state update, vectorised over the state
        read[c - c0] = update_state_row<false>(hs + (bi * e + c) * n, dA + (c - c0) * n, delta[c - c0] * x[c],
                                               Bt, Ct, hn + (bi * e + c) * n, n);
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) y_p[bi * e + c] = (read[c - c0] + Dp[c] * x[c]) * gate[c - c0];
    }
    streaming_stores_done();
  });
  return {matvec(y, out_w, layer.get(kOutScale), opt_f32(layer.get(kOutBias))), next_conv};
}

// One Mamba-2 mixer's step. u: (b, d) the normed input, float32; conv_state: (b, k-1, c) with
// c = e + 2gn channels (x, B, C); ssm_state: (b, h, p, n); next_ssm: float32, its shape, written
// with the next SSM state. Returns the mixer's output (b, d) and the next conv state, float32
// and new tensors.
std::array<torch::Tensor, 2> mamba2_mixer_step(const torch::Tensor& u, const LayerParams& layer,
                                               const torch::Tensor& conv_state_in,
                                               const torch::Tensor& ssm_state_in,
                                               const torch::Tensor& next_ssm, double eps,
                                               int64_t groups, double dt_min, double dt_max) {
  const auto in_w = layer.required(k2InW, "in_proj weight");
  const auto out_w = layer.required(k2OutW, "out_proj weight");
  const auto taps_any = layer.required(k2ConvTaps, "conv taps");
  const auto gate_norm = layer.required(k2GateNorm, "gated norm weight");
  TORCH_CHECK(ssm_state_in.dim() == 4, "mamba2_layers_step: the SSM state must be (b, h, p, n), got ",
              ssm_state_in.sizes());
  TORCH_CHECK(taps_any.dim() == 2, "mamba2_layers_step: the conv taps must be (k, c), got ", taps_any.sizes());
  const int64_t b = u.size(0), d = u.size(1), k = taps_any.size(0), c = taps_any.size(1);
  const int64_t e = gate_norm.numel(), h = ssm_state_in.size(1), p = ssm_state_in.size(2),
                n = ssm_state_in.size(3);
  TORCH_CHECK(h * p == e && c == e + 2 * groups * n && h % groups == 0,
              "mamba2_layers_step: SSM state (b, h, p, n) ", ssm_state_in.sizes(), ", conv channels ",
              c, ", gated norm ", e, " and n_groups ", groups, " do not fit");
  const auto taps = f32(taps_any, "conv taps (k, c)", {k, c});
  const auto A = f32(layer.required(k2A, "A"), "A (h,)", {h});
  const auto dt_bias = f32(layer.required(k2DtBias, "dt bias"), "dt bias (h,)", {h});
  const auto norm_w = f32(gate_norm, "gated norm weight (e,)", {e});
  const auto conv_state = f32(conv_state_in, "conv state (b, k-1, c)", {b, k - 1, c});
  const auto ssm_state = f32(ssm_state_in, "SSM state (b, h, p, n)", {b, h, p, n});
  const int64_t width = e + c + h;  // in_proj's output: z, then x B C, then dt
  TORCH_CHECK(in_w.size(0) == width && out_w.size(0) == d && out_w.size(1) == e,
              "mamba2_layers_step: the linear layers' shapes do not fit d = ", d, ", e = ", e,
              ", conv channels ", c, ", heads ", h);
  const auto conv_bias = vector_or_zeros(layer.get(k2ConvB), "conv bias (c,)", c);
  // D per head (h,) or per channel (e,), as a per-channel vector
  auto D = layer.get(k2D);
  const auto skip = !present(D) ? torch::zeros({e}, torch::kFloat32)
                    : D->numel() == h ? f32(*D, "D (h,)", {h}).repeat_interleave(p)
                                      : f32(*D, "D (h,) or (e,)", {e});

  const auto zxd = matvec(u, in_w, layer.get(k2InScale), opt_f32(layer.get(k2InBias)));  // (b, width)
  const float* zxd_p = zxd.data_ptr<float>();
  const auto [xbc, next_conv] = conv_step_silu(zxd_p + e, width, b, taps, conv_bias, conv_state);  // (b, c)
  auto y = torch::empty({b, e}, u.options());
  const float* xbc_p = xbc.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  const float* dtb = dt_bias.data_ptr<float>();
  const float* Dp = skip.data_ptr<float>();
  const float* hs = ssm_state.data_ptr<float>();
  float* hn = next_ssm.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  const int64_t heads_per_group = h / groups;
  at::parallel_for(0, b * h, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {  // one (sequence, head) per task
      const int64_t bi = t / h, hd = t % h;
      const float* x = xbc_p + bi * c + hd * p;  // (p,)
      const float* z = zxd_p + bi * width + hd * p;  // (p,) the gate's input
      const float* B = xbc_p + bi * c + e + (hd / heads_per_group) * n;  // (n,)
      const float* C = B + groups * n;
      const float delta = std::min(std::max(softplus_inline(zxd_p[bi * width + e + c + hd] + dtb[hd]),
                                            static_cast<float>(dt_min)), static_cast<float>(dt_max));
      const float decay = exp_inline(delta * Ap[hd]);
      const float* state = hs + t * p * n;
      float* state_next = hn + t * p * n;
      for (int64_t i = 0; i < p; ++i) {  // the state update, vectorised over the state
        const float read = update_state_row<true>(state + i * n, &decay, delta * x[i], B, C, state_next + i * n, n);
        y_p[bi * e + hd * p + i] = (read + Dp[hd * p + i] * x[i]) * silu_inline(z[i]);
      }
    }
    streaming_stores_done();
  });
  const auto normed = rms_norm(y, norm_w, eps, e / groups);
  return {matvec(normed, out_w, layer.get(k2OutScale), opt_f32(layer.get(k2OutBias))), next_conv};
}

// The stack of layers around a mixer step `mixer(u, layer, conv_state, ssm_state, next_ssm)`:
// see below.
template <typename MixerStep>
std::vector<torch::Tensor> layers_step(const char* op, const torch::Tensor& residual,
                                       const c10::List<c10::optional<torch::Tensor>>& params,
                                       int64_t per_layer,
                                       const c10::List<c10::optional<torch::Tensor>>& head,
                                       const std::vector<torch::Tensor>& conv_states,
                                       const std::vector<torch::Tensor>& ssm_states, double eps,
                                       int64_t reuse_bytes, MixerStep mixer) {
  const int64_t layers = static_cast<int64_t>(conv_states.size());
  TORCH_CHECK(residual.dim() == 2 && residual.scalar_type() == torch::kFloat32, op,
              ": the residual must be float32 (b, d), got ", residual.scalar_type(), " ",
              residual.sizes());
  TORCH_CHECK(static_cast<int64_t>(ssm_states.size()) == layers &&
                  static_cast<int64_t>(params.size()) == layers * per_layer,
              op, ": ", per_layer, " parameters and two states per layer, got ", params.size(),
              " parameters, ", layers, " conv states and ", ssm_states.size(), " SSM states");
  auto x = residual.contiguous().clone();  // (b, d), updated layer by layer
  const int64_t d = x.size(1);
  std::vector<torch::Tensor> out(1 + 2 * layers);
  for (int64_t i = 0; i < layers; ++i) {
    const LayerParams layer(params, i, per_layer);
    const auto norm_w = f32(layer.required(0, "norm weight"), "norm weight (d,)", {d});
    const auto sizes = ssm_states[i].sizes();
    const bool reused = c10::multiply_integers(sizes) * static_cast<int64_t>(sizeof(float)) >= reuse_bytes;
    const auto ssm = reused ? state_pool().take(sizes) : torch::empty(sizes, torch::kFloat32);
    auto [y, conv] = mixer(rms_norm(x, norm_w, eps, d), layer, conv_states[i], ssm_states[i], ssm);
    x.add_(y);
    out[1 + i] = conv.to(conv_states[i].scalar_type());
    out[1 + layers + i] = ssm.to(ssm_states[i].scalar_type());
  }
  state_pool().trim();
  if (head.empty()) {
    out[0] = x;
  } else {
    TORCH_CHECK(head.size() == kHeadParams, op, ": the head is ", static_cast<int>(kHeadParams),
                " tensors (final norm weight, weight, scale, bias), got ", head.size());
    TORCH_CHECK(present(head.get(kHeadNorm)) && present(head.get(kHeadW)), op,
                ": the head needs the final norm's weight and the output weight");
    const auto norm_w = f32(*head.get(kHeadNorm), "final norm weight (d,)", {d});
    out[0] = matvec(rms_norm(x, norm_w, eps, d), *head.get(kHeadW), head.get(kHeadScale),
                    opt_f32(head.get(kHeadBias)));  // (b, vocab)
  }
  return out;
}

}  // namespace

// residual: (b, d) float32, the residual stream entering the first layer; params: the layers'
// parameters, one run of MambaParam (or Mamba2Param) per layer (None where a layer has no such
// tensor; the linear weights float32, bfloat16 or int8 as matvec takes them, A the decay rates
// -exp(A_log), the rest any float dtype, converted here unless already float32); head: empty,
// or the model's last steps as HeadParam (the final RMSNorm's weight, then the output layer as
// matvec takes it); conv_states[i] and ssm_states[i]: layer i's state, any float dtype; eps: the
// norms' epsilon; reuse_bytes: next SSM states of at least this many bytes (float32) are written
// into memory reused from earlier steps' states once nothing holds them (StatePool). Returns
// 1 + 2 * layers new tensors: the residual stream after the last layer (b, d) float32, or with
// a head the logits (b, vocab) float32; every layer's next conv state, then every layer's next
// SSM state, each in the dtype of the state it replaces.
std::vector<torch::Tensor> mamba_layers_step(const torch::Tensor& residual,
                                             const c10::List<c10::optional<torch::Tensor>>& params,
                                             const c10::List<c10::optional<torch::Tensor>>& head,
                                             const std::vector<torch::Tensor>& conv_states,
                                             const std::vector<torch::Tensor>& ssm_states,
                                             double eps, int64_t reuse_bytes) {
  return layers_step("mamba_layers_step", residual, params, kMambaParams, head, conv_states,
                     ssm_states, eps, reuse_bytes, mamba_mixer_step);
}

// As mamba_layers_step, for Mamba-2 layers; n_groups: the groups of B and C (and of the gated
// norm); dt_min, dt_max: the clamp of Δ after the softplus.
std::vector<torch::Tensor> mamba2_layers_step(const torch::Tensor& residual,
                                              const c10::List<c10::optional<torch::Tensor>>& params,
                                              const c10::List<c10::optional<torch::Tensor>>& head,
                                              const std::vector<torch::Tensor>& conv_states,
                                              const std::vector<torch::Tensor>& ssm_states,
                                              double eps, int64_t n_groups, double dt_min,
                                              double dt_max, int64_t reuse_bytes) {
  return layers_step("mamba2_layers_step", residual, params, kMamba2Params, head, conv_states,
                     ssm_states, eps, reuse_bytes,
                     [&](const torch::Tensor& u, const LayerParams& layer, const torch::Tensor& conv,
                         const torch::Tensor& ssm, const torch::Tensor& next_ssm) {
                       return mamba2_mixer_step(u, layer, conv, ssm, next_ssm, eps, n_groups,
                                                dt_min, dt_max);
                     });
}

// RMSNorm of x (..., d) over groups of `group` channels, with weight (d,); x and weight each
// float32, bfloat16 or float16; y in weight's dtype (rms_norm_groups).
torch::Tensor rms_norm_op(const torch::Tensor& x, const torch::Tensor& weight, double eps, int64_t group) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: weight must be (",
              x.dim() ? x.size(-1) : 0, ",), got ", weight.sizes());
  TORCH_CHECK(group >= 1 && weight.size(0) % group == 0, "rms_norm: ", weight.size(0),
              " channels do not split into groups of ", group);
  const auto xc = x.contiguous(), wc = weight.contiguous();
  auto y = torch::empty(x.sizes(), wc.options());
  with_float_type(xc, "rms_norm: x", [&](auto x_type) {
    using X = decltype(x_type);
    with_float_type(wc, "rms_norm: weight", [&](auto w_type) {
      using W = decltype(w_type);
      rms_norm_groups(xc.data_ptr<X>(), wc.data_ptr<W>(), y.data_ptr<W>(), xc.numel() / group, group, wc.numel(),
                      static_cast<float>(eps));
    });
  });
  return y;
}

// The names of the entries of each flat parameter list, in the order of the enums above:
// the Python side checks the lists it builds against these once, when the library loads.
std::vector<std::string> cpu_layers_step_params(const std::string& kind) {
  if (kind == "mamba")
    return {"norm", "in_proj.weight", "in_proj.scale", "in_proj.bias", "conv.taps", "conv.bias",
            "x_proj.weight", "x_proj.scale", "dt_proj.weight", "dt_proj.scale", "dt_proj.bias", "A",
            "D", "out_proj.weight", "out_proj.scale", "out_proj.bias"};
  if (kind == "mamba2")
    return {"norm", "in_proj.weight", "in_proj.scale", "in_proj.bias", "conv.taps", "conv.bias",
            "dt_bias", "A", "D", "gate_norm", "out_proj.weight", "out_proj.scale", "out_proj.bias"};
  if (kind == "head") return {"norm", "out.weight", "out.scale", "out.bias"};
  TORCH_CHECK(false, "cpu_layers_step_params: no parameter list named ", kind);
}

TORCH_LIBRARY_IMPL(mambastep, CompositeExplicitAutograd, m) {
  m.impl("cpu_layers_step_params", &cpu_layers_step_params);
}

TORCH_LIBRARY_IMPL(mambastep, CPU, m) {
  m.impl("rms_norm", &rms_norm_op);
  m.impl("mamba_layers_step", &mamba_layers_step);
  m.impl("mamba2_layers_step", &mamba2_layers_step);
}
