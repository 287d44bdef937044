// Fused Mamba-1 selective scan for the CPU (inference only).
//
// One pass over the sequence per block of channels: the decay exp(dt A), the
// input dt B x, the state update and the read-out C . h are computed together,
// so nothing of size (l, e, n) is ever written to memory. Threads split the
// (batch, channel-block) pairs; within a block the state lives in registers/L1.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <math.h>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // channels per work item: one 512-bit vector of floats

// Scan channels [e0, e0 + w) of one sequence, w <= kBlock. The innermost loop runs
// over channels, so it vectorises without horizontal sums. AT is A transposed: (n, e).
void scan_block(const float* x, const float* dt, const float* AT, const float* B, const float* C,
                const float* D, float* h, float* y, int64_t l, int64_t e, int64_t n, int64_t e0,
                int64_t w) {
  std::vector<float> hb(n * kBlock);  // (n, kBlock): this block's state, channels innermost
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < w; ++c) hb[j * kBlock + c] = h[(e0 + c) * n + j];
  float acc[kBlock], d[kBlock], dx[kBlock];
  for (int64_t t = 0; t < l; ++t) {
    const float* x_t = x + t * e + e0;
    const float* dt_t = dt + t * e + e0;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      d[c] = dt_t[c];
      dx[c] = dt_t[c] * x_t[c];
      acc[c] = 0.f;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float b_tj = B[t * n + j], c_tj = C[t * n + j];
      const float* A_j = AT + j * e + e0;
      float* h_j = hb.data() + j * kBlock;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) {
        const float hj = expf(d[c] * A_j[c]) * h_j[c] + dx[c] * b_tj;
        h_j[c] = hj;
        acc[c] += hj * c_tj;
      }
    }
    float* y_t = y + t * e + e0;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) y_t[c] = acc[c] + (D ? D[e0 + c] * x_t[c] : 0.f);
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < w; ++c) h[(e0 + c) * n + j] = hb[j * kBlock + c];
}

}  // namespace

// x, dt: (b, l, e); A: (e, n); B, C: (b, l, n); D: (e,) or empty; state: (b, e, n).
// All float32 and contiguous. Returns y (b, l, e) and the final state (b, e, n).
std::vector<torch::Tensor> selective_scan_fused(torch::Tensor x, torch::Tensor dt, torch::Tensor A,
                                                torch::Tensor B, torch::Tensor C, torch::Tensor D,
                                                torch::Tensor state) {
  const int64_t b = x.size(0), l = x.size(1), e = x.size(2), n = A.size(1);
  auto h = state.clone();
  auto y = torch::empty_like(x);
  const float* D_ptr = D.numel() ? D.data_ptr<float>() : nullptr;
  const int64_t blocks = (e + kBlock - 1) / kBlock;
  auto AT = A.t().contiguous();  // (n, e)
  at::parallel_for(0, b * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bi = item / blocks, e0 = (item % blocks) * kBlock;
      scan_block(x.data_ptr<float>() + bi * l * e, dt.data_ptr<float>() + bi * l * e,
                 AT.data_ptr<float>(), B.data_ptr<float>() + bi * l * n,
                 C.data_ptr<float>() + bi * l * n, D_ptr, h.data_ptr<float>() + bi * e * n,
                 y.data_ptr<float>() + bi * l * e, l, e, n, e0, std::min(kBlock, e - e0));
    }
  });
  return {y, h};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("selective_scan_fused", &selective_scan_fused, "fused selective scan (CPU, float32)");
}
