// y = x @ W^T for a few rows of x (decode steps, verify blocks, draft blocks) on x86 CPUs.
//
// Why: BLAS sgemm packs the weight matrix on every call, so on this kind of machine a 2..8-row
// product costs ~2x a 1-row one although both must stream the same weights from memory once.
// Here every weight row is read once and multiplied into all M input rows while it sits in
// registers, so M <= 8 rows cost about what one does.
//
// Batch invariance: y[m, n] is accumulated in the same order (8 lanes over k, then a fixed lane
// reduction, then the scalar tail) whatever M is, so a token's logits are bitwise the same whether
// it is verified alone or inside a block.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kMaxRows = 8;
constexpr int64_t kPrefetchRows = 4;

inline float lane_sum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);                       // 4 lanes
  __m128 sh = _mm_movehl_ps(lo, lo);
  lo = _mm_add_ps(lo, sh);                       // 2 lanes
  sh = _mm_shuffle_ps(lo, lo, 0x1);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

// All M (<= 8) input rows against one weight row at a time: the row is streamed from memory once,
// each 8-float chunk multiplied into M accumulators while it sits in a register. (Tiling several
// weight rows, or input rows in passes, measured slower here: more streams, more loads per FMA.)
// Prefetching does not change the arithmetic: the results are bitwise those without it.
template <int M>
void rows_kernel(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N,
                 int64_t n0, int64_t n1) {
  const int64_t K8 = K - K % 8;
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    // Every m-loop is unrolled so the accumulators live in registers: without it GCC keeps `acc`
    // as a stack array and stores all M of them on every k step, which caps M = 6..8 at about
    // half the speed the loads allow.
    __m256 acc[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      // The hardware prefetcher falls behind once M FMAs sit between two weight loads. One software
      // prefetch per 64-byte line, kPrefetchRows weight rows ahead (a hint: it never faults past the
      // end), took all of SmolLM2's linears at 8 rows from 92-104 ms to 58-67 ms and at 1 row from
      // 55-61 ms to 42-52 ms on the seventh session's machine.
      if ((k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(wn + k + kPrefetchRows * K), _MM_HINT_T0);
      const __m256 wv = _mm256_loadu_ps(wn + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      float s = lane_sum(acc[m]);
      for (int64_t k = K8; k < K; ++k) s += wn[k] * x[m * K + k];
      if (bias) s += bias[n];
      y[m * N + n] = s;
    }
  }
}

template <int M>
void run_rows(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N) {
  // 64 weight rows per task: big enough to amortise the dispatch, small enough to balance threads.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { rows_kernel<M>(x, w, bias, y, K, N, n0, n1); });
}

void dispatch(int64_t M, const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N) {
  switch (M) {
    case 1: return run_rows<1>(x, w, b, y, K, N);
    case 2: return run_rows<2>(x, w, b, y, K, N);
    case 3: return run_rows<3>(x, w, b, y, K, N);
    case 4: return run_rows<4>(x, w, b, y, K, N);
    case 5: return run_rows<5>(x, w, b, y, K, N);
    case 6: return run_rows<6>(x, w, b, y, K, N);
    case 7: return run_rows<7>(x, w, b, y, K, N);
    default: return run_rows<8>(x, w, b, y, K, N);
  }
}

}  // namespace

// x: [..., K] float32, weight: [N, K] float32 contiguous, bias: [N] or None -> [..., N].
torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32,
              "small_batch_linear: float32 only");
  TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu(), "small_batch_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "small_batch_linear: weight must be [N, K] contiguous");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x_in.size(-1) == K, "small_batch_linear: x has ", x_in.size(-1), " features, weight ", K);
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = N;
  const torch::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t rows = x.size(0);
  torch::Tensor y = torch::empty({rows, N}, x.options());
  const float* b = nullptr;
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == torch::kFloat32 && bc.numel() == N, "small_batch_linear: bad bias");
    b = bc.data_ptr<float>();
  }
  for (int64_t r = 0; r < rows; r += kMaxRows) {
    const int64_t m = std::min<int64_t>(kMaxRows, rows - r);
    dispatch(m, x.data_ptr<float>() + r * K, weight.data_ptr<float>(), b, y.data_ptr<float>() + r * N, K, N);
  }
  return y.reshape(out_shape);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ weight.T (+ bias), batch-invariant, for a few rows (AVX2/FMA)");
}
