// HostMapper: a thread of its own that maps memfd pages while Python runs.
//
// The vmem map-ahead worker hands it jobs (pages to mmap(MAP_FIXED | MAP_SHARED),
// checked and merged into runs here when submitted) and collects the results later. The thread
// never takes the GIL, so a decode step running Python on the caller's thread is
// never made to wait for it (a Python worker thread waits up to the interpreter's
// switch interval for the GIL, then takes it from the step).
//
// Jobs run in the order submitted; a job stops at its first failed mmap. Results
// are (ticket, pages mapped, errno or 0).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

// One mmap call: `size` bytes of the file at `off` over `addr`, which maps `pages` pages.
struct Call {
  int64_t addr, off, size, pages;
};

struct Job {
  int64_t ticket = 0;
  int fd = -1;
  std::vector<Call> calls;
};

using Result = std::tuple<int64_t, int64_t, int64_t>;  // ticket, pages mapped, errno

// A C-contiguous int64 buffer (a numpy array) of [n, 2] rows: its data and row count.
std::pair<const int64_t*, int64_t> int64_rows(const py::handle& obj, py::buffer_info& keep) {
  keep = py::reinterpret_borrow<py::buffer>(obj).request();
  const std::string& f = keep.format;
  bool i64 = keep.itemsize == 8 && !f.empty() && (f.back() == 'q' || f.back() == 'l');
  if (!i64 || keep.ndim != 2 || keep.shape[1] != 2) bad("pages must be an int64 buffer [n, 2]");
  if ((keep.shape[0] > 1 && keep.strides[0] != 16) || keep.strides[1] != 8)
    bad("pages must be C-contiguous");
  return {static_cast<const int64_t*>(keep.ptr), keep.shape[0]};
}

class HostMapper {
 public:
  HostMapper() : thread_([this] { loop(); }) {
    std::lock_guard<std::mutex> g(mu_);
    if (!waiters_ && !closed_) set_policy(thread_, true);
  }
  ~HostMapper() { close(); }
  HostMapper(const HostMapper&) = delete;
  HostMapper& operator=(const HostMapper&) = delete;

  // Queue the mapping of pages [(addr, offset), ...] of `size` bytes each, in order, each
  // run of pages that follow on in address and in offset (inside one range) one mmap.
  // Pages are taken up to the first one that lies in none of the reserved ranges
  // [(base, length), ...] or has an unaligned offset. Returns (ticket, pages taken);
  // tickets count up from 1.
  using Ranges = std::vector<std::pair<int64_t, int64_t>>;
  std::pair<int64_t, int64_t> submit(int64_t fd, const Ranges& ranges, const py::handle& pages,
                                     int64_t size) {
    const int64_t pg = page_size();
    if (size <= 0 || size % pg) bad("the page size must be a positive multiple of " +
                                    std::to_string(pg));
    py::buffer_info keep;
    auto [p, n] = int64_rows(pages, keep);
    std::vector<Call> calls;
    size_t last_range = ranges.size();
    int64_t ok = 0;
    for (; ok < n; ++ok) {
      int64_t a = p[2 * ok], o = p[2 * ok + 1];
      size_t r = 0;
      while (r < ranges.size() && !fits(a, size, ranges[r].first, ranges[r].second, pg)) ++r;
      if (r == ranges.size() || o < 0 || o % pg) break;
      Call* last = calls.empty() ? nullptr : &calls.back();
      bool follows = last && last->addr + last->size == a && last->off + last->size == o;
      if (follows && r == last_range) {
        last->size += size;
        last->pages += 1;
      } else {
        calls.push_back({a, o, size, 1});
      }
      last_range = r;
    }
    return {queue(fd, std::move(calls)), ok};
  }

  // The results of the jobs finished since the last poll, in ticket order.
  std::vector<Result> poll() {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<Result> out(results_.begin(), results_.end());
    results_.clear();
    return out;
  }

  // Block (the GIL released) until job `ticket` is finished (every job with ticket <= 0);
  // false when `timeout` seconds (negative: no limit) pass first. While anyone waits, the
  // thread runs at the default priority: on a busy machine an idle-priority thread that
  // someone waits for would get almost no CPU time (priority inversion).
  bool wait(int64_t ticket, double timeout) {
    py::gil_scoped_release nogil;
    std::unique_lock<std::mutex> lk(mu_);
    auto done = [&] { return finished_ >= (ticket > 0 ? ticket : submitted_); };
    if (done()) return true;
    if (waiters_++ == 0) set_policy(thread_, false);
    bool ok = true;
    if (timeout < 0)
      cv_.wait(lk, done);
    else
      ok = cv_.wait_for(lk, std::chrono::duration<double>(timeout), done);
    if (--waiters_ == 0 && !closed_) set_policy(thread_, true);
    return ok;
  }

  // Finish the queued jobs (at the default priority), then stop the thread. Idempotent.
  void close() {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (closed_) return;
      closed_ = true;
      set_policy(thread_, false);
      cv_.notify_all();
    }
    py::gil_scoped_release nogil;  // callers (the destructor too: Python frees it) hold the GIL
    if (thread_.joinable()) thread_.join();
  }

  bool running() const { return thread_.joinable(); }

  int64_t submitted() {
    std::lock_guard<std::mutex> g(mu_);
    return submitted_;
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return closed_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // closed, nothing left
      Job job = std::move(jobs_.front());
      jobs_.pop_front();
      lk.unlock();
      Result r = run(job);
      lk.lock();
      results_.push_back(r);
      finished_ = job.ticket;
      cv_.notify_all();
    }
  }

  static int64_t page_size() { return sysconf(_SC_PAGESIZE); }

  // SCHED_IDLE (idle): the thread runs on CPU time nothing else wants, and waking it never
  // preempts the caller's thread (on a busy machine it would otherwise take the caller's
  // core for the length of a job); else the default policy. Where a policy is refused,
  // the thread keeps the one it has.
  static void set_policy(std::thread& t, bool idle) {
#ifdef SCHED_IDLE
    if (!t.joinable()) return;
    sched_param none{};
    pthread_setschedparam(t.native_handle(), idle ? SCHED_IDLE : SCHED_OTHER, &none);
#else
    (void)t, (void)idle;
#endif
  }

  // [a, a + size) is page aligned and inside [base, base + length).
  static bool fits(int64_t a, int64_t size, int64_t base, int64_t length, int64_t pg) {
    return a % pg == 0 && a >= base && length >= size && a - base <= length - size;
  }

  int64_t queue(int64_t fd, std::vector<Call> calls) {
    if (fd < 0) bad("bad file descriptor");
    std::lock_guard<std::mutex> g(mu_);
    if (closed_) bad("the mapper is closed");
    Job job;
    job.ticket = ++submitted_;
    job.fd = static_cast<int>(fd);
    job.calls = std::move(calls);
    jobs_.push_back(std::move(job));
    cv_.notify_all();
    return submitted_;
  }

  static Result run(const Job& job) {
    int64_t pages = 0;
    for (const Call& c : job.calls) {
      void* got = mmap(reinterpret_cast<void*>(c.addr), c.size, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_FIXED, job.fd, c.off);
      if (got == MAP_FAILED) return {job.ticket, pages, errno};
      pages += c.pages;
    }
    return {job.ticket, pages, 0};
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  std::deque<Result> results_;
  int64_t submitted_ = 0, finished_ = 0;
  int waiters_ = 0;  // threads in wait()
  bool closed_ = false;
  std::thread thread_;  // last: started once everything above exists
};

}  // namespace

// Called from the module definition in kvmem_native.cpp.
void register_mapper(py::module_& m) {
  py::class_<HostMapper>(m, "HostMapper",
                         "A native thread that runs memfd mmap jobs without the GIL.")
      .def(py::init<>())
      .def("submit", &HostMapper::submit, py::arg("fd"), py::arg("ranges"), py::arg("pages"),
           py::arg("size"))
      .def("poll", &HostMapper::poll)
      .def("wait", &HostMapper::wait, py::arg("ticket") = 0, py::arg("timeout") = -1.0)
      .def("close", &HostMapper::close)
      .def_property_readonly("submitted", &HostMapper::submitted)
      .def_property_readonly("running", &HostMapper::running);
}
