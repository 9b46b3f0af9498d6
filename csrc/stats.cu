// Launchers for histogram, cluster statistics and the EMA update (all dtype combinations).
#include <type_traits>

#include <cuda_runtime.h>

#include "kernels/histogram.cuh"
#include "kernels/stats.cuh"
#include "launch.h"

namespace vqk {
namespace {

// Static shared-memory budget of the privatised histogram (no opt-in needed on any arch):
// K <= 12288 codes (4-byte bins).
constexpr size_t kHistSmemBytes = 48 * 1024;

unsigned capped_blocks(int64_t need, int64_t per_sm, const DeviceInfo& dev) {
  const int64_t cap = static_cast<int64_t>(dev.num_sms > 0 ? dev.num_sms : 1) * per_sm;
  if (need < 1) need = 1;
  return static_cast<unsigned>(need < cap ? need : cap);
}

// 2^p threads per row, the smallest power of two >= D, at most a warp.
int tpr_log2_for(int64_t D) {
  int p = 0;
  while (p < 5 && (int64_t{1} << p) < D) ++p;
  return p;
}

template <typename IndexT, typename W, typename OutT>
cudaError_t launch_histogram_typed(const HistogramArgs& a) {
  const IndexT* idx = static_cast<const IndexT*>(a.indices);
  const W* w = static_cast<const W*>(a.weights);
  OutT* out = static_cast<OutT*>(a.out);
  const int K = static_cast<int>(a.K);
  const size_t smem = static_cast<size_t>(a.K) * sizeof(typename HistAcc<W>::type);
  if (smem <= kHistSmemBytes) {
    // Few blocks, many rows each: every block pays O(K) to clear and flush its private copy.
    const unsigned blocks = capped_blocks((a.N + 256 * 8 - 1) / (256 * 8), 2, a.dev);
    histogram_shared_kernel<IndexT, W, OutT><<<blocks, 256, smem, a.stream>>>(idx, w, a.N, K, out);
  } else {
    const unsigned blocks = capped_blocks((a.N + 255) / 256, 8, a.dev);
    histogram_global_kernel<IndexT, W, OutT><<<blocks, 256, 0, a.stream>>>(idx, w, a.N, K, out);
  }
  return cudaGetLastError();
}

template <typename IndexT, typename W>
cudaError_t launch_histogram_out(const HistogramArgs& a) {
  if constexpr (std::is_same<W, NoWeight>::value) {
    if (!a.out_float) return launch_histogram_typed<IndexT, W, unsigned long long>(a);
  }
  return launch_histogram_typed<IndexT, W, float>(a);
}

template <typename IndexT>
cudaError_t launch_histogram_index(const HistogramArgs& a) {
  if (a.weights == nullptr) return launch_histogram_out<IndexT, NoWeight>(a);
  switch (a.weight_kind) {
    case Scalar::kHalf:
      return launch_histogram_out<IndexT, __half>(a);
    case Scalar::kBFloat16:
      return launch_histogram_out<IndexT, __nv_bfloat16>(a);
    case Scalar::kFloat:
      return launch_histogram_out<IndexT, float>(a);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T, typename IndexT>
cudaError_t launch_cluster_sums_atomic(const ClusterStatsArgs& a) {
  const int tpr_log2 = tpr_log2_for(a.D);
  const int64_t rows_per_block = 256 >> tpr_log2;
  const unsigned blocks = capped_blocks((a.N + rows_per_block - 1) / rows_per_block, 8, a.dev);
  cluster_sums_atomic_kernel<T, IndexT><<<blocks, 256, 0, a.stream>>>(
      static_cast<const T*>(a.x), static_cast<const IndexT*>(a.indices), a.N, static_cast<int>(a.K),
      static_cast<int>(a.D), tpr_log2, a.sums);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_cluster_sums_atomic_x(const ClusterStatsArgs& a) {
  return a.index_kind == Index::kInt32 ? launch_cluster_sums_atomic<T, int32_t>(a)
                                       : launch_cluster_sums_atomic<T, int64_t>(a);
}

template <typename T>
cudaError_t launch_segment_sums(const ClusterStatsArgs& a) {
  const unsigned blocks = capped_blocks(a.K, 16, a.dev);
  segment_sums_kernel<T><<<blocks, kSegWarps * 32, 0, a.stream>>>(static_cast<const T*>(a.x), a.order, a.starts,
                                                                  static_cast<int>(a.K), static_cast<int>(a.D),
                                                                  a.counts, a.sums);
  return cudaGetLastError();
}

template <typename S, typename T>
cudaError_t launch_ema_typed(const EmaArgs& a) {
  const int K = static_cast<int>(a.K);
  ema_sizes_kernel<S><<<static_cast<unsigned>(a.H), kEmaSizeThreads, 0, a.stream>>>(
      static_cast<S*>(a.cluster_size), static_cast<const S*>(a.counts), K, a.decay, a.n);
  const int tpr_log2 = tpr_log2_for(a.D);
  const int64_t rows = a.H * a.K;
  const int64_t rows_per_block = 256 >> tpr_log2;
  const unsigned blocks = capped_blocks((rows + rows_per_block - 1) / rows_per_block, 8, a.dev);
  ema_embed_kernel<S, T><<<blocks, 256, 0, a.stream>>>(
      static_cast<S*>(a.embed_avg), static_cast<const S*>(a.sums), static_cast<const S*>(a.cluster_size), a.n,
      static_cast<T*>(a.codebook), rows, K, static_cast<int>(a.D), tpr_log2, a.decay, a.eps);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_ema_stats(const EmaArgs& a) {
  switch (a.codebook_kind) {
    case Scalar::kHalf:
      return launch_ema_typed<S, __half>(a);
    case Scalar::kBFloat16:
      return launch_ema_typed<S, __nv_bfloat16>(a);
    case Scalar::kFloat:
      return launch_ema_typed<S, float>(a);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t histogram(const HistogramArgs& a) {
  if (a.N == 0) return cudaSuccess;
  return a.index_kind == Index::kInt32 ? launch_histogram_index<int32_t>(a) : launch_histogram_index<int64_t>(a);
}

cudaError_t cluster_stats_atomic(const ClusterStatsArgs& a) {
  if (a.N == 0) return cudaSuccess;
  HistogramArgs h{a.indices, a.index_kind, nullptr, Scalar::kFloat, a.N, a.K, a.counts, /*out_float=*/true,
                  a.dev,     a.stream};
  cudaError_t err = histogram(h);
  if (err != cudaSuccess) return err;
  switch (a.x_kind) {
    case Scalar::kHalf:
      return launch_cluster_sums_atomic_x<__half>(a);
    case Scalar::kBFloat16:
      return launch_cluster_sums_atomic_x<__nv_bfloat16>(a);
    case Scalar::kFloat:
      return launch_cluster_sums_atomic_x<float>(a);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t cluster_stats_sorted(const ClusterStatsArgs& a) {
  const int K = static_cast<int>(a.K);
  const unsigned blocks = capped_blocks((a.N + 1 + 255) / 256, 8, a.dev);
  if (a.index_kind == Index::kInt32) {
    segment_starts_kernel<int32_t><<<blocks, 256, 0, a.stream>>>(static_cast<const int32_t*>(a.indices), a.N, K,
                                                                 a.starts);
  } else {
    segment_starts_kernel<int64_t><<<blocks, 256, 0, a.stream>>>(static_cast<const int64_t*>(a.indices), a.N, K,
                                                                 a.starts);
  }
  switch (a.x_kind) {
    case Scalar::kHalf:
      return launch_segment_sums<__half>(a);
    case Scalar::kBFloat16:
      return launch_segment_sums<__nv_bfloat16>(a);
    case Scalar::kFloat:
      return launch_segment_sums<float>(a);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t ema_update(const EmaArgs& a) {
  if (a.H == 0 || a.K == 0) return cudaSuccess;
  switch (a.stats_kind) {
    case Scalar::kFloat:
      return launch_ema_stats<float>(a);
    case Scalar::kDouble:
      return launch_ema_stats<double>(a);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace vqk
