"""Drop-in replacement for pytorch-metric-learning's ``ProxyAnchorLoss`` on fused per-column kernels.

``ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32)`` keeps PML's learnable ``proxies`` of shape
(num_classes, embedding_size), initialised as PML's (Kaiming normal, ``mode="fan_out"``; ``weight_init_func``
replaces it), so a PML ``state_dict`` loads unchanged; it is called as PML's losses are,
``loss_fn(embeddings, labels, indices_tuple=None)``, and computes (``fastcdml.reference.proxy_anchor``)::

    L = (1/|C⁺|) Σ_j log(1 + Σ_{i: y_i = j} e^{α(δ − c_ij) + w_i − 1})
      + (1/C)    Σ_j log(1 + Σ_{i: y_i ≠ j} e^{α(c_ij + δ) + w_i − 1})

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
from .._backend import BACKENDS, Backend, resolve
from ..ops import proxy_anchor as proxy_anchor_ops
from ..params import ProxyAnchorParams
from ..reference import proxy_anchor as proxy_anchor_reference
from . import _pml
from ._bank import Bank


def proxy_anchor(backend: Backend):
    """The ProxyAnchor family's functions (``fastcdml.reference.proxy_anchor`` / ``fastcdml.ops.proxy_anchor``) on
    ``backend``."""
    return backend.bind(proxy_anchor_ops, proxy_anchor_reference)


def init_proxies(proxies: torch.Tensor, weight_init_func=None) -> torch.Tensor:
    """PML's initialisation of a (C, D) proxy matrix, in place: ``weight_init_func(proxies)`` or Kaiming normal with
    ``mode="fan_out"`` (PML's default for its proxy-anchor loss)."""
    with torch.no_grad():
        if weight_init_func is None:
            nn.init.kaiming_normal_(proxies, mode="fan_out")
        else:
            weight_init_func(proxies)
    return proxies


def check_args(name: str, num_classes: int, embedding_size: int, backend: str, pml_kwargs: dict) -> None:
    """The constructor checks shared with the class-sharded version (the loss parameters check themselves)."""
    _pml.reject_options(name, pml_kwargs)
    if num_classes < 1 or embedding_size < 1:
        raise ValueError(f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}")
    _checks.choice(backend, "backend", BACKENDS)


class ProxyAnchorLoss(Bank):
    """PML's ``ProxyAnchorLoss`` (see the module docstring): a :class:`fastcdml.losses._bank.Bank` of one learnable,
    unnormalised proxy per class, stored as ``proxies`` (C, D) (the kernels normalise them). ``backend``
    (``"auto"``, ``"triton"``, ``"cpp"``, ``"reference"``) and ``check_inputs`` (value checks on labels and
    embeddings) are fastcdml's; ``init_centers_`` (from the bank) sets proxies to class means."""

    KEY = "proxies"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32, *,
                 backend: str = "auto", check_inputs: bool = True, weight_init_func=None, **kwargs):
        check_args(type(self).__name__, num_classes, embedding_size, backend, kwargs)
        params = ProxyAnchorParams(margin, alpha)
        proxies = init_proxies(torch.empty(num_classes, embedding_size), weight_init_func)
        super().__init__(num_classes, embedding_size, params, "gradient", 0.0, backend, check_inputs, proxies,
                         normalize=False)
        self.margin, self.alpha = margin, alpha

    def _resolve(self, embeddings) -> Backend:
        return resolve(self.backend, "proxy_anchor", _checks.tensor(embeddings, "embeddings").device)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The loss, 0-d float32 (float64 for float64 inputs on the reference backend), PML's call contract."""
        _, labels = _pml.call_contract(type(self).__name__, embeddings, labels, ref_emb, ref_labels)
        backend = self._resolve(embeddings)
        self._check(embeddings, labels, backend)
        weights = _pml.miner_weights(indices_tuple, embeddings.shape[0], embeddings.device)
        return proxy_anchor(backend).proxy_anchor_loss(
            embeddings, labels, self.proxies, *self.params.as_args(), weights,
            proxy_anchor_reference.positive_scale(labels), 1.0 / self.num_classes)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) cosines of the embeddings and the proxies (PML's ``get_logits``)."""
        return cosines(embeddings, self.proxies)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"alpha={self.alpha}, backend={self.backend!r}")


def cosines(embeddings: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """(B, C) cosines of the rows of ``embeddings`` and ``proxies``, fp32."""
    return nn.functional.normalize(embeddings.float(), dim=1) @ nn.functional.normalize(proxies.float(), dim=1).t()
