// Proxy Anchor loss, CPU kernel for fastcdml::proxy_anchor_fwd (schema and math: fastcdml/ops/proxy_anchor.py,
// fastcdml/reference/proxy_anchor.py and docs/spec.md).
//
// The loss reduces per column (per proxy, over all B rows), so the work is split by columns: one task per chunk of
// chunk_size(D) proxies normalises its proxies once and streams the batch in blocks of kRowBlock rows (one GEMM
// each), keeping per column a running max m and sum l of exp(z − m) for the positive and the negative exponents,
// started at m = 0, l = 1 (the "1 +" inside the log), so log(1 + Σ e^z) = m + log l. With the proxies' gradient a
// second loop over the row blocks recomputes the tile, turns it into G_ij = ∂L/∂c_ij from the column normalisers
// and adds Gᵀ x̂ into the chunk's gradient rows. The rows' gradient Σ_j G_ij p̂_j is then one pass over the proxies
// per block of rows (one task per row block, chunks in order), from the saved column normalisers: every output
// element is written by one task in a fixed order, so the results do not depend on the thread count, and no
// B×C matrix exists (memory: O(B·D + C + threads · (kRowBlock · chunk + chunk · D))).
#include "common.h"

#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastcdml {
namespace {

using at::Tensor;

struct Exponents {
  float alpha, margin;
  // z of a positive (the row's own class) and of a negative pair, natural units, o = w − 1 the miner offset
  FASTCDML_INLINE float pos(float c, float o) const { return alpha * (margin - c) + o; }
  FASTCDML_INLINE float neg(float c, float o) const { return alpha * (c + margin) + o; }
};

// One block of rows against one chunk of proxies: the similarity tile s (rb × cc) = x̂_b p̂_cᵀ, replaced in place by
// the negative exponents z (a row's own class, if in the chunk, by −inf); pos[r] is that row's positive exponent and
// jpos[r] its column in the chunk, −1 when its class lies outside the chunk.
void exponents_tile(float* s, int64_t rb, int64_t cc, int64_t c0, const int64_t* y, const float* off,
                    const Exponents& e, float* pos, int64_t* jpos) {
  for (int64_t r = 0; r < rb; ++r) {
    float* row = s + r * cc;
    const float o = off ? off[r] : 0.f;
    const int64_t j = y[r] - c0;
    jpos[r] = (j >= 0 && j < cc) ? j : -1;
    if (jpos[r] >= 0) pos[r] = e.pos(row[j], o);
    for (int64_t k = 0; k < cc; ++k) row[k] = e.neg(row[k], o);
    if (jpos[r] >= 0) row[j] = -std::numeric_limits<float>::infinity();
  }
}

// The rows' miner offsets w − 1 as a contiguous fp32 tensor (undefined without weights).
Tensor offsets(const std::optional<Tensor>& weights, int64_t B) {
  if (!weights) return Tensor();
  TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == B, "weights must have shape (", B, ",), got ",
                    weights->sizes());
  return (weights->to(at::kFloat) - 1.f).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> proxy_anchor_fwd(const Tensor& x_in, const Tensor& labels,
                                                    const Tensor& proxies_in, const std::optional<Tensor>& weights,
                                                    const Tensor& pos_scale_t, double neg_scale, double margin,
                                                    double alpha, bool want_gx, bool want_gp) {
  check_embeddings(x_in, "x");
  check_embeddings(proxies_in, "proxies");
  TORCH_CHECK_VALUE(proxies_in.size(1) == x_in.size(1), "proxies must have shape (C, ", x_in.size(1), "), got ",
                    proxies_in.sizes());
  TORCH_CHECK_VALUE(pos_scale_t.numel() == 1, "pos_scale must have one element, got ", pos_scale_t.numel());
  const int64_t B = x_in.size(0), D = x_in.size(1), C = proxies_in.size(0);
  const Tensor y = check_labels(labels, B, "labels");
  const Tensor off_t = offsets(weights, B);
  const Tensor proxies = proxies_in.contiguous();
  auto [xh, xnorm] = normalize_rows(x_in);
  const auto f32 = xh.options();
  Tensor gx = at::zeros({want_gx ? B : 0, D}, f32), gp = at::zeros({want_gp ? C : 0, D}, f32);
  Tensor term_p = at::empty({C}, f32), term_n = at::empty({C}, f32);

  const Exponents e{static_cast<float>(alpha), static_cast<float>(margin)};
  const float sp = pos_scale_t.to(at::kFloat).item<float>(), sn = static_cast<float>(neg_scale);
  const float gpos = -e.alpha * sp, gneg = e.alpha * sn;  // ∂L/∂c = coefficient · e^{z − log(1 + Σ)}
  const int64_t CC = chunk_size(D), RB = kRowBlock;
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* offp = off_t.defined() ? off_t.data_ptr<float>() : nullptr;
  const float* tp = term_p.data_ptr<float>();
  const float* tn = term_n.data_ptr<float>();

  // The G tile (rb × cc) of rows [r0, r0 + rb) and the normalised proxies of chunk c0 (pt: packed by pack_t), into
  // s: the similarity tile, its exponents, then e^{z − term} times the coefficients (the positive at its column)
  auto coefficients = [&](Tensor& s, const Tensor& xb, const PackedB& pt, int64_t r0, int64_t c0, float* pos,
                          int64_t* jpos) {
    const int64_t rb = s.size(0), cc = s.size(1);
    mm(s, xb, pt, false);
    float* z = s.data_ptr<float>();
    exponents_tile(z, rb, cc, c0, yp + r0, offp ? offp + r0 : nullptr, e, pos, jpos);
    for (int64_t r = 0; r < rb; ++r) {
      float* row = z + r * cc;
      for (int64_t k = 0; k < cc; ++k) row[k] = gneg * fast_exp(row[k] - tn[c0 + k]);
      if (jpos[r] >= 0) row[jpos[r]] = gpos * fast_exp(pos[r] - tp[c0 + jpos[r]]);
    }
  };

  // Columns: per chunk of proxies, the normalisers over all rows, then (want_gp) Σ_i G_ij x̂_i
  parallel_for(0, ceil_div(C, CC), 1, [&](int64_t ch0, int64_t ch1) {
    Tensor sbuf = at::empty({RB * CC}, f32), ph = at::empty({CC, D}, f32), pn = at::empty({CC}, f32);
    PackedB pt;  // the chunk's normalised proxies for s = x̂·p̂ᵀ, packed once for every block of rows
    std::vector<float> pos(RB), mp(CC), lp(CC), mn(CC), ln(CC), tmax(CC);
    std::vector<int64_t> jpos(RB);
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      const int64_t c0 = ch * CC, cc = std::min(CC, C - c0);
      Tensor phc = ph.narrow(0, 0, cc), pnc = pn.narrow(0, 0, cc);
      normalize_rows_into(proxies.narrow(0, c0, cc), phc, pnc);
      pt.pack_t(phc);
      std::fill_n(mp.begin(), cc, 0.f), std::fill_n(lp.begin(), cc, 1.f);
      std::fill_n(mn.begin(), cc, 0.f), std::fill_n(ln.begin(), cc, 1.f);
      for (int64_t r0 = 0; r0 < B; r0 += RB) {
        const int64_t rb = std::min(RB, B - r0);
        Tensor s = tile(sbuf, rb, cc);
        mm(s, xh.narrow(0, r0, rb), pt, false);
        float* z = s.data_ptr<float>();
        exponents_tile(z, rb, cc, c0, yp + r0, offp ? offp + r0 : nullptr, e, pos.data(), jpos.data());
        for (int64_t r = 0; r < rb; ++r) {  // positives: at most one per row, online in row order
          const int64_t j = jpos[r];
          if (j < 0) continue;
          if (pos[r] > mp[j]) {
            lp[j] = lp[j] * std::exp(mp[j] - pos[r]) + 1.f;
            mp[j] = pos[r];
          } else {
            lp[j] += std::exp(pos[r] - mp[j]);
          }
        }
        std::copy_n(mn.begin(), cc, tmax.begin());  // negatives: the block's column max first, then one rescale
        for (int64_t r = 0; r < rb; ++r)
          for (int64_t k = 0; k < cc; ++k) tmax[k] = std::max(tmax[k], z[r * cc + k]);
        for (int64_t k = 0; k < cc; ++k) {
          if (tmax[k] > mn[k]) ln[k] *= std::exp(mn[k] - tmax[k]);
          mn[k] = tmax[k];
        }
        for (int64_t r = 0; r < rb; ++r)
          for (int64_t k = 0; k < cc; ++k) ln[k] += fast_exp(z[r * cc + k] - mn[k]);
      }
      float* tpw = term_p.data_ptr<float>() + c0;
      float* tnw = term_n.data_ptr<float>() + c0;
      for (int64_t k = 0; k < cc; ++k) tpw[k] = mp[k] + std::log(lp[k]), tnw[k] = mn[k] + std::log(ln[k]);
      if (!want_gp) continue;
      Tensor gpc = gp.narrow(0, c0, cc);
      for (int64_t r0 = 0; r0 < B; r0 += RB) {
        const int64_t rb = std::min(RB, B - r0);
        const Tensor xb = xh.narrow(0, r0, rb);
        Tensor s = tile(sbuf, rb, cc);
        coefficients(s, xb, pt, r0, c0, pos.data(), jpos.data());
        addmm_tn(gpc, s, xb);
      }
      const float* php = phc.data_ptr<float>();
      const float* pnp = pnc.data_ptr<float>();
      float* g = gpc.data_ptr<float>();
      for (int64_t k = 0; k < cc; ++k) normalize_backward_row(g + k * D, php + k * D, pnp[k], D);
    }
  });

  // Rows: per block of rows, Σ_j G_ij p̂_j over the chunks in order, from the column normalisers. A task walks the
  // chunks once and takes each of its blocks through a chunk before the next (the chunk normalised and packed once).
  if (want_gx && B > 0) {
    parallel_for(0, ceil_div(B, RB), 1, [&](int64_t blk0, int64_t blk1) {
      Tensor sbuf = at::empty({RB * CC}, f32), ph = at::empty({CC, D}, f32), pn = at::empty({CC}, f32);
      PackedB pt, pnn;  // the chunk's normalised proxies for s = x̂·p̂ᵀ and for gx += G·p̂
      std::vector<float> pos(RB);
      std::vector<int64_t> jpos(RB);
      for (int64_t c0 = 0; c0 < C; c0 += CC) {
        const int64_t cc = std::min(CC, C - c0);
        Tensor phc = ph.narrow(0, 0, cc), pnc = pn.narrow(0, 0, cc);
        normalize_rows_into(proxies.narrow(0, c0, cc), phc, pnc);
        pt.pack_t(phc), pnn.pack_n(phc);
        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t r0 = blk * RB, rb = std::min(RB, B - r0);
          Tensor s = tile(sbuf, rb, cc);
          coefficients(s, xh.narrow(0, r0, rb), pt, r0, c0, pos.data(), jpos.data());
          mm(gx.narrow(0, r0, rb), s, pnn, true);
        }
      }
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t r0 = blk * RB, rb = std::min(RB, B - r0);
        const Tensor xb = xh.narrow(0, r0, rb);
        Tensor gxb = gx.narrow(0, r0, rb);
        float* g = gxb.data_ptr<float>();
        const float* xhp = xb.data_ptr<float>();
        const float* np = xnorm.data_ptr<float>() + r0;
        for (int64_t r = 0; r < rb; ++r) normalize_backward_row(g + r * D, xhp + r * D, np[r], D);
      }
    });
  }

  double pos_sum = 0.0, neg_sum = 0.0;  // in column order: independent of the thread count
  for (int64_t k = 0; k < C; ++k) pos_sum += tp[k], neg_sum += tn[k];
  Tensor loss = at::empty({}, f32);
  loss.fill_(static_cast<float>(pos_sum * sp + neg_sum * neg_scale));
  return {loss, gx, gp};
}

}  // namespace

void register_proxy_anchor(torch::Library& m) { m.impl("proxy_anchor_fwd", &proxy_anchor_fwd); }

}  // namespace fastcdml
