// Shared device helpers for the vqkernels CUDA kernels.
//
// Every header under csrc/kernels/ is plain CUDA C++ on raw pointers and sizes: no torch
// headers, so CI compiles (and ptxas-checks) them with nvcc on a machine without a GPU or
// a CUDA build of torch. The torch glue lives in csrc/vq_ops.cpp.
//
// The build passes torch's -D__CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so every half/bfloat16 conversion here is an explicit
// intrinsic.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace vqk {

enum Metric : int { kL2 = 0, kCosine = 1, kDot = 2 };

// F.normalize's eps: a norm below it is clamped, so a zero vector has cosine 0 with everything.
constexpr float kNormEps = 1e-12f;

// "No candidate yet" code index. Larger than any valid index (K <= 0x7FFFFFFE is checked
// by the host), so a real candidate always wins a lexicographic tie against it.
constexpr unsigned kNoCode = 0x7FFFFFFFu;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ double to_f64(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_f64(double v) { return v; }

// Round a float (or double) to the storage type T with round-to-nearest-even.
template <typename T>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
  static __device__ __forceinline__ float from(double v) { return static_cast<float>(v); }
};
template <>
struct Store<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half from(double v) { return __float2half_rn(static_cast<float>(v)); }
};
template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(double v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Lexicographic (value, index) minimum: equal values keep the LOWER index. Used wherever
// partial minima from different threads / warps / blocks meet, so the tie rule holds
// regardless of which partial arrives first. NaN never enters (candidates are only taken
// with a strict `<`, which is false for NaN).
__device__ __forceinline__ void argmin_merge(float& v, unsigned& i, float ov, unsigned oi) {
  if (ov < v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

// Merge the (value, index) minimum across the lanes that differ in the bits of `lane_mask`
// (a power-of-two run of low bits, e.g. 3 = a quad, 15 = a half-warp). Every lane ends
// with the group's minimum.
__device__ __forceinline__ void warp_argmin(float& v, unsigned& i, int lane_mask) {
  for (int off = 1; off <= lane_mask; off <<= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const unsigned oi = __shfl_xor_sync(0xffffffffu, i, off);
    argmin_merge(v, i, ov, oi);
  }
}

// Pack (value, index) into one 64-bit key whose unsigned order is the lexicographic order
// of the pair: the float is mapped to an order-preserving unsigned (negative floats have
// all bits flipped, positive ones get the sign bit set), -0 is folded into +0 (they compare
// equal as floats, so they must tie here too), and the index fills the low 32 bits. One
// atomicMin per row then merges the partial minima of every block and K split.
__device__ __forceinline__ unsigned long long pack_argmin_key(float v, unsigned idx) {
  unsigned u = __float_as_uint(v);
  if (u == 0x80000000u) u = 0u;
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(u) << 32) | static_cast<unsigned long long>(idx);
}

__device__ __forceinline__ unsigned key_index(unsigned long long key) {
  return static_cast<unsigned>(key & 0xffffffffull);
}

}  // namespace vqk
