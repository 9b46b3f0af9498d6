// Per-code cluster statistics and the fused EMA codebook update.
//
// The codebook axis: C independent codebooks of K codes. x is [C, N, D], indices [C, N]
// (per-codebook codes), counts [C, K], sums [C, K, D]; all contiguous. Row r of the
// flattened [C * N] rows belongs to codebook r / N.
//
// cluster_stats: counts[c, k] = #{n : idx[c, n] == k}, sums[c, k, :] = sum of x[c, n, :]
// over those rows (masked rows, idx < 0, ignored), fp32 accumulation.
//   * atomic:        cluster_sums_atomic_kernel scatters fp32 atomicAdds (fast; the order of
//                    the additions, hence the last bits, depends on scheduling). Counts come
//                    from the histogram kernel.
//   * deterministic: segment_keys_kernel turns (c, idx) into one sort key per row,
//                    c * (K + 1) + idx, with masked rows in each codebook's extra bin K; the
//                    host stable-sorts the keys (torch.sort(stable=True) in the glue);
//                    segment_starts_kernel finds where each bin's run begins, and
//                    segment_sums_kernel sums each run in a fixed order and writes each
//                    sums[c, k, d] exactly once: no float atomics, bitwise reproducible.
//                    Long runs are summed in fixed chunks by segment_chunk_sums_kernel
//                    first, so a collapsed codebook does not serialise on one block.
// ema_update (per codebook c of C, K codes, D features):
//     cluster_size = decay * cluster_size + (1 - decay) * counts
//     embed_avg    = decay * embed_avg    + (1 - decay) * sums
//     n            = sum_k cluster_size
//     smoothed     = (cluster_size + eps) / (n + K * eps) * n
//     codebook     = embed_avg / smoothed[:, None]
//   ema_sizes_kernel updates the sizes and reduces n per codebook (fixed order, fp64), then
//   ema_embed_kernel updates embed_avg and writes the codebook in one pass.
#pragma once

#include "common.cuh"

namespace vqk {

// "Row group" mapping used by the row-wise kernels: 2^tpr_log2 threads per row (a power of
// two <= 32, chosen >= D where possible so short rows do not idle most of a warp), so a
// block of B threads covers B >> tpr_log2 rows at a time.

// Over all C * N rows; sums[C, K, D] must be zeroed. Indices >= K (rejected by the
// caller) are skipped.
template <typename T, typename IndexT>
__global__ void __launch_bounds__(256)
    cluster_sums_atomic_kernel(const T* __restrict__ x, const IndexT* __restrict__ indices, int64_t N, int64_t rows,
                               int K, int D, int tpr_log2, float* __restrict__ sums) {
  const int tpr = 1 << tpr_log2;
  const int sub = threadIdx.x >> tpr_log2;
  const int lane = threadIdx.x & (tpr - 1);
  const int rows_per_block = blockDim.x >> tpr_log2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + sub; row < rows; row += stride) {
    const int64_t k = static_cast<int64_t>(indices[row]);
    if (k < 0 || k >= K) continue;
    const T* xr = x + row * static_cast<int64_t>(D);
    float* sr = sums + ((row / N) * K + k) * static_cast<int64_t>(D);
    for (int d = lane; d < D; d += tpr) atomicAdd(sr + d, to_f32(xr[d]));
  }
}

// Sort keys of the deterministic path, one per row of indices [C, N]: row r of codebook
// c = r / N gets c * (K + 1) + idx, or c * (K + 1) + K when masked (idx < 0; and idx >= K,
// which the caller rejects, so it can never index out of bounds). Sorting the keys groups
// the rows by (codebook, code) in one 1-D sort; each codebook's masked rows form a run of
// their own that no code reads.
template <typename IndexT>
__global__ void __launch_bounds__(256)
    segment_keys_kernel(const IndexT* __restrict__ indices, int64_t N, int64_t rows, int K,
                        int64_t* __restrict__ keys) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    const int64_t k = static_cast<int64_t>(indices[r]);
    keys[r] = (r / N) * (K + 1) + ((k < 0 || k >= K) ? K : k);
  }
}

// starts[bins + 1]: starts[b] = first position p of the sorted keys with sorted[p] >= b
// (starts[bins] = rows). Position p writes starts[b] for every b in (sorted[p-1],
// sorted[p]], with sorted[-1] read as -1 and sorted[rows] as bins: the sorted sequence is
// monotone and every key is in [0, bins), so every b in [0, bins] is written exactly once.
__global__ void __launch_bounds__(256)
    segment_starts_kernel(const int64_t* __restrict__ sorted, int64_t rows, int64_t bins,
                          int64_t* __restrict__ starts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p <= rows; p += stride) {
    const int64_t prev = p == 0 ? -1 : sorted[p - 1];
    const int64_t cur = p == rows ? bins : sorted[p];
    for (int64_t b = prev + 1; b <= cur; ++b) starts[b] = p;
  }
}

// The deterministic sums of long runs do not serialise on one block: the sorted positions
// are cut into fixed chunks of kSegChunkRows, segment_chunk_sums_kernel sums every chunk
// that lies within one code's run (many blocks in parallel), and segment_sums_kernel's block
// for that code adds the chunk sums in chunk order to the < 2 * kSegChunkRows rows of its
// run's ragged ends. A code that took most of a batch (codebook collapse) costs one block
// about L / kSegChunkRows additions per feature instead of L row reads.
constexpr int kSegWarps = 8;

// One column of the warps' partial sums, added in warp order (a fixed order: bitwise repeatable).
__device__ __forceinline__ float sum_warp_parts(const float (&part)[kSegWarps][32], int lane) {
  float s = part[0][lane];
#pragma unroll
  for (int w = 1; w < kSegWarps; ++w) s += part[w][lane];
  return s;
}
constexpr int kSegChunkRows = 256;

// Pass 1, one block per chunk j of sorted positions [j * kSegChunkRows, +kSegChunkRows)
// (whole chunks only): where all its keys are one unmasked code, chunk_sums[j, d] = the sum
// of its rows (warp w sums positions w, w + 8, ... of the chunk, then warp 0 adds the 8
// partials in warp order). Other chunks are skipped: pass 2 never reads them. Keys are
// sorted, so the first and last key decide.
template <typename T>
__global__ void __launch_bounds__(kSegWarps * 32, 4)
    segment_chunk_sums_kernel(const T* __restrict__ x, const int64_t* __restrict__ order,
                              const int64_t* __restrict__ sorted, int64_t rows, int K, int D,
                              float* __restrict__ chunk_sums) {
  __shared__ float part[kSegWarps][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t chunks = rows / kSegChunkRows;
  for (int64_t j = blockIdx.x; j < chunks; j += gridDim.x) {
    const int64_t p0 = j * kSegChunkRows;
    const int64_t key = sorted[p0];
    if (sorted[p0 + kSegChunkRows - 1] != key || key % (K + 1) == K) continue;  // block-uniform
    for (int d0 = 0; d0 < D; d0 += 32) {
      const int d = d0 + lane;
      float acc = 0.f;
      if (d < D) {
        for (int r = warp; r < kSegChunkRows; r += kSegWarps) {
          acc += to_f32(x[order[p0 + r] * static_cast<int64_t>(D) + d]);
        }
      }
      part[warp][lane] = acc;
      __syncthreads();
      if (warp == 0 && d < D) {
        chunk_sums[j * D + d] = sum_warp_parts(part, lane);
      }
      __syncthreads();  // part[] is rewritten by the next slice / chunk
    }
  }
}

// Pass 2, one block (8 warps) per code, grid-stride over the C * (K + 1) bins of the sort
// keys (bin b is code b % (K + 1) of codebook b / (K + 1); the last bin of each codebook
// holds its masked rows and is skipped). A run [begin, end) holds the whole chunks
// [first, last) (pass 1's sums) and its ragged ends [begin, first * R) and [last * R, end)
// (R = kSegChunkRows; a run with no whole chunk is all ragged end). For each 32-wide slice of
// D (lane = feature), warp w sums the ragged-end rows at positions w, w + 8, ... of each end,
// then the chunk sums first + w, first + w + 8, ...; warp 0 adds the 8 partials in warp order
// and writes sums[c, k, d] once. The partition depends only on the data, never on
// scheduling: the result is bitwise reproducible. `order` maps sorted position -> flattened
// row of x [C * N, D]. counts/sums need not be initialised. (min 3 blocks/SM: with no
// minimum ptxas picked 32 registers and spilled on sm_80, and at 4 (64 registers) the
// ragged-end bounds spill 16 / 28 bytes there.)
template <typename T>
__global__ void __launch_bounds__(kSegWarps * 32, 3)
    segment_sums_kernel(const T* __restrict__ x, const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                        const float* __restrict__ chunk_sums, int64_t bins, int K, int D, float* __restrict__ counts,
                        float* __restrict__ sums) {
  __shared__ float part[kSegWarps][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t b = blockIdx.x; b < bins; b += gridDim.x) {
    const int64_t c = b / (K + 1);
    if (b - c * (K + 1) == K) continue;  // masked rows: block-uniform
    const int64_t out = b - c;           // = c * K + code
    const int64_t begin = starts[b];
    const int64_t end = starts[b + 1];
    if (threadIdx.x == 0) counts[out] = static_cast<float>(end - begin);
    int64_t first = (begin + kSegChunkRows - 1) / kSegChunkRows;
    int64_t last = end / kSegChunkRows;
    const bool chunked = first < last;  // else no whole chunk: all of [begin, end) is read directly
    const int64_t head_end = chunked ? first * kSegChunkRows : end;
    const int64_t tail_begin = chunked ? last * kSegChunkRows : end;
    if (!chunked) last = first;
    for (int d0 = 0; d0 < D; d0 += 32) {
      const int d = d0 + lane;
      float acc = 0.f;
      if (d < D) {
        for (int64_t p = begin + warp; p < head_end; p += kSegWarps) {
          acc += to_f32(x[order[p] * static_cast<int64_t>(D) + d]);
        }
        for (int64_t p = tail_begin + warp; p < end; p += kSegWarps) {
          acc += to_f32(x[order[p] * static_cast<int64_t>(D) + d]);
        }
        for (int64_t j = first + warp; j < last; j += kSegWarps) acc += chunk_sums[j * D + d];
      }
      part[warp][lane] = acc;
      __syncthreads();
      if (warp == 0 && d < D) {
        sums[out * D + d] = sum_warp_parts(part, lane);
      }
      __syncthreads();  // part[] is rewritten by the next slice / code
    }
  }
}

// One block per codebook: cluster_size[c, :] <- decay * cluster_size + (1 - decay) * counts,
// and n[c] = the sum of the updated sizes (fp64, reduced in a fixed order). S: float or double.
constexpr int kEmaSizeThreads = 1024;

template <typename S>
__global__ void __launch_bounds__(kEmaSizeThreads)
    ema_sizes_kernel(S* __restrict__ cluster_size, const S* __restrict__ counts, int K, double decay,
                     double* __restrict__ n_out) {
  __shared__ double warp_totals[kEmaSizeThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * K;
  const S dec = static_cast<S>(decay);
  const S w = static_cast<S>(1.0 - decay);
  double local = 0.0;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const S v = dec * cluster_size[base + k] + w * counts[base + k];
    cluster_size[base + k] = v;
    local += to_f64(v);
  }
  local = warp_sum(local);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  if (lane == 0) warp_totals[warp] = local;
  __syncthreads();
  if (warp == 0) {
    double t = lane < nwarps ? warp_totals[lane] : 0.0;
    t = warp_sum(t);
    if (lane == 0) n_out[blockIdx.x] = t;
  }
}

// embed_avg <- decay * embed_avg + (1 - decay) * sums; codebook <- embed_avg / smoothed,
// over the K rows of D of codebook blockIdx.y (row groups as above; grid: (blocks per
// codebook, C)). Needs ema_sizes_kernel's cluster_size and n. The codebook comes from the
// grid rather than from row / K, a 64-bit division (a called subroutine) per row.
// (min 4 blocks/SM: without it ptxas aimed at 32 registers and spilled around the call
// into the IEEE division's slow path.)
template <typename S, typename T>
__global__ void __launch_bounds__(256, 4)
    ema_embed_kernel(S* __restrict__ embed_avg, const S* __restrict__ sums, const S* __restrict__ cluster_size,
                     const double* __restrict__ n, T* __restrict__ codebook, int K, int D, int tpr_log2, double decay,
                     double eps) {
  const int tpr = 1 << tpr_log2;
  const int sub = threadIdx.x >> tpr_log2;
  const int lane = threadIdx.x & (tpr - 1);
  const int rows_per_block = blockDim.x >> tpr_log2;
  const S dec = static_cast<S>(decay);
  const S w = static_cast<S>(1.0 - decay);
  const int64_t c = blockIdx.y;
  const double nh = n[c];
  const double denom = nh + static_cast<double>(K) * eps;
  embed_avg += c * K * D;
  sums += c * K * D;
  codebook += c * K * D;
  cluster_size += c * K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * rows_per_block + sub; k < K; k += stride) {
    // Laplace smoothing in fp64: one value per row, and n + K * eps must not lose eps.
    const S smoothed = static_cast<S>((to_f64(cluster_size[k]) + eps) / denom * nh);
    const int64_t off = k * D;
    for (int d = lane; d < D; d += tpr) {
      const S v = dec * embed_avg[off + d] + w * sums[off + d];
      embed_avg[off + d] = v;
      codebook[off + d] = Store<T>::from(v / smoothed);
    }
  }
}

}  // namespace vqk
