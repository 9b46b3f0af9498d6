// Launchers for histogram, cluster statistics and the EMA update (all dtype combinations).
// Every op handles its C codebooks in one launch per kernel: a grid axis (histogram) or
// the flattened C * N rows / C * K codes (the rest).
#include <type_traits>

#include <cuda_runtime.h>

#include "kernels/histogram.cuh"
#include "kernels/stats.cuh"
#include "launch.h"

namespace vqk {
static_assert(kSegChunkRows == kSegmentChunkRows, "the glue sizes the chunk-sums workspace with launch.h's constant");
namespace {

// Static shared-memory budget of the privatised histogram (no opt-in needed on any arch):
// K <= 12288 codes (4-byte bins).
constexpr size_t kHistSmemBytes = 48 * 1024;

constexpr unsigned kThreads = 256;

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) for the element type T of a kernel input: float16, bfloat16 or float32.
template <typename F>
cudaError_t with_float_type(Scalar kind, F&& f) {
  switch (kind) {
    case Scalar::kHalf:
      return f(Tag<__half>{});
    case Scalar::kBFloat16:
      return f(Tag<__nv_bfloat16>{});
    case Scalar::kFloat:
      return f(Tag<float>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// f(Tag<IndexT>{}) for code indices: int32 or int64.
template <typename F>
cudaError_t with_index_type(Index kind, F&& f) {
  return kind == Index::kInt32 ? f(Tag<int32_t>{}) : f(Tag<int64_t>{});
}

// `need` blocks, but at least 1 and at most `cap`.
unsigned clamp_blocks(int64_t need, int64_t cap) {
  if (cap < 1) cap = 1;
  if (need < 1) need = 1;
  return static_cast<unsigned>(need < cap ? need : cap);
}

int64_t sms(const DeviceInfo& dev) { return dev.num_sms > 0 ? dev.num_sms : 1; }

unsigned capped_blocks(int64_t need, int64_t per_sm, const DeviceInfo& dev) {
  return clamp_blocks(need, sms(dev) * per_sm);
}

// Blocks per codebook when grid.y is the codebook axis: `need` for one codebook, with the
// whole grid capped as capped_blocks caps one, but at least one block per codebook.
unsigned blocks_per_codebook(int64_t need, int64_t C, int64_t per_sm, const DeviceInfo& dev) {
  return clamp_blocks(need, sms(dev) * per_sm / C);
}

// Grid-stride blocks for `items` items of `per_block` each, at most per_sm blocks per SM.
unsigned stride_blocks(int64_t items, int64_t per_block, int64_t per_sm, const DeviceInfo& dev) {
  return capped_blocks((items + per_block - 1) / per_block, per_sm, dev);
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
    const dim3 grid(blocks_per_codebook((a.N + kThreads * 8 - 1) / (kThreads * 8), a.C, 2, a.dev),
                    static_cast<unsigned>(a.C));
    histogram_shared_kernel<IndexT, W, OutT><<<grid, kThreads, smem, a.stream>>>(idx, w, a.N, K, out);
  } else {
    const dim3 grid(blocks_per_codebook((a.N + kThreads - 1) / kThreads, a.C, 8, a.dev), static_cast<unsigned>(a.C));
    histogram_global_kernel<IndexT, W, OutT><<<grid, kThreads, 0, a.stream>>>(idx, w, a.N, K, out);
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
  return with_float_type(a.weight_kind, [&](auto w) {
    return launch_histogram_out<IndexT, typename decltype(w)::type>(a);
  });
}

template <typename T, typename IndexT>
cudaError_t launch_cluster_sums_atomic(const ClusterStatsArgs& a) {
  const int tpr_log2 = tpr_log2_for(a.D);
  const int64_t rows = a.C * a.N;
  cluster_sums_atomic_kernel<T, IndexT><<<stride_blocks(rows, kThreads >> tpr_log2, 8, a.dev), kThreads, 0, a.stream>>>(
      static_cast<const T*>(a.x), static_cast<const IndexT*>(a.indices), a.N, rows, static_cast<int>(a.K),
      static_cast<int>(a.D), tpr_log2, a.sums);
  return cudaGetLastError();
}

template <typename S, typename T>
cudaError_t launch_ema_typed(const EmaArgs& a) {
  const int K = static_cast<int>(a.K);
  ema_sizes_kernel<S><<<static_cast<unsigned>(a.C), kEmaSizeThreads, 0, a.stream>>>(
      static_cast<S*>(a.cluster_size), static_cast<const S*>(a.counts), K, a.decay, a.n);
  const int tpr_log2 = tpr_log2_for(a.D);
  const int64_t rows_per_block = kThreads >> tpr_log2;
  const dim3 grid(blocks_per_codebook((a.K + rows_per_block - 1) / rows_per_block, a.C, 8, a.dev),
                  static_cast<unsigned>(a.C));
  ema_embed_kernel<S, T><<<grid, kThreads, 0, a.stream>>>(
      static_cast<S*>(a.embed_avg), static_cast<const S*>(a.sums), static_cast<const S*>(a.cluster_size), a.n,
      static_cast<T*>(a.codebook), K, static_cast<int>(a.D), tpr_log2, a.decay, a.eps);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_ema_stats(const EmaArgs& a) {
  return with_float_type(a.codebook_kind, [&](auto t) { return launch_ema_typed<S, typename decltype(t)::type>(a); });
}

}  // namespace

cudaError_t histogram(const HistogramArgs& a) {
  if (a.N == 0 || a.C == 0) return cudaSuccess;
  return with_index_type(a.index_kind, [&](auto i) { return launch_histogram_index<typename decltype(i)::type>(a); });
}

cudaError_t cluster_stats_atomic(const ClusterStatsArgs& a) {
  if (a.N == 0 || a.C == 0) return cudaSuccess;
  HistogramArgs h{a.indices, a.index_kind, nullptr, Scalar::kFloat, a.C, a.N, a.K, a.counts, /*out_float=*/true,
                  a.dev,     a.stream};
  cudaError_t err = histogram(h);
  if (err != cudaSuccess) return err;
  return with_float_type(a.x_kind, [&](auto t) {
    using T = typename decltype(t)::type;
    return with_index_type(a.index_kind,
                           [&](auto i) { return launch_cluster_sums_atomic<T, typename decltype(i)::type>(a); });
  });
}

cudaError_t cluster_stats_keys(const ClusterStatsArgs& a) {
  const int64_t rows = a.C * a.N;
  if (rows == 0) return cudaSuccess;
  return with_index_type(a.index_kind, [&](auto i) {
    using IndexT = typename decltype(i)::type;
    segment_keys_kernel<IndexT><<<stride_blocks(rows, kThreads, 8, a.dev), kThreads, 0, a.stream>>>(
        static_cast<const IndexT*>(a.indices), a.N, rows, static_cast<int>(a.K), a.keys);
    return cudaGetLastError();
  });
}

cudaError_t cluster_stats_sorted(const ClusterStatsArgs& a) {
  const int64_t rows = a.C * a.N;
  const int64_t bins = a.C * (a.K + 1);
  segment_starts_kernel<<<stride_blocks(rows + 1, kThreads, 8, a.dev), kThreads, 0, a.stream>>>(a.sorted_keys, rows,
                                                                                                bins, a.starts);
  return with_float_type(a.x_kind, [&](auto t) {
    using T = typename decltype(t)::type;
    const int64_t chunks = rows / kSegChunkRows;
    if (chunks > 0) {
      segment_chunk_sums_kernel<T><<<capped_blocks(chunks, 16, a.dev), kSegWarps * 32, 0, a.stream>>>(
          static_cast<const T*>(a.x), a.order, a.sorted_keys, rows, static_cast<int>(a.K), static_cast<int>(a.D),
          a.chunk_sums);
    }
    segment_sums_kernel<T><<<capped_blocks(bins, 16, a.dev), kSegWarps * 32, 0, a.stream>>>(
        static_cast<const T*>(a.x), a.order, a.starts, a.chunk_sums, bins, static_cast<int>(a.K),
        static_cast<int>(a.D), a.counts, a.sums);
    return cudaGetLastError();
  });
}

cudaError_t ema_update(const EmaArgs& a) {
  if (a.C == 0 || a.K == 0) return cudaSuccess;
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
