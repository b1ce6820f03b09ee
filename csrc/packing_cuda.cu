// CUDA twin of build_rows (packing.cpp): row tensors and cu_seqlens from a placement plan.
//
// The plan (which piece of which document sits at which offset of which row) is made on the
// CPU; only the flat tokens, the optional masks and the plan arrays cross PCIe. On the device:
//   fill_rows:       one thread per token slot: input id, shifted target, position, document id
//   fill_cu_seqlens: one thread per row: the row's segment starts (pieces, then padding tail)
// Semantics match build_row in packing.cpp slot for slot.
//
// Only CUDA headers here (no ATen), so this file compiles with plain `nvcc -c`.

#include <cuda_runtime.h>

#include <cstdint>

#include "packing_cuda.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void fill_rows(
    // inputs
    const T* __restrict__ tokens, const int64_t* __restrict__ doc_offsets,
    const uint8_t* __restrict__ masks, const int64_t* __restrict__ piece_doc,
    const int64_t* __restrict__ piece_start, const int64_t* __restrict__ piece_len,
    const int64_t* __restrict__ piece_offset, const int64_t* __restrict__ row_first_piece,
    // sizes and values
    int64_t row_len, int64_t pad_id, int64_t ignore_index,
    // outputs, (n_rows, row_len)
    int64_t* __restrict__ input_ids, int64_t* __restrict__ targets,
    int64_t* __restrict__ position_ids, int64_t* __restrict__ doc_ids) {
  const int64_t r = blockIdx.x;
  const int64_t s = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;  // slot
  if (s >= row_len) return;

  // The piece holding slot s: the last one with offset <= s (the first piece has offset 0).
  const int64_t last = row_first_piece[r + 1];
  int64_t lo = row_first_piece[r], hi = last;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (piece_offset[mid] <= s) lo = mid; else hi = mid;
  }
  const int64_t q = lo, off = piece_offset[q], len = piece_len[q];
  const int64_t i = r * row_len + s;

  if (s >= off + len) {  // padding tail: its own segment, positions from 0
    input_ids[i] = pad_id;
    targets[i] = ignore_index;
    position_ids[i] = s - (off + len);
    doc_ids[i] = -1;
    return;
  }
  const int64_t d = piece_doc[q], j = s - off;
  const int64_t src = doc_offsets[d] + piece_start[q];
  int64_t t = ignore_index;
  if (j + 1 < len) {  // next token of the same document
    if (masks == nullptr || masks[src + j + 1]) t = static_cast<int64_t>(tokens[src + j + 1]);
  } else if (q + 1 < last && piece_start[q + 1] == 0) {  // next document's BOS
    const int64_t nsrc = doc_offsets[piece_doc[q + 1]];
    if (masks == nullptr || masks[nsrc]) t = static_cast<int64_t>(tokens[nsrc]);
  }
  input_ids[i] = static_cast<int64_t>(tokens[src + j]);
  targets[i] = t;
  position_ids[i] = j;
  doc_ids[i] = d;
}

__global__ void fill_cu_seqlens(
    // inputs
    const int64_t* __restrict__ piece_len, const int64_t* __restrict__ piece_offset,
    const int64_t* __restrict__ row_first_piece, const int64_t* __restrict__ row_first_seg,
    // sizes
    int64_t n_rows, int64_t n_segs, int64_t row_len,
    // output, (n_segs + 1,)
    int32_t* __restrict__ cu_seqlens) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_rows) return;
  const int64_t base = r * row_len;
  int64_t seg = row_first_seg[r], fill = 0;
  for (int64_t q = row_first_piece[r]; q < row_first_piece[r + 1]; ++q) {
    fill = piece_offset[q] + piece_len[q];
    // A piece starting in the bin's last slot has no input token, hence no segment.
    if (piece_offset[q] < row_len) cu_seqlens[seg++] = static_cast<int32_t>(base + piece_offset[q]);
  }
  if (fill < row_len) cu_seqlens[seg++] = static_cast<int32_t>(base + fill);
  if (r == n_rows - 1) cu_seqlens[n_segs] = static_cast<int32_t>(n_rows * row_len);
}

}  // namespace

const char* launch_build_rows_cuda(
    const void* tokens, bool tokens_int64, const int64_t* doc_offsets, const uint8_t* masks,
    const int64_t* piece_doc, const int64_t* piece_start, const int64_t* piece_len,
    const int64_t* piece_offset, const int64_t* row_first_piece, const int64_t* row_first_seg,
    int64_t n_rows, int64_t n_segs, int64_t row_len, int64_t pad_id, int64_t ignore_index,
    int64_t* input_ids, int64_t* targets, int64_t* position_ids, int64_t* doc_ids,
    int32_t* cu_seqlens, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (n_rows == 0) {  // no rows: cu_seqlens is [0]
    cudaError_t e = cudaMemsetAsync(cu_seqlens, 0, sizeof(int32_t), stream);
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  }
  const int64_t chunks = (row_len + kThreads - 1) / kThreads;
  if (chunks > 65535 || n_rows > 2147483647) return "row_len or row count too large for the grid";
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(chunks));
  if (tokens_int64) {
    fill_rows<int64_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const int64_t*>(tokens), doc_offsets, masks, piece_doc, piece_start,
        piece_len, piece_offset, row_first_piece, row_len, pad_id, ignore_index, input_ids,
        targets, position_ids, doc_ids);
  } else {
    fill_rows<int32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const int32_t*>(tokens), doc_offsets, masks, piece_doc, piece_start,
        piece_len, piece_offset, row_first_piece, row_len, pad_id, ignore_index, input_ids,
        targets, position_ids, doc_ids);
  }
  const unsigned row_blocks = static_cast<unsigned>((n_rows + kThreads - 1) / kThreads);
  fill_cu_seqlens<<<row_blocks, kThreads, 0, stream>>>(piece_len, piece_offset, row_first_piece,
                                                       row_first_seg, n_rows, n_segs, row_len,
                                                       cu_seqlens);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
