// Contrastive Bayesian Metric Learning loss, CPU kernel for fastcdml::cbml_fwd (schema: fastcdml/ops/cbml.py,
// math: docs/spec.md and fastcdml/reference/cbml.py).
//
// The reference set R = [x̂ if include_self] ++ [r̂] is normalised once, straight into one fp32 (N, D) buffer (x̂ is
// its first B rows). Its columns are cut into chunks of chunk_size(D), the self part [0, B) and the memory part
// [B, N) separately. Similarities are computed tile by tile (kRowBlock queries × one chunk, one at::mm each), never
// held as B×N: a block's whole strip of tiles is kept across the passes while it holds at most kMaxStrip floats
// (4 MiB), else tiles are recomputed (bit-identical: same operands and shapes); the self part S = x̂ x̂ᵀ is kept
// whole for the self gradient pass under the same bound (B <= 1024), else recomputed there.
//   pass 1   row sum, positives' count / Σ / min (argmin), negatives' count / Σ / Σ² / max (argmax), and in top-K
//            mode a
//            running top-K per row whose worst element is the selection threshold (order: larger S, then lower
//            index, so ties pick the lowest index); then the variance centre μ (class means or boundary form);
//   pass 2   the hard-positive / hard-negative sums log(1 + Σ exp(t)) as log-sum-exps shifted by their known
//            maxima (minP and maxN are the hardest selected elements of a row that is not skipped);
//   grad     G_ij = ∂loss/∂S_ij per tile, from row i's scalars. Memory part: ∂/∂x̂_I += G_I r̂ in the same task as
//            passes 1-2. Self part (after every row's scalars are known): S is symmetric, so block I's strip also
//            holds S_JI = S_IJᵀ and H_I = G_I + (Gᵀ)_I (row j's gradient evaluated at column i) gives both roles of
//            x̂ in one product ∂/∂x̂_I += H_I x̂, with no pass over Gᵀ. Explicit ∂/∂r̂ = Gᵀ x̂ (ref requiring a
//            gradient) runs as a loop over reference chunks, each task owning its output rows (no atomics).
//            Then the normalisation backward.
// Elementwise loops are branch-free over fixed 8-lane accumulators, so they vectorise and their summation order is
// fixed by the code, not by the thread count.
// The branch-free loops below select between values computed on both sides (t_pos / t_neg, ...); GCC if-converts
// (vectorises) them only when FP operations may be assumed not to trap. Set for the whole translation unit, before
// any header, so that every inline function agrees on it; it changes no result.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "common.h"

#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fastcdml {
namespace {

using at::Tensor;

constexpr int64_t kMaxStrip = int64_t{1} << 20;
constexpr int kLanes = 8;
constexpr float kInf = std::numeric_limits<float>::infinity();

// lane(l, j) for the columns j of [0, n), j on lane l = j mod kLanes: each lane keeps its own partial sums, so the
// full groups of kLanes vectorise and the sums do not depend on a reduction order chosen by the compiler.
template <class Lane>
inline void over_lanes(int64_t n, Lane&& lane) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane(l, j + l);
  for (int l = 0; j < n; ++j, ++l) lane(l, j);
}

enum Phi : int64_t { kLog = 0, kSqrt = 1, kConstant = 2 };

struct Hyper {
  float pos_a, pos_b, neg_a, neg_b, margin, w, h;
  int64_t phi;
  float pos_w, neg_w;  // the weights of φ = constant
  bool class_means;    // μ = h·mean(P) + (1−h)·mean(N), else (1−h)·mean(row) + h·(minP + maxN)/2
  int64_t top_k;
  bool self;  // the first B references are the queries themselves
};

// Mined pairs: bit j % 8 of byte [i, j / 8] allows pair (i, j) to be a positive or a negative. Without a mask
// every pair is allowed: the rows point at one all-ones byte with zero strides, so the lookups stay branch-free.
struct PairMask {
  const uint8_t* p;
  int64_t stride, step;  // bytes per row; 1, or 0 when unmasked
  const uint8_t* row(int64_t i) const { return p + i * stride; }
};
inline const uint8_t kAllPairs = 0xFF;
FASTCDML_INLINE bool allowed(const uint8_t* mrow, int64_t step, int64_t j) {
  return (mrow[(j >> 3) * step] >> (j & 7)) & 1;
}

struct Row {
  // pass 1
  double sum = 0, pos_sum = 0, neg_sum = 0, neg_sq = 0;
  int64_t n_pos = 0, n_neg = 0, arg_min_p = -1, arg_max_n = -1;
  float min_p = kInf, max_n = -kInf;
  float top_v = -kInf;  // top-K threshold (value, index)
  int64_t top_i = std::numeric_limits<int64_t>::max();
  float mean = 0, sigma = 0;
  // pass 2: u = shift + log(sum), the sum including exp(-shift) for the "1 +" term
  float pm = 0, ps = 1, nm = 0, ns = 1;
  int64_t n_hard_pos = 0, n_hard_neg = 0;
  bool valid = false;  // the row is not skipped
  float loss = 0;
};

// Per-row gradient coefficients in structure-of-arrays form (the self pass reads them along a tile row). Skipped rows
// have zero coefficients, zero mean / shifts and no picks, so the same branch-free formula yields G = 0 for them.
struct Coefs {
  explicit Coefs(int64_t n)
      : max_n(n), min_p(n), top_v(n), mean(n), u_pos(n), u_neg(n), c_pos(n), c_neg(n), c_var(n), c_all(n),
        c_mpos(n), c_mneg(n), c_pick(n), top_i(n), arg_min(n), arg_max(n) {}
  // ∂loss/∂μ spread over S: c_all on every present column, c_mpos on P, c_mneg on N, c_pick on minP and maxN
  std::vector<float> max_n, min_p, top_v, mean, u_pos, u_neg, c_pos, c_neg, c_var, c_all, c_mpos, c_mneg, c_pick;
  std::vector<int64_t> top_i, arg_min, arg_max;
};

// The rule is a template argument and the operators do not short-circuit, so that loops if-convert (vectorise).
// Top-K: tie_ok = (column index <= top_i); is_top = (column index == top_i) selects the threshold element by index,
// so the self pass, which reads S_ij for row j's S_ji (at::mm does not guarantee they are bitwise equal), keeps it.
template <bool kTopK>
FASTCDML_INLINE bool hard_neg(const Hyper& hp, float v, float min_p, float top_v, bool tie_ok, bool is_top) {
  if constexpr (kTopK) return (v > top_v) | ((v == top_v) & tie_ok) | is_top;
  return v + hp.margin > min_p;
}

// Row i's gradient scalars, as plain values / pointers so that the loops using them vectorise.
struct RowCoef {
  float max_n, min_p, top_v, mean, u_pos, u_neg, c_pos, c_neg, c_var, c_all, c_mpos, c_mneg;
};

// ∂loss/∂S for one element of a row with scalars k, without the minP / maxN pick terms. present: y_j >= 0 (a
// negative reference label marks an empty memory slot: in no set, not in the mean, zero gradient); same: y_j = y_i
// and present; ok: the pair is allowed by the mined-pair mask; excluded: the self pair; tie_ok: j <= top_i.
template <bool kTopK>
FASTCDML_INLINE float grad_elem(const Hyper& hp, const RowCoef& k, float v, bool same, bool present, bool ok,
                                bool excluded, bool tie_ok, bool is_top) {
  const bool neg = !same & present & ok, pos = same & ok & !excluded;
  const bool hpos = pos & (v - hp.margin < k.max_n);
  const bool hneg = neg & hard_neg<kTopK>(hp, v, k.min_p, k.top_v, tie_ok, is_top);
  const float t_pos = -(v - hp.pos_a) / hp.pos_b - k.u_pos, t_neg = (v - hp.neg_a) / hp.neg_b - k.u_neg;
  const float coef = hpos ? k.c_pos : (hneg ? k.c_neg : 0.f), var = k.c_var * (v - k.mean);
  const float g = k.c_all + coef * fast_exp(same ? t_pos : t_neg) + (neg ? var + k.c_mneg : 0.f) +
                  (pos ? k.c_mpos : 0.f);
  return present ? g : 0.f;
}

FASTCDML_INLINE RowCoef row_coef(const Coefs& c, int64_t i) {
  return {c.max_n[i], c.min_p[i], c.top_v[i], c.mean[i], c.u_pos[i], c.u_neg[i],
          c.c_pos[i], c.c_neg[i], c.c_var[i], c.c_all[i], c.c_mpos[i], c.c_mneg[i]};
}

// "a ranks before b" for top-K: larger S, ties broken by the lower index. A heap under this order keeps its
// worst element at the front.
inline bool ranks_before(const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

FASTCDML_SIMD_CLONES
void pass1_row(Row& st, const Hyper hp, const float* s, int64_t cc, int64_t c0, int64_t i, int64_t yi,
               const int64_t* yr, const uint8_t* mrow, int64_t mstep, int64_t k,
               std::vector<std::pair<float, int64_t>>& heap) {
  double sum[kLanes] = {}, psum[kLanes] = {}, nsum[kLanes] = {}, nsq[kLanes] = {};
  float mn[kLanes], mx[kLanes];
  int64_t npos[kLanes] = {}, nneg[kLanes] = {};
  std::fill(mn, mn + kLanes, kInf);
  std::fill(mx, mx + kLanes, -kInf);
  auto lane = [&](int l, int64_t jj) FASTCDML_INLINE_LAMBDA {
    const float v = s[jj];
    const int64_t j = c0 + jj;
    const bool present = yr[j] >= 0, same = present & (yr[j] == yi), ok = allowed(mrow, mstep, j);
    const bool pos = same & ok & !(hp.self & (j == i)), neg = present & !same & ok;
    const double vd = neg ? static_cast<double>(v) : 0.0;
    sum[l] += present ? v : 0.f;
    psum[l] += pos ? static_cast<double>(v) : 0.0;
    nsum[l] += vd;
    nsq[l] += vd * vd;
    mn[l] = std::min(mn[l], pos ? v : kInf);
    mx[l] = std::max(mx[l], neg ? v : -kInf);
    npos[l] += pos;
    nneg[l] += neg;
  };
  over_lanes(cc, lane);
  int64_t jj = 0;
  float cmin = kInf, cmax = -kInf;
  for (int l = 0; l < kLanes; ++l) {
    st.sum += sum[l], st.pos_sum += psum[l], st.neg_sum += nsum[l], st.neg_sq += nsq[l];
    st.n_pos += npos[l], st.n_neg += nneg[l];
    cmin = std::min(cmin, mn[l]), cmax = std::max(cmax, mx[l]);
  }
  // first index of a new strict minimum / maximum (earlier chunks keep their lower indices on ties)
  if (cmin < st.min_p) {
    st.min_p = cmin;
    for (jj = 0; jj < cc; ++jj)
      if (s[jj] == cmin && yr[c0 + jj] == yi && yi >= 0 && !(hp.self && c0 + jj == i) &&
          allowed(mrow, mstep, c0 + jj))
        break;
    st.arg_min_p = c0 + jj;
  }
  if (cmax > st.max_n) {
    st.max_n = cmax;
    for (jj = 0; jj < cc; ++jj)
      if (s[jj] == cmax && yr[c0 + jj] != yi && yr[c0 + jj] >= 0 && allowed(mrow, mstep, c0 + jj)) break;
    st.arg_max_n = c0 + jj;
  }
  if (k == 0) return;
  for (jj = 0; jj < cc; ++jj) {
    if (yr[c0 + jj] == yi || yr[c0 + jj] < 0 || !allowed(mrow, mstep, c0 + jj)) continue;
    const std::pair<float, int64_t> e{s[jj], c0 + jj};
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back(e);
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    } else if (ranks_before(e, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), ranks_before);
      heap.back() = e;
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    }
  }
}

void finish_pass1(Row& st, const Hyper& hp, int64_t n_ref, int64_t k, const std::vector<std::pair<float, int64_t>>& heap) {
  const double mean =
      hp.class_means ? hp.h * st.pos_sum / std::max<int64_t>(st.n_pos, 1) +
                           (1.0 - hp.h) * st.neg_sum / std::max<int64_t>(st.n_neg, 1)
                     : (1.0 - hp.h) * st.sum / n_ref + hp.h * (static_cast<double>(st.min_p) + st.max_n) / 2;
  st.mean = static_cast<float>(mean);
  st.sigma = static_cast<float>(st.neg_sq - 2 * mean * st.neg_sum + st.n_neg * mean * mean);
  if (k > 0 && static_cast<int64_t>(heap.size()) == k) st.top_v = heap.front().first, st.top_i = heap.front().second;
  // Shifts of the two log-sum-exps: every hard positive has S >= minP and every hard negative S <= maxN, and when
  // the row is not skipped these bounds are attained, so exp(t - shift) <= 1 and the largest term is 1.
  if (st.n_pos > 0 && st.n_neg > 0) {
    st.pm = std::max(0.f, -(st.min_p - hp.pos_a) / hp.pos_b);
    st.nm = std::max(0.f, (st.max_n - hp.neg_a) / hp.neg_b);
  }
  st.ps = std::exp(-st.pm), st.ns = std::exp(-st.nm);
}

template <bool kTopK>
FASTCDML_SIMD_CLONES void pass2_row(Row& st, const Hyper hp, const float* s, int64_t cc, int64_t c0, int64_t i, int64_t yi,
               const int64_t* yr, const uint8_t* mrow, int64_t mstep) {
  float sp[kLanes] = {}, sn[kLanes] = {};
  int64_t nhp[kLanes] = {}, nhn[kLanes] = {};
  const float max_n = st.max_n, min_p = st.min_p, top_v = st.top_v, pm = st.pm, nm = st.nm;
  const int64_t top_i = st.top_i;
  auto lane = [&](int l, int64_t jj) FASTCDML_INLINE_LAMBDA {
    const float v = s[jj];
    const int64_t j = c0 + jj;
    const bool present = yr[j] >= 0, same = present & (yr[j] == yi), ok = allowed(mrow, mstep, j);
    const bool hpos = same & ok & !(hp.self & (j == i)) & (v - hp.margin < max_n);
    const bool hneg = present & !same & ok & hard_neg<kTopK>(hp, v, min_p, top_v, j <= top_i, j == top_i);
    const float t_pos = -(v - hp.pos_a) / hp.pos_b - pm, t_neg = (v - hp.neg_a) / hp.neg_b - nm;
    const float e = fast_exp(same ? t_pos : t_neg);
    sp[l] += hpos ? e : 0.f;
    sn[l] += hneg ? e : 0.f;
    nhp[l] += hpos;
    nhn[l] += hneg;
  };
  over_lanes(cc, lane);
  for (int l = 0; l < kLanes; ++l) st.ps += sp[l], st.ns += sn[l], st.n_hard_pos += nhp[l], st.n_hard_neg += nhn[l];
}

// Loss of the row and its gradient coefficients (already divided by B) into c.
void finish_pass2(Row& st, Coefs& c, int64_t i, const Hyper& hp, int64_t n_ref, int64_t batch) {
  st.valid = st.n_pos > 0 && st.n_neg > 0 && st.n_hard_pos > 0 && st.n_hard_neg > 0;
  c.max_n[i] = st.max_n, c.min_p[i] = st.min_p, c.top_v[i] = st.top_v, c.top_i[i] = st.top_i;
  if (!st.valid) {
    for (auto* v : {&c.mean, &c.u_pos, &c.u_neg, &c.c_pos, &c.c_neg, &c.c_var, &c.c_all, &c.c_mpos, &c.c_mneg,
                    &c.c_pick})
      (*v)[i] = 0.f;
    c.arg_min[i] = c.arg_max[i] = -1;
    return;
  }
  const float u_pos = st.pm + std::log(st.ps), u_neg = st.nm + std::log(st.ns);
  // φ(u) and dφ/du with u = log(1 + Σ): log (u itself, 1), sqrt (exp(u/2), exp(u/2)/2) or constant
  // (1 + w·Σ = 1 + w·(e^u − 1), w·e^u with e^u = the shifted sum times exp(shift))
  auto phi = [&](float u, float sum, float shift, float w, float& d) {
    if (hp.phi == kSqrt) return d = std::exp(u / 2) / 2, 2 * d;
    if (hp.phi == kConstant) {
      const float e = sum * std::exp(shift);
      return d = w * e, 1.f + w * (e - 1.f);
    }
    return d = 1.f, u;
  };
  float d_pos, d_neg;
  const float pos = phi(u_pos, st.ps, st.pm, hp.pos_w, d_pos), neg = phi(u_neg, st.ns, st.nm, hp.neg_w, d_neg);
  st.loss = pos + neg + hp.w * st.sigma;
  const float inv_b = 1.f / static_cast<float>(batch);
  // ∂σ/∂μ, spread over the class means (P and N) or over the row mean (every j) and the two picked elements
  const double dmean = -2.0 * hp.w * (st.neg_sum - st.n_neg * static_cast<double>(st.mean));
  c.mean[i] = st.mean, c.u_pos[i] = u_pos, c.u_neg[i] = u_neg;
  c.c_pos[i] = d_pos * (-1.f / hp.pos_b) * inv_b;
  c.c_neg[i] = d_neg * (1.f / hp.neg_b) * inv_b;
  c.c_var[i] = 2.f * hp.w * inv_b;
  const double cm = hp.class_means ? 1.0 : 0.0;
  c.c_mpos[i] = static_cast<float>(cm * dmean * hp.h / st.n_pos) * inv_b;
  c.c_mneg[i] = static_cast<float>(cm * dmean * (1.0 - hp.h) / st.n_neg) * inv_b;
  c.c_all[i] = static_cast<float>((1.0 - cm) * dmean * (1.0 - hp.h) / n_ref) * inv_b;
  c.c_pick[i] = static_cast<float>((1.0 - cm) * dmean * hp.h / 2) * inv_b;
  c.arg_min[i] = st.arg_min_p, c.arg_max[i] = st.arg_max_n;
}

// One row of a tile, S → G = ∂loss/∂S in place, from row i's scalars.
template <bool kTopK>
FASTCDML_SIMD_CLONES void grad_row(const Coefs& c, const Hyper hp, float* __restrict s, int64_t cc, int64_t c0, int64_t i, int64_t yi,
              const int64_t* __restrict yr, const uint8_t* mrow, int64_t mstep) {
  const RowCoef k = row_coef(c, i);
  const int64_t top_i = c.top_i[i];
  for (int64_t jj = 0; jj < cc; ++jj) {
    const int64_t j = c0 + jj;
    const bool present = yr[j] >= 0;
    s[jj] = grad_elem<kTopK>(hp, k, s[jj], present & (yr[j] == yi), present, allowed(mrow, mstep, j),
                             hp.self & (j == i), j <= top_i, j == top_i);
  }
  for (const int64_t a : {c.arg_min[i], c.arg_max[i]})
    if (a >= c0 && a < c0 + cc) s[a - c0] += c.c_pick[i];
}

// Self part, one row i of a tile of S = x̂ x̂ᵀ (columns c0.. are batch rows), S → H in place: H_ij = G_ij + G_ji, the
// second from row j's scalars with column i (S_ji = S_ij). picked_by: the rows j whose minP / maxN is column i.
template <bool kTopK>
FASTCDML_SIMD_CLONES void grad_row_self(const Coefs& c, const Hyper hp, float* __restrict s, int64_t cc, int64_t c0, int64_t i,
                   const int64_t* __restrict y, const PairMask& mask, const int64_t* picked_by, int64_t n_picked) {
  const int64_t yi = y[i], top_i = c.top_i[i];
  const RowCoef k = row_coef(c, i);
  const float *__restrict max_n = c.max_n.data() + c0, *__restrict min_p = c.min_p.data() + c0,
              *__restrict top_v = c.top_v.data() + c0, *__restrict mean = c.mean.data() + c0,
              *__restrict u_pos = c.u_pos.data() + c0, *__restrict u_neg = c.u_neg.data() + c0,
              *__restrict c_pos = c.c_pos.data() + c0, *__restrict c_neg = c.c_neg.data() + c0,
              *__restrict c_var = c.c_var.data() + c0, *__restrict c_all = c.c_all.data() + c0,
              *__restrict c_mpos = c.c_mpos.data() + c0, *__restrict c_mneg = c.c_mneg.data() + c0;
  const int64_t* __restrict top_j = c.top_i.data() + c0;
  const int64_t* __restrict yc = y + c0;
  for (int64_t jj = 0; jj < cc; ++jj) {
    const float v = s[jj];
    const bool present_j = yc[jj] >= 0, present_i = yi >= 0, equal = yc[jj] == yi, diag = c0 + jj == i;
    const RowCoef kj{max_n[jj], min_p[jj], top_v[jj], mean[jj], u_pos[jj], u_neg[jj],
                     c_pos[jj], c_neg[jj], c_var[jj], c_all[jj], c_mpos[jj], c_mneg[jj]};
    const bool ok_ij = allowed(mask.row(i), mask.step, c0 + jj), ok_ji = allowed(mask.row(c0 + jj), mask.step, i);
    s[jj] = grad_elem<kTopK>(hp, k, v, equal & present_j, present_j, ok_ij, diag, c0 + jj <= top_i,
                             c0 + jj == top_i) +
            grad_elem<kTopK>(hp, kj, v, equal & present_i, present_i, ok_ji, diag, i <= top_j[jj], i == top_j[jj]);
  }
  for (const int64_t a : {c.arg_min[i], c.arg_max[i]})
    if (a >= c0 && a < c0 + cc) s[a - c0] += c.c_pick[i];
  for (int64_t p = 0; p < n_picked; ++p)
    if (picked_by[p] >= c0 && picked_by[p] < c0 + cc) s[picked_by[p] - c0] += c.c_pick[picked_by[p]];
}

std::tuple<Tensor, Tensor, Tensor> cbml_fwd(const Tensor& x_in, const Tensor& labels, const Tensor& ref_in,
                                            const Tensor& ref_labels, const std::optional<Tensor>& pair_mask,
                                            bool include_self, double pos_a, double pos_b,
                                            double neg_a, double neg_b, double margin, double variance_weight,
                                            double mean_weight, int64_t phi, double pos_weight,
                                            double neg_weight, bool class_means, int64_t top_k, bool want_gx,
                                            bool want_gref) {
  check_embeddings(x_in, "x");
  check_embeddings(ref_in, "ref");
  const int64_t B = x_in.size(0), D = x_in.size(1), M = ref_in.size(0);
  TORCH_CHECK_VALUE(ref_in.size(1) == D, "ref must have shape (M, ", D, "), got ", ref_in.sizes());
  TORCH_CHECK_VALUE(include_self || M > 0, "the reference set is empty: give ref_emb or set include_self=True");
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(phi >= kLog && phi <= kConstant, "phi must be 0 (log), 1 (sqrt) or 2 (constant), got ", phi);
  const Tensor y = check_labels(labels, B, "labels");
  const Tensor y_ref = check_labels(ref_labels, M, "ref_labels");
  const auto f32 = x_in.options().dtype(at::kFloat);
  Tensor gx = at::zeros({want_gx ? B : 0, D}, f32), gref = at::zeros({want_gref ? M : 0, D}, f32);
  if (B == 0) return {at::zeros({}, f32), gx, gref};

  // R = [x̂ if include_self] ++ [r̂], normalised in place; xh / rh are views of it when they are part of it.
  const int64_t off = include_self ? B : 0;  // index of the first r̂ in R
  const int64_t N = off + M;
  Tensor R = at::empty({N, D}, f32), xnorm = at::empty({B}, f32), rnorm = at::empty({M}, f32);
  const Tensor xh = include_self ? R.narrow(0, 0, B) : at::empty({B, D}, f32);
  const Tensor rh = R.narrow(0, off, M);
  normalize_rows_into(x_in, xh, xnorm);
  if (M > 0) normalize_rows_into(ref_in, rh, rnorm);
  const Tensor yr = include_self ? (M > 0 ? at::cat({y, y_ref}) : y) : y_ref;
  const Hyper hp{static_cast<float>(pos_a), static_cast<float>(pos_b),  static_cast<float>(neg_a),
                 static_cast<float>(neg_b), static_cast<float>(margin), static_cast<float>(variance_weight),
                 static_cast<float>(mean_weight), phi, static_cast<float>(pos_weight),
                 static_cast<float>(neg_weight), class_means, top_k, include_self};
  const int64_t K = std::min(top_k, N), RB = kRowBlock, CC = chunk_size(D);
  const int64_t* yp = y.data_ptr<int64_t>();
  const int64_t* yrp = yr.data_ptr<int64_t>();
  PairMask mask{&kAllPairs, 0, 0};
  Tensor mask_t;
  if (pair_mask.has_value()) {
    mask_t = *pair_mask;
    TORCH_CHECK_VALUE(mask_t.scalar_type() == at::kByte && mask_t.dim() == 2 && mask_t.size(0) == B &&
                          mask_t.size(1) == ceil_div(N, 8),
                      "pair_mask must be a (", B, ", ", ceil_div(N, 8), ") uint8 tensor, got ", mask_t.sizes(), " ",
                      mask_t.scalar_type());
    mask_t = mask_t.contiguous();
    mask = PairMask{mask_t.data_ptr<uint8_t>(), mask_t.size(1), 1};
  }
  // references present in the row mean (a negative label marks an empty memory slot)
  const int64_t n_present = std::max<int64_t>(1, yr.ge(0).sum().item<int64_t>());
  std::vector<Row> rows(B);
  Coefs coefs(B);

  // Column chunks: the self part [0, off) and the memory part [off, N), each cut into chunks of CC.
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t c0 = 0; c0 < off; c0 += CC) chunks.emplace_back(c0, std::min(CC, off - c0));
  const auto n_self_chunks = static_cast<int64_t>(chunks.size());
  for (int64_t c0 = off; c0 < N; c0 += CC) chunks.emplace_back(c0, std::min(CC, N - c0));
  const auto n_chunks = static_cast<int64_t>(chunks.size());
  // A block's strip (kRowBlock × N) is kept for passes 2 and grad when small; the whole self part S (B × B) is kept
  // for the self gradient pass under the same bound. Strips are stored chunk after chunk, each chunk (rows × cc).
  const bool cache_strip = RB * N <= kMaxStrip;
  const bool self_grad = include_self && want_gx;
  Tensor s_self = at::empty({self_grad && B * B <= kMaxStrip ? B * B : 0}, f32);
  const bool cache_self = s_self.numel() > 0;

  // passes 1, 2 and ∂/∂x̂ += G r̂ over the memory part: one task per block of queries
  parallel_for(0, ceil_div(B, RB), 1, [&](int64_t blk0, int64_t blk1) {
    Tensor sbuf = at::empty({cache_strip ? RB * N : RB * CC}, f32);
    std::vector<std::vector<std::pair<float, int64_t>>> heaps(RB);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * RB, rb = std::min(RB, B - r0);
      const Tensor xb = xh.narrow(0, r0, rb);
      // tile of chunk ch, computed when first is set or when it is not cached
      auto tile_of = [&](int64_t ch, bool first) {
        const auto [c0, cc] = chunks[ch];
        const bool in_self = cache_self && ch < n_self_chunks;
        Tensor s = in_self       ? s_self.narrow(0, r0 * B + rb * c0, rb * cc).view({rb, cc})
                   : cache_strip ? sbuf.narrow(0, rb * c0, rb * cc).view({rb, cc})
                                 : tile(sbuf, rb, cc);
        if (first || !(in_self || cache_strip)) mm_nt(s, xb, R.narrow(0, c0, cc));
        return s;
      };
      for (auto& hv : heaps) hv.clear();
      for (int64_t ch = 0; ch < n_chunks; ++ch) {
        const Tensor s = tile_of(ch, true);
        for (int64_t r = 0; r < rb; ++r)
          pass1_row(rows[r0 + r], hp, s.data_ptr<float>() + r * s.size(1), s.size(1), chunks[ch].first, r0 + r,
                    yp[r0 + r], yrp, mask.row(r0 + r), mask.step, K, heaps[r]);
      }
      for (int64_t r = 0; r < rb; ++r) finish_pass1(rows[r0 + r], hp, n_present, K, heaps[r]);
      for (int64_t ch = 0; ch < n_chunks; ++ch) {
        const Tensor s = tile_of(ch, false);
        for (int64_t r = 0; r < rb; ++r)
          (K > 0 ? pass2_row<true> : pass2_row<false>)(rows[r0 + r], hp, s.data_ptr<float>() + r * s.size(1), s.size(1), chunks[ch].first, r0 + r,
                    yp[r0 + r], yrp, mask.row(r0 + r), mask.step);
      }
      bool any_valid = false;
      for (int64_t r = 0; r < rb; ++r) {
        finish_pass2(rows[r0 + r], coefs, r0 + r, hp, n_present, B);
        any_valid = any_valid || rows[r0 + r].valid;
      }
      if (!want_gx || !any_valid) continue;
      for (int64_t ch = n_self_chunks; ch < n_chunks; ++ch) {
        Tensor s = tile_of(ch, false);
        const auto [c0, cc] = chunks[ch];
        for (int64_t r = 0; r < rb; ++r)
          (K > 0 ? grad_row<true> : grad_row<false>)(coefs, hp, s.data_ptr<float>() + r * cc, cc, c0, r0 + r, yp[r0 + r], yrp,
                                                        mask.row(r0 + r), mask.step);
        addmm_nn(gx.narrow(0, r0, rb), s, R.narrow(0, c0, cc));
      }
    }
  });

  double total = 0;
  bool any_valid = false;
  for (const Row& st : rows) total += st.valid ? st.loss : 0.0, any_valid = any_valid || st.valid;
  Tensor loss = at::full({}, static_cast<float>(total / B), f32);

  // Self part: ∂/∂x̂_I += H_I x̂ (both roles of x̂), one task per block of queries.
  if (self_grad && any_valid) {
    // picked_by (CSR over columns i < B): the rows j, ascending, whose minP or maxN element is column i
    std::vector<int64_t> pick_start(B + 1, 0), picked_by;
    for (int64_t j = 0; j < B; ++j)
      for (const int64_t a : {coefs.arg_min[j], coefs.arg_max[j]})
        if (a >= 0 && a < B) ++pick_start[a + 1];
    for (int64_t i = 0; i < B; ++i) pick_start[i + 1] += pick_start[i];
    picked_by.resize(pick_start[B]);
    std::vector<int64_t> fill(pick_start.begin(), pick_start.end() - 1);
    for (int64_t j = 0; j < B; ++j)
      for (const int64_t a : {coefs.arg_min[j], coefs.arg_max[j]})
        if (a >= 0 && a < B) picked_by[fill[a]++] = j;
    parallel_for(0, ceil_div(B, RB), 1, [&](int64_t blk0, int64_t blk1) {
      Tensor sbuf = at::empty({cache_self ? 0 : RB * CC}, f32);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t r0 = blk * RB, rb = std::min(RB, B - r0);
        for (int64_t ch = 0; ch < n_self_chunks; ++ch) {
          const auto [c0, cc] = chunks[ch];
          Tensor s = cache_self ? s_self.narrow(0, r0 * B + rb * c0, rb * cc).view({rb, cc}) : tile(sbuf, rb, cc);
          if (!cache_self) mm_nt(s, xh.narrow(0, r0, rb), xh.narrow(0, c0, cc));
          for (int64_t r = 0; r < rb; ++r) {
            const int64_t i = r0 + r;
            (K > 0 ? grad_row_self<true> : grad_row_self<false>)(coefs, hp, s.data_ptr<float>() + r * cc, cc, c0, i, yp, mask, picked_by.data() + pick_start[i],
                          pick_start[i + 1] - pick_start[i]);
          }
          addmm_nn(gx.narrow(0, r0, rb), s, xh.narrow(0, c0, cc));
        }
      }
    });
  }

  // ∂/∂r̂ = Gᵀ x̂ over the memory chunks: one task per chunk, query blocks in fixed order
  if (want_gref && M > 0 && any_valid) {
    parallel_for(n_self_chunks, n_chunks, 1, [&](int64_t ch0, int64_t ch1) {
      Tensor sbuf = at::empty({RB * CC}, f32);
      PackedB rt;  // the chunk for s = x̂·r̂ᵀ, packed once for every block of queries
      for (int64_t ch = ch0; ch < ch1; ++ch) {
        const auto [c0, cc] = chunks[ch];
        rt.pack_t(R.narrow(0, c0, cc));
        Tensor grc = gref.narrow(0, c0 - off, cc);
        for (int64_t r0 = 0; r0 < B; r0 += RB) {
          const int64_t rb = std::min(RB, B - r0);
          bool block_valid = false;
          for (int64_t r = 0; r < rb; ++r) block_valid = block_valid || rows[r0 + r].valid;
          if (!block_valid) continue;
          const Tensor xb = xh.narrow(0, r0, rb);
          Tensor s = tile(sbuf, rb, cc);
          mm(s, xb, rt, false);
          for (int64_t r = 0; r < rb; ++r)
            (K > 0 ? grad_row<true> : grad_row<false>)(coefs, hp, s.data_ptr<float>() + r * cc, cc, c0, r0 + r, yp[r0 + r], yrp,
                                                        mask.row(r0 + r), mask.step);
          addmm_tn(grc, s, xb);
        }
      }
    });
  }

  if (want_gx) normalize_backward_rows(gx, xh, xnorm);
  if (want_gref && M > 0) normalize_backward_rows(gref, rh, rnorm);
  return {loss, gx, gref};
}

}  // namespace

void register_cbml(torch::Library& m) { m.impl("cbml_fwd", &cbml_fwd); }

}  // namespace fastcdml
