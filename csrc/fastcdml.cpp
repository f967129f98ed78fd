// fastcdml._C: the Python module of the C++ extension. The op schemas are defined once, in Python
// (fastcdml/ops/_registry.py), so that the package imports without this extension; the CPU kernels in
// csrc/<loss>_cpu.cpp register against them with TORCH_LIBRARY_IMPL(fastcdml, CPU, m). This file only
// exposes build facts, checked when it is loaded by fastcdml/_extension.py. The module's name comes from the build:
// fastcdml._C ahead of time (setup.py), fastcdml_C when compiled on first use (torch.utils.cpp_extension.load).
#include <pybind11/pybind11.h>

#ifndef FASTCDML_TORCH_VERSION
#error "setup.py defines FASTCDML_TORCH_VERSION (the torch the extension is built against)"
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
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
