// Host launchers of the vqkernels CUDA kernels: a torch-free boundary (raw pointers, sizes,
// a stream). The .cu files behind it (assign_*.cu, stats.cu) need only the CUDA toolkit, so
// they are compiled and ptxas-checked on machines without a CUDA build of torch; the torch
// glue (vq_ops.cpp) validates tensors, allocates outputs and workspaces, and calls these.
// Each returns the launch status (cudaGetLastError after the last launch).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vqk {

enum class Scalar : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };
enum class Index : int { kInt32 = 0, kInt64 = 1 };
// Metric ids, as the kernels' vqk::Metric (checked in assign_launch.cuh).
constexpr int kMetricL2 = 0;
constexpr int kMetricCosine = 1;
constexpr int kMetricDot = 2;

enum class AssignKernel : int { kAuto = 0, kMma = 1, kSimt = 2 };

// fp16/bf16 inputs with D <= this use the SIMT kernel: with at most 8 features a score costs
// the SIMT tile no more FMAs than its argmin epilogue, while one m16n8k16 step would pad D to
// 16 (to 32 in the chunk). Above it, up to D = 32 included, the tensor-core kernel wins: the
// same 64 scores per thread and epilogue, the dot products on tensor cores, and two blocks
// per SM where the SIMT tile (~200 registers) runs one.
constexpr int64_t kSimtMaxD = 8;
// The largest K: code indices travel in 32 bits next to a "no code" sentinel (0x7FFFFFFF).
constexpr int64_t kMaxCodes = 0x7FFFFFFE;
// Rows per chunk of the deterministic cluster_stats sums (kernels/stats.cuh kSegChunkRows).
constexpr int64_t kSegmentChunkRows = 256;
// The largest C (independent codebooks in one call): the codebook axis is a grid y/z
// dimension of the assign and histogram kernels.
constexpr int64_t kMaxCodebooks = 65535;

struct DeviceInfo {
  int num_sms;
  int cc_major;
};

// Shapes below: C independent codebooks (C >= 1), N rows and K codes per codebook, D
// features. Every buffer is contiguous.
struct AssignArgs {
  const void* x;         // [C, N, D] rows the scores are computed from
  const void* codebook;  // [C, K, D], same dtype
  // The winner's exact distance is computed from these: x / codebook themselves, or the
  // originals when x / codebook are l2-shifted copies (vqkernels/ops/assign/_centre.py).
  const void* exact_x;         // [C, N, D]
  const void* exact_codebook;  // [C, K, D]
  int64_t C, N, K, D;
  int metric;                 // 0 l2, 1 cosine, 2 dot
  float* code_bias;           // [C, K] workspace
  float* code_scale;          // [C, K] workspace
  unsigned long long* keys;   // [C, N] workspace
  int64_t* indices;           // [C, N] out, per-codebook code indices
  float* distances;           // [C, N] out
  AssignKernel kernel;        // kAuto picks; kMma needs fp16/bf16 and sm_80+ (checked by the glue)
  bool vec_ok;                // D % 8 == 0 and x, codebook 16-byte aligned (16-bit dtypes)
  DeviceInfo dev;
  cudaStream_t stream;
};

// The kernel an assign call runs: kAuto -> tensor cores for fp16/bf16 with D > kSimtMaxD on
// sm_80+, else SIMT. An explicit request is honoured as is (the glue rejects impossible ones).
inline AssignKernel resolve_assign_kernel(Scalar dtype, int64_t D, int cc_major, AssignKernel requested) {
  if (requested != AssignKernel::kAuto) return requested;
  const bool half = dtype == Scalar::kHalf || dtype == Scalar::kBFloat16;
  return (half && cc_major >= 8 && D > kSimtMaxD) ? AssignKernel::kMma : AssignKernel::kSimt;
}

cudaError_t assign_f16(const AssignArgs& a);
cudaError_t assign_bf16(const AssignArgs& a);
cudaError_t assign_f32(const AssignArgs& a);

struct HistogramArgs {
  const void* indices;  // [C, N]
  Index index_kind;
  const void* weights;  // [C, N] or nullptr
  Scalar weight_kind;
  int64_t C, N, K;
  void* out;       // [C, K], zeroed: int64 (no weights, out_float false) or float32
  bool out_float;  // counts as float32 (cluster_stats)
  DeviceInfo dev;
  cudaStream_t stream;
};
cudaError_t histogram(const HistogramArgs& a);

// cluster_stats, atomic: cluster_stats_atomic. Deterministic: cluster_stats_keys writes one
// sort key per row into `keys`, the glue stable-sorts them (sorted_keys, order), then
// cluster_stats_sorted reduces each (codebook, code) run in a fixed order.
struct ClusterStatsArgs {
  const void* x;  // [C, N, D]
  Scalar x_kind;
  const void* indices;  // [C, N]
  Index index_kind;
  int64_t C, N, K, D;
  float* counts;  // [C, K]: zeroed for atomic
  float* sums;    // [C, K, D]: zeroed for atomic
  // deterministic only (unused by the atomic path):
  int64_t* keys;                // [C * N] out of cluster_stats_keys: c * (K + 1) + code, masked -> code K
  const int64_t* sorted_keys;   // [C * N] keys, stably sorted
  const int64_t* order;         // [C * N] sorted position -> flattened row of x
  int64_t* starts;              // [C * (K + 1) + 1] workspace
  float* chunk_sums;            // [max(1, C * N / kSegmentChunkRows) * D] workspace
  DeviceInfo dev;
  cudaStream_t stream;
};
cudaError_t cluster_stats_atomic(const ClusterStatsArgs& a);
cudaError_t cluster_stats_keys(const ClusterStatsArgs& a);
cudaError_t cluster_stats_sorted(const ClusterStatsArgs& a);

struct EmaArgs {
  void* cluster_size;  // [C, K] stats dtype, in place
  void* embed_avg;     // [C, K, D] stats dtype, in place
  void* codebook;      // [C, K, D] codebook dtype, overwritten
  const void* counts;  // [C, K] stats dtype
  const void* sums;    // [C, K, D] stats dtype
  Scalar stats_kind;   // kFloat or kDouble
  Scalar codebook_kind;
  int64_t C, K, D;
  double decay, eps;
  double* n;  // [C] workspace
  DeviceInfo dev;
  cudaStream_t stream;
};
cudaError_t ema_update(const EmaArgs& a);

}  // namespace vqk
