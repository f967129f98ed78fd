// Center Contrastive Loss and its margin-softmax family, CPU kernels for fastcdml::ccl_fwd, ccl_fwd_partials,
// ccl_bwd_centers and ccl_momentum_update_ (schemas and math: fastcdml/ops/ccl.py, fastcdml/reference/ccl.py and docs/spec.md).
//
// ccl_fwd and ccl_fwd_partials share one streaming pass (stream_bank): the bank in chunks of class_chunk(D, K) classes
// (K sub-center rows each) per block of kRowBlock queries: one GEMM gives the similarity tile, the class cosine is
// the max over each class's K columns (K = 1: the tile itself), the label column gets the target transform, an
// online softmax (flash-attention style running max / sum in fp32) turns the class tile into probabilities in
// place, and a second GEMM adds them, placed at each class's argmax sub-center, times the chunk into the running
// Σ_j p_ij W_j, rescaled whenever the running max moves. With gamma γ > 0 (SoftTriple) the class cosine is the
// softmax-weighted mean c = Σ_k q_k s_k, q = softmax(s/γ), over the class's K columns instead of their max, and a
// class's weight is spread over all K rows by ∂c/∂s_k = q_k (1 + (s_k − c)/γ) instead of placed at the argmax.
// ccl_fwd's epilogue turns the per-row results into the loss and query gradient; ccl_fwd_partials returns them for
// combining across the slices of a sharded bank.
// Memory: O(B·D + threads · kRowBlock · chunk · K), never B×C.
#include "common.h"

#include <torch/library.h>

#include <numeric>
#include <tuple>
#include <type_traits>
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

// The label column's transform t(c) and its derivative (fastcdml/reference/ccl.py target_logit), in fp32 as the
// Triton kernels compute it: additive cosine t = c − m, or additive angular (ArcFace) with PML's fallback.
struct TargetLogit {
  bool angular;
  float m, cos_m, sin_m;
  TargetLogit(int64_t margin_type, double margin)
      : angular(margin_type == 1), m(static_cast<float>(margin)), cos_m(static_cast<float>(std::cos(margin))),
        sin_m(static_cast<float>(std::sin(margin))) {
    TORCH_CHECK_VALUE(margin_type == 0 || margin_type == 1,
                      "margin_type must be 0 (additive cosine) or 1 (additive angular), got ", margin_type);
  }
  float operator()(float c, float* dt) const {
    if (!angular) {
      *dt = 1.f;
      return c - m;
    }
    const float cc = std::min(std::max(c, -1.f), 1.f);
    const float sin2 = (1.f - cc) * (1.f + cc);
    const float sin_t = std::sqrt(std::max(sin2, 1e-30f));
    const bool main = cc >= -cos_m;
    *dt = !(c >= -1.f && c <= 1.f) ? 0.f : main ? cos_m + (sin2 > 1e-30f ? cc * sin_m / sin_t : 0.f) : 1.f;
    return main ? cc * cos_m - sin_t * sin_m : cc - m * sin_m;
  }
};

// Classes per chunk of the bank: chunk_size(D) bank rows' worth, so that a chunk of K sub-centers per class stays
// cache-sized and the class-parallel passes have as many chunks to share out as with K = 1.
int64_t class_chunk(int64_t D, int64_t K) { return std::max<int64_t>(chunk_size(D) / K, 1); }

int64_t check_sub_centers(const Tensor& centers, int64_t sub_centers) {
  TORCH_CHECK_VALUE(sub_centers >= 1 && centers.size(0) % sub_centers == 0, "centers has ", centers.size(0),
                    " rows, not a multiple of sub_centers=", sub_centers);
  return sub_centers;
}

// The class reduction of a (rows × cc·K) similarity tile and its inverse, with buffers for one tile. reduce: the
// class tile cls[r, j] = max_k s[r, jK + k] (arg: the first k reaching it) or, with γ > 0, Σ_k q_k s[r, jK + k]
// (wts[r, jK + k] = ∂cls/∂s = q_k (1 + (s_k − cls)/γ)); K = 1: the tile itself. route: class values back onto a
// (rows × cc·K) tile, at the argmax column (0 elsewhere) or spread by wts, so that one GEMM with the chunk's bank
// rows sends each class's weight to the rows its cosine came from.
struct SubCenters {
  int64_t K;
  float gamma;  // 0: the max
  std::vector<float> cls, wts;
  std::vector<int64_t> arg;
  SubCenters(int64_t K, double gamma, int64_t tile_classes)
      : K(K), gamma(K > 1 ? static_cast<float>(gamma) : 0.f), cls(K > 1 ? tile_classes : 0),
        wts(this->gamma > 0 ? tile_classes * K : 0), arg(K > 1 && this->gamma == 0 ? tile_classes : 0) {}
  bool soft() const { return gamma > 0; }

  float* reduce(float* s, int64_t rows, int64_t cc) {
    if (K == 1) return s;
    for (int64_t i = 0; i < rows * cc; ++i) {
      const float* v = s + i * K;
      int64_t best = 0;
      float top = v[0];
      for (int64_t k = 1; k < K; ++k) {  // selects, not branches: which sub-center wins is data, not a pattern
        const bool above = v[k] > top;
        top = above ? v[k] : top;
        best = above ? k : best;
      }
      if (soft())  // s_k − max: the exponents of q, shifted by the class max so that none overflows
        for (int64_t k = 0; k < K; ++k) wts[i * K + k] = v[k] - top;
      else
        cls[i] = top, arg[i] = best;
    }
    if (!soft()) return cls.data();
    exp_row(wts.data(), rows * cc * K, 1.f / gamma, 0.f, 1.f);  // e^{(s_k − max)/γ}, the whole tile in one pass
    const float inv_gamma = 1.f / gamma;
    for (int64_t i = 0; i < rows * cc; ++i) {
      const float* v = s + i * K;
      float* w = wts.data() + i * K;
      float z = 0.f, c = 0.f;
      for (int64_t k = 0; k < K; ++k) z += w[k];
      for (int64_t k = 0; k < K; ++k) c += (w[k] /= z) * v[k];
      for (int64_t k = 0; k < K; ++k) w[k] *= 1.f + (v[k] - c) * inv_gamma;
      cls[i] = c;
    }
    return cls.data();
  }

  void route(const float* c, int64_t rows, int64_t cc, float* s) const {
    if (soft()) {
      for (int64_t i = 0; i < rows * cc; ++i)
        for (int64_t k = 0; k < K; ++k) s[i * K + k] = c[i] * wts[i * K + k];
      return;
    }
    std::fill(s, s + rows * cc * K, 0.f);
    for (int64_t i = 0; i < rows * cc; ++i) s[i * K + arg[i]] = c[i];
  }
};

// The similarity tile s = x̂_b·W_cᵀ (rb × cc·K, in sbuf; wt: W_c packed by pack_t) and its class cosines cp
// (SubCenters::reduce).
struct ClassTile {
  Tensor s;
  float* sp;
  float* cp;
};

ClassTile class_tile(Tensor& sbuf, const Tensor& xb, const PackedB& wt, int64_t rb, SubCenters& sub) {
  Tensor s = tile(sbuf, rb, wt.n);
  mm(s, xb, wt, false);
  float* sp = s.data_ptr<float>();
  return {s, sp, sub.reduce(sp, rb, wt.n / sub.K)};
}

// One row of a similarity tile (label margin already applied) → p_j = exp(s_j/τ − m_new) in place; updates the
// running max m and sum l of exp(z − m), stores this row's sum in chunk_sum and returns the factor
// exp(m_old − m_new) that rescales older sums.
float online_softmax_row(float* s, int64_t n, float inv_tau, float& m, float& l, float& chunk_sum) {
  const float m_new = std::max(m, row_max(s, n) * inv_tau);
  const float sum = exp_row(s, n, inv_tau, m_new, 1.f);
  const float alpha = std::isinf(m) ? 0.f : std::exp(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  chunk_sum = sum;
  return alpha;
}

// The per-row results of streaming one block of rows ≤ kRowBlock queries over a whole bank (stream_bank), in
// natural units z = logit/τ: m = max_j z_j, l = Σ_j e^{z_j − m}, lo = the same sum without the label's column,
// acc (rows, D) = Σ_j e^{z_j − m} W_{jK+k*_j} (only with compute_grad), and for a label the bank owns (in [0, C))
// its class cosine before the margin sy = c_y and its bank row ky = y·K + k*_y, or with γ > 0 (where acc routes
// every class over its K rows) wy (rows, K) = ∂c_y/∂s_{y,k} as the tile computed them; sy = 0 and ky = −1 for any
// other label. An empty bank (C = 0) leaves m = −inf and every sum 0.
struct RowBlock {
  int64_t r0 = 0, rows = 0;
  std::vector<float> m, l, lo, sy, wy;
  std::vector<int64_t> ky;
  Tensor acc;  // (kRowBlock, D) fp32; rows [0, rows) hold this block's sums when compute_grad
};

// The whole similarity matrix of a dense pass (stream_bank with `dense`): the bank is one chunk and each block's
// tile lies in rows [r0, r0 + rows) of `tile` (B, C·K) fp32, which the pass leaves holding e^{z_j − m} routed to
// the bank rows (SubCenters::route), the label's column included with its margin.
struct DenseTile {
  Tensor tile;
  Tensor block(int64_t r0, int64_t rows) const { return tile.narrow(0, r0, rows).view({-1}); }
};

// The streaming pass shared by ccl_fwd and ccl_fwd_partials (the math: the comment at the top). Each task of
// parallel_for owns a range of blocks of kRowBlock queries and walks the bank once, chunk by chunk, taking every one
// of its blocks through a chunk before the next, so that the chunk is packed for the two products once per task
// rather than once per block; a row's result depends only on the chunk order, not on the blocks beside it.
// consume(block) then turns each block's RowBlock into the caller's outputs, on the same thread (it writes only that
// block's rows). With `dense` the bank is one chunk whose tiles are kept (DenseTile).
template <typename Consumer>
void stream_bank(const Tensor& xh, const Tensor& y, const Tensor& centers, int64_t K, double gamma,
                 const TargetLogit& target, float inv_tau, bool compute_grad, const Consumer& consume,
                 const DenseTile* dense = nullptr) {
  const int64_t B = xh.size(0), D = xh.size(1), C = centers.size(0) / K;
  const int64_t CC = dense ? std::max<int64_t>(C, 1) : class_chunk(D, K), RB = kRowBlock;
  const int64_t* yp = y.data_ptr<int64_t>();
  const auto f32 = xh.options();
  parallel_for(0, ceil_div(B, RB), 1, [&](int64_t blk0, int64_t blk1) {
    Tensor sbuf = at::empty({dense ? 0 : RB * CC * K}, f32), wbuf = at::empty({CC * K, D}, f32);
    PackedB wt, wn;  // the chunk for s = x̂·W_cᵀ and for acc += p·W_c
    std::vector<RowBlock> blocks(blk1 - blk0);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      RowBlock& st = blocks[blk - blk0];
      st.r0 = blk * RB, st.rows = std::min(RB, B - st.r0);
      st.m.assign(RB, -std::numeric_limits<float>::infinity());
      st.l.assign(RB, 0.f), st.lo.assign(RB, 0.f), st.sy.assign(RB, 0.f), st.ky.assign(RB, -1);
      st.wy.resize(RB * K);
      st.acc = compute_grad ? at::zeros({RB, D}, f32) : at::empty({RB, D}, f32);
    }
    std::vector<float> alpha(RB);
    SubCenters sub(K, gamma, RB * CC);
    for (int64_t c0 = 0; c0 < C; c0 += CC) {
      const int64_t cc = std::min(CC, C - c0);
      const Tensor wc = rows_fp32(centers, c0 * K, cc * K, wbuf);
      wt.pack_t(wc);
      if (compute_grad) wn.pack_n(wc);
      for (RowBlock& st : blocks) {
        const int64_t r0 = st.r0, rb = st.rows;
        const Tensor xb = xh.narrow(0, r0, rb);
        if (dense) sbuf = dense->block(r0, rb);
        auto [s, sp, cp] = class_tile(sbuf, xb, wt, rb, sub);
        for (int64_t r = 0; r < rb; ++r) {
          float* row = cp + r * cc;
          const int64_t yi = yp[r0 + r];
          const bool here = yi >= c0 && yi < c0 + cc;  // never for a label outside [0, C)
          if (here) {
            float dt;
            st.sy[r] = row[yi - c0];
            if (sub.soft()) std::copy_n(sub.wts.data() + (r * cc + yi - c0) * K, K, st.wy.data() + r * K);
            st.ky[r] = yi * K + (K > 1 && !sub.soft() ? sub.arg[r * cc + yi - c0] : 0);
            row[yi - c0] = target(st.sy[r], &dt);
          }
          float chunk_sum;
          alpha[r] = online_softmax_row(row, cc, inv_tau, st.m[r], st.l[r], chunk_sum);
          if (here) {  // the same sum without the label's term, added up again rather than subtracted
            chunk_sum = 0.f;
            for (int64_t j = 0; j < cc; ++j)
              if (j != yi - c0) chunk_sum += row[j];
          }
          st.lo[r] = st.lo[r] * alpha[r] + chunk_sum;
        }
        if (K > 1 && (compute_grad || dense)) sub.route(cp, rb, cc, sp);
        if (compute_grad) {
          float* ap = st.acc.data_ptr<float>();
          for (int64_t r = 0; r < rb; ++r)
            if (alpha[r] != 1.f)
              for (int64_t k = 0; k < D; ++k) ap[r * D + k] *= alpha[r];
          mm(st.acc.narrow(0, 0, rb), s, wn, true);
        }
      }
    }
    for (const RowBlock& st : blocks) consume(st);
  });
}

// Outputs (loss, grad, lse, label_q) with label_q = 1 − p_{i,y_i} = (Σ_{j≠y} e^{z_j − m}) / l: the off-label sum is
// kept on its own so that it stays accurate when p_y → 1 (where 1 − exp(z_y − lse) would be rounding noise), and
// with `dense` a fifth, coef (B, C·K) fp32 = ∂L_i/∂s_{i,r}, the derivative of each row's loss by its similarity to
// each bank row r: p_ij/τ at the row k*_j that gave class j's cosine (0 at the class's other rows; with γ > 0
// spread over its K rows by ∂c_j/∂s), (−t' q/τ − 2λ) at the label's instead (q = label_q), 0 in a row whose
// label lies outside [0, C). Then ∂(Σ_i g_i L_i)/∂W = coefᵀ·(g ⊙ x̂) (ccl_bwd_centers_dense) needs no second
// pass over the bank.
// The epilogue of stream_bank: L = m + log l − t(c_y)/τ − 2λ c_y, and the query gradient from acc.
std::vector<Tensor> ccl_forward(const Tensor& x_in, const Tensor& labels, const Tensor& centers_in, double temperature,
                                double margin, double center_weight, bool compute_grad, int64_t margin_type,
                                int64_t sub_centers, double gamma, bool dense) {
  check_centers(x_in, centers_in);
  const TargetLogit target(margin_type, margin);
  const int64_t K = check_sub_centers(centers_in, sub_centers);
  const int64_t B = x_in.size(0), D = x_in.size(1), C = centers_in.size(0) / K;
  const Tensor y = check_labels(labels, B, "labels");
  TORCH_CHECK_VALUE(gamma >= 0, "gamma must be >= 0, got ", gamma);
  const Tensor centers = centers_in.contiguous();
  auto [xh, norm] = normalize_rows(x_in);
  const auto f32 = xh.options();
  Tensor loss = at::empty({B}, f32), lse = at::empty({B}, f32), label_q = at::empty({B}, f32);
  Tensor grad = at::empty({compute_grad ? B : 0, D}, f32);
  const DenseTile coef{at::empty({dense ? B : 0, C * K}, f32)};
  std::vector<Tensor> out{loss, grad, lse, label_q};
  if (dense) out.push_back(coef.tile);
  if (B == 0) return out;

  const float inv_tau = static_cast<float>(1.0 / temperature);
  const float lam2 = static_cast<float>(2.0 * center_weight);
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* xhp = xh.data_ptr<float>();
  const float* nrm = norm.data_ptr<float>();
  const bool soft = K > 1 && gamma > 0;
  stream_bank(xh, y, centers, K, gamma, target, inv_tau, compute_grad, [&](const RowBlock& st) {
    const int64_t r0 = st.r0;
    float* lossp = loss.data_ptr<float>() + r0;
    float* lsep = lse.data_ptr<float>() + r0;
    float* qp = label_q.data_ptr<float>() + r0;
    std::vector<float> wy(D), own(D);
    for (int64_t r = 0; r < st.rows; ++r) {
      const int64_t yi = yp[r0 + r];
      const bool valid = yi >= 0 && yi < C;
      float dt;
      const float t = target(st.sy[r], &dt);
      lsep[r] = st.m[r] + std::log(st.l[r]);
      qp[r] = st.lo[r] / st.l[r];
      lossp[r] = valid ? lsep[r] - t * inv_tau - lam2 * st.sy[r] : std::numeric_limits<float>::quiet_NaN();
      // ∂L/∂c_y = (p_y − 1) t'/τ − 2λ: the chain rule through t at the label
      const float a_label = -(dt * qp[r] * inv_tau + lam2);
      if (dense) {
        float* row = coef.tile.data_ptr<float>() + (r0 + r) * C * K;
        const float scale = inv_tau / st.l[r];
        if (!valid)
          std::fill(row, row + C * K, 0.f);
        else
          for (int64_t j = 0; j < C * K; ++j) row[j] *= scale;
        if (valid && soft)
          for (int64_t k = 0; k < K; ++k) row[yi * K + k] = a_label * st.wy[r * K + k];
        else if (valid)
          row[st.ky[r]] = a_label;
      }
      if (!compute_grad) continue;
      float* g = grad.data_ptr<float>() + (r0 + r) * D;
      if (!valid) {  // the loss row is NaN by contract; it contributes no gradient (as in the reference)
        std::fill(g, g + D, 0.f);
        continue;
      }
      // g = acc/(l τ) + a W_{y k*},  a = (−1 − (t' − 1) q)/τ − 2λ: the chain rule through t at the label; with
      // γ > 0, W_{y k*} becomes Σ_k ∂c_y/∂s_k W_{yK+k} (the weights the tile saw)
      const float a_y = (-1.f - (dt - 1.f) * qp[r]) * inv_tau - lam2;
      if (soft) {
        std::fill(wy.begin(), wy.end(), 0.f);
        for (int64_t k = 0; k < K; ++k) {
          const float* w = row_fp32(centers, yi * K + k, own.data());
          for (int64_t d = 0; d < D; ++d) wy[d] += st.wy[r * K + k] * w[d];
        }
      }
      const float* wyp = soft ? wy.data() : row_fp32(centers, st.ky[r], wy.data());
      const float* a = st.acc.data_ptr<float>() + r * D;
      const float scale = inv_tau / st.l[r];
      for (int64_t k = 0; k < D; ++k) g[k] = a[k] * scale + a_y * wyp[k];
      normalize_backward_row(g, xhp + (r0 + r) * D, nrm[r0 + r], D);
    }
  }, dense ? &coef : nullptr);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ccl_fwd(const Tensor& x, const Tensor& labels, const Tensor& centers,
                                                   double temperature, double margin, double center_weight,
                                                   bool compute_grad, int64_t margin_type, int64_t sub_centers,
                                                   double gamma) {
  const auto out = ccl_forward(x, labels, centers, temperature, margin, center_weight, compute_grad, margin_type,
                               sub_centers, gamma, false);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ccl_fwd_dense(const Tensor& x, const Tensor& labels,
                                                                 const Tensor& centers, double temperature,
                                                                 double margin, double center_weight,
                                                                 bool compute_grad, int64_t margin_type,
                                                                 int64_t sub_centers, double gamma) {
  const auto out = ccl_forward(x, labels, centers, temperature, margin, center_weight, compute_grad, margin_type,
                               sub_centers, gamma, true);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ∂(Σ_i g_i L_i)/∂W = coefᵀ·(g ⊙ x̂) (C·K, D) fp32 from ccl_fwd_dense's coef (B, C·K): one product, parallel over
// fixed blocks of bank rows, each element one FMA chain over the batch in row order (thread-count independent).
Tensor ccl_bwd_centers_dense(const Tensor& x_in, const Tensor& coef_in, const Tensor& grad_rows_in) {
  check_embeddings(x_in, "x");
  const int64_t B = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK_VALUE(coef_in.dim() == 2 && coef_in.size(0) == B && coef_in.scalar_type() == at::kFloat,
                    "coef must be float32 of shape (", B, ", C·K), got ", coef_in.scalar_type(), " ",
                    coef_in.sizes());
  TORCH_CHECK_VALUE(grad_rows_in.numel() == B, "grad_rows must have ", B, " elements");
  const Tensor coef = coef_in.contiguous(), g = grad_rows_in.to(at::kFloat).contiguous();
  const int64_t R = coef.size(1);
  Tensor xs = normalize_rows(x_in).first;  // g_i x̂_i
  float* xp = xs.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i)
    for (int64_t d = 0; d < D; ++d) xp[i * D + d] *= gp[i];
  Tensor dw = at::zeros({R, D}, xs.options());
  if (B == 0) return dw;
  constexpr int64_t kBankRows = 128;  // rows of dW per task
  parallel_for(0, ceil_div(R, kBankRows), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kBankRows, n = std::min(kBankRows, R - c0);
      addmm_tn(dw.narrow(0, c0, n), coef.narrow(1, c0, n), xs);
    }
  });
  return dw;
}

// The forward over one slice of a class-sharded bank, stopped before the epilogue (fastcdml/reference/ccl.py
// ccl_partials): stream_bank's per-row results as they are, labels outside [0, C) belonging to other slices.
// Outputs (m, l, lo, ps, acc, c_y, row_y). ps = Σ_j e^{z_j − m} c_j is computed after the pass as x̂·acc (c_j =
// x̂·W_{jK+k*_j}, so the two are equal up to rounding) rather than accumulated, so the streaming pass is unchanged.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ccl_fwd_partials(
    const Tensor& x_in, const Tensor& labels, const Tensor& centers_in, double temperature, double margin,
    bool compute_grad, int64_t margin_type, int64_t sub_centers) {
  check_centers(x_in, centers_in);
  const TargetLogit target(margin_type, margin);
  const int64_t K = check_sub_centers(centers_in, sub_centers);
  const int64_t B = x_in.size(0), D = x_in.size(1);
  const Tensor y = check_labels(labels, B, "labels");
  const Tensor centers = centers_in.contiguous();
  const Tensor xh = normalize_rows(x_in).first;
  const auto f32 = xh.options();
  const int64_t n = compute_grad ? B : 0;
  Tensor m = at::empty({B}, f32), l = at::empty({B}, f32), lo = at::empty({B}, f32), c_y = at::empty({B}, f32);
  Tensor ps = at::empty({n}, f32), acc = at::empty({n, D}, f32);
  Tensor row_y = at::empty({B}, f32.dtype(at::kLong));
  if (B == 0) return {m, l, lo, ps, acc, c_y, row_y};

  const float* xhp = xh.data_ptr<float>();
  stream_bank(xh, y, centers, K, 0.0, target, static_cast<float>(1.0 / temperature), compute_grad,
              [&](const RowBlock& st) {
                const int64_t r0 = st.r0, rb = st.rows;
                std::copy_n(st.m.begin(), rb, m.data_ptr<float>() + r0);
                std::copy_n(st.l.begin(), rb, l.data_ptr<float>() + r0);
                std::copy_n(st.lo.begin(), rb, lo.data_ptr<float>() + r0);
                std::copy_n(st.sy.begin(), rb, c_y.data_ptr<float>() + r0);
                std::copy_n(st.ky.begin(), rb, row_y.data_ptr<int64_t>() + r0);
                if (!compute_grad) return;
                const float* a = st.acc.data_ptr<float>();
                std::copy_n(a, rb * D, acc.data_ptr<float>() + r0 * D);
                float* psp = ps.data_ptr<float>() + r0;
                for (int64_t r = 0; r < rb; ++r) {
                  const float* xr = xhp + (r0 + r) * D;
                  float dot = 0.f;
                  for (int64_t k = 0; k < D; ++k) dot += xr[k] * a[r * D + k];
                  psp[r] = dot;
                }
              });
  return {m, l, lo, ps, acc, c_y, row_y};
}

// ∂L/∂W_{jK+k*} = Σ_i g_i ∂L_i/∂c_ij x̂_i with ∂L_i/∂c_ij = p_ij/τ off the label and ((p_iy − 1) t' /τ − 2λ) at it,
// parallel over class chunks (each task owns its rows of the output), rows of the batch in fixed blocks: G tile =
// the recomputed softmax placed at each class's argmax sub-center, then dW_c += Gᵀ x̂_b.
// foreign_labels: centers is one slice of a class-sharded bank and lse, label_q are the rows' global values; a
// label outside [0, C) belongs to another slice, so its row has only negatives here, p_ij/τ·g_i on every column
// (fastcdml/reference/ccl.py ccl_slice_centers_grad). Without it such a row has a NaN loss and no gradient.
Tensor ccl_bwd_centers(const Tensor& x_in, const Tensor& labels, const Tensor& centers_in, const Tensor& lse_in,
                       const Tensor& grad_rows_in, double temperature, double margin, double center_weight,
                       int64_t margin_type, int64_t sub_centers, const std::optional<Tensor>& label_q_in,
                       bool foreign_labels, double gamma) {
  check_centers(x_in, centers_in);
  const TargetLogit target(margin_type, margin);
  const int64_t K = check_sub_centers(centers_in, sub_centers);
  const int64_t B = x_in.size(0), D = x_in.size(1), C = centers_in.size(0) / K;
  const Tensor y = check_labels(labels, B, "labels");
  TORCH_CHECK_VALUE(lse_in.numel() == B && grad_rows_in.numel() == B, "lse and grad_rows must have ", B, " elements");
  const Tensor centers = centers_in.contiguous();
  const Tensor lse = lse_in.to(at::kFloat).contiguous(), g = grad_rows_in.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(!label_q_in || label_q_in->numel() == B, "label_q must have ", B, " elements");
  const Tensor label_q = label_q_in ? label_q_in->to(at::kFloat).contiguous() : Tensor();
  const float* qp = label_q_in ? label_q.data_ptr<float>() : nullptr;
  Tensor xh = normalize_rows(x_in).first;
  const auto f32 = xh.options();
  Tensor dw = at::zeros({C * K, D}, f32);
  if (B == 0) return dw;

  const float inv_tau = static_cast<float>(1.0 / temperature);
  const float lam2 = static_cast<float>(2.0 * center_weight);
  const int64_t CC = class_chunk(D, K), RB = kRowBlock;
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* lsep = lse.data_ptr<float>();
  const float* gp = g.data_ptr<float>();

  TORCH_CHECK_VALUE(gamma >= 0, "gamma must be >= 0, got ", gamma);
  parallel_for(0, ceil_div(C, CC), 1, [&](int64_t ch0, int64_t ch1) {
    Tensor sbuf = at::empty({RB * CC * K}, f32), wbuf = at::empty({CC * K, D}, f32);
    PackedB wt;  // the chunk for s = x̂·W_cᵀ, packed once for every block of rows
    SubCenters sub(K, gamma, RB * CC);
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      const int64_t c0 = ch * CC, cc = std::min(CC, C - c0);
      wt.pack_t(rows_fp32(centers, c0 * K, cc * K, wbuf));
      Tensor dwc = dw.narrow(0, c0 * K, cc * K);
      for (int64_t r0 = 0; r0 < B; r0 += RB) {
        const int64_t rb = std::min(RB, B - r0);
        const Tensor xb = xh.narrow(0, r0, rb);
        auto [s, sp, cp] = class_tile(sbuf, xb, wt, rb, sub);
        for (int64_t r = 0; r < rb; ++r) {
          float* row = cp + r * cc;
          const int64_t yi = yp[r0 + r];
          if (!foreign_labels && (yi < 0 || yi >= C)) {  // NaN loss row: no gradient, as in the reference
            std::fill(row, row + cc, 0.f);
            continue;
          }
          const bool here = yi >= c0 && yi < c0 + cc;
          float dt = 1.f;
          if (here) row[yi - c0] = target(row[yi - c0], &dt);
          exp_row(row, cc, inv_tau, lsep[r0 + r], gp[r0 + r] * inv_tau);  // p_ij g_i / τ
          // label: g·(−t' q/τ − 2λ), q = 1 − p_y from the forward when given
          if (here && qp) row[yi - c0] = -gp[r0 + r] * (dt * qp[r0 + r] * inv_tau + lam2);
          if (here && !qp) row[yi - c0] = row[yi - c0] * dt - gp[r0 + r] * (dt * inv_tau + lam2);
        }
        if (K > 1) sub.route(cp, rb, cc, sp);
        addmm_tn(dwc, s, xb);
      }
    }
  });
  return dw;
}

// The layouts of a bank's rows: element (r, k) at r·s0 + k·s1, with a stride of 1 known at compile time (rows
// stored as the columns of PML's W: s0 = 1; contiguous rows: s1 = 1), so that the loops over a block's rows or
// over a row vectorise. Blocks of kNormRows rows: one cache line of each of D rows of W, or of D columns of a
// block of contiguous rows, so that a block's loads stay in the L1 cache.
constexpr int64_t kNormRows = 16;

template <typename Body>
void with_layout(int64_t s0, int64_t s1, const Body& body) {
  using One = std::integral_constant<int64_t, 1>;
  if (s0 == 1)
    body(One{}, s1);
  else if (s1 == 1)
    body(s0, One{});
  else
    body(s0, s1);
}

// The norms of a block of nr ≤ kNormRows rows (element (r, k) at a[r·s0 + k·s1]), each summed over D in order,
// into nrm, and 1 / max(norm, eps) into inv.
template <typename S0, typename S1>
FASTCDML_INLINE void block_norms(const float* a, S0 s0, S1 s1, int64_t nr, int64_t d, float* nrm, float* inv) {
  std::fill(inv, inv + nr, 0.f);
  for (int64_t k = 0; k < d; ++k)
    for (int64_t r = 0; r < nr; ++r) inv[r] += a[r * s0 + k * s1] * a[r * s0 + k * s1];
  for (int64_t r = 0; r < nr; ++r) {
    nrm[r] = std::sqrt(inv[r]);
    inv[r] = 1.f / std::max(nrm[r], kEps);
  }
}

// A learnable bank's rows normalised, for the kernels: (n, D) contiguous fp32 = rows / max(‖row‖, eps), from rows
// (n, D) fp32/bf16/fp16 of any strides (PML's W is stored (D, n): its rows are the bank rows). One pass, rows in
// fixed blocks (kNormRows).
Tensor ccl_normalize_rows(const Tensor& rows_in) {
  check_embeddings(rows_in, "rows");
  const Tensor rows = rows_in.to(at::kFloat);  // itself when fp32, strides kept
  const int64_t n = rows.size(0), d = rows.size(1);
  Tensor out = at::empty({n, d}, rows.options());
  const float* src = rows.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  with_layout(rows.stride(0), rows.stride(1), [&](auto s0, auto s1) {
    parallel_for(0, ceil_div(n, kNormRows), 1, [&](int64_t b0, int64_t b1) {
      float nrm[kNormRows], inv[kNormRows];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kNormRows, nr = std::min(kNormRows, n - r0);
        const float* a = src + r0 * s0;
        block_norms(a, s0, s1, nr, d, nrm, inv);
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t k = 0; k < d; ++k) dst[(r0 + r) * d + k] = a[r * s0 + k * s1] * inv[r];
      }
    });
  });
  return out;
}

// The backward of ccl_normalize_rows: ∂/∂rows (fp32, laid out as `rows`) from grad (n, D) = ∂/∂out, i.e.
// (g − x̂ (x̂·g)) / ‖row‖ (g / eps where the clamp is active). x̂ is recomputed from rows (the same arithmetic as the
// forward), so the forward's output need not be kept for backward.
Tensor ccl_normalize_rows_backward(const Tensor& grad_in, const Tensor& rows_in) {
  check_embeddings(rows_in, "rows");
  TORCH_CHECK_VALUE(grad_in.sizes() == rows_in.sizes(), "grad must have shape ", rows_in.sizes(), ", got ",
                    grad_in.sizes());
  const Tensor grad = grad_in.to(at::kFloat).contiguous(), rows = rows_in.to(at::kFloat);
  const int64_t n = rows.size(0), d = rows.size(1);
  Tensor g_rows = at::empty_like(rows);  // rows' strides
  const float* gp = grad.data_ptr<float>();
  const float* src = rows.data_ptr<float>();
  float* dst = g_rows.data_ptr<float>();
  TORCH_CHECK(g_rows.strides() == rows.strides(), "ccl_normalize_rows_backward: rows must be dense");
  with_layout(rows.stride(0), rows.stride(1), [&](auto s0, auto s1) {
    parallel_for(0, ceil_div(n, kNormRows), 1, [&](int64_t b0, int64_t b1) {
      float nrm[kNormRows], inv[kNormRows], dot[kNormRows];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kNormRows, nr = std::min(kNormRows, n - r0);
        const float* a = src + r0 * s0;
        const float* g = gp + r0 * d;
        float* o = dst + r0 * s0;
        block_norms(a, s0, s1, nr, d, nrm, inv);
        std::fill(dot, dot + nr, 0.f);
        for (int64_t k = 0; k < d; ++k)
          for (int64_t r = 0; r < nr; ++r) dot[r] += a[r * s0 + k * s1] * inv[r] * g[r * d + k];
        for (int64_t r = 0; r < nr; ++r) {  // below eps the clamp is active: out = rows / eps is linear
          const bool clamped = nrm[r] < kEps;
          dot[r] = clamped ? 0.f : dot[r];
          nrm[r] = 1.f / (clamped ? kEps : nrm[r]);
        }
        for (int64_t k = 0; k < d; ++k)
          for (int64_t r = 0; r < nr; ++r)
            o[r * s0 + k * s1] = (g[r * d + k] - a[r * s0 + k * s1] * inv[r] * dot[r]) * nrm[r];
      }
    });
  });
  return g_rows;
}

// W_r ← normalize(μ W_r + (1 − μ) mean_{r_i = r} x̂_i) for each bank row r that a query of the batch moves: r_i = y_i,
// or with K sub-centers per class the row y_i·K + argmax_k x̂_i·W_{y_i K + k} (first k on a tie, from the bank before
// the step). Rows sorted by (r_i, row index), one segment per bank row summed in row order in fp32, so the result
// does not depend on threads.
void ccl_momentum_update_(const Tensor& centers, const Tensor& x_in, const Tensor& labels, double momentum,
                 int64_t sub_centers) {
  check_centers(x_in, centers);
  TORCH_CHECK_VALUE(centers.is_contiguous(), "centers must be contiguous to be updated in place");
  TORCH_CHECK_TYPE(centers.scalar_type() == at::kFloat || centers.scalar_type() == at::kBFloat16,
                   "centers must be float32 or bfloat16, got ", centers.scalar_type());
  const int64_t K = check_sub_centers(centers, sub_centers);
  const int64_t B = x_in.size(0), D = x_in.size(1), C = centers.size(0) / K;
  const Tensor y = check_labels(labels, B, "labels");
  if (B == 0) return;
  const Tensor xh = normalize_rows(x_in).first;
  const float* xhp = xh.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  std::vector<int64_t> target(B, -1);  // the bank row each query moves, −1 for none
  for (int64_t i = 0; i < B; ++i) {
    if (yp[i] < 0 || yp[i] >= C) continue;
    int64_t best = 0;
    float best_s = -std::numeric_limits<float>::infinity();
    if (K > 1) {
      const Tensor own = centers.narrow(0, yp[i] * K, K).to(at::kFloat).contiguous();
      const float* w = own.data_ptr<float>();
      for (int64_t k = 0; k < K; ++k) {
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += xhp[i * D + d] * w[k * D + d];
        if (dot > best_s) best_s = dot, best = k;
      }
    }
    target[i] = yp[i] * K + best;
  }
  std::vector<int64_t> order;
  order.reserve(B);
  for (int64_t i = 0; i < B; ++i)
    if (target[i] >= 0) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return target[a] < target[b]; });
  std::vector<int64_t> starts;  // segment boundaries in `order`
  for (size_t i = 0; i < order.size(); ++i)
    if (i == 0 || target[order[i]] != target[order[i - 1]]) starts.push_back(static_cast<int64_t>(i));
  starts.push_back(static_cast<int64_t>(order.size()));

  const float mu = static_cast<float>(momentum);
  const int64_t segments = static_cast<int64_t>(starts.size()) - 1;
  parallel_for(0, segments, 16, [&](int64_t s0, int64_t s1) {
    Tensor mixed = at::empty({D}, xh.options());
    float* mx = mixed.data_ptr<float>();
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t k = target[order[starts[s]]], count = starts[s + 1] - starts[s];
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

void register_ccl(torch::Library& m) {
  m.impl("ccl_fwd", &ccl_fwd);
  m.impl("ccl_fwd_dense", &ccl_fwd_dense);
  m.impl("ccl_bwd_centers_dense", &ccl_bwd_centers_dense);
  m.impl("ccl_normalize_rows", &ccl_normalize_rows);
  m.impl("ccl_normalize_rows_backward", &ccl_normalize_rows_backward);
  m.impl("ccl_fwd_partials", &ccl_fwd_partials);
  m.impl("ccl_bwd_centers", &ccl_bwd_centers);
  m.impl("ccl_momentum_update_", &ccl_momentum_update_);
}

}  // namespace fastcdml
