"""Builds fastcdml._C (CPU kernels, torch cpp_extension + ninja) when torch is importable at build time, and
ships the C++ sources inside the package either way.

``pip install --no-build-isolation .`` (or ``-e .``) compiles the extension against the torch that will run it
("prebuilt"). A plain ``pip install`` builds in an isolated environment without torch: the wheel then has no
extension, and fastcdml compiles the shipped sources (``fastcdml/csrc``, copied from the top-level ``csrc/``)
on the first CPU op that needs them (see ``fastcdml/_extension.py``). ``FASTCDML_SKIP_EXT=1`` builds no
extension and marks the package so that it compiles nothing on first use either. A failed compile only warns
(it is retried on first use), and the package then runs on the PyTorch reference on CPU (``python -m fastcdml
info`` says so). There are no CUDA sources: on GPUs the kernels are Triton, so a CppExtension is all that is
ever built.
"""
import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.h"))
SKIP = os.environ.get("FASTCDML_SKIP_EXT") == "1"
SKIP_MARK = "SKIP_EXT"  # fastcdml/_extension.py reads it


class BuildPyWithSources(build_py):
    """Copies ``csrc/`` into the built package as ``fastcdml/csrc`` (what a first-use compile needs)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fastcdml", "csrc")
        os.makedirs(target, exist_ok=True)
        for path in SOURCES:
            shutil.copy2(path, target)
        if SKIP:  # remembered, so that the installed package does not compile them on first use either
            with open(os.path.join(target, SKIP_MARK), "w") as f:
                f.write("installed with FASTCDML_SKIP_EXT=1\n")

    def get_outputs(self, include_bytecode=1):
        target = os.path.join(self.build_lib, "fastcdml", "csrc")
        names = [os.path.basename(p) for p in SOURCES] + ([SKIP_MARK] if SKIP else [])
        return super().get_outputs(include_bytecode) + [os.path.join(target, n) for n in names]


def extension_build():
    if SKIP:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastcdml: torch is not importable at build time (build isolation): no prebuilt extension; the C++ "
              "kernels are compiled on first use instead", file=sys.stderr)
        return [], {}

    class TolerantBuild(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as err:  # a missing compiler must not make the install fail
                print(f"fastcdml: building the C++ extension failed ({err}); it is retried on first use, and the "
                      "reference backend serves CPU tensors if that fails too", file=sys.stderr)

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    ext = CppExtension(
        "fastcdml._C",
        [p for p in SOURCES if p.endswith(".cpp")],
        define_macros=[("FASTCDML_TORCH_VERSION", f'"{torch.__version__}"')],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", *openmp]},
        extra_link_args=openmp,
    )
    return [ext], {"build_ext": TolerantBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
