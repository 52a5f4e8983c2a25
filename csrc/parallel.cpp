// The CPU thread pool behind parallel_for (parallel.h) and set_num_threads (common.h).
//
// One job at a time: the caller publishes it, wakes the workers, takes chunks itself
// (claimed from an atomic counter, so a descheduled thread delays only the chunk it
// holds), and returns once every chunk is done and no worker still looks at the job.
// Workers spin briefly after a job before sleeping: a decode step issues hundreds of ops
// with little host work in between, and a futex wake-up per op would cost more than
// many of the ops themselves.
#include "parallel.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define FIL_HAVE_GETPID 1
#endif
#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "check.h"
#include "fastinternlm/common.h"

namespace fastinternlm {
namespace {

constexpr int kMaxThreads = 1024;
// How long an idle worker keeps polling for the next job before it sleeps.
constexpr auto kSpinTime = std::chrono::microseconds(200);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int default_threads() {
  if (const char* env = std::getenv("FASTINTERNLM_NUM_THREADS")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v >= 1 && v <= kMaxThreads) return static_cast<int>(v);
  }
#if defined(__linux__)
  // The CPUs this process may run on (taskset, container cpusets), not the machine's.
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n >= 1) return std::min(n, kMaxThreads);
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n >= 1 ? static_cast<int>(std::min<unsigned>(n, kMaxThreads)) : 1;
}

thread_local bool t_in_pool_work = false;

class ThreadPool {
 public:
  explicit ThreadPool(int threads) : requested_(threads) {
    workers_.reserve(static_cast<size_t>(threads - 1));
    for (int slot = 1; slot < threads; ++slot) {
      try {
        workers_.emplace_back([this, slot] { worker_loop(slot); });
      } catch (const std::exception&) {  // std::system_error: no more threads to be had
        break;  // fewer threads than asked: the jobs still run, on those that exist
      }
    }
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      epoch_.fetch_add(1, std::memory_order_relaxed);
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  int requested() const { return requested_; }

  // false: another thread is running a job on this pool (the caller then runs inline).
  bool try_run(int64_t n, int64_t chunks, int slots, detail::RangeFn fn) {
    if (workers_.empty() || busy_.exchange(true, std::memory_order_acquire)) return false;
    Job job(fn, n, chunks, slots);
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &job;
      epoch_.fetch_add(1, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    t_in_pool_work = true;
    work(job, 0);
    t_in_pool_work = false;
    wait_until([&] { return job.done.load(std::memory_order_acquire) == job.chunks; });
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = nullptr;
    }
    // A worker that picked the job up may still be about to find no chunk left.
    wait_until([&] { return job.refs.load(std::memory_order_acquire) == 0; });
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  struct Job {
    Job(detail::RangeFn f, int64_t n_, int64_t chunks_, int slots_)
        : fn(f), n(n_), chunks(chunks_), slots(slots_) {}
    const detail::RangeFn fn;
    const int64_t n, chunks;
    const int slots;
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> refs{0};
  };

  static void work(Job& job, int slot) {
    const int64_t base = job.n / job.chunks, extra = job.n % job.chunks;
    for (;;) {
      const int64_t c = job.next.fetch_add(1, std::memory_order_relaxed);
      if (c >= job.chunks) return;
      // Chunk c: `base` items, one more for the first `extra` chunks.
      const int64_t begin = c * base + std::min(c, extra);
      const int64_t end = begin + base + (c < extra ? 1 : 0);
      job.fn.call(job.fn.self, begin, end, slot);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  template <typename Pred>
  static void wait_until(Pred done) {
    for (int i = 0; !done(); ++i) {
      if (i < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();  // the thread we wait for may share our core
      }
    }
  }

  void worker_loop(int slot) {
    uint64_t seen = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      seen = epoch_.load(std::memory_order_relaxed);
    }
    for (;;) {
      const auto deadline = std::chrono::steady_clock::now() + kSpinTime;
      for (int i = 0; epoch_.load(std::memory_order_acquire) == seen; ++i) {
        cpu_relax();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) break;
      }
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        while (!stop_ && epoch_.load(std::memory_order_relaxed) == seen) {
          ++sleepers_;
          cv_.wait(lock);
          --sleepers_;
        }
        if (stop_) return;
        seen = epoch_.load(std::memory_order_relaxed);
        job = job_;
        if (job != nullptr && slot < job->slots) {
          job->refs.fetch_add(1, std::memory_order_relaxed);
        } else {
          job = nullptr;
        }
      }
      if (job == nullptr) continue;
      t_in_pool_work = true;
      work(*job, slot);
      t_in_pool_work = false;
      job->refs.fetch_sub(1, std::memory_order_release);
    }
  }

  const int requested_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> epoch_{0};  // changed under mu_: a new job (or stop)
  Job* job_ = nullptr;              // guarded by mu_
  int sleepers_ = 0;                // guarded by mu_
  bool stop_ = false;               // guarded by mu_
  std::atomic<bool> busy_{false};
};

std::mutex g_mu;
std::atomic<int> g_threads{0};  // 0 until first asked: then set_num_threads or the default
std::shared_ptr<ThreadPool> g_pool;
#if FIL_HAVE_GETPID
pid_t g_pool_pid = 0;
#endif

std::shared_ptr<ThreadPool> get_pool(int threads) {
  std::lock_guard<std::mutex> lock(g_mu);
#if FIL_HAVE_GETPID
  // After fork() the child has the pool object but none of its threads: leave the old
  // pool alone (joining threads that do not exist here is undefined) and start afresh.
  if (g_pool && g_pool_pid != getpid()) (void)new std::shared_ptr<ThreadPool>(std::move(g_pool));
#endif
  if (!g_pool || g_pool->requested() != threads) {
    g_pool.reset();  // a job still running on the old pool keeps it alive until it ends
    try {
      g_pool = std::make_shared<ThreadPool>(threads);
    } catch (const std::exception&) {
      return nullptr;
    }
#if FIL_HAVE_GETPID
    g_pool_pid = getpid();
#endif
  }
  return g_pool;
}

}  // namespace

int get_num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    int expected = 0;
    n = default_threads();
    if (!g_threads.compare_exchange_strong(expected, n)) n = expected;
  }
  return n;
}

Status set_num_threads(int64_t n) {
  if (n < 0 || n > kMaxThreads)
    return invalid_value("num_threads must be in [0, ", kMaxThreads, "] (0: the default), got ", n);
  g_threads.store(n == 0 ? default_threads() : static_cast<int>(n));
  return Status::Ok();
}

namespace detail {

void parallel_run(int64_t n, int64_t chunks, int slots, RangeFn fn) {
  const int threads = std::min(get_num_threads(), slots);
  if (!t_in_pool_work && threads > 1) {
    const std::shared_ptr<ThreadPool> pool = get_pool(get_num_threads());
    if (pool && pool->try_run(n, chunks, threads, fn)) return;
  }
  fn.call(fn.self, 0, n, 0);
}

}  // namespace detail
}  // namespace fastinternlm
