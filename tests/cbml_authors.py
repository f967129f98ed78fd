"""CBML values computed once from the authors' public code (github.com/kanshichao/CBML,
``cbml_benchmark/losses/cbml.py``): the class-means centre at commit d6747de (2021-04-21, what the repository has
had since) and the boundary centre at commit dac7eb5 (2020-10-01), in float64 on CPU. Only the inputs' recipe and
the resulting numbers are kept (in ``tests/data/cbml_authors.json``).

Inputs of a row ``(center, seed, B, D, C, params, phi, negatives, loss, directional_grad)``::

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=g)
    v = torch.randn(B, D, generator=g, dtype=torch.float64)

Their loss was given ``normalize(x)`` (their model normalises before the loss); ``loss`` is its value and
``directional_grad`` is ``Σ (∂loss/∂x) · v``. No off-diagonal similarity reaches 1 − 1e-5, so their self
exclusion by value and ours by index select the same pairs. ``params`` names the hyper-parameters in ``PARAMS``;
h is 0.2 with the class-means centre and 0.5 with the boundary centre (their example configs); ``negatives``
``topk`` is their ``ADAPTIVE_NEG: False`` (the 100 hardest).
"""

import json
from pathlib import Path

_DATA = json.loads((Path(__file__).parent / "data" / "cbml_authors.json").read_text())
PARAMS: dict[str, dict[str, float]] = _DATA["params"]
MEAN_WEIGHT: dict[str, float] = _DATA["mean_weight"]
TOP_K: int = _DATA["top_k"]
CASES: list[tuple] = [tuple(case) for case in _DATA["cases"]]
