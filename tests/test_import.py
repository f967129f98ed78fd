"""``import fastcdml`` stays cheap: nothing from torch._dynamo, the plotting / learning tools or the benchmark."""
import subprocess
import sys

HEAVY = ("torch._dynamo", "matplotlib", "sklearn", "triton", "bench", "fastcdml.evaluation", "fastcdml.datasets",
         "fastcdml.kernels.ccl", "fastcdml.kernels.cbml")


def test_import_pulls_in_nothing_heavy():
    code = ("import sys, torch; before = set(sys.modules); import fastcdml; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import fastcdml imported {out.stdout.strip()}"


def test_lazy_submodules_load_on_first_use():
    code = "import fastcdml; print(fastcdml.evaluation.retrieval_metrics.__name__, fastcdml.datasets.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["retrieval_metrics", "fastcdml.datasets"]
