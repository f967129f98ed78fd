"""Drop-in replacement for pytorch-metric-learning's ``ProxyAnchorLoss`` on fused per-column kernels.

``ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32)`` keeps PML's learnable ``proxies`` of shape
(num_classes, embedding_size), initialised as PML's (Kaiming normal, ``mode="fan_out"``; ``weight_init_func``
replaces it), so a PML ``state_dict`` loads unchanged; it is called as PML's losses are,
``loss_fn(embeddings, labels, indices_tuple=None)``, and computes (``fastcdml.reference.proxy_anchor``)::

    L = (1/|C⁺|) Σ_j log(1 + Σ_{i: y_i = j} e^{α(δ − c_ij) + w_i − 1}) + (1/C) Σ_j log(1 + Σ_{i: y_i ≠ j} e^{α(c_ij + δ) + w_i − 1})

with ``c_ij`` the cosine of embedding i and proxy j, ``C⁺`` the classes present in the batch, and ``w_i`` PML's
miner weights (``convert_to_weights``: 1 without an ``indices_tuple``, else the number of times row i occurs in the
mined tuples over the largest such count), which PML adds, minus one, to the exponents. The fused kernels compute
the loss and both gradients without a B×C matrix and without a host synchronisation (``docs/kernels.md``).

What PML accepts and this class refuses, with an error naming it (``fastcdml.losses._pml``): ``reducer``, a
``distance`` other than ``CosineSimilarity()``, regularizers, ``collect_stats``, ``ref_emb`` / ``ref_labels``.
The loss is float32 whatever the embeddings' dtype (PML casts the proxies to the embeddings' dtype and returns
that dtype); the proxies keep their own dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .._backend import BACKENDS, resolve
from . import _pml


def init_proxies(proxies: torch.Tensor, weight_init_func=None) -> torch.Tensor:
    """PML's initialisation of a (C, D) proxy matrix, in place: ``weight_init_func(proxies)`` or Kaiming normal with
    ``mode="fan_out"`` (PML's default for its proxy-anchor loss)."""
    with torch.no_grad():
        if weight_init_func is None:
            nn.init.kaiming_normal_(proxies, mode="fan_out")
        else:
            weight_init_func(proxies)
    return proxies


def check_args(name: str, num_classes, embedding_size, margin, alpha, backend, pml_kwargs) -> None:
    """The constructor checks shared with the class-sharded version."""
    _pml.reject_options(name, pml_kwargs)
    if num_classes < 1 or embedding_size < 1:
        raise ValueError(f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not abs(float(margin)) < float("inf"):
        raise ValueError(f"margin must be finite, got {margin}")
    _checks.choice(backend, "backend", BACKENDS)


def check_batch(embeddings, labels, indices_tuple, backend_name, embedding_size, num_classes, check_inputs):
    """The input checks of a batch whose labels are on the embeddings' device: ``(backend, miner weights)``."""
    backend = resolve(backend_name, "proxy_anchor", embeddings.device)
    _checks.embeddings(embeddings, "embeddings", backend, embedding_size, check_inputs)
    _checks.labels(labels, "labels", embeddings, "embeddings", num_classes, check_inputs)
    return backend, _pml.miner_weights(indices_tuple, embeddings.shape[0], embeddings.device)


class ProxyAnchorLoss(nn.Module):
    """PML's ``ProxyAnchorLoss`` (see the module docstring). ``backend`` (``"auto"``, ``"triton"``, ``"cpp"``,
    ``"reference"``) and ``check_inputs`` (value checks on labels and embeddings) are fastcdml's."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32, *,
                 backend: str = "auto", check_inputs: bool = True, weight_init_func=None, **kwargs):
        super().__init__()
        check_args(type(self).__name__, num_classes, embedding_size, margin, alpha, backend, kwargs)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin, self.alpha = margin, alpha
        self.backend, self.check_inputs = backend, check_inputs
        self.proxies = nn.Parameter(init_proxies(torch.empty(num_classes, embedding_size), weight_init_func))

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The loss, 0-d float32 (float64 for float64 inputs on the reference backend), PML's call contract."""
        _, labels = _pml.call_contract(type(self).__name__, embeddings, labels, ref_emb, ref_labels)
        backend, weights = check_batch(embeddings, labels, indices_tuple, self.backend, self.embedding_size,
                                       self.num_classes, self.check_inputs)
        _checks.same_device(self.proxies, "proxies", embeddings, "embeddings", "; move the loss with .to(device)")
        return backend.proxy_anchor(embeddings, labels, self.proxies, weights, self.margin, self.alpha)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) cosines of the embeddings and the proxies (PML's ``get_logits``)."""
        return nn.functional.normalize(embeddings.float(), dim=1) @ nn.functional.normalize(
            self.proxies.float(), dim=1).t()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"alpha={self.alpha}, backend={self.backend!r}")
