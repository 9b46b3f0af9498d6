// CPU kernels of vqkernels: `assign` (nearest code + exact distance), registered as
// torch.ops.vqkernels.assign_cpu. Independent of CUDA; built by setup.py as
// vqkernels._C_cpu (portable flags) or JIT-compiled by vqkernels/_cpu_extension.py.
//
// Contract (vqkernels/ops/_dispatch.py): x [C, N, D], codebook [C, K, D], same dtype
// (fp32 / bf16 / fp16; tiles are converted to fp32) -> (indices int64 [C, N], distances
// float32 [C, N]); ties to the LOWEST index; the distance is the winner's exact fp32
// distance (vqkernels/ops/_metrics.py). Rows holding NaN never crash the kernel and get
// some index; the public op overwrites them with -1 / NaN.
//
// D <= 16: fused expanded-form score (one FMA per dimension, l2 on inputs shifted by the
// codebook mean) + a running minimum only, rows along the SIMD lanes, each block of rows
// held in registers while it walks the packed codebook; a subblock of codes is rescanned
// (exact distances) only where its minimum is within a row's rounding margin of the best
// (see fused_small_d).
// D > 16: tiles of x @ codes^T through the BLAS (at::mm_out into a per-thread buffer sized
// for L2), the argmin fused right after each tile while it is in cache (expanded-form l2
// score on inputs shifted by the codebook mean), then the winner's exact distance.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "pymodule.h"

namespace {

using at::Tensor;
enum Metric { L2 = 0, DOT = 1, COSINE = 2 };

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // rows per vector: one zmm register
#else
constexpr int kLanes = 8;   // one ymm register (two xmm under portable SSE flags)
#endif
// Rows per block of the fused kernel, in vectors, per padded D: RV x DP registers hold
// the block's rows for the whole walk over the codebook (AVX-512 has 32).
#ifndef VQK_RV4
#define VQK_RV4 4
#endif
#ifndef VQK_RV8
#define VQK_RV8 2
#endif
#ifndef VQK_RV16
#define VQK_RV16 1
#endif
// Codes per tile of the fused kernel: the minima of its subblocks are kept until the end
// of the tile, where the rows' thresholds are tightened and the subblocks rescanned.
#ifndef VQK_TILE_SUBBLOCKS
#define VQK_TILE_SUBBLOCKS 128
#endif

#if defined(__GNUC__) || defined(__clang__)
// GCC/Clang vector extensions: AVX-512/AVX2 under -march=native, SSE with portable flags;
// intrinsics only for FMA / min / compare-to-bits where the target has them.
#define VQK_INLINE inline __attribute__((always_inline))
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
static inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
#if defined(__AVX512F__)  // a broadcast load, not `vf{} + a` (a scalar add and a shuffle)
static VQK_INLINE vf vsplat(float a) { return (vf)_mm512_set1_ps(a); }
#elif defined(__AVX__)
static VQK_INLINE vf vsplat(float a) { return (vf)_mm256_set1_ps(a); }
#else
static VQK_INLINE vf vsplat(float a) { vf v; for (int i = 0; i < kLanes; ++i) v[i] = a; return v; }
#endif
static inline vi isplat(int32_t a) { return vi{} + a; }
static inline vi vless(vf a, vf b) { return (vi)(a < b); }
static inline vf vselect(vi m, vf a, vf b) { return m ? a : b; }
static inline vi iselect(vi m, vi a, vi b) { return m ? a : b; }
#if defined(__AVX512F__)
static VQK_INLINE vf vfma(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
static VQK_INLINE vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }  // NaN a -> b
static VQK_INLINE uint32_t vle_bits(vf a, vf b) { return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_LE_OQ); }
#elif defined(__AVX__)
#if defined(__FMA__)
static VQK_INLINE vf vfma(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static VQK_INLINE vf vfma(vf a, vf b, vf c) { return a * b + c; }
#endif
static VQK_INLINE vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
static VQK_INLINE uint32_t vle_bits(vf a, vf b) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_LE_OQ)));
}
#else
static VQK_INLINE vf vfma(vf a, vf b, vf c) { return a * b + c; }
static VQK_INLINE vf vmin(vf a, vf b) { return vselect(vless(a, b), a, b); }
static VQK_INLINE uint32_t vle_bits(vf a, vf b) {
  const vi m = (vi)(a <= b);
  uint32_t bits = 0;
  for (int i = 0; i < kLanes; ++i) bits |= (m[i] ? 1u : 0u) << i;
  return bits;
}
#endif
#else
// Portable fallback: plain arrays, the compiler vectorises what it can.
#define VQK_INLINE inline
struct vf { float v[kLanes]; };
struct vi { int32_t v[kLanes]; };
static inline vf vload(const float* p) { vf r; std::memcpy(r.v, p, sizeof r.v); return r; }
static inline void vstore(float* p, vf v) { std::memcpy(p, v.v, sizeof v.v); }
static inline vf vsplat(float a) { vf r; for (int i = 0; i < kLanes; ++i) r.v[i] = a; return r; }
static inline vi isplat(int32_t a) { vi r; for (int i = 0; i < kLanes; ++i) r.v[i] = a; return r; }
static inline vf operator+(vf a, vf b) { for (int i = 0; i < kLanes; ++i) a.v[i] += b.v[i]; return a; }
static inline vf operator-(vf a, vf b) { for (int i = 0; i < kLanes; ++i) a.v[i] -= b.v[i]; return a; }
static inline vf operator*(vf a, vf b) { for (int i = 0; i < kLanes; ++i) a.v[i] *= b.v[i]; return a; }
static inline vf operator-(float s, vf b) { for (int i = 0; i < kLanes; ++i) b.v[i] = s - b.v[i]; return b; }
static inline vf operator-(vf b) { for (int i = 0; i < kLanes; ++i) b.v[i] = -b.v[i]; return b; }
static inline vi operator+(vi a, vi b) { for (int i = 0; i < kLanes; ++i) a.v[i] += b.v[i]; return a; }
static inline vf vselect(vi m, vf a, vf b) { for (int i = 0; i < kLanes; ++i) a.v[i] = m.v[i] ? a.v[i] : b.v[i]; return a; }
static inline vi iselect(vi m, vi a, vi b) { for (int i = 0; i < kLanes; ++i) a.v[i] = m.v[i] ? a.v[i] : b.v[i]; return a; }
static inline vi vless(vf a, vf b) { vi r; for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] < b.v[i] ? -1 : 0; return r; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vmin(vf a, vf b) { return vselect(vless(a, b), a, b); }
static inline uint32_t vle_bits(vf a, vf b) {
  uint32_t bits = 0;
  for (int i = 0; i < kLanes; ++i) bits |= (a.v[i] <= b.v[i] ? 1u : 0u) << i;
  return bits;
}
#define VQK_LANE(v, i) (v).v[i]
#endif
#ifndef VQK_LANE
#define VQK_LANE(v, i) (v)[i]
#endif

static inline int lowest_bit(uint32_t bits) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(bits);
#else
  int i = 0;
  while (!(bits & 1u)) { bits >>= 1; ++i; }
  return i;
#endif
}

// Exact fp32 distance of x to c (the definitions of vqkernels/ops/_metrics.py).
static inline float exact_distance(int metric, const float* x, const float* c, int64_t D) {
  float acc = 0.f;
  if (metric == L2) {
    for (int64_t d = 0; d < D; ++d) { const float t = x[d] - c[d]; acc += t * t; }
    return acc;
  }
  for (int64_t d = 0; d < D; ++d) acc += x[d] * c[d];
  return metric == DOT ? -acc : 1.f - acc;
}

// ---- D <= 16: fused expanded-form score + running minimum, rows along the SIMD lanes ----
//
// Score of row x and code c: bias_c + sum_d x'_d w_cd (one FMA per dimension):
//   l2: x' = x - m, w = -2 (c - m), bias = ||c - m||^2 (m: the mean of the finite codes,
//       so large common offsets do not cancel); dot: x' = x, w = -c, bias 0; cosine: the
//       same on unit vectors, bias 1. The score differs from the exact distance (minus a
//       per-row constant) by at most `margin` (its rounding bound, doubled).
// The walk keeps only a per-row running MINIMUM of the score (one vminps per code and row
// vector, no index), per subblock of kLanes codes. At the end of each tile of codes every
// row's threshold T = min score so far + margin is tightened, and only the subblocks whose
// minimum is <= T are rescanned for that row: the codes scoring <= T get their exact
// distance, and the lowest-index exact minimum among them wins (walked in index order,
// strict <). The true winner always scores within the margin of the best score, so it is
// among them; thresholds only fall, so a later tile rescans only where a row improved or
// nearly tied (a few times per row).
struct PackedCodes {
  // [C][ceil(K / kLanes)][DP + 1][kLanes]: per block of kLanes codes, the biases, then each
  // weight (zero past D), codes along the lanes (bias NaN past K). The walk broadcasts one
  // code's values, a rescan loads them as vectors.
  const float* wt;
  const float* centre;  // [C][DP] for l2 (zero past D), else nullptr
  const float* cmax2;   // [C]: max squared norm of a finite (shifted) code
};

// Running per-lane minimum of the scores of the first n codes of a packed block, for RV row vectors.
template <int DP, int RV>
static VQK_INLINE void score_codes(const float* blk, int64_t n, const vf (&xv)[RV][DP], vf (&m)[RV]) {
  for (int64_t k = 0; k < n; ++k) {
    vf acc[RV];
    const vf b = vsplat(blk[k]);
    for (int r = 0; r < RV; ++r) acc[r] = b;
    for (int d = 0; d < DP; ++d) {
      const vf wd = vsplat(blk[(1 + d) * kLanes + k]);
      for (int r = 0; r < RV; ++r) acc[r] = vfma(xv[r][d], wd, acc[r]);
    }
    for (int r = 0; r < RV; ++r) m[r] = vmin(acc[r], m[r]);  // a NaN score never lowers it
  }
}

template <int DP, int RV>
static void fused_small_d(int metric, const float* xf, const float* cf, const PackedCodes& pk, int64_t C, int64_t N,
                          int64_t K, int D, float* outd, int64_t* outi) {
  constexpr int RB = RV * kLanes;  // rows per block
  constexpr int W = DP + 1;
  constexpr int64_t kSub = VQK_TILE_SUBBLOCKS;
  const int64_t KB = (K + kLanes - 1) / kLanes;
  const int64_t nblocks = (N + RB - 1) / RB;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Rounding bound of the score vs the exact distance, per unit of |x'|^2 + max |c'|^2:
  // (D + 4) x 2^-20, about 16 (D + 4) unit roundoffs (worst case ~ 8 (D + 3)).
  const float mfac = std::ldexp(static_cast<float>(D + 4), -20);
  at::parallel_for(0, C * nblocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float xt[DP * RB];  // the block's shifted rows, transposed: [DP][RB]
    alignas(64) float T[RB], marg[RB], ebest[RB];
    int64_t ibest[RB];
    std::vector<vf> mbuf(kSub * RV);  // per subblock and row vector: the minimum score
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / nblocks, r0 = (task % nblocks) * RB, rn = std::min<int64_t>(RB, N - r0);
      const float* centre = pk.centre ? pk.centre + c * DP : nullptr;
      const float* xb = xf + (c * N + r0) * D;
      for (int i = 0; i < RB; ++i) {
        float n2 = 0.f;
        bool finite = i < rn;
        for (int d = 0; d < DP; ++d) {
          float v = 0.f;
          if (i < rn && d < D) {
            const float raw = xb[i * D + d];
            finite = finite && std::isfinite(raw);
            v = raw - (centre ? centre[d] : 0.f);
          }
          xt[d * RB + i] = v;
          n2 += v * v;
        }
        marg[i] = (n2 + pk.cmax2[c]) * mfac;
        // Padding and non-finite rows never open a rescan (the public op gives them -1). A
        // finite row whose squared norm overflows has an infinite margin: its threshold stays
        // +inf, so every subblock is rescanned with exact distances (slow, but right).
        T[i] = finite ? inf : nan;
        ebest[i] = inf;
        ibest[i] = -1;
      }
      vf xv[RV][DP];
      for (int r = 0; r < RV; ++r)
        for (int d = 0; d < DP; ++d) xv[r][d] = vload(xt + d * RB + r * kLanes);
      const float* wtc = pk.wt + c * KB * W * kLanes;
      const float* cc = cf + c * K * D;
      for (int64_t k0 = 0; k0 < K; k0 += kSub * kLanes) {
        const int64_t kn = std::min<int64_t>(kSub * kLanes, K - k0), nsub = (kn + kLanes - 1) / kLanes;
        vf tmin[RV];
        for (int r = 0; r < RV; ++r) tmin[r] = vsplat(inf);
        for (int64_t j = 0; j < nsub; ++j) {
          vf m[RV];
          for (int r = 0; r < RV; ++r) m[r] = vsplat(inf);
          const float* blk = wtc + (k0 / kLanes + j) * W * kLanes;
          if (j * kLanes + kLanes <= kn) score_codes<DP, RV>(blk, kLanes, xv, m);  // constant trip count
          else score_codes<DP, RV>(blk, kn - j * kLanes, xv, m);
          for (int r = 0; r < RV; ++r) { mbuf[j * RV + r] = m[r]; tmin[r] = vmin(m[r], tmin[r]); }
        }
        // Tile end: tighten the thresholds, then rescan the subblocks that can hold a winner.
        for (int r = 0; r < RV; ++r) {
          const vf t = vmin(tmin[r] + vload(marg + r * kLanes), vload(T + r * kLanes));  // NaN T stays NaN
          vstore(T + r * kLanes, t);
          const uint32_t live = vle_bits(tmin[r], t);
          if (!live) continue;
          for (int64_t j = 0; j < nsub; ++j) {
            uint32_t bits = vle_bits(mbuf[j * RV + r], t) & live;
            while (bits) {
              const int row = r * kLanes + lowest_bit(bits);
              bits &= bits - 1;
              const int64_t kb = k0 / kLanes + j;
              const float* wt = wtc + kb * W * kLanes;
              vf s = vload(wt);  // the same FMAs as the walk, codes along the lanes
              for (int d = 0; d < DP; ++d) s = vfma(vsplat(xt[d * RB + row]), vload(wt + (1 + d) * kLanes), s);
              uint32_t cand = vle_bits(s, vsplat(T[row]));
              const float* xo = xb + static_cast<int64_t>(row) * D;
              while (cand) {
                const int64_t k = kb * kLanes + lowest_bit(cand);
                cand &= cand - 1;
                const float e = exact_distance(metric, xo, cc + k * D, D);
                if (e < ebest[row]) { ebest[row] = e; ibest[row] = k; }
              }
            }
          }
        }
      }
      for (int64_t i = 0; i < rn; ++i) {
        const bool found = ibest[i] >= 0;
        outi[c * N + r0 + i] = found ? ibest[i] : 0;
        outd[c * N + r0 + i] = found ? ebest[i] : exact_distance(metric, xb + i * D, cc, D);
      }
    }
  });
}

// Packs the codebook for fused_small_d (see there): O(C K D), once per call; fixed-size
// loops (DP) so that small N, where packing is most of the work, stays cheap.
template <int DP>
static void pack_codes(int metric, const Tensor& cf, Tensor& wt, Tensor& centre, Tensor& cmax2) {
  constexpr int W = DP + 1;
  const int64_t C = cf.size(0), K = cf.size(1), D = cf.size(2), KB = (K + kLanes - 1) / kLanes;
  const float* cp = cf.data_ptr<float>();
  wt = at::empty({C, KB, W, kLanes}, cf.options());
  centre = at::zeros({C, DP}, cf.options());  // padded with zeros past D
  cmax2 = at::empty({C}, cf.options());
  Tensor norms = at::empty({C, K}, cf.options());
  float* ce = centre.data_ptr<float>();
  if (metric == L2) {
    for (int64_t c = 0; c < C; ++c) {  // mean of the finite codes (a NaN code must not poison every score)
      double sum[DP] = {};
      int64_t count = 0;
      for (int64_t k = 0; k < K; ++k) {
        const float* v = cp + (c * K + k) * D;
        float z = 0.f;  // NaN iff some coordinate is NaN or infinite
        for (int64_t d = 0; d < D; ++d) z += v[d] * 0.f;
        if (z != 0.f) continue;
        for (int64_t d = 0; d < D; ++d) sum[d] += v[d];
        ++count;
      }
      for (int64_t d = 0; d < D; ++d) ce[c * DP + d] = count ? static_cast<float>(sum[d] / count) : 0.f;
    }
  }
  float* wtp = wt.data_ptr<float>();
  float* np = norms.data_ptr<float>();
  const float scale = metric == L2 ? -2.f : -1.f;
  const float bias0 = metric == COSINE ? 1.f : 0.f;
  at::parallel_for(0, C * KB, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c = b / KB, kb = b % KB, k0 = kb * kLanes, kn = std::min<int64_t>(kLanes, K - k0);
      const float* cen = ce + c * DP;
      float* blk = wtp + b * W * kLanes;
      for (int64_t l = 0; l < kn; ++l) {
        const float* v = cp + (c * K + k0 + l) * D;
        float s[DP];
        for (int d = 0; d < DP; ++d) s[d] = d < D ? v[d] - cen[d] : 0.f;
        float n2 = 0.f;
        for (int d = 0; d < DP; ++d) n2 += s[d] * s[d];
        blk[l] = metric == L2 ? n2 : bias0;
        // A copy of the code just before it can never win (same distance, higher index): a NaN
        // bias keeps it out of the minimum and the rescans, so a constant codebook (or a
        // constant block of it) costs one exact distance per row, not one per copy.
        if (k0 + l > 0 && std::memcmp(v, v - D, D * sizeof(float)) == 0) blk[l] = std::numeric_limits<float>::quiet_NaN();
        for (int d = 0; d < DP; ++d) blk[(1 + d) * kLanes + l] = scale * s[d];
        np[c * K + k0 + l] = n2;
      }
      for (int64_t l = kn; l < kLanes; ++l) {  // padding lanes never score <= a threshold
        blk[l] = std::numeric_limits<float>::quiet_NaN();
        for (int d = 1; d < W; ++d) blk[d * kLanes + l] = 0.f;
      }
    }
  });
  float* cm = cmax2.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    float mx = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float n = np[c * K + k];
      mx = std::max(mx, n - n == 0.f ? n : 0.f);  // finite norms only
    }
    cm[c] = mx;
  }
}

template <int DP, int RV>
static void fused_run(int metric, const Tensor& xf, const Tensor& cf, float* outd, int64_t* outi) {
  Tensor wt, centre, cmax2;
  pack_codes<DP>(metric, cf, wt, centre, cmax2);
  const PackedCodes pk{wt.data_ptr<float>(), metric == L2 ? centre.data_ptr<float>() : nullptr,
                       cmax2.data_ptr<float>()};
  fused_small_d<DP, RV>(metric, xf.data_ptr<float>(), cf.data_ptr<float>(), pk, xf.size(0), xf.size(1), cf.size(1),
                        static_cast<int>(xf.size(2)), outd, outi);
}

static void fused_dispatch(int metric, const Tensor& xf, const Tensor& cf, float* outd, int64_t* outi) {
  const int64_t D = xf.size(2);  // zero-padded dimensions add exactly 0
  if (D <= 4) fused_run<4, VQK_RV4>(metric, xf, cf, outd, outi);
  else if (D <= 8) fused_run<8, VQK_RV8>(metric, xf, cf, outd, outi);
  else fused_run<16, VQK_RV16>(metric, xf, cf, outd, outi);
}

// Expanded-form score of codes k..k+kLanes of a BLAS tile row (one expression for both passes,
// so the tile minimum is bit-identical to the score it came from).
static VQK_INLINE vf tile_scores(int metric, const float* s, const float* cn, int64_t k) {
  const vf sv = vload(s + k);
  return metric == L2 ? vload(cn + k) - vsplat(2.f) * sv : (metric == DOT ? -sv : 1.f - sv);
}
static inline float tile_score(int metric, const float* s, const float* cn, int64_t k) {
  return metric == L2 ? cn[k] - 2.f * s[k] : (metric == DOT ? -s[k] : 1.f - s[k]);
}

// Minimum over the lanes (none NaN), as a tree rather than a chain of kLanes dependent mins.
static inline float hmin(vf v) {
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
  return _mm512_reduce_min_ps((__m512)v);
#else
  float a[kLanes];
  std::memcpy(a, &v, sizeof a);
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a[i] = std::min(a[i], a[i + w]);
  return a[0];
#endif
}

// Minimum of one row's scores over a BLAS tile (vectorised; NaN scores never win).
static inline float tile_min(int metric, const float* s, const float* cn, int64_t kn) {
  // Four independent running minima: one chain would wait a min's latency per vector.
  const vf inf = vsplat(std::numeric_limits<float>::infinity());
  vf b0 = inf, b1 = inf, b2 = inf, b3 = inf;
  int64_t k = 0;
  for (; k + 4 * kLanes <= kn; k += 4 * kLanes) {
    b0 = vmin(tile_scores(metric, s, cn, k), b0);  // vmin(NaN, b) = b: NaN scores never win
    b1 = vmin(tile_scores(metric, s, cn, k + kLanes), b1);
    b2 = vmin(tile_scores(metric, s, cn, k + 2 * kLanes), b2);
    b3 = vmin(tile_scores(metric, s, cn, k + 3 * kLanes), b3);
  }
  for (; k + kLanes <= kn; k += kLanes) b0 = vmin(tile_scores(metric, s, cn, k), b0);
  float b = hmin(vmin(vmin(b0, b1), vmin(b2, b3)));
  for (; k < kn; ++k) {
    const float v = tile_score(metric, s, cn, k);
    if (v < b) b = v;
  }
  return b;
}

// Codes whose expanded-form score is within the score's rounding margin of the row's best
// are candidates; the winner is the lowest-index exact minimum among them, so exact ties
// between distinct codes go to the lowest index as in the reference.
constexpr int kCandidates = 16;
struct RowCandidates {
  float best = std::numeric_limits<float>::infinity();
  int n = 0;
  bool overflow = false;  // more near-ties than kept: the row is rescanned exactly ...
  float dropped = std::numeric_limits<float>::infinity();  // ... unless the best leaves them all behind
  float score[kCandidates];
  int64_t index[kCandidates];
  void reset() {  // not `= RowCandidates()`: that copies the whole arrays
    best = dropped = std::numeric_limits<float>::infinity();
    n = 0;
    overflow = false;
  }
  void add(float v, int64_t k, float margin) {
    if (n == kCandidates) {  // drop candidates the best has left behind
      int m = 0;
      for (int i = 0; i < n; ++i)
        if (score[i] <= best + margin) { score[m] = score[i]; index[m] = index[i]; ++m; }
      n = m;
      if (n == kCandidates) { overflow = true; dropped = std::min(dropped, v); return; }
    }
    score[n] = v;
    index[n] = k;
    ++n;
  }
};

// centre: [C][D] codebook means (l2: rows are shifted by them per block, into a per-thread
// buffer), else nullptr; cmax2: [C] max squared norm of a (shifted) code, for the margins.
static void large_d(int metric, const Tensor& xf, const Tensor& cf, const Tensor& cs, const float* centre,
                    const float* cnorm, const float* cmax2, float* outd, int64_t* outi) {
  const int64_t C = xf.size(0), N = xf.size(1), K = cf.size(1), D = xf.size(2);
  constexpr int64_t kBlock = 256;
  // Code tile so that the [256, KT] score buffer (plus the codes) stays in a 1 MiB L2 share.
  const int64_t KT = std::min<int64_t>(K, std::max<int64_t>(64, (int64_t{1} << 18) / (kBlock + D) / 16 * 16));
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const float* csp = cs.data_ptr<float>();
  const float* xfp = xf.data_ptr<float>();
  const float* cfp = cf.data_ptr<float>();
  at::parallel_for(0, C * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kBlock * KT);
    std::vector<RowCandidates> rows(kBlock);
    std::vector<float> margins(kBlock), xshift(centre ? kBlock * D : 0);
    Tensor scores = at::from_blob(buf.data(), {kBlock, KT}, at::kFloat);
    // Rounding margin of the fp32 expanded-form score, per row: (D + 8) ulps of
    // |x'|^2 + max |c'|^2 (the size of every term of the score), doubled for safety.
    const float mscale = 2.f * static_cast<float>(D + 8) * std::ldexp(1.0f, -23);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / nblocks, r0 = (task % nblocks) * kBlock, rn = std::min(kBlock, N - r0);
      const float* xrows = xfp + (c * N + r0) * D;
      if (centre) {  // l2: shift by the codebook mean so ||c'||^2 - 2 x'.c' does not cancel for offset data
        const float* m = centre + c * D;
        for (int64_t i = 0; i < rn; ++i)
          for (int64_t d = 0; d < D; ++d) xshift[i * D + d] = xrows[i * D + d] - m[d];
        xrows = xshift.data();
      }
      for (int64_t i = 0; i < rn; ++i) {
        rows[i].reset();
        const float* xr = xrows + i * D;
        vf acc = vsplat(0.f);
        int64_t d = 0;
        for (; d + kLanes <= D; d += kLanes) { const vf v = vload(xr + d); acc = vfma(v, v, acc); }
        float n2 = 0.f;
        for (int l = 0; l < kLanes; ++l) n2 += VQK_LANE(acc, l);
        for (; d < D; ++d) n2 += xr[d] * xr[d];
        margins[i] = (n2 + cmax2[c]) * mscale;
      }
      Tensor xb = at::from_blob(const_cast<float*>(xrows), {rn, D}, at::kFloat);
      for (int64_t k0 = 0; k0 < K; k0 += KT) {
        const int64_t kn = std::min(KT, K - k0);
        Tensor cb = at::from_blob(const_cast<float*>(csp) + (c * K + k0) * D, {kn, D}, at::kFloat);
        Tensor out = scores.narrow(0, 0, rn).narrow(1, 0, kn);
        at::mm_out(out, xb, cb.t());
        const int64_t ld = out.stride(0);
        const float* cn = cnorm ? cnorm + c * K + k0 : nullptr;
        for (int64_t i = 0; i < rn; ++i) {  // fused right after the tile, while it is in cache
          RowCandidates& row = rows[i];
          const float* s = buf.data() + i * ld;
          const float margin = margins[i];
          const float m = tile_min(metric, s, cn, kn);
          if (!(m <= row.best + margin)) continue;
          row.best = std::min(row.best, m);
          if (row.overflow && row.best + margin < row.dropped) row.overflow = false;
          // Codes within the margin: a vector compare per kLanes scores, scalar only on hits.
          const float T = row.best + margin;
          const vf tv = vsplat(T);
          int64_t k = 0;
          for (; k + kLanes <= kn; k += kLanes) {
            for (uint32_t bits = vle_bits(tile_scores(metric, s, cn, k), tv); bits; bits &= bits - 1) {
              const int64_t j = k + lowest_bit(bits);  // the lane's score again: bit-identical (2 s is exact)
              row.add(tile_score(metric, s, cn, j), k0 + j, margin);
            }
          }
          for (; k < kn; ++k) {
            const float v = tile_score(metric, s, cn, k);
            if (v <= T) row.add(v, k0 + k, margin);
          }
        }
      }
      // The score shortlisted the codes; the winner is the exact minimum among them.
      const float* co = cfp + c * K * D;
      for (int64_t i = 0; i < rn; ++i) {
        const RowCandidates& row = rows[i];
        const float* xo = xfp + (c * N + r0 + i) * D;
        float b = std::numeric_limits<float>::infinity();
        int64_t bi = 0;
        bool found = false;
        if (row.overflow) {
          for (int64_t k = 0; k < K; ++k) {
            const float e = exact_distance(metric, xo, co + k * D, D);
            if (e < b) { b = e; bi = k; found = true; }
          }
        } else {
          for (int j = 0; j < row.n; ++j) {
            if (!(row.score[j] <= row.best + margins[i])) continue;
            const float e = exact_distance(metric, xo, co + row.index[j] * D, D);
            if (!found || e < b) { b = e; bi = row.index[j]; found = true; }
          }
        }
        outi[c * N + r0 + i] = bi;
        outd[c * N + r0 + i] = found ? b : exact_distance(metric, xo, co + bi * D, D);
      }
    }
  });
}

// Largest D of the fused kernel (above: BLAS tiles); 16 at most (the rows of a block live in
// registers). At D = 16 the fused kernel took 0.39x the BLAS tiles' time (1 thread, N = 65536,
// K = 8192); a DP = 24 / 32 variant took 1.6x / 1.5-2.0x theirs. VQKERNELS_CPU_FUSED_MAX_D lowers
// it (tests reach both paths at one D, benchmarks tune).
static int64_t fused_max_d() {
  static const int64_t value = [] {
    const char* env = std::getenv("VQKERNELS_CPU_FUSED_MAX_D");
    return env && *env ? std::atoll(env) : int64_t{16};
  }();
  return value;
}

static Tensor normalized(const Tensor& v) {  // F.normalize(v, dim=-1): v / max(|v|, 1e-12)
  return v / v.norm(2, {-1}, true).clamp_min(1e-12);
}

std::tuple<Tensor, Tensor> assign_cpu(const Tensor& x, const Tensor& codebook, c10::string_view metric_name) {
  TORCH_CHECK(x.device().is_cpu() && codebook.device().is_cpu(), "assign_cpu: x and codebook must be CPU tensors");
  TORCH_CHECK(x.dim() == 3 && codebook.dim() == 3, "assign_cpu: expected x [C, N, D] and codebook [C, K, D], got ",
              x.sizes(), " and ", codebook.sizes());
  TORCH_CHECK(x.size(0) == codebook.size(0) && x.size(2) == codebook.size(2),
              "assign_cpu: x ", x.sizes(), " and codebook ", codebook.sizes(), " disagree on C or D");
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "assign_cpu: x and codebook dtypes differ");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "assign_cpu: dtype ", st, " is not supported (float32, bfloat16, float16)");
  int metric;
  if (metric_name == "l2") metric = L2;
  else if (metric_name == "dot") metric = DOT;
  else if (metric_name == "cosine") metric = COSINE;
  else TORCH_CHECK(false, "assign_cpu: unknown metric '", std::string(metric_name), "' (expected l2, cosine or dot)");
  const int64_t C = x.size(0), N = x.size(1), K = codebook.size(1), D = x.size(2);
  TORCH_CHECK(K >= 1 && D >= 1, "assign_cpu: need K >= 1 and D >= 1");
  Tensor indices = at::empty({C, N}, x.options().dtype(at::kLong));
  Tensor distances = at::empty({C, N}, x.options().dtype(at::kFloat));
  if (C * N == 0) return {indices, distances};
  Tensor xf = x.to(at::kFloat).contiguous();
  Tensor cf = codebook.to(at::kFloat).contiguous();
  if (metric == COSINE) { xf = normalized(xf); cf = normalized(cf); }
  float* outd = distances.data_ptr<float>();
  int64_t* outi = indices.data_ptr<int64_t>();
  if (D <= std::min<int64_t>(fused_max_d(), 16)) {
    fused_dispatch(metric, xf, cf, outd, outi);
  } else {
    // Codebook-sized prep only (K x D); the rows are shifted and measured per block in large_d.
    Tensor cs = cf, centre;
    if (metric == L2) {
      centre = cf.mean(1).contiguous();
      cs = (cf - centre.unsqueeze(1)).contiguous();
    }
    Tensor cn2 = cs.pow(2).sum(-1).contiguous();
    Tensor cmax2 = cn2.amax(1).contiguous();
    large_d(metric, xf, cf, cs, metric == L2 ? centre.data_ptr<float>() : nullptr,
            metric == L2 ? cn2.data_ptr<float>() : nullptr, cmax2.data_ptr<float>(), outd, outi);
  }
  return {indices, distances};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vqkernels, m) {
  m.def("assign_cpu(Tensor x, Tensor codebook, str metric) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) {
  m.impl("assign_cpu", &assign_cpu);
}

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cpu
#endif
// `import vqkernels._C_cpu` (the setup.py build) runs the registrations above.
VQK_PYMODULE("vqkernels CPU kernels; the ops are registered as torch.ops.vqkernels.*_cpu")
