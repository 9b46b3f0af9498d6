// Codebook-usage histogram: counts[k] = #{n : indices[n] == k} (or the sum of weights[n]).
// Negative indices are masked rows and are ignored; indices >= K are rejected by the
// caller and skipped here (so a bad index can never write out of bounds).
//
// histogram_shared_kernel privatises the histogram in shared memory: each block counts
// its grid-stride share of the rows into a block-private copy (cheap shared atomics; hot
// codes contend only inside the block), then adds its non-zero bins to the global result
// with one global atomic per bin. histogram_global_kernel is the fallback for K too large
// for shared memory; with that many codes, global-atomic collisions are rare anyway.
//
// The codebook axis: indices (and weights) are [C, N], out is [C, K]; both kernels take
// codebook c from blockIdx.y and move their base pointers to its slice (64-bit offsets),
// so a block's private histogram always belongs to one codebook.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace vqk {

// Tag for "no weights": count rows.
struct NoWeight {};

template <typename W>
struct HistAcc {
  using type = float;  // weighted: fp32 sums
  static __device__ __forceinline__ float value(const W* w, int64_t i) { return to_f32(w[i]); }
};
template <>
struct HistAcc<NoWeight> {
  using type = unsigned int;  // counts: a block sees < 2^32 rows
  static __device__ __forceinline__ unsigned int value(const NoWeight*, int64_t) { return 1u; }
};

// Add a block's bin to the global output. OutT is unsigned long long (int64 counts),
// or float (fp32 counts, or weighted sums).
__device__ __forceinline__ void hist_flush(unsigned long long* out, unsigned int v) {
  atomicAdd(out, static_cast<unsigned long long>(v));
}
__device__ __forceinline__ void hist_flush(float* out, unsigned int v) { atomicAdd(out, static_cast<float>(v)); }
__device__ __forceinline__ void hist_flush(float* out, float v) { atomicAdd(out, v); }

// Codebook blockIdx.y's slice of indices [C, N], weights [C, N] (or none) and out [C, K].
template <typename IndexT, typename W, typename OutT>
struct HistSlice {
  const IndexT* indices;
  const W* weights;
  OutT* out;
  __device__ __forceinline__ HistSlice(const IndexT* indices_all, const W* weights_all, int64_t N, int K,
                                       OutT* out_all) {
    const int64_t c = blockIdx.y;
    indices = indices_all + c * N;
    weights = weights_all == nullptr ? nullptr : weights_all + c * N;
    out = out_all + c * K;
  }
};

// Dynamic shared memory: K * sizeof(HistAcc<W>::type) bytes. `out` must be zeroed.
// Grid: (blocks per codebook, C).
template <typename IndexT, typename W, typename OutT>
__global__ void __launch_bounds__(256)
    histogram_shared_kernel(const IndexT* __restrict__ indices_all, const W* __restrict__ weights_all, int64_t N,
                            int K, OutT* __restrict__ out_all) {
  using Acc = typename HistAcc<W>::type;
  static_assert(std::is_same<Acc, unsigned int>::value || std::is_same<OutT, float>::value,
                "weighted histograms accumulate in fp32");
  const HistSlice<IndexT, W, OutT> sl(indices_all, weights_all, N, K, out_all);
  const IndexT* __restrict__ indices = sl.indices;
  const W* __restrict__ weights = sl.weights;
  OutT* __restrict__ out = sl.out;
  extern __shared__ __align__(16) unsigned char hist_smem[];
  Acc* bins = reinterpret_cast<Acc*>(hist_smem);
  for (int k = threadIdx.x; k < K; k += blockDim.x) bins[k] = Acc(0);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const int64_t k = static_cast<int64_t>(indices[i]);
    if (k >= 0 && k < K) atomicAdd(bins + k, HistAcc<W>::value(weights, i));
  }
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const Acc v = bins[k];
    if (v != Acc(0)) hist_flush(out + k, v);
  }
}

// `out` must be zeroed. Grid: (blocks per codebook, C).
template <typename IndexT, typename W, typename OutT>
__global__ void __launch_bounds__(256)
    histogram_global_kernel(const IndexT* __restrict__ indices_all, const W* __restrict__ weights_all, int64_t N,
                            int K, OutT* __restrict__ out_all) {
  static_assert(std::is_same<W, NoWeight>::value || std::is_same<OutT, float>::value,
                "weighted histograms accumulate in fp32");
  const HistSlice<IndexT, W, OutT> sl(indices_all, weights_all, N, K, out_all);
  const IndexT* __restrict__ indices = sl.indices;
  const W* __restrict__ weights = sl.weights;
  OutT* __restrict__ out = sl.out;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const int64_t k = static_cast<int64_t>(indices[i]);
    if (k >= 0 && k < K) hist_flush(out + k, HistAcc<W>::value(weights, i));
  }
}

}  // namespace vqk
