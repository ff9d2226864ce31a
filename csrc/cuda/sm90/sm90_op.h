// Host-side helpers shared by the sm_90a ops (csrc/cuda/ahn_fwd_sm90.cu, csrc/cuda/ahn_bwd_sm90.cu).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace ahn_sm90 {

// The kernels use wgmma, TMA and setmaxnreg, which exist only on compute capability 9.0 (sm_90a): any other
// device is refused before a launch, the error naming the op
inline void require_sm90(int device, const char* op) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0, op, ": needs a compute capability 9.0 GPU (sm_90a), got ", major, ".", minor);
}

}  // namespace ahn_sm90
