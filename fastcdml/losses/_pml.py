"""pytorch-metric-learning's call contract, shared by the loss modules.

PML calls a loss as ``loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``, where
``indices_tuple`` comes from a miner: pairs ``(a1, p, a2, n)`` (anchor-positive and anchor-negative pairs) or
triplets ``(a, p, n)``, each a 1-D index tensor. Proxy/center losses turn mined tuples into per-sample weights;
pair losses keep only the mined pairs. Options PML accepts that fastcdml cannot honour raise an error that names
them.
"""
from __future__ import annotations

import torch

from .. import _checks

# PML constructor options fastcdml does not implement, and why.
UNSUPPORTED = {
    "reducer": "fastcdml losses reduce with reduction='mean' | 'sum' | 'none' (PML's default MeanReducer is 'mean')",
    "embedding_regularizer": "regularizers are not fused; add the regularizer's term to the loss yourself",
    "embedding_reg_weight": "regularizers are not fused; add the regularizer's term to the loss yourself",
    "weight_regularizer": "regularizers are not fused; add the regularizer's term to the loss yourself",
    "weight_reg_weight": "regularizers are not fused; add the regularizer's term to the loss yourself",
    "weight_init_func": "pass initial centers with centers= (rows are normalised)",
    "collect_stats": "fastcdml losses record no PML stats",
}


def reject_options(loss: str, options: dict) -> None:
    """Raise for PML options ``loss`` cannot honour (a distance other than cosine, a reducer, regularizers), naming
    each; a PML ``CosineSimilarity()`` distance is accepted (it is what every fastcdml loss uses)."""
    for name, value in options.items():
        if name == "distance":
            if type(value).__name__ == "CosineSimilarity":
                continue
            raise ValueError(f"{loss}: distance={type(value).__name__}() is not supported: fastcdml losses compare "
                             "L2-normalised embeddings by cosine similarity (PML's CosineSimilarity)")
        if name in UNSUPPORTED:
            raise ValueError(f"{loss}: {name} is not supported: {UNSUPPORTED[name]}")
        raise TypeError(f"{loss}.__init__() got an unexpected keyword argument {name!r}")


def require_labels(loss: str, labels):
    if labels is None:
        raise ValueError(f"{loss} needs labels (it has no self-supervised mode)")
    return labels


def no_reference(loss: str, ref_emb, ref_labels) -> None:
    if ref_emb is not None or ref_labels is not None:
        raise ValueError(f"{loss} compares queries with class centers: ref_emb / ref_labels are not supported "
                         "(as in PML's proxy losses)")


def call_contract(loss: str, embeddings, labels, ref_emb, ref_labels) -> tuple[torch.device, torch.Tensor]:
    """PML's call contract of a proxy loss: labels required, no reference set; ``(the embeddings' device, the
    labels on it)``."""
    labels = require_labels(loss, labels)
    no_reference(loss, ref_emb, ref_labels)
    device = _checks.tensor(embeddings, "embeddings").device
    return device, _checks.tensor(labels, "labels").to(device)


def _check_tuple(indices_tuple) -> tuple[torch.Tensor, ...]:
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be a miner's output: (anchor1, positive, anchor2, negative) pairs or "
                         f"(anchor, positive, negative) triplets, got {type(indices_tuple).__name__} of length "
                         f"{len(indices_tuple) if isinstance(indices_tuple, (tuple, list)) else '?'}")
    return tuple(indices_tuple)


def miner_weights(indices_tuple, batch: int, device, anchors_only: bool = False) -> torch.Tensor | None:
    """PML's per-sample weights of a mined tuple (``convert_to_weights``): each batch index that occurs in the tuple
    gets ``count / max count`` (its number of occurrences over the most frequent one's), the others 0; None (all
    weights 1) when nothing was mined or no tuple was given. ``anchors_only``: count the anchors only (PML's
    ``using_ref``, as its NCA-based losses do). (B,) float32."""
    if indices_tuple is None:
        return None
    parts = _check_tuple(indices_tuple)
    if all(len(t) == 0 for t in parts):
        return None
    if anchors_only:
        parts = parts[:1] if len(parts) == 3 else parts[::2]
    indices, counts = torch.unique(torch.cat([t.to(device).long() for t in parts]), return_counts=True)
    weights = torch.zeros(batch, dtype=torch.float32, device=device)
    weights[indices] = counts.float() / counts.max()
    return weights


def mined_pairs(indices_tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)``: the anchor → reference pairs of a mined tuple (triplets give their two pairs), as PML's
    pair losses read them; positives and negatives are told apart by the labels."""
    parts = [t.to(device).long() for t in _check_tuple(indices_tuple)]
    if len(parts) == 3:
        a, p, n = parts
        return torch.cat([a, a]), torch.cat([p, n])
    a1, p, a2, n = parts
    return torch.cat([a1, a2]), torch.cat([p, n])
