// The vector instruction set the CPU kernels' hand-vectorised loops use (gemm.h, rows.h), chosen once per process.
//
// avx512 and avx2 run the same arithmetic in the same order (16 lanes: one zmm, or two ymm side by side), so the
// two give bit-identical results; generic (no FMA, or not x86) is plain C++ and rounds differently.
// FASTCDML_CPU_ISA=avx2|generic, read once, forces a narrower path (to compare the paths on one machine).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTCDML_X86 1
#endif

namespace fastcdml {

enum class Isa { generic, avx2, avx512 };

inline Isa detect_isa() {
  Isa best = Isa::generic;
#ifdef FASTCDML_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f")) best = Isa::avx512;
#endif
  const char* forced = std::getenv("FASTCDML_CPU_ISA");
  if (forced && std::strcmp(forced, "generic") == 0) return Isa::generic;
  if (forced && std::strcmp(forced, "avx2") == 0 && best == Isa::avx512) return Isa::avx2;
  return best;
}

inline Isa cpu_isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace fastcdml
