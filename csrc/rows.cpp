// The vectorised row loops of the CPU kernels (the contract: rows.h).
#include "rows.h"

#include <cmath>
#include <limits>

#include "common.h"
#include "isa.h"

namespace fastcdml {
namespace {

constexpr int kLanes16 = 16;

float lane_sum(const float* lanes) {  // the 16 lane sums in lane order
  float sum = 0.f;
  for (int i = 0; i < kLanes16; ++i) sum += lanes[i];
  return sum;
}

float row_max_generic(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = m < s[j] ? s[j] : m;
  return m;
}

float exp_row_generic(float* s, int64_t n, float scale, float shift, float coef) {
  float lanes[kLanes16] = {};
  for (int64_t j = 0; j < n; ++j) {
    s[j] = coef * fast_exp(s[j] * scale - shift);
    lanes[j % kLanes16] += s[j];
  }
  return lane_sum(lanes);
}

#ifdef FASTCDML_X86
// fast_exp (common.h) on 8 or 16 lanes: the same clamp (NaN passes through: max/min return their second operand on
// a NaN), the same Cody–Waite reduction and polynomial, each step one FMA on both widths.
#define FASTCDML_EXP_BODY(P, SI)                                                                      \
  v = P##_min_ps(P##_set1_ps(88.3762626f), P##_max_ps(P##_set1_ps(-87.3365447f), v));                \
  const auto shifter = P##_set1_ps(12582912.0f);                                                      \
  const auto n = P##_sub_ps(P##_fmadd_ps(v, P##_set1_ps(1.44269504088896341f), shifter), shifter);   \
  auto r = P##_fnmadd_ps(n, P##_set1_ps(0.693359375f), v);                                            \
  r = P##_fnmadd_ps(n, P##_set1_ps(-2.12194440e-4f), r);                                              \
  auto p = P##_set1_ps(1.9875691500e-4f);                                                             \
  p = P##_fmadd_ps(p, r, P##_set1_ps(1.3981999507e-3f));                                              \
  p = P##_fmadd_ps(p, r, P##_set1_ps(8.3334519073e-3f));                                              \
  p = P##_fmadd_ps(p, r, P##_set1_ps(4.1665795894e-2f));                                              \
  p = P##_fmadd_ps(p, r, P##_set1_ps(1.6666665459e-1f));                                              \
  p = P##_fmadd_ps(p, r, P##_set1_ps(5.0000001201e-1f));                                              \
  p = P##_add_ps(P##_fmadd_ps(P##_mul_ps(p, r), r, r), P##_set1_ps(1.0f));                            \
  const auto e = P##_slli_epi32(P##_add_epi32(P##_cvttps_epi32(n), P##_set1_epi32(127)), 23);         \
  return P##_mul_ps(p, P##_castsi##SI##_ps(e));

__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 v) { FASTCDML_EXP_BODY(_mm256, 256) }
__attribute__((target("avx512f"))) inline __m512 exp16(__m512 v) { FASTCDML_EXP_BODY(_mm512, 512) }
#undef FASTCDML_EXP_BODY

// lanes [0, cnt) set, for maskload / blends of the AVX2 tail
__attribute__((target("avx2,fma"))) inline __m256i mask8(int64_t cnt) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cnt)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2,fma"))) float row_max_avx2(const float* s, int64_t n) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m = ninf;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(_mm256_loadu_ps(s + j), m);
  if (j < n) {
    const __m256i k = mask8(n - j);
    m = _mm256_max_ps(_mm256_blendv_ps(ninf, _mm256_maskload_ps(s + j, k), _mm256_castsi256_ps(k)), m);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float out = lanes[0];
  for (int i = 1; i < 8; ++i) out = out < lanes[i] ? lanes[i] : out;
  return out;
}

// 8 elements at s (cnt ≤ 8 of them valid) into acc: s ← coef·exp(s·scale − shift), invalid lanes add 0
__attribute__((target("avx2,fma"))) inline __m256 exp8_into(float* s, int64_t cnt, __m256 scale, __m256 shift,
                                                           __m256 coef, __m256 acc) {
  if (cnt >= 8) {
    const __m256 p = _mm256_mul_ps(coef, exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s), scale, shift)));
    _mm256_storeu_ps(s, p);
    return _mm256_add_ps(acc, p);
  }
  if (cnt <= 0) return _mm256_add_ps(acc, _mm256_setzero_ps());
  const __m256i k = mask8(cnt);
  __m256 p = _mm256_mul_ps(coef, exp8(_mm256_fmsub_ps(_mm256_maskload_ps(s, k), scale, shift)));
  p = _mm256_and_ps(p, _mm256_castsi256_ps(k));
  _mm256_maskstore_ps(s, k, p);
  return _mm256_add_ps(acc, p);
}

__attribute__((target("avx2,fma"))) float exp_row_avx2(float* s, int64_t n, float scale, float shift,
                                                      float coef) {
  const __m256 vs = _mm256_set1_ps(scale), vsh = _mm256_set1_ps(shift), vc = _mm256_set1_ps(coef);
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // lanes 0–7 and 8–15 of the 16
  for (int64_t j = 0; j < n; j += kLanes16) {
    lo = exp8_into(s + j, n - j, vs, vsh, vc, lo);
    hi = exp8_into(s + j + 8, n - j - 8, vs, vsh, vc, hi);
  }
  alignas(32) float lanes[kLanes16];
  _mm256_store_ps(lanes, lo);
  _mm256_store_ps(lanes + 8, hi);
  return lane_sum(lanes);
}

__attribute__((target("avx512f"))) float row_max_avx512(const float* s, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = ninf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(_mm512_loadu_ps(s + j), m);
  if (j < n) m = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, static_cast<__mmask16>((1u << (n - j)) - 1), s + j), m);
  return _mm512_reduce_max_ps(m);
}

__attribute__((target("avx512f"))) float exp_row_avx512(float* s, int64_t n, float scale, float shift,
                                                        float coef) {
  const __m512 vs = _mm512_set1_ps(scale), vsh = _mm512_set1_ps(shift), vc = _mm512_set1_ps(coef);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 p = _mm512_mul_ps(vc, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vs, vsh)));
    _mm512_storeu_ps(s + j, p);
    acc = _mm512_add_ps(acc, p);
  }
  if (j < n) {
    const auto k = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 p = _mm512_maskz_mov_ps(k, _mm512_mul_ps(vc, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + j),
                                                                                    vs, vsh))));
    _mm512_mask_storeu_ps(s + j, k, p);
    acc = _mm512_add_ps(acc, p);
  }
  alignas(64) float lanes[kLanes16];
  _mm512_store_ps(lanes, acc);
  return lane_sum(lanes);
}
#endif  // FASTCDML_X86

}  // namespace

float row_max(const float* s, int64_t n) {
  switch (cpu_isa()) {
#ifdef FASTCDML_X86
    case Isa::avx512: return row_max_avx512(s, n);
    case Isa::avx2: return row_max_avx2(s, n);
#endif
    default: return row_max_generic(s, n);
  }
}

float exp_row(float* s, int64_t n, float scale, float shift, float coef) {
  switch (cpu_isa()) {
#ifdef FASTCDML_X86
    case Isa::avx512: return exp_row_avx512(s, n, scale, shift, coef);
    case Isa::avx2: return exp_row_avx2(s, n, scale, shift, coef);
#endif
    default: return exp_row_generic(s, n, scale, shift, coef);
  }
}

}  // namespace fastcdml
