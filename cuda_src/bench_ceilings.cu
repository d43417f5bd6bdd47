// The benchmark's pattern ceilings (`nvfp4-cupy bench --ceilings`): kernels
// that move exactly the bytes the library's kernels move, with their access
// pattern, and do no arithmetic (only moving and xor-ing bits, so that no
// load can be dropped). nvfp4_cupy/_bench.py compiles them through the
// library's NVRTC path, sweeps the mapping and the thread block, and checks
// every byte each one writes before timing it.
//
// Shapes are the launcher's business: n a multiple of the values a thread
// takes, rows a multiple of 128 and blocks a multiple of 4 (no layout padding
// to write), as at every shape the benchmark runs.
#include "layouts.cuh"

namespace bench {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// kWords consecutive 32-bit words: one 8-byte access for two words, else
// 16-byte ones (read-only path for loads).
template <int kWords>
__device__ __forceinline__ void load_words(const u8* __restrict__ src, u32 (&words)[kWords]) {
  if constexpr (kWords == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
    words[0] = v.x;
    words[1] = v.y;
  } else {
    static_assert(kWords % 4 == 0, "16-byte pieces");
#pragma unroll
    for (int q = 0; q < kWords / 4; ++q) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src) + q);
      words[4 * q + 0] = v.x;
      words[4 * q + 1] = v.y;
      words[4 * q + 2] = v.z;
      words[4 * q + 3] = v.w;
    }
  }
}

template <int kWords>
__device__ __forceinline__ void store_words(u8* __restrict__ dst, const u32 (&words)[kWords]) {
  if constexpr (kWords == 2) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
  } else {
    static_assert(kWords % 4 == 0, "16-byte pieces");
#pragma unroll
    for (int q = 0; q < kWords / 4; ++q) {
      reinterpret_cast<uint4*>(dst)[q] = make_uint4(words[4 * q], words[4 * q + 1], words[4 * q + 2], words[4 * q + 3]);
    }
  }
}

// kBytes (1, 2 or 4) consecutive scale bytes, in one access.
template <int kBytes>
__device__ __forceinline__ void store_scales(u8* __restrict__ dst, u32 bytes) {
  if constexpr (kBytes == 1) {
    *dst = (u8)bytes;
  } else if constexpr (kBytes == 2) {
    *reinterpret_cast<u16*>(dst) = (u16)bytes;
  } else {
    static_assert(kBytes == 4, "1, 2 or 4 scale bytes");
    *reinterpret_cast<u32*>(dst) = bytes;
  }
}

template <int kBytes>
__device__ __forceinline__ u32 load_scales(const u8* __restrict__ src) {
  if constexpr (kBytes == 1) {
    return __ldg(src);
  } else if constexpr (kBytes == 2) {
    return __ldg(reinterpret_cast<const u16*>(src));
  } else {
    static_assert(kBytes == 4, "1, 2 or 4 scale bytes");
    return __ldg(reinterpret_cast<const u32*>(src));
  }
}

// This thread's group of blocks in the quantizer's launch geometry (threads x
// / blockIdx.y over a row's groups, threads y / blockIdx.x over rows), and
// its index in row-major order; false outside [m, groups).
struct GroupThread {
  int row, group;
  long long index;
  __device__ __forceinline__ bool locate(int m, int groups) {
    row = blockIdx.x * blockDim.y + threadIdx.y;
    group = blockIdx.y * blockDim.x + threadIdx.x;
    index = (long long)row * groups + group;
    return row < m && group < groups;
  }
};

// Quantization's bytes: x [m, n] of kInputBytes-byte values read, packed
// [m, n / 2] and one scale byte per kBlockValues values (the 128x4 swizzled
// layout) written. One thread takes a group of kBlocksPerThread consecutive
// blocks of a row (GroupThread) and stores their scale bytes in one access.
// Packed word j is the xor of the input words of its 8 values; a block's
// scale byte is the low byte of its first packed word (the benchmark checks
// both).
template <int kInputBytes, int kBlockValues, int kBlocksPerThread>
__global__ void quantize_pattern(const u8* __restrict__ x, int m, int groups, int scale_cols, u8* __restrict__ packed,
                                 u8* __restrict__ scales) {
  constexpr int kValues = kBlockValues * kBlocksPerThread;
  constexpr int kInWords = kValues * kInputBytes / 4;
  constexpr int kOutWords = kValues / 8;
  constexpr int kFold = kInWords / kOutWords;
  constexpr int kWordsPerBlock = kBlockValues / 8;
  GroupThread t;
  if (!t.locate(m, groups)) return;
  u32 in[kInWords];
  load_words<kInWords>(x + t.index * (4 * kInWords), in);
  u32 out[kOutWords];
#pragma unroll
  for (int j = 0; j < kOutWords; ++j) {
    out[j] = in[j * kFold];
#pragma unroll
    for (int f = 1; f < kFold; ++f) out[j] ^= in[j * kFold + f];
  }
  store_words<kOutWords>(packed + t.index * (4 * kOutWords), out);
  u32 scale_bytes = 0;
#pragma unroll
  for (int b = 0; b < kBlocksPerThread; ++b) scale_bytes |= (out[b * kWordsPerBlock] & 0xffu) << (8 * b);
  const long long scale_offset = nvfp4::SwizzledScales::offset(t.row, t.group * kBlocksPerThread, scale_cols);
  store_scales<kBlocksPerThread>(scales + scale_offset, scale_bytes);
}

// The global scale's bytes: x read, nothing written but one word. Each of
// kThreads threads xors kValuesPerThread 16-bit values per tile of kThreads
// * kValuesPerThread values, either its own consecutive run (kInterleaved
// false; the amax kernel's pattern at 16 values) or one 16-byte piece every
// kThreads pieces (each load instruction of a warp reads 512 consecutive
// bytes). Thread block b takes tiles b, b + gridDim.x, ...: a grid of `tiles`
// thread blocks is one tile each, a smaller grid strides. Then warp and
// thread-block xor, and one atomic per thread block. Xor, not or or max, so that the result (the xor
// of every word of x) shows each word was read once.
template <int kThreads, int kValuesPerThread, bool kInterleaved>
__global__ void __launch_bounds__(kThreads) reduce_pattern(const uint4* __restrict__ x, long long tiles,
                                                           u32* __restrict__ result) {
  constexpr int kLoads = kValuesPerThread / 8;
  constexpr int kTileVectors = kThreads * kLoads;
  const uint4* p = x + (long long)blockIdx.x * kTileVectors + (kInterleaved ? threadIdx.x : threadIdx.x * kLoads);
  const long long step = (long long)gridDim.x * kTileVectors;
  u32 acc = 0;
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x, p += step) {
    uint4 v[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) v[j] = __ldg(p + (kInterleaved ? j * kThreads : j));
#pragma unroll
    for (int j = 0; j < kLoads; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  }
  acc = __reduce_xor_sync(0xffffffffu, acc);
  constexpr int kWarps = kThreads / 32;
  __shared__ u32 warp_acc[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_acc[warp] = acc;
  __syncthreads();
  if (warp != 0) return;
  acc = lane < kWarps ? warp_acc[lane] : 0u;
  acc = __reduce_xor_sync(0xffffffffu, acc);
  if (lane == 0) atomicXor(result, acc);
}

// Dequantization's bytes: packed [m, n / 2] and the swizzled scales of
// 16-value blocks read, out [m, n] of kOutputBytes-byte values written. One
// thread takes a group of kBlocksPerThread consecutive blocks of a row
// (GroupThread) and loads their scale bytes in one access. Each output
// word is one byte permute of a packed word and its block's scale byte.
template <int kOutputBytes, int kBlocksPerThread>
__global__ void dequantize_pattern(const u8* __restrict__ packed, const u8* __restrict__ scales, int m, int groups,
                                   int scale_cols, u8* __restrict__ out) {
  constexpr int kValues = 16 * kBlocksPerThread;
  constexpr int kInWords = kValues / 8;
  constexpr int kOutWords = kValues * kOutputBytes / 4;
  constexpr int kSpread = kOutWords / kInWords;
  constexpr int kOutWordsPerBlock = kOutWords / kBlocksPerThread;
  GroupThread t;
  if (!t.locate(m, groups)) return;
  u32 codes[kInWords];
  load_words<kInWords>(packed + t.index * (4 * kInWords), codes);
  const long long scale_offset = nvfp4::SwizzledScales::offset(t.row, t.group * kBlocksPerThread, scale_cols);
  const u32 scale_bytes = load_scales<kBlocksPerThread>(scales + scale_offset);
  u32 words[kOutWords];
#pragma unroll
  for (int i = 0; i < kOutWords; ++i) {
    // Bytes: code byte i % 4, scale byte, code byte i % 4, scale byte.
    const u32 scale = scale_bytes >> (8 * (i / kOutWordsPerBlock));
    words[i] = __byte_perm(codes[i / kSpread], scale, 0x4040u + 0x0101u * (i & 3));
  }
  store_words<kOutWords>(out + t.index * (4 * kOutWords), words);
}

// Dequantization's bytes as dequantize_pattern, stored the way the library's
// dequantize stores them: every store instruction of a warp writes 512
// consecutive bytes of out. The warp's 32 groups are one run of a row
// (the benchmark launches this kernel only where a row has whole warps of
// groups); lane L stores 16-byte piece j * 32 + L of the run, loads the
// codes of that piece's values, and takes their block's scale byte from the
// lane that loaded it (one scale access a thread, as above).
template <int kOutputBytes, int kBlocksPerThread>
__global__ void dequantize_pattern_coalesced(const u8* __restrict__ packed, const u8* __restrict__ scales, int m,
                                             int groups, int scale_cols, u8* __restrict__ out) {
  constexpr int kValues = 16 * kBlocksPerThread;
  constexpr int kPieces = kValues * kOutputBytes / 16;  // 16-byte stores a thread
  constexpr int kPieceValues = 16 / kOutputBytes;
  constexpr int kPieceCodeBytes = kPieceValues / 2;  // 4 or 2
  GroupThread t;
  if (!t.locate(m, groups)) return;  // whole warps: all lanes return or none
  const int lane = threadIdx.x & 31;
  const long long run = t.index - lane;  // the warp's first group
  const u32 scale_bytes =
      load_scales<kBlocksPerThread>(scales + nvfp4::SwizzledScales::offset(t.row, t.group * kBlocksPerThread, scale_cols));
  const u8* codes = packed + run * (kValues / 2);
  uint4* dst = reinterpret_cast<uint4*>(out + run * (kValues * kOutputBytes));
#pragma unroll
  for (int j = 0; j < kPieces; ++j) {
    const int piece = j * 32 + lane;
    const u32 code = kPieceCodeBytes == 4 ? __ldg(reinterpret_cast<const u32*>(codes) + piece)
                                          : (u32)__ldg(reinterpret_cast<const u16*>(codes) + piece);
    const int block = piece * kPieceValues / 16;  // in the run
    const u32 scale = __shfl_sync(0xffffffffu, scale_bytes, block / kBlocksPerThread) >> (8 * (block % kBlocksPerThread));
    u32 words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) words[i] = __byte_perm(code, scale, 0x4040u + 0x0101u * (i % kPieceCodeBytes));
    dst[piece] = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

}  // namespace bench
