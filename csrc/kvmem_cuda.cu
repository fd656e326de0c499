// CUDA primitives behind kvmem.native: batched copies on a stream and batched
// VMM map/unmap through the driver API. No torch headers: the torch binding
// (kvmem_native.cpp) calls these through kvmem_cuda.h.
#include <cuda.h>
#include <cuda_runtime.h>

#include <vector>

#include "kvmem_cuda.h"

extern "C" int kvmem_cuda_copy_segments(const uint8_t* src, uint8_t* dst, const int64_t* segs,
                                        int64_t n, void* stream, int64_t* done) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  *done = 0;
  if (n <= 0) return 0;
#if CUDART_VERSION >= 12080
  // One batched call; it refuses the legacy default stream (torch's default),
  // which takes the loop below. Sources are read in stream order.
  if (s != nullptr) {
    std::vector<void*> dsts(n), srcs(n);
    std::vector<size_t> sizes(n);
    for (int64_t i = 0; i < n; ++i) {
      srcs[i] = const_cast<uint8_t*>(src) + segs[3 * i];
      dsts[i] = dst + segs[3 * i + 1];
      sizes[i] = static_cast<size_t>(segs[3 * i + 2]);
    }
    cudaMemcpyAttributes attr = {};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t idx = 0;
#if CUDART_VERSION < 13000
    size_t fail = 0;
    cudaError_t e = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(),
                                         static_cast<size_t>(n), &attr, &idx, 1, &fail, s);
#else
    cudaError_t e = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(),
                                         static_cast<size_t>(n), &attr, &idx, 1, s);
#endif
    if (e == cudaSuccess) {
      *done = n;
      return 0;
    }
    if (e != cudaErrorNotSupported && e != cudaErrorInvalidValue) return static_cast<int>(e);
    cudaGetLastError();  // not supported here: issue the copies one by one
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    cudaError_t r = cudaMemcpyAsync(dst + segs[3 * i + 1], src + segs[3 * i],
                                    static_cast<size_t>(segs[3 * i + 2]), cudaMemcpyDefault, s);
    if (r != cudaSuccess) return static_cast<int>(r);
    *done = i + 1;
  }
  return 0;
}

extern "C" int kvmem_cuda_map_pages(const uint64_t* addrs, const uint64_t* handles, int64_t n,
                                    uint64_t size, int device, int64_t* done) {
  CUmemAccessDesc desc = {};
  desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  desc.location.id = device;
  desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  *done = 0;
  for (int64_t i = 0; i < n; ++i) {
    CUdeviceptr a = static_cast<CUdeviceptr>(addrs[i]);
    CUresult r = cuMemMap(a, size, 0, static_cast<CUmemGenericAllocationHandle>(handles[i]), 0);
    if (r != CUDA_SUCCESS) return static_cast<int>(r);
    r = cuMemSetAccess(a, size, &desc, 1);
    if (r != CUDA_SUCCESS) {
      cuMemUnmap(a, size);
      return static_cast<int>(r);
    }
    *done = i + 1;
  }
  return 0;
}

extern "C" int kvmem_cuda_unmap_pages(const uint64_t* addrs, int64_t n, uint64_t size,
                                      int64_t* done) {
  *done = 0;
  for (int64_t i = 0; i < n; ++i) {
    CUresult r = cuMemUnmap(static_cast<CUdeviceptr>(addrs[i]), size);
    if (r != CUDA_SUCCESS) return static_cast<int>(r);
    *done = i + 1;
  }
  return 0;
}

extern "C" const char* kvmem_cuda_error_string(int code, int runtime) {
  if (runtime) return cudaGetErrorString(static_cast<cudaError_t>(code));
  const char* s = nullptr;
  if (cuGetErrorString(static_cast<CUresult>(code), &s) != CUDA_SUCCESS || !s) return "unknown";
  return s;
}
