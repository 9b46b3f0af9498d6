// Launch sequence of one assign call, shared by the per-dtype translation units
// (assign_f16.cu, assign_bf16.cu, assign_f32.cu: one instantiation group each, so they
// compile in parallel and a change to one dtype's path rebuilds only that file).
#pragma once

#include <cuda_runtime.h>

#include "kernels/assign.cuh"
#include "launch.h"

namespace vqk {

static_assert(kMetricL2 == kL2 && kMetricCosine == kCosine && kMetricDot == kDot, "metric ids must agree");

// Grid for the warp-per-row/code kernels: enough warps to cover `items`, at most 32 blocks
// (256 warps) per SM; the kernels grid-stride over the rest.
inline unsigned warp_grid(int64_t items, const DeviceInfo& dev) {
  const int64_t need = (items + assign_cfg::kRowsPerWarpBlock - 1) / assign_cfg::kRowsPerWarpBlock;
  const int64_t cap = static_cast<int64_t>(dev.num_sms > 0 ? dev.num_sms : 1) * 32;
  return static_cast<unsigned>(need < cap ? (need > 0 ? need : 1) : cap);
}

// Split the codebook over grid.y when the row tiles of all C codebooks alone cannot fill the
// GPU (few rows, many codes: the usual inference case). Each split keeps its own running
// minima and merges through the per-row atomicMin, so splitting never changes the result.
// grid.z is the codebook axis (C <= kMaxCodebooks, checked by the glue).
struct AssignGrid {
  unsigned row_blocks;
  int tiles_per_split;
  unsigned splits;
};

inline AssignGrid assign_grid(int64_t C, int64_t N, int64_t K, int64_t bm, int64_t bn, const DeviceInfo& dev) {
  AssignGrid g;
  const int64_t row_blocks = (N + bm - 1) / bm;
  const int64_t tiles = (K + bn - 1) / bn;
  // ~2 waves of 2 resident blocks per SM
  const int64_t target = static_cast<int64_t>(dev.num_sms > 0 ? dev.num_sms : 1) * 4;
  const int64_t blocks = row_blocks * C;
  int64_t splits = (target + blocks - 1) / blocks;
  if (splits < 1) splits = 1;
  if (splits > tiles) splits = tiles;
  int64_t per = (tiles + splits - 1) / splits;
  if ((tiles + per - 1) / per > 65535) per = (tiles + 65534) / 65535;  // grid.y limit
  g.row_blocks = static_cast<unsigned>(row_blocks);
  g.tiles_per_split = static_cast<int>(per);
  g.splits = static_cast<unsigned>((tiles + per - 1) / per);
  return g;
}

template <typename T>
cudaError_t run_assign(const AssignArgs& a, Scalar kind) {
  const int K = static_cast<int>(a.K);
  const int D = static_cast<int>(a.D);
  const T* x = static_cast<const T*>(a.x);
  const T* cb = static_cast<const T*>(a.codebook);
  const int64_t codes = a.C * a.K;
  const int64_t rows = a.C * a.N;

  code_terms_kernel<T><<<warp_grid(codes, a.dev), 256, 0, a.stream>>>(cb, codes, D, a.metric, a.code_bias,
                                                                      a.code_scale);
  cudaError_t err = cudaMemsetAsync(a.keys, 0xFF, static_cast<size_t>(rows) * sizeof(unsigned long long), a.stream);
  if (err != cudaSuccess) return err;

  const AssignKernel kernel = resolve_assign_kernel(kind, a.D, a.dev.cc_major, a.kernel);
  const unsigned C = static_cast<unsigned>(a.C);
  if (kernel == AssignKernel::kMma) {
    if constexpr (sizeof(T) == 2) {
      const AssignGrid g = assign_grid(a.C, a.N, a.K, assign_cfg::kMmaBM, assign_cfg::kMmaBN, a.dev);
      assign_mma_kernel<T><<<dim3(g.row_blocks, g.splits, C), assign_cfg::kMmaThreads, 0, a.stream>>>(
          x, cb, a.code_bias, a.code_scale, a.N, K, D, g.tiles_per_split, a.vec_ok ? 1 : 0, a.keys);
    } else {
      return cudaErrorInvalidValue;  // fp32 has no tensor-core path here (the glue never asks)
    }
  } else {
    const AssignGrid g = assign_grid(a.C, a.N, a.K, assign_cfg::kSimtBM, assign_cfg::kSimtBN, a.dev);
    assign_simt_kernel<T><<<dim3(g.row_blocks, g.splits, C), assign_cfg::kSimtThreads, 0, a.stream>>>(
        x, cb, a.code_bias, a.code_scale, a.N, K, D, g.tiles_per_split, a.keys);
  }
  assign_finalize_kernel<T><<<warp_grid(rows, a.dev), 256, 0, a.stream>>>(
      static_cast<const T*>(a.exact_x), static_cast<const T*>(a.exact_codebook), a.keys, a.N, rows, K, D, a.metric,
      a.indices, a.distances);
  return cudaGetLastError();
}

}  // namespace vqk
