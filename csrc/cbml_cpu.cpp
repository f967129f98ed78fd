// Contrastive Bayesian Metric Learning loss, CPU kernel for fastcdml::cbml_fwd (schema: fastcdml/ops/cbml.py,
// math: shared/spec/losses.md §2 and fastcdml/reference/cbml.py).
//
// The reference set R = [x̂ if include_self] ++ [r̂] is normalised once into an fp32 (N, D) buffer; similarities are
// recomputed tile by tile (kRowBlock queries × chunk_size(D) references, one at::mm each), never held as B×N:
// The similarity tiles of one block of queries are kept for the later passes while that strip holds at most
// kMaxStrip floats (4 MiB: N <= 16384 references); beyond that they are recomputed in every pass.
//   pass 1   row sum, positives' min (argmin), negatives' count / Σ / Σ² / max (argmax), and in top-K mode a
//            running top-K per row whose worst element is the selection threshold (order: larger S, then lower
//            index, so ties pick the lowest index);
//   pass 2   the hard-positive / hard-negative sums log(1 + Σ exp(t)), each as an online log-sum-exp;
//   grad     G_ij = ∂loss/∂S_ij per tile; ∂/∂x̂ = G R accumulated per row block, ∂/∂R = Gᵀ x̂ in a second loop
//            parallel over reference chunks (each task owns its output rows: no atomics), then the normalisation
//            backward (in self mode both roles of x are summed first).
// A recomputed tile comes from the same operands and shapes, so every pass sees bit-identical similarities.
#include "common.h"

#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fastcdml {
namespace {

using at::Tensor;

constexpr int64_t kMaxStrip = int64_t{1} << 20;

struct Hyper {
  float pos_a, pos_b, neg_a, neg_b, margin, w, h;
  bool phi_sqrt;
  int64_t top_k;
  bool self;  // the first B references are the queries themselves
};

struct Row {
  // pass 1
  double sum = 0, neg_sum = 0, neg_sq = 0;
  int64_t n_pos = 0, n_neg = 0, arg_min_p = -1, arg_max_n = -1;
  float min_p = std::numeric_limits<float>::infinity(), max_n = -std::numeric_limits<float>::infinity();
  float top_v = -std::numeric_limits<float>::infinity();  // top-K threshold (value, index)
  int64_t top_i = std::numeric_limits<int64_t>::max();
  float mean = 0, sigma = 0;
  // pass 2: Σ over the "1 +" term and the selected exp(t) = s·exp(m)
  float pm = 0, ps = 1, nm = 0, ns = 1;
  int64_t n_hard_pos = 0, n_hard_neg = 0;
  // gradient coefficients (already divided by B); valid = the row is not skipped
  bool valid = false;
  float u_pos = 0, u_neg = 0, c_pos = 0, c_neg = 0, c_mean_all = 0, c_mean_pick = 0;
  float loss = 0;
};

enum class Kind { kNone, kPos, kHardPos, kNeg, kHardNeg };

// Role of reference j (global index) for query i given its pass-1 statistics.
inline Kind classify(const Row& st, const Hyper& hp, float s, int64_t i, int64_t j, int64_t yi, int64_t yj) {
  if (yj == yi) {
    if (hp.self && j == i) return Kind::kNone;
    return s - hp.margin < st.max_n ? Kind::kHardPos : Kind::kPos;
  }
  const bool hard = hp.top_k > 0 ? (s > st.top_v || (s == st.top_v && j <= st.top_i)) : s + hp.margin > st.min_p;
  return hard ? Kind::kHardNeg : Kind::kNeg;
}

inline void lse_add(float t, float& m, float& s) {
  if (t > m) {
    s = s * fast_exp(m - t) + 1.f;
    m = t;
  } else {
    s += fast_exp(t - m);
  }
}

// "a ranks before b" for top-K: larger S, ties broken by the lower index. A heap under this order keeps its
// worst element at the front.
inline bool ranks_before(const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

void pass1_row(Row& st, const Hyper& hp, const float* s, int64_t cc, int64_t c0, int64_t i, int64_t yi,
               const int64_t* yr, int64_t k, std::vector<std::pair<float, int64_t>>& heap) {
  for (int64_t jj = 0; jj < cc; ++jj) {
    const float v = s[jj];
    const int64_t j = c0 + jj;
    st.sum += v;
    if (yr[j] == yi) {
      if (hp.self && j == i) continue;
      ++st.n_pos;
      if (v < st.min_p) st.min_p = v, st.arg_min_p = j;
    } else {
      ++st.n_neg;
      st.neg_sum += v;
      st.neg_sq += static_cast<double>(v) * v;
      if (v > st.max_n) st.max_n = v, st.arg_max_n = j;
      if (k > 0) {
        const std::pair<float, int64_t> e{v, j};
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
  }
}

void finish_pass1(Row& st, const Hyper& hp, int64_t n_ref, int64_t k, const std::vector<std::pair<float, int64_t>>& heap) {
  const double mean = (1.0 - hp.h) * st.sum / n_ref + hp.h * (static_cast<double>(st.min_p) + st.max_n) / 2;
  st.mean = static_cast<float>(mean);
  st.sigma = static_cast<float>(st.neg_sq - 2 * mean * st.neg_sum + st.n_neg * mean * mean);
  if (k > 0 && static_cast<int64_t>(heap.size()) == k) st.top_v = heap.front().first, st.top_i = heap.front().second;
}

void pass2_row(Row& st, const Hyper& hp, const float* s, int64_t cc, int64_t c0, int64_t i, int64_t yi,
               const int64_t* yr) {
  for (int64_t jj = 0; jj < cc; ++jj) {
    const float v = s[jj];
    switch (classify(st, hp, v, i, c0 + jj, yi, yr[c0 + jj])) {
      case Kind::kHardPos:
        lse_add(-(v - hp.pos_a) / hp.pos_b, st.pm, st.ps), ++st.n_hard_pos;
        break;
      case Kind::kHardNeg:
        lse_add((v - hp.neg_a) / hp.neg_b, st.nm, st.ns), ++st.n_hard_neg;
        break;
      default:
        break;
    }
  }
}

void finish_pass2(Row& st, const Hyper& hp, int64_t n_ref, int64_t batch) {
  st.valid = st.n_pos > 0 && st.n_neg > 0 && st.n_hard_pos > 0 && st.n_hard_neg > 0;
  if (!st.valid) return;
  st.u_pos = st.pm + std::log(st.ps);
  st.u_neg = st.nm + std::log(st.ns);
  // φ(u) and dφ/du for φ = log (u itself) or sqrt (exp(u/2) with u = log(1 + Σ))
  const float pos = hp.phi_sqrt ? std::exp(st.u_pos / 2) : st.u_pos;
  const float neg = hp.phi_sqrt ? std::exp(st.u_neg / 2) : st.u_neg;
  st.loss = pos + neg + hp.w * st.sigma;
  const float inv_b = 1.f / static_cast<float>(batch);
  st.c_pos = (hp.phi_sqrt ? pos / 2 : 1.f) * (-1.f / hp.pos_b) * inv_b;
  st.c_neg = (hp.phi_sqrt ? neg / 2 : 1.f) * (1.f / hp.neg_b) * inv_b;
  // ∂σ/∂mean, spread over the row mean (every j) and the two picked elements
  const double dmean = -2.0 * hp.w * (st.neg_sum - st.n_neg * static_cast<double>(st.mean));
  st.c_mean_all = static_cast<float>(dmean * (1.0 - hp.h) / n_ref) * inv_b;
  st.c_mean_pick = static_cast<float>(dmean * hp.h / 2) * inv_b;
}

// One row of the tile, S → G = ∂loss/∂S in place (zero for a skipped row).
void grad_row(const Row& st, const Hyper& hp, float* s, int64_t cc, int64_t c0, int64_t i, int64_t yi,
              const int64_t* yr, float inv_b) {
  if (!st.valid) {
    std::fill(s, s + cc, 0.f);
    return;
  }
  const float c_var = 2.f * hp.w * inv_b;
  for (int64_t jj = 0; jj < cc; ++jj) {
    const float v = s[jj];
    const int64_t j = c0 + jj;
    float g = st.c_mean_all;
    switch (classify(st, hp, v, i, j, yi, yr[j])) {
      case Kind::kHardPos:
        g += st.c_pos * fast_exp(-(v - hp.pos_a) / hp.pos_b - st.u_pos);
        break;
      case Kind::kHardNeg:
        g += st.c_neg * fast_exp((v - hp.neg_a) / hp.neg_b - st.u_neg);
        [[fallthrough]];
      case Kind::kNeg:
        g += c_var * (v - st.mean);
        break;
      default:
        break;
    }
    if (j == st.arg_min_p || j == st.arg_max_n) g += st.c_mean_pick;
    s[jj] = g;
  }
}

std::tuple<Tensor, Tensor, Tensor> cbml_fwd(const Tensor& x_in, const Tensor& labels, const Tensor& ref_in,
                                            const Tensor& ref_labels, bool include_self, double pos_a, double pos_b,
                                            double neg_a, double neg_b, double margin, double variance_weight,
                                            double mean_weight, bool phi_sqrt, int64_t top_k, bool want_gx,
                                            bool want_gref) {
  check_embeddings(x_in, "x");
  check_embeddings(ref_in, "ref");
  const int64_t B = x_in.size(0), D = x_in.size(1), M = ref_in.size(0);
  TORCH_CHECK_VALUE(ref_in.size(1) == D, "ref must have shape (M, ", D, "), got ", ref_in.sizes());
  TORCH_CHECK_VALUE(include_self || M > 0, "the reference set is empty: give ref_emb or set include_self=True");
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0, got ", top_k);
  const Tensor y = check_labels(labels, B, "labels");
  const Tensor y_ref = check_labels(ref_labels, M, "ref_labels");
  auto [xh, xnorm] = normalize_rows(x_in);
  const auto f32 = xh.options();
  Tensor gx = at::zeros({want_gx ? B : 0, D}, f32), gref = at::zeros({want_gref ? M : 0, D}, f32);
  if (B == 0) return {at::zeros({}, f32), gx, gref};

  Tensor rh, rnorm;
  if (M > 0) std::tie(rh, rnorm) = normalize_rows(ref_in);
  const int64_t off = include_self ? B : 0;  // index of the first r̂ in R
  const Tensor R = include_self ? (M > 0 ? at::cat({xh, rh}) : xh) : rh;
  const Tensor yr = include_self ? (M > 0 ? at::cat({y, y_ref}) : y) : y_ref;
  const int64_t N = R.size(0);
  const Hyper hp{static_cast<float>(pos_a), static_cast<float>(pos_b),  static_cast<float>(neg_a),
                 static_cast<float>(neg_b), static_cast<float>(margin), static_cast<float>(variance_weight),
                 static_cast<float>(mean_weight), phi_sqrt, top_k, include_self};
  const int64_t K = std::min(top_k, N), RB = kRowBlock, CC = chunk_size(D);
  const int64_t* yp = y.data_ptr<int64_t>();
  const int64_t* yrp = yr.data_ptr<int64_t>();
  const float inv_b = 1.f / static_cast<float>(B);
  const bool need_g_self = want_gx && include_self;  // gradient through x's role as a reference
  std::vector<Row> rows(B);
  // Keep a block's whole similarity strip (kRowBlock × N) for passes 2 and grad when it is small, else recompute.
  const bool cache_strip = RB * N <= kMaxStrip;

  // passes 1, 2 and ∂/∂x̂ = G R: one task per block of queries
  parallel_for(0, ceil_div(B, RB), 1, [&](int64_t blk0, int64_t blk1) {
    Tensor sbuf = at::empty({cache_strip ? RB * N : RB * CC}, f32);
    std::vector<std::vector<std::pair<float, int64_t>>> heaps(RB);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * RB, rb = std::min(RB, B - r0);
      const Tensor xb = xh.narrow(0, r0, rb);
      auto sweep = [&](auto&& per_row, bool accumulate_gx, bool first) {
        for (int64_t c0 = 0; c0 < N; c0 += CC) {
          const int64_t cc = std::min(CC, N - c0);
          Tensor s = cache_strip ? sbuf.narrow(0, rb * c0, rb * cc).view({rb, cc}) : tile(sbuf, rb, cc);
          if (first || !cache_strip) at::mm_out(s, xb, R.narrow(0, c0, cc).t());
          for (int64_t r = 0; r < rb; ++r) per_row(r, s.data_ptr<float>() + r * cc, cc, c0);
          if (accumulate_gx) gx.narrow(0, r0, rb).addmm_(s, R.narrow(0, c0, cc));
        }
      };
      for (auto& hv : heaps) hv.clear();
      sweep([&](int64_t r, const float* s, int64_t cc, int64_t c0) {
        pass1_row(rows[r0 + r], hp, s, cc, c0, r0 + r, yp[r0 + r], yrp, K, heaps[r]);
      }, false, true);
      for (int64_t r = 0; r < rb; ++r) finish_pass1(rows[r0 + r], hp, N, K, heaps[r]);
      sweep([&](int64_t r, const float* s, int64_t cc, int64_t c0) {
        pass2_row(rows[r0 + r], hp, s, cc, c0, r0 + r, yp[r0 + r], yrp);
      }, false, false);
      bool any_valid = false;
      for (int64_t r = 0; r < rb; ++r) {
        finish_pass2(rows[r0 + r], hp, N, B);
        any_valid = any_valid || rows[r0 + r].valid;
      }
      if (want_gx && any_valid)
        sweep([&](int64_t r, float* s, int64_t cc, int64_t c0) {
          grad_row(rows[r0 + r], hp, s, cc, c0, r0 + r, yp[r0 + r], yrp, inv_b);
        }, true, false);
    }
  });

  double total = 0;
  for (const Row& st : rows) total += st.valid ? st.loss : 0.0;
  Tensor loss = at::full({}, static_cast<float>(total / B), f32);

  // ∂/∂R = Gᵀ x̂ for the reference chunks that need it: one task per chunk, query blocks in fixed order
  if (need_g_self || want_gref) {
    const int64_t ch_lo = (need_g_self ? 0 : off) / CC, ch_hi = ceil_div(want_gref ? N : B, CC);
    const int64_t base = ch_lo * CC;  // gR holds rows [base, base + rows of the chunks) of ∂/∂R
    Tensor gR = at::zeros({std::min(N, ch_hi * CC) - base, D}, f32);
    parallel_for(ch_lo, ch_hi, 1, [&](int64_t ch0, int64_t ch1) {
      Tensor sbuf = at::empty({RB * CC}, f32);
      for (int64_t ch = ch0; ch < ch1; ++ch) {
        const int64_t c0 = ch * CC, cc = std::min(CC, N - c0);
        const Tensor rc = R.narrow(0, c0, cc);
        Tensor grc = gR.narrow(0, c0 - base, cc);
        for (int64_t r0 = 0; r0 < B; r0 += RB) {
          const int64_t rb = std::min(RB, B - r0);
          const Tensor xb = xh.narrow(0, r0, rb);
          Tensor s = tile(sbuf, rb, cc);
          at::mm_out(s, xb, rc.t());
          bool any_valid = false;
          for (int64_t r = 0; r < rb; ++r) {
            grad_row(rows[r0 + r], hp, s.data_ptr<float>() + r * cc, cc, c0, r0 + r, yp[r0 + r], yrp, inv_b);
            any_valid = any_valid || rows[r0 + r].valid;
          }
          if (any_valid) grc.addmm_(s.t(), xb);
        }
      }
    });
    if (need_g_self) gx.add_(gR.narrow(0, 0, B));  // base is 0 then
    if (want_gref) gref.copy_(gR.narrow(0, off - base, M));
  }

  auto norm_backward = [](const Tensor& g, const Tensor& xhat, const Tensor& nrm) {
    const int64_t n = g.size(0), d = g.size(1);
    float* gp = g.data_ptr<float>();
    const float* xp = xhat.data_ptr<float>();
    const float* np = nrm.data_ptr<float>();
    parallel_for(0, n, 256, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) normalize_backward_row(gp + r * d, xp + r * d, np[r], d);
    });
  };
  if (want_gx) norm_backward(gx, xh, xnorm);
  if (want_gref && M > 0) norm_backward(gref, rh, rnorm);
  return {loss, gx, gref};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcdml, CPU, m) { m.impl("cbml_fwd", &cbml_fwd); }

}  // namespace fastcdml
