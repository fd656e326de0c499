// Plain C interface of the CUDA primitives (kvmem_cuda.cu). nvcc compiles that
// file on its own: no torch header is needed on either side of this interface.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Copy n byte segments (src_off, dst_off, nbytes) from src to dst on `stream`
// (a cudaStream_t), in one call: cudaMemcpyBatchAsync where the runtime has
// it, else a loop of cudaMemcpyAsync. Returns a cudaError_t (0 on success);
// *done is the number of segments issued before a failure.
int kvmem_cuda_copy_segments(const uint8_t* src, uint8_t* dst, const int64_t* segs, int64_t n,
                             void* stream, int64_t* done);

// Map n physical allocations (CUmemGenericAllocationHandle) of `size` bytes at
// the given virtual addresses and grant read/write access from `device`:
// cuMemMap + cuMemSetAccess per page. Returns a CUresult; *done pages are
// mapped (and accessible) when it fails.
int kvmem_cuda_map_pages(const uint64_t* addrs, const uint64_t* handles, int64_t n, uint64_t size,
                         int device, int64_t* done);

// cuMemUnmap of n pages of `size` bytes. Returns a CUresult; *done pages unmapped.
int kvmem_cuda_unmap_pages(const uint64_t* addrs, int64_t n, uint64_t size, int64_t* done);

// The text of a CUDA runtime (runtime=1) or driver (runtime=0) error code.
const char* kvmem_cuda_error_string(int code, int runtime);

#ifdef __cplusplus
}
#endif
