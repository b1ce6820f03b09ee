// Best-fit packing of documents into fixed-length rows, and the row metadata a packed batch needs.
//
// Two steps, both exposed to Python (fasttrain/data/packing.py drives them):
//
//   plan(lengths, row_len, best_fit)      where each document piece goes: (row, offset) per piece
//   build_rows(tokens, ..., plan, ...)    the (R, row_len) tensors: input ids, targets, position
//                                         ids, document ids, and the flattened cu_seqlens
//
// A row is a bin of capacity C = row_len + 1 tokens: inputs are bin[:-1], targets bin[1:], so a
// document of at most C tokens is never cut. Longer documents are first split into pieces of C
// tokens (the last piece holds the remainder). Best-fit decreasing places pieces longest first
// (stable: ties keep document order) into the fullest bin that still fits them; ties between
// equally full bins go to the bin changed most recently (a stack per remaining capacity), and a
// segment tree over remaining capacities finds the fullest fitting bin in O(log C).
//
// The fallback in packing.py (numpy, for when this extension is not built) implements the same
// two steps; tests check both against a plain-Python reference, token for token.
//
// Every output of build_rows, and the flat token array of concat_arrays, can be a buffer the
// caller keeps across calls (packing.Packer): on CPU, first-touching fresh pages costs more than
// the packing itself.
//
// build_rows also has a CUDA twin (packing_cuda.cu), compiled only with FASTTRAIN_WITH_CUDA: the
// plan is made here on the CPU, and only the tokens and the plan cross to the GPU.

// Narrow includes (not <torch/extension.h>): the build is several times faster.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/numpy.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#ifdef FASTTRAIN_WITH_CUDA
#include "packing_cuda.h"
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Placement
// ---------------------------------------------------------------------------------------------

// Marks which remaining capacities r in [0, C] have at least one open bin, and finds the
// smallest marked r >= want. Leaves live at [size, 2 * size); an inner node is the OR of its two
// children.
class CapacityTree {
 public:
  explicit CapacityTree(int64_t capacity) {
    size_ = 1;
    while (size_ < capacity + 1) size_ *= 2;
    node_.assign(2 * size_, 0);
  }

  void set(int64_t r, bool on) {
    int64_t i = r + size_;
    node_[i] = on;
    for (i >>= 1; i >= 1; i >>= 1) {
      const uint8_t v = node_[2 * i] | node_[2 * i + 1];
      if (node_[i] == v) break;
      node_[i] = v;
    }
  }

  // Smallest marked leaf >= want, or -1.
  int64_t find_from(int64_t want) const {
    int64_t i = want + size_;
    if (node_[i]) return want;
    // Climb until a right sibling holds a mark: those siblings cover exactly the leaves > want.
    while (true) {
      if ((i & 1) == 0 && node_[i + 1]) {
        i += 1;
        break;
      }
      i >>= 1;
      if (i <= 1) return -1;
    }
    while (i < size_) i = node_[2 * i] ? 2 * i : 2 * i + 1;  // leftmost marked leaf below i
    return i - size_;
  }

 private:
  int64_t size_;
  std::vector<uint8_t> node_;
};

struct Plan {
  // Per piece, in row-major order (row by row, by offset within a row):
  std::vector<int64_t> piece_doc, piece_start, piece_len, piece_offset;
  std::vector<int64_t> row_first_piece;  // (R + 1,) pieces of row r: [row_first_piece[r], ...[r+1])
  std::vector<int64_t> row_first_seg;    // (R + 1,) cu_seqlens entries of row r, same layout
  int64_t max_seqlen = 0;
  int64_t split_docs = 0;
  int64_t empty_docs = 0;
};

Plan make_plan(const int64_t* lengths, int64_t n_docs, int64_t row_len, bool best_fit) {
  const int64_t cap = row_len + 1;
  Plan plan;

  // Pieces in document order.
  std::vector<int64_t> doc, start, len;
  for (int64_t d = 0; d < n_docs; ++d) {
    const int64_t L = lengths[d];
    if (L == 0) {
      plan.empty_docs += 1;
      continue;
    }
    if (L > cap) plan.split_docs += 1;
    for (int64_t s = 0; s < L; s += cap) {
      doc.push_back(d);
      start.push_back(s);
      len.push_back(std::min(cap, L - s));
    }
  }
  const int64_t n_pieces = static_cast<int64_t>(len.size());

  // Placement order: longest first, ties in document order (a stable counting sort by length).
  std::vector<int64_t> order(n_pieces);
  if (best_fit) {
    std::vector<int64_t> first(cap + 2, 0);  // first[k]: start of the pieces of length cap - k
    for (int64_t p = 0; p < n_pieces; ++p) first[cap - len[p] + 1] += 1;
    for (int64_t k = 1; k <= cap + 1; ++k) first[k] += first[k - 1];
    for (int64_t p = 0; p < n_pieces; ++p) order[first[cap - len[p]]++] = p;
  } else {
    for (int64_t p = 0; p < n_pieces; ++p) order[p] = p;
  }

  // Place: bin and offset per piece. Open bins with r tokens of room sit on stack r.
  std::vector<int64_t> bin_of(n_pieces), offset_of(n_pieces), room;  // room[b]: free slots of b
  if (best_fit) {
    CapacityTree tree(cap);
    std::vector<int64_t> stack_top(cap + 1, -1), below;  // below[b]: the bin under b on its stack
    for (int64_t k = 0; k < n_pieces; ++k) {
      const int64_t p = order[k];
      const int64_t L = len[p];
      const int64_t r = tree.find_from(L);
      int64_t b;
      if (r < 0) {
        b = static_cast<int64_t>(room.size());
        room.push_back(cap);
        below.push_back(-1);
      } else {
        b = stack_top[r];
        stack_top[r] = below[b];
        if (stack_top[r] < 0) tree.set(r, false);
      }
      bin_of[p] = b;
      offset_of[p] = cap - room[b];
      room[b] -= L;
      if (room[b] > 0) {
        below[b] = stack_top[room[b]];
        stack_top[room[b]] = b;
        tree.set(room[b], true);
      }
    }
  } else {
    for (int64_t p = 0; p < n_pieces; ++p) {
      bin_of[p] = p;
      offset_of[p] = 0;
      room.push_back(cap - len[p]);
    }
  }
  const int64_t n_rows = static_cast<int64_t>(room.size());

  // Row-major order: a stable counting sort by bin keeps each bin's pieces in placement order,
  // which is also offset order.
  plan.row_first_piece.assign(n_rows + 1, 0);
  for (int64_t p = 0; p < n_pieces; ++p) plan.row_first_piece[bin_of[p] + 1] += 1;
  for (int64_t r = 0; r < n_rows; ++r) plan.row_first_piece[r + 1] += plan.row_first_piece[r];
  std::vector<int64_t> cursor(plan.row_first_piece.begin(), plan.row_first_piece.end() - 1);
  plan.piece_doc.resize(n_pieces);
  plan.piece_start.resize(n_pieces);
  plan.piece_len.resize(n_pieces);
  plan.piece_offset.resize(n_pieces);
  for (int64_t k = 0; k < n_pieces; ++k) {
    const int64_t p = order[k];
    const int64_t q = cursor[bin_of[p]]++;
    plan.piece_doc[q] = doc[p];
    plan.piece_start[q] = start[p];
    plan.piece_len[q] = len[p];
    plan.piece_offset[q] = offset_of[p];
  }

  // Attention segments per row: every piece with at least one input token (a one-token piece in
  // the last slot of a bin is only a target), then the padding tail if there is one.
  plan.row_first_seg.assign(n_rows + 1, 0);
  for (int64_t r = 0; r < n_rows; ++r) {
    int64_t segs = 0;
    for (int64_t q = plan.row_first_piece[r]; q < plan.row_first_piece[r + 1]; ++q) {
      const int64_t n_in = std::min(plan.piece_len[q], row_len - plan.piece_offset[q]);
      if (n_in > 0) {
        segs += 1;
        plan.max_seqlen = std::max(plan.max_seqlen, n_in);
      }
    }
    const int64_t fill = cap - room[r];
    if (fill < row_len) {
      segs += 1;
      plan.max_seqlen = std::max(plan.max_seqlen, row_len - fill);
    }
    plan.row_first_seg[r + 1] = plan.row_first_seg[r] + segs;
  }
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Row metadata
// ---------------------------------------------------------------------------------------------

// A fresh CPU tensor. Large buffers are advised to use transparent huge pages before their first
// touch (as numpy does): filling fresh memory is otherwise dominated by one page fault per 4 KiB,
// which costs more than the packing itself.
at::Tensor empty_cpu(at::IntArrayRef shape, c10::ScalarType dtype) {
  auto t = at::empty(shape, at::TensorOptions().dtype(dtype));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

struct RowsOut {
  int64_t* input_ids;     // (R, row_len)
  int64_t* targets;       // (R, row_len)
  int64_t* position_ids;  // (R, row_len)
  int64_t* doc_ids;       // (R, row_len)
  int32_t* cu_seqlens;    // (S + 1,)
};

// Fills row r. Slot s holds input token s; its target is the token in slot s + 1 of the bin.
// kMasked: masks given (masks[i] == 0: token i is never a target).
template <typename T, bool kMasked>
void build_row(int64_t r, const T* tokens, const int64_t* doc_offsets, const uint8_t* masks,
               const int64_t* piece_doc, const int64_t* piece_start, const int64_t* piece_len,
               const int64_t* piece_offset, const int64_t* row_first_piece,
               const int64_t* row_first_seg, int64_t row_len, int64_t pad_id,
               int64_t ignore_index, const RowsOut& out) {
  const int64_t base = r * row_len;
  int64_t* in = out.input_ids + base;
  int64_t* tgt = out.targets + base;
  int64_t* pos = out.position_ids + base;
  int64_t* did = out.doc_ids + base;
  int32_t* cu = out.cu_seqlens + row_first_seg[r];

  const int64_t first = row_first_piece[r], last = row_first_piece[r + 1];
  int64_t fill = 0;
  for (int64_t q = first; q < last; ++q) {
    const int64_t off = piece_offset[q], len = piece_len[q], d = piece_doc[q];
    const int64_t src = doc_offsets[d] + piece_start[q];
    const T* tok = tokens + src;
    const uint8_t* m = kMasked ? masks + src : nullptr;
    fill = off + len;
    const int64_t n_in = std::min(len, row_len - off);  // input slots this piece covers
    if (n_in <= 0) continue;
    *cu++ = static_cast<int32_t>(base + off);
    for (int64_t j = 0; j < n_in; ++j) {
      in[off + j] = static_cast<int64_t>(tok[j]);
      pos[off + j] = j;
      did[off + j] = d;
    }
    // Targets inside the piece: the next token of the same document.
    const int64_t n_inner = std::min(n_in, len - 1);
    for (int64_t j = 0; j < n_inner; ++j) {
      const int64_t t = static_cast<int64_t>(tok[j + 1]);
      tgt[off + j] = (!kMasked || m[j + 1]) ? t : ignore_index;
    }
    if (n_inner < n_in) {
      // The piece's last token sits in an input slot: its target is the first token of the next
      // piece when that piece starts a document (its BOS: "this document ended"); a
      // continuation piece or padding gives no target.
      int64_t t = ignore_index;
      if (q + 1 < last && piece_start[q + 1] == 0) {
        const int64_t nsrc = doc_offsets[piece_doc[q + 1]];
        if (!kMasked || masks[nsrc]) t = static_cast<int64_t>(tokens[nsrc]);
      }
      tgt[off + n_in - 1] = t;
    }
  }
  // Padding tail: its own attention segment, positions counting from 0 again.
  if (fill < row_len) {
    *cu++ = static_cast<int32_t>(base + fill);
    for (int64_t s = fill; s < row_len; ++s) {
      in[s] = pad_id;
      tgt[s] = ignore_index;
      pos[s] = s - fill;
      did[s] = -1;
    }
  }
}

void check_1d(const at::Tensor& t, const char* name, c10::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

at::Tensor to_tensor(const std::vector<int64_t>& v) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

// ---------------------------------------------------------------------------------------------
// Input: a list of documents -> one flat array
// ---------------------------------------------------------------------------------------------

enum class Src { kI8, kI16, kI32, kI64, kU8, kU16, kU32, kU64, kBool };

struct Part {
  const void* data;
  int64_t n;
  Src type;
};

bool numpy_src(char kind, int64_t itemsize, Src* out) {
  if (kind == 'b' && itemsize == 1) return *out = Src::kBool, true;
  if (kind != 'i' && kind != 'u') return false;
  const bool u = kind == 'u';
  switch (itemsize) {
    case 1: return *out = u ? Src::kU8 : Src::kI8, true;
    case 2: return *out = u ? Src::kU16 : Src::kI16, true;
    case 4: return *out = u ? Src::kU32 : Src::kI32, true;
    case 8: return *out = u ? Src::kU64 : Src::kI64, true;
  }
  return false;
}

bool torch_src(c10::ScalarType t, Src* out) {
  switch (t) {
    case at::kChar: return *out = Src::kI8, true;
    case at::kShort: return *out = Src::kI16, true;
    case at::kInt: return *out = Src::kI32, true;
    case at::kLong: return *out = Src::kI64, true;
    case at::kByte: return *out = Src::kU8, true;
    case at::kUInt16: return *out = Src::kU16, true;
    case at::kUInt32: return *out = Src::kU32, true;
    case at::kUInt64: return *out = Src::kU64, true;
    case at::kBool: return *out = Src::kBool, true;
    default: return false;
  }
}

template <typename S, typename D>
void copy_part(const void* src, int64_t n, D* dst, bool nonzero) {
  const S* s = static_cast<const S*>(src);
  if (nonzero) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(s[i] != 0);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(s[i]);
  }
}

template <typename D>
void copy_parts(const std::vector<Part>& parts, D* dst, bool nonzero) {
  for (const Part& p : parts) {
    switch (p.type) {
      case Src::kI8: copy_part<int8_t>(p.data, p.n, dst, nonzero); break;
      case Src::kI16: copy_part<int16_t>(p.data, p.n, dst, nonzero); break;
      case Src::kI32: copy_part<int32_t>(p.data, p.n, dst, nonzero); break;
      case Src::kI64: copy_part<int64_t>(p.data, p.n, dst, nonzero); break;
      case Src::kU8: copy_part<uint8_t>(p.data, p.n, dst, nonzero); break;
      case Src::kU16: copy_part<uint16_t>(p.data, p.n, dst, nonzero); break;
      case Src::kU32: copy_part<uint32_t>(p.data, p.n, dst, nonzero); break;
      case Src::kU64: copy_part<uint64_t>(p.data, p.n, dst, nonzero); break;
      case Src::kBool: copy_part<uint8_t>(p.data, p.n, dst, nonzero); break;
    }
    dst += p.n;
  }
}

// The fast path for turning a list of documents (or masks) into one flat array, with no Python
// work per element. Accepts only 1-D contiguous integer numpy arrays and CPU tensors (bool too
// when `as_masks`); returns None for anything else, and the Python caller then takes its slow
// path, which also words the error. Returns (flat, lengths):
//   tokens: flat int32 when every source type fits in int32, else int64;
//   masks:  flat uint8, 1 where the mask is nonzero.
// `scratch` (uint8, contiguous): when it holds enough bytes, `flat` is a view of its front
// instead of fresh memory (the caller keeps it across calls, so no new pages are touched).
pybind11::object concat_arrays(const pybind11::list& items, bool as_masks,
                               c10::optional<at::Tensor> scratch) {
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<Part> parts(n_items);
  auto lengths = at::empty({n_items}, at::kLong);
  int64_t* len = lengths.data_ptr<int64_t>();
  int64_t total = 0;
  bool fits32 = true;
  for (int64_t i = 0; i < n_items; ++i) {
    PyObject* obj = PyList_GET_ITEM(items.ptr(), i);
    Part& p = parts[i];
    if (pybind11::isinstance<pybind11::array>(obj)) {
      auto a = pybind11::reinterpret_borrow<pybind11::array>(obj);
      if (a.ndim() != 1 || (a.shape(0) > 1 && a.strides(0) != a.itemsize())) return pybind11::none();
      if (!numpy_src(a.dtype().kind(), a.itemsize(), &p.type)) return pybind11::none();
      p.data = a.data();
      p.n = a.shape(0);
    } else if (THPVariable_Check(obj)) {
      const at::Tensor& t = THPVariable_Unpack(obj);
      if (t.dim() != 1 || !t.device().is_cpu() || !t.is_contiguous() || t.is_conj() || t.is_neg())
        return pybind11::none();
      if (!torch_src(t.scalar_type(), &p.type)) return pybind11::none();
      p.data = t.data_ptr();
      p.n = t.numel();
    } else {
      return pybind11::none();
    }
    if (p.type == Src::kBool && !as_masks) return pybind11::none();
    fits32 = fits32 && (p.type == Src::kI8 || p.type == Src::kI16 || p.type == Src::kI32 ||
                        p.type == Src::kU8 || p.type == Src::kU16);
    len[i] = p.n;
    total += p.n;
  }
  const c10::ScalarType dtype = as_masks ? at::kByte : fits32 ? at::kInt : at::kLong;
  const int64_t nbytes = total * static_cast<int64_t>(c10::elementSize(dtype));
  at::Tensor flat;
  if (scratch && total > 0) {
    check_1d(*scratch, "scratch", at::kByte);
    TORCH_CHECK(!scratch->is_cuda(), "scratch must be a CPU tensor");
  }
  if (scratch && total > 0 && scratch->numel() >= nbytes) {
    flat = scratch->slice(0, 0, nbytes).view(dtype);
  } else {
    flat = empty_cpu({total}, dtype);
  }
  if (as_masks) {
    copy_parts(parts, flat.data_ptr<uint8_t>(), true);
  } else if (fits32) {
    copy_parts(parts, flat.data_ptr<int32_t>(), false);
  } else {
    copy_parts(parts, flat.data_ptr<int64_t>(), false);
  }
  return pybind11::make_tuple(flat, lengths);
}

// Returns (piece_doc, piece_start, piece_len, piece_offset, row_first_piece, row_first_seg,
//          max_seqlen, split_docs, empty_docs); see Plan.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, int64_t, int64_t, int64_t>
plan(at::Tensor lengths, int64_t row_len, bool best_fit) {
  TORCH_CHECK(row_len >= 1, "row_len must be >= 1, got ", row_len);
  TORCH_CHECK(!lengths.is_cuda(), "lengths must be a CPU tensor");
  check_1d(lengths, "lengths", at::kLong);
  const int64_t* L = lengths.data_ptr<int64_t>();
  for (int64_t d = 0; d < lengths.numel(); ++d) {
    TORCH_CHECK(L[d] >= 0, "lengths[", d, "] is negative: ", L[d]);
  }
  Plan p;
  {
    pybind11::gil_scoped_release no_gil;
    p = make_plan(L, lengths.numel(), row_len, best_fit);
  }
  return {to_tensor(p.piece_doc),       to_tensor(p.piece_start),   to_tensor(p.piece_len),
          to_tensor(p.piece_offset),    to_tensor(p.row_first_piece), to_tensor(p.row_first_seg),
          p.max_seqlen,                 p.split_docs,                p.empty_docs};
}

void check_plan_args(const at::Tensor& tokens, const at::Tensor& doc_offsets,
                     const c10::optional<at::Tensor>& masks, const at::Tensor& piece_doc,
                     const at::Tensor& piece_start, const at::Tensor& piece_len,
                     const at::Tensor& piece_offset, const at::Tensor& row_first_piece,
                     const at::Tensor& row_first_seg, int64_t row_len) {
  TORCH_CHECK(row_len >= 1, "row_len must be >= 1, got ", row_len);
  TORCH_CHECK(tokens.dim() == 1 && tokens.is_contiguous(), "tokens must be 1-D and contiguous");
  TORCH_CHECK(tokens.scalar_type() == at::kInt || tokens.scalar_type() == at::kLong,
              "tokens must be int32 or int64, got ", tokens.scalar_type());
  check_1d(doc_offsets, "doc_offsets", at::kLong);
  if (masks) {
    check_1d(*masks, "masks", at::kByte);
    TORCH_CHECK(masks->numel() == tokens.numel(), "masks has ", masks->numel(),
                " entries but tokens has ", tokens.numel());
  }
  check_1d(piece_doc, "piece_doc", at::kLong);
  check_1d(piece_start, "piece_start", at::kLong);
  check_1d(piece_len, "piece_len", at::kLong);
  check_1d(piece_offset, "piece_offset", at::kLong);
  check_1d(row_first_piece, "row_first_piece", at::kLong);
  check_1d(row_first_seg, "row_first_seg", at::kLong);
  const int64_t n_pieces = piece_doc.numel();
  TORCH_CHECK(piece_start.numel() == n_pieces && piece_len.numel() == n_pieces &&
                  piece_offset.numel() == n_pieces,
              "piece_* tensors must have the same length");
  TORCH_CHECK(row_first_piece.numel() == row_first_seg.numel() && row_first_piece.numel() >= 1,
              "row_first_piece and row_first_seg must both have R + 1 entries");
  const int64_t n_rows = row_first_piece.numel() - 1;
  TORCH_CHECK(n_rows * row_len < (int64_t{1} << 31),
              "a batch of ", n_rows, " rows x ", row_len, " tokens overflows int32 cu_seqlens; "
              "pack fewer documents per call");
}

// Returns (input_ids, targets, position_ids, doc_ids, cu_seqlens): four (R, row_len) int64
// tensors and one (S + 1,) int32 tensor, S = row_first_seg[R]. They are fresh tensors, or, when
// `out` holds those five tensors (contiguous, of exactly these shapes and dtypes, e.g. views of
// buffers the caller reuses across calls), `out` itself, overwritten in full.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
build_rows(at::Tensor tokens, at::Tensor doc_offsets, c10::optional<at::Tensor> masks,
           at::Tensor piece_doc, at::Tensor piece_start, at::Tensor piece_len,
           at::Tensor piece_offset, at::Tensor row_first_piece, at::Tensor row_first_seg,
           int64_t row_len, int64_t pad_id, int64_t ignore_index,
           c10::optional<std::vector<at::Tensor>> out_tensors) {
  check_plan_args(tokens, doc_offsets, masks, piece_doc, piece_start, piece_len, piece_offset,
                  row_first_piece, row_first_seg, row_len);
  TORCH_CHECK(!tokens.is_cuda(), "build_rows runs on CPU tensors; use build_rows_cuda");
  const int64_t n_rows = row_first_piece.numel() - 1;
  const int64_t n_segs = row_first_seg.data_ptr<int64_t>()[n_rows];
  at::Tensor input_ids, targets, position_ids, doc_ids, cu_seqlens;
  if (out_tensors) {
    TORCH_CHECK(out_tensors->size() == 5, "out must hold 5 tensors, got ", out_tensors->size());
    const auto& o = *out_tensors;
    const char* names[] = {"input_ids", "targets", "position_ids", "doc_ids"};
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK(o[i].device().is_cpu() && o[i].scalar_type() == at::kLong && o[i].is_contiguous() &&
                      o[i].dim() == 2 && o[i].size(0) == n_rows && o[i].size(1) == row_len,
                  "out ", names[i], " must be a contiguous CPU int64 tensor of shape (", n_rows,
                  ", ", row_len, "), got ", o[i].scalar_type(), " ", o[i].sizes());
    }
    check_1d(o[4], "out cu_seqlens", at::kInt);
    TORCH_CHECK(o[4].device().is_cpu() && o[4].numel() == n_segs + 1,
                "out cu_seqlens must be a CPU tensor of ", n_segs + 1, " entries, got ", o[4].numel());
    input_ids = o[0], targets = o[1], position_ids = o[2], doc_ids = o[3], cu_seqlens = o[4];
  } else {
    input_ids = empty_cpu({n_rows, row_len}, at::kLong);
    targets = empty_cpu({n_rows, row_len}, at::kLong);
    position_ids = empty_cpu({n_rows, row_len}, at::kLong);
    doc_ids = empty_cpu({n_rows, row_len}, at::kLong);
    cu_seqlens = at::empty({n_segs + 1}, at::kInt);
  }
  RowsOut out{input_ids.data_ptr<int64_t>(), targets.data_ptr<int64_t>(),
              position_ids.data_ptr<int64_t>(), doc_ids.data_ptr<int64_t>(),
              cu_seqlens.data_ptr<int32_t>()};
  out.cu_seqlens[n_segs] = static_cast<int32_t>(n_rows * row_len);

  const uint8_t* m = masks ? masks->data_ptr<uint8_t>() : nullptr;
  const int64_t* args[] = {doc_offsets.data_ptr<int64_t>(), piece_doc.data_ptr<int64_t>(),
                           piece_start.data_ptr<int64_t>(), piece_len.data_ptr<int64_t>(),
                           piece_offset.data_ptr<int64_t>(), row_first_piece.data_ptr<int64_t>(),
                           row_first_seg.data_ptr<int64_t>()};
  // Rows are independent: split them across threads in chunks of >= ~64K tokens, so small
  // batches stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / row_len);
  auto run = [&](auto tok, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        build_row<std::remove_const_t<std::remove_pointer_t<decltype(tok)>>, kMasked>(
            r, tok, args[0], m, args[1], args[2], args[3], args[4], args[5], args[6], row_len,
            pad_id, ignore_index, out);
      }
    });
  };
  pybind11::gil_scoped_release no_gil;
  const bool i32 = tokens.scalar_type() == at::kInt;
  if (i32 && m) run(tokens.data_ptr<int32_t>(), std::true_type{});
  if (i32 && !m) run(tokens.data_ptr<int32_t>(), std::false_type{});
  if (!i32 && m) run(tokens.data_ptr<int64_t>(), std::true_type{});
  if (!i32 && !m) run(tokens.data_ptr<int64_t>(), std::false_type{});
  return {input_ids, targets, position_ids, doc_ids, cu_seqlens};
}

#ifdef FASTTRAIN_WITH_CUDA
// CUDA twin of build_rows: every tensor lives on one CUDA device; `stream` is the raw
// cudaStream_t (torch.cuda.current_stream().cuda_stream), and the caller makes that device
// current. Kernels are queued on the stream; nothing waits for them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
build_rows_cuda(at::Tensor tokens, at::Tensor doc_offsets, c10::optional<at::Tensor> masks,
                at::Tensor piece_doc, at::Tensor piece_start, at::Tensor piece_len,
                at::Tensor piece_offset, at::Tensor row_first_piece,
                at::Tensor row_first_seg, int64_t n_segs, int64_t row_len, int64_t pad_id,
                int64_t ignore_index, int64_t stream) {
  check_plan_args(tokens, doc_offsets, masks, piece_doc, piece_start, piece_len, piece_offset,
                  row_first_piece, row_first_seg, row_len);
  const auto device = tokens.device();
  TORCH_CHECK(device.is_cuda(), "build_rows_cuda needs CUDA tensors, got tokens on ", device);
  for (const at::Tensor* t : {&doc_offsets, &piece_doc, &piece_start, &piece_len,
                                 &piece_offset, &row_first_piece, &row_first_seg}) {
    TORCH_CHECK(t->device() == device, "all build_rows_cuda tensors must be on ", device);
  }
  if (masks) TORCH_CHECK(masks->device() == device, "masks must be on ", device);
  const int64_t n_rows = row_first_piece.numel() - 1;
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  auto input_ids = at::empty({n_rows, row_len}, opts);
  auto targets = at::empty({n_rows, row_len}, opts);
  auto position_ids = at::empty({n_rows, row_len}, opts);
  auto doc_ids = at::empty({n_rows, row_len}, opts);
  auto cu_seqlens = at::empty({n_segs + 1}, opts.dtype(at::kInt));
  const char* err = launch_build_rows_cuda(
      tokens.data_ptr(), tokens.scalar_type() == at::kLong, doc_offsets.data_ptr<int64_t>(),
      masks ? masks->data_ptr<uint8_t>() : nullptr, piece_doc.data_ptr<int64_t>(),
      piece_start.data_ptr<int64_t>(), piece_len.data_ptr<int64_t>(),
      piece_offset.data_ptr<int64_t>(), row_first_piece.data_ptr<int64_t>(),
      row_first_seg.data_ptr<int64_t>(), n_rows, n_segs, row_len, pad_id, ignore_index,
      input_ids.data_ptr<int64_t>(), targets.data_ptr<int64_t>(), position_ids.data_ptr<int64_t>(),
      doc_ids.data_ptr<int64_t>(), cu_seqlens.data_ptr<int32_t>(),
      reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "packing CUDA kernels failed: ", err);
  return {input_ids, targets, position_ids, doc_ids, cu_seqlens};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasttrain packing: best-fit placement of documents into rows, and row metadata";
  m.def("empty", [](int64_t numel, at::ScalarType dtype) { return empty_cpu({numel}, dtype); },
        "A fresh 1-D CPU tensor, advised to use transparent huge pages (for buffers to reuse)",
        pybind11::arg("numel"), pybind11::arg("dtype"));
  m.def("concat_arrays", &concat_arrays,
        "Flat array and lengths from a list of 1-D integer arrays, or None (then use the slow path)",
        pybind11::arg("items"), pybind11::arg("as_masks"), pybind11::arg("scratch") = pybind11::none());
  m.def("plan", &plan, "Place documents into rows (best fit decreasing, or one per row)",
        pybind11::arg("lengths"), pybind11::arg("row_len"), pybind11::arg("best_fit"));
  m.def("build_rows", &build_rows, "Row tensors and cu_seqlens from a plan (CPU)",
        pybind11::arg("tokens"), pybind11::arg("doc_offsets"), pybind11::arg("masks"), pybind11::arg("piece_doc"),
        pybind11::arg("piece_start"), pybind11::arg("piece_len"), pybind11::arg("piece_offset"),
        pybind11::arg("row_first_piece"), pybind11::arg("row_first_seg"), pybind11::arg("row_len"),
        pybind11::arg("pad_id"), pybind11::arg("ignore_index"), pybind11::arg("out") = pybind11::none());
#ifdef FASTTRAIN_WITH_CUDA
  m.def("build_rows_cuda", &build_rows_cuda, "Row tensors and cu_seqlens from a plan (CUDA)",
        pybind11::arg("tokens"), pybind11::arg("doc_offsets"), pybind11::arg("masks"), pybind11::arg("piece_doc"),
        pybind11::arg("piece_start"), pybind11::arg("piece_len"), pybind11::arg("piece_offset"),
        pybind11::arg("row_first_piece"), pybind11::arg("row_first_seg"), pybind11::arg("n_segs"),
        pybind11::arg("row_len"), pybind11::arg("pad_id"), pybind11::arg("ignore_index"), pybind11::arg("stream"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
