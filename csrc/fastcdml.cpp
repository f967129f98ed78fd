// fastcdml._C: the Python module of the C++ extension. The op schemas are defined once, in Python
// (fastcdml/ops/_registry.py), so that the package imports without this extension; the CPU kernels in
// csrc/<loss>_cpu.cpp register against them with TORCH_LIBRARY_IMPL(fastcdml, CPU, m). This file only
// exposes build facts, checked at import time by fastcdml._backend.load_extension().
#include <pybind11/pybind11.h>

#ifndef FASTCDML_TORCH_VERSION
#error "setup.py defines FASTCDML_TORCH_VERSION (the torch the extension is built against)"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcdml C++ CPU kernels (registered as torch.ops.fastcdml.* CPU implementations)";
  m.def("build_info", [] {
    py::dict info;
    info["torch"] = FASTCDML_TORCH_VERSION;
    info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
