"""What every loss with a bank of class rows shares (Center Contrastive, the margin-softmax drop-ins, their sharded
versions): the bank's storage and update mode, the input checks, the empty batch, PML's call contract and the
momentum step.

The bank holds K rows of ``embedding_size`` values per class (K = ``params.sub_centers``, PML's layout: class j owns
rows j·K … j·K+K−1), stored under ``KEY``: as rows ``(C·K, D)`` or, with ``COLUMNS``, as PML's ``(D, C·K)`` ``W``
whose columns are the bank rows (kept as the transpose of contiguous rows, so the kernels read rows without a copy).
``update="momentum"``: a buffer of unit rows that, in training mode, moves toward the batch's class means after the
loss is computed (``fastcdml.reference.ccl.ccl_momentum_update``). ``update="gradient"``: a Parameter, normalised in
forward (differentiably) and trained by an optimizer. :class:`fastcdml.losses.sharded_ccl.ShardedBank` is the same
bank split by class across ranks.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .._backend import BACKENDS, Backend, resolve
from ..ops import ccl as ccl_ops
from ..params import CenterParams
from ..reference import ccl as ccl_reference
from ..reference.ccl import normalize_rows
from . import _pml

UPDATES = ("momentum", "gradient")
BANK_DTYPES = (torch.float32, torch.bfloat16)
ONE_CLASS = "with a single class the softmax term is constant and only the center pull trains"


def check_args(num_classes: int, embedding_size: int, update: str, momentum: float, backend: str,
               reduction: str = "mean", dtype: torch.dtype = torch.float32) -> None:
    """The constructor checks every bank loss shares (the loss parameters check themselves)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}: {ONE_CLASS}")
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
    _checks.choice(update, "update", UPDATES)
    check_momentum(momentum)
    _checks.choice(reduction, "reduction", _checks.REDUCTIONS)
    _checks.choice(backend, "backend", BACKENDS)
    _checks.choice(dtype, "dtype", BANK_DTYPES)


def check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")


def ccl(backend: Backend):
    """The CCL family's functions (``fastcdml.reference.ccl`` / ``fastcdml.ops.ccl``) on ``backend``."""
    return backend.bind(ccl_ops, ccl_reference)


def empty_loss(embeddings: torch.Tensor, bank: torch.Tensor, reduction: str) -> torch.Tensor:
    """The loss of an empty batch: 0 (``mean``/``sum``) or an empty vector (``none``), float32, still in the graph
    of the embeddings and of a learnable bank (so backward and optimizers see the usual tensors)."""
    zero = embeddings.sum(dtype=torch.float32) * 0.0
    if bank.requires_grad:
        zero = zero + bank.sum(dtype=torch.float32) * 0.0
    return zero if reduction != "none" else zero.expand(0)


class Bank(nn.Module):
    """A loss with a bank of class rows: storage, checks and the single-process step (module docstring).

    Subclasses set ``KEY`` / ``COLUMNS`` (the layout), ``NORMALIZE_ON_LOAD`` (a loaded momentum bank gets unit
    rows, e.g. PML's ``W``) and ``reduction``; :meth:`forward` is PML's call contract:
    ``loss_fn(embeddings, labels, indices_tuple=None)``, mined tuples weighting each row as PML's proxy losses do
    (``fastcdml.losses._pml.miner_weights``); every row of the batch moves the bank, mined or not.
    """

    KEY, COLUMNS, NORMALIZE_ON_LOAD = "centers", False, False
    reduction = "mean"

    def __init__(self, num_classes: int, embedding_size: int, params: CenterParams, update: str, momentum: float,
                 backend: str, check_inputs: bool, rows: torch.Tensor, dtype: torch.dtype = torch.float32,
                 normalize: bool = True):
        """``rows`` (C·K, D): the initial bank, made unit rows when ``normalize`` and stored as ``dtype``."""
        super().__init__()
        self.params, self.update, self.momentum = params, update, momentum
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.backend, self.check_inputs = backend, check_inputs
        rows = (normalize_rows(rows.detach()) if normalize else rows.detach()).to(dtype).contiguous()
        if update == "gradient":
            self.register_parameter(self.KEY, nn.Parameter(rows.t().contiguous() if self.COLUMNS else rows))
        else:
            self.register_buffer(self.KEY, rows.t() if self.COLUMNS else rows)
            if self.NORMALIZE_ON_LOAD:
                self.register_load_state_dict_post_hook(_normalize_loaded_bank)

    @property
    def sub_centers(self) -> int:
        return self.params.sub_centers

    @property
    def embedding_dim(self) -> int:
        """Alias of ``embedding_size``."""
        return self.embedding_size

    def _stored_rows(self) -> torch.Tensor:
        stored = getattr(self, self.KEY)
        return stored.t() if self.COLUMNS else stored

    def _set_rows(self, rows: torch.Tensor) -> None:
        setattr(self, self.KEY, rows.t() if self.COLUMNS else rows)

    def bank_rows(self, backend: Backend | None = None) -> torch.Tensor:
        """The (C·K, D) rows the kernels read: normalised in gradient mode (differentiable; by ``backend``'s
        ``normalize_rows`` when given, else the reference's), contiguous in momentum mode."""
        rows = self._stored_rows()
        if self.update == "gradient":
            return (ccl_reference if backend is None else ccl(backend)).normalize_rows(rows)
        if not rows.is_contiguous():  # e.g. after a load or a move that did not keep the layout
            self._set_rows(rows.contiguous())
        return self._stored_rows()

    def _resolve(self, embeddings) -> Backend:
        return resolve(self.backend, "ccl", _checks.tensor(embeddings, "embeddings").device)

    def _check(self, embeddings, labels, backend: Backend) -> None:
        _checks.embeddings(embeddings, "embeddings", backend, self.embedding_size, self.check_inputs)
        _checks.same_device(getattr(self, self.KEY), self.KEY, embeddings, "embeddings",
                            "; move the loss with .to(device)")
        _checks.labels(labels, "labels", embeddings, "embeddings", self.num_classes, self.check_inputs)

    def _checked_batch(self, embeddings, labels, backend: Backend, momentum_step: bool):
        """Check the inputs; return the batch ``(embeddings, labels)`` the momentum step moves the bank with
        (this rank's; :class:`fastcdml.CenterContrastiveLoss` may gather every rank's)."""
        self._check(embeddings, labels, backend)
        return embeddings, labels

    def _momentum_step(self, backend: Backend, bank: torch.Tensor, embeddings, labels) -> None:
        """Move ``bank`` (the stored rows or a slice's) with the batch. The loss was computed from the bank before
        the step: a backend that updates in place computed the query gradient already; the reference's autograd
        graph holds the old bank, so it returns a new one and the stored tensor is swapped instead of written
        (an in-place write would also be mis-ordered by torch.compile)."""
        new = ccl(backend).ccl_momentum_update(bank, embeddings.detach(), labels, self.momentum, self.sub_centers)
        if new is not bank:
            self._set_rows(new)

    def _reduce(self, rows: torch.Tensor, indices_tuple) -> torch.Tensor:
        """``reduction`` of the per-row losses weighted by PML's miner weights of ``indices_tuple``."""
        weights = _pml.miner_weights(indices_tuple, rows.shape[0], rows.device)
        return _checks.reduce(rows if weights is None else rows * weights.to(rows.dtype), self.reduction)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None, indices_tuple=None,
                ref_emb=None, ref_labels=None) -> torch.Tensor:
        """``reduction`` over the batch of the miner-weighted per-row losses, float32 (float64 for float64 inputs
        on the reference), in PML's call order; ``ref_emb`` / ``ref_labels`` are refused (as PML's proxy losses
        do). In training mode with ``update="momentum"``, the bank moves after the loss is computed."""
        name = type(self).__name__
        labels = _pml.require_labels(name, labels)
        _pml.no_reference(name, ref_emb, ref_labels)
        backend = self._resolve(embeddings)
        labels = _checks.tensor(labels, "labels").to(embeddings.device)
        momentum_step = self.training and self.update == "momentum"
        batch = self._checked_batch(embeddings, labels, backend, momentum_step)
        bank = self.bank_rows(backend)
        if embeddings.shape[0] == 0:
            loss = empty_loss(embeddings, bank, self.reduction)
        else:
            rows = ccl(backend).ccl_loss_rows(embeddings, labels, bank, *self.params.as_args(),
                                              gamma=self.params.gamma)
            loss = self._reduce(rows, indices_tuple)
        if momentum_step and batch[0].shape[0]:
            self._momentum_step(backend, bank, *batch)
        return loss

    @torch.no_grad()
    def init_centers_(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """Set the bank row of every class in ``labels`` to ``normalize(mean_{y_i = k} x̂_i)`` of ``embeddings``
        (N, D) (e.g. a pretrained network's embeddings of the training set), in place, in either update mode; the
        rows of absent classes keep their values (with sub-centers, each row moves the sub-center of its class it
        is most similar to). Returns self."""
        backend = self._resolve(embeddings)
        labels = _checks.tensor(labels, "labels").to(embeddings.device)
        embeddings, labels = self._checked_batch(embeddings, labels, backend, True)
        if embeddings.shape[0]:
            stored = self._stored_rows()
            source = stored.detach().contiguous()  # gradient-mode W: the transpose of contiguous columns
            new = ccl(backend).ccl_momentum_update(source, embeddings.detach(), labels, 0.0, self.sub_centers)  # μ = 0
            stored.copy_(new)
        return self


def _normalize_loaded_bank(module: Bank, incompatible_keys) -> None:
    """A loaded momentum bank (e.g. PML's ``W``, not normalised) gets unit, contiguous rows right after loading."""
    with torch.no_grad():
        rows = module._stored_rows()
        module._set_rows(normalize_rows(rows).to(rows.dtype).contiguous())
