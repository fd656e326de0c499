// Batched primitives behind kvmem.native (the torch binding layer).
//
// Every function checks all of its arguments before it changes anything and
// throws std::invalid_argument (ValueError in Python; kvmem.native turns it
// into kvmem.errors.InvalidArgument) on a bad one. Long loops run with the
// GIL released. CUDA work goes through kvmem_cuda.h (compiled by nvcc apart,
// only in CUDA builds: KVMEM_WITH_CUDA).
#include <sys/mman.h>
#include <torch/extension.h>
// after Python.h (through torch/extension.h): T_OBJECT_EX, READONLY, PyMember_GetOne
#include <structmember.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#ifdef KVMEM_WITH_CUDA
#include "kvmem_cuda.h"
#endif

namespace py = pybind11;

void register_mapper(py::module_& m);  // kvmem_mapper.cpp

namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

void check_buffer(const torch::Tensor& t, const char* what) {
  if (t.scalar_type() != torch::kUInt8) bad(std::string(what) + " must be a uint8 tensor");
  if (!t.is_contiguous()) bad(std::string(what) + " must be contiguous");
}

const int64_t* int64_rows(const torch::Tensor& t, int64_t cols, const char* what) {
  if (t.device().type() != torch::kCPU || t.scalar_type() != torch::kInt64 || t.dim() != 2 ||
      t.size(1) != cols || !t.is_contiguous())
    bad(std::string(what) + " must be a contiguous cpu int64 tensor [n, " +
        std::to_string(cols) + "]");
  return t.data_ptr<int64_t>();
}

// Segments (src_off, dst_off, nbytes): in bounds, and no byte written twice or
// read after (or while) it is written.
void check_segments(const int64_t* s, int64_t n, int64_t src_len, int64_t dst_len,
                    bool aliased, int64_t delta) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t a = s[3 * i], b = s[3 * i + 1], len = s[3 * i + 2];
    if (a < 0 || b < 0 || len < 0 || len > src_len - a || len > dst_len - b)
      bad("copy segment " + std::to_string(i) + " (" + std::to_string(a) + ", " +
          std::to_string(b) + ", " + std::to_string(len) + ") is out of range");
  }
  // [start, end) intervals in dst coordinates; src ones shifted by delta when
  // both buffers share memory (delta = src address - dst address).
  std::vector<std::pair<int64_t, int64_t>> dst;
  dst.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (s[3 * i + 2] > 0) dst.emplace_back(s[3 * i + 1], s[3 * i + 1] + s[3 * i + 2]);
  if (!std::is_sorted(dst.begin(), dst.end())) std::sort(dst.begin(), dst.end());
  for (size_t i = 1; i < dst.size(); ++i)
    if (dst[i].first < dst[i - 1].second) bad("copy segments overlap in the destination");
  if (!aliased) return;
  for (int64_t i = 0; i < n; ++i) {
    if (s[3 * i + 2] == 0) continue;
    int64_t lo = s[3 * i] + delta, hi = lo + s[3 * i + 2];
    auto it = std::lower_bound(dst.begin(), dst.end(), std::make_pair(hi, INT64_MIN));
    if (it != dst.begin() && std::prev(it)->second > lo)
      bad("a copy segment reads bytes that the copy writes");
  }
}

// Threads are plain std::threads, started only for copies of at least 4 MiB:
// an OpenMP team started from a swap worker thread would spin beside the
// main thread's own team.
void copy_cpu(const uint8_t* src, uint8_t* dst, const int64_t* s, int64_t n, int64_t threads) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += s[3 * i + 2];
  const int64_t kParallelBytes = 4 << 20;
  threads = std::min<int64_t>(threads, total / (1 << 20));
  if (threads <= 1 || total < kParallelBytes) {
    for (int64_t i = 0; i < n; ++i)
      if (s[3 * i + 2]) std::memcpy(dst + s[3 * i + 1], src + s[3 * i], s[3 * i + 2]);
    return;
  }
  // Thread t copies bytes [t * total / T, (t + 1) * total / T) of the concatenated segments.
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) start[i + 1] = start[i] + s[3 * i + 2];
  auto part = [&](int64_t t) {
    int64_t lo = total * t / threads, hi = total * (t + 1) / threads;
    int64_t i = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    for (; i < n && start[i] < hi; ++i) {
      int64_t a = std::max(lo, start[i]), b = std::min(hi, start[i + 1]);
      if (b > a) {
        int64_t off = a - start[i];
        std::memcpy(dst + s[3 * i + 1] + off, src + s[3 * i] + off, b - a);
      }
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(part, t);
  part(0);
  for (auto& th : pool) th.join();
}

// Copy byte segments between two flat uint8 buffers in one call.
void copy_segments(const torch::Tensor& src, const torch::Tensor& dst, const torch::Tensor& segs,
                   int64_t stream, int64_t threads) {
  check_buffer(src, "source buffer");
  check_buffer(dst, "destination buffer");
  const int64_t* s = int64_rows(segs, 3, "segments");
  int64_t n = segs.size(0);
  auto sp = reinterpret_cast<uintptr_t>(src.data_ptr());
  auto dp = reinterpret_cast<uintptr_t>(dst.data_ptr());
  int64_t sl = src.numel(), dl = dst.numel();
  bool aliased = sp < dp + dl && dp < sp + sl;
  bool cuda = src.is_cuda() || dst.is_cuda();
  if (!cuda && (src.device().type() != torch::kCPU || dst.device().type() != torch::kCPU))
    bad("buffers must be on the cpu or a CUDA device");
  check_segments(s, n, sl, dl, aliased, static_cast<int64_t>(sp - dp));
  if (n == 0) return;
  const uint8_t* sptr = src.data_ptr<uint8_t>();
  uint8_t* dptr = dst.data_ptr<uint8_t>();
  if (cuda) {
#ifdef KVMEM_WITH_CUDA
    int64_t done = 0;
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = kvmem_cuda_copy_segments(sptr, dptr, s, n, reinterpret_cast<void*>(stream), &done);
    }
    if (rc)
      throw std::runtime_error(std::string("CUDA batched copy failed after ") +
                               std::to_string(done) + " copies: " +
                               kvmem_cuda_error_string(rc, 1));
    return;
#else
    (void)stream;
    bad("kvmem native extension was built without CUDA");
#endif
  }
  py::gil_scoped_release nogil;
  copy_cpu(sptr, dptr, s, n, threads);
}

// ---------------------------------------------------------------- host VMM
void check_pages(int64_t base, int64_t length, const int64_t* addrs, int64_t n, int64_t size) {
  int64_t pg = sysconf(_SC_PAGESIZE);
  if (size <= 0 || size % pg) bad("page size must be a positive multiple of " + std::to_string(pg));
  if (base < 0 || length < 0 || base % pg || length % pg) bad("reserved range is not page aligned");
  for (int64_t i = 0; i < n; ++i) {
    int64_t a = addrs[i];
    if (a % pg || a < base || a - base > length - size)
      bad("page " + std::to_string(i) + " at address " + std::to_string(a) +
          " is not a page-aligned address inside the reserved range");
  }
}

// mmap(MAP_FIXED | MAP_SHARED) of fd at offsets[i] over addrs[i]. Returns
// (pages mapped, errno of the failed mmap or 0).
std::tuple<int64_t, int64_t> host_map(int64_t fd, int64_t base, int64_t length,
                                      const torch::Tensor& addrs, const torch::Tensor& offsets,
                                      int64_t size) {
  const int64_t* a = int64_rows(addrs.view({-1, 1}), 1, "addresses");
  const int64_t* o = int64_rows(offsets.view({-1, 1}), 1, "offsets");
  int64_t n = addrs.numel();
  if (offsets.numel() != n) bad("as many offsets as addresses are needed");
  if (fd < 0) bad("bad file descriptor");
  check_pages(base, length, a, n, size);
  int64_t pg = sysconf(_SC_PAGESIZE);
  for (int64_t i = 0; i < n; ++i)
    if (o[i] < 0 || o[i] % pg) bad("file offset " + std::to_string(o[i]) + " is not page aligned");
  py::gil_scoped_release nogil;
  for (int64_t i = 0; i < n; ++i) {
    void* want = reinterpret_cast<void*>(a[i]);
    void* got = mmap(want, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                     static_cast<int>(fd), o[i]);
    if (got == MAP_FAILED) return {i, errno};
  }
  return {n, 0};
}

// A fresh PROT_NONE mapping back over each page (the addresses stay reserved).
std::tuple<int64_t, int64_t> host_unmap(int64_t base, int64_t length, const torch::Tensor& addrs,
                                        int64_t size) {
  const int64_t* a = int64_rows(addrs.view({-1, 1}), 1, "addresses");
  int64_t n = addrs.numel();
  check_pages(base, length, a, n, size);
  py::gil_scoped_release nogil;
  for (int64_t i = 0; i < n; ++i) {
    void* got = mmap(reinterpret_cast<void*>(a[i]), size, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (got == MAP_FAILED) return {i, errno};
  }
  return {n, 0};
}

// ---------------------------------------------------------------- CUDA VMM
std::tuple<int64_t, int64_t, std::string> cuda_map(const torch::Tensor& addrs,
                                                   const torch::Tensor& handles, int64_t size,
                                                   int64_t device) {
  const int64_t* a = int64_rows(addrs.view({-1, 1}), 1, "addresses");
  const int64_t* h = int64_rows(handles.view({-1, 1}), 1, "handles");
  int64_t n = addrs.numel();
  if (handles.numel() != n) bad("as many handles as addresses are needed");
  if (size <= 0) bad("page size must be positive");
#ifdef KVMEM_WITH_CUDA
  int64_t done = 0;
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = kvmem_cuda_map_pages(reinterpret_cast<const uint64_t*>(a),
                              reinterpret_cast<const uint64_t*>(h), n, size,
                              static_cast<int>(device), &done);
  }
  return {done, rc, rc ? kvmem_cuda_error_string(rc, 0) : ""};
#else
  (void)a, (void)h, (void)device;
  bad("kvmem native extension was built without CUDA");
#endif
}

std::tuple<int64_t, int64_t, std::string> cuda_unmap(const torch::Tensor& addrs, int64_t size) {
  const int64_t* a = int64_rows(addrs.view({-1, 1}), 1, "addresses");
  int64_t n = addrs.numel();
  if (size <= 0) bad("page size must be positive");
#ifdef KVMEM_WITH_CUDA
  int64_t done = 0;
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = kvmem_cuda_unmap_pages(reinterpret_cast<const uint64_t*>(a), n, size, &done);
  }
  return {done, rc, rc ? kvmem_cuda_error_string(rc, 0) : ""};
#else
  (void)a, (void)n;
  bad("kvmem native extension was built without CUDA");
#endif
}

// ---------------------------------------------------------------- layout
// The arrays of a BatchLayout (see kvmem/layout.py build_layout) from a checked cpu int32
// table [rows, W]: sequence i's pages are row rp[i] of it (row i without rp), its KV length
// after the step seq_lens[i] (an int32 [B] tensor, returned as the layout's seq_lens), its
// new entries ql[i].
std::vector<torch::Tensor> fill_layout(const torch::Tensor& table, const int64_t* rp,
                                       torch::Tensor seq_lens, const int32_t* ql,
                                       int64_t page_size) {
  int64_t b = seq_lens.size(0), w = table.size(1);
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  int64_t nnz = 0, ntok = 0, max_pages = 0;
  for (int64_t i = 0; i < b; ++i) {
    if (sl[i] < 0 || ql[i] < 0 || ql[i] > sl[i])
      bad("sequence " + std::to_string(i) + ": need 0 <= query_len <= seq_len, got " +
          std::to_string(ql[i]) + " and " + std::to_string(sl[i]));
    int64_t np = (static_cast<int64_t>(sl[i]) + page_size - 1) / page_size;
    if (np > w)
      bad("sequence " + std::to_string(i) + " needs " + std::to_string(np) +
          " pages; the table has " + std::to_string(w));
    nnz += np;
    ntok += ql[i];
    max_pages = std::max(max_pages, np);
  }
  auto i32 = torch::TensorOptions().dtype(torch::kInt32);
  auto indptr = torch::empty({b + 1}, i32), indices = torch::empty({nnz}, i32);
  auto last = torch::empty({b}, i32), qsl = torch::empty({b + 1}, i32);
  auto dense = torch::empty({b, max_pages}, i32);
  auto slots = torch::empty({ntok}, torch::TensorOptions().dtype(torch::kInt64));
  int32_t *ip = indptr.data_ptr<int32_t>(), *ix = indices.data_ptr<int32_t>();
  int32_t *lp = last.data_ptr<int32_t>(), *qp = qsl.data_ptr<int32_t>();
  int32_t* dp = dense.data_ptr<int32_t>();
  int64_t* sp = slots.data_ptr<int64_t>();
  const int32_t* tp = table.data_ptr<int32_t>();
  int64_t s0 = table.stride(0), s1 = table.stride(1);
  ip[0] = 0;
  qp[0] = 0;
  for (int64_t i = 0; i < b; ++i) {
    int64_t np = (static_cast<int64_t>(sl[i]) + page_size - 1) / page_size;
    const int32_t* row = tp + (rp ? rp[i] : i) * s0;
    int32_t* drow = dp + i * max_pages;
    int32_t* out = ix + ip[i];
    if (s1 == 1) {
      std::memcpy(drow, row, np * sizeof(int32_t));
    } else {
      for (int64_t j = 0; j < np; ++j) drow[j] = row[j * s1];
    }
    std::memcpy(out, drow, np * sizeof(int32_t));
    std::memset(drow + np, 0, (max_pages - np) * sizeof(int32_t));
    ip[i + 1] = ip[i] + static_cast<int32_t>(np);
    lp[i] = static_cast<int32_t>(sl[i] - (np - 1) * page_size);
    qp[i + 1] = qp[i] + ql[i];
    int64_t* so = sp + qp[i];
    for (int64_t p = sl[i] - ql[i], k = 0; k < ql[i]; ++k, ++p)
      so[k] = static_cast<int64_t>(drow[p / page_size]) * page_size + p % page_size;
  }
  return {indptr, indices, last, dense, seq_lens, qsl, slots};
}

// The arrays of a BatchLayout. Sequence i's pages are row i of `table`, or row rows[i] when
// `rows` (int64 [B]) is given.
std::vector<torch::Tensor> layout_arrays(const torch::Tensor& table, const torch::Tensor& seq_lens,
                                         const torch::Tensor& query_lens, int64_t page_size,
                                         const c10::optional<torch::Tensor>& rows) {
  if (page_size <= 0) bad("page_size must be positive");
  if (table.device().type() != torch::kCPU || table.scalar_type() != torch::kInt32 ||
      table.dim() != 2)
    bad("table must be a cpu int32 tensor [B, W]");
  for (const auto* t : {&seq_lens, &query_lens})
    if (t->device().type() != torch::kCPU || t->scalar_type() != torch::kInt32 ||
        t->dim() != 1 || !t->is_contiguous())
      bad("seq_lens and query_lens must be contiguous cpu int32 tensors [B]");
  int64_t b = seq_lens.size(0);
  const int64_t* rp = nullptr;
  if (rows.has_value()) {
    const torch::Tensor& r = *rows;
    if (r.device().type() != torch::kCPU || r.scalar_type() != torch::kInt64 || r.dim() != 1 ||
        !r.is_contiguous() || r.size(0) != b)
      bad("rows must be a contiguous cpu int64 tensor [B]");
    rp = r.data_ptr<int64_t>();
    for (int64_t i = 0; i < b; ++i)
      if (rp[i] < 0 || rp[i] >= table.size(0))
        bad("row " + std::to_string(rp[i]) + " is not a row of the table");
  } else if (table.size(0) != b) {
    bad("table, seq_lens and query_lens disagree on the batch size");
  }
  if (query_lens.size(0) != b) bad("table, seq_lens and query_lens disagree on the batch size");
  return fill_layout(table, rp, seq_lens.clone(), query_lens.data_ptr<int32_t>(), page_size);
}

// ---------------------------------------------------------------- page keys
// Chained 64-bit page keys; kvmem/native.py page_keys_py computes the same.
constexpr uint64_t kP1 = 0x9E3779B97F4A7C15ull, kP2 = 0xC2B2AE3D27D4EB4Full;

inline uint64_t fmix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDull;
  x ^= x >> 33;
  x *= 0xC4CEB9FE1A85EC53ull;
  x ^= x >> 33;
  return x;
}
inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

void chain_keys(const int64_t* tok, int64_t pages, int64_t ps, uint64_t prev, int64_t first,
                uint64_t* out) {
  for (int64_t i = 0; i < pages; ++i) {
    uint64_t h = kP2;
    const int64_t* t = tok + i * ps;
    for (int64_t j = 0; j < ps; ++j) h = rotl(h ^ static_cast<uint64_t>(t[j]), 27) * kP1;
    uint64_t d = fmix(h);
    prev += fmix(d + static_cast<uint64_t>(first + i + 1) * kP1);
    out[i] = prev;
  }
}

// Keys of the full pages of `tokens` (a list, a tuple or an int64 tensor),
// the first being page `first`; `prev` is the key before it (the root's for page 0).
torch::Tensor page_keys(py::handle tokens, int64_t page_size, uint64_t prev, int64_t first) {
  if (page_size <= 0) bad("page_size must be positive");
  if (first < 0) bad("first page must be >= 0");
  std::vector<int64_t> buf;
  const int64_t* tok;
  int64_t n;
  if (PyList_Check(tokens.ptr()) || PyTuple_Check(tokens.ptr())) {
    PyObject* seq = tokens.ptr();
    bool list = PyList_Check(seq);
    n = list ? PyList_GET_SIZE(seq) : PyTuple_GET_SIZE(seq);
    n -= n % page_size;
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      PyObject* o = list ? PyList_GET_ITEM(seq, i) : PyTuple_GET_ITEM(seq, i);
      if (!PyLong_Check(o)) bad("token " + std::to_string(i) + " is not an int");
      int overflow = 0;
      long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
      if (overflow) bad("token " + std::to_string(i) + " does not fit in int64");
      buf[i] = v;
    }
    tok = buf.data();
  } else {
    torch::Tensor t = py::cast<torch::Tensor>(tokens);
    if (t.device().type() != torch::kCPU || t.scalar_type() != torch::kInt64 || t.dim() != 1 ||
        !t.is_contiguous())
      bad("tokens must be a list, a tuple or a contiguous cpu int64 tensor");
    n = t.numel() - t.numel() % page_size;
    tok = t.data_ptr<int64_t>();
  }
  int64_t pages = n / page_size;
  auto out = torch::empty({pages}, torch::TensorOptions().dtype(torch::kInt64));
  uint64_t* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  {
    py::gil_scoped_release nogil;
    chain_keys(tok, pages, page_size, prev, first, o);
  }
  return out;
}

// ------------------------------------------------------ prefix-cache hashes
// CPython's tuple hash (xxHash-based, Objects/tupleobject.c since 3.8): the
// chain below equals hash((parent, tuple(page))) computed in Python, which
// kvmem.native checks once before it trusts this path.
constexpr uint64_t kX1 = 11400714785074694791ull, kX2 = 14029467366897019727ull,
                   kX5 = 2870177450012600261ull;

inline uint64_t xx_round(uint64_t acc, uint64_t lane) {
  acc += lane * kX2;
  acc = (acc << 31) | (acc >> 33);
  return acc * kX1;
}

inline int64_t xx_end(uint64_t acc, uint64_t len) {
  acc += len ^ (kX5 ^ 3527539ull);
  return acc == static_cast<uint64_t>(-1) ? 1546275796 : static_cast<int64_t>(acc);
}

inline Py_hash_t hash_of(PyObject* o) {
  Py_hash_t h = PyObject_Hash(o);
  if (h == -1) throw py::error_already_set();
  return h;
}

// hash(x) of a Python int x: |x| mod 2**61 - 1 with x's sign, -1 made -2 (CPython's
// long_hash on 64-bit builds), without making x a Python int.
inline int64_t int_hash(int64_t x) {
  const uint64_t m = (1ull << 61) - 1;
  uint64_t a = x < 0 ? 0 - static_cast<uint64_t>(x) : static_cast<uint64_t>(x);
  int64_t r = static_cast<int64_t>(a % m);
  if (x < 0) r = -r;
  return r == -1 ? -2 : r;
}

// hash((parent, tuple(page))) of the page starting at `item`.
int64_t page_hash(PyObject** item, int64_t page_size, int64_t parent) {
  uint64_t inner = kX5;
  for (int64_t j = 0; j < page_size; ++j)
    inner = xx_round(inner, static_cast<uint64_t>(hash_of(item[j])));
  uint64_t acc = xx_round(kX5, static_cast<uint64_t>(int_hash(parent)));
  acc = xx_round(acc, static_cast<uint64_t>(xx_end(inner, page_size)));
  return xx_end(acc, 2);
}

// Pages first .. first + count - 1 of `tokens` (a list): parent = hash((parent,
// tuple(page))) for each, the hashes returned in order.
py::list chain_hashes(py::handle tokens, int64_t page_size, int64_t first, int64_t count,
                      int64_t parent) {
  if (!PyList_Check(tokens.ptr())) bad("tokens must be a list");
  if (page_size <= 0) bad("page_size must be positive");
  if (first < 0 || count < 0) bad("first and count must be >= 0");
  PyObject* seq = tokens.ptr();
  if ((first + count) * page_size > PyList_GET_SIZE(seq)) bad("the pages run past the tokens");
  py::list out(count);
  for (int64_t i = 0; i < count; ++i) {
    parent = page_hash(PySequence_Fast_ITEMS(seq) + (first + i) * page_size, page_size, parent);
    PyList_SET_ITEM(out.ptr(), i, PyLong_FromLongLong(parent));
  }
  return out;
}

// The prefix cache's publication of a sequence's pages first .. first + count
// - 1 (kvmem/backends/blocks.py _on_commit): their chained hashes, appended to
// `hashes`, and each page whose block (blocks[i]) has no key yet and whose hash
// `index` lacks gets the key (parent hash, tuple(page)): keys[block] = key,
// page_hashes[block] = hash, index[hash] = block, and (key, block) is appended
// to `published` unless it is null. The caller checked the bounds. The keys
// hold only ints, so they are untracked by the cycle collector at once (as the
// collector itself would on its next pass): a long prompt's keys then cost no
// garbage-collection passes.
void publish_run(PyObject* seq, int64_t page_size, int64_t first, int64_t count,
                 int64_t parent, PyObject* bl, PyObject* kl, PyObject* ix, PyObject* ph,
                 PyObject* hashes, PyObject* published) {
  PyObject* parent_obj = PyLong_FromLongLong(parent);
  if (!parent_obj) throw py::error_already_set();
  py::object parent_ref = py::reinterpret_steal<py::object>(parent_obj);
  for (int64_t i = 0; i < count; ++i) {
    PyObject** item = PySequence_Fast_ITEMS(seq) + (first + i) * page_size;
    int64_t h = page_hash(item, page_size, parent);
    PyObject* hobj = PyLong_FromLongLong(h);
    if (!hobj) throw py::error_already_set();
    int rc = PyList_Append(hashes, hobj);
    Py_DECREF(hobj);  // `hashes` keeps it alive
    if (rc) throw py::error_already_set();
    PyObject* bobj = PyList_GET_ITEM(bl, first + i);
    long long b = PyLong_AsLongLong(bobj);
    if (b < 0 || b >= PyList_GET_SIZE(kl)) {
      PyErr_Clear();
      bad("a block is not an index of keys");
    }
    if (PyList_GET_ITEM(kl, b) == Py_None) {
      // index.setdefault(hash, block), one lookup: the index grew exactly when the hash was
      // new (no other page holds this key), and it is now indexed to this block
      Py_ssize_t had = PyDict_GET_SIZE(ix);
      if (!PyDict_SetDefault(ix, hobj, bobj)) throw py::error_already_set();
      if (PyDict_GET_SIZE(ix) > had) {
        PyObject* page = PyTuple_New(page_size);
        PyObject* key = nullptr;
        if (page) {
          for (int64_t j = 0; j < page_size; ++j) {
            Py_INCREF(item[j]);
            PyTuple_SET_ITEM(page, j, item[j]);
          }
          PyObject_GC_UnTrack(page);
          key = PyTuple_Pack(2, parent_obj, page);
          Py_DECREF(page);
        }
        if (key) PyObject_GC_UnTrack(key);
        rc = key ? 0 : -1;
        if (!rc && published) {
          PyObject* pair = PyTuple_Pack(2, key, bobj);
          rc = pair ? PyList_Append(published, pair) : -1;
          Py_XDECREF(pair);
        }
        if (rc) {
          Py_XDECREF(key);
          PyObject *et, *ev, *tb;  // keep the error while the index entry is taken back
          PyErr_Fetch(&et, &ev, &tb);
          if (PyDict_DelItem(ix, hobj)) PyErr_Clear();
          PyErr_Restore(et, ev, tb);
          throw py::error_already_set();
        }
        PyList_SetItem(kl, b, key);  // steals the reference, drops the None
        Py_INCREF(hobj);
        PyList_SetItem(ph, b, hobj);
      }
    }
    parent = h;
    parent_obj = hobj;
  }
}

// What publish_run (and the reserve pass's evictions) write to: keys and
// page_hashes, lists of one entry per page, and index, a dict.
bool publish_targets(PyObject* kl, PyObject* ix, PyObject* ph) {
  return PyList_Check(kl) && PyDict_Check(ix) && PyList_Check(ph) &&
         PyList_GET_SIZE(ph) == PyList_GET_SIZE(kl);
}

// publish_run over a sequence's tokens: (hashes, [(key, block) published]); the
// Python version is kvmem/native/python.py publish_pages.
py::tuple publish_pages(py::handle tokens, int64_t page_size, int64_t first, int64_t count,
                        int64_t parent, py::handle blocks, py::handle keys, py::handle index,
                        py::handle page_hashes) {
  PyObject *seq = tokens.ptr(), *bl = blocks.ptr();
  if (!PyList_Check(seq) || !PyList_Check(bl) ||
      !publish_targets(keys.ptr(), index.ptr(), page_hashes.ptr()))
    bad("tokens, blocks, keys and page_hashes must be lists (the last two alike), index a dict");
  if (page_size <= 0) bad("page_size must be positive");
  if (first < 0 || count < 0) bad("first and count must be >= 0");
  if ((first + count) * page_size > PyList_GET_SIZE(seq) || first + count > PyList_GET_SIZE(bl))
    bad("the pages run past the tokens or the blocks");
  py::list hashes, published;
  publish_run(seq, page_size, first, count, parent, bl, keys.ptr(), index.ptr(),
              page_hashes.ptr(), hashes.ptr(), published.ptr());
  return py::make_tuple(hashes, published);
}

// The block-table backends' release of a sequence's pages (kvmem/backends/
// freepages.py FreeQueue.release): for each page, last first, ref[page] -= 1;
// a page no longer held joins `queue` (an OrderedDict: queue[page] = None) at
// the back if it has a key (cached KV), else at the front (`to_front(page,
// False)`, its move_to_end). Returns how many of them had keys. Every page is
// checked first (an int index of ref, held, named once); the Python version is
// kvmem/native/python.py release_pages.
int64_t release_pages(py::handle pages, py::handle ref, py::handle keys, py::handle queue,
                      py::handle to_front) {
  PyObject *pl = pages.ptr(), *rl = ref.ptr(), *kl = keys.ptr();
  if (!PyList_Check(pl) || !PyList_Check(rl) || !PyList_Check(kl) ||
      PyList_GET_SIZE(kl) != PyList_GET_SIZE(rl))
    bad("pages, ref and keys must be lists (the last two alike)");
  Py_ssize_t n = PyList_GET_SIZE(pl), np = PyList_GET_SIZE(rl);
  std::vector<int64_t> ids(n), sorted;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(pl, i);
    int overflow = 0;
    long long b = PyLong_Check(o) ? PyLong_AsLongLongAndOverflow(o, &overflow) : -1;
    if (overflow || b < 0 || b >= np) {
      PyErr_Clear();
      bad("page " + std::string(py::str(o)) + " is not a page of the pool");
    }
    PyObject* r = PyList_GET_ITEM(rl, b);
    long long held = PyLong_Check(r) ? PyLong_AsLongLong(r) : -1;
    if (held < 1) {
      PyErr_Clear();
      bad("page " + std::to_string(b) + " is not held");
    }
    ids[i] = b;
  }
  sorted = ids;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
    bad("a page is named twice");
  int64_t cached = 0;
  for (Py_ssize_t i = n - 1; i >= 0; --i) {
    int64_t b = ids[i];
    long long held = PyLong_AsLongLong(PyList_GET_ITEM(rl, b)) - 1;
    PyObject* v = PyLong_FromLongLong(held);
    if (!v) throw py::error_already_set();
    PyList_SetItem(rl, b, v);
    if (held) continue;
    PyObject* bobj = PyList_GET_ITEM(pl, i);
    bool has_key = PyList_GET_ITEM(kl, b) != Py_None;
    if (PyObject_SetItem(queue.ptr(), bobj, Py_None)) throw py::error_already_set();
    if (has_key) {
      ++cached;
    } else {
      PyObject* args[2] = {bobj, Py_False};
      PyObject* r = PyObject_Vectorcall(to_front.ptr(), args, 2, nullptr);
      if (!r) throw py::error_already_set();
      Py_DECREF(r);
    }
  }
  return cached;
}

// A copy of `tokens` if it is a non-empty list of plain non-negative ints (a
// prompt as the allocator keeps it), else None (kvmem/allocator.py
// check_tokens then converts or raises).
py::object token_list(py::handle tokens) {
  PyObject* t = tokens.ptr();
  if (!PyList_CheckExact(t) || PyList_GET_SIZE(t) == 0) return py::none();
  Py_ssize_t n = PyList_GET_SIZE(t);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PyList_GET_ITEM(t, i);
    if (!PyLong_CheckExact(v) || _PyLong_Sign(v) < 0) return py::none();
  }
  PyObject* copy = PyList_GetSlice(t, 0, n);
  if (!copy) throw py::error_already_set();
  // A list of ints is in no reference cycle, and the allocator only ever adds ints to it:
  // untracked, the cycle collector does not walk its (thousands of) items on every pass.
  PyObject_GC_UnTrack(copy);
  return py::reinterpret_steal<py::object>(copy);
}

// ------------------------------------------------ block-table batch passes
// The common case of the block-table backends' batched calls (kvmem/backends/
// blockbatch.py), run over their sequence states in one loop. A pass returns
// None, having changed nothing, whenever a call is not the common case (an
// unknown, swapped or loading sequence, a bad count, a commit beyond the
// reserved slots, ...): the backend then runs its Python version, which raises
// the right error. The states stay Python objects; their __slots__ fields are
// read and written at their member descriptors' offsets.
struct Bail {};

enum Field {
  kSwapped, kTransfer, kComputed, kReserved, kBlocks, kTokens, kRow, kHashes, kRoot, kSlot,
  kFields
};
const char* const kNames[kFields] = {"swapped", "transfer", "num_computed", "reserved",
                                     "blocks",  "tokens",   "row",          "hashes",
                                     "root",    "slot"};

// The slot offsets of the last state type seen, each looked up when first needed (the vmem
// backend's states have a slot but no blocks or row). A field is read and written at its
// offset, as PyMember_GetOne / PyMember_SetOne do for a T_OBJECT_EX member, without the
// calls and the reference count traffic.
struct Members {
  PyObject* type = nullptr;  // a strong reference: the address cannot be reused
  Py_ssize_t off[kFields] = {};
  bool looked[kFields] = {};
};
Members members;

// The offset of the writable object slot `name` of type t (a member descriptor found along
// its MRO, as attribute access finds it), else -1.
Py_ssize_t member_of(PyObject* t, const char* name) {
  PyObject* d = PyObject_GetAttrString(t, name);
  if (!d) {
    PyErr_Clear();
    return -1;
  }
  Py_ssize_t off = -1;
  if (Py_IS_TYPE(d, &PyMemberDescr_Type)) {
    PyMemberDef* m = reinterpret_cast<PyMemberDescrObject*>(d)->d_member;
    if (m->type == T_OBJECT_EX && !(m->flags & READONLY)) off = m->offset;
  }
  Py_DECREF(d);  // the type's dict keeps the descriptor alive
  return off;
}

// Where field f of s lives, else Bail.
inline PyObject** field_of(PyObject* s, Field f) {
  PyObject* t = reinterpret_cast<PyObject*>(Py_TYPE(s));
  if (t != members.type) {
    Py_INCREF(t);
    Py_XDECREF(members.type);
    members = Members();
    members.type = t;
  }
  if (!members.looked[f]) {
    members.off[f] = member_of(t, kNames[f]);
    members.looked[f] = true;
  }
  if (members.off[f] < 0) throw Bail();
  return reinterpret_cast<PyObject**>(reinterpret_cast<char*>(s) + members.off[f]);
}

// Field f of s (borrowed: s keeps it alive), else Bail (unset).
inline PyObject* get(PyObject* s, Field f) {
  PyObject* v = *field_of(s, f);
  if (!v) throw Bail();
  return v;
}

inline int64_t as_int(PyObject* v) {  // an exact int that fits in int64, else Bail
  if (!PyLong_CheckExact(v)) throw Bail();
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
  if (overflow || (x == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    throw Bail();
  }
  return x;
}

inline int64_t get_int(PyObject* s, Field f) { return as_int(get(s, f)); }

void set_int(PyObject* s, Field f, int64_t x) {
  PyObject** at = field_of(s, f);
  PyObject* v = PyLong_FromLongLong(x);
  if (!v) throw py::error_already_set();
  PyObject* old = *at;
  *at = v;
  Py_XDECREF(old);
}

// The list in field f of s (borrowed: s keeps it alive), else Bail.
PyObject* get_list(PyObject* s, Field f) {
  PyObject* v = get(s, f);
  if (!PyList_Check(v)) throw Bail();
  return v;
}

// The states of n ids in `seqs` (borrowed), else Bail (an unknown id). A first pass that
// only looks each one up and asks for its memory ahead of use: the cache misses of many
// sequences then overlap instead of coming one after another in a pass's main loop.
std::vector<PyObject*> lookup(PyObject* seqs, PyObject* const* ids, Py_ssize_t n) {
  std::vector<PyObject*> out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* s = PyDict_GetItemWithError(seqs, ids[i]);
    if (!s) {
      PyErr_Clear();
      throw Bail();
    }
    __builtin_prefetch(s);
    __builtin_prefetch(reinterpret_cast<char*>(s) + 64);
    out[i] = s;
  }
  return out;
}

// Ask for the object in field f of s ahead of use (Bail if s's type lacks f, as a read would).
inline void ahead(PyObject* s, Field f) {
  PyObject* v = *field_of(s, f);
  if (v) __builtin_prefetch(v);
}

// How far ahead of the sequence at hand a pass asks for the next ones' fields.
constexpr Py_ssize_t kAhead = 6;

// s is a state with no copy in flight; `resident`: not swapped out. Else Bail.
inline PyObject* usable(PyObject* s, bool resident) {
  if (get(s, kTransfer) != Py_None) throw Bail();
  if (resident && get(s, kSwapped) != Py_False) throw Bail();
  return s;
}

// No id twice in a batch: each id has a state object of its own, so the
// states are distinct exactly when the ids are (one pass over an open-addressing
// set of their addresses, cheaper than hashing the ids or sorting).
void distinct(const std::vector<PyObject*>& states) {
  size_t cap = 16;
  while (cap < 2 * states.size()) cap <<= 1;
  std::vector<uintptr_t> set(cap, 0);
  for (PyObject* o : states) {
    uintptr_t k = reinterpret_cast<uintptr_t>(o);
    size_t h = static_cast<size_t>((k >> 4) * 0x9E3779B97F4A7C15ull) & (cap - 1);
    while (set[h]) {
      if (set[h] == k) throw Bail();
      h = (h + 1) & (cap - 1);
    }
    set[h] = k;
  }
}

struct Batch {
  PyObject** ids;
  PyObject** counts;
  Py_ssize_t n;
};

Batch batch_of(py::handle ids, py::handle counts) {
  if (!(PyList_Check(ids.ptr()) || PyTuple_Check(ids.ptr())) || !PyList_Check(counts.ptr()))
    throw Bail();
  Py_ssize_t n = PySequence_Fast_GET_SIZE(ids.ptr());
  if (PyList_GET_SIZE(counts.ptr()) != n) throw Bail();
  return {PySequence_Fast_ITEMS(ids.ptr()), PySequence_Fast_ITEMS(counts.ptr()), n};
}

int64_t positive(PyObject* v) {
  int64_t x = as_int(v);
  if (x <= 0) throw Bail();
  return x;
}

// reserve_many: sequences whose growth fits in the pages they hold (the page
// the next entry goes to not shared: ref[page] == 1) are cheap; the others
// need `new` more pages and, when that page is shared, one copy (`cow`), as
// blocks.py _needed counts them. If those pages exceed `free`, their number is
// returned and nothing is set; else the cheap ones are set and the indices of
// the others returned for the backend to grow (in order: a copy made for one
// may leave another's page unshared).
//
// With `grow` = (queue, keys, index, page_hashes) and `table` (the dense block
// table, int32 [rows, width]), and no copy needed, the others grow here too, as
// the paged backend's _grow_into does when no one hears of evictions (no KV
// event subscriber, no tiers): each takes its pages from the front of `queue`
// (an OrderedDict: popitem(False)), a page with a key loses it (index entry,
// keys[page] = None), its ref becomes 1, and it goes into the sequence's blocks
// and table row. Then (indices left, pages evicted) is returned: ([], n).
py::object reserve_pass(py::handle seqs, py::handle ids, py::handle counts, int64_t ps,
                        py::handle ref, int64_t free, py::handle grow,
                        const c10::optional<torch::Tensor>& table) {
  if (ps <= 0 || !PyDict_Check(seqs.ptr()) || !PyList_Check(ref.ptr())) return py::none();
  PyObject *queue = nullptr, *kl = nullptr, *ix = nullptr, *ph = nullptr;
  if (!grow.is_none()) {
    if (!PyTuple_Check(grow.ptr()) || PyTuple_GET_SIZE(grow.ptr()) != 4 || !table.has_value())
      return py::none();
    queue = PyTuple_GET_ITEM(grow.ptr(), 0);
    kl = PyTuple_GET_ITEM(grow.ptr(), 1);
    ix = PyTuple_GET_ITEM(grow.ptr(), 2);
    ph = PyTuple_GET_ITEM(grow.ptr(), 3);
    const torch::Tensor& t = *table;
    if (!publish_targets(kl, ix, ph) || PyList_GET_SIZE(kl) != PyList_GET_SIZE(ref.ptr()) ||
        t.device().type() != torch::kCPU || t.scalar_type() != torch::kInt32 || t.dim() != 2 ||
        !t.is_contiguous())
      return py::none();
  }
  struct Grow {  // a sequence that takes `add` pages, checked
    PyObject *s, *blocks;
    int64_t row, held, add, target;
  };
  try {
    Batch b = batch_of(ids, counts);
    std::vector<std::pair<PyObject*, int64_t>> cheap;
    std::vector<int64_t> slow;
    std::vector<Grow> grows;
    int64_t need = 0;
    bool native_grow = queue != nullptr;
    Py_ssize_t nref = PyList_GET_SIZE(ref.ptr());
    std::vector<PyObject*> states = lookup(seqs.ptr(), b.ids, b.n);
    for (Py_ssize_t i = 0; i < b.n; ++i) {
      if (i + kAhead < b.n) {
        ahead(states[i + kAhead], kComputed);
        ahead(states[i + kAhead], kReserved);
        ahead(states[i + kAhead], kBlocks);
      }
      PyObject* s = usable(states[i], true);
      int64_t done = get_int(s, kComputed);
      int64_t target = done + positive(b.counts[i]);
      if (target <= get_int(s, kReserved)) continue;
      PyObject* blocks = get_list(s, kBlocks);
      int64_t held = PyList_GET_SIZE(blocks), idx = done / ps;
      bool shared = false;
      if (idx < held) {
        int64_t page = as_int(PyList_GET_ITEM(blocks, idx));
        if (page < 0 || page >= nref) throw Bail();
        shared = as_int(PyList_GET_ITEM(ref.ptr(), page)) > 1;
      }
      if (target <= held * ps && !shared) {
        cheap.emplace_back(s, target);
      } else {
        int64_t add = std::max<int64_t>(0, (target + ps - 1) / ps - held);
        need += add + shared;
        slow.push_back(i);
        if (native_grow) {
          int64_t row = get_int(s, kRow);
          if (shared || row < 0 || row >= table->size(0) || held + add > table->size(1))
            native_grow = false;  // a copy, or a table to widen: the backend grows them all
          else
            grows.push_back({s, blocks, row, held, add, target});
        }
      }
    }
    distinct(states);
    if (need > free) return py::int_(need);
    for (auto& [s, target] : cheap) set_int(s, kReserved, target);
    if (native_grow) {
      int64_t evicted = 0;
      int32_t* tp = table->data_ptr<int32_t>();
      int64_t width = table->size(1);
      py::object popitem = py::reinterpret_borrow<py::object>(queue).attr("popitem");
      PyObject* front[1] = {Py_False};  // popitem(False): the front of the queue
      for (const Grow& g : grows) {
        for (int64_t k = 0; k < g.add; ++k) {
          PyObject* got = PyObject_Vectorcall(popitem.ptr(), front, 1, nullptr);
          if (!got) throw py::error_already_set();
          py::object item = py::reinterpret_steal<py::object>(got);
          if (!PyTuple_Check(got) || PyTuple_GET_SIZE(got) != 2)
            bad("the free queue's popitem did not return a (page, value) pair");
          PyObject* bobj = PyTuple_GET_ITEM(item.ptr(), 0);
          long long page = PyLong_CheckExact(bobj) ? PyLong_AsLongLong(bobj) : -1;
          if (page < 0 || page >= nref) {
            PyErr_Clear();
            bad("the free queue holds a page that is not a page of the pool");
          }
          PyObject* key = PyList_GET_ITEM(kl, page);
          if (key != Py_None) {  // evict its cached prefix
            ++evicted;
            PyObject* h = PyList_GET_ITEM(ph, page);
            PyObject* at = PyDict_GetItemWithError(ix, h);
            if (!at && PyErr_Occurred()) throw py::error_already_set();
            if (at) {
              int eq = PyObject_RichCompareBool(at, bobj, Py_EQ);
              if (eq < 0 || (eq && PyDict_DelItem(ix, h))) throw py::error_already_set();
            }
            Py_INCREF(Py_None);
            PyList_SetItem(kl, page, Py_None);
          }
          PyObject* one = PyLong_FromLong(1);
          PyList_SetItem(ref.ptr(), page, one);
          if (PyList_Append(g.blocks, bobj)) throw py::error_already_set();
          tp[g.row * width + g.held + k] = static_cast<int32_t>(page);
        }
        set_int(g.s, kReserved, g.target);
      }
      return py::make_tuple(py::list(), evicted);
    }
    py::list out(slow.size());
    for (size_t k = 0; k < slow.size(); ++k)
      PyList_SET_ITEM(out.ptr(), k, PyLong_FromLongLong(slow[k]));
    return std::move(out);
  } catch (Bail&) {
    return py::none();
  }
}

// commit_many: every commit checked (within the reserved slots and the known
// tokens), then the ones that fill no page (or all, without `cache`) are set.
// Without `pub` the indices of those that fill one are returned for the
// backend to publish. With `pub` = (keys, index, page_hashes) they are
// published here, as the backend's _on_commit does when no one listens for
// KV events and there are no tiers (see publish_run), and [] is returned.
py::object commit_pass(py::handle seqs, py::handle ids, py::handle counts, int64_t ps,
                       bool cache, py::handle pub) {
  if (ps <= 0 || !PyDict_Check(seqs.ptr())) return py::none();
  PyObject *kl = nullptr, *ix = nullptr, *ph = nullptr;
  if (!pub.is_none()) {
    if (!PyTuple_Check(pub.ptr()) || PyTuple_GET_SIZE(pub.ptr()) != 3) return py::none();
    kl = PyTuple_GET_ITEM(pub.ptr(), 0);
    ix = PyTuple_GET_ITEM(pub.ptr(), 1);
    ph = PyTuple_GET_ITEM(pub.ptr(), 2);
    if (!publish_targets(kl, ix, ph)) return py::none();
  }
  struct Fill {  // a sequence that fills pages, checked: all publish_run reads
    PyObject *s, *tokens, *blocks, *hashes;
    int64_t first, last, end, parent;
  };
  try {
    Batch b = batch_of(ids, counts);
    std::vector<std::pair<PyObject*, int64_t>> set;
    std::vector<Py_ssize_t> fill;
    std::vector<Fill> pubs;
    std::vector<PyObject*> states = lookup(seqs.ptr(), b.ids, b.n);
    set.reserve(b.n);
    for (Py_ssize_t i = 0; i < b.n; ++i) {
      if (i + kAhead < b.n) {
        ahead(states[i + kAhead], kComputed);
        ahead(states[i + kAhead], kReserved);
        ahead(states[i + kAhead], kTokens);
      }
      PyObject* s = usable(states[i], true);
      int64_t done = get_int(s, kComputed), end = done + positive(b.counts[i]);
      PyObject* tokens = get_list(s, kTokens);
      if (end > get_int(s, kReserved) || end > PyList_GET_SIZE(tokens)) throw Bail();
      if (!cache || end / ps == done / ps) {
        set.emplace_back(s, end);
        continue;
      }
      fill.push_back(i);
      if (!kl) continue;
      Fill f{s, tokens, get_list(s, kBlocks), get_list(s, kHashes), done / ps, end / ps, end, 0};
      if (PyList_GET_SIZE(f.hashes) != f.first || PyList_GET_SIZE(f.blocks) < f.last) throw Bail();
      for (int64_t p = f.first; p < f.last; ++p) {
        int64_t page = as_int(PyList_GET_ITEM(f.blocks, p));
        if (page < 0 || page >= PyList_GET_SIZE(kl)) throw Bail();
      }
      f.parent = f.first ? as_int(PyList_GET_ITEM(f.hashes, f.first - 1)) : get_int(s, kRoot);
      pubs.push_back(f);
    }
    distinct(states);
    for (auto& [s, end] : set) set_int(s, kComputed, end);
    if (kl) {
      for (const Fill& f : pubs) {
        publish_run(f.tokens, ps, f.first, f.last - f.first, f.parent, f.blocks, kl, ix, ph,
                    f.hashes, nullptr);
        set_int(f.s, kComputed, f.end);
      }
      return py::list();
    }
    py::list out(fill.size());
    for (size_t k = 0; k < fill.size(); ++k) out[k] = py::int_(fill[k]);
    return std::move(out);
  } catch (Bail&) {
    return py::none();
  }
}

// append_many: each token list is a non-empty list of non-negative ints
// (swapped sequences too); all checked, then every one appended. True, or
// None (nothing appended).
py::object append_pass(py::handle seqs, py::handle ids, py::handle tokens) {
  if (!PyDict_Check(seqs.ptr())) return py::none();
  try {
    Batch b = batch_of(ids, tokens);
    std::vector<PyObject*> lists(b.n), states = lookup(seqs.ptr(), b.ids, b.n);
    for (Py_ssize_t i = 0; i < b.n; ++i) {
      if (i + kAhead < b.n) ahead(states[i + kAhead], kTokens);
      lists[i] = get_list(usable(states[i], false), kTokens);
      PyObject* t = b.counts[i];
      if (!PyList_Check(t) || PyList_GET_SIZE(t) == 0) throw Bail();
      for (Py_ssize_t j = 0; j < PyList_GET_SIZE(t); ++j)
        if (as_int(PyList_GET_ITEM(t, j)) < 0) throw Bail();
    }
    distinct(states);
    for (Py_ssize_t i = 0; i < b.n; ++i) {
      PyObject* t = b.counts[i];
      for (Py_ssize_t j = 0; j < PyList_GET_SIZE(t); ++j)
        if (PyList_Append(lists[i], PyList_GET_ITEM(t, j))) throw py::error_already_set();
    }
    return py::bool_(true);
  } catch (Bail&) {
    return py::none();
  }
}

// layout: the batch [(seq_id, n), ...] checked (resident, n new entries in
// reserved slots, no id twice) and laid out from rows of the backend's dense
// block table: (ids tuple, max_seq_len, max_query_len, the layout_arrays), or None.
// A state's table row is its `row` field, or its `slot` with by_slot (vmem).
py::object layout_pass(py::handle seqs, py::handle batch, const torch::Tensor& table,
                       int64_t page_size, bool by_slot) {
  const Field row = by_slot ? kSlot : kRow;
  if (!PyDict_Check(seqs.ptr()) || !PyList_Check(batch.ptr())) return py::none();
  try {
    Py_ssize_t n = PyList_GET_SIZE(batch.ptr());
    if (n == 0) throw Bail();
    if (table.device().type() != torch::kCPU || table.scalar_type() != torch::kInt32 ||
        table.dim() != 2)
      bad("table must be a cpu int32 tensor [B, W]");
    std::vector<int64_t> rows(n);
    std::vector<int32_t> qlens(n);
    auto lens = torch::empty({n}, torch::TensorOptions().dtype(torch::kInt32));
    int32_t* lp = lens.data_ptr<int32_t>();
    int64_t max_len = 0, max_q = 0, nrows = table.size(0);
    py::tuple ids(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(batch.ptr(), i);
      if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) throw Bail();
      PyObject* sid = PyTuple_GET_ITEM(item, 0);
      Py_INCREF(sid);
      PyTuple_SET_ITEM(ids.ptr(), i, sid);
      int64_t q = positive(PyTuple_GET_ITEM(item, 1));
      if (q > INT32_MAX) throw Bail();
      qlens[i] = static_cast<int32_t>(q);
    }
    std::vector<PyObject*> states =
        lookup(seqs.ptr(), reinterpret_cast<PyTupleObject*>(ids.ptr())->ob_item, n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (i + kAhead < n) {
        ahead(states[i + kAhead], kComputed);
        ahead(states[i + kAhead], kReserved);
        ahead(states[i + kAhead], row);
      }
      PyObject* s = usable(states[i], true);
      int64_t q = qlens[i];
      int64_t end = get_int(s, kComputed) + q;
      if (end > get_int(s, kReserved) || end > INT32_MAX) throw Bail();
      int64_t r = rows[i] = get_int(s, row);
      if (r < 0 || r >= nrows) bad("row " + std::to_string(r) + " is not a row of the table");
      lp[i] = static_cast<int32_t>(end);
      max_len = std::max(max_len, end);
      max_q = std::max(max_q, q);
    }
    distinct(states);
    auto arrays = fill_layout(table, rows.data(), lens, qlens.data(), page_size);
    return py::make_tuple(ids, max_len, max_q, arrays);
  } catch (Bail&) {
    return py::none();
  }
}

bool with_cuda() {
#ifdef KVMEM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvmem batched primitives (see kvmem/native.py)";
  m.def("copy_segments", &copy_segments, py::arg("src"), py::arg("dst"), py::arg("segs"),
        py::arg("stream") = 0, py::arg("threads") = 0);
  m.def("host_map", &host_map);
  m.def("host_unmap", &host_unmap);
  m.def("cuda_map", &cuda_map);
  m.def("cuda_unmap", &cuda_unmap);
  m.def("layout_arrays", &layout_arrays, py::arg("table"), py::arg("seq_lens"),
        py::arg("query_lens"), py::arg("page_size"), py::arg("rows") = py::none());
  m.def("page_keys", &page_keys);
  m.def("chain_hashes", &chain_hashes);
  m.def("publish_pages", &publish_pages);
  m.def("reserve_pass", &reserve_pass, py::arg("seqs"), py::arg("ids"), py::arg("counts"),
        py::arg("ps"), py::arg("ref"), py::arg("free"), py::arg("grow") = py::none(),
        py::arg("table") = py::none());
  m.def("commit_pass", &commit_pass, py::arg("seqs"), py::arg("ids"), py::arg("counts"),
        py::arg("ps"), py::arg("cache"), py::arg("pub") = py::none());
  m.def("release_pages", &release_pages);
  m.def("token_list", &token_list);
  m.def("append_pass", &append_pass);
  m.def("layout_pass", &layout_pass, py::arg("seqs"), py::arg("batch"), py::arg("table"),
        py::arg("page_size"), py::arg("by_slot") = false);
  m.def("with_cuda", &with_cuda);
  register_mapper(m);
  m.attr("ABI") = 1;
}
