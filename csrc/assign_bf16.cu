// assign for __nv_bfloat16 inputs: one dtype instantiation group per translation unit.
#include "assign_launch.cuh"

namespace vqk {

cudaError_t assign_bf16(const AssignArgs& a) { return run_assign<__nv_bfloat16>(a, Scalar::kBFloat16); }

}  // namespace vqk
