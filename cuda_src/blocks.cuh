// What differs between the block formats and their numerics, for every
// kernel that quantizes (quantize.cu, experts.cu, fake_quantize.cu): values a
// block (kValues), the block's scale (scale()) and how the products become
// codes (Codes, numerics.cuh's policies of pack_block; or, for stochastic
// rounding, the Blocks' own pack(), through pack_piece below).
#pragma once

#include "numerics.cuh"
#include "stochastic.cuh"

namespace nvfp4 {

// NVFP4: 16-value blocks, E4M3 scales under a global scale.
struct Nvfp4Blocks {
  static constexpr int kValues = kBlockSize;
  typedef IeeeCodes Codes;
  GlobalScale global;
  __device__ static Nvfp4Blocks from_global_scale(float gs) { return Nvfp4Blocks{global_scale(gs)}; }
  __device__ BlockScale scale(u32 amax_bits) const { return block_scale(amax_bits, global); }
};

// Nvfp4Blocks for a thread block that shares one global scale: step 5 read
// from a table in shared memory (fill_reciprocal_table), one load instead of
// about a dozen instructions a block.
struct Nvfp4TableBlocks {
  static constexpr int kValues = kBlockSize;
  typedef IeeeCodes Codes;
  GlobalScale global;
  const float* reciprocals;  // shared memory, kReciprocalTableSize entries, filled
  __device__ BlockScale scale(u32 amax_bits) const {
    if (!block_scale_is_fast(amax_bits, global)) return block_scale_exact(amax_bits, global.value);
    const u8 scale_byte = fast_scale_byte(amax_bits, global);
    return fast_block_scale(scale_byte, reciprocals[scale_byte]);
  }
};

// NVFP4 with numerics="te": TransformerEngine's arithmetic (docs/te_numerics.md).
struct Nvfp4TeBlocks {
  static constexpr int kValues = kBlockSize;
  typedef TeCodes Codes;
  TeGlobalScale global;
  __device__ static Nvfp4TeBlocks from_global_scale(float gs) { return Nvfp4TeBlocks{te_global_scale(gs)}; }
  __device__ BlockScale scale(u32 amax_bits) const { return te_block_scale(amax_bits, global); }
};

// MXFP4: 32-value blocks, E8M0 scales, no global scale; the scale rule
// "floor" (OCP), and "rceil" and "te_pow2" (docs/stochastic_rounding_and_mx_rules.md).
struct Mxfp4Blocks {
  static constexpr int kValues = kMxBlockSize;
  typedef IeeeCodes Codes;
  __device__ BlockScale scale(u32 amax_bits) const { return mx_block_scale(amax_bits); }
};

struct Mxfp4RceilBlocks {
  static constexpr int kValues = kMxBlockSize;
  typedef RceilCodes Codes;
  __device__ BlockScale scale(u32 amax_bits) const { return mx_block_scale_rceil(amax_bits); }
};

struct Mxfp4TePow2Blocks {
  static constexpr int kValues = kMxBlockSize;
  typedef TeCodes Codes;
  __device__ BlockScale scale(u32 amax_bits) const { return mx_block_scale_te_pow2(amax_bits); }
};

// NVFP4 with stochastic rounding of the codes
// (docs/stochastic_rounding_and_mx_rules.md, section 2): Nvfp4Blocks' scales
// and products; block k of the thread's row is element group
// first_group + k, whose Philox4x32-10 words (key = the seed, counter =
// (offset lo, offset hi, g lo, g hi)) round its 16 codes.
struct Nvfp4SrBlocks {
  static constexpr int kValues = kBlockSize;
  GlobalScale global;
  u32 seed_lo, seed_hi, offset_lo, offset_hi;
  unsigned long long first_group;
  __device__ BlockScale scale(u32 amax_bits) const { return block_scale(amax_bits, global); }
  template <typename Input>
  __device__ __forceinline__ uint2 pack(const u32* words, const BlockScale& scale, int k) const {
    const unsigned long long group = first_group + (unsigned long long)k;
    const uint4 counter = make_uint4(offset_lo, offset_hi, (u32)group, (u32)(group >> 32));
    return pack_block_sr<Input>(words, scale, philox4x32_10(counter, seed_lo, seed_hi));
  }
};

// Whether a Blocks packs its codes itself (pack(words, scale, k), k the
// block's index in its row) instead of through its Codes policy.
template <typename Blocks>
struct PacksItself {
  static constexpr bool value = false;
};
template <>
struct PacksItself<Nvfp4SrBlocks> {
  static constexpr bool value = true;
};

// The packed codes of 16 values of block k of a row, as `blocks` makes them.
template <typename Input, typename Blocks>
__device__ __forceinline__ uint2 pack_piece(const Blocks& blocks, const u32* words, const BlockScale& scale, int k) {
  if constexpr (PacksItself<Blocks>::value) {
    return blocks.template pack<Input>(words, scale, k);
  } else {
    return pack_block<Input, typename Blocks::Codes>(words, scale);
  }
}

}  // namespace nvfp4
