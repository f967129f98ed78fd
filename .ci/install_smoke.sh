#!/usr/bin/env bash
# What users install: build the sdist and the wheel with default build isolation (as `pip install fastcdml`,
# `pip install git+...` and requirements files do: no torch at build time, hence no prebuilt extension), install
# each into a fresh venv beside the CPU torch, and from outside the source tree run `python -m fastcdml info`,
# a CCL and a CBML training step forced onto the C++ backend (compiled on first use into a private cache) and
# the same on the Triton kernels under the interpreter. Prints its wall time; exits non-zero on any failure.
#
#   bash .ci/install_smoke.sh            # PYTHON=python3, TORCH_SPEC='torch==2.13.0' (the local CPU wheel)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastcdml-install-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
say() { echo "install-smoke [$((SECONDS - START)) s]: $*"; }
# pip, without the notices this machine's local index configuration prints for every package it looks up
pipq() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# A CUDA torch in the base python is used as it is (its own triton), as the Makefile does.
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  VENV_ARGS=(--system-site-packages); TORCH_SPEC=""
else
  VENV_ARGS=()
fi

say "building the sdist and, from it, the wheel (default build isolation)"
"$PYTHON" -m venv "$WORK/build-tools"
pipq "$WORK/build-tools/bin/pip" install -q build
# no --no-isolation: the build environment gets only pyproject's build requirements, as for a user
(cd "$WORK" && "$WORK/build-tools/bin/python" -m build --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1) \
  || { tail -40 "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/fastcdml-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/fastcdml-*.whl)
"$WORK/build-tools/bin/python" - "$SDIST" "$WHEEL" <<'PY'
import sys, tarfile, zipfile
sdist = tarfile.open(sys.argv[1]).getnames()
wheel = zipfile.ZipFile(sys.argv[2]).namelist()
for name in ("fastcdml.cpp", "ccl_cpu.cpp", "cbml_cpu.cpp", "common.h"):
    assert any(n.endswith(f"/csrc/{name}") for n in sdist), f"the sdist lacks csrc/{name}"
    assert f"fastcdml/csrc/{name}" in wheel, f"the wheel lacks fastcdml/csrc/{name}"
assert not [n for n in wheel if n.endswith((".so", ".pyd"))], "an isolated build must not hold a binary"
assert "-py3-none-any.whl" in sys.argv[2], f"expected a pure-Python wheel, got {sys.argv[2]}"
print(f"  sdist {len(sdist)} files, wheel {len(wheel)} files: C++ sources in both, no binary")
PY

for KIND in sdist wheel; do
  ARTIFACT=$([ "$KIND" = sdist ] && echo "$SDIST" || echo "$WHEEL")
  VENV="$WORK/venv-$KIND"
  say "$KIND: fresh venv, ${TORCH_SPEC:-the system torch}, then $(basename "$ARTIFACT")"
  "$PYTHON" -m venv "${VENV_ARGS[@]}" "$VENV"
  [ -z "$TORCH_SPEC" ] || pipq "$VENV/bin/pip" install -q "$TORCH_SPEC"
  pipq "$VENV/bin/pip" install -q "$ARTIFACT"   # default isolation: an sdist is built into a wheel first
  export TORCH_EXTENSIONS_DIR="$WORK/extensions-$KIND"   # empty: the C++ kernels must be compiled from this install
  RUN=(env -u FASTCDML_SKIP_EXT -u TRITON_INTERPRET -u PYTHONPATH)
  (
    cd "$WORK"   # outside the source tree
    "${RUN[@]}" "$VENV/bin/python" -m fastcdml --version
    "${RUN[@]}" "$VENV/bin/python" -m fastcdml info 2>&1 | tee "$WORK/info-$KIND.txt"   # compiles: first use
    grep -q "C++ extension: JIT-compiled" "$WORK/info-$KIND.txt"
    "${RUN[@]}" "$VENV/bin/python" "$ROOT/.ci/install_smoke.py" cpp "$ROOT"
    "${RUN[@]}" TRITON_INTERPRET=1 "$VENV/bin/python" "$ROOT/.ci/install_smoke.py" triton "$ROOT"
  )
  say "$KIND: OK"
done
say "passed: sdist and wheel install, compile the C++ backend on first use, and train on it and on Triton"
