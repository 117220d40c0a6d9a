#include "few_rows_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12 warns that AVX-512 intrinsics (unpacks, widening loads, shifts) read an uninitialised value: the
// _mm512_undefined_*() each passes as the (unused, fully masked-in) pass-through operand. Nothing uninitialised
// is read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace hyperfused {
namespace {

// The register tile: kRows rows of a by kCols rows of w, kRows·kCols accumulators (16 of the 32 vector
// registers), the kCols weight vectors and one of a beside them.
constexpr int kRows = 4, kCols = 4;
// A thread's smallest share of the work, in multiply-adds: below it, starting threads costs more than it saves.
constexpr int64_t kMinWorkPerThread = 64 * 1024;

#if defined(__AVX512F__)
// The sums of the 16 lanes of each of a, b, c, d, as the four lanes of one vector. Summed together rather than
// one by one: a dot product of k = 256 spends as many instructions on its sum as on its multiply-adds when each
// of the tile's 16 accumulators is reduced alone (~8 shuffles and adds each), ~3x fewer so.
inline __m128 lane_sums(__m512 a, __m512 b, __m512 c, __m512 d) {
  // within each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [Σa, Σb, Σc, Σd] of that lane's four values
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d ab2 = _mm512_castps_pd(ab), cd2 = _mm512_castps_pd(cd);
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab2, cd2)),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(ab2, cd2)));
  // the four 128-bit lanes added together
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// The tile's R × C dot products: add_block(i, acc) adds the block of k from i (Block values) into the float32
// lanes of acc[r][c]; the lanes are then summed into out[r·ldo + c] (+ out when beta is 1), a row's C = 4 sums
// as one vector.
template <int R, int C, int Block, typename AddBlock>
inline void tile(int64_t k, float* out, int64_t ldo, float beta, const AddBlock& add_block) {
  static_assert(C == 4, "lane_sums sums four accumulators");
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += Block) add_block(i, acc);
  for (int r = 0; r < R; ++r) {
    __m128 sums = lane_sums(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    if (beta != 0.0f) sums = _mm_add_ps(sums, _mm_loadu_ps(out + r * ldo));
    _mm_storeu_ps(out + r * ldo, sums);
  }
}

// 16 weights from p, float32 or (AVX-512 BW and VL) float16 widened to float32; zero where mask is unset.
inline __m512 load_weights(__mmask16 mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
inline __m512 load_weights(__mmask16 mask, const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}
// bfloat16 is float32's upper half: widened exactly by a shift
inline __m512 load_weights(__mmask16 mask, const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
#endif

// R rows of a (float32, row stride lda) times C rows of w (float32, or float16 widened to float32; row stride
// ldw), over k.
template <int R, int C, typename W>
void tile_f32(const float* a, int64_t lda, const W* w, int64_t ldw, int64_t k, float* out, int64_t ldo,
              float beta) {
  tile<R, C, 16>(k, out, ldo, beta, [&](int64_t i, __m512 (&acc)[R][C]) {
    const __mmask16 mask = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_weights(mask, w + c * ldw + i);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_maskz_loadu_ps(mask, a + r * lda + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(av, wv[c], acc[r][c]);
    }
  });
}

// The 16 rows of a 16 × 16 block, in place, become its 16 columns (r[j] lane i = the block's row i, element j):
// 64 shuffles in four rounds of pairs.
inline void transpose16(__m512 (&r)[16]) {
  __m512 u[16];
  for (int i = 0; i < 16; i += 2) {  // lane L of u[i] / u[i+1]: rows i, i+1 at elements 4L, 4L+1 / 4L+2, 4L+3
    u[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    u[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // lane L of r[i + c]: rows i..i+3 at element 4L + c
    const __m512d a = _mm512_castps_pd(u[i]), b = _mm512_castps_pd(u[i + 1]);
    const __m512d c = _mm512_castps_pd(u[i + 2]), d = _mm512_castps_pd(u[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {  // the 128-bit lanes gathered: element c, 4 + c, 8 + c, 12 + c of all 16 rows
    const __m512 lo02 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), lo13 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    const __m512 hi02 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 hi13 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    u[c] = _mm512_shuffle_f32x4(lo02, hi02, 0x88);
    u[8 + c] = _mm512_shuffle_f32x4(lo02, hi02, 0xdd);
    u[4 + c] = _mm512_shuffle_f32x4(lo13, hi13, 0x88);
    u[12 + c] = _mm512_shuffle_f32x4(lo13, hi13, 0xdd);
  }
  for (int j = 0; j < 16; ++j) r[j] = u[j];
}

// R rows of a times 16 rows of w (float32, or widened to it; from row c0; rows past n read as zeros) for
// k <= 16 (the scaling vectors' N_z): the block of w transposed in registers, each of its columns a broadcast
// multiply-add into all 16 outputs of a row. A dot product per output would spend a 16-lane sum on each k-long
// product.
template <int R, typename W>
void short_k_block(const float* a, int64_t lda, const W* w, int64_t ldw, int64_t n, int64_t k, int64_t c0,
                   float* out, int64_t ldo, float beta) {
  const __mmask16 kmask = __mmask16((1u << k) - 1);
  __m512 col[16];
  for (int i = 0; i < 16; ++i)
    col[i] = c0 + i < n ? load_weights(kmask, w + (c0 + i) * ldw) : _mm512_setzero_ps();
  transpose16(col);
  const __mmask16 nmask = n - c0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c0)) - 1);
  for (int r = 0; r < R; ++r) {
    __m512 acc = beta == 0.0f ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(nmask, out + r * ldo + c0);
    for (int j = 0; j < 16; ++j)
      if (j < k) acc = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + j]), col[j], acc);
    _mm512_mask_storeu_ps(out + r * ldo + c0, nmask, acc);
  }
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// R rows of a (bfloat16, rounded beforehand, row stride lda, zero past k up to a multiple of 32) times C rows
// of w (bfloat16, row stride ldw), over k: pairs of products summed into float32.
template <int R, int C>
void tile_bf16(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t ldw, int64_t k, float* out, int64_t ldo,
               float beta) {
  tile<R, C, 32>(k, out, ldo, beta, [&](int64_t i, __m512 (&acc)[R][C]) {
    const __mmask32 mask = k - i >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (k - i)) - 1);
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) wv[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + c * ldw + i);
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a + r * lda + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, wv[c]);
    }
  });
}

// The m rows of a rounded to bfloat16 (nearest even) in this thread's scratch, each padded with zeros to `ld`.
const uint16_t* rounded_rows(const float* a, int64_t lda, int64_t m, int64_t k, int64_t ld) {
  static thread_local std::vector<uint16_t> scratch;
  if (scratch.size() < size_t(m * ld)) scratch.resize(size_t(m * ld));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < ld; i += 32) {
      const int64_t n = std::min<int64_t>(32, std::max<int64_t>(k - i, 0));
      const __mmask16 lo = __mmask16((1u << std::min<int64_t>(n, 16)) - 1);
      const __mmask16 hi = __mmask16((1u << std::max<int64_t>(n - 16, 0)) - 1);
      const __m512 vlo = _mm512_maskz_loadu_ps(lo, a + r * lda + i);
      const __m512 vhi = _mm512_maskz_loadu_ps(hi, a + r * lda + i + 16);
      _mm512_storeu_si512(scratch.data() + r * ld + i, (__m512i)_mm512_cvtne2ps_pbh(vhi, vlo));
    }
  return scratch.data();
}
#endif

// Calls f(std::integral_constant<int, R>()) for R = rows, 1 to kRows.
template <typename F>
void with_rows(int64_t rows, const F& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    default: f(std::integral_constant<int, 4>()); break;
  }
  static_assert(kRows == 4, "with_rows' cases");
}

#if defined(__AVX512F__)
// Calls f with g's weights typed as the float32 tiles read them: float32, or float16 and (widen) bfloat16
// widened to float32 as they are loaded.
template <typename F>
void with_widened_weights(const RawGemm& g, const F& f) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if (g.w_dtype == at::kHalf) return f(static_cast<const c10::Half*>(g.w));
  if (g.w_dtype == at::kBFloat16) return f(static_cast<const c10::BFloat16*>(g.w));
#endif
  f(static_cast<const float*>(g.w));
}
#endif

// g by the kernel, on this thread or (long k) spread over threads.
void run_product(const RawGemm& g) {
#if defined(__AVX512F__)
  const int64_t m = g.m, n = g.n, k = g.k;
  if (m == 0 || n == 0) return;
  // bfloat16 weights not widened: the pair-dot tile, on a's rows rounded once for all columns
  const bool rounded = g.w_dtype == at::kBFloat16 && !g.widen;
  if (!rounded && k <= 16) {  // 16 columns at a time, every row passing the transposed block
    with_widened_weights(g, [&](const auto* w) {
      for (int64_t c0 = 0; c0 < n; c0 += 16)
        for (int64_t r0 = 0; r0 < m; r0 += kRows)
          with_rows(std::min<int64_t>(kRows, m - r0), [&](auto R) {
            short_k_block<decltype(R)::value>(g.a + r0 * g.lda, g.lda, w, g.ldw, n, k, c0, g.out + r0 * g.ldo,
                                              g.ldo, g.beta);
          });
    });
    return;
  }
  const void* a = g.a;
  int64_t lda = g.lda;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (rounded) {
    lda = (k + 31) / 32 * 32;
    a = rounded_rows(g.a, g.lda, m, k, lda);
  }
#endif
  // Columns in blocks of kCols, spread over threads; for each block every row tile, so that the block's weight
  // rows stay in the L1 cache while every row of a passes them.
  const int64_t blocks = n / kCols;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, m * k * kCols));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCols;
      for (int64_t r0 = 0; r0 < m; r0 += kRows) {
        with_rows(std::min<int64_t>(kRows, m - r0), [&](auto R) {
          float* out = g.out + r0 * g.ldo + c0;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
          if (rounded) {
            tile_bf16<decltype(R)::value, kCols>(static_cast<const uint16_t*>(a) + r0 * lda, lda,
                                                 static_cast<const uint16_t*>(g.w) + c0 * g.ldw, g.ldw, k, out,
                                                 g.ldo, g.beta);
            return;
          }
#endif
          with_widened_weights(g, [&](const auto* w) {
            tile_f32<decltype(R)::value, kCols>(static_cast<const float*>(a) + r0 * lda, lda, w + c0 * g.ldw,
                                                g.ldw, k, out, g.ldo, g.beta);
          });
        });
      }
    }
  });
#endif
}

}  // namespace

bool few_rows_gemm_covers(at::ScalarType dtype, bool widen) {
  switch (dtype) {
#if defined(__AVX512F__)
    case at::kFloat: return true;
#endif
    case at::kBFloat16:
#if defined(__AVX512BW__) && defined(__AVX512VL__)
      if (widen) return true;
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
      return !widen;
#else
      return false;
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    case at::kHalf: return true;
#endif
    default: return false;
  }
}

bool few_rows_gemm_runs(const RawGemm& g) {
  return g.w_transposed && (g.beta == 0.0f || g.beta == 1.0f) && g.n % kCols == 0 &&
         few_rows_gemm_covers(g.w_dtype, g.widen);
}

void few_rows_gemm(const RawGemm& g) {
  RECORD_FUNCTION("hyperfused::few_rows_gemm", std::vector<c10::IValue>());
  TORCH_CHECK(few_rows_gemm_runs(g), "hyperfused: few_rows_gemm cannot run this product in this build");
  run_product(g);
}

void few_rows_gemm_batch(const RawGemm* gemms, int count, bool spread) {
  RECORD_FUNCTION("hyperfused::few_rows_gemm_batch", std::vector<c10::IValue>());
  for (int i = 0; i < count; ++i)
    TORCH_CHECK(few_rows_gemm_runs(gemms[i]), "hyperfused: few_rows_gemm cannot run product ", i, " in this build");
  if (!spread) {
    for (int i = 0; i < count; ++i) run_product(gemms[i]);
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) run_product(gemms[i]);
  });
}

}  // namespace hyperfused
