// Shared pieces of the fastcdml CPU kernels: input checks, row normalisation (forward and backward), the tile
// partition and a vectorisable exp.
//
// Determinism: every kernel works on a fixed partition of rows into blocks of kRowBlock and of the class /
// reference dimension into chunks of chunk_size(D), both independent of the thread count. Each task (a block or
// a chunk) is computed by one thread, its matrix products go through gemm.h (one FMA chain per element in a fixed
// order, whatever the CPU's BLAS would do), and all other reductions run in a fixed order, so the results are
// bit-identical for any torch.get_num_threads() on any CPU (tests/test_cpp.py checks 1, 2 and 3 threads).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include "gemm.h"
#include "isa.h"
#include "rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

namespace torch {
class Library;
}

namespace fastcdml {

// The CPU implementations of each loss's ops, registered by fastcdml.cpp's register_kernels() (called from Python
// once the op schemas exist, so that a build from other sources fails with an exception instead of aborting).
void register_ccl(torch::Library& m);
void register_cbml(torch::Library& m);
void register_proxy_anchor(torch::Library& m);
void register_pair(torch::Library& m);

constexpr float kEps = 1e-12f;       // x̂ = x / max(‖x‖, kEps)
constexpr int64_t kRowBlock = 64;    // rows per block (one block = one task of at::parallel_for)

// Columns per chunk of the class / reference dimension: a chunk of fp32 rows is ~512 KiB (the L2 size of current
// x86 cores) and the (kRowBlock × chunk) similarity tile at most 256 KiB.
inline int64_t chunk_size(int64_t dim) { return std::clamp<int64_t>(131072 / std::max<int64_t>(dim, 1), 128, 1024); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// at::parallel_for that carries the caller's thread-local state (dispatch keys, grad mode) into the OpenMP workers:
// the kernels run below autograd and their ATen calls must skip it on every thread, not only the calling one.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Hot elementwise loops are compiled twice (AVX2 and baseline) and picked at load time, so the extension
// stays portable while using the wide vectors the machine has. Both clones are deterministic.
#define FASTCDML_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTCDML_SIMD_CLONES
#endif

// Small helpers called from the cloned loops: always inlined into each clone, so the loops vectorise.
#if defined(__GNUC__)
#define FASTCDML_INLINE inline __attribute__((always_inline))
#define FASTCDML_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FASTCDML_INLINE inline
#define FASTCDML_INLINE_LAMBDA
#endif

// exp(v) for v <= 88.3 with ~1 ulp error (Cephes polynomial); v below -87.3 gives ~1e-38 instead of 0, which
// never matters here (the callers add it to sums of terms >= 1 or multiply it into tiny gradients). Written
// branch-free so the compiler vectorises loops that call it.
FASTCDML_INLINE float fast_exp(float v) {
  v = std::min(std::max(v, -87.3365447f), 88.3762626f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = (v * 1.44269504088896341f + shifter) - shifter;
  float r = v - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline void check_embeddings(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (rows, dim), got ", t.dim(), " dimensions");
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                   " must be float32, bfloat16 or float16 for the C++ backend, got ", dt);
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
}

// Labels as a contiguous int64 tensor (int32 is widened), one per row of a (rows, D) tensor.
inline at::Tensor check_labels(const at::Tensor& y, int64_t rows, const char* name) {
  TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == rows, name, " must have shape (", rows, ",), got ", y.sizes());
  TORCH_CHECK_TYPE(y.scalar_type() == at::kLong || y.scalar_type() == at::kInt, name,
                   " must be int64 or int32, got ", y.scalar_type());
  return y.to(at::kLong).contiguous();
}

// Rows of x normalised in fp32 into out (rows, D) contiguous fp32 (e.g. a slice of a larger buffer), and their fp32
// norms into norm (rows,).
inline void normalize_rows_into(const at::Tensor& x, at::Tensor out, at::Tensor norm) {
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t n = xf.size(0), d = xf.size(1);
  const float* src = xf.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  float* nrm = norm.data_ptr<float>();
  parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = src + r * d;
      float ss = 0.f;
      for (int64_t k = 0; k < d; ++k) ss += a[k] * a[k];
      nrm[r] = std::sqrt(ss);
      const float inv = 1.f / std::max(nrm[r], kEps);
      for (int64_t k = 0; k < d; ++k) dst[r * d + k] = a[k] * inv;
    }
  });
}

// (x̂, ‖x‖): rows of x normalised in fp32 (B, D) contiguous, and their fp32 norms (B,).
inline std::pair<at::Tensor, at::Tensor> normalize_rows(const at::Tensor& x) {
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor xh = at::empty({x.size(0), x.size(1)}, f32), norm = at::empty({x.size(0)}, f32);
  normalize_rows_into(x, xh, norm);
  return {xh, norm};
}

// Backward of x̂ = x / max(‖x‖, eps) for one row, in place on g (∂L/∂x̂ in, ∂L/∂x out).
inline void normalize_backward_row(float* g, const float* xh, float norm, int64_t d) {
  if (norm < kEps) {  // the clamp is active: x̂ = x / eps is linear
    for (int64_t k = 0; k < d; ++k) g[k] /= kEps;
    return;
  }
  float dot = 0.f;
  for (int64_t k = 0; k < d; ++k) dot += xh[k] * g[k];
  const float inv = 1.f / norm;
  for (int64_t k = 0; k < d; ++k) g[k] = (g[k] - xh[k] * dot) * inv;
}

// The backward of the row normalisation for every row of g (rows, D) fp32 in place, rows in parallel.
inline void normalize_backward_rows(const at::Tensor& g, const at::Tensor& xhat, const at::Tensor& norm) {
  const int64_t n = g.size(0), d = g.size(1);
  float* gp = g.data_ptr<float>();
  const float* xp = xhat.data_ptr<float>();
  const float* np = norm.data_ptr<float>();
  parallel_for(0, n, 256, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) normalize_backward_row(gp + r * d, xp + r * d, np[r], d);
  });
}

// rows [c0, c0 + n) of a (C, D) fp32/bf16/fp16 tensor as a contiguous fp32 (n, D) tensor: a view when the tensor
// is fp32, else converted into buf (at least n × D).
inline at::Tensor rows_fp32(const at::Tensor& t, int64_t c0, int64_t n, at::Tensor& buf) {
  if (t.scalar_type() == at::kFloat) return t.narrow(0, c0, n);
  at::Tensor out = buf.narrow(0, 0, n);
  out.copy_(t.narrow(0, c0, n));
  return out;
}

// Row `row` of a contiguous (rows, D) fp32/bf16/fp16 tensor in fp32: a pointer into it when it is fp32, else the
// row converted into buf (D floats).
inline const float* row_fp32(const at::Tensor& t, int64_t row, float* buf) {
  const int64_t d = t.size(1);
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>() + row * d;
  if (t.scalar_type() == at::kBFloat16) {
    const at::BFloat16* p = t.data_ptr<at::BFloat16>() + row * d;
    for (int64_t k = 0; k < d; ++k) buf[k] = static_cast<float>(p[k]);
  } else {
    const at::Half* p = t.data_ptr<at::Half>() + row * d;
    for (int64_t k = 0; k < d; ++k) buf[k] = static_cast<float>(p[k]);
  }
  return buf;
}

// A contiguous (rows, cols) fp32 view on the start of a flat scratch buffer.
inline at::Tensor tile(at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace fastcdml
