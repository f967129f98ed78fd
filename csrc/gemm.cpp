// The deterministic fp32 GEMM of the CPU kernels (the design: gemm.h).
#include "gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "isa.h"

namespace fastcdml {
namespace {

// B packed as strips of NR columns into out: strip s holds B(p, s·NR + jj) at [s·k·NR + p·NR + jj], zero past
// column n.
template <int NR>
void pack_b(int64_t n, int64_t k, const float* b, int64_t b_rs, int64_t b_cs, std::vector<float>& buf) {
  const int64_t strips = (n + NR - 1) / NR;
  buf.resize(static_cast<size_t>(strips * k * NR));
  float* out = buf.data();
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t j0 = s * NR, nr = std::min<int64_t>(NR, n - j0);
    float* dst = out + s * k * NR;
    if (b_cs == 1) {
      for (int64_t p = 0; p < k; ++p) {
        std::memcpy(dst + p * NR, b + p * b_rs + j0, sizeof(float) * nr);
        std::fill(dst + p * NR + nr, dst + p * NR + NR, 0.f);
      }
    } else {  // columns are strided (B = a row-major matrix transposed): read each column contiguously when b_rs == 1
      for (int64_t jj = 0; jj < nr; ++jj) {
        const float* src = b + (j0 + jj) * b_cs;
        for (int64_t p = 0; p < k; ++p) dst[p * NR + jj] = src[p * b_rs];
      }
      for (int64_t p = 0; p < k; ++p) std::fill(dst + p * NR + nr, dst + p * NR + NR, 0.f);
    }
  }
}

// One register tile: C[0:R, 0:nr] (row stride ldc) = (accumulate ? C : 0) + A[0:R, :]·strip[:, 0:nr], where the
// strip is k × NR of packed B; R ≤ MR rows of A through its strides. A table per instruction set, indexed by R.
using TileFn = void (*)(int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* strip, float* c,
                        int64_t ldc, int64_t nr, bool accumulate);

// ---------------------------------------------------------------- generic: plain loops, products rounded apart

constexpr int kGenericMR = 1, kGenericNR = 8;

void tile_generic(int64_t k, const float* a, int64_t, int64_t a_cs, const float* strip, float* c, int64_t,
                  int64_t nr, bool accumulate) {
  float acc[kGenericNR] = {};
  for (int64_t p = 0; p < k; ++p) {
    const float av = a[p * a_cs];
    for (int jj = 0; jj < kGenericNR; ++jj) acc[jj] += av * strip[p * kGenericNR + jj];
  }
  for (int64_t jj = 0; jj < nr; ++jj) c[jj] = accumulate ? c[jj] + acc[jj] : acc[jj];
}

constexpr TileFn kGenericTiles[kGenericMR + 1] = {nullptr, tile_generic};

#ifdef FASTCDML_X86
// ---------------------------------------------------------------- AVX2 + FMA: 6 × 16 register tile

constexpr int kAvx2MR = 6, kAvx2NR = 16;

template <int R>
__attribute__((target("avx2,fma"))) void tile_avx2(int64_t k, const float* a, int64_t a_rs, int64_t a_cs,
                                                   const float* strip, float* c, int64_t ldc, int64_t nr,
                                                   bool accumulate) {
  __m256 lo[R], hi[R];
  const float* ar[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) lo[r] = _mm256_setzero_ps(), hi[r] = _mm256_setzero_ps(), ar[r] = a + r * a_rs;
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(strip + p * kAvx2NR), b1 = _mm256_loadu_ps(strip + p * kAvx2NR + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(ar[r] + p * a_cs);
      lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
    }
  }
  if (nr == kAvx2NR) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* cr = c + r * ldc;
      if (accumulate) lo[r] = _mm256_add_ps(_mm256_loadu_ps(cr), lo[r]), hi[r] = _mm256_add_ps(_mm256_loadu_ps(cr + 8), hi[r]);
      _mm256_storeu_ps(cr, lo[r]);
      _mm256_storeu_ps(cr + 8, hi[r]);
    }
    return;
  }
  alignas(32) float t[kAvx2NR];
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(t, lo[r]);
    _mm256_store_ps(t + 8, hi[r]);
    float* cr = c + r * ldc;
    for (int64_t jj = 0; jj < nr; ++jj) cr[jj] = accumulate ? cr[jj] + t[jj] : t[jj];
  }
}

// ---------------------------------------------------------------- AVX-512: 8 × 32 register tile

constexpr int kAvx512MR = 8, kAvx512NR = 32;

template <int R>
__attribute__((target("avx512f"))) void tile_avx512(int64_t k, const float* a, int64_t a_rs, int64_t a_cs,
                                                     const float* strip, float* c, int64_t ldc, int64_t nr,
                                                     bool accumulate) {
  __m512 lo[R], hi[R];
  const float* ar[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) lo[r] = _mm512_setzero_ps(), hi[r] = _mm512_setzero_ps(), ar[r] = a + r * a_rs;
  for (int64_t p = 0; p < k; ++p) {
    const __m512 b0 = _mm512_loadu_ps(strip + p * kAvx512NR), b1 = _mm512_loadu_ps(strip + p * kAvx512NR + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(ar[r][p * a_cs]);
      lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
    }
  }
  const __mmask16 m0 = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? __mmask16(0xFFFF) : nr > 16 ? __mmask16((1u << (nr - 16)) - 1) : __mmask16(0);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      lo[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, cr), lo[r]);
      hi[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, cr + 16), hi[r]);
    }
    _mm512_mask_storeu_ps(cr, m0, lo[r]);
    _mm512_mask_storeu_ps(cr + 16, m1, hi[r]);
  }
}

constexpr TileFn kAvx2Tiles[kAvx2MR + 1] = {nullptr, tile_avx2<1>, tile_avx2<2>, tile_avx2<3>,
                                           tile_avx2<4>, tile_avx2<5>, tile_avx2<6>};
constexpr TileFn kAvx512Tiles[kAvx512MR + 1] = {nullptr, tile_avx512<1>, tile_avx512<2>, tile_avx512<3>,
                                               tile_avx512<4>, tile_avx512<5>, tile_avx512<6>,
                                               tile_avx512<7>, tile_avx512<8>};
#endif  // FASTCDML_X86

// The product over MR-row blocks of A and the NR-column strips of packed B, each by tiles[rows in the block].
template <int MR, int NR>
void gemm_tiled(const TileFn (&tiles)[MR + 1], int64_t m, const float* a, int64_t a_rs, int64_t a_cs,
                const PackedB& b, float* c, int64_t ldc, bool accumulate) {
  const int64_t n = b.n, k = b.k;
  const float* bp = b.strips.data();
  for (int64_t i = 0; i < m; i += MR) {
    const TileFn tile = tiles[std::min<int64_t>(MR, m - i)];
    for (int64_t j0 = 0; j0 < n; j0 += NR)
      tile(k, a + i * a_rs, a_rs, a_cs, bp + (j0 / NR) * k * NR, c + i * ldc + j0, ldc,
           std::min<int64_t>(NR, n - j0), accumulate);
  }
}

void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && (t.stride(1) == 1 || t.size(1) <= 1),
              "fastcdml gemm: ", name, " must be a 2-D fp32 tensor with contiguous rows");
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

}  // namespace

void PackedB::pack(int64_t n_, int64_t k_, const float* b, int64_t b_rs, int64_t b_cs) {
  n = n_, k = k_;
  switch (cpu_isa()) {
#ifdef FASTCDML_X86
    case Isa::avx512: return pack_b<kAvx512NR>(n, k, b, b_rs, b_cs, strips);
    case Isa::avx2: return pack_b<kAvx2NR>(n, k, b, b_rs, b_cs, strips);
#endif
    default: return pack_b<kGenericNR>(n, k, b, b_rs, b_cs, strips);
  }
}

void PackedB::pack_t(const at::Tensor& b) {
  check_operand(b, "b");
  pack(b.size(0), b.size(1), b.data_ptr<float>(), 1, row_stride(b));
}

void PackedB::pack_n(const at::Tensor& b) {
  check_operand(b, "b");
  pack(b.size(1), b.size(0), b.data_ptr<float>(), row_stride(b), 1);
}

void gemm(int64_t m, const float* a, int64_t a_rs, int64_t a_cs, const PackedB& b, float* c, int64_t ldc,
          bool accumulate) {
  if (m <= 0 || b.n <= 0) return;
  switch (cpu_isa()) {
#ifdef FASTCDML_X86
    case Isa::avx512: return gemm_tiled<kAvx512MR, kAvx512NR>(kAvx512Tiles, m, a, a_rs, a_cs, b, c, ldc, accumulate);
    case Isa::avx2: return gemm_tiled<kAvx2MR, kAvx2NR>(kAvx2Tiles, m, a, a_rs, a_cs, b, c, ldc, accumulate);
#endif
    default: return gemm_tiled<kGenericMR, kGenericNR>(kGenericTiles, m, a, a_rs, a_cs, b, c, ldc, accumulate);
  }
}

void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs,
          int64_t b_cs, float* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  thread_local PackedB packed;
  packed.pack(n, k, b, b_rs, b_cs);
  gemm(m, a, a_rs, a_cs, packed, c, ldc, accumulate);
}

void mm(const at::Tensor& c, const at::Tensor& a, const PackedB& b, bool accumulate) {
  check_operand(c, "c"), check_operand(a, "a");
  TORCH_CHECK(a.size(1) == b.k && c.size(0) == a.size(0) && c.size(1) == b.n, "fastcdml gemm: shapes");
  gemm(a.size(0), a.data_ptr<float>(), row_stride(a), 1, b, c.data_ptr<float>(), row_stride(c), accumulate);
}

void mm_nt(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  check_operand(out, "out"), check_operand(a, "a"), check_operand(b, "b");
  TORCH_CHECK(a.size(1) == b.size(1) && out.size(0) == a.size(0) && out.size(1) == b.size(0), "fastcdml gemm: shapes");
  gemm(a.size(0), b.size(0), a.size(1), a.data_ptr<float>(), row_stride(a), 1, b.data_ptr<float>(), 1,
       row_stride(b), out.data_ptr<float>(), row_stride(out), false);
}

void addmm_nn(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  check_operand(c, "c"), check_operand(a, "a"), check_operand(b, "b");
  TORCH_CHECK(a.size(1) == b.size(0) && c.size(0) == a.size(0) && c.size(1) == b.size(1), "fastcdml gemm: shapes");
  gemm(a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), row_stride(a), 1, b.data_ptr<float>(), row_stride(b),
       1, c.data_ptr<float>(), row_stride(c), true);
}

void addmm_tn(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  check_operand(c, "c"), check_operand(a, "a"), check_operand(b, "b");
  TORCH_CHECK(a.size(0) == b.size(0) && c.size(0) == a.size(1) && c.size(1) == b.size(1), "fastcdml gemm: shapes");
  gemm(a.size(1), b.size(1), a.size(0), a.data_ptr<float>(), 1, row_stride(a), b.data_ptr<float>(), row_stride(b),
       1, c.data_ptr<float>(), row_stride(c), true);
}

}  // namespace fastcdml
