"""CBML values computed once from the authors' public code (github.com/kanshichao/CBML,
``cbml_benchmark/losses/cbml.py``): the class-means centre at commit d6747de (2021-04-21, what the repository has
had since) and the boundary centre at commit dac7eb5 (2020-10-01), in float64 on CPU. Only the inputs' recipe and
the resulting numbers are kept here.

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

PARAMS = {
    "authors": dict(pos_a=0.5, pos_b=0.5, neg_a=1.0, neg_b=0.01, margin=0.1, variance_weight=1.0, pos_weight=0.25,
                    neg_weight=0.25),
    "lively": dict(pos_a=0.3, pos_b=0.4, neg_a=0.2, neg_b=0.3, margin=0.6, variance_weight=0.5, pos_weight=0.7,
                   neg_weight=0.4),
}
MEAN_WEIGHT = {"class_means": 0.2, "boundary": 0.5}
TOP_K = 100

CASES = [
    ('class_means', 0, 24, 16, 5, 'authors', 'log', 'adaptive', 3.5853147660084783, 0.03814547881307686),
    ('class_means', 0, 24, 16, 5, 'authors', 'log', 'topk', 3.5853147660084783, 0.03814547881307686),
    ('class_means', 0, 24, 16, 5, 'authors', 'sqrt', 'adaptive', 5.978928036337404, 0.11513470108741247),
    ('class_means', 0, 24, 16, 5, 'authors', 'sqrt', 'topk', 5.978928036337404, 0.11513470108741247),
    ('class_means', 0, 24, 16, 5, 'authors', 'constant', 'adaptive', 7.214814183439046, 0.3142802971235192),
    ('class_means', 0, 24, 16, 5, 'authors', 'constant', 'topk', 7.214814183439046, 0.3142802971235192),
    ('class_means', 0, 24, 16, 5, 'lively', 'log', 'adaptive', 5.470208942941864, -0.1423803273000755),
    ('class_means', 0, 24, 16, 5, 'lively', 'log', 'topk', 5.470208942941864, -0.14238032730007555),
    ('class_means', 0, 24, 16, 5, 'lively', 'sqrt', 'adaptive', 7.695199367226156, -0.20299510625576406),
    ('class_means', 0, 24, 16, 5, 'lively', 'sqrt', 'topk', 7.695199367226156, -0.20299510625576417),
    ('class_means', 0, 24, 16, 5, 'lively', 'constant', 'adaptive', 17.18288828192264, -0.03299325881724677),
    ('class_means', 0, 24, 16, 5, 'lively', 'constant', 'topk', 17.18288828192264, -0.03299325881724677),
    ('class_means', 1, 37, 8, 4, 'authors', 'log', 'adaptive', 6.746660287054722, 0.26624281682706075),
    ('class_means', 1, 37, 8, 4, 'authors', 'log', 'topk', 6.746660287054722, 0.26624281682706075),
    ('class_means', 1, 37, 8, 4, 'authors', 'sqrt', 'adaptive', 10.029428640361926, 0.15075171147720406),
    ('class_means', 1, 37, 8, 4, 'authors', 'sqrt', 'topk', 10.029428640361926, 0.15075171147720406),
    ('class_means', 1, 37, 8, 4, 'authors', 'constant', 'adaptive', 13.641062808458072, -0.22829734288005377),
    ('class_means', 1, 37, 8, 4, 'authors', 'constant', 'topk', 13.641062808458072, -0.22829734288005377),
    ('class_means', 1, 37, 8, 4, 'lively', 'log', 'adaptive', 8.207710829145311, 0.19701234350089666),
    ('class_means', 1, 37, 8, 4, 'lively', 'log', 'topk', 8.20774699705068, 0.1969499527442236),
    ('class_means', 1, 37, 8, 4, 'lively', 'sqrt', 'adaptive', 12.144230108148916, 0.21755949436661987),
    ('class_means', 1, 37, 8, 4, 'lively', 'sqrt', 'topk', 12.14434552397941, 0.21737360081122706),
    ('class_means', 1, 37, 8, 4, 'lively', 'constant', 'adaptive', 34.547229505156466, -0.3864972382879205),
    ('class_means', 1, 37, 8, 4, 'lively', 'constant', 'topk', 34.547818792892734, -0.38737896163540675),
    ('class_means', 2, 160, 32, 12, 'authors', 'log', 'adaptive', 8.14237283395828, 0.1420904510812893),
    ('class_means', 2, 160, 32, 12, 'authors', 'log', 'topk', 8.14237283395828, 0.1420904510812893),
    ('class_means', 2, 160, 32, 12, 'authors', 'sqrt', 'adaptive', 11.750431446009314, 0.17862292027672544),
    ('class_means', 2, 160, 32, 12, 'authors', 'sqrt', 'topk', 11.750431446009314, 0.17862292027672544),
    ('class_means', 2, 160, 32, 12, 'authors', 'constant', 'adaptive', 16.241244914694178, 0.3086100239262955),
    ('class_means', 2, 160, 32, 12, 'authors', 'constant', 'topk', 16.241244914694178, 0.3086100239262955),
    ('class_means', 2, 160, 32, 12, 'lively', 'log', 'adaptive', 10.183397713418513, 0.07343670574113603),
    ('class_means', 2, 160, 32, 12, 'lively', 'log', 'topk', 10.032491489077088, 0.07301106095531756),
    ('class_means', 2, 160, 32, 12, 'lively', 'sqrt', 'adaptive', 17.37958757607796, 0.07007542973285087),
    ('class_means', 2, 160, 32, 12, 'lively', 'sqrt', 'topk', 16.68866405359311, 0.07270276150299598),
    ('class_means', 2, 160, 32, 12, 'lively', 'constant', 'adaptive', 61.98735167730047, 0.18620025509351704),
    ('class_means', 2, 160, 32, 12, 'lively', 'constant', 'topk', 56.91947140858041, 0.24039126742191652),
    ('boundary', 0, 24, 16, 5, 'authors', 'log', 'adaptive', 3.696450682694127, -0.00834885870609671),
    ('boundary', 0, 24, 16, 5, 'authors', 'log', 'topk', 3.696450682694127, -0.00834885870609671),
    ('boundary', 0, 24, 16, 5, 'authors', 'sqrt', 'adaptive', 6.090063953023054, 0.06864036356823902),
    ('boundary', 0, 24, 16, 5, 'authors', 'sqrt', 'topk', 6.090063953023054, 0.06864036356823902),
    ('boundary', 0, 24, 16, 5, 'authors', 'constant', 'adaptive', 7.325950100124694, 0.2677859596043456),
    ('boundary', 0, 24, 16, 5, 'authors', 'constant', 'topk', 7.325950100124694, 0.2677859596043456),
    ('boundary', 0, 24, 16, 5, 'lively', 'log', 'adaptive', 5.5257769012846865, -0.16562749605966237),
    ('boundary', 0, 24, 16, 5, 'lively', 'log', 'topk', 5.5257769012846865, -0.16562749605966232),
    ('boundary', 0, 24, 16, 5, 'lively', 'sqrt', 'adaptive', 7.75076732556898, -0.22624227501535094),
    ('boundary', 0, 24, 16, 5, 'lively', 'sqrt', 'topk', 7.75076732556898, -0.22624227501535088),
    ('boundary', 0, 24, 16, 5, 'lively', 'constant', 'adaptive', 17.238456240265467, -0.05624042757683351),
    ('boundary', 0, 24, 16, 5, 'lively', 'constant', 'topk', 17.238456240265467, -0.05624042757683351),
    ('boundary', 1, 37, 8, 4, 'authors', 'log', 'adaptive', 6.959855879045891, 0.5107936201068555),
    ('boundary', 1, 37, 8, 4, 'authors', 'log', 'topk', 6.959855879045891, 0.5107936201068555),
    ('boundary', 1, 37, 8, 4, 'authors', 'sqrt', 'adaptive', 10.242624232353096, 0.3953025147569995),
    ('boundary', 1, 37, 8, 4, 'authors', 'sqrt', 'topk', 10.242624232353096, 0.3953025147569995),
    ('boundary', 1, 37, 8, 4, 'authors', 'constant', 'adaptive', 13.854258400449238, 0.016253460399740974),
    ('boundary', 1, 37, 8, 4, 'authors', 'constant', 'topk', 13.854258400449238, 0.016253460399740974),
    ('boundary', 1, 37, 8, 4, 'lively', 'log', 'adaptive', 8.314308625140894, 0.31928774514079417),
    ('boundary', 1, 37, 8, 4, 'lively', 'log', 'topk', 8.314344793046264, 0.319225354384121),
    ('boundary', 1, 37, 8, 4, 'lively', 'sqrt', 'adaptive', 12.250827904144504, 0.3398348960065174),
    ('boundary', 1, 37, 8, 4, 'lively', 'sqrt', 'topk', 12.250943319975, 0.33964900245112417),
    ('boundary', 1, 37, 8, 4, 'lively', 'constant', 'adaptive', 34.65382730115205, -0.264221836648022),
    ('boundary', 1, 37, 8, 4, 'lively', 'constant', 'topk', 34.654416588888324, -0.26510355999550894),
    ('boundary', 2, 160, 32, 12, 'authors', 'log', 'adaptive', 8.510784541729715, 0.20822868975579278),
    ('boundary', 2, 160, 32, 12, 'authors', 'log', 'topk', 8.510784541729715, 0.20822868975579278),
    ('boundary', 2, 160, 32, 12, 'authors', 'sqrt', 'adaptive', 12.118843153780759, 0.24476115895122894),
    ('boundary', 2, 160, 32, 12, 'authors', 'sqrt', 'topk', 12.118843153780759, 0.24476115895122894),
    ('boundary', 2, 160, 32, 12, 'authors', 'constant', 'adaptive', 16.60965662246562, 0.37474826260079874),
    ('boundary', 2, 160, 32, 12, 'authors', 'constant', 'topk', 16.60965662246562, 0.37474826260079874),
    ('boundary', 2, 160, 32, 12, 'lively', 'log', 'adaptive', 10.367603567304235, 0.10650582507838785),
    ('boundary', 2, 160, 32, 12, 'lively', 'log', 'topk', 10.216697342962807, 0.10608018029256941),
    ('boundary', 2, 160, 32, 12, 'lively', 'sqrt', 'adaptive', 17.56379342996367, 0.10314454907010276),
    ('boundary', 2, 160, 32, 12, 'lively', 'sqrt', 'topk', 16.872869907478847, 0.1057718808402477),
    ('boundary', 2, 160, 32, 12, 'lively', 'constant', 'adaptive', 62.171557531186146, 0.2192693744307689),
    ('boundary', 2, 160, 32, 12, 'lively', 'constant', 'topk', 57.10367726246615, 0.2734603867591683),
]
