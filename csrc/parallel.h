// A small thread pool for the CPU paths: parallel_for over independent items (rows,
// heads, output channels), with the calling thread taking part.
//
// Results never depend on the thread count: every item is computed by exactly one thread,
// with the same arithmetic in the same order whichever thread runs it and however the
// range is cut into chunks (the ops are written so that this holds). Work below a
// threshold runs inline on the caller: handing it to another thread costs microseconds,
// more than a small op takes. A parallel_for inside another one, or one issued while
// another thread of the process is using the pool, also runs inline, so the pool never
// deadlocks and never oversubscribes the cores.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <type_traits>

#include "fastinternlm/common.h"

namespace fastinternlm {

namespace detail {

struct RangeFn {
  void (*call)(const void* self, int64_t begin, int64_t end, int slot);
  const void* self;
};

// Runs fn over [0, n) cut into `chunks` chunks, on at most `slots` threads of the pool.
void parallel_run(int64_t n, int64_t chunks, int slots, RangeFn fn);

}  // namespace detail

// Operations below which a parallel_for runs inline: some 20 us of simple work, several
// times what waking another thread costs.
constexpr int64_t kParallelMinWork = int64_t{1} << 16;

// Calls f(begin, end, slot) for disjoint ranges covering [0, n), possibly concurrently,
// with slot in [0, slots) and unique among the calls running at one time: f may use
// per-slot scratch the caller allocated for `slots` slots (slots = get_num_threads() read
// once, before allocating). `work_per_item` estimates an item's cost in simple
// operations (a multiply-add, one converted element); it only decides whether and how
// finely to split. f must not throw.
template <typename F>
void parallel_for_slots(int64_t n, int64_t work_per_item, int slots, F&& f) {
  if (n <= 0) return;
  const int64_t per_item = work_per_item > 0 ? work_per_item : 1;
  const int64_t work = per_item > INT64_MAX / n ? INT64_MAX : n * per_item;
  // Four chunks per thread balance uneven items (causal attention rows, a partial last
  // tile) while each chunk still carries at least half the inline threshold.
  int64_t chunks = 4 * static_cast<int64_t>(std::min(slots, get_num_threads()));
  chunks = std::min(chunks, n);
  chunks = std::min(chunks, std::max<int64_t>(1, 2 * (work / kParallelMinWork)));
  if (chunks <= 1 || work < kParallelMinWork) {
    f(int64_t{0}, n, 0);
    return;
  }
  using Fn = std::remove_reference_t<F>;
  const detail::RangeFn fn{[](const void* self, int64_t begin, int64_t end, int slot) {
                             (*static_cast<Fn*>(const_cast<void*>(self)))(begin, end, slot);
                           },
                           static_cast<const void*>(&f)};
  detail::parallel_run(n, chunks, slots, fn);
}

// The same without scratch: f(begin, end).
template <typename F>
void parallel_for(int64_t n, int64_t work_per_item, F&& f) {
  parallel_for_slots(n, work_per_item, get_num_threads(),
                     [&f](int64_t begin, int64_t end, int) { f(begin, end); });
}

// Scratch memory of the CPU paths: left uninitialised (the kernels write every element
// they later read; zero-filling a K/V copy would double its memory traffic), and
// reporting failure instead of throwing, since the core returns Status.
template <typename T>
class Scratch {
 public:
  bool allocate(int64_t n) {
    try {
      p_.reset(new T[static_cast<size_t>(n > 0 ? n : 1)]);
    } catch (const std::exception&) {
      p_.reset();
    }
    return p_ != nullptr;
  }
  T* data() const { return p_.get(); }

 private:
  std::unique_ptr<T[]> p_;
};

}  // namespace fastinternlm
