// Host launcher of the fused residual encoder (kernels/residual_assign.cuh): torch-free,
// like the launchers of launch.h, so it compiles and ptxas-checks without a CUDA torch.
// The torch glue and the op registration are in residual_assign_ops.cpp.
#include <cstdint>

#include <cuda_runtime_api.h>

#include "launch.h"
#include "residual_assign.cuh"

namespace vqk {

// x [N, D], codebooks [Q, K, D] of `dtype` (half, bfloat16 or float); outputs indices
// [N, Q] int64, distances [N, Q] fp32, quantized [N, D] of `dtype`. Returns the launch status.
cudaError_t launch_residual_assign(const void* x, const void* codebooks, int64_t N, int64_t K, int64_t D,
                                   int64_t Q, int metric, Scalar dtype, int64_t* indices, float* distances,
                                   void* quantized, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const size_t smem = residual_assign_smem_bytes(D);
  const dim3 grid(static_cast<unsigned>((N + kRAWarps - 1) / kRAWarps));
  const dim3 block(kRAWarps * 32);
  auto run = [&](auto kernel, auto* xp, auto* cp, auto* qp) {
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    kernel<<<grid, block, smem, stream>>>(xp, cp, N, K, D, Q, metric, indices, distances, qp);
    return cudaGetLastError();
  };
  switch (dtype) {
    case Scalar::kHalf:
      return run(residual_assign_kernel<__half>, static_cast<const __half*>(x),
                 static_cast<const __half*>(codebooks), static_cast<__half*>(quantized));
    case Scalar::kBFloat16:
      return run(residual_assign_kernel<__nv_bfloat16>, static_cast<const __nv_bfloat16*>(x),
                 static_cast<const __nv_bfloat16*>(codebooks), static_cast<__nv_bfloat16*>(quantized));
    case Scalar::kFloat:
      return run(residual_assign_kernel<float>, static_cast<const float*>(x), static_cast<const float*>(codebooks),
                 static_cast<float*>(quantized));
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace vqk
