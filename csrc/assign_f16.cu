// assign for __half inputs: one dtype instantiation group per translation unit.
#include "assign_launch.cuh"

namespace vqk {

cudaError_t assign_f16(const AssignArgs& a) { return run_assign<__half>(a, Scalar::kHalf); }

}  // namespace vqk
