// NVFP4 / MXFP4 -> float16 / bfloat16 / float32, the inverse of quantize.cu
// for every scale layout (docs/format.md, Dequantization): value = e2m1 *
// float(e4m3) / global_scale in IEEE float32 (round-to-nearest-even,
// subnormals kept), then one rounding to the output type. A NaN result is
// written as the output type's canonical quiet NaN, so that the bytes are
// defined.
//
// Thread mapping: threadIdx.y / blockIdx.x walk rows, threadIdx.x /
// blockIdx.y a row's 16-value blocks, up to kMaxSteps blocks a thread (see
// dequantize_fp4). The block arithmetic is decode.cuh's (its fast path:
// docs/format.md, section 8.1). With one global scale for a whole thread
// block, the tables of all 256 scale bytes are made once per thread block.
#include "decode.cuh"
#include "layouts.cuh"

namespace nvfp4 {

// NVFP4 or, with kMx, MXFP4 (32-value blocks, E8M0 scales, no global scale;
// each 16-value half of a block is handled like an NVFP4 block). blockIdx.z
// is the expert of an [E, m, K/2] batch, each with its own packed rows,
// complete scale tensor and output rows; the global scale of (expert, row)
// is global_scale_ptr[expert * expert_step + row * row_step] (steps 0 for
// one scale, 1 and 0 for one per expert, m and 1 for one per row).
//
// Each thread takes `steps` (at most kMaxSteps) 16-value blocks of one row.
// The threads x of a row form segments of span = min(blockDim.x, 32) threads
// (a warp, or all of the row's threads of a warp; the launcher makes
// blockDim.x at least 8): a segment covers span * steps consecutive blocks,
// block j of each step going to thread j. All loads are issued before the
// first block is worked on. On the vector path each step's output goes
// through shared memory: thread j writes its block's 16-byte pieces, then
// reads back piece i * span + j of the step's run, so that every store
// instruction of a warp writes whole 32-byte sectors of contiguous bytes.
template <typename Output, typename Layout, bool kVectorStores, bool kMx, int kMaxSteps>
__global__ void __launch_bounds__(kThreadsPerBlock)
dequantize_fp4(const uint2* __restrict__ packed, const u8* __restrict__ scales, const float* __restrict__ global_scale_ptr,
               float global_scale_value, typename Output::raw_t* __restrict__ out, int m, int n, int blocks_per_row,
               int steps, long long global_scale_expert_step, int global_scale_row_step, long long scale_expert_stride,
               int scale_cols) {
  typedef typename Output::raw_t raw_t;
  constexpr int kWords = 4 * (int)sizeof(raw_t);  // 32-bit words of a block's output
  constexpr int kPieces = kWords / 4;             // its 16-byte pieces
  constexpr int kPieceValues = kBlockSize / kPieces;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const bool in_rows = row < m;
  const int span = min((int)blockDim.x, 32);
  const int j = threadIdx.x & (span - 1);
  const int first = (blockIdx.y * blockDim.x + (threadIdx.x & ~(span - 1))) * steps;  // the segment's first block
  const long long expert = blockIdx.z;
  const long long row_index = expert * m + row;
  // Steps are span blocks apart, a multiple of 8: span / 2 MXFP4 blocks, a
  // multiple of 4 either way, and every layout's column offset steps evenly
  // over whole groups of 4 columns.
  const int k = first + j;  // this thread's block of step 0
  const u32 scale_step = Layout::column_offset(kMx ? span >> 1 : span);
  // Per-row pointers, then 32-bit offsets for everything per block. The asm
  // (a global-space conversion, which is the identity) makes the pointers
  // opaque, so that the compiler keeps them in registers instead of redoing
  // the 64-bit sums for each block; it also hides that they are global, hence
  // __ldg (ld.global.nc) and store_global.
  const uint2* packed_row = packed + (row_index * blocks_per_row + k);
  const u8* scale_row = scales + (expert * scale_expert_stride + Layout::row_offset(row, scale_cols) +
                                  Layout::column_offset(kMx ? k >> 1 : k));
  raw_t* out_step = out + (row_index * n + (long long)first * kBlockSize);  // step 0's first value
  asm("cvta.to.global.u64 %0, %0;\n\tcvta.to.global.u64 %1, %1;\n\tcvta.to.global.u64 %2, %2;"
      : "+l"(packed_row), "+l"(scale_row), "+l"(out_step));
  // This thread's steps that hold a block of the data (none for rows past m;
  // span is a power of two).
  const int loaded = in_rows ? min(steps, (blocks_per_row - k + span - 1) >> (__ffs(span) - 1)) : 0;

  // Blocks past the row (or rows past m) read as zero codes and scale 0, a
  // block of zeros: the fast path, and nothing of it is stored.
  uint2 codes[kMaxSteps];
  u32 scale_bytes[kMaxSteps];
#pragma unroll
  for (int s = 0; s < kMaxSteps; ++s) scale_bytes[s] = 0u;
#pragma unroll
  for (int s = 0; s < kMaxSteps; ++s) {
    // steps is a power of two: a test at each power of two, not at every step.
    if ((s & (s - 1)) == 0 && s >= steps) break;
    codes[s] = make_uint2(0u, 0u);
    if (s < loaded) {
      codes[s] = __ldg(packed_row + s * span);
      scale_bytes[s] = __ldg(scale_row + (u32)(s * scale_step));
    }
  }
  // Four scale bytes a register while the steps run.
  u32 scale_words[(kMaxSteps + 3) / 4];
#pragma unroll
  for (int w = 0; w < (kMaxSteps + 3) / 4; ++w) {
    scale_words[w] = 0u;
#pragma unroll
    for (int b = 0; b < 4 && 4 * w + b < kMaxSteps; ++b) scale_words[w] |= scale_bytes[4 * w + b] << (8 * b);
  }
  const auto scale_byte = [&](int s) { return (scale_words[s >> 2] >> (8 * (s & 3))) & 0xffu; };
  // Rows past m read row 0's global scale: the shared tables below need every
  // thread's to be the thread block's one scale, and nothing of theirs is stored.
  const float gs = kMx ? 1.0f
                 : global_scale_ptr
                     ? __ldg(global_scale_ptr + (expert * global_scale_expert_step + (in_rows ? row : 0) * global_scale_row_step))
                     : global_scale_value;
  const BlockDecoder<Output, kMx> decoder(gs);

  const int step_values = span * kBlockSize;
  int limit = in_rows ? n - first * kBlockSize : 0;  // values of the row from the step's first on
  __shared__ uint4 staging[kVectorStores ? kThreadsPerBlock * kPieces : 1];
  const int flat = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = flat & 31;
  uint4* warp_staging = staging + (flat - lane) * kPieces;
  const int first_piece = (lane & ~(span - 1)) * kPieces + j;  // this thread's first read-back piece

  // With one global scale for the whole thread block, the tables of all 256
  // scale bytes are made once, one a thread, while the loads are in flight;
  // a block then looks its table up. Otherwise (a global scale per row and
  // several rows a thread block) each block makes its own.
  constexpr int kTableWords = sizeof(MagnitudeTable<Output>) / 4;
  __shared__ uint4 tables[256 * kTableWords / 4];
  const bool shared_tables = global_scale_row_step == 0 || blockDim.y == 1;
  if (shared_tables) {
#pragma unroll
    for (int i = 0; i < (256 + kThreadsPerBlock - 1) / kThreadsPerBlock; ++i) {
      const int byte = flat + i * kThreadsPerBlock;
      if (byte < 256) {
        const MagnitudeTable<Output> t = decoder.table(byte);
#pragma unroll
        for (int q = 0; q < kTableWords / 4; ++q) {
          tables[byte * (kTableWords / 4) + q] =
              make_uint4(t.plane[4 * q], t.plane[4 * q + 1], t.plane[4 * q + 2], t.plane[4 * q + 3]);
        }
      }
    }
    __syncthreads();
  }

  // The step loop, inlined once for each way of getting a block's table
  // (from_tables is a constant in each copy), so that neither pays for the
  // other's registers or tests.
  const auto run_steps = [&](bool from_tables) {
#pragma unroll
    for (int s = 0; s < kMaxSteps; ++s) {
      if (s >= steps || first + s * span >= blocks_per_row) break;  // the same for the whole warp
      MagnitudeTable<Output> t;
      if (from_tables) {
#pragma unroll
        for (int q = 0; q < kTableWords / 4; ++q) {
          const uint4 v = tables[scale_byte(s) * (kTableWords / 4) + q];
          t.plane[4 * q] = v.x;
          t.plane[4 * q + 1] = v.y;
          t.plane[4 * q + 2] = v.z;
          t.plane[4 * q + 3] = v.w;
        }
      } else {
        t = decoder.table(scale_byte(s));
      }
      // Each path hands its words on by itself: merging two 8- or 16-word
      // results would cost register moves on the fast path.
      const auto emit = [&](const BlockWords<Output>& block) {
        if constexpr (kVectorStores) {
#pragma unroll
          for (int q = 0; q < kPieces; ++q) {
            warp_staging[staging_slot<kPieces>(lane * kPieces + q)] =
                make_uint4(block.w[4 * q], block.w[4 * q + 1], block.w[4 * q + 2], block.w[4 * q + 3]);
          }
        } else {
#pragma unroll
          for (int v = 0; v < kBlockSize; ++v) {
            const int value = j * kBlockSize + v;
            if (value < limit) {
              store_global(out_step + value, sizeof(raw_t) == 4 ? block.w[v] : block.w[v >> 1] >> (16 * (v & 1)));
            }
          }
        }
      };
      if (t.plane[0] != kSlow) {
        emit(decode_block<Output>(codes[s], t));
      } else {
        emit(decoder.exact(codes[s], scale_byte(s)));
      }
      if constexpr (kVectorStores) {
        store_staged<kPieces, kPieceValues>(warp_staging, first_piece, span, j, limit, out_step);
      }
      out_step += step_values;
      asm("" : "+l"(out_step));  // one 64-bit add a step, the pieces' addresses 32-bit offsets from it
      limit -= step_values;
    }
  };
  if (shared_tables) {
    run_steps(true);
  } else {
    run_steps(false);
  }
}

}  // namespace nvfp4
