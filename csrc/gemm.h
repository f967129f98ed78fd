// The fp32 matrix products of the CPU kernels: one small GEMM whose every output element is a single FMA chain over
// the inner dimension in ascending order, started from zero (then added to the output when accumulating).
//
// Why not at::mm: a vendor BLAS chooses its blocking, and with it the summation order, from the thread count, the
// CPU model and the memory alignment (MKL reproduces across thread counts only in its strict CNR mode, which is a
// process-wide switch set before the first call). Here the order is fixed by construction, so a tile's values
// depend only on its operands: not on the thread count, not on where the tile lies in the output, and not on the
// vector width (the AVX-512 and AVX2 paths run the same per-element FMA chain and give bit-identical results; the
// generic path, for x86 CPUs without FMA and other architectures, rounds each product separately).
//
// Design (the instruction set: isa.h): B is packed into strips of NR columns (k × NR, zero-padded), A is read in
// place through its strides and broadcast one element at a time, and an MR × NR register tile is accumulated over
// the whole inner dimension. Callers hand it cache-sized tiles (kRowBlock rows against one chunk), so no further
// blocking is needed. A caller that multiplies several blocks of rows by the same B (a chunk of the bank against
// every block of queries) packs it once into a PackedB and passes that instead: the pack, which transposes B for
// the a·bᵀ products, then costs once per chunk rather than once per block.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fastcdml {

// B (k × n) in the strips of this CPU's register tile, reusable across products (the buffer is kept between packs).
struct PackedB {
  int64_t n = 0, k = 0;
  std::vector<float> strips;
  // B(p, j) = b[p·b_rs + j·b_cs].
  void pack(int64_t n, int64_t k, const float* b, int64_t b_rs, int64_t b_cs);
  // For products a·bᵀ with b (n, k), rows contiguous; and for products a·b with b (k, n), rows contiguous.
  void pack_t(const at::Tensor& b);
  void pack_n(const at::Tensor& b);
};

// C (m × b.n, row stride ldc) = (accumulate ? C : 0) + A·B with A(i, p) = a[i·a_rs + p·a_cs] (m × b.k).
void gemm(int64_t m, const float* a, int64_t a_rs, int64_t a_cs, const PackedB& b, float* c, int64_t ldc,
          bool accumulate);
// c (m, b.n) = (accumulate ? c : 0) + a·B, a (m, b.k) with contiguous rows.
void mm(const at::Tensor& c, const at::Tensor& a, const PackedB& b, bool accumulate);

// C (m × n, row stride ldc) = (accumulate ? C : 0) + A·B, with A(i, p) = a[i·a_rs + p·a_cs] (m × k) and
// B(p, j) = b[p·b_rs + j·b_cs] (k × n); all fp32. Serial: call it from one thread per output tile.
void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs,
          int64_t b_cs, float* c, int64_t ldc, bool accumulate);

// Tensor forms on 2-D fp32 tensors whose rows are contiguous (stride(1) == 1).
// out = a·bᵀ: a (m, k), b (n, k), out (m, n).
void mm_nt(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
// c += a·b: a (m, k), b (k, n), c (m, n).
void addmm_nn(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b);
// c += aᵀ·b: a (k, m), b (k, n), c (m, n).
void addmm_tn(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b);

}  // namespace fastcdml
