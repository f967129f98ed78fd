"""ProxyNCA and SoftTriple on the margin-softmax kernels vs pytorch-metric-learning's classes of the same name (the
oracle, run in float64): loss, gradient to the embeddings and to the proxies (``proxies`` / ``fc``), with and
without mined tuples, every backend, fp32 error <= 1e-5 relative; PML's state_dict, get_logits, its row-dropping
rule (ProxyNCA), option errors and torch.compile."""
import math

import pytest
import torch

import fastcdml

from .conftest import DEVICE
from .helpers import PML_TOL, assert_compiled_matches_eager, compare_with_pml, kernel_backends

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses as pml_losses  # noqa: E402

BACKENDS = ["reference"] + kernel_backends("ccl", DEVICE)


def shapes(backend):
    return (19, 53, 40) if backend == "triton" and DEVICE.type == "cpu" else (37, 1001, 72)


def mined(kind, b):
    idx = lambda n: torch.randint(0, b // 2, (n,))  # noqa: E731  (half the batch is never mined)
    return {"none": None, "pairs": (idx(9), idx(9), idx(5), idx(5)), "triplets": (idx(7), idx(7), idx(7))}[kind]


# --- ProxyNCA -----------------------------------------------------------------------------------------------------

def nca_pair(c, d, backend, softmax_scale=1.0):
    theirs = pml_losses.ProxyNCALoss(c, d, softmax_scale=softmax_scale).double()
    ours = fastcdml.ProxyNCALoss(c, d, softmax_scale=softmax_scale, backend=backend).to(DEVICE)
    ours.load_state_dict({"proxies": theirs.proxies.detach().float()})
    return theirs, ours


def near_proxies(proxies, y, spread=1.0):
    """Queries from close to their proxy to unrelated to it, of varied norms, float32 on DEVICE."""
    b, d = y.shape[0], proxies.shape[1]
    own = torch.nn.functional.normalize(proxies.detach().double(), dim=1)[y]
    a = spread * torch.rand(b, 1, dtype=torch.float64)
    x = (a * own + (1 - a) * torch.randn(b, d, dtype=torch.float64) / math.sqrt(d)) * (0.5 + torch.rand(b, 1))
    return x.float().to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["none", "pairs", "triplets"])
@pytest.mark.parametrize("softmax_scale", [1.0, 9.0])
def test_proxy_nca_matches_pml(backend, kind, softmax_scale):
    b, c, d = shapes(backend)
    theirs, ours = nca_pair(c, d, backend, softmax_scale)
    y = torch.randint(0, c, (b,))
    x = near_proxies(theirs.proxies, y)
    compare_with_pml(theirs, ours, "proxies", x, y.to(DEVICE), mined(kind, b), f"ProxyNCA/{backend}/{kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_proxy_nca_drops_rows_whose_probability_underflows(backend):
    """softmax_scale 250: rows whose label's proxy is antipodal to their nearest one have L ≈ 4·250 = 1000, whose
    probability underflows in float32 and float64 alike; PML drops them and averages the others (miner weights
    included). The rest have L < 60. Every row dropped: NaN, zero gradients, as PML."""
    c, d, s = 12, 16, 250.0
    theirs, ours = nca_pair(c, d, backend, s)
    with torch.no_grad():  # proxies 2j + 1 = −proxies 2j
        theirs.proxies[1::2] = -theirs.proxies[0::2]
        ours.proxies.copy_(theirs.proxies)
    y = torch.arange(24) % c
    p = torch.nn.functional.normalize(theirs.proxies.detach(), dim=1)
    far = torch.arange(24) % 3 == 0  # these sit on the antipode of their label's proxy
    near = p[y] + (1 + 0.05 * torch.rand(24, 1, dtype=torch.float64)) * p[(y + 2) % c]  # between two proxies
    x = torch.where(far[:, None], -p[y], near + 0.005 * torch.randn(24, d, dtype=torch.float64))
    x = (x * (1 + torch.rand(24, 1, dtype=torch.float64))).float().to(DEVICE)
    rows = fastcdml.reference.ccl.ccl_loss_rows(x.double().cpu(), y, p, 1 / (2 * s), 0.0, 0.0)
    assert (rows[far] > 800).all() and (rows[~far] < 60).all() and rows[~far].max() > 1
    for kind in ("none", "triplets"):
        compare_with_pml(theirs, ours, "proxies", x, y.to(DEVICE), mined(kind, 24), f"drop/{backend}/{kind}",
                tol=PML_TOL if backend == "reference" else 5e-5)  # fp32 cosines times 2·250: ~1.2e-5 on the kernels
    xf = x[far].clone().requires_grad_()
    loss = ours(xf, y[far].to(DEVICE))
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(theirs(xf.detach().double().cpu(), y[far]))
    assert (xf.grad == 0).all() and (ours.proxies.grad == 0).all()


def test_proxy_nca_state_get_logits_and_options():
    theirs = pml_losses.ProxyNCALoss(11, 6, softmax_scale=3)
    torch.manual_seed(5)
    ours = fastcdml.ProxyNCALoss(11, 6, softmax_scale=3)
    torch.manual_seed(5)
    again = pml_losses.ProxyNCALoss(11, 6, softmax_scale=3)
    assert torch.equal(ours.proxies, again.proxies)  # PML's initialisation, same random stream
    assert [n for n, _ in ours.named_parameters()] == ["proxies"] and ours.softmax_scale == theirs.softmax_scale
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 6)
    torch.testing.assert_close(ours.get_logits(x), theirs.get_logits(x), rtol=1e-5, atol=1e-5)
    fastcdml.ProxyNCALoss(11, 6, distance=distances.LpDistance(power=2))  # PML's default: what is computed
    for kwargs, match in [(dict(softmax_scale=0), "softmax_scale must be > 0"),
                          (dict(distance=distances.CosineSimilarity()), r"distance=CosineSimilarity\(\)"),
                          (dict(distance=distances.LpDistance()), r"distance=LpDistance\(\)"),
                          (dict(weight_regularizer=object()), "weight_regularizer is not supported"),
                          (dict(reducer=object()), "reducer is not supported")]:
        with pytest.raises(ValueError, match=match):
            fastcdml.ProxyNCALoss(11, 6, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        ours(x, torch.full((7,), 11))


# --- SoftTriple ---------------------------------------------------------------------------------------------------

SOFT_BACKENDS = BACKENDS


def soft_pair(c, d, k, backend, **kwargs):
    theirs = pml_losses.SoftTripleLoss(c, d, centers_per_class=k, **kwargs).double()
    ours = fastcdml.SoftTripleLoss(c, d, centers_per_class=k, backend=backend, **kwargs).to(DEVICE)
    ours.load_state_dict({"fc": theirs.fc.detach().float()})
    return theirs, ours


def near_centres(fc, y, k):
    """Queries from close to one centre of their class to unrelated, float32 on DEVICE."""
    cols = torch.nn.functional.normalize(fc.detach().double().t(), dim=1)
    return near_proxies(cols, y * k + torch.randint(0, k, y.shape))


@pytest.mark.parametrize("backend", SOFT_BACKENDS)
@pytest.mark.parametrize("kind", ["none", "pairs", "triplets"])
@pytest.mark.parametrize("k,kwargs", [(3, {}), (10, dict(la=35, gamma=0.03, margin=0.2))], ids=["k3", "k10"])
def test_soft_triple_matches_pml(backend, kind, k, kwargs):
    b, c, d = shapes(backend)
    c = c // k + 3
    theirs, ours = soft_pair(c, d, k, backend, **kwargs)
    y = torch.randint(0, c, (b,))
    x = near_centres(theirs.fc, y, k)
    compare_with_pml(theirs, ours, "fc", x, y.to(DEVICE), mined(kind, b), f"SoftTriple/{backend}/{kind}")


def test_soft_triple_state_get_logits_and_options():
    torch.manual_seed(5)
    theirs = pml_losses.SoftTripleLoss(11, 6, centers_per_class=4, gamma=0.2)
    torch.manual_seed(5)
    ours = fastcdml.SoftTripleLoss(11, 6, centers_per_class=4, gamma=0.2)
    assert torch.equal(ours.fc, theirs.fc)  # PML's initialisation, same random stream
    assert [n for n, _ in ours.named_parameters()] == ["fc"] and ours.fc.shape == (6, 44)
    for attr in ("la", "gamma", "margin", "centers_per_class", "num_classes"):
        assert getattr(ours, attr) == pytest.approx(getattr(theirs, attr)), attr
    x = torch.randn(7, 6)
    torch.testing.assert_close(ours.get_logits(x), theirs.get_logits(x), rtol=1e-5, atol=1e-6)
    back = pml_losses.SoftTripleLoss(11, 6, centers_per_class=4)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.fc, theirs.fc)
    fastcdml.SoftTripleLoss(11, 6, distance=distances.CosineSimilarity())
    for kwargs, match in [(dict(gamma=0), "gamma must be > 0"), (dict(la=-1), "la must be > 0"),
                          (dict(centers_per_class=0), "centers_per_class"), (dict(margin=-0.1), "margin"),
                          (dict(weight_regularizer=object()), "weight_regularizer is not supported"),
                          (dict(distance=distances.LpDistance()), r"distance=LpDistance\(\)")]:
        with pytest.raises(ValueError, match=match):
            fastcdml.SoftTripleLoss(11, 6, **kwargs)


@pytest.mark.parametrize("backend", kernel_backends("ccl", DEVICE))
@pytest.mark.parametrize("make", [lambda backend: fastcdml.ProxyNCALoss(6, 16, softmax_scale=4, backend=backend),
                                  lambda backend: fastcdml.SoftTripleLoss(6, 16, centers_per_class=3, backend=backend)],
                         ids=["ProxyNCA", "SoftTriple"])
def test_compiles_fullgraph(make, backend):
    """A training step through torch.compile(fullgraph=True) compiles once over several steps and matches eager
    (loss, gradients to the embeddings and to the proxies)."""
    batches = [(torch.randn(12, 16, device=DEVICE), torch.randint(0, 6, (12,), device=DEVICE)) for _ in range(3)]
    assert_compiled_matches_eager(lambda: make(backend).to(DEVICE), batches,
                                  lambda loss_fn: [p.grad for p in loss_fn.parameters()])
