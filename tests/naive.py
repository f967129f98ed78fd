"""Independent, deliberately naive per-row implementations of docs/spec.md (float64, Python loops).

Written from the spec text without looking at fastcdml.reference, so that the two can disagree."""
from __future__ import annotations

import math

import torch


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / max(float(v.norm()), 1e-12)


def ccl_rows(x, labels, centers, tau, m, lam):
    out = []
    for i in range(x.shape[0]):
        xh = _unit(x[i].double())
        y = int(labels[i])
        z = [(float(xh @ centers[j].double()) - (m if j == y else 0.0)) / tau for j in range(centers.shape[0])]
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        s_y = float(xh @ centers[y].double())
        out.append(lse - z[y] - 2 * lam * s_y)
    return torch.tensor(out, dtype=torch.float64)


def ccl_update(centers, x, labels, mu):
    w = centers.double().clone()
    for k in sorted(set(int(v) for v in labels)):
        rows = [_unit(x[i].double()) for i in range(x.shape[0]) if int(labels[i]) == k]
        mean = sum(rows) / len(rows)
        w[k] = _unit(mu * w[k] + (1 - mu) * mean)
    return w


def cbml_rows(x, labels, ref, ref_labels, include_self, a_p, b_p, a_n, b_n, margin, w, h, phi, top_k, allowed=None,
              center="class_means", w_p=0.25, w_n=0.25):
    """Per-row L_i as python floats (top_k = 0: adaptive). A reference with a negative label is absent;
    ``allowed``: a set of (row, column) pairs that may be positives or negatives (None: every pair)."""
    refs = ([(_unit(x[j].double()), int(labels[j]), j) for j in range(x.shape[0])] if include_self else [])
    if ref is not None:
        refs += [(_unit(ref[j].double()), int(ref_labels[j]), None) for j in range(ref.shape[0])]
    f = {"log": math.log, "sqrt": math.sqrt, "constant": None}[phi]
    out = []
    for i in range(x.shape[0]):
        xh, y = _unit(x[i].double()), int(labels[i])
        row = [float(xh @ r) for r, _, _ in refs]
        present = [j for j, (_, ly, _) in enumerate(refs) if ly >= 0]
        ok = [j for j in present if allowed is None or (i, j) in allowed]
        pos = [j for j in ok if refs[j][1] == y and refs[j][2] != i]
        neg = [j for j in ok if refs[j][1] != y]
        if not pos or not neg:
            out.append(0.0)
            continue
        min_p = min(row[j] for j in pos)
        max_n = max(row[j] for j in neg)
        if center == "class_means":
            mean = h * sum(row[j] for j in pos) / len(pos) + (1 - h) * sum(row[j] for j in neg) / len(neg)
        else:
            mean = (1 - h) * sum(row[j] for j in present) / len(present) + h * (min_p + max_n) / 2
        sigma = sum((row[j] - mean) ** 2 for j in neg)
        hp = [j for j in pos if row[j] - margin < max_n]
        if top_k:
            hn = sorted(neg, key=lambda j: (-row[j], j))[:top_k]
        else:
            hn = [j for j in neg if row[j] + margin > min_p]
        if not hp or not hn:
            out.append(0.0)
            continue
        sum_p = sum(math.exp(-(row[j] - a_p) / b_p) for j in hp)
        sum_n = sum(math.exp((row[j] - a_n) / b_n) for j in hn)
        if f is None:
            pos_t, neg_t = 1 + w_p * sum_p, 1 + w_n * sum_n
        else:
            pos_t, neg_t = f(1 + sum_p), f(1 + sum_n)
        out.append(pos_t + neg_t + w * sigma)
    return torch.tensor(out, dtype=torch.float64)
