// TransformerEngine's random Hadamard transform of a 16-value chunk
// (docs/te_rht_and_4over6.md, part A), its inverse (docs/fused_ops.md,
// section 6.2), and the transformed chunk as TE's quantizer reads it: shared
// by rht.cu's kernels and fake_quantize.cu's RHT quantizer.
#pragma once

#include "numerics.cuh"
#include "load.cuh"
#include "output.cuh"

namespace nvfp4 {

// TE's sign vector (A.1) as bits: bit i set where s_i = -1. tests/test_compile.py
// checks it against reference.te_rht.RHT_SIGNS.
constexpr u32 kRhtNegativeSigns = 0xD7E8u;

// A.2's four butterfly stages, in place: partners 1, 2, 4 and 8 apart, each
// pair (a, b) becoming (RN(a + b), RN(a - b)), in that order, no reassociation.
__device__ __forceinline__ void butterflies16(float (&v)[kBlockSize]) {
#pragma unroll
  for (int half = 1; half < kBlockSize; half <<= 1) {
#pragma unroll
    for (int i = 0; i < kBlockSize; ++i) {
      if (i & half) continue;
      const float a = v[i];
      const float b = v[i + half];
      v[i] = add_rn(a, b);
      v[i + half] = sub_rn(a, b);
    }
  }
}

__device__ __forceinline__ bool rht_sign_is_negative(int i) { return (kRhtNegativeSigns >> i) & 1u; }

// The transform of one 16-value chunk, in place (A.2): t_i = RN(v_i * (+-0.25)),
// then the butterflies.
__device__ __forceinline__ void rht16(float (&v)[kBlockSize]) {
#pragma unroll
  for (int i = 0; i < kBlockSize; ++i) v[i] = mul_rn(v[i], rht_sign_is_negative(i) ? -0.25f : 0.25f);
  butterflies16(v);
}

// Its inverse (M^-1 = M^T = 0.25 * H16 * diag(signs); docs/fused_ops.md,
// section 6.2): t_i = RN(y_i * 0.25), the butterflies, then value i's sign
// flipped where s_i = -1 (exact).
__device__ __forceinline__ void inverse_rht16(float (&v)[kBlockSize]) {
#pragma unroll
  for (int i = 0; i < kBlockSize; ++i) v[i] = mul_rn(v[i], 0.25f);
  butterflies16(v);
#pragma unroll
  for (int i = 0; i < kBlockSize; ++i) {
    if (rht_sign_is_negative(i)) v[i] = neg_f32(v[i]);
  }
}

// The transformed chunk at columns [col, col + 16) of a row (col < n, n a
// multiple of 16), as the quantizer reads it: kToInput and 16-bit x: the
// values rounded to x's dtype (cvt.rn, overflow to inf), two a word, in
// Input's words; else float32 bits, one a word (Float32Input's).
template <bool kNarrow, typename Input>
struct RhtQuantized {  // the Input struct the quantizer reads the transformed words with
  typedef Float32Input type;
};
template <typename Input>
struct RhtQuantized<true, Input> {
  typedef Input type;
};

template <typename Input, bool kToInput>
struct RhtChunk {
  static constexpr bool kNarrow = kToInput && sizeof(typename Input::raw_t) == 2;
  typedef typename RhtQuantized<kNarrow, Input>::type Quantized;
  static constexpr int kWords = kNarrow ? 8 : 16;
  u32 words[kWords];

  template <bool kVectorLoads>
  __device__ __forceinline__ void load(const typename Input::raw_t* __restrict__ row, int col, int n) {
    u32 raw[4 * sizeof(typename Input::raw_t)];
    load_block<Input, kVectorLoads>(row, col, n, raw);
    transform(raw);
  }

  // The chunk of 16 values of x held in Input's words.
  __device__ __forceinline__ void transform(const u32 (&raw)[4 * sizeof(typename Input::raw_t)]) {
    float v[kBlockSize];
#pragma unroll
    for (int j = 0; j < kBlockSize; ++j) v[j] = Input::element(raw, j);
    rht16(v);
    if constexpr (kNarrow) {
      typedef typename OutputOf<Input>::type Output;
#pragma unroll
      for (int w = 0; w < 8; ++w) words[w] = Output::from_f32x2(v[2 * w], v[2 * w + 1]);
    } else {
#pragma unroll
      for (int j = 0; j < kBlockSize; ++j) words[j] = __float_as_uint(v[j]);
    }
  }
};

}  // namespace nvfp4
