// The benchmark's yardstick: a plain 16-byte-per-thread device copy, the
// same access pattern the quantizer uses, timed like it. (A cudaMemcpy inside
// a CUDA graph runs on the copy engines, which are slower than the SMs.)
extern "C" __global__ void copy_16_bytes_per_thread(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                                    long long count) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i < count) dst[i] = __ldg(src + i);
}
