// Hand-vectorised row loops of the CPU kernels (the instruction set: isa.h): the maximum of a logit row, and its
// exponentials with their sum, written in intrinsics because GCC does not vectorise the clamped exponential
// (it threads the clamp's branches apart).
//
// Sums run in 16 lanes, element j into lane j mod 16 in ascending order, and the 16 lane sums are then added in lane
// order: the AVX-512 path (one zmm) and the AVX2 path (two ymm) give the same bits, and neither depends on threads.
#pragma once

#include <cstdint>

namespace fastcdml {

// max_j s[j] over n ≥ 0 elements (−inf for n = 0); NaN entries are skipped, as by the comparison m < s[j] ? s[j] : m.
float row_max(const float* s, int64_t n);

// s[j] ← coef · exp(s[j]·scale − shift) in place for j < n, with common.h's fast_exp (~1 ulp, NaN propagates);
// returns the sum of the new values.
float exp_row(float* s, int64_t n, float scale, float shift, float coef);

}  // namespace fastcdml
