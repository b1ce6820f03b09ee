// Launcher for the CUDA row-metadata kernels (packing_cuda.cu). Plain pointers and a raw stream,
// so packing.cpp binds it without any CUDA or ATen-CUDA header.
#pragma once

#include <cstdint>

// Queues the kernels that fill the row tensors from a plan (see build_rows in packing.cpp for
// the meaning of every argument) on `stream` (a cudaStream_t), on the current device.
// Every pointer is device memory; masks may be null (every token scored).
// Returns null on success, else the CUDA error string.
const char* launch_build_rows_cuda(
    // inputs
    const void* tokens, bool tokens_int64, const int64_t* doc_offsets, const uint8_t* masks,
    const int64_t* piece_doc, const int64_t* piece_start, const int64_t* piece_len,
    const int64_t* piece_offset, const int64_t* row_first_piece, const int64_t* row_first_seg,
    // sizes and values
    int64_t n_rows, int64_t n_segs, int64_t row_len, int64_t pad_id, int64_t ignore_index,
    // outputs: four (n_rows, row_len) and one (n_segs + 1,)
    int64_t* input_ids, int64_t* targets, int64_t* position_ids, int64_t* doc_ids,
    int32_t* cu_seqlens, void* stream);
