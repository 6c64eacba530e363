// rlhfkit's CPU product kernel: y = x Wᵀ + b (+ h) in float32 with AVX2/FMA, for the fast decoder
// (rlhfkit/rollout.py, _Proj) and nothing else. Built on first use by rlhfkit/kernels.py
// (torch.utils.cpp_extension, -O3 -mavx2 -mfma -fopenmp); without a compiler the decoder uses oneDNN instead.
//
// Why: a decode step multiplies a few rows (the batch) by every weight matrix. oneDNN and MKL reach 35-60
// GFLOP/s there on an AVX2 host; this kernel reaches ~120 with two threads at 8 rows, and ~155 from 32 rows up
// (bench/bench_host.py prints both). The weight is packed once into panels of 16 output columns, each stored
// k-major ((K, 16) contiguous); a tile of up to 6 rows x 16 columns keeps its sums in 12 of AVX2's 16 vector
// registers while the panel streams through once.
//
// Numbers: every output is bias + Σ_k x[r,k] w[n,k] accumulated in k order with FMA (x normalised first if asked),
// then act, then + h. A row's
// result does not depend on the other rows, on how many rows there are, or on the thread count (threads split
// columns).
//
//   small_linear_pack(w (N, K), any strides, scale (K,)?) -> (ceil(N / 16), K, 16) of w diag(scale),
//     zero-padded columns
//   small_linear(x (M, K), packed, bias (N,)?, residual (M, N)?, N, act, norm, eps)
//     -> act(norm(x) Wᵀ + b) (+ h), (M, N)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t NR = 16;        // output columns per panel: two 8-float vectors
constexpr int64_t ROW_BLOCK = 64;  // rows per pass over a thread's panels (their x rows stay in L2)
constexpr int64_t TASK_MACS = 1 << 16;  // least multiply-adds a thread is handed

inline __m256i lane_mask(int64_t n) {  // lanes [0, n) on
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))), idx);
}

// Activations applied to x Wᵀ + b in the kernel (small_linear's act): 0 none, 1 ReLU, 2 GELU (tanh approximation,
// GPT-2's gelu_new), 3 SiLU. GELU-tanh is x·sigmoid(2u), u = √(2/π)(x + 0.044715x³), the same function as
// 0.5x(1 + tanh u); SiLU is x·sigmoid(x). exp: Cephes' single-precision expf (range reduction by ln 2, degree-6
// polynomial), within 2 ulp over the clamped range.
enum Act : int64_t { NONE = 0, RELU = 1, GELU_TANH = 2, SILU = 3 };

inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.3762f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline __m256 x_sigmoid(__m256 x, __m256 z) {  // x / (1 + exp(-z))
  const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), z));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline __m256 activate(__m256 v, int64_t act) {
  switch (act) {
    case RELU: return _mm256_max_ps(_mm256_setzero_ps(), v);  // NaN in, NaN out (maxps returns its 2nd operand)
    case GELU_TANH: {
      const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);  // 2u = 2√(2/π)(v + 0.044715 v³)
      const __m256 z = _mm256_mul_ps(_mm256_fmadd_ps(v3, _mm256_set1_ps(0.044715f), v),
                                     _mm256_set1_ps(1.5957691216057308f));
      return x_sigmoid(v, z);
    }
    case SILU: return x_sigmoid(v, v);
    default: return v;
  }
}

// Row normalisations applied to x before the product (small_linear's norm): 0 none, 1 RMSNorm x / sqrt(mean(x²) +
// eps), 2 LayerNorm (x - mean) / sqrt(var + eps); without weights (the caller folds them into W and b). Row
// statistics in double.
enum Norm : int64_t { NO_NORM = 0, RMS = 1, LAYER = 2 };

at::Tensor normalized(const at::Tensor& x, int64_t norm, double eps) {
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  at::Tensor out = at::empty({M, K}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = src + r * ldx;
      float* yr = dst + r * K;
      double mean = 0.0, sq = 0.0;
      if (norm == LAYER) {
        for (int64_t k = 0; k < K; ++k) mean += xr[k];
        mean /= static_cast<double>(K);
      }
      for (int64_t k = 0; k < K; ++k) {
        const double d = xr[k] - mean;
        sq += d * d;
      }
      const float scale = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(K) + eps));
      const float shift = static_cast<float>(mean);
      for (int64_t k = 0; k < K; ++k) yr[k] = (xr[k] - shift) * scale;
    }
  });
  return out;
}

// MR rows x the panel's ncols (<= 16) columns.
template <int MR>
__attribute__((always_inline)) inline void tile(const float* x, int64_t ldx, const float* panel, int64_t K, float* y,
                                                int64_t ldy, const float* bias, const float* h, int64_t ldh,
                                                int64_t ncols, int64_t act) {
  const __m256i m0 = lane_mask(ncols), m1 = lane_mask(ncols - 8);
  const __m256 b0 = bias ? _mm256_maskload_ps(bias, m0) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_maskload_ps(bias + 8, m1) : _mm256_setzero_ps();
  __m256 acc0[MR], acc1[MR];
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
    acc0[r] = b0;
    acc1[r] = b1;
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * NR), w1 = _mm256_loadu_ps(panel + k * NR + 8);
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r * ldx + k);
      acc0[r] = _mm256_fmadd_ps(xr, w0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(xr, w1, acc1[r]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
    if (act != NONE) {
      acc0[r] = activate(acc0[r], act);
      acc1[r] = activate(acc1[r], act);
    }
    if (h) {
      acc0[r] = _mm256_add_ps(acc0[r], _mm256_maskload_ps(h + r * ldh, m0));
      acc1[r] = _mm256_add_ps(acc1[r], _mm256_maskload_ps(h + r * ldh + 8, m1));
    }
    _mm256_maskstore_ps(y + r * ldy, m0, acc0[r]);
    _mm256_maskstore_ps(y + r * ldy + 8, m1, acc1[r]);
  }
}

// M rows against one panel: one tile for up to 6 rows, else tiles of 4 (then 1-3).
void panel_rows(const float* x, int64_t ldx, int64_t M, const float* panel, int64_t K, float* y, int64_t ldy,
                const float* bias, const float* h, int64_t ldh, int64_t ncols, int64_t act) {
  const int64_t step = M <= 6 ? M : 4;
  for (int64_t r = 0; r < M;) {
    const int64_t m = std::min(step, M - r);
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    const float* hr = h ? h + r * ldh : nullptr;
    switch (m) {
      case 1: tile<1>(xr, ldx, panel, K, yr, ldy, bias, hr, ldh, ncols, act); break;
      case 2: tile<2>(xr, ldx, panel, K, yr, ldy, bias, hr, ldh, ncols, act); break;
      case 3: tile<3>(xr, ldx, panel, K, yr, ldy, bias, hr, ldh, ncols, act); break;
      case 4: tile<4>(xr, ldx, panel, K, yr, ldy, bias, hr, ldh, ncols, act); break;
      case 5: tile<5>(xr, ldx, panel, K, yr, ldy, bias, hr, ldh, ncols, act); break;
      default: tile<6>(xr, ldx, panel, K, yr, ldy, bias, hr, ldh, ncols, act); break;
    }
    r += m;
  }
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "rlhfkit small_linear: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

}  // namespace

at::Tensor small_linear_pack(const at::Tensor& w, const std::optional<at::Tensor>& scale_in) {
  check_float_cpu(w, "w");
  TORCH_CHECK(w.dim() == 2, "rlhfkit small_linear_pack: w must be (out, in), got ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  at::Tensor scale;
  if (scale_in.has_value() && scale_in->defined()) {
    check_float_cpu(*scale_in, "scale");
    TORCH_CHECK(scale_in->numel() == K, "rlhfkit small_linear_pack: scale has ", scale_in->numel(),
                " entries, not ", K);
    scale = scale_in->contiguous();
  }
  const float* g = scale.defined() ? scale.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({P, K, NR}, w.options());  // every entry is written below (padding: 0)
  const float* src = w.data_ptr<float>();
  const int64_t sn = w.stride(0), sk = w.stride(1);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(NR, N - p * NR);
      float* panel = dst + p * K * NR;
      const float* rows = src + p * NR * sn;
      if (cols < NR) std::fill(panel, panel + K * NR, 0.0f);
      if (sk == 1) {  // rows of w contiguous (nn.Linear): read along k
        for (int64_t j = 0; j < cols; ++j)
          for (int64_t k = 0; k < K; ++k) panel[k * NR + j] = rows[j * sn + k] * (g ? g[k] : 1.0f);
      } else {  // e.g. the transposed view of GPT-2's (in, out) Conv1D weight: read along n
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < cols; ++j) panel[k * NR + j] = rows[j * sn + k * sk] * (g ? g[k] : 1.0f);
      }
    }
  });
  return out;
}

// A floating x or residual of another dtype (bf16 activations under CPU autocast) is converted to float32 first:
// the product is always a float32 one.
at::Tensor as_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && at::isFloatingType(t.scalar_type()), "rlhfkit small_linear: ", name,
              " must be a floating-point CPU tensor, got ", t.scalar_type(), " on ", t.device());
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

at::Tensor small_linear(const at::Tensor& x_float, const at::Tensor& packed, const std::optional<at::Tensor>& bias_in,
                        const std::optional<at::Tensor>& residual_in, int64_t N, int64_t act, int64_t norm,
                        double eps) {
  const at::Tensor x_in = as_float(x_float, "x");
  check_float_cpu(packed, "packed");
  TORCH_CHECK(x_in.dim() == 2, "rlhfkit small_linear: x must be (rows, in), got ", x_in.sizes());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NR && packed.is_contiguous() &&
                  packed.size(1) == x_in.size(1),
              "rlhfkit small_linear: packed must be small_linear_pack's (P, ", x_in.size(1), ", 16), got ",
              packed.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1), P = packed.size(0);
  TORCH_CHECK(act >= NONE && act <= SILU, "rlhfkit small_linear: act must be 0-3, got ", act);
  TORCH_CHECK(N > (P - 1) * NR && N <= P * NR, "rlhfkit small_linear: N = ", N, " does not fit ", P, " panels");
  TORCH_CHECK(norm >= NO_NORM && norm <= LAYER, "rlhfkit small_linear: norm must be 0-2, got ", norm);
  const at::Tensor x_strided = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor x = norm == NO_NORM ? x_strided : normalized(x_strided, norm, eps);
  at::Tensor bias, residual;
  if (bias_in.has_value() && bias_in->defined()) {
    check_float_cpu(*bias_in, "bias");
    TORCH_CHECK(bias_in->numel() == N, "rlhfkit small_linear: bias has ", bias_in->numel(), " entries, not ", N);
    bias = bias_in->contiguous();
  }
  if (residual_in.has_value() && residual_in->defined()) {
    const at::Tensor r = as_float(*residual_in, "residual");
    TORCH_CHECK(r.dim() == 2 && r.size(0) == M && r.size(1) == N, "rlhfkit small_linear: residual must be (", M,
                ", ", N, "), got ", r.sizes());
    residual = r.stride(1) == 1 ? r : r.contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* hp = residual.defined() ? residual.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldh = residual.defined() ? residual.stride(0) : 0;
  if (K == 0) {  // empty sum: act(bias) (+ residual)
    y.zero_();
    if (bias.defined()) y.add_(bias);
    if (act == RELU) y.relu_();
    if (act == GELU_TANH) y = at::gelu(y, "tanh");
    if (act == SILU) y = at::silu(y);
    if (residual.defined()) y.add_(residual);
    return y;
  }
  const int64_t grain = std::max<int64_t>(1, TASK_MACS / (std::min(M, ROW_BLOCK) * K * NR));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t r0 = 0; r0 < M; r0 += ROW_BLOCK) {
      const int64_t rows = std::min(ROW_BLOCK, M - r0);
      for (int64_t p = p0; p < p1; ++p) {
        panel_rows(xp + r0 * ldx, ldx, rows, wp + p * K * NR, K, yp + r0 * N + p * NR, N,
                   bp ? bp + p * NR : nullptr, hp ? hp + r0 * ldh + p * NR : nullptr, ldh,
                   std::min(NR, N - p * NR), act);
      }
    }
  });
  return y;
}

TORCH_LIBRARY(rlhfkit, m) {
  m.def("small_linear_pack(Tensor w, Tensor? scale=None) -> Tensor", small_linear_pack);
  m.def("small_linear(Tensor x, Tensor packed, Tensor? bias, Tensor? residual, int n, int act=0, int norm=0, "
        "float eps=0.0) -> Tensor",
        small_linear);
}
