// Nearest-code assignment (distance + argmin) without an N x K matrix.
//
// Every metric is ranked by the per-code affine score
//     score[n, k] = bias[k] - scale[k] * <x[n], c[k]>
//   l2:     bias = ||c||^2, scale = 2          (||x||^2 is constant per row, left out)
//   cosine: bias = 0,       scale = 1/max(||c||, eps)   (1/||x|| is a positive per-row
//                                                        constant: it cannot change the argmin)
//   dot:    bias = 0,       scale = 1
// so one kernel serves all three; code_terms_kernel fills bias/scale once per call.
//
// Two main kernels, same structure: a block owns a tile of rows and a range of K tiles (a
// "split" of the codebook), streams codebook tiles through shared memory in D chunks with
// a two-stage pipeline (global loads of chunk t+1 are in flight while chunk t is
// multiplied), and keeps a running (min score, argmin) per row in registers. Partial
// minima meet through a shuffle reduction and then one 64-bit atomicMin per row on a
// packed (score, index) key, whose unsigned order is the lexicographic order of the pair:
// ties go to the LOWEST index across threads, warps, blocks and splits alike.
//   * assign_mma_kernel (fp16/bf16, sm_80+): mma.sync m16n8k16 tensor-core fragments loaded
//     with ldmatrix, fp32 accumulation.
//   * assign_simt_kernel (any dtype, converted to fp32 in the loader): 8x8 register tile
//     per thread of plain FMAs: exact IEEE fp32 dots, and the 16-bit path for D <= 8
//     (launch.h kSimtMaxD), where the per-code argmin, not the dot product, bounds the time.
// assign_finalize_kernel then unpacks the winner and recomputes its exact fp32 distance by
// direct difference (l2 ||x-c||^2, cosine 1 - <x/|x|, c/|c|>, dot -<x,c>).
//
// The codebook axis: C independent codebooks in one launch. x is [C, N, D], the codebook
// [C, K, D], and the score terms, keys and outputs are [C, K] / [C, N], all contiguous.
// The main kernels take codebook c from blockIdx.z and move every base pointer to its
// slice once, with 64-bit offsets; the warp-per-item kernels run over the flattened C * K
// codes or C * N rows.
//
// Bounds: rows past N and codes past K are loaded as zeros; D is zero-padded up to the
// chunk size in shared memory (zeros add nothing to a dot product); codes past K get
// bias = +inf so they never win. All row/code offsets are 64-bit.
#pragma once

#include "common.cuh"

namespace vqk {
namespace assign_cfg {
// Tensor-core path: block tile 128 rows x 128 codes, D chunk 32; 8 warps as 4 (rows) x 2
// (codes), each warp 32 x 64 = 2 m16 tiles x 8 n8 tiles = 64 fp32 accumulators per thread.
constexpr int kMmaBM = 128;
constexpr int kMmaBN = 128;
constexpr int kMmaBK = 32;
constexpr int kMmaThreads = 256;
constexpr int kMmaWarpsN = 2;
constexpr int kMmaWM = 32;
constexpr int kMmaWN = 64;
constexpr int kMmaMT = kMmaWM / 16;
constexpr int kMmaNT = kMmaWN / 8;
// Shared rows of 40 halves (80 bytes): the 8 row addresses of an ldmatrix 8x8 matrix fall
// in 8 distinct 4-bank groups, so the loads are conflict-free; rows stay 16-byte aligned.
constexpr int kMmaStride = kMmaBK + 8;

// SIMT path: block tile 128 x 128, D chunk 16, 256 threads as 16 x 16, 8 x 8 outputs per
// thread taken as two 4-wide groups 64 apart (rows and codes), so the float4 shared reads
// of a half-warp are contiguous (conflict-free) rather than 32 bytes apart.
constexpr int kSimtBM = 128;
constexpr int kSimtBN = 128;
constexpr int kSimtBK = 16;
constexpr int kSimtThreads = 256;
constexpr int kSimtStride = 128 + 4;  // floats; +4 keeps float4 alignment, halves store conflicts

constexpr int kRowsPerWarpBlock = 8;  // warp-per-row kernels: 256 threads = 8 rows per block
}  // namespace assign_cfg

// ---------------------------------------------------------------------------------------
// Per-code score terms (one warp per code) of all C * K codes of a [C, K, D] codebook: the
// terms of a code depend on that code alone, so the codebook axis is just more codes.
template <typename T>
__global__ void __launch_bounds__(256)
    code_terms_kernel(const T* __restrict__ codebook, int64_t codes, int D, int metric, float* __restrict__ bias,
                      float* __restrict__ scale) {
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); k < codes;
       k += static_cast<int64_t>(gridDim.x) * warps) {
    const T* c = codebook + k * static_cast<int64_t>(D);
    float ss = 0.f;
    for (int d = lane; d < D; d += 32) {
      const float v = to_f32(c[d]);
      ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    if (lane == 0) {
      if (metric == kL2) {
        bias[k] = ss;
        scale[k] = 2.f;
      } else if (metric == kCosine) {
        bias[k] = 0.f;
        scale[k] = 1.f / fmaxf(sqrtf(ss), kNormEps);
      } else {
        bias[k] = 0.f;
        scale[k] = 1.f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core helpers (sm_80+; compiled to a trap below so the header builds for any arch).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
#else
  r[0] = r[1] = r[2] = r[3] = 0u;
#if defined(__CUDA_ARCH__)
  __trap();
#endif
#endif
}

// c += a * b on one m16n8k16 tile, fp32 accumulators, for T = __half or __nv_bfloat16: the
// two differ only in the instruction's operand types, so VQK_MMA16816 takes the opcode.
template <typename T>
struct Mma16816;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define VQK_MMA16816(OPCODE)                                                                   \
  asm volatile(OPCODE " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"     \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
#elif defined(__CUDA_ARCH__)
#define VQK_MMA16816(OPCODE) __trap()
#else
#define VQK_MMA16816(OPCODE) ((void)0)
#endif

template <>
struct Mma16816<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    VQK_MMA16816("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32");
  }
};

template <>
struct Mma16816<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    VQK_MMA16816("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
  }
};

#undef VQK_MMA16816

// Eight consecutive 16-bit elements of row `row`, starting at column d, as raw bits;
// zeros past the last row or past D. `vec`: D % 8 == 0 and the base is 16-byte aligned,
// so (d being a multiple of 8) the whole 16 bytes are in range and aligned.
__device__ __forceinline__ uint4 load8_u16(const uint16_t* __restrict__ base, int64_t row, int64_t nrows, int d,
                                           int D, bool vec) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (row < nrows && d < D) {
    const uint16_t* p = base + row * static_cast<int64_t>(D) + d;
    if (vec) {
      v = __ldg(reinterpret_cast<const uint4*>(p));
    } else {
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t lo = (d + 2 * j < D) ? static_cast<uint32_t>(__ldg(p + 2 * j)) : 0u;
        const uint32_t hi = (d + 2 * j + 1 < D) ? static_cast<uint32_t>(__ldg(p + 2 * j + 1)) : 0u;
        w[j] = lo | (hi << 16);  // little-endian: element 2j in the low half, as in memory
      }
      v = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  return v;
}

// ---------------------------------------------------------------------------------------
// What the two main kernels share: the block's slice of the work, the score-term staging,
// the SIMT operand load and the double-buffered main loop.

// The slice of a [C, N, D] x [C, K, D] problem one block works on: codebook blockIdx.z,
// rows [row0, row0 + BM), K tiles [kt_begin, kt_end) (split blockIdx.y of the codebook).
// The constructor moves every base pointer to codebook c once (64-bit offsets), so the
// loops below index within one codebook exactly as in the single-codebook case.
template <typename T, int BM, int BN>
struct AssignBlock {
  const T* x;                  // [N, D] of codebook c
  const T* codebook;           // [K, D]
  const float* code_bias;      // [K]
  const float* code_scale;     // [K]
  unsigned long long* keys;    // [N]
  int64_t row0;
  int kt_begin, kt_end;

  __device__ __forceinline__ AssignBlock(const T* x_all, const T* codebook_all, const float* bias_all,
                                         const float* scale_all, unsigned long long* keys_all, int64_t N, int K,
                                         int D, int tiles_per_split) {
    const int64_t c = blockIdx.z;
    x = x_all + c * N * D;
    codebook = codebook_all + c * K * D;
    code_bias = bias_all + c * K;
    code_scale = scale_all + c * K;
    keys = keys_all + c * N;
    row0 = static_cast<int64_t>(blockIdx.x) * BM;
    const int num_tiles = (K + BN - 1) / BN;
    kt_begin = static_cast<int>(blockIdx.y) * tiles_per_split;
    kt_end = min(kt_begin + tiles_per_split, num_tiles);
  }
};

// Score terms of one K tile, staged like the operand tiles: with the first D chunk of tile
// kt, thread t < BN fetches code kt * BN + t's (bias, scale) into registers (load) and
// parks them in shared memory beside the operands (store). Codes past K get bias = +inf
// (never win) and scale 0.
template <int BN>
struct CodeTermsStage {
  float bias = 0.f, scale = 0.f;

  __device__ __forceinline__ void load(const float* __restrict__ code_bias, const float* __restrict__ code_scale,
                                       int K, int kt, int dc) {
    if (dc == 0 && threadIdx.x < BN) {
      const int code = kt * BN + static_cast<int>(threadIdx.x);
      bias = code < K ? __ldg(code_bias + code) : __int_as_float(0x7f800000);
      scale = code < K ? __ldg(code_scale + code) : 0.f;
    }
  }
  __device__ __forceinline__ void store(float (&s_bias)[2][BN], float (&s_scale)[2][BN], int kt, int dc) const {
    if (dc == 0 && threadIdx.x < BN) {
      s_bias[kt & 1][threadIdx.x] = bias;
      s_scale[kt & 1][threadIdx.x] = scale;
    }
  }
};

// Element d of row `row` in fp32; zero past the last row or past D (SIMT operand tiles).
template <typename T>
__device__ __forceinline__ float load1_f32(const T* __restrict__ base, int64_t row, int64_t nrows, int d, int D) {
  return (row < nrows && d < D) ? to_f32(base[row * static_cast<int64_t>(D) + d]) : 0.f;
}

// The main loop of both kernels: K tiles [kt_begin, kt_end), each in `nchunks` D chunks,
// through two shared-memory buffers. load(kt, dc) fetches a chunk into registers,
// store(buf, kt, dc) parks it in buffer buf, compute(buf, kt, dc) consumes buffer buf.
// The global loads of chunk t+1 are in flight while chunk t is consumed. One barrier per
// chunk suffices: it orders this chunk's reads of buffer `buf` (and of the score terms of
// tile kt) before the next iteration's stores into them, and this iteration's stores into
// `buf ^ 1` before the next iteration's reads.
template <typename Load, typename Store, typename Compute>
__device__ __forceinline__ void double_buffered_k_tiles(int kt_begin, int kt_end, int nchunks, Load& load,
                                                        Store& store, Compute& compute) {
  int kt = kt_begin, dc = 0, buf = 0;
  load(kt, dc);
  store(buf, kt, dc);
  __syncthreads();
  while (true) {
    int nkt = kt, ndc = dc + 1;
    if (ndc == nchunks) {
      ndc = 0;
      ++nkt;
    }
    const bool has_next = nkt < kt_end;  // block-uniform
    if (has_next) load(nkt, ndc);        // global loads in flight during compute()
    compute(buf, kt, dc);
    if (has_next) store(buf ^ 1, nkt, ndc);
    __syncthreads();
    if (!has_next) break;
    kt = nkt;
    dc = ndc;
    buf ^= 1;
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core assignment. T is __half or __nv_bfloat16. Grid: (ceil(N / 128), splits, C);
// block (x, y, c) handles codebook c's rows [128 x, +128) and K tiles
// [y * tiles_per_split, min(+tiles_per_split, ceil(K / 128))).
// keys[C, N] must be preset to all-ones (the empty minimum) and is atomicMin-ed.
// Two blocks per SM (2 x 43 KB shared, <= 128 registers: ptxas fits it without spilling)
// so one block's global loads and argmin epilogue overlap the other's MMAs.
template <typename T>
__global__ void __launch_bounds__(assign_cfg::kMmaThreads, 2)
    assign_mma_kernel(const T* __restrict__ x, const T* __restrict__ codebook, const float* __restrict__ code_bias,
                      const float* __restrict__ code_scale, int64_t N, int K, int D, int tiles_per_split, int vec,
                      unsigned long long* __restrict__ keys) {
  using namespace assign_cfg;
  static_assert(kMmaThreads == 256 && kMmaBM * (kMmaBK / 8) == 2 * kMmaThreads, "loader assumes 2 slots/thread");
  static_assert(kMmaBN * (kMmaBK / 8) == 2 * kMmaThreads, "loader assumes 2 slots/thread");
  static_assert(kMmaBN <= kMmaThreads, "one thread per code loads the score terms");
  __shared__ __align__(16) uint16_t sA[2][kMmaBM][kMmaStride];
  __shared__ __align__(16) uint16_t sB[2][kMmaBN][kMmaStride];
  __shared__ float sBias[2][kMmaBN];
  __shared__ float sScale[2][kMmaBN];

  const AssignBlock<T, kMmaBM, kMmaBN> blk(x, codebook, code_bias, code_scale, keys, N, K, D, tiles_per_split);
  if (blk.kt_begin >= blk.kt_end) return;  // block-uniform
  const uint16_t* __restrict__ xs = reinterpret_cast<const uint16_t*>(blk.x);
  const uint16_t* __restrict__ cs = reinterpret_cast<const uint16_t*>(blk.codebook);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / kMmaWarpsN;
  const int wn = warp % kMmaWarpsN;
  const int64_t row0 = blk.row0;
  const int nchunks = (D + kMmaBK - 1) / kMmaBK;
  const bool vec_ok = vec != 0;

  // Prefetch registers: 2 x 16 bytes of x and of the codebook per thread, plus one code's
  // score terms for threads 0..127 at the first chunk of a K tile.
  uint4 ra[2], rb[2];
  CodeTermsStage<kMmaBN> terms;

  auto load_chunk = [&](int kt, int dc) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int slot = tid + i * kMmaThreads;
      const int r = slot >> 2;
      const int d = dc * kMmaBK + (slot & 3) * 8;
      ra[i] = load8_u16(xs, row0 + r, N, d, D, vec_ok);
      rb[i] = load8_u16(cs, static_cast<int64_t>(kt) * kMmaBN + r, K, d, D, vec_ok);
    }
    terms.load(blk.code_bias, blk.code_scale, K, kt, dc);
  };
  auto store_chunk = [&](int buf, int kt, int dc) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int slot = tid + i * kMmaThreads;
      const int r = slot >> 2;
      const int c = (slot & 3) * 8;
      *reinterpret_cast<uint4*>(&sA[buf][r][c]) = ra[i];
      *reinterpret_cast<uint4*>(&sB[buf][r][c]) = rb[i];
    }
    terms.store(sBias, sScale, kt, dc);
  };

  float acc[kMmaMT][kMmaNT][4];
  // Running minimum of the 4 rows this thread sees: (mi, h) -> row wm*32 + mi*16 + h*8 + lane/4.
  float best[kMmaMT][2];
  unsigned bidx[kMmaMT][2];
#pragma unroll
  for (int mi = 0; mi < kMmaMT; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      best[mi][h] = __int_as_float(0x7f800000);
      bidx[mi][h] = kNoCode;
    }
  }

  auto compute_chunk = [&](int buf, int kt, int dc) {
    if (dc == 0) {
#pragma unroll
      for (int mi = 0; mi < kMmaMT; ++mi)
#pragma unroll
        for (int ni = 0; ni < kMmaNT; ++ni)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.f;
    }

#pragma unroll
    for (int ks = 0; ks < kMmaBK / 16; ++ks) {
      uint32_t a[kMmaMT][4];
      uint32_t b[kMmaNT][2];
#pragma unroll
      for (int mi = 0; mi < kMmaMT; ++mi) {
        // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
        ldmatrix_x4(a[mi], &sA[buf][wm * kMmaWM + mi * 16 + (lane & 15)][ks * 16 + (lane >> 4) * 8]);
      }
#pragma unroll
      for (int nj = 0; nj < kMmaNT / 2; ++nj) {
        // matrices: (codes 0-7, k 0-7), (codes 0-7, k 8-15), (codes 8-15, k 0-7), (codes 8-15, k 8-15)
        uint32_t r[4];
        const int code_row = wn * kMmaWN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(r, &sB[buf][code_row][ks * 16 + ((lane >> 3) & 1) * 8]);
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < kMmaMT; ++mi)
#pragma unroll
        for (int ni = 0; ni < kMmaNT; ++ni) Mma16816<T>::run(acc[mi][ni], a[mi], b[ni]);
    }

    if (dc == nchunks - 1) {
      // Scores of this K tile -> running minimum. Accumulator j of n-tile ni holds
      // row (j < 2 ? g : g + 8), code ni*8 + 2*(lane%4) + (j&1): this thread visits its codes
      // in increasing order, so a strict `<` keeps the lowest index among its equal scores.
      const float* tb = sBias[kt & 1];
      const float* tsc = sScale[kt & 1];
#pragma unroll
      for (int ni = 0; ni < kMmaNT; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = wn * kMmaWN + ni * 8 + (lane & 3) * 2 + j;
          const float bs = tb[col];
          const float sc = tsc[col];
          const unsigned code = static_cast<unsigned>(kt * kMmaBN + col);
#pragma unroll
          for (int mi = 0; mi < kMmaMT; ++mi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float s = fmaf(-sc, acc[mi][ni][h * 2 + j], bs);
              if (s < best[mi][h]) {
                best[mi][h] = s;
                bidx[mi][h] = code;
              }
            }
          }
        }
      }
    }
  };

  double_buffered_k_tiles(blk.kt_begin, blk.kt_end, nchunks, load_chunk, store_chunk, compute_chunk);

  // The 4 lanes of a quad share rows: merge them, then one atomic per row per warp.
#pragma unroll
  for (int mi = 0; mi < kMmaMT; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = best[mi][h];
      unsigned i = bidx[mi][h];
      warp_argmin(v, i, 3);
      const int64_t row = row0 + wm * kMmaWM + mi * 16 + h * 8 + (lane >> 2);
      if ((lane & 3) == 0 && row < N && i != kNoCode) atomicMin(blk.keys + row, pack_argmin_key(v, i));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Register-tiled SIMT assignment (fp32 math for every input dtype). Same grid and key
// contract as assign_mma_kernel. One block per SM: the 8x8 tile plus its running minima and
// prefetch registers need ~200 registers; capping at 128 (two blocks) spills ~300 bytes.
template <typename T>
__global__ void __launch_bounds__(assign_cfg::kSimtThreads)
    assign_simt_kernel(const T* __restrict__ x, const T* __restrict__ codebook, const float* __restrict__ code_bias,
                       const float* __restrict__ code_scale, int64_t N, int K, int D, int tiles_per_split,
                       unsigned long long* __restrict__ keys) {
  using namespace assign_cfg;
  static_assert(kSimtThreads == 256 && kSimtBM * kSimtBK == 8 * kSimtThreads, "loader assumes 8 slots/thread");
  static_assert(kSimtBN * kSimtBK == 8 * kSimtThreads, "loader assumes 8 slots/thread");
  static_assert(kSimtBN <= kSimtThreads, "one thread per code loads the score terms");
  // Tiles are stored d-major (transposed) so a thread reads 4 consecutive rows/codes as a float4.
  __shared__ __align__(16) float sX[2][kSimtBK][kSimtStride];
  __shared__ __align__(16) float sC[2][kSimtBK][kSimtStride];
  __shared__ float sBias[2][kSimtBN];
  __shared__ float sScale[2][kSimtBN];

  const AssignBlock<T, kSimtBM, kSimtBN> blk(x, codebook, code_bias, code_scale, keys, N, K, D, tiles_per_split);
  if (blk.kt_begin >= blk.kt_end) return;  // block-uniform
  const int tid = threadIdx.x;
  const int tx = tid & 15;  // code group
  const int ty = tid >> 4;  // row group
  const int64_t row0 = blk.row0;
  const int nchunks = (D + kSimtBK - 1) / kSimtBK;

  float rx[8], rc[8];
  CodeTermsStage<kSimtBN> terms;

  // Slot s of 2048: element (r = s / 16, d = s % 16); a warp reads 2 rows x 16 consecutive d.
  auto load_chunk = [&](int kt, int dc) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int slot = tid + i * kSimtThreads;
      const int r = slot >> 4;
      const int d = dc * kSimtBK + (slot & 15);
      rx[i] = load1_f32(blk.x, row0 + r, N, d, D);
      rc[i] = load1_f32(blk.codebook, static_cast<int64_t>(kt) * kSimtBN + r, K, d, D);
    }
    terms.load(blk.code_bias, blk.code_scale, K, kt, dc);
  };
  auto store_chunk = [&](int b, int kt, int dc) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int slot = tid + i * kSimtThreads;
      sX[b][slot & 15][slot >> 4] = rx[i];
      sC[b][slot & 15][slot >> 4] = rc[i];
    }
    terms.store(sBias, sScale, kt, dc);
  };

  float acc[8][8];
  float best[8];
  unsigned bidx[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best[i] = __int_as_float(0x7f800000);
    bidx[i] = kNoCode;
  }

  auto compute_chunk = [&](int buf, int kt, int dc) {
    if (dc == 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }

#pragma unroll
    for (int k = 0; k < kSimtBK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(&sX[buf][k][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&sX[buf][k][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&sC[buf][k][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&sC[buf][k][64 + tx * 4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }

    if (dc == nchunks - 1) {
      const float* tb = sBias[kt & 1];
      const float* tsc = sScale[kt & 1];
      // j runs over codes tx*4 + 0..3, then 64 + tx*4 + 0..3: increasing, so strict `<`
      // keeps the lowest index among this thread's equal scores.
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = (j < 4) ? (tx * 4 + j) : (64 + tx * 4 + (j - 4));
        const float bs = tb[col];
        const float sc = tsc[col];
        const unsigned code = static_cast<unsigned>(kt * kSimtBN + col);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float s = fmaf(-sc, acc[i][j], bs);
          if (s < best[i]) {
            best[i] = s;
            bidx[i] = code;
          }
        }
      }
    }
  };

  double_buffered_k_tiles(blk.kt_begin, blk.kt_end, nchunks, load_chunk, store_chunk, compute_chunk);

  // The 16 lanes of a half-warp (same ty) share rows: merge, then one atomic per row.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float v = best[i];
    unsigned idx = bidx[i];
    warp_argmin(v, idx, 15);
    const int64_t row = row0 + ((i < 4) ? (ty * 4 + i) : (64 + ty * 4 + (i - 4)));
    if (tx == 0 && row < N && idx != kNoCode) atomicMin(blk.keys + row, pack_argmin_key(v, idx));
  }
}

// ---------------------------------------------------------------------------------------
// Unpack the winner of each row and recompute its exact fp32 distance (one warp per row,
// over all C * N rows; row r belongs to codebook r / N). A row whose key holds no valid
// code (a NaN/Inf row: no score compared below +inf) gets code 0 so the read stays in
// bounds; the public op then reports such rows as -1 / NaN. indices are per codebook.
template <typename T>
__global__ void __launch_bounds__(256)
    assign_finalize_kernel(const T* __restrict__ x, const T* __restrict__ codebook,
                           const unsigned long long* __restrict__ keys, int64_t N, int64_t rows, int K, int D,
                           int metric, int64_t* __restrict__ indices, float* __restrict__ distances) {
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const unsigned ki = key_index(keys[row]);
    const int64_t k = ki < static_cast<unsigned>(K) ? static_cast<int64_t>(ki) : 0;
    const T* xr = x + row * static_cast<int64_t>(D);
    const T* cr = codebook + ((row / N) * K + k) * static_cast<int64_t>(D);
    float s0 = 0.f, s1 = 0.f, s2 = 0.f;
    for (int d = lane; d < D; d += 32) {
      const float xv = to_f32(xr[d]);
      const float cv = to_f32(cr[d]);
      if (metric == kL2) {
        const float diff = xv - cv;
        s0 = fmaf(diff, diff, s0);
      } else {
        s0 = fmaf(xv, cv, s0);
        s1 = fmaf(xv, xv, s1);
        s2 = fmaf(cv, cv, s2);
      }
    }
    s0 = warp_sum(s0);
    if (metric == kCosine) {
      s1 = warp_sum(s1);
      s2 = warp_sum(s2);
    }
    if (lane == 0) {
      float dist;
      if (metric == kL2) {
        dist = s0;
      } else if (metric == kCosine) {
        dist = 1.f - s0 / (fmaxf(sqrtf(s1), kNormEps) * fmaxf(sqrtf(s2), kNormEps));
      } else {
        dist = -s0;
      }
      indices[row] = k;
      distances[row] = dist;
    }
  }
}

}  // namespace vqk
