// Per-code cluster statistics and the fused EMA codebook update.
//
// cluster_stats: counts[k] = #{n : idx[n] == k}, sums[k, :] = sum of x[n, :] over those rows
// (masked rows, idx < 0, ignored), fp32 accumulation.
//   * atomic:        cluster_sums_atomic_kernel scatters fp32 atomicAdds (fast; the order of
//                    the additions, hence the last bits, depends on scheduling). Counts come
//                    from the histogram kernel.
//   * deterministic: the host stable-sorts the indices (torch.sort(stable=True) in the glue),
//                    segment_starts_kernel finds where each code's run begins, and
//                    segment_sums_kernel sums each run in a fixed order and writes each
//                    sums[k, d] exactly once: no float atomics, bitwise reproducible.
// ema_update (per head h of H, K codes, D features):
//     cluster_size = decay * cluster_size + (1 - decay) * counts
//     embed_avg    = decay * embed_avg    + (1 - decay) * sums
//     n            = sum_k cluster_size
//     smoothed     = (cluster_size + eps) / (n + K * eps) * n
//     codebook     = embed_avg / smoothed[:, None]
//   ema_sizes_kernel updates the sizes and reduces n per head (fixed order, fp64), then
//   ema_embed_kernel updates embed_avg and writes the codebook in one pass.
#pragma once

#include "common.cuh"

namespace vqk {

// "Row group" mapping used by the row-wise kernels: 2^tpr_log2 threads per row (a power of
// two <= 32, chosen >= D where possible so short rows do not idle most of a warp), so a
// block of B threads covers B >> tpr_log2 rows at a time.

// sums[K, D] must be zeroed. Indices >= K (rejected by the caller) are skipped.
template <typename T, typename IndexT>
__global__ void __launch_bounds__(256)
    cluster_sums_atomic_kernel(const T* __restrict__ x, const IndexT* __restrict__ indices, int64_t N, int K,
                               int D, int tpr_log2, float* __restrict__ sums) {
  const int tpr = 1 << tpr_log2;
  const int sub = threadIdx.x >> tpr_log2;
  const int lane = threadIdx.x & (tpr - 1);
  const int rows_per_block = blockDim.x >> tpr_log2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + sub; row < N; row += stride) {
    const int64_t k = static_cast<int64_t>(indices[row]);
    if (k < 0 || k >= K) continue;
    const T* xr = x + row * static_cast<int64_t>(D);
    float* sr = sums + k * static_cast<int64_t>(D);
    for (int d = lane; d < D; d += tpr) atomicAdd(sr + d, to_f32(xr[d]));
  }
}

// starts[K + 1]: starts[k] = first position p of the sorted indices with sorted[p] >= k
// (starts[K] = N). Negative (masked) indices sort first and belong to no code. Position p
// writes starts[k] for every k in (clamp(sorted[p-1]), clamp(sorted[p])], with sorted[-1]
// read as -1 and sorted[N] as K: the sorted sequence is monotone, so every k in [0, K] is
// written exactly once.
template <typename IndexT>
__global__ void __launch_bounds__(256)
    segment_starts_kernel(const IndexT* __restrict__ sorted, int64_t N, int K, int64_t* __restrict__ starts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p <= N; p += stride) {
    int64_t prev = p == 0 ? -1 : static_cast<int64_t>(sorted[p - 1]);
    int64_t cur = p == N ? static_cast<int64_t>(K) : static_cast<int64_t>(sorted[p]);
    prev = prev < 0 ? -1 : (prev > K ? K : prev);
    cur = cur < 0 ? -1 : (cur > K ? K : cur);
    for (int64_t k = prev + 1; k <= cur; ++k) starts[k] = p;
  }
}

// One block (8 warps) per code, grid-stride over codes. For each 32-wide slice of D, warp w
// sums the rows at run positions start + w, start + w + 8, ... in that order (lane = feature),
// then warp 0 adds the 8 partials in warp order and writes sums[k, d] once. The partition
// depends only on the data, never on scheduling: the result is bitwise reproducible.
// `order` maps sorted position -> row of x. counts/sums need not be initialised.
// (min 4 blocks/SM: without it ptxas picked 32 registers and spilled on sm_80.)
constexpr int kSegWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kSegWarps * 32, 4)
    segment_sums_kernel(const T* __restrict__ x, const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                        int K, int D, float* __restrict__ counts, float* __restrict__ sums) {
  __shared__ float part[kSegWarps][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int k = blockIdx.x; k < K; k += gridDim.x) {
    const int64_t begin = starts[k];
    const int64_t end = starts[k + 1];
    if (threadIdx.x == 0) counts[k] = static_cast<float>(end - begin);
    for (int d0 = 0; d0 < D; d0 += 32) {
      const int d = d0 + lane;
      float acc = 0.f;
      if (d < D) {
        for (int64_t p = begin + warp; p < end; p += kSegWarps) {
          acc += to_f32(x[order[p] * static_cast<int64_t>(D) + d]);
        }
      }
      part[warp][lane] = acc;
      __syncthreads();
      if (warp == 0 && d < D) {
        float s = part[0][lane];
#pragma unroll
        for (int w = 1; w < kSegWarps; ++w) s += part[w][lane];
        sums[static_cast<int64_t>(k) * D + d] = s;
      }
      __syncthreads();  // part[] is rewritten by the next slice / code
    }
  }
}

// One block per head: cluster_size[h, :] <- decay * cluster_size + (1 - decay) * counts, and
// n[h] = the sum of the updated sizes (fp64, reduced in a fixed order). S: float or double.
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
// over H * K rows of D (row groups as above). Needs ema_sizes_kernel's cluster_size and n.
template <typename S, typename T>
__global__ void __launch_bounds__(256)
    ema_embed_kernel(S* __restrict__ embed_avg, const S* __restrict__ sums, const S* __restrict__ cluster_size,
                     const double* __restrict__ n, T* __restrict__ codebook, int64_t rows, int K, int D,
                     int tpr_log2, double decay, double eps) {
  const int tpr = 1 << tpr_log2;
  const int sub = threadIdx.x >> tpr_log2;
  const int lane = threadIdx.x & (tpr - 1);
  const int rows_per_block = blockDim.x >> tpr_log2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  const S dec = static_cast<S>(decay);
  const S w = static_cast<S>(1.0 - decay);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + sub; row < rows; row += stride) {
    const double nh = n[row / K];
    // Laplace smoothing in fp64: one value per row, and n + K * eps must not lose eps.
    const S smoothed = static_cast<S>((to_f64(cluster_size[row]) + eps) / (nh + static_cast<double>(K) * eps) * nh);
    const int64_t off = row * static_cast<int64_t>(D);
    for (int d = lane; d < D; d += tpr) {
      const S v = dec * embed_avg[off + d] + w * sums[off + d];
      embed_avg[off + d] = v;
      codebook[off + d] = Store<T>::from(v / smoothed);
    }
  }
}

}  // namespace vqk
