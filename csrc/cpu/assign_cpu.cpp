// CPU kernels of vqkernels: `assign` (nearest code + exact distance), registered as
// torch.ops.vqkernels.assign_cpu. Independent of CUDA; built by setup.py as
// vqkernels._C_cpu (portable flags) or JIT-compiled by vqkernels/_cpu_extension.py.
//
// Contract (vqkernels/ops/_dispatch.py): x [C, N, D], codebook [C, K, D], same dtype
// (fp32 / bf16 / fp16; tiles are converted to fp32) -> (indices int64 [C, N], distances
// float32 [C, N]); ties to the LOWEST index; the distance is the winner's exact fp32
// distance (vqkernels/ops/_metrics.py). Rows holding NaN never crash the kernel and get
// some index; the public op overwrites them with -1 / NaN.
//
// D <= 16: fused distance + running argmin. The codebook is transposed once per tile
// ([D][KT], codes along the SIMD lanes), each thread keeps R rows' running (min, argmin)
// per lane in registers and walks the tiles in order. l2 is the direct difference
// ||x - c||^2, so exact ties stay ties and large offsets do not cancel.
// D > 16: tiles of x @ codes^T through the BLAS (at::mm_out into a per-thread buffer sized
// for L2), the argmin fused right after each tile while it is in cache (expanded-form l2
// score on inputs shifted by the codebook mean), then the winner's exact distance.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
enum Metric { L2 = 0, DOT = 1, COSINE = 2 };

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // codes per vector: one zmm register
#else
constexpr int kLanes = 8;   // one ymm register (two xmm under portable SSE flags)
#endif
#ifndef VQK_VECS
#define VQK_VECS 2
#endif
#ifndef VQK_ROWS
#define VQK_ROWS 4
#endif
constexpr int kVecs = VQK_VECS;  // vectors per step
constexpr int kStep = kLanes * kVecs;
constexpr int kRows = VQK_ROWS;  // rows sharing each code load

#if defined(__GNUC__) || defined(__clang__)
// GCC/Clang vector extensions: AVX-512/AVX2 under -march=native, SSE with portable flags;
// no intrinsics, so the same code builds for any target.
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
static inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline vf vsplat(float a) { return vf{} + a; }
static inline vi isplat(int32_t a) { return vi{} + a; }
static inline vi vless(vf a, vf b) { return (vi)(a < b); }
static inline vf vselect(vi m, vf a, vf b) { return m ? a : b; }
static inline vi iselect(vi m, vi a, vi b) { return m ? a : b; }
#else
// Portable fallback: plain arrays, the compiler vectorises what it can.
struct vf { float v[kLanes]; };
struct vi { int32_t v[kLanes]; };
static inline vf vload(const float* p) { vf r; std::memcpy(r.v, p, sizeof r.v); return r; }
static inline vf vsplat(float a) { vf r; for (int i = 0; i < kLanes; ++i) r.v[i] = a; return r; }
static inline vi isplat(int32_t a) { vi r; for (int i = 0; i < kLanes; ++i) r.v[i] = a; return r; }
static inline vf operator+(vf a, vf b) { for (int i = 0; i < kLanes; ++i) a.v[i] += b.v[i]; return a; }
static inline vf operator-(vf a, vf b) { for (int i = 0; i < kLanes; ++i) a.v[i] -= b.v[i]; return a; }
static inline vf operator*(vf a, vf b) { for (int i = 0; i < kLanes; ++i) a.v[i] *= b.v[i]; return a; }
static inline vf operator-(float s, vf b) { for (int i = 0; i < kLanes; ++i) b.v[i] = s - b.v[i]; return b; }
static inline vf operator-(vf b) { for (int i = 0; i < kLanes; ++i) b.v[i] = -b.v[i]; return b; }
static inline vi operator+(vi a, vi b) { for (int i = 0; i < kLanes; ++i) a.v[i] += b.v[i]; return a; }
static inline vf vselect(vi m, vf a, vf b) { for (int i = 0; i < kLanes; ++i) a.v[i] = m.v[i] ? a.v[i] : b.v[i]; return a; }
static inline vi iselect(vi m, vi a, vi b) { for (int i = 0; i < kLanes; ++i) a.v[i] = m.v[i] ? a.v[i] : b.v[i]; return a; }
static inline vi vless(vf a, vf b) { vi r; for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] < b.v[i] ? -1 : 0; return r; }
#define VQK_LANE(v, i) (v).v[i]
#endif
#ifndef VQK_LANE
#define VQK_LANE(v, i) (v)[i]
#endif

// Distance of one row to kStep codes at once (codes along lanes), from the transposed tile.
template <int M, int DT>
static inline void step_scores(const float* ct, int64_t ld, int D, const float* const* xr, vf (&s)[kRows][kVecs]) {
  vf acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = vsplat(0.f);
  const int dd = DT > 0 ? DT : D;
  for (int d = 0; d < dd; ++d) {
    vf c[kVecs];
    for (int v = 0; v < kVecs; ++v) c[v] = vload(ct + d * ld + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const vf xv = vsplat(xr[r][d]);
      for (int v = 0; v < kVecs; ++v) {
        if (M == L2) {
          const vf t = xv - c[v];
          acc[r][v] = acc[r][v] + t * t;
        } else {
          acc[r][v] = acc[r][v] + xv * c[v];
        }
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v)
      s[r][v] = M == L2 ? acc[r][v] : (M == DOT ? -acc[r][v] : 1.f - acc[r][v]);
}

// One tile of KT codes (transposed, padded with NaN codes that never win) against kRows rows.
template <int M, int DT>
static void tile_rows(const float* ct, int64_t KT, int D, int64_t kbase, const float* const* xr, float* best, int64_t* besti) {
  vf bv[kRows];
  vi bi[kRows];
  for (int r = 0; r < kRows; ++r) { bv[r] = vsplat(std::numeric_limits<float>::infinity()); bi[r] = isplat(0); }
  vi lane;
  for (int i = 0; i < kLanes; ++i) VQK_LANE(lane, i) = i;
  for (int64_t k0 = 0; k0 < KT; k0 += kStep) {
    vf s[kRows][kVecs];
    step_scores<M, DT>(ct + k0, KT, D, xr, s);
    // Each lane sees its codes in increasing order; strict < keeps the lowest index.
    for (int v = 0; v < kVecs; ++v) {
      const vi idx = lane + isplat(static_cast<int32_t>(k0 + v * kLanes));
      for (int r = 0; r < kRows; ++r) {
        const vi m = vless(s[r][v], bv[r]);
        bv[r] = vselect(m, s[r][v], bv[r]);
        bi[r] = iselect(m, idx, bi[r]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float b = std::numeric_limits<float>::infinity();
    int32_t bidx = 0;
    bool found = false;
    for (int i = 0; i < kLanes; ++i) {
      const float val = VQK_LANE(bv[r], i);
      const int32_t id = VQK_LANE(bi[r], i);
      if (val < b || (val == b && found && id < bidx)) { b = val; bidx = id; found = true; }
    }
    // Tiles are walked in order: a later tile wins only when strictly nearer.
    if (found && b < best[r]) { best[r] = b; besti[r] = kbase + bidx; }
  }
}

template <int M, int DT>
static void small_d(const float* xf, const float* ctiles, int64_t C, int64_t N, int64_t K, int D, int64_t KT,
                    int64_t ntiles, float* outd, int64_t* outi) {
  constexpr int64_t kBlock = 64;  // rows per task: the tile is reused by 64 rows
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, C * nblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / nblocks, r0 = (task % nblocks) * kBlock, rn = std::min(kBlock, N - r0);
      float best[kBlock];
      int64_t besti[kBlock];
      for (int64_t i = 0; i < kBlock; ++i) { best[i] = std::numeric_limits<float>::infinity(); besti[i] = 0; }
      const float* x0 = xf + (c * N + r0) * D;
      for (int64_t t = 0; t < ntiles; ++t) {
        const float* ct = ctiles + (c * ntiles + t) * D * KT;
        for (int64_t g = 0; g < rn; g += kRows) {
          const float* xr[kRows];
          for (int r = 0; r < kRows; ++r) xr[r] = x0 + std::min<int64_t>(g + r, rn - 1) * D;  // pad: repeat last row
          float gb[kRows];
          int64_t gi[kRows];
          for (int r = 0; r < kRows; ++r) { gb[r] = best[std::min<int64_t>(g + r, kBlock - 1)]; gi[r] = besti[std::min<int64_t>(g + r, kBlock - 1)]; }
          tile_rows<M, DT>(ct, KT, D, t * KT, xr, gb, gi);
          for (int r = 0; r < kRows && g + r < rn; ++r) { best[g + r] = gb[r]; besti[g + r] = gi[r]; }
        }
      }
      for (int64_t i = 0; i < rn; ++i) { outd[c * N + r0 + i] = best[i]; outi[c * N + r0 + i] = besti[i]; }
    }
  });
}

template <int M>
static void small_d_dispatch(int D, const float* xf, const float* ct, int64_t C, int64_t N, int64_t K, int64_t KT,
                             int64_t ntiles, float* outd, int64_t* outi) {
  switch (D) {  // the common code sizes get a fully unrolled feature loop
    case 4: return small_d<M, 4>(xf, ct, C, N, K, D, KT, ntiles, outd, outi);
    case 8: return small_d<M, 8>(xf, ct, C, N, K, D, KT, ntiles, outd, outi);
    case 16: return small_d<M, 16>(xf, ct, C, N, K, D, KT, ntiles, outd, outi);
    case 32: return small_d<M, 32>(xf, ct, C, N, K, D, KT, ntiles, outd, outi);
    default: return small_d<M, 0>(xf, ct, C, N, K, D, KT, ntiles, outd, outi);
  }
}

// Exact fp32 distance of x to c (the definitions of vqkernels/ops/_metrics.py).
static inline float exact_distance(int metric, const float* x, const float* c, int64_t D) {
  float acc = 0.f;
  if (metric == L2) {
    for (int64_t d = 0; d < D; ++d) { const float t = x[d] - c[d]; acc += t * t; }
    return acc;
  }
  for (int64_t d = 0; d < D; ++d) acc += x[d] * c[d];
  return metric == DOT ? -acc : 1.f - acc;
}

// Minimum of one row's scores over a BLAS tile (vectorised; NaN scores never win).
static inline float tile_min(int metric, const float* s, const float* cn, int64_t kn) {
  const vf two = vsplat(2.f);
  vf bv = vsplat(std::numeric_limits<float>::infinity());
  int64_t k = 0;
  for (; k + kLanes <= kn; k += kLanes) {
    const vf sv = vload(s + k);
    const vf v = metric == L2 ? vload(cn + k) - two * sv : (metric == DOT ? -sv : 1.f - sv);
    bv = vselect(vless(v, bv), v, bv);
  }
  float b = std::numeric_limits<float>::infinity();
  for (int i = 0; i < kLanes; ++i) b = std::min(b, VQK_LANE(bv, i));
  for (; k < kn; ++k) {
    const float v = metric == L2 ? cn[k] - 2.f * s[k] : (metric == DOT ? -s[k] : 1.f - s[k]);
    if (v < b) b = v;
  }
  return b;
}

// Codes whose expanded-form score is within the score's rounding margin of the row's best
// are candidates; the winner is the lowest-index exact minimum among them, so exact ties
// between distinct codes go to the lowest index as in the reference.
constexpr int kCandidates = 16;
struct RowCandidates {
  float best = std::numeric_limits<float>::infinity();
  int n = 0;
  bool overflow = false;  // more near-ties than kept: the row is rescanned exactly ...
  float dropped = std::numeric_limits<float>::infinity();  // ... unless the best leaves them all behind
  float score[kCandidates];
  int64_t index[kCandidates];
  void add(float v, int64_t k, float margin) {
    if (n == kCandidates) {  // drop candidates the best has left behind
      int m = 0;
      for (int i = 0; i < n; ++i)
        if (score[i] <= best + margin) { score[m] = score[i]; index[m] = index[i]; ++m; }
      n = m;
      if (n == kCandidates) { overflow = true; dropped = std::min(dropped, v); return; }
    }
    score[n] = v;
    index[n] = k;
    ++n;
  }
};

static void large_d(int metric, const Tensor& xf, const Tensor& cf, const Tensor& xs, const Tensor& cs,
                    const float* cnorm, const float* margins, float* outd, int64_t* outi) {
  const int64_t C = xf.size(0), N = xf.size(1), K = cf.size(1), D = xf.size(2);
  constexpr int64_t kBlock = 256;
  // Code tile so that the [256, KT] score buffer (plus the codes) stays in a 1 MiB L2 share.
  const int64_t KT = std::min<int64_t>(K, std::max<int64_t>(64, (int64_t{1} << 18) / (kBlock + D) / 16 * 16));
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const float* xsp = xs.data_ptr<float>();
  const float* csp = cs.data_ptr<float>();
  const float* xfp = xf.data_ptr<float>();
  const float* cfp = cf.data_ptr<float>();
  at::parallel_for(0, C * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kBlock * KT);
    std::vector<RowCandidates> rows(kBlock);
    Tensor scores = at::from_blob(buf.data(), {kBlock, KT}, at::kFloat);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / nblocks, r0 = (task % nblocks) * kBlock, rn = std::min(kBlock, N - r0);
      for (int64_t i = 0; i < rn; ++i) rows[i] = RowCandidates();
      Tensor xb = at::from_blob(const_cast<float*>(xsp) + (c * N + r0) * D, {rn, D}, at::kFloat);
      for (int64_t k0 = 0; k0 < K; k0 += KT) {
        const int64_t kn = std::min(KT, K - k0);
        Tensor cb = at::from_blob(const_cast<float*>(csp) + (c * K + k0) * D, {kn, D}, at::kFloat);
        Tensor out = scores.narrow(0, 0, rn).narrow(1, 0, kn);
        at::mm_out(out, xb, cb.t());
        const int64_t ld = out.stride(0);
        const float* cn = cnorm ? cnorm + c * K + k0 : nullptr;
        for (int64_t i = 0; i < rn; ++i) {  // fused right after the tile, while it is in cache
          RowCandidates& row = rows[i];
          const float* s = buf.data() + i * ld;
          const float margin = margins[c * N + r0 + i];
          const float m = tile_min(metric, s, cn, kn);
          if (!(m <= row.best + margin)) continue;
          row.best = std::min(row.best, m);
          if (row.overflow && row.best + margin < row.dropped) row.overflow = false;
          for (int64_t k = 0; k < kn; ++k) {
            const float v = metric == L2 ? cn[k] - 2.f * s[k] : (metric == DOT ? -s[k] : 1.f - s[k]);
            if (v <= row.best + margin) row.add(v, k0 + k, margin);
          }
        }
      }
      // The score shortlisted the codes; the winner is the exact minimum among them.
      const float* co = cfp + c * K * D;
      for (int64_t i = 0; i < rn; ++i) {
        const RowCandidates& row = rows[i];
        const float* xo = xfp + (c * N + r0 + i) * D;
        float b = std::numeric_limits<float>::infinity();
        int64_t bi = 0;
        bool found = false;
        if (row.overflow) {
          for (int64_t k = 0; k < K; ++k) {
            const float e = exact_distance(metric, xo, co + k * D, D);
            if (e < b) { b = e; bi = k; found = true; }
          }
        } else {
          for (int j = 0; j < row.n; ++j) {
            if (!(row.score[j] <= row.best + margins[c * N + r0 + i])) continue;
            const float e = exact_distance(metric, xo, co + row.index[j] * D, D);
            if (!found || e < b) { b = e; bi = row.index[j]; found = true; }
          }
        }
        outi[c * N + r0 + i] = bi;
        outd[c * N + r0 + i] = found ? b : exact_distance(metric, xo, co + bi * D, D);
      }
    }
  });
}

// Largest D of the fused direct-difference kernel (above: BLAS tiles). 16 by default: at
// D = 24 and 32 the BLAS tiles (plus the exact tie re-check) ran 1.4-1.6x faster on 1 thread;
// VQKERNELS_CPU_FUSED_MAX_D overrides it (tests reach both paths at one D, benchmarks tune).
static int64_t fused_max_d() {
  static const int64_t value = [] {
    const char* env = std::getenv("VQKERNELS_CPU_FUSED_MAX_D");
    return env && *env ? std::atoll(env) : int64_t{16};
  }();
  return value;
}

static Tensor normalized(const Tensor& v) {  // F.normalize(v, dim=-1): v / max(|v|, 1e-12)
  return v / v.norm(2, {-1}, true).clamp_min(1e-12);
}

std::tuple<Tensor, Tensor> assign_cpu(const Tensor& x, const Tensor& codebook, c10::string_view metric_name) {
  TORCH_CHECK(x.device().is_cpu() && codebook.device().is_cpu(), "assign_cpu: x and codebook must be CPU tensors");
  TORCH_CHECK(x.dim() == 3 && codebook.dim() == 3, "assign_cpu: expected x [C, N, D] and codebook [C, K, D], got ",
              x.sizes(), " and ", codebook.sizes());
  TORCH_CHECK(x.size(0) == codebook.size(0) && x.size(2) == codebook.size(2),
              "assign_cpu: x ", x.sizes(), " and codebook ", codebook.sizes(), " disagree on C or D");
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "assign_cpu: x and codebook dtypes differ");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "assign_cpu: dtype ", st, " is not supported (float32, bfloat16, float16)");
  int metric;
  if (metric_name == "l2") metric = L2;
  else if (metric_name == "dot") metric = DOT;
  else if (metric_name == "cosine") metric = COSINE;
  else TORCH_CHECK(false, "assign_cpu: unknown metric '", std::string(metric_name), "' (expected l2, cosine or dot)");
  const int64_t C = x.size(0), N = x.size(1), K = codebook.size(1), D = x.size(2);
  TORCH_CHECK(K >= 1 && D >= 1, "assign_cpu: need K >= 1 and D >= 1");
  Tensor indices = at::empty({C, N}, x.options().dtype(at::kLong));
  Tensor distances = at::empty({C, N}, x.options().dtype(at::kFloat));
  if (C * N == 0) return {indices, distances};
  Tensor xf = x.to(at::kFloat).contiguous();
  Tensor cf = codebook.to(at::kFloat).contiguous();
  if (metric == COSINE) { xf = normalized(xf); cf = normalized(cf); }
  float* outd = distances.data_ptr<float>();
  int64_t* outi = indices.data_ptr<int64_t>();
  if (D <= fused_max_d()) {
    // Tiles of KT codes, transposed to [D][KT] (~32 KiB: L1-resident), NaN-padded.
    const int64_t KT = std::min<int64_t>((K + kStep - 1) / kStep * kStep, std::max<int64_t>(kStep, 8192 / D / kStep * kStep));
    const int64_t ntiles = (K + KT - 1) / KT;
    Tensor padded = at::full({C, ntiles * KT, D}, std::numeric_limits<float>::quiet_NaN(), cf.options());
    padded.narrow(1, 0, K).copy_(cf);
    Tensor ct = padded.view({C, ntiles, KT, D}).transpose(2, 3).contiguous();  // [C, ntiles, D, KT]
    const float* xp = xf.data_ptr<float>();
    const float* cp = ct.data_ptr<float>();
    const int d = static_cast<int>(D);
    if (metric == L2) small_d_dispatch<L2>(d, xp, cp, C, N, K, KT, ntiles, outd, outi);
    else if (metric == DOT) small_d_dispatch<DOT>(d, xp, cp, C, N, K, KT, ntiles, outd, outi);
    else small_d_dispatch<COSINE>(d, xp, cp, C, N, K, KT, ntiles, outd, outi);
  } else {
    Tensor xs = xf, cs = cf, cnorm;
    if (metric == L2) {
      // Shift both by the codebook's mean so ||c||^2 - 2 x.c does not cancel for offset data.
      Tensor centre = cf.mean(1, true);
      xs = (xf - centre).contiguous();
      cs = (cf - centre).contiguous();
      cnorm = cs.pow(2).sum(-1).contiguous();
    }
    // Rounding margin of the fp32 expanded-form score, per row: (D + 8) ulps of
    // |x|^2 + max |c|^2 (the size of every term of the score), doubled for safety.
    const float ulp = std::ldexp(1.0f, -23);
    Tensor margins = ((xs.pow(2).sum(-1) + cs.pow(2).sum(-1).amax(1, true)) * (2.f * (D + 8) * ulp)).contiguous();
    large_d(metric, xf, cf, xs, cs, metric == L2 ? cnorm.data_ptr<float>() : nullptr, margins.data_ptr<float>(), outd, outi);
  }
  return {indices, distances};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vqkernels, m) {
  m.def("assign_cpu(Tensor x, Tensor codebook, str metric) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) {
  m.impl("assign_cpu", &assign_cpu);
}

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cpu
#endif
#define VQK_STRINGIFY_(x) #x
#define VQK_STRINGIFY(x) VQK_STRINGIFY_(x)
#define VQK_CONCAT_(a, b) a##b
#define VQK_CONCAT(a, b) VQK_CONCAT_(a, b)

// `import vqkernels._C_cpu` (the setup.py build) runs the registrations above; the JIT
// build is loaded as a library and never calls this.
PyMODINIT_FUNC VQK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, VQK_STRINGIFY(TORCH_EXTENSION_NAME),
      "vqkernels CPU kernels; the ops are registered as torch.ops.vqkernels.*_cpu",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr,
  };
  return PyModule_Create(&module_def);
}
