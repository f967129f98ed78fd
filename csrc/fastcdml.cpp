// fastcdml._C: the Python module of the C++ extension. The op schemas are defined once, in Python
// (fastcdml/ops/_registry.py), so that the package imports without this extension; the CPU kernels in
// csrc/<loss>_cpu.cpp register against them when fastcdml/_extension.py calls register_kernels(), after it has
// checked build_info(). Registering from a call rather than at load time (TORCH_LIBRARY_IMPL) matters for a
// binary built from other sources than the Python package it meets: a schema mismatch then raises a Python
// RuntimeError (and the partial registration is undone) instead of aborting the process inside dlopen. The
// module's name comes from the build: fastcdml._C ahead of time (setup.py), fastcdml_C when compiled on first use
// (torch.utils.cpp_extension.load).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <memory>

#include "common.h"

#ifndef FASTCDML_TORCH_VERSION
#error "setup.py defines FASTCDML_TORCH_VERSION (the torch the extension is built against)"
#endif

namespace py = pybind11;

namespace {
std::unique_ptr<torch::Library> registered;  // alive for the process: its destructor would unregister the kernels
}

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
    info["isa"] = fastcdml::isa_name(fastcdml::cpu_isa());
    return info;
  });
  m.def("register_kernels", [] {
    if (registered) return;
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "fastcdml", c10::DispatchKey::CPU, __FILE__,
                                                __LINE__);
    fastcdml::register_ccl(*lib);  // throws on a schema mismatch; `lib` then unregisters what it holds
    fastcdml::register_cbml(*lib);
    fastcdml::register_proxy_anchor(*lib);
    fastcdml::register_pair(*lib);
    registered = std::move(lib);
  }, "Register the CPU kernels with torch.ops.fastcdml (idempotent); raises RuntimeError when a kernel does not "
     "match its op's schema");
}
