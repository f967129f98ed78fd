// Center Contrastive Loss, CPU kernels for fastcdml::ccl_fwd, ccl_bwd_centers and ccl_update_ (schemas and math:
// fastcdml/ops/ccl.py and docs/spec.md).
//
// ccl_fwd streams the bank in chunks of chunk_size(D) classes per block of kRowBlock queries: one GEMM gives the
// similarity tile, an online softmax (flash-attention style running max / sum in fp32) turns it into
// probabilities in place, and a second GEMM adds them times the chunk into the running Σ_j p_ij W_j, rescaled
// whenever the running max moves. Memory: O(B·D + threads · kRowBlock · chunk), never B×C.
#include "common.h"

#include <torch/library.h>

#include <numeric>
#include <tuple>
#include <vector>

namespace fastcdml {
namespace {

using at::Tensor;

void check_centers(const Tensor& x, const Tensor& centers) {
  check_embeddings(x, "x");
  check_embeddings(centers, "centers");
  TORCH_CHECK_VALUE(centers.size(1) == x.size(1), "centers must have shape (C, ", x.size(1), "), got ",
                    centers.sizes());
}

// One row of a similarity tile (label margin already applied) → p_j = exp(s_j/τ − m_new) in place; updates the
// running max m and sum l of exp(z − m) and returns the factor exp(m_old − m_new) that rescales older sums.
FASTCDML_SIMD_CLONES
float online_softmax_row(float* s, int64_t n, float inv_tau, float& m, float& l) {
  float cmax = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : cmax)
  for (int64_t j = 0; j < n; ++j) cmax = std::max(cmax, s[j]);
  const float m_new = std::max(m, cmax * inv_tau);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float p = fast_exp(s[j] * inv_tau - m_new);
    s[j] = p;
    sum += p;
  }
  const float alpha = std::isinf(m) ? 0.f : std::exp(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// One row of the tile of ccl_bwd_centers: s_j → coef · exp(s_j/τ − lse) in place.
FASTCDML_SIMD_CLONES
void softmax_grad_row(float* s, int64_t n, float inv_tau, float lse, float coef) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = coef * fast_exp(s[j] * inv_tau - lse);
}

std::tuple<Tensor, Tensor, Tensor> ccl_fwd(const Tensor& x_in, const Tensor& labels, const Tensor& centers_in,
                                           double temperature, double margin, double center_weight,
                                           bool compute_grad) {
  check_centers(x_in, centers_in);
  const int64_t B = x_in.size(0), D = x_in.size(1), C = centers_in.size(0);
  const Tensor y = check_labels(labels, B, "labels");
  const Tensor centers = centers_in.contiguous();
  auto [xh, norm] = normalize_rows(x_in);
  const auto f32 = xh.options();
  Tensor loss = at::empty({B}, f32), lse = at::empty({B}, f32);
  Tensor grad = at::empty({compute_grad ? B : 0, D}, f32);
  if (B == 0) return {loss, grad, lse};

  const float inv_tau = static_cast<float>(1.0 / temperature), m_f = static_cast<float>(margin);
  const float lam2 = static_cast<float>(2.0 * center_weight);
  const int64_t CC = chunk_size(D), RB = kRowBlock;
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* xhp = xh.data_ptr<float>();
  const float* nrm = norm.data_ptr<float>();

  parallel_for(0, ceil_div(B, RB), 1, [&](int64_t blk0, int64_t blk1) {
    Tensor sbuf = at::empty({RB * CC}, f32), wbuf = at::empty({CC, D}, f32), acc = at::empty({RB, D}, f32);
    Tensor wy = at::empty({D}, f32);
    std::vector<float> m(RB), l(RB), sy(RB), alpha(RB);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * RB, rb = std::min(RB, B - r0);
      const Tensor xb = xh.narrow(0, r0, rb);
      Tensor accb = acc.narrow(0, 0, rb);
      if (compute_grad) accb.zero_();
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(sy.begin(), sy.end(), std::numeric_limits<float>::quiet_NaN());
      for (int64_t c0 = 0; c0 < C; c0 += CC) {
        const int64_t cc = std::min(CC, C - c0);
        const Tensor wc = rows_fp32(centers, c0, cc, wbuf);
        Tensor s = tile(sbuf, rb, cc);
        at::mm_out(s, xb, wc.t());
        float* sp = s.data_ptr<float>();
        for (int64_t r = 0; r < rb; ++r) {
          float* row = sp + r * cc;
          const int64_t yi = yp[r0 + r];
          if (yi >= c0 && yi < c0 + cc) {
            sy[r] = row[yi - c0];
            row[yi - c0] -= m_f;
          }
          alpha[r] = online_softmax_row(row, cc, inv_tau, m[r], l[r]);
        }
        if (compute_grad) {
          float* ap = accb.data_ptr<float>();
          for (int64_t r = 0; r < rb; ++r)
            if (alpha[r] != 1.f)
              for (int64_t k = 0; k < D; ++k) ap[r * D + k] *= alpha[r];
          accb.addmm_(s, wc);
        }
      }
      float* lossp = loss.data_ptr<float>() + r0;
      float* lsep = lse.data_ptr<float>() + r0;
      for (int64_t r = 0; r < rb; ++r) {
        const int64_t yi = yp[r0 + r];
        const bool valid = yi >= 0 && yi < C;
        lsep[r] = m[r] + std::log(l[r]);
        lossp[r] = valid ? lsep[r] - (sy[r] - m_f) * inv_tau - lam2 * sy[r] : std::numeric_limits<float>::quiet_NaN();
        if (!compute_grad) continue;
        float* g = grad.data_ptr<float>() + (r0 + r) * D;
        if (!valid) {  // the loss row is NaN by contract; it contributes no gradient (as in the reference)
          std::fill(g, g + D, 0.f);
          continue;
        }
        wy.copy_(centers[yi]);
        const float* wyp = wy.data_ptr<float>();
        const float* a = accb.data_ptr<float>() + r * D;
        const float inv_l = 1.f / l[r];
        for (int64_t k = 0; k < D; ++k) g[k] = (a[k] * inv_l - wyp[k]) * inv_tau - lam2 * wyp[k];
        normalize_backward_row(g, xhp + (r0 + r) * D, nrm[r0 + r], D);
      }
    }
  });
  return {loss, grad, lse};
}

// ∂L/∂W_j = Σ_i g_i ((p_ij − [j = y_i])/τ − 2λ[j = y_i]) x̂_i, parallel over class chunks (each task owns its rows
// of the output), rows of the batch in fixed blocks: G tile = the recomputed softmax, then dW_c += Gᵀ x̂_b.
Tensor ccl_bwd_centers(const Tensor& x_in, const Tensor& labels, const Tensor& centers_in, const Tensor& lse_in,
                       const Tensor& grad_rows_in, double temperature, double margin, double center_weight) {
  check_centers(x_in, centers_in);
  const int64_t B = x_in.size(0), D = x_in.size(1), C = centers_in.size(0);
  const Tensor y = check_labels(labels, B, "labels");
  TORCH_CHECK_VALUE(lse_in.numel() == B && grad_rows_in.numel() == B, "lse and grad_rows must have ", B, " elements");
  const Tensor centers = centers_in.contiguous();
  const Tensor lse = lse_in.to(at::kFloat).contiguous(), g = grad_rows_in.to(at::kFloat).contiguous();
  Tensor xh = normalize_rows(x_in).first;
  const auto f32 = xh.options();
  Tensor dw = at::zeros({C, D}, f32);
  if (B == 0) return dw;

  const float inv_tau = static_cast<float>(1.0 / temperature), m_f = static_cast<float>(margin);
  const float label_coef = static_cast<float>(1.0 / temperature + 2.0 * center_weight);
  const int64_t CC = chunk_size(D), RB = kRowBlock;
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* lsep = lse.data_ptr<float>();
  const float* gp = g.data_ptr<float>();

  parallel_for(0, ceil_div(C, CC), 1, [&](int64_t ch0, int64_t ch1) {
    Tensor sbuf = at::empty({RB * CC}, f32), wbuf = at::empty({CC, D}, f32);
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      const int64_t c0 = ch * CC, cc = std::min(CC, C - c0);
      const Tensor wc = rows_fp32(centers, c0, cc, wbuf);
      Tensor dwc = dw.narrow(0, c0, cc);
      for (int64_t r0 = 0; r0 < B; r0 += RB) {
        const int64_t rb = std::min(RB, B - r0);
        const Tensor xb = xh.narrow(0, r0, rb);
        Tensor s = tile(sbuf, rb, cc);
        at::mm_out(s, xb, wc.t());
        float* sp = s.data_ptr<float>();
        for (int64_t r = 0; r < rb; ++r) {
          float* row = sp + r * cc;
          const int64_t yi = yp[r0 + r];
          if (yi < 0 || yi >= C) {  // NaN loss row: no gradient, as in the reference
            std::fill(row, row + cc, 0.f);
            continue;
          }
          const bool here = yi >= c0 && yi < c0 + cc;
          if (here) row[yi - c0] -= m_f;
          softmax_grad_row(row, cc, inv_tau, lsep[r0 + r], gp[r0 + r] * inv_tau);
          if (here) row[yi - c0] -= gp[r0 + r] * label_coef;
        }
        dwc.addmm_(s.t(), xb);
      }
    }
  });
  return dw;
}

// W_k ← normalize(μ W_k + (1 − μ) mean_{y_i = k} x̂_i) for each class in the batch: rows sorted by (label, row
// index), one segment per class summed in row order in fp32, so the result does not depend on threads.
void ccl_update_(const Tensor& centers, const Tensor& x_in, const Tensor& labels, double momentum) {
  check_centers(x_in, centers);
  TORCH_CHECK_VALUE(centers.is_contiguous(), "centers must be contiguous to be updated in place");
  TORCH_CHECK_TYPE(centers.scalar_type() == at::kFloat || centers.scalar_type() == at::kBFloat16,
                   "centers must be float32 or bfloat16, got ", centers.scalar_type());
  const int64_t B = x_in.size(0), D = x_in.size(1), C = centers.size(0);
  const Tensor y = check_labels(labels, B, "labels");
  if (B == 0) return;
  const Tensor xh = normalize_rows(x_in).first;
  const int64_t* yp = y.data_ptr<int64_t>();
  std::vector<int64_t> order;
  order.reserve(B);
  for (int64_t i = 0; i < B; ++i)
    if (yp[i] >= 0 && yp[i] < C) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return yp[a] < yp[b]; });
  std::vector<int64_t> starts;  // segment boundaries in `order`
  for (size_t i = 0; i < order.size(); ++i)
    if (i == 0 || yp[order[i]] != yp[order[i - 1]]) starts.push_back(static_cast<int64_t>(i));
  starts.push_back(static_cast<int64_t>(order.size()));

  const float mu = static_cast<float>(momentum);
  const float* xhp = xh.data_ptr<float>();
  const int64_t segments = static_cast<int64_t>(starts.size()) - 1;
  parallel_for(0, segments, 16, [&](int64_t s0, int64_t s1) {
    Tensor mixed = at::empty({D}, xh.options());
    float* mx = mixed.data_ptr<float>();
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t k = yp[order[starts[s]]], count = starts[s + 1] - starts[s];
      std::fill(mx, mx + D, 0.f);
      for (int64_t t = starts[s]; t < starts[s + 1]; ++t) {
        const float* a = xhp + order[t] * D;
        for (int64_t d = 0; d < D; ++d) mx[d] += a[d];
      }
      Tensor wk = centers[k];
      const Tensor old = wk.to(at::kFloat);
      const float* w = old.data_ptr<float>();
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        mx[d] = mu * w[d] + (1.f - mu) * (mx[d] / static_cast<float>(count));
        ss += mx[d] * mx[d];
      }
      const float inv = 1.f / std::max(std::sqrt(ss), kEps);
      bool finite = true;
      for (int64_t d = 0; d < D; ++d) {
        mx[d] *= inv;
        finite = finite && std::isfinite(mx[d]);
      }
      if (finite) wk.copy_(mixed);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcdml, CPU, m) {
  m.impl("ccl_fwd", &ccl_fwd);
  m.impl("ccl_bwd_centers", &ccl_bwd_centers);
  m.impl("ccl_update_", &ccl_update_);
}

}  // namespace fastcdml
