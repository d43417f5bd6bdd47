// Where the scale byte of block k of row `row` lands, for each scale layout of
// docs/format.md. `scale_cols` is the allocated width of the scale tensor in blocks
// (already rounded up by the launcher, which owns the shapes).
#pragma once

namespace nvfp4 {

// 128x4 tensor-core layout: 512-byte tiles of 128 rows x 4 blocks, rows
// interleaved as (row % 32) * 16 + ((row / 32) % 4) * 4.
struct SwizzledScales {
  __device__ static long long offset(int row, int k, int scale_cols) {
    const long long tile = (long long)(row >> 7) * (scale_cols >> 2) + (k >> 2);
    return tile * 512 + (row & 31) * 16 + ((row >> 5) & 3) * 4 + (k & 3);
  }
};

// Row-major [m, padded_n / 16] ("sf-major").
struct LinearScales {
  __device__ static long long offset(int row, int k, int scale_cols) {
    return (long long)row * scale_cols + k;
  }
};

// Small-M layout: 32-byte tiles of 8 rows x 4 blocks, row-major inside.
struct Tiled8x4Scales {
  __device__ static long long offset(int row, int k, int scale_cols) {
    const long long tile = (long long)(row >> 3) * (scale_cols >> 2) + (k >> 2);
    return tile * 32 + (row & 7) * 4 + (k & 3);
  }
};

}  // namespace nvfp4
