// exp32 and silu32 (cuda_src/fused_math.cuh) of given float32 bit patterns,
// one value a thread, grid-stride, for tests/test_silu_and_mul_gpu.py, which
// compares them with the golden model's. Appended to cuda_src/fused_math.cuh.
using namespace nvfp4;

extern "C" __global__ void exp32_bits(const unsigned* in, unsigned* out, long long count) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count; i += gridDim.x * (long long)blockDim.x) {
    out[i] = __float_as_uint(exp32(__uint_as_float(in[i])));
  }
}

extern "C" __global__ void silu32_bits(const unsigned* in, unsigned* out, long long count) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count; i += gridDim.x * (long long)blockDim.x) {
    out[i] = __float_as_uint(silu32(__uint_as_float(in[i])));
  }
}
