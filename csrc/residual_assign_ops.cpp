// Torch glue of the fused residual encoder: the op torch.ops.vqkernels.residual_assign_cuda
// (vqkernels/ops/residual_assign/cuda.py calls it), registered as a fragment of the
// vqkernels library beside csrc/vq_ops.cpp's ops. Compiled by the host C++ compiler; the
// kernel sits behind the torch-free launcher of residual_assign.cu.
//
// The Python op has validated shapes, dtypes, devices and values; these checks guard
// direct torch.ops calls.
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "glue.h"
#include "launch.h"

namespace vqk {
// residual_assign.cu
cudaError_t launch_residual_assign(const void* x, const void* codebooks, int64_t N, int64_t K, int64_t D,
                                   int64_t Q, int metric, Scalar dtype, int64_t* indices, float* distances,
                                   void* quantized, cudaStream_t stream);
}  // namespace vqk

namespace {

using at::Tensor;

// Widest rows the kernel keeps in shared memory: 2 * 8 rows + a 32-code tile of fp32,
// (16 D + 32 (D + 1)) * 4 bytes <= 227 KiB (cudaFuncSetAttribute above 48 KiB).
constexpr int64_t kResidualMaxD = 1184;

std::tuple<Tensor, Tensor, Tensor> residual_assign_cuda(const Tensor& x, const Tensor& codebooks,
                                                        c10::string_view metric) {
  TORCH_CHECK(x.is_cuda() && codebooks.is_cuda(), "the cuda backend needs CUDA tensors: x is on ", x.device(),
              ", codebooks on ", codebooks.device());
  TORCH_CHECK(x.dim() == 2, "x must be [N, D], got ", x.dim(), " dimensions");
  TORCH_CHECK(codebooks.dim() == 3, "codebooks must be [Q, K, D], got ", codebooks.dim(), " dimensions");
  TORCH_CHECK(x.is_contiguous() && codebooks.is_contiguous(), "x and codebooks must be contiguous");
  TORCH_CHECK(x.device() == codebooks.device(), "codebooks are on ", codebooks.device(), " but x is on ", x.device());
  TORCH_CHECK(x.scalar_type() == codebooks.scalar_type(), "x and codebooks must have the same dtype");
  const std::optional<vqk::Scalar> kind = vqk::scalar_of(x.scalar_type());
  TORCH_CHECK(kind && *kind != vqk::Scalar::kDouble,
              "x must be float16, bfloat16 or float32 for the cuda backend, got ", x.scalar_type());
  const int metric_id = vqk::parse_metric(metric);
  const int64_t N = x.size(0), D = x.size(1), Q = codebooks.size(0), K = codebooks.size(1);
  TORCH_CHECK(codebooks.size(2) == D, "x has ", D, " features but codebooks have ", codebooks.size(2));
  TORCH_CHECK(Q >= 1 && K >= 1 && D >= 1, "codebooks must have Q >= 1, K >= 1 and D >= 1");
  TORCH_CHECK(K <= vqk::kMaxCodes, "K must be <= ", vqk::kMaxCodes, " for the cuda backend, got ", K);
  TORCH_CHECK(D <= kResidualMaxD, "the cuda residual_assign kernel keeps rows of at most ", kResidualMaxD,
              " features in shared memory, got D = ", D);
  c10::cuda::CUDAGuard guard(x.device());
  auto indices = at::empty({N, Q}, x.options().dtype(at::kLong));
  auto distances = at::empty({N, Q}, x.options().dtype(at::kFloat));
  auto quantized = at::empty({N, D}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const cudaError_t err =
      vqk::launch_residual_assign(x.data_ptr(), codebooks.data_ptr(), N, K, D, Q, metric_id, *kind,
                                  indices.data_ptr<int64_t>(), distances.data_ptr<float>(), quantized.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, "vqkernels residual_assign: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {indices, quantized, distances};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vqkernels, m) {
  m.def("residual_assign_cuda(Tensor x, Tensor codebooks, str metric) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vqkernels, CUDA, m) { m.impl("residual_assign_cuda", &residual_assign_cuda); }
