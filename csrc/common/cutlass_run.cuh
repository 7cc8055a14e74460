// Host-side glue shared by the CUTLASS GEMM units (csrc/gemm/fp8_block_gemm_sm90.cu, csrc/moe/
// grouped_*): the device's SM count for the persistent schedulers, and running a configured
// GemmUniversalAdapter. Include only where CUTLASS_ARCH_MMA_SM90_SUPPORTED holds.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.h"

namespace glm45 {

// Cached per device: the query is a driver call, and every launch needs it
inline int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (!cached[device]) cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cached[device];
}

inline cutlass::KernelHardwareInfo hardware_info(int device) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);
  return hw;
}

// Initializes and runs Gemm on stream; TORCH_CHECK names `op` if CUTLASS refuses. The workspace
// (Stream-K partial tiles, grouped scheduler state) comes from the caching allocator on this
// stream: no sync, graph-capturable.
template <class Gemm>
void run_cutlass_gemm(const typename Gemm::Arguments& args, int device, cudaStream_t stream, const char* op) {
  Gemm gemm;
  at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  cutlass::Status st = gemm.initialize(args, workspace.data_ptr(), stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, op, ": CUTLASS initialize failed: ", cutlassGetStatusString(st));
  st = gemm.run(stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, op, ": CUTLASS run failed: ", cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace glm45
