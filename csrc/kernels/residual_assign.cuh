// Fused residual encoder: all Q stages of nearest-code assignment for a block of rows in
// one launch, the running residual kept in shared memory (vqkernels.residual_assign).
//
// Each block owns kRAWarps rows, one warp per row. Its shared memory holds, in fp32, the
// rows' residuals r and the sums of their picked codes, and one tile of kRATile codes of the
// current stage's codebook (stride D + 1: lane j reads code j's column d conflict-free),
// loaded cooperatively and shared by every row of the block. For each stage, lane j scores
// codes j, j + 32, ... of each tile by their EXACT fp32 distance to the row's residual
// (direct difference for l2, 1 - <r, c> / (|r| |c|) with IEEE roots and division for
// cosine, -<r, c> for dot), keeps its own strict-< running minimum (its codes come in
// increasing order, so the lowest of equal codes stays), and the warp merges the lanes'
// (distance, index) minima lexicographically: ties go to the lowest index at every stage
// and no N x K matrix exists. Then r -= c_winner and sum += c_winner. A row holding NaN/Inf
// scores NaN everywhere, never enters a minimum, and takes code 0 (the op masks it to -1);
// a finite row whose distances all overflow to +inf takes code 0 as well, as the reference does.
//
// Plain CUDA C++ on raw pointers (no torch headers), as every header under csrc/kernels/.
#pragma once

#include "common.cuh"

namespace vqk {

constexpr int kRAWarps = 8;   // rows (warps) per block
constexpr int kRATile = 32;   // codes per shared tile (one per lane)

// Shared-memory bytes of one block for D features.
inline size_t residual_assign_smem_bytes(int64_t D) {
  return sizeof(float) * (static_cast<size_t>(2 * kRAWarps) * D + static_cast<size_t>(kRATile) * (D + 1));
}

template <typename T>
__global__ void __launch_bounds__(kRAWarps * 32) residual_assign_kernel(
    const T* __restrict__ x,          // [N, D]
    const T* __restrict__ codebooks,  // [Q, K, D]
    int64_t N, int64_t K, int64_t D, int64_t Q, int metric,
    int64_t* __restrict__ indices,    // [N, Q]
    float* __restrict__ distances,    // [N, Q]
    T* __restrict__ quantized) {      // [N, D]
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRAWarps + warp;
  const bool active = row < N;  // inactive warps still take part in the block's tile loads
  float* res = smem + static_cast<size_t>(warp) * D;
  float* acc = smem + static_cast<size_t>(kRAWarps + warp) * D;
  float* tile = smem + static_cast<size_t>(2 * kRAWarps) * D;
  const int64_t stride = D + 1;

  for (int64_t d = lane; d < D; d += 32) {
    res[d] = active ? to_f32(x[row * D + d]) : 0.0f;
    acc[d] = 0.0f;
  }
  __syncwarp();

  for (int64_t q = 0; q < Q; ++q) {
    const T* book = codebooks + q * K * D;
    float rnorm = 0.0f;
    if (metric == kCosine) {
      float s = 0.0f;
      for (int64_t d = lane; d < D; d += 32) s += res[d] * res[d];
      rnorm = fmaxf(__fsqrt_rn(warp_sum(s)), kNormEps);
    }
    float best = __int_as_float(0x7f800000);  // +inf
    unsigned best_i = kNoCode;
    for (int64_t k0 = 0; k0 < K; k0 += kRATile) {
      const int64_t tk = K - k0 < kRATile ? K - k0 : kRATile;
      __syncthreads();  // the previous tile is no longer read
      for (int64_t e = threadIdx.x; e < tk * D; e += blockDim.x) {
        const int64_t j = e / D, d = e - j * D;
        tile[j * stride + d] = to_f32(book[(k0 + j) * D + d]);
      }
      __syncthreads();
      if (active && lane < tk) {
        const float* c = tile + lane * stride;
        float dist;
        if (metric == kL2) {
          float s = 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            const float diff = res[d] - c[d];
            s = fmaf(diff, diff, s);
          }
          dist = s;
        } else {
          float xc = 0.0f, cc = 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            xc = fmaf(res[d], c[d], xc);
            cc = fmaf(c[d], c[d], cc);
          }
          dist = metric == kCosine ? 1.0f - __fdiv_rn(xc, __fmul_rn(rnorm, fmaxf(__fsqrt_rn(cc), kNormEps))) : -xc;
        }
        if (dist < best) {  // strict: this lane's later codes never replace an equal earlier one
          best = dist;
          best_i = static_cast<unsigned>(k0 + lane);
        }
      }
    }
    warp_argmin(best, best_i, 31);  // lexicographic over the lanes: the lowest index among equals
    if (active) {
      const int64_t code = best_i == kNoCode ? 0 : static_cast<int64_t>(best_i);
      if (lane == 0) {
        indices[row * Q + q] = code;
        distances[row * Q + q] = best;  // +inf when every distance overflowed (code 0, as the reference)
      }
      __syncwarp();  // every lane has read res (norm, scores) before it changes
      for (int64_t d = lane; d < D; d += 32) {
        const float c = to_f32(book[code * D + d]);
        res[d] -= c;
        acc[d] += c;
      }
      __syncwarp();
    }
  }
  if (active) {
    for (int64_t d = lane; d < D; d += 32) quantized[row * D + d] = Store<T>::from(acc[d]);
  }
}

}  // namespace vqk
