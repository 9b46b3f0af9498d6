// assign for float inputs: one dtype instantiation group per translation unit.
#include "assign_launch.cuh"

namespace vqk {

cudaError_t assign_f32(const AssignArgs& a) { return run_assign<float>(a, Scalar::kFloat); }

}  // namespace vqk
