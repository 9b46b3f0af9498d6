// Torch-side helpers the glue translation units share (vq_ops.cpp, residual_assign_ops.cpp):
// torch arguments turned into launch.h's ids, with the ops' messages. Host C++ only; the .cu
// files include launch.h, never this.
#pragma once

#include <optional>
#include <string>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "launch.h"

namespace vqk {

// The metric argument of the ops as a kMetric* id.
inline int parse_metric(c10::string_view metric) {
  if (metric == "l2") return kMetricL2;
  if (metric == "cosine") return kMetricCosine;
  if (metric == "dot") return kMetricDot;
  TORCH_CHECK(false, "metric must be one of ('l2', 'cosine', 'dot'), got '", std::string(metric), "'");
  return kMetricL2;  // unreachable
}

// A dtype the kernels take (fp16, bf16, fp32, fp64) as its Scalar id; nullopt for any other.
inline std::optional<Scalar> scalar_of(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Half:
      return Scalar::kHalf;
    case c10::ScalarType::BFloat16:
      return Scalar::kBFloat16;
    case c10::ScalarType::Float:
      return Scalar::kFloat;
    case c10::ScalarType::Double:
      return Scalar::kDouble;
    default:
      return std::nullopt;
  }
}

}  // namespace vqk
