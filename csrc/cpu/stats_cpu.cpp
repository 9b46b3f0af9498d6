// CPU kernels of vqkernels: `histogram` and `cluster_stats`, registered as
// torch.ops.vqkernels.histogram_cpu and torch.ops.vqkernels.cluster_stats_cpu (built into the
// same library as assign_cpu.cpp, which holds the Python module entry point).
//
// Contract (vqkernels/ops/_dispatch.py): indices [C, N] int64/int32, negative = masked;
// codebook c's code k is the flat bin c * K + k. Each op reads the indices once, and the
// range check rides on that pass: an index >= K is never counted, and the largest one seen
// is returned (-1 when none), so the Python backend raises the op's usual ValueError
// without a second pass over the indices.
//
// histogram: per-thread private counts over contiguous row chunks, added up at the end
// (integers: exact whatever the order). With weights: per-chunk fp64 sums, added in chunk
// order, then rounded to fp32 (deterministic for a given thread count).
//
// cluster_stats: every bin's sum is its rows added in input order, by one thread, so the
// sums are bitwise the same for any thread count (always deterministic) and no partial
// [K, D] copies are zeroed or merged. Bins are shared among threads in ranges of about
// equal rows (per-chunk counts and an exclusive scan give each bin's rows). Small sums
// ([C * K, D] within ~1 MiB per thread): each thread scans the rows in order and adds those
// of its bins. Larger: a stable counting sort of the row numbers by bin, then each bin's
// rows gathered in that order while its sum stays hot. It also says whether every sum is
// finite, so the public op's non-finite check reads nothing again.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define VQK_RESTRICT __restrict__
#define VQK_PREFETCH(p) __builtin_prefetch(p)
#else  // other compilers: plain pointers, no prefetch
#define VQK_RESTRICT
#define VQK_PREFETCH(p) ((void)0)
#endif

namespace {

using at::Tensor;

// acc[d] += row[d] for d < D, in fp32. fp16 rows convert 8 at a time where the CPU has F16C
// (c10::Half converts one element per call, which keeps the loop from vectorising); the
// additions, and so the bits of the sums, are the same.
template <typename scalar_t>
inline void add_row(float* VQK_RESTRICT acc, const scalar_t* VQK_RESTRICT xr, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(xr[d]);
}
#if defined(__F16C__)
template <>
inline void add_row<c10::Half>(float* VQK_RESTRICT acc, const c10::Half* VQK_RESTRICT xr, int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xr + d)));
    _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), v));
  }
  for (; d < D; ++d) acc[d] += static_cast<float>(xr[d]);
}
#endif

constexpr int64_t kMinChunkRows = 16384;  // below this per thread, threads cost more than they save

// Row chunks for the counting passes: one per thread, none smaller than kMinChunkRows, and
// no more than rows / bins, so the private [bins] tables (zeroed, then added up) never cost
// more than the rows themselves (a huge C * K with few rows counts in one chunk).
int64_t num_chunks(int64_t rows, int64_t bins) {
  const int64_t cap = std::min<int64_t>(rows / kMinChunkRows, rows / std::max<int64_t>(1, bins));
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), cap));
}

void check_indices(const Tensor& indices, const char* op) {
  TORCH_CHECK(indices.device().is_cpu(), op, ": indices must be a CPU tensor");
  TORCH_CHECK(indices.dim() == 2, op, ": expected indices [C, N], got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              op, ": indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(indices.is_contiguous(), op, ": indices must be contiguous");
}

// Calls f(c, n0, n1) for the rows [r0, r1) of the flat [C * N] row axis, split by codebook.
template <typename F>
inline void for_rows(int64_t r0, int64_t r1, int64_t N, F&& f) {
  while (r0 < r1) {
    const int64_t c = r0 / N, n0 = r0 - c * N, n1 = std::min(N, n0 + (r1 - r0));
    f(c, n0, n1);
    r0 += n1 - n0;
  }
}

// Per-chunk bins of the flat [C * N] rows, chunk p's [C * K] table at partial + p * B:
// acc_t int64_t counts the rows (w unused, nullptr), double sums their weights w [C, N].
// Returns the largest index >= K seen (-1 when none).
template <typename acc_t, typename index_t>
int64_t bin_rows(const index_t* idx, const float* w, int64_t C, int64_t N, int64_t K, int64_t P, acc_t* partial) {
  static_assert(std::is_same_v<acc_t, int64_t> || std::is_same_v<acc_t, double>, "counts or weighted sums");
  constexpr bool kWeighted = std::is_same_v<acc_t, double>;
  const int64_t M = C * N, B = C * K;
  std::vector<int64_t> worst(P, -1);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      acc_t* table = partial + p * B;
      std::fill(table, table + B, acc_t(0));
      int64_t bad = -1;
      for_rows(M * p / P, M * (p + 1) / P, N, [&](int64_t c, int64_t n0, int64_t n1) {
        const index_t* row = idx + c * N;
        acc_t* bins = table + c * K;
        const float* wr = nullptr;
        if constexpr (kWeighted) wr = w + c * N;
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t k = static_cast<int64_t>(row[n]);
          if (static_cast<uint64_t>(k) < static_cast<uint64_t>(K)) {  // negatives wrap: skipped
            if constexpr (kWeighted) bins[k] += wr[n];
            else ++bins[k];
          } else if (k > bad) {
            bad = k;
          }
        }
      });
      worst[p] = bad;
    }
  });
  return *std::max_element(worst.begin(), worst.end());
}

std::tuple<Tensor, int64_t> histogram_cpu(const Tensor& indices, int64_t K, const c10::optional<Tensor>& weights) {
  check_indices(indices, "histogram_cpu");
  TORCH_CHECK(K >= 1, "histogram_cpu: need K >= 1, got ", K);
  const int64_t C = indices.size(0), N = indices.size(1), B = C * K, M = C * N;
  const int64_t P = num_chunks(M, B);
  int64_t worst = -1;
  if (!weights.has_value()) {
    Tensor counts = at::empty({C, K}, indices.options().dtype(at::kLong));
    int64_t* out = counts.data_ptr<int64_t>();
    // One chunk counts straight into the result; more add their private copies up.
    std::vector<int64_t> partial(P > 1 ? P * B : 0);
    int64_t* target = P > 1 ? partial.data() : out;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "histogram_cpu", [&] {
      worst = bin_rows<int64_t, index_t>(indices.data_ptr<index_t>(), nullptr, C, N, K, P, target);
    });
    if (P > 1) {
      at::parallel_for(0, B, 4096, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          int64_t total = 0;
          for (int64_t p = 0; p < P; ++p) total += partial[p * B + b];
          out[b] = total;
        }
      });
    }
    return {counts, worst};
  }
  const Tensor& wt = *weights;
  TORCH_CHECK(wt.device().is_cpu() && wt.sizes() == indices.sizes(),
              "histogram_cpu: weights must be a CPU tensor shaped like indices [C, N], got ", wt.sizes());
  const Tensor w = wt.to(at::kFloat).contiguous();
  Tensor counts = at::empty({C, K}, indices.options().dtype(at::kFloat));
  float* out = counts.data_ptr<float>();
  std::vector<double> partial(P * B);
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "histogram_cpu", [&] {
    worst = bin_rows<double, index_t>(indices.data_ptr<index_t>(), w.data_ptr<float>(), C, N, K, P, partial.data());
  });
  at::parallel_for(0, B, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double total = 0;
      for (int64_t p = 0; p < P; ++p) total += partial[p * B + b];  // chunk order: deterministic
      out[b] = static_cast<float>(total);
    }
  });
  return {counts, worst};
}

// Exclusive scan of bin_rows' per-chunk counts, bin-major then chunk (so a stable order):
// off[b]..off[b + 1] are bin b's positions in the sorted order, counts[b] their number, and
// starts[p][b] becomes chunk p's first position in bin b.
void scan_bins(int64_t P, int64_t B, int64_t* starts, int64_t* off, float* counts) {
  int64_t run = 0;
  for (int64_t b = 0; b < B; ++b) {
    off[b] = run;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t n = starts[p * B + b];
      starts[p * B + b] = run;
      run += n;
    }
    counts[b] = static_cast<float>(run - off[b]);
  }
  off[B] = run;
}

// Row numbers of the flat [C * N] axis in order of bin, stable (rows of a bin in input order).
template <typename index_t, typename row_t>
void sort_rows(const index_t* idx, int64_t C, int64_t N, int64_t K, int64_t P, int64_t* starts, row_t* order) {
  const int64_t M = C * N;
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t* next = starts + p * C * K;
      for_rows(M * p / P, M * (p + 1) / P, N, [&](int64_t c, int64_t n0, int64_t n1) {
        const index_t* row = idx + c * N;
        int64_t* bins = next + c * K;
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t k = static_cast<int64_t>(row[n]);
          if (k >= 0) order[bins[k]++] = static_cast<row_t>(c * N + n);  // k < K: bin_rows found none above
        }
      });
    }
  });
}

// The bins shared among `parts` parts of about equal rows: part j owns the bins whose first
// position lies in [total * j / parts, total * (j + 1) / parts), i.e. [first[j], first[j + 1]).
std::vector<int64_t> split_bins(const int64_t* off, int64_t B, int64_t parts) {
  const int64_t total = off[B];
  std::vector<int64_t> first(parts + 1);
  for (int64_t j = 0; j < parts; ++j) first[j] = std::lower_bound(off, off + B, total * j / parts) - off;
  first[0] = 0;
  first[parts] = B;
  return first;
}

// Whether the sums of one part's used bins are all finite: s - s is 0 for a finite s and NaN
// for NaN or Inf, added per column so the loop vectorises (no reassociation needed). Spares
// the public op its own pass over the sums.
struct FiniteProbe {
  std::vector<float> col;
  explicit FiniteProbe(int64_t D) : col(D, 0.f) {}
  void add(const float* VQK_RESTRICT acc) {
    float* VQK_RESTRICT c = col.data();
    for (size_t d = 0; d < col.size(); ++d) c[d] += acc[d] - acc[d];
  }
  bool finite() const {
    float any = 0.f;
    for (float v : col) any += v;
    return any == 0.f;
  }
};

// Two ways to the same sums (each bin's rows added in input order, so the bits agree):
// small [C * K, D] sums: each part scans all rows in order and adds those of its own bins
// (x read in address order, the part's sums stay in cache); large ones: the rows gathered
// by the sorted order, one bin at a time, its sum kept hot while its rows stream in.
constexpr int64_t kScanMaxBytesPerThread = 1 << 20;

template <typename scalar_t, typename index_t>
bool scan_sums(const scalar_t* x, const index_t* idx, int64_t N, int64_t K, int64_t D, int64_t B, const int64_t* off,
               float* sums) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), off[B] / 4096));
  const std::vector<int64_t> first = split_bins(off, B, parts);
  std::vector<char> finite(parts, 1);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t lo = first[j], hi = first[j + 1];
      std::fill(sums + lo * D, sums + hi * D, 0.f);
      if (lo == hi) continue;
      for (int64_t c = lo / K; c <= (hi - 1) / K; ++c) {  // the codebooks this part's bins belong to
        const int64_t klo = std::max<int64_t>(lo - c * K, 0), khi = std::min<int64_t>(hi - c * K, K);
        const index_t* row = idx + c * N;
        const scalar_t* xc = x + c * N * D;
        float* sc = sums + c * K * D;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t k = static_cast<int64_t>(row[n]);
          if (k >= klo && k < khi) add_row(sc + k * D, xc + n * D, D);  // masked (< 0) never match
        }
      }
      FiniteProbe probe(D);
      for (int64_t b = lo; b < hi; ++b) {
        if (off[b + 1] > off[b]) probe.add(sums + b * D);
      }
      finite[j] = probe.finite();
    }
  });
  return std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; });
}

// sums[b] = the rows order[off[b]..off[b + 1]] of x added in that order (fp32).
template <typename scalar_t, typename row_t>
bool segment_sums(const scalar_t* x, int64_t D, int64_t B, const int64_t* off, const row_t* order, float* sums) {
  const int64_t total = off[B];
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), total / 1024));
  const std::vector<int64_t> first = split_bins(off, B, parts);
  constexpr int64_t kAhead = 8;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  std::vector<char> finite(parts, 1);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      FiniteProbe probe(D);
      std::fill(sums + first[j] * D, sums + first[j + 1] * D, 0.f);  // the part's bins are contiguous
      for (int64_t b = first[j]; b < first[j + 1]; ++b) {
        const int64_t e = off[b + 1];
        if (off[b] == e) continue;  // an unused code: zeros
        float* VQK_RESTRICT acc = sums + b * D;
        for (int64_t q = off[b]; q < e; ++q) {
          if (q + kAhead < total) {  // rows are scattered: fetch a later row's every cache line now
            const char* ahead = reinterpret_cast<const char*>(x + static_cast<int64_t>(order[q + kAhead]) * D);
            for (int64_t at = 0; at < row_bytes; at += 64) VQK_PREFETCH(ahead + at);
          }
          add_row(acc, x + static_cast<int64_t>(order[q]) * D, D);
        }
        probe.add(acc);
      }
      finite[j] = probe.finite();
    }
  });
  return std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; });
}

std::tuple<Tensor, Tensor, int64_t, bool> cluster_stats_cpu(const Tensor& x, const Tensor& indices, int64_t K) {
  check_indices(indices, "cluster_stats_cpu");
  TORCH_CHECK(x.device().is_cpu(), "cluster_stats_cpu: x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 3 && x.size(0) == indices.size(0) && x.size(1) == indices.size(1),
              "cluster_stats_cpu: expected x [C, N, D] and indices [C, N], got ", x.sizes(), " and ", indices.sizes());
  TORCH_CHECK(K >= 1, "cluster_stats_cpu: need K >= 1, got ", K);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "cluster_stats_cpu: dtype ", st, " is not supported (float32, bfloat16, float16)");
  const Tensor xc = x.contiguous();
  const int64_t C = x.size(0), N = x.size(1), D = x.size(2), B = C * K, M = C * N;
  Tensor counts = at::empty({C, K}, x.options().dtype(at::kFloat));
  Tensor sums = at::empty({C, K, D}, x.options().dtype(at::kFloat));
  const int64_t P = num_chunks(M, B);
  std::vector<int64_t> starts(P * B), off(B + 1);
  int64_t worst = -1;
  bool finite = true;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "cluster_stats_cpu", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    worst = bin_rows<int64_t, index_t>(idx, nullptr, C, N, K, P, starts.data());
    if (worst >= K) return;  // the caller raises; the outputs are not read
    scan_bins(P, B, starts.data(), off.data(), counts.data_ptr<float>());
    if (B * D * static_cast<int64_t>(sizeof(float)) <= kScanMaxBytesPerThread * at::get_num_threads()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "cluster_stats_cpu", [&] {
        finite = scan_sums<scalar_t, index_t>(xc.data_ptr<scalar_t>(), idx, N, K, D, B, off.data(), sums.data_ptr<float>());
      });
      return;
    }
    auto run = [&](auto* order) {
      using row_t = std::remove_pointer_t<decltype(order)>;
      sort_rows<index_t, row_t>(idx, C, N, K, P, starts.data(), order);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "cluster_stats_cpu", [&] {
        finite = segment_sums<scalar_t, row_t>(xc.data_ptr<scalar_t>(), D, B, off.data(), order, sums.data_ptr<float>());
      });
    };
    if (M <= INT32_MAX) {
      std::vector<int32_t> order(M);  // half the traffic of int64 row numbers
      run(order.data());
    } else {
      std::vector<int64_t> order(M);
      run(order.data());
    }
  });
  return {counts, sums, worst, finite};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vqkernels, m) {
  m.def("histogram_cpu(Tensor indices, int K, Tensor? weights) -> (Tensor, int)");
  m.def("cluster_stats_cpu(Tensor x, Tensor indices, int K) -> (Tensor, Tensor, int, bool)");
}

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) {
  m.impl("histogram_cpu", &histogram_cpu);
  m.impl("cluster_stats_cpu", &cluster_stats_cpu);
}
