// Pair losses (NTXent, SupCon, MultiSimilarity, Contrastive), CPU kernel for fastcdml::pair_fwd (schema:
// fastcdml/ops/pair.py, math: docs/spec.md and fastcdml/reference/pair.py).
//
// x̂ (B, D) is normalised once into an fp32 buffer; the references are read in place (fp32) or converted chunk by
// chunk (bf16 / fp16), and only their inverse norms are stored, so the extra memory is O(B·D + R) plus per-thread
// tiles. Similarities S = (x̂ rᵀ) · diag(1/‖r‖) are computed tile by tile (kRowBlock queries × one chunk of
// chunk_size(D) references, through gemm.h), never held as B×R:
//   pass 1   per row: the multiplicities n⁺, n⁻ and the kind's statistics, reduced over the row's tiles: online
//            log-sum-exps (NTXent: over the negatives of S/τ; SupCon: over P ∪ N of S/τ, with Σ_P S/τ and |P|;
//            MultiSimilarity: log(1 + Σ_P e^{α(base − S)}) and log(1 + Σ_N e^{β(S − base)})), or the hinge sums
//            and their non-zero counts (Contrastive);
//   pass 2   NTXent only (it needs the row's NLSE first): Σ_P w softplus(NLSE − u) and Σ_P w σ(NLSE − u);
//   global   the loss and the per-row gradient scale from every row's statistics, in row order;
//   grad     G_ij = ∂loss/∂S_ij recomputed tile by tile from row i's statistics: ∂/∂x̂ += G r̂ (one task per row
//            block) and ∂/∂r̂ += Gᵀ x̂ (one task per reference chunk, row blocks in order), then the normalisation
//            backward.
// Every reduction runs in a fixed order over a partition that does not depend on the thread count, so the results
// are bit-identical for any number of threads.
#include "common.h"

#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fastcdml {
namespace {

using at::Tensor;

enum Kind : int64_t { kNTXent = 0, kSupCon = 1, kMultiSimilarity = 2, kContrastive = 3 };
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kMaxChunk = 1024;  // chunk_size() never exceeds it

struct Hyper {
  int64_t kind;
  float p0, p1, p2;  // τ | τ | α, β, base | m⁺, m⁻
  bool sets;         // SupCon and MultiSimilarity use each pair once, whatever its multiplicity
};

// Pairs of one row: the references' labels, the row's excluded column and its multiplicities (null: each pair once).
struct RowPairs {
  const int64_t* yr;
  int64_t yi, exclude;
  const uint8_t* counts;
  // multiplicities (w⁺, w⁻) of pair (row, j), raw (for n⁺, n⁻) or as sets
  FASTCDML_INLINE void weights(int64_t j, float& wp, float& wn) const {
    const float w = counts ? static_cast<float>(counts[j]) : 1.f;
    const bool same = yr[j] == yi;
    wp = same && j != exclude ? w : 0.f;
    wn = same ? 0.f : w;
  }
};

// An online log-sum-exp: m + log(s).
struct Lse {
  float m = -kInf;
  double s = 0;
  void add(float cm, double cs) {  // a chunk's maximum and its Σ exp(v − cm)
    if (cm == -kInf) return;
    if (cm > m) {
      s = s * std::exp(static_cast<double>(m) - cm) + cs;
      m = cm;
    } else {
      s += cs * std::exp(static_cast<double>(cm) - m);
    }
  }
  float value() const { return s > 0 ? static_cast<float>(m + std::log(s)) : -kInf; }
};

struct Row {
  double n_pos = 0, n_neg = 0;  // raw multiplicities
  Lse a, b;                     // NTXent: negatives; SupCon: P ∪ N; MultiSimilarity: positives (a), negatives (b)
  double pos_u = 0, n_pos_set = 0;               // SupCon
  double h_pos = 0, c_pos = 0, h_neg = 0, c_neg = 0;  // Contrastive hinge sums and non-zero counts
  double sp = 0, sig = 0;                        // NTXent pass 2: Σ w softplus(NLSE − u), Σ w σ(NLSE − u)
  float lse_a = -kInf, lse_b = -kInf, loss = 0;
  bool active = false;  // SupCon: the row's loss is > 0
};

FASTCDML_INLINE float distance(float v) { return std::sqrt(std::max(2.f - 2.f * v, 0.f)); }

// Masked log-sum-exp of t(v) over a chunk, for the elements with weight w > 0 (each counted w times).
template <typename T, typename W>
void lse_chunk(Lse& acc, const float* s, int64_t cc, const T& t, const W& weight) {
  float cm = -kInf;
  for (int64_t jj = 0; jj < cc; ++jj)
    if (weight(jj) > 0) cm = std::max(cm, t(s[jj]));
  if (cm == -kInf) return;
  double cs = 0;
  for (int64_t jj = 0; jj < cc; ++jj) {
    const float w = weight(jj);
    if (w > 0) cs += static_cast<double>(w) * std::exp(static_cast<double>(t(s[jj]) - cm));
  }
  acc.add(cm, cs);
}

void pass1_row(Row& st, const Hyper& hp, const float* s, int64_t cc, int64_t c0, const RowPairs& rp) {
  float wp[kMaxChunk], wn[kMaxChunk];
  for (int64_t jj = 0; jj < cc; ++jj) {
    rp.weights(c0 + jj, wp[jj], wn[jj]);
    st.n_pos += wp[jj], st.n_neg += wn[jj];
    if (hp.sets) wp[jj] = std::min(wp[jj], 1.f), wn[jj] = std::min(wn[jj], 1.f);
  }
  auto pos = [&](int64_t jj) { return wp[jj]; };
  auto neg = [&](int64_t jj) { return wn[jj]; };
  switch (hp.kind) {
    case kNTXent:
      lse_chunk(st.a, s, cc, [&](float v) { return v / hp.p0; }, neg);
      break;
    case kSupCon:
      lse_chunk(st.a, s, cc, [&](float v) { return v / hp.p0; }, [&](int64_t jj) { return wp[jj] + wn[jj]; });
      for (int64_t jj = 0; jj < cc; ++jj) st.pos_u += wp[jj] * static_cast<double>(s[jj] / hp.p0);
      for (int64_t jj = 0; jj < cc; ++jj) st.n_pos_set += wp[jj];
      break;
    case kMultiSimilarity:
      lse_chunk(st.a, s, cc, [&](float v) { return hp.p0 * (hp.p2 - v); }, pos);
      lse_chunk(st.b, s, cc, [&](float v) { return hp.p1 * (v - hp.p2); }, neg);
      break;
    default:
      for (int64_t jj = 0; jj < cc; ++jj) {
        const float d = distance(s[jj]), hpos = std::max(d - hp.p0, 0.f), hneg = std::max(hp.p1 - d, 0.f);
        st.h_pos += wp[jj] * static_cast<double>(hpos), st.c_pos += hpos > 0 ? wp[jj] : 0.f;
        st.h_neg += wn[jj] * static_cast<double>(hneg), st.c_neg += hneg > 0 ? wn[jj] : 0.f;
      }
  }
}

// NTXent pass 2: needs the row's NLSE.
void pass2_row(Row& st, const Hyper& hp, const float* s, int64_t cc, int64_t c0, const RowPairs& rp) {
  for (int64_t jj = 0; jj < cc; ++jj) {
    float wp, wn;
    rp.weights(c0 + jj, wp, wn);
    if (wp <= 0) continue;
    const double z = static_cast<double>(st.lse_a) - s[jj] / hp.p0;  // −inf for a row without negatives
    st.sp += wp * (std::max(z, 0.0) + std::log1p(std::exp(-std::abs(z))));
    st.sig += wp / (1.0 + std::exp(-z));
  }
}

// The loss and the gradient scales: scale (NTXent, SupCon, MultiSimilarity, Contrastive positives) and scale_neg
// (Contrastive negatives); 0 scales when the loss is the constant 0.
struct Global {
  double loss = 0;
  float scale = 0, scale_neg = 0;
};

Global combine(std::vector<Row>& rows, const Hyper& hp) {
  Global g;
  double n_pos = 0, n_neg = 0;
  for (const Row& st : rows) n_pos += st.n_pos, n_neg += st.n_neg;
  if (n_pos <= 1 && n_neg <= 1) return g;
  switch (hp.kind) {
    case kNTXent: {
      if (n_pos == 0 || n_neg == 0) return g;
      for (const Row& st : rows) g.loss += st.sp;
      g.loss /= n_pos;
      g.scale = static_cast<float>(1.0 / n_pos);
      break;
    }
    case kSupCon: {
      if (n_pos == 0 || n_neg == 0) return g;
      int64_t active = 0;
      for (Row& st : rows) {
        if (st.n_pos_set > 0) st.loss = st.lse_a - static_cast<float>(st.pos_u / st.n_pos_set);
        st.active = st.loss > 0;
        active += st.active;
        g.loss += st.active ? st.loss : 0.0;
      }
      if (active == 0) return Global{};
      g.loss /= active;
      g.scale = 1.f / static_cast<float>(active);
      break;
    }
    case kMultiSimilarity: {
      for (const Row& st : rows) g.loss += st.lse_a / hp.p0 + st.lse_b / hp.p1;
      g.loss /= static_cast<double>(rows.size());
      g.scale = 1.f / static_cast<float>(rows.size());
      break;
    }
    default: {
      double h_pos = 0, c_pos = 0, h_neg = 0, c_neg = 0;
      for (const Row& st : rows) h_pos += st.h_pos, c_pos += st.c_pos, h_neg += st.h_neg, c_neg += st.c_neg;
      if (c_pos > 0) g.loss += h_pos / c_pos, g.scale = static_cast<float>(1.0 / c_pos);
      if (c_neg > 0) g.loss += h_neg / c_neg, g.scale_neg = static_cast<float>(1.0 / c_neg);
    }
  }
  return g;
}

// One row of a tile, S → G = ∂loss/∂S in place.
void grad_row(float* s, int64_t cc, int64_t c0, const Row& st, const Hyper& hp, const Global& g, const RowPairs& rp) {
  const bool supcon_off = hp.kind == kSupCon && !st.active;
  const float inv_npos = st.n_pos_set > 0 ? static_cast<float>(1.0 / st.n_pos_set) : 0.f;
  for (int64_t jj = 0; jj < cc; ++jj) {
    float wp, wn;
    rp.weights(c0 + jj, wp, wn);
    if (hp.sets) wp = std::min(wp, 1.f), wn = std::min(wn, 1.f);
    const float v = s[jj];
    float gv = 0;
    switch (hp.kind) {
      case kNTXent: {
        const float u = v / hp.p0;
        if (wp > 0) gv = -wp / (1.f + std::exp(u - st.lse_a));  // −w σ(NLSE − u)
        else if (wn > 0) gv = wn * static_cast<float>(st.sig) * std::exp(u - st.lse_a);
        gv *= g.scale / hp.p0;
        break;
      }
      case kSupCon: {
        if (supcon_off) break;
        const float u = v / hp.p0;
        gv = (wp + wn > 0 ? std::exp(u - st.lse_a) : 0.f) - wp * inv_npos;
        gv *= g.scale / hp.p0;
        break;
      }
      case kMultiSimilarity:
        if (wp > 0) gv = -std::exp(hp.p0 * (hp.p2 - v) - st.lse_a);
        else if (wn > 0) gv = std::exp(hp.p1 * (v - hp.p2) - st.lse_b);
        gv *= g.scale;
        break;
      default: {
        const float d = distance(v), inv = d > 0 ? 1.f / d : 0.f;
        gv = (wn * (d < hp.p1 ? g.scale_neg : 0.f) - wp * (d > hp.p0 ? g.scale : 0.f)) * inv;
      }
    }
    s[jj] = gv;
  }
}

std::tuple<Tensor, Tensor, Tensor> pair_fwd(const Tensor& x_in, const Tensor& labels, const Tensor& ref_in,
                                            const Tensor& ref_labels, const std::optional<Tensor>& exclude_in,
                                            const std::optional<Tensor>& counts_in, int64_t kind, double p0,
                                            double p1, double p2, bool want_gx, bool want_gref) {
  check_embeddings(x_in, "x");
  check_embeddings(ref_in, "ref");
  const int64_t B = x_in.size(0), D = x_in.size(1), R = ref_in.size(0);
  TORCH_CHECK_VALUE(ref_in.size(1) == D, "ref must have shape (R, ", D, "), got ", ref_in.sizes());
  TORCH_CHECK_VALUE(kind >= kNTXent && kind <= kContrastive, "kind must be 0..3, got ", kind);
  const Tensor y = check_labels(labels, B, "labels");
  const Tensor yr = check_labels(ref_labels, R, "ref_labels");
  Tensor exclude, counts;
  if (exclude_in.has_value()) {
    exclude = exclude_in->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(exclude.dim() == 1 && exclude.size(0) == B, "exclude must have shape (", B, ",), got ",
                      exclude.sizes());
  }
  if (counts_in.has_value()) {
    counts = counts_in->contiguous();
    TORCH_CHECK_VALUE(counts.scalar_type() == at::kByte && counts.dim() == 2 && counts.size(0) == B &&
                          counts.size(1) == R,
                      "counts must be a (", B, ", ", R, ") uint8 tensor, got ", counts.sizes(), " ",
                      counts.scalar_type());
  }
  const auto f32 = x_in.options().dtype(at::kFloat);
  Tensor gx = at::zeros({want_gx ? B : 0, D}, f32), gref = at::zeros({want_gref ? R : 0, D}, f32);
  if (B == 0 || R == 0) return {at::zeros({}, f32), gx, gref};
  const auto [xh, xnorm] = normalize_rows(x_in);
  const Tensor rc_all = ref_in.contiguous();
  const Hyper hp{kind, static_cast<float>(p0), static_cast<float>(p1), static_cast<float>(p2),
                 kind == kSupCon || kind == kMultiSimilarity};
  const int64_t RB = kRowBlock, CC = chunk_size(D), n_chunks = ceil_div(R, CC);
  // the references' norms and inverse norms, chunk by chunk
  Tensor rnorm = at::empty({R}, f32), rinv = at::empty({R}, f32);
  parallel_for(0, n_chunks, 1, [&](int64_t ch0, int64_t ch1) {
    Tensor buf = at::empty({CC, D}, f32);
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      const int64_t c0 = ch * CC, cc = std::min(CC, R - c0);
      const Tensor rc = rows_fp32(rc_all, c0, cc, buf);
      const float* a = rc.data_ptr<float>();
      for (int64_t j = 0; j < cc; ++j) {
        float ss = 0.f;
        for (int64_t k = 0; k < D; ++k) ss += a[j * D + k] * a[j * D + k];
        rnorm.data_ptr<float>()[c0 + j] = std::sqrt(ss);
        rinv.data_ptr<float>()[c0 + j] = 1.f / std::max(std::sqrt(ss), kEps);
      }
    }
  });
  const float* rinv_p = rinv.data_ptr<float>();
  // S tile of the rows xb against the reference chunk starting at c0 (rt: its fp32 rows packed by pack_t):
  // x̂ rᵀ, columns scaled by 1/‖r‖
  auto sim_tile = [&](Tensor& s, const Tensor& xb, const PackedB& rt, int64_t c0) {
    mm(s, xb, rt, false);
    float* sp = s.data_ptr<float>();
    const int64_t rb = s.size(0), cc = s.size(1);
    for (int64_t r = 0; r < rb; ++r)
      for (int64_t jj = 0; jj < cc; ++jj) sp[r * cc + jj] *= rinv_p[c0 + jj];
  };
  const int64_t* yp = y.data_ptr<int64_t>();
  const int64_t* yrp = yr.data_ptr<int64_t>();
  const int64_t* exp_ = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;
  const uint8_t* cp = counts.defined() ? counts.data_ptr<uint8_t>() : nullptr;
  auto pairs_of = [&](int64_t i) {
    return RowPairs{yrp, yp[i], exp_ ? exp_[i] : -1, cp ? cp + i * R : nullptr};
  };
  std::vector<Row> rows(B);
  if (kind == kMultiSimilarity)
    for (Row& st : rows) st.a.add(0.f, 1.0), st.b.add(0.f, 1.0);  // the "1 +" terms

  // passes 1 and 2: each task owns a range of blocks of queries and walks the reference chunks once per pass,
  // taking every one of its blocks through a chunk before the next (the chunk packed once); its tiles are
  // recomputed for pass 2. A row's sums follow the chunk order only.
  parallel_for(0, ceil_div(B, RB), 1, [&](int64_t blk0, int64_t blk1) {
    Tensor sbuf = at::empty({RB * CC}, f32), rbuf = at::empty({CC, D}, f32);
    PackedB rt;
    const int64_t r_lo = blk0 * RB, r_hi = std::min(blk1 * RB, B);
    for (int pass = 1; pass <= (kind == kNTXent ? 2 : 1); ++pass) {
      for (int64_t c0 = 0; c0 < R; c0 += CC) {
        const int64_t cc = std::min(CC, R - c0);
        rt.pack_t(rows_fp32(rc_all, c0, cc, rbuf));
        for (int64_t r0 = r_lo; r0 < r_hi; r0 += RB) {
          const int64_t rb = std::min(RB, B - r0);
          Tensor s = tile(sbuf, rb, cc);
          sim_tile(s, xh.narrow(0, r0, rb), rt, c0);
          for (int64_t r = 0; r < rb; ++r)
            (pass == 1 ? pass1_row : pass2_row)(rows[r0 + r], hp, s.data_ptr<float>() + r * cc, cc, c0,
                                                pairs_of(r0 + r));
        }
      }
      for (int64_t i = r_lo; i < r_hi; ++i) rows[i].lse_a = rows[i].a.value(), rows[i].lse_b = rows[i].b.value();
    }
  });

  const Global g = combine(rows, hp);
  Tensor loss = at::full({}, static_cast<float>(g.loss), f32);
  if (g.scale == 0 && g.scale_neg == 0) return {loss, gx, gref};

  if (want_gx) {  // ∂/∂x̂ += G r̂, each task over its blocks of queries, chunk by chunk in order (as passes 1 and 2)
    parallel_for(0, ceil_div(B, RB), 1, [&](int64_t blk0, int64_t blk1) {
      Tensor sbuf = at::empty({RB * CC}, f32), rbuf = at::empty({CC, D}, f32);
      PackedB rt, rn;  // the chunk for s = x̂·rᵀ and for gx += G·r
      for (int64_t c0 = 0; c0 < R; c0 += CC) {
        const int64_t cc = std::min(CC, R - c0);
        const Tensor rc = rows_fp32(rc_all, c0, cc, rbuf);
        rt.pack_t(rc), rn.pack_n(rc);
        for (int64_t r0 = blk0 * RB; r0 < std::min(blk1 * RB, B); r0 += RB) {
          const int64_t rb = std::min(RB, B - r0);
          Tensor s = tile(sbuf, rb, cc);
          sim_tile(s, xh.narrow(0, r0, rb), rt, c0);
          float* sp = s.data_ptr<float>();
          for (int64_t r = 0; r < rb; ++r) {
            grad_row(sp + r * cc, cc, c0, rows[r0 + r], hp, g, pairs_of(r0 + r));
            for (int64_t jj = 0; jj < cc; ++jj) sp[r * cc + jj] *= rinv_p[c0 + jj];  // G_ij r̂_j = (G_ij / ‖r_j‖) r_j
          }
          mm(gx.narrow(0, r0, rb), s, rn, true);
        }
      }
    });
    normalize_backward_rows(gx, xh, xnorm);
  }
  if (want_gref) {  // ∂/∂r̂ += Gᵀ x̂, one task per reference chunk, query blocks in order
    parallel_for(0, n_chunks, 1, [&](int64_t ch0, int64_t ch1) {
      Tensor sbuf = at::empty({RB * CC}, f32), rbuf = at::empty({CC, D}, f32);
      PackedB rt;
      std::vector<float> rhat(D);
      for (int64_t ch = ch0; ch < ch1; ++ch) {
        const int64_t c0 = ch * CC, cc = std::min(CC, R - c0);
        const Tensor rc = rows_fp32(rc_all, c0, cc, rbuf);
        rt.pack_t(rc);
        Tensor grc = gref.narrow(0, c0, cc);
        for (int64_t r0 = 0; r0 < B; r0 += RB) {
          const int64_t rb = std::min(RB, B - r0);
          const Tensor xb = xh.narrow(0, r0, rb);
          Tensor s = tile(sbuf, rb, cc);
          sim_tile(s, xb, rt, c0);
          for (int64_t r = 0; r < rb; ++r)
            grad_row(s.data_ptr<float>() + r * cc, cc, c0, rows[r0 + r], hp, g, pairs_of(r0 + r));
          addmm_tn(grc, s, xb);
        }
        // ∂/∂r̂ → ∂/∂r through the normalisation, with r̂ rebuilt row by row
        const float* a = rc.data_ptr<float>();
        for (int64_t j = 0; j < cc; ++j) {
          for (int64_t k = 0; k < D; ++k) rhat[k] = a[j * D + k] * rinv_p[c0 + j];
          normalize_backward_row(grc.data_ptr<float>() + j * D, rhat.data(), rnorm.data_ptr<float>()[c0 + j], D);
        }
      }
    });
  }
  return {loss, gx, gref};
}

}  // namespace

void register_pair(torch::Library& m) { m.impl("pair_fwd", &pair_fwd); }

}  // namespace fastcdml
