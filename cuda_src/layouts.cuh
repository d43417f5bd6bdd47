// Where the scale byte of block k of row `row` lands, for each scale layout of
// docs/format.md. `scale_cols` is the allocated width of the scale tensor in blocks
// (already rounded up by the launcher, which owns the shapes). Every layout
// is a row part plus a column part, so that a thread working on several
// blocks of one row computes the row part once.
#pragma once

namespace nvfp4 {

// 128x4 tensor-core layout: 512-byte tiles of 128 rows x 4 blocks, rows
// interleaved as (row % 32) * 16 + ((row / 32) % 4) * 4.
struct SwizzledScales {
  __device__ static long long row_offset(int row, int scale_cols) {
    return (long long)(row >> 7) * (scale_cols >> 2) * 512 + (row & 31) * 16 + ((row >> 5) & 3) * 4;
  }
  __device__ static int column_offset(int k) { return (k >> 2) * 512 + (k & 3); }
  __device__ static long long offset(int row, int k, int scale_cols) {
    return row_offset(row, scale_cols) + column_offset(k);
  }
};

// Row-major [m, padded_n / 16] ("sf-major").
struct LinearScales {
  __device__ static long long row_offset(int row, int scale_cols) { return (long long)row * scale_cols; }
  __device__ static int column_offset(int k) { return k; }
  __device__ static long long offset(int row, int k, int scale_cols) {
    return row_offset(row, scale_cols) + column_offset(k);
  }
};

// Small-M layout: 32-byte tiles of 8 rows x 4 blocks, row-major inside.
struct Tiled8x4Scales {
  __device__ static long long row_offset(int row, int scale_cols) {
    return (long long)(row >> 3) * (scale_cols >> 2) * 32 + (row & 7) * 4;
  }
  __device__ static int column_offset(int k) { return (k >> 2) * 32 + (k & 3); }
  __device__ static long long offset(int row, int k, int scale_cols) {
    return row_offset(row, scale_cols) + column_offset(k);
  }
};

// The layout as a run-time argument, for kernels that store only a few scale
// bytes a row (the fused ops): a switch per store costs less than a kernel
// variant per layout. The ids are _runtime/compile.py's RUNTIME_LAYOUT_IDS.
enum ScaleLayoutId : int { kSwizzledLayout = 0, kLinearLayout = 1, kTiled8x4Layout = 2 };

struct RuntimeLayout {
  int id;
  __device__ long long row_offset(int row, int scale_cols) const {
    return id == kSwizzledLayout   ? SwizzledScales::row_offset(row, scale_cols)
           : id == kTiled8x4Layout ? Tiled8x4Scales::row_offset(row, scale_cols)
                                   : LinearScales::row_offset(row, scale_cols);
  }
  __device__ int column_offset(int k) const {
    return id == kSwizzledLayout   ? SwizzledScales::column_offset(k)
           : id == kTiled8x4Layout ? Tiled8x4Scales::column_offset(k)
                                   : LinearScales::column_offset(k);
  }
};

}  // namespace nvfp4
