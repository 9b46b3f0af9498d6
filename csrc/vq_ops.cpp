// Torch glue of the vqkernels CUDA extension: argument checks, outputs and workspaces,
// stream and device guard, and registration of the backend-level ops
//     torch.ops.vqkernels.assign_cuda / histogram_cuda / cluster_stats_cuda / ema_update_cuda
// which vqkernels/ops/*/cuda.py call. The public ops (vqkernels::assign, ...) are defined
// in Python with a backend argument; these are the CUDA backend's implementations.
//
// Compiled by the host C++ compiler, not nvcc: it launches nothing itself (the kernels sit
// behind the torch-free launchers of launch.h), so it needs only torch's headers and
// cuda_runtime_api.h. It uses c10/cuda (CUDAStream.h, CUDAGuard.h) rather than
// ATen/cuda/CUDAContext.h, which would also pull in the cuBLAS/cuSPARSE/cuSOLVER headers
// for nothing. (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream is.)
//
// The Python caller has already validated shapes, dtypes, devices and values; the checks
// here guard the C++ boundary (direct torch.ops calls) with the same style of messages.
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/pymodule.h"
#include "glue.h"
#include "launch.h"

namespace {

using at::Tensor;

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kLong:
      return "int64";
    case at::kInt:
      return "int32";
    default:
      return c10::toString(t);
  }
}

std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  if (t.dim() == 1) s += ",";
  return s + ")";
}

// `layout` names the dimensions, e.g. "[C, N, D]" (C: the codebook axis).
void check_cuda_tensor(const char* name, const Tensor& t, const char* layout) {
  const int64_t dim = static_cast<int64_t>(std::count(layout, layout + std::strlen(layout), ',')) + 1;
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.is_cuda(), "the cuda backend needs CUDA tensors: ", name, " is on ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must be ", layout, " (", dim, " dimensions), got shape ", shape_str(t));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (the public op makes it so), got strides ", t.strides());
}

void check_float_dtype(const char* name, const Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kHalf || d == at::kBFloat16 || d == at::kFloat, name,
              " must be a floating tensor (float16, bfloat16, float32) for the cuda backend, got dtype ",
              dtype_name(d));
}

void check_index_dtype(const char* name, const Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kLong || d == at::kInt, name, " must be an int64 or int32 tensor of code indices, got dtype ",
              dtype_name(d));
}

void check_same_device(const char* name, const Tensor& t, const char* first_name, const Tensor& first) {
  TORCH_CHECK(t.device() == first.device(), name, " is on ", t.device(), " but ", first_name, " is on ",
              first.device(), "; expected the same device");
}

void check_same_dtype(const char* name, const Tensor& t, const char* first_name, const Tensor& first) {
  TORCH_CHECK(t.scalar_type() == first.scalar_type(), name, " has dtype ", dtype_name(t.scalar_type()), " but ",
              first_name, " has dtype ", dtype_name(first.scalar_type()),
              "; expected the same dtype (cast one of them)");
}

void check_stats_dtype(const char* name, const Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble, name,
              " must be float32 or float64 (EMA statistics need the precision), got ", dtype_name(d));
}

void check_codebook_size(int64_t K) {
  TORCH_CHECK(K >= 1, "K must be >= 1 (the number of codes), got ", K);
  TORCH_CHECK(K <= vqk::kMaxCodes, "K must be <= ", vqk::kMaxCodes, " for the cuda backend, got ", K);
}

// C: the leading codebook axis of `name` (shape shape_str(t)).
void check_codebook_count(const char* name, const Tensor& t) {
  const int64_t C = t.size(0);
  TORCH_CHECK(C >= 1, name, " must hold at least one codebook (C >= 1 along dimension 0), got shape ", shape_str(t));
  TORCH_CHECK(C <= vqk::kMaxCodebooks, "the cuda backend handles at most ", vqk::kMaxCodebooks,
              " codebooks in one call (C is a grid dimension), got ", name, " of shape ", shape_str(t));
}

// `t` has the same codebook axis C as `first` (dimension 0).
void check_same_codebooks(const char* name, const Tensor& t, const char* first_name, const Tensor& first) {
  TORCH_CHECK(t.size(0) == first.size(0), name, " has C=", t.size(0), " codebooks (shape ", shape_str(t), ") but ",
              first_name, " has C=", first.size(0), " (shape ", shape_str(first),
              "); expected the same leading codebook axis");
}

vqk::Scalar scalar_kind(const Tensor& t) {
  const std::optional<vqk::Scalar> kind = vqk::scalar_of(t.scalar_type());
  TORCH_CHECK(kind, "vqkernels: unsupported dtype ", dtype_name(t.scalar_type()));
  return *kind;
}

vqk::Index index_kind(const Tensor& t) {
  return t.scalar_type() == at::kInt ? vqk::Index::kInt32 : vqk::Index::kInt64;
}

vqk::DeviceInfo device_info(const Tensor& t) {
  const int dev = t.get_device();
  vqk::DeviceInfo info{1, 0};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  return info;
}

// What every op needs before it allocates and launches: the device of `t` made current
// (for the allocations and the launch), its properties and its current stream.
struct OnDevice {
  c10::cuda::CUDAGuard guard;
  vqk::DeviceInfo dev;
  cudaStream_t stream;
  explicit OnDevice(const Tensor& t)
      : guard(t.device()), dev(device_info(t)), stream(c10::cuda::getCurrentCUDAStream(t.get_device()).stream()) {}
};

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "vqkernels ", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// VQKERNELS_CUDA_ASSIGN_KERNEL = auto (default) | mma | simt: force one assign kernel, so
// both paths can be tested and benchmarked on the same inputs.
vqk::AssignKernel requested_assign_kernel() {
  const char* env = std::getenv("VQKERNELS_CUDA_ASSIGN_KERNEL");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return vqk::AssignKernel::kAuto;
  if (std::strcmp(env, "mma") == 0) return vqk::AssignKernel::kMma;
  if (std::strcmp(env, "simt") == 0) return vqk::AssignKernel::kSimt;
  TORCH_CHECK(false, "VQKERNELS_CUDA_ASSIGN_KERNEL must be one of auto, mma, simt, got '", env, "'");
  return vqk::AssignKernel::kAuto;  // unreachable
}

// ---------------------------------------------------------------------------------------
// assign: x [C, N, D], codebook [C, K, D] -> (indices int64 [C, N], distances float32 [C, N]).
// centre [C, D] float32 (l2 only; vqkernels/ops/assign/_centre.py): score x - centre against
// codebook - centre (copies rounded to the input dtype: the kernels stay as they are, at their
// register budget) and compute the winner's exact distance from the originals.
std::tuple<Tensor, Tensor> assign_cuda(const Tensor& x, const Tensor& codebook, c10::string_view metric,
                                       const std::optional<Tensor>& centre) {
  check_cuda_tensor("x", x, "[C, N, D]");
  check_cuda_tensor("codebook", codebook, "[C, K, D]");
  check_float_dtype("x", x);
  check_same_device("codebook", codebook, "x", x);
  check_same_dtype("codebook", codebook, "x", x);
  const int metric_id = vqk::parse_metric(metric);
  check_codebook_count("codebook", codebook);
  check_same_codebooks("x", x, "codebook", codebook);
  const int64_t C = codebook.size(0), N = x.size(1), K = codebook.size(1), D = codebook.size(2);
  check_codebook_size(K);
  TORCH_CHECK(D >= 1, "codebook must have D >= 1 features, got shape ", shape_str(codebook));
  TORCH_CHECK(D <= INT32_MAX, "the cuda backend supports D < 2^31 features, got ", D);
  TORCH_CHECK(x.size(2) == D, "x has ", x.size(2), " features (shape ", shape_str(x), ") but codebook has ", D,
              " (shape ", shape_str(codebook), "); expected x of shape [", C, ", N, ", D, "]");

  const OnDevice on(x);
  Tensor indices = at::empty({C, N}, x.options().dtype(at::kLong));
  Tensor distances = at::empty({C, N}, x.options().dtype(at::kFloat));
  if (N == 0) return {indices, distances};

  const vqk::Scalar kind = scalar_kind(x);
  const vqk::AssignKernel requested = requested_assign_kernel();
  if (requested == vqk::AssignKernel::kMma) {
    TORCH_CHECK(kind != vqk::Scalar::kFloat,
                "VQKERNELS_CUDA_ASSIGN_KERNEL=mma needs float16 or bfloat16 inputs, got dtype float32");
    TORCH_CHECK(on.dev.cc_major >= 8, "VQKERNELS_CUDA_ASSIGN_KERNEL=mma needs compute capability >= 8.0, got ",
                on.dev.cc_major, ".x");
  }
  Tensor terms = at::empty({2, C * K}, x.options().dtype(at::kFloat));
  Tensor keys = at::empty({C, N}, x.options().dtype(at::kLong));
  Tensor score_x = x, score_codebook = codebook;
  if (centre.has_value() && centre->defined()) {
    const Tensor& m = *centre;
    TORCH_CHECK(metric_id == vqk::kMetricL2, "centre applies to metric 'l2' only, got metric '", std::string(metric),
                "'");
    check_same_device("centre", m, "x", x);
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.dim() == 2 && m.size(0) == C && m.size(1) == D,
                "centre must be a float32 tensor of shape [", C, ", ", D, "], got dtype ", m.scalar_type(),
                " and shape ", shape_str(m));
    const Tensor rows_m = m.unsqueeze(1);  // [C, 1, D]: fp32 difference, rounded once to the input dtype
    // type promotion reads 16-bit inputs as fp32 on the fly: one fp32 temporary each
    score_x = at::sub(x, rows_m).to(x.scalar_type()).contiguous();
    score_codebook = at::sub(codebook, rows_m).to(codebook.scalar_type()).contiguous();
  }

  vqk::AssignArgs a{};
  a.x = score_x.data_ptr();
  a.codebook = score_codebook.data_ptr();
  a.exact_x = x.data_ptr();
  a.exact_codebook = codebook.data_ptr();
  a.C = C;
  a.N = N;
  a.K = K;
  a.D = D;
  a.metric = metric_id;
  a.code_bias = terms.data_ptr<float>();
  a.code_scale = terms.data_ptr<float>() + C * K;
  a.keys = reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>());
  a.indices = indices.data_ptr<int64_t>();
  a.distances = distances.data_ptr<float>();
  a.kernel = requested;
  // Every codebook's slice starts 16-byte aligned too: its offset, c * N * D or c * K * D
  // elements, is a multiple of 8 when D is.
  a.vec_ok = D % 8 == 0 && aligned16(a.x) && aligned16(a.codebook);
  a.dev = on.dev;
  a.stream = on.stream;
  cudaError_t err;
  switch (kind) {
    case vqk::Scalar::kHalf:
      err = vqk::assign_f16(a);
      break;
    case vqk::Scalar::kBFloat16:
      err = vqk::assign_bf16(a);
      break;
    default:
      err = vqk::assign_f32(a);
      break;
  }
  check_launch(err, "assign_cuda");
  return {indices, distances};
}

// ---------------------------------------------------------------------------------------
// histogram: indices [C, N] (negative: masked), weights [C, N] or None -> counts [C, K]
// (int64, or float32 with weights).
Tensor histogram_cuda(const Tensor& indices, int64_t K, const std::optional<Tensor>& weights) {
  check_cuda_tensor("indices", indices, "[C, N]");
  check_index_dtype("indices", indices);
  check_codebook_count("indices", indices);
  check_codebook_size(K);
  const bool weighted = weights.has_value() && weights->defined();
  if (weighted) {
    check_cuda_tensor("weights", *weights, "[C, N]");
    check_float_dtype("weights", *weights);
    check_same_device("weights", *weights, "indices", indices);
    TORCH_CHECK(weights->sizes() == indices.sizes(), "weights has shape ", shape_str(*weights),
                " but indices has shape ", shape_str(indices), "; expected equal shapes");
  }
  const OnDevice on(indices);
  const int64_t C = indices.size(0), N = indices.size(1);
  Tensor out = at::zeros({C, K}, indices.options().dtype(weighted ? at::kFloat : at::kLong));
  if (N == 0) return out;
  vqk::HistogramArgs a{};
  a.indices = indices.data_ptr();
  a.index_kind = index_kind(indices);
  a.weights = weighted ? weights->data_ptr() : nullptr;
  a.weight_kind = weighted ? scalar_kind(*weights) : vqk::Scalar::kFloat;
  a.C = C;
  a.N = N;
  a.K = K;
  a.out = out.data_ptr();
  a.out_float = weighted;
  a.dev = on.dev;
  a.stream = on.stream;
  check_launch(vqk::histogram(a), "histogram_cuda");
  return out;
}

// ---------------------------------------------------------------------------------------
// cluster_stats: x [C, N, D], indices [C, N] -> (counts float32 [C, K], sums float32 [C, K, D]).
std::tuple<Tensor, Tensor> cluster_stats_cuda(const Tensor& x, const Tensor& indices, int64_t K, bool deterministic) {
  check_cuda_tensor("x", x, "[C, N, D]");
  check_float_dtype("x", x);
  check_cuda_tensor("indices", indices, "[C, N]");
  check_index_dtype("indices", indices);
  check_same_device("indices", indices, "x", x);
  check_codebook_count("x", x);
  check_codebook_size(K);
  const int64_t C = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(indices.size(0) == C && indices.size(1) == N, "indices has shape ", shape_str(indices),
              " but x has shape ", shape_str(x), "; expected indices of shape (", C, ", ", N,
              ") (x without its last dimension)");
  TORCH_CHECK(D <= INT32_MAX, "the cuda backend supports D < 2^31 features, got ", D);

  const OnDevice on(x);
  const auto f32 = x.options().dtype(at::kFloat);
  vqk::ClusterStatsArgs a{};
  a.x = x.data_ptr();
  a.x_kind = scalar_kind(x);
  a.indices = indices.data_ptr();
  a.index_kind = index_kind(indices);
  a.C = C;
  a.N = N;
  a.K = K;
  a.D = D;
  a.dev = on.dev;
  a.stream = on.stream;
  if (!deterministic || N == 0) {
    Tensor counts = at::zeros({C, K}, f32);
    Tensor sums = at::zeros({C, K, D}, f32);
    a.counts = counts.data_ptr<float>();
    a.sums = sums.data_ptr<float>();
    check_launch(vqk::cluster_stats_atomic(a), "cluster_stats_cuda");
    return {counts, sums};
  }
  // One key per row, c * (K + 1) + code (masked rows: code K), and one stable 1-D sort of
  // all C * N keys: the rows of each (codebook, code) keep their input order, so each sum
  // is taken in a fixed order. Every counts/sums entry is written exactly once.
  Tensor keys = at::empty({C * N}, x.options().dtype(at::kLong));
  a.keys = keys.data_ptr<int64_t>();
  check_launch(vqk::cluster_stats_keys(a), "cluster_stats_cuda");
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor& sorted_keys = std::get<0>(sorted);
  const Tensor& order = std::get<1>(sorted);
  Tensor starts = at::empty({C * (K + 1) + 1}, x.options().dtype(at::kLong));
  // sums of the whole chunks of long runs (see kernels/stats.cuh): a collapsed code is summed
  // by many blocks
  Tensor chunk_sums = at::empty({std::max<int64_t>(1, C * N / vqk::kSegmentChunkRows) * D}, f32);
  Tensor counts = at::empty({C, K}, f32);
  Tensor sums = at::empty({C, K, D}, f32);
  a.sorted_keys = sorted_keys.data_ptr<int64_t>();
  a.order = order.data_ptr<int64_t>();
  a.starts = starts.data_ptr<int64_t>();
  a.chunk_sums = chunk_sums.data_ptr<float>();
  a.counts = counts.data_ptr<float>();
  a.sums = sums.data_ptr<float>();
  check_launch(vqk::cluster_stats_sorted(a), "cluster_stats_cuda");
  return {counts, sums};
}

// ---------------------------------------------------------------------------------------
// ema_update, in place: cluster_size [C, K], embed_avg [C, K, D], codebook [C, K, D] from
// counts [C, K] and sums [C, K, D].
void ema_update_cuda(const Tensor& cluster_size, const Tensor& embed_avg, const Tensor& codebook, const Tensor& counts,
                     const Tensor& sums, double decay, double eps) {
  check_cuda_tensor("codebook", codebook, "[C, K, D]");
  check_float_dtype("codebook", codebook);
  check_cuda_tensor("cluster_size", cluster_size, "[C, K]");
  check_cuda_tensor("embed_avg", embed_avg, "[C, K, D]");
  check_cuda_tensor("counts", counts, "[C, K]");
  check_cuda_tensor("sums", sums, "[C, K, D]");
  check_stats_dtype("cluster_size", cluster_size);
  const auto stats_dtype = cluster_size.scalar_type();
  check_same_dtype("embed_avg", embed_avg, "cluster_size", cluster_size);
  check_stats_dtype("counts", counts);
  check_stats_dtype("sums", sums);
  check_same_device("cluster_size", cluster_size, "codebook", codebook);
  check_same_device("embed_avg", embed_avg, "codebook", codebook);
  check_same_device("counts", counts, "codebook", codebook);
  check_same_device("sums", sums, "codebook", codebook);
  check_codebook_count("codebook", codebook);
  const int64_t C = codebook.size(0), K = codebook.size(1), D = codebook.size(2);
  TORCH_CHECK(K <= INT32_MAX && D <= INT32_MAX, "the cuda backend supports K, D < 2^31, got codebook shape ",
              shape_str(codebook));
  TORCH_CHECK(cluster_size.size(0) == C && cluster_size.size(1) == K, "cluster_size has shape ",
              shape_str(cluster_size), "; expected (", C, ", ", K, ") to match codebook ", shape_str(codebook));
  TORCH_CHECK(counts.sizes() == cluster_size.sizes(), "counts has shape ", shape_str(counts), "; expected (", C, ", ",
              K, ") to match codebook ", shape_str(codebook));
  TORCH_CHECK(embed_avg.sizes() == codebook.sizes(), "embed_avg has shape ", shape_str(embed_avg), "; expected ",
              shape_str(codebook), " to match codebook");
  TORCH_CHECK(sums.sizes() == codebook.sizes(), "sums has shape ", shape_str(sums), "; expected ",
              shape_str(codebook), " to match codebook");
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, "decay must be a float in [0, 1], got ", decay);
  TORCH_CHECK(eps > 0.0, "eps must be a float > 0 (Laplace smoothing), got ", eps);

  const OnDevice on(codebook);
  // The kernels read counts/sums in the statistics' dtype (a no-op when they already match).
  const Tensor counts_s = counts.scalar_type() == stats_dtype ? counts : counts.to(stats_dtype).contiguous();
  const Tensor sums_s = sums.scalar_type() == stats_dtype ? sums : sums.to(stats_dtype).contiguous();
  Tensor n = at::empty({C}, codebook.options().dtype(at::kDouble));
  vqk::EmaArgs a{};
  a.cluster_size = cluster_size.data_ptr();
  a.embed_avg = embed_avg.data_ptr();
  a.codebook = codebook.data_ptr();
  a.counts = counts_s.data_ptr();
  a.sums = sums_s.data_ptr();
  a.stats_kind = scalar_kind(cluster_size);
  a.codebook_kind = scalar_kind(codebook);
  a.C = C;
  a.K = K;
  a.D = D;
  a.decay = decay;
  a.eps = eps;
  a.n = n.data_ptr<double>();
  a.dev = on.dev;
  a.stream = on.stream;
  check_launch(vqk::ema_update(a), "ema_update_cuda");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vqkernels, m) {
  m.def("assign_cuda(Tensor x, Tensor codebook, str metric, Tensor? centre=None) -> (Tensor, Tensor)");
  m.def("histogram_cuda(Tensor indices, int K, Tensor? weights) -> Tensor");
  m.def("cluster_stats_cuda(Tensor x, Tensor indices, int K, bool deterministic) -> (Tensor, Tensor)");
  m.def(
      "ema_update_cuda(Tensor(a!) cluster_size, Tensor(b!) embed_avg, Tensor(c!) codebook, Tensor counts, "
      "Tensor sums, float decay, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(vqkernels, CUDA, m) {
  m.impl("assign_cuda", &assign_cuda);
  m.impl("histogram_cuda", &histogram_cuda);
  m.impl("cluster_stats_cuda", &cluster_stats_cuda);
  m.impl("ema_update_cuda", &ema_update_cuda);
}

// `import vqkernels._C` (the setup.py build) runs the registrations above (cpu/pymodule.h).
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
VQK_PYMODULE("vqkernels CUDA kernels; the ops are registered as torch.ops.vqkernels.*_cuda")
