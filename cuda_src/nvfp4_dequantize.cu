// NVFP4 -> float16 / bfloat16 / float32, the inverse of nvfp4_quantize.cu for
// every scale layout: value = e2m1 * float(e4m3) / global_scale in IEEE
// float32 (round-to-nearest-even, subnormals kept), then one rounding to the
// output type. A NaN result is written as the output type's canonical quiet
// NaN, so that the bytes are defined. One thread per 16-value block.
#include "nvfp4_numerics.cuh"
#include "scale_layouts.cuh"

namespace nvfp4 {

struct Float16Output {
  typedef u16 raw_t;
  static constexpr u32 kCanonicalNaN = 0x7e00u;
  __device__ static u32 from_f32(float v) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
};

struct BFloat16Output {
  typedef u16 raw_t;
  static constexpr u32 kCanonicalNaN = 0x7fc0u;
  __device__ static u32 from_f32(float v) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
};

struct Float32Output {
  typedef u32 raw_t;
  static constexpr u32 kCanonicalNaN = 0x7fc00000u;
  __device__ static u32 from_f32(float v) { return __float_as_uint(v); }
};

// E2M1 code (bit 3 sign) -> float32: codes 2..7 are 1.m * 2^(e - 1) with
// e = code >> 1 and one mantissa bit; code 1 is 0.5.
__device__ __forceinline__ float e2m1_to_f32(u32 code) {
  const u32 magnitude = code & 7u;
  const u32 bits = magnitude >= 2u ? ((((magnitude >> 1) + 126u) << 23) | ((magnitude & 1u) << 22))
                                   : (magnitude ? 0x3f000000u : 0u);
  return __uint_as_float(bits | ((code & 8u) << 28));
}

// Any E4M3 byte -> float32 (0x7f / 0xff are NaN).
__device__ __forceinline__ float e4m3_to_f32_signed(u8 byte) {
  if ((byte & 0x7fu) == 0x7fu) return __uint_as_float(0x7fc00000u);
  return __uint_as_float(__float_as_uint(e4m3_to_f32((u8)(byte & 0x7fu))) | ((u32)(byte & 0x80u) << 24));
}

// kMx: MXFP4 input (32-value blocks, E8M0 scales; the launcher passes a
// global scale of 1, so one formula serves both formats).
template <typename Output, typename Layout, bool kVectorStores, bool kMx>
__global__ void __launch_bounds__(256)
dequantize_nvfp4(const uint2* __restrict__ packed, const u8* __restrict__ scales, int m, int n, int padded_n,
                 const float* __restrict__ global_scale_ptr, float global_scale_value, int global_scale_row_step,
                 typename Output::raw_t* __restrict__ out, int scale_cols) {
  typedef typename Output::raw_t raw_t;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  const int col = k * 16;
  if (row >= m || col >= n) return;

  const uint2 codes = packed[(long long)row * (padded_n >> 4) + k];
  const u8 scale_byte = scales[Layout::offset(row, kMx ? k >> 1 : k, scale_cols)];
  const float sf = kMx ? e8m0_to_f32(scale_byte) : e4m3_to_f32_signed(scale_byte);
  const float gs =
      global_scale_ptr ? __ldg(global_scale_ptr + (long long)row * global_scale_row_step) : global_scale_value;
  // Exact shortcut: e2m1 * sf / gs takes only two quotients per block. Every
  // E2M1 magnitude is 1 or 3 times a power of two (0.5 = 1/2, 1.5 = 3/2, ...),
  // and scaling by 2^k commutes with rounding while results stay normal, so
  // q1 = sf / gs and q3 = 3 sf / gs, times 2^k, are the per-value quotients.
  // Blocks where q1 / 2 could be subnormal or 4 q1 overflow (and NaN / inf
  // quotients) divide per value, as the formula says.
  const float q1 = div_rn(sf, gs);
  const float q3 = div_rn(mul_rn(3.0f, sf), gs);
  const float zero = div_rn(mul_rn(0.0f, sf), gs);  // +0, or NaN for a NaN scale / zero gs
  const u32 q1_bits = __float_as_uint(q1) & kF32AbsMask;
  const bool shortcut = q1_bits >= 0x01000000u && q1_bits < 0x7d800000u;  // 2^-125 <= |q1| < 2^124
  u32 words[4 * sizeof(raw_t)];
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const u32 code = ((j < 8 ? codes.x : codes.y) >> (4 * (j & 7))) & 0xfu;
    const u32 magnitude = code & 7u;
    float v;
    if (shortcut) {
      // 0.5 = 1 * 2^-1; 2^(e-1) (1, 2, 4) for even codes >= 2; 3 * 2^(e-2) for odd codes >= 3.
      const bool odd = magnitude >= 3u && (magnitude & 1u);
      const int exponent = magnitude == 1u ? -1 : (int)(magnitude >> 1) - 1 - (int)(magnitude & 1u);
      const float value = magnitude ? mul_rn(odd ? q3 : q1, __uint_as_float((u32)(exponent + 127) << 23)) : zero;
      v = __uint_as_float(__float_as_uint(value) ^ ((code & 8u) << 28));  // (-a) / b = -(a / b)
    } else {
      v = div_rn(mul_rn(e2m1_to_f32(code), sf), gs);
    }
    const u32 bits = (__float_as_uint(v) & kF32AbsMask) > kF32InfBits ? Output::kCanonicalNaN : Output::from_f32(v);
    if (sizeof(raw_t) == 4) {
      words[j] = bits;
    } else if (j & 1) {
      words[j >> 1] |= bits << 16;
    } else {
      words[j >> 1] = bits;
    }
  }
  raw_t* dst = out + (long long)row * n + col;
  if (kVectorStores) {
    // The launcher guarantees 16-byte alignment and n % 8 == 0 on this path:
    // each 16-byte piece lies wholly inside or outside [0, n).
    constexpr int kValuesPerVector = 16 / sizeof(raw_t);
#pragma unroll
    for (int q = 0; q < (int)sizeof(raw_t); ++q) {
      if (col + q * kValuesPerVector < n) {
        reinterpret_cast<uint4*>(dst)[q] = make_uint4(words[4 * q], words[4 * q + 1], words[4 * q + 2], words[4 * q + 3]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      if (col + j < n) dst[j] = (raw_t)(sizeof(raw_t) == 4 ? words[j] : (words[j >> 1] >> (16 * (j & 1))));
    }
  }
}

}  // namespace nvfp4
