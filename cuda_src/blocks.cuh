// What differs between the block formats and their numerics, for every
// kernel that quantizes (quantize.cu, experts.cu, fake_quantize.cu): values a
// block (kValues), the block's scale (scale()) and how the products become
// codes (Codes, numerics.cuh's policies of pack_block).
#pragma once

#include "numerics.cuh"

namespace nvfp4 {

// NVFP4: 16-value blocks, E4M3 scales under a global scale.
struct Nvfp4Blocks {
  static constexpr int kValues = kBlockSize;
  typedef IeeeCodes Codes;
  GlobalScale global;
  __device__ static Nvfp4Blocks from_global_scale(float gs) { return Nvfp4Blocks{global_scale(gs)}; }
  __device__ BlockScale scale(u32 amax_bits) const { return block_scale(amax_bits, global); }
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

}  // namespace nvfp4
