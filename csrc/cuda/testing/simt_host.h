// simt_host.h: run CUDA kernel source on the CPU, for tests only (never part of megatron_slm._C).
//
// Under this header the unchanged csrc/cuda/*.cu compile as plain C++ with g++ (the stub
// include/cuda_runtime.h, cuda_fp16.h and cuda_bf16.h all include it). CUDA qualifiers are no-ops,
// __shared__ variables are static storage in the "simt_shared" section (filled with 0xFF before
// every block, so that a read of shared memory before any write shows up as NaN / huge counts), and
// every thread of a block is a cooperative fiber (ucontext) that runs until it reaches
// __syncthreads() or a warp collective (__shfl_*_sync, __ballot_sync, __match_any_sync), the only
// places where threads can observe each other. A run is deterministic for a given order. The order
// is a priority: forward always resumes the lowest runnable thread (warp 0 runs ahead of the others
// as far as barriers allow), reverse the highest, random a seeded random one; that exposes code
// that depends on it, e.g. a missing __syncthreads. Blocks run one after another, in ascending
// (forward), descending (reverse) or seeded random (random) order: results must not depend on it.
//
// Adversarial mode (order "adversarial:SEED", set_order) also runs config().resident_blocks
// blocks at once, their threads interleaved (each block's __shared__ data is swapped into the
// section while its thread runs), and adds switch points: every atomic lets another thread go
// first, and in a build with memory hooks (-fsanitize=thread instrumentation received by
// simt_memory_hooks.cpp instead of the TSan runtime) so may any load or store of shared memory or
// of a tracked device buffer (simt::track). A plain `+=` where an atomicAdd is needed then loses
// updates between its load and its store, in a block or between blocks; the atomic itself is
// never split.
//
// The scheduler checks what the hardware would not forgive: __syncthreads reached from different
// call sites (divergent barrier), a barrier some threads of the block never reach (they exited),
// deadlock, warp collectives whose mask names exited or missing lanes or whose lanes disagree on
// the operation, the mask or the call site, and launches whose grid or block exceeds the device
// limits (config().max_grid_x, ...).
// Kernel misuse fails the launch with a sticky cudaErrorLaunchFailure (simt::take_error gives
// the message).
// GCC drops the section attribute of statics in template instantiations: keep __shared__
// variables in non-template functions (as csrc/cuda does), or they are not poisoned.
// Launches go through SLM_LAUNCH(grid, block, smem, stream, kernel)(args...), which the .cu
// defines as <<<...>>> under nvcc. Half/bfloat16 conversions round to nearest even like the
// device; __expf is expf (the device's is an approximation within 2 ulp).
// Under -fsanitize=address the fiber switches are annotated (__sanitizer_start_switch_fiber /
// __sanitizer_finish_switch_fiber) so that ASan follows the stacks.
#pragma once

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#else
#define SIMT_ASAN 0
#endif

// ------------------------------------------------------------------------------------------
// qualifiers and launch syntax
// ------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("simt_shared")))
#define SLM_LAUNCH(grid, block, smem, stream, ...) \
  ::simt::Launcher((grid), (block), (smem), (stream), __VA_ARGS__)

// ------------------------------------------------------------------------------------------
// vector types
// ------------------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return uint4{x, y, z, w};
}
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ------------------------------------------------------------------------------------------
// runtime API subset
// ------------------------------------------------------------------------------------------
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMultiProcessorCount = 16,
};

namespace simt {

enum class Order { kForward, kReverse, kRandom };

// Yield probability (per mille) at a tracked memory access in adversarial mode: high enough that
// a read-modify-write of a hot histogram bin is cut within a few hundred of them.
constexpr unsigned int kDefaultYieldPermille = 125;

// Device limits and scheduling of the emulated device; tests change them between launches.
struct Config {
  Order order = Order::kForward;
  uint64_t seed = 0;
  unsigned int max_grid_x = 2147483647u;  // 2^31 - 1, as on sm_80 / sm_90
  unsigned int max_grid_y = 65535u;
  unsigned int max_grid_z = 65535u;
  unsigned int max_threads_per_block = 1024u;
  int multiprocessors = 4;
  bool poison_shared = true;
  // Adversarial mode (order must be kRandom): resident_blocks blocks run at once, their threads
  // interleaved; every atomic yields first, and with memory hooks linked (simt_memory_hooks.cpp,
  // code built with -fsanitize=thread) so does a tracked memory access with yield_permille.
  bool adversarial = false;
  int resident_blocks = 8;
  unsigned int yield_permille = kDefaultYieldPermille;
  cudaError_t fail_next_launch = cudaSuccess;  // fault injection: the next launch fails so
};

inline Config& config() {
  static Config c;
  return c;
}

// What a launcher issued (kernels that ran, device memsets): the launch budget of an operation,
// which is its fixed cost on a GPU, checked on the CPU. Tests reset it between calls.
struct Counters {
  unsigned long long launches = 0;
  unsigned long long memsets = 0;
  unsigned long long blocks = 0;  // of all launches: which path a launcher took shows in it
};

inline Counters& counters() {
  static Counters c;
  return c;
}

namespace detail {

struct Fiber {
  enum State { kReady, kBarrier, kWarp, kDone };
  ucontext_t ctx;  // its entry (makecontext); later switches go through jb
  jmp_buf jb;
  bool started = false;
  char* stack = nullptr;
  size_t stack_size = 0;
  uint3 tid{0, 0, 0};
  int linear = 0;  // thread index in its block
  int id = 0;      // index in Runtime::fibers: slot * nthreads + linear
  int slot = 0;    // the resident block it belongs to
  State state = kReady;
  // barrier / warp op in progress
  const char* file = nullptr;
  int line = 0;
  int op = 0;
  unsigned int mask = 0;
  uint64_t value = 0;
  int param = 0;
  uint64_t result = 0;
  void* fake_stack = nullptr;
};

enum WarpOp { kShflXor = 1, kShflDown = 2, kBallot = 3, kMatchAny = 4 };

// A block resident on the emulated device. Adversarial mode keeps several; the others one.
struct Slot {
  uint3 block_idx{0, 0, 0};
  int live = 0;             // fibers not done; 0: the slot is free
  std::vector<char> smem;   // its __shared__ section while another slot's is loaded
};

// Memory the kernels may share (device buffers, registered by the driver): in adversarial mode an
// access there may switch threads.
struct Range {
  uintptr_t lo, hi;
};

struct Runtime {
  std::vector<Fiber> fibers;
  std::set<int> ready;         // runnable fibers (forward / reverse orders)
  std::vector<int> ready_bag;  // runnable fibers (random order)
  Fiber* cur = nullptr;
  ucontext_t sched_ctx;
  jmp_buf sched_jb;
  const std::function<void()>* body = nullptr;
  std::vector<Slot> slots;
  int loaded_slot = -1;  // whose __shared__ data the section holds (-1: nobody's)
  std::vector<Range> tracked;
  int atomic_depth = 0;  // inside an atomic: its read and write are one step
  dim3 block_dim, grid_dim;
  int nthreads = 0;
  std::mt19937_64 rng;
  std::string error;  // set by a fiber or the scheduler: aborts the block
  cudaError_t last_error = cudaSuccess;  // cleared by cudaGetLastError
  std::string last_message;
  // A kernel fault is sticky, as on a device: cudaGetLastError reports it on every call.
  cudaError_t sticky_error = cudaSuccess;
  std::string sticky_message;
  bool in_kernel = false;
  // ASan: the scheduler's stack, learnt on the first switch into a fiber
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  bool stacks_dirty = false;  // a block was aborted: unpoison fiber stacks before reuse
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline size_t stack_bytes() { return SIMT_ASAN ? (256u << 10) : (64u << 10); }

inline void ensure_fibers(int n) {
  Runtime& r = rt();
  while (static_cast<int>(r.fibers.size()) < n) {
    r.fibers.emplace_back();
    Fiber& f = r.fibers.back();
    const size_t page = 4096;
    f.stack_size = stack_bytes();
    void* p = mmap(nullptr, f.stack_size + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "simt: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(p, page, PROT_NONE);  // guard page below the stack: overflow faults
    f.stack = static_cast<char*>(p) + page;
  }
}

// fiber -> scheduler
inline void yield_to_scheduler(bool dying) {
  Runtime& r = rt();
  Fiber* f = r.cur;
#if SIMT_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f->fake_stack, r.main_bottom, r.main_size);
#else
  (void)dying;
#endif
  if (SIMT_ASAN) {
    swapcontext(&f->ctx, &r.sched_ctx);
  } else if (_setjmp(f->jb) == 0) {
    _longjmp(r.sched_jb, 1);
  }
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &r.main_bottom, &r.main_size);
#endif
}

inline void fiber_entry() {
  Runtime& r = rt();
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.main_bottom, &r.main_size);
#endif
  (*r.body)();
  r.cur->state = Fiber::kDone;
  yield_to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

// scheduler -> fiber
inline void resume(Fiber& f) {
  Runtime& r = rt();
  r.cur = &f;
  void* fake = nullptr;
#if SIMT_ASAN
  __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
  // swapcontext saves and restores the signal mask, a system call per switch. Without ASan
  // (whose longjmp interceptor does not expect stack switches) the switches after a fiber's first
  // entry are _setjmp/_longjmp between live frames of two stacks: several times faster.
  if (SIMT_ASAN) {
    swapcontext(&r.sched_ctx, &f.ctx);
  } else if (_setjmp(r.sched_jb) == 0) {
    if (f.started) _longjmp(f.jb, 1);
    f.started = true;
    setcontext(&f.ctx);
  }
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)fake;
#endif
  r.cur = nullptr;
}

inline void fail(const std::string& msg) {
  Runtime& r = rt();
  if (r.error.empty()) r.error = msg;
}

inline std::string where(const Fiber& f) {
  const uint3 b = rt().slots[static_cast<size_t>(f.slot)].block_idx;
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," +
         std::to_string(f.tid.z) + ") of block (" + std::to_string(b.x) + "," +
         std::to_string(b.y) + "," + std::to_string(b.z) + ")";
}

inline std::string site(const Fiber& f) {
  return std::string(f.file ? f.file : "?") + ":" + std::to_string(f.line);
}

// Make `ids` runnable.
inline void release(const std::vector<int>& ids) {
  Runtime& r = rt();
  for (int i : ids) {
    r.fibers[static_cast<size_t>(i)].state = Fiber::kReady;
    if (config().order == Order::kRandom || config().adversarial) {
      r.ready_bag.push_back(i);
    } else {
      r.ready.insert(i);
    }
  }
}

// The next fiber to run, -1 when none is runnable. A priority order, not a queue: forward
// always runs the lowest runnable thread, so warp 0 runs ahead of the others as far as the
// barriers let it; reverse lets the last warp run ahead; random picks uniformly each time.
inline int next_ready() {
  Runtime& r = rt();
  switch (config().adversarial ? Order::kRandom : config().order) {
    case Order::kForward:
    case Order::kReverse: {
      if (r.ready.empty()) return -1;
      auto it = config().order == Order::kForward ? r.ready.begin() : std::prev(r.ready.end());
      const int id = *it;
      r.ready.erase(it);
      return id;
    }
    case Order::kRandom: {
      if (r.ready_bag.empty()) return -1;
      const size_t j = static_cast<size_t>(r.rng() % r.ready_bag.size());
      const int id = r.ready_bag[j];
      r.ready_bag[j] = r.ready_bag.back();
      r.ready_bag.pop_back();
      return id;
    }
  }
  return -1;
}

inline Fiber* current() {
  Fiber* f = rt().cur;
  if (f == nullptr) {
    std::fprintf(stderr, "simt: a device builtin was used outside a kernel\n");
    std::abort();
  }
  return f;
}

inline void syncthreads(const char* file, int line) {
  Fiber* f = current();
  f->state = Fiber::kBarrier;
  f->file = file;
  f->line = line;
  yield_to_scheduler(false);
}

// Called by the last lane that arrives: every lane of the mask is waiting at a warp op.
inline void try_complete_warp(Fiber& me) {
  Runtime& r = rt();
  const int warp_base = me.id - (me.linear & 31);  // fiber of lane 0
  const unsigned int mask = me.mask;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const int id = warp_base + l;
    if ((me.linear & ~31) + l >= r.nthreads) {
      fail("warp op mask 0x" + std::to_string(mask) + " names lane " + std::to_string(l) +
           " that does not exist (block of " + std::to_string(r.nthreads) + " threads) at " +
           site(me));
      return;
    }
    const Fiber& o = r.fibers[static_cast<size_t>(id)];
    if (o.state == Fiber::kDone) {
      fail("warp op at " + site(me) + " by " + where(me) + " names lane " + std::to_string(l) +
           ", which has exited");
      return;
    }
    if (o.state != Fiber::kWarp) return;  // not there yet (or at a barrier: deadlock later)
  }
  std::vector<int> ids;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& o = r.fibers[static_cast<size_t>(warp_base + l)];
    // The same operation and mask from different call sites is still divergent code: the
    // hardware would run the two shuffles one after the other, each with missing lanes.
    if (o.op != me.op || o.mask != mask || o.line != me.line || std::strcmp(o.file, me.file)) {
      fail("lanes disagree on a warp op: " + site(me) + " (mask " + std::to_string(mask) +
           ") vs " + site(o) + " (mask " + std::to_string(o.mask) + ")");
      return;
    }
    ids.push_back(warp_base + l);
  }
  for (int id : ids) {
    Fiber& o = r.fibers[static_cast<size_t>(id)];
    const int lane = id & 31;
    if (o.op == kBallot || o.op == kMatchAny) {  // lanes whose value is true / equals o's
      uint64_t bits = 0;
      for (int l = 0; l < 32; ++l) {
        const uint64_t v = r.fibers[static_cast<size_t>(warp_base + l)].value;
        if ((mask >> l & 1u) && (o.op == kBallot ? v != 0 : v == o.value)) bits |= 1ull << l;
      }
      o.result = bits;
      continue;
    }
    int src = lane;
    if (o.op == kShflXor) src = lane ^ o.param;
    if (o.op == kShflDown) src = lane + o.param < 32 ? lane + o.param : lane;
    if (src < 0 || src > 31 || !(mask >> src & 1u)) {
      fail("shuffle at " + site(o) + ": lane " + std::to_string(lane) + " reads lane " +
           std::to_string(src) + ", which is not in the mask");
      return;
    }
    o.result = r.fibers[static_cast<size_t>(warp_base + src)].value;
  }
  release(ids);
}

inline uint64_t warp_op(int op, unsigned int mask, uint64_t value, int param, const char* file,
                        int line) {
  Fiber* f = current();
  const int lane = f->linear & 31;
  if (!(mask >> lane & 1u)) {
    fail("warp op at " + std::string(file) + ":" + std::to_string(line) + " by " + where(*f) +
         ": the calling lane is not in its mask");
  }
  f->state = Fiber::kWarp;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->param = param;
  f->file = file;
  f->line = line;
  try_complete_warp(*f);
  yield_to_scheduler(false);
  return f->result;
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle type");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Nothing is runnable (in any slot) and some fibers of `slot` are not done: release its barrier
// or report why not.
inline bool release_barrier_or_fail(int slot) {
  Runtime& r = rt();
  const int base = slot * r.nthreads;
  std::vector<int> at_barrier;
  int done = 0;
  const Fiber* first = nullptr;
  for (int i = base; i < base + r.nthreads; ++i) {
    Fiber& f = r.fibers[static_cast<size_t>(i)];
    if (f.state == Fiber::kDone) {
      ++done;
    } else if (f.state == Fiber::kBarrier) {
      at_barrier.push_back(i);
      if (first == nullptr) first = &f;
    }
  }
  const int waiting = r.nthreads - done;
  if (static_cast<int>(at_barrier.size()) != waiting) {
    for (int i = base; i < base + r.nthreads; ++i) {
      const Fiber& f = r.fibers[static_cast<size_t>(i)];
      if (f.state == Fiber::kWarp) {
        const int lane0 = i - (f.linear & 31);
        for (int l = 0; l < 32 && (f.linear & ~31) + l < r.nthreads; ++l) {
          if ((f.mask >> l & 1u) &&
              r.fibers[static_cast<size_t>(lane0 + l)].state == Fiber::kDone) {
            fail("warp op at " + site(f) + " by " + where(f) + " names lane " + std::to_string(l) +
                 ", which has exited");
            return false;
          }
        }
        fail("deadlock: " + where(f) + " waits at the warp op at " + site(f) +
             " for lanes that never arrive (" + std::to_string(at_barrier.size()) +
             " threads wait at __syncthreads)");
        return false;
      }
    }
    fail("deadlock: no runnable thread");
    return false;
  }
  for (int i : at_barrier) {
    const Fiber& f = r.fibers[static_cast<size_t>(i)];
    if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
      fail("divergent __syncthreads: " + where(*first) + " waits at " + site(*first) + ", " +
           where(f) + " at " + site(f));
      return false;
    }
  }
  if (done > 0) {
    fail("__syncthreads at " + site(*first) + " is not reached by " + std::to_string(done) +
         " threads of the block, which have exited");
    return false;
  }
  release(at_barrier);
  return true;
}

extern "C" char __start_simt_shared[] __attribute__((weak));
extern "C" char __stop_simt_shared[] __attribute__((weak));

inline size_t shared_bytes() {
  return __start_simt_shared != nullptr
             ? static_cast<size_t>(__stop_simt_shared - __start_simt_shared)
             : 0;
}

// Resident blocks share the one static __shared__ section: it holds the data of the slot whose
// thread runs, the others' wait in Slot::smem.
inline void load_shared(int slot) {
  Runtime& r = rt();
  if (r.loaded_slot == slot) return;
  const size_t n = shared_bytes();
  if (n > 0) {
    if (r.loaded_slot >= 0) {
      std::memcpy(r.slots[static_cast<size_t>(r.loaded_slot)].smem.data(), __start_simt_shared, n);
    }
    std::memcpy(__start_simt_shared, r.slots[static_cast<size_t>(slot)].smem.data(), n);
  }
  r.loaded_slot = slot;
}

// Block `idx` starts in `slot`: fresh fibers, poisoned shared memory.
inline void start_block(int slot, uint3 idx) {
  Runtime& r = rt();
  Slot& s = r.slots[static_cast<size_t>(slot)];
  s.block_idx = idx;
  s.live = r.nthreads;
  const size_t n = shared_bytes();
  if (r.slots.size() == 1) {
    if (config().poison_shared && n > 0) std::memset(__start_simt_shared, 0xFF, n);
    r.loaded_slot = slot;
  } else {
    s.smem.assign(n, config().poison_shared ? '\xFF' : '\0');
    if (r.loaded_slot == slot) r.loaded_slot = -1;  // the section holds the finished block's
  }
  std::vector<int> ids;
  const int base = slot * r.nthreads;
  for (int i = 0; i < r.nthreads; ++i) {
    Fiber& f = r.fibers[static_cast<size_t>(base + i)];
    const unsigned int bx = r.block_dim.x, by = r.block_dim.y;
    f.linear = i;
    f.id = base + i;
    f.slot = slot;
    f.tid = uint3{static_cast<unsigned int>(i) % bx, static_cast<unsigned int>(i) / bx % by,
                  static_cast<unsigned int>(i) / (bx * by)};
    f.fake_stack = nullptr;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = f.stack_size;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
    f.started = false;
    ids.push_back(base + i);
  }
  release(ids);
}

// The order in which blocks start: ascending (forward), descending (reverse) or a seeded
// permutation (random, adversarial). Results must not depend on it, as on a GPU.
inline std::vector<uint3> block_order(dim3 grid) {
  std::vector<uint3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned int z = 0; z < grid.z; ++z) {
    for (unsigned int y = 0; y < grid.y; ++y) {
      for (unsigned int x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
    }
  }
  if (config().order == Order::kReverse && !config().adversarial) {
    std::reverse(blocks.begin(), blocks.end());
  } else if (config().order == Order::kRandom || config().adversarial) {
    for (size_t i = blocks.size(); i > 1; --i) {  // Fisher-Yates with the launch's rng
      std::swap(blocks[i - 1], blocks[static_cast<size_t>(rt().rng() % i)]);
    }
  }
  return blocks;
}

// Runs the grid's blocks: one at a time, or (adversarial) resident_blocks at once with their
// threads interleaved, each freed slot taking the next block as an SM would.
inline void run_grid(const std::vector<uint3>& blocks) {
  Runtime& r = rt();
  const Config& c = config();
  const size_t resident =
      c.adversarial ? std::min(blocks.size(), static_cast<size_t>(std::max(1, c.resident_blocks)))
                    : 1;
  r.slots.assign(resident, Slot{});
  r.loaded_slot = -1;
  ensure_fibers(static_cast<int>(resident) * r.nthreads);
#if SIMT_ASAN
  if (r.stacks_dirty) {
    for (Fiber& f : r.fibers) ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);
    r.stacks_dirty = false;
  }
#endif
  r.ready.clear();
  r.ready_bag.clear();
  size_t next = 0;
  for (size_t s = 0; s < resident; ++s) start_block(static_cast<int>(s), blocks[next++]);
  for (;;) {
    while (r.error.empty()) {
      const int id = next_ready();
      if (id < 0) break;
      Fiber& f = r.fibers[static_cast<size_t>(id)];
      load_shared(f.slot);
      resume(f);
      if (f.state == Fiber::kDone && --r.slots[static_cast<size_t>(f.slot)].live == 0 &&
          next < blocks.size()) {
        start_block(f.slot, blocks[next++]);
      }
    }
    if (!r.error.empty()) break;
    bool live = false;
    bool ok = true;
    for (size_t s = 0; s < resident && ok; ++s) {
      if (r.slots[s].live == 0) continue;
      live = true;
      ok = release_barrier_or_fail(static_cast<int>(s));
    }
    if (!live) return;
    if (!ok) break;
  }
  r.stacks_dirty = true;  // fibers abandoned mid-stack
}

// A thread gives way and stays runnable: the extra switch points of adversarial mode.
inline void give_way(bool always) {
  Runtime& r = rt();
  Fiber* f = r.cur;
  if (f == nullptr || !config().adversarial) return;
  if (!always && r.rng() % 1000 >= config().yield_permille) return;
  release({f->id});
  yield_to_scheduler(false);
}

// Called before every load and store of code built with -fsanitize=thread (the hooks of
// simt_memory_hooks.cpp): an access to shared memory or a tracked device buffer may switch
// threads, so a plain read-modify-write there can lose a concurrent update.
inline void on_memory_access(const void* p) {
  Runtime& r = rt();
  if (r.cur == nullptr || r.atomic_depth > 0 || !config().adversarial) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  bool hit = a >= reinterpret_cast<uintptr_t>(__start_simt_shared) &&
             a < reinterpret_cast<uintptr_t>(__stop_simt_shared);
  for (size_t i = 0; i < r.tracked.size() && !hit; ++i) {
    hit = a >= r.tracked[i].lo && a < r.tracked[i].hi;
  }
  if (hit) give_way(false);
}

inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  Runtime& r = rt();
  Config& c = config();
  if (c.fail_next_launch != cudaSuccess) {
    r.last_error = c.fail_next_launch;
    r.last_message = "injected launch failure";
    c.fail_next_launch = cudaSuccess;
    return;
  }
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > c.max_grid_x ||
      grid.y > c.max_grid_y || grid.z > c.max_grid_z || threads == 0 ||
      threads > c.max_threads_per_block) {
    r.last_error = cudaErrorInvalidConfiguration;
    r.last_message = "invalid launch configuration: grid (" + std::to_string(grid.x) + "," +
                     std::to_string(grid.y) + "," + std::to_string(grid.z) + "), block (" +
                     std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                     std::to_string(block.z) + ")";
    return;
  }
  if (r.in_kernel) {
    std::fprintf(stderr, "simt: launch from inside a kernel is not supported\n");
    std::abort();
  }
  r.in_kernel = true;
  ++counters().launches;
  counters().blocks += static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  r.body = &body;
  r.grid_dim = grid;
  r.block_dim = block;
  r.nthreads = static_cast<int>(threads);
  r.rng.seed(c.seed);
  r.error.clear();
  run_grid(block_order(grid));
  r.in_kernel = false;
  r.body = nullptr;
  if (!r.error.empty()) {
    r.sticky_error = cudaErrorLaunchFailure;
    r.sticky_message = r.error;
  }
}

inline const uint3& current_block_idx() {
  return rt().slots[static_cast<size_t>(current()->slot)].block_idx;
}

}  // namespace detail

// SLM_LAUNCH(grid, block, smem, stream, kernel)(args...)
template <typename... P>
struct Launcher {
  dim3 grid, block;
  void (*kernel)(P...);
  Launcher(dim3 g, dim3 b, size_t smem, cudaStream_t stream, void (*k)(P...))
      : grid(g), block(b), kernel(k) {
    (void)smem;
    (void)stream;
  }
  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<P...> bound(std::forward<A>(args)...);  // by value, like a kernel launch
    auto fn = kernel;
    const std::function<void()> body = [&bound, fn]() { std::apply(fn, bound); };
    detail::launch(grid, block, body);
  }
};
template <typename... P>
Launcher(dim3, dim3, size_t, cudaStream_t, void (*)(P...)) -> Launcher<P...>;

// The sticky kernel fault if any, else the error of the last failed launch (with its message).
// clear_sticky: a test resets the emulated device (a real one would need a new context).
inline cudaError_t take_error(std::string* message, bool clear_sticky = true) {
  detail::Runtime& r = detail::rt();
  cudaError_t e = r.last_error;
  if (message) *message = r.last_message;
  if (r.sticky_error != cudaSuccess) {
    e = r.sticky_error;
    if (message) *message = r.sticky_message;
    if (clear_sticky) {
      r.sticky_error = cudaSuccess;
      r.sticky_message.clear();
    }
  }
  r.last_error = cudaSuccess;
  r.last_message.clear();
  return e;
}

// Device buffers: in adversarial mode, accesses to them are switch points (with memory hooks).
inline void track(const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  detail::rt().tracked.push_back(detail::Range{a, a + bytes});
}
inline void untrack(const void* p) {
  std::vector<detail::Range>& t = detail::rt().tracked;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  t.erase(std::remove_if(t.begin(), t.end(), [a](const detail::Range& g) { return g.lo == a; }),
          t.end());
}

// Defined by simt_memory_hooks.cpp: without it no plain memory access is a switch point.
extern "C" int simt_memory_hooks_linked() __attribute__((weak));
inline bool memory_hooks_linked() { return simt_memory_hooks_linked != nullptr; }

// "forward", "reverse", "random:SEED" or "adversarial:SEED"; false for anything else.
inline bool set_order(const std::string& o) {
  Config& c = config();
  c.adversarial = false;
  if (o == "forward") {
    c.order = Order::kForward;
  } else if (o == "reverse") {
    c.order = Order::kReverse;
  } else if (o.rfind("random:", 0) == 0 && o.size() > 7) {
    c.order = Order::kRandom;
    c.seed = std::stoull(o.substr(7));
  } else if (o.rfind("adversarial:", 0) == 0 && o.size() > 12) {
    c.order = Order::kRandom;
    c.adversarial = true;
    c.seed = std::stoull(o.substr(12));
  } else {
    return false;
  }
  return true;
}

}  // namespace simt

// ------------------------------------------------------------------------------------------
// built-in variables and device functions
// ------------------------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::simt::detail::current()->tid))
#define blockIdx (::simt::detail::current_block_idx())
#define blockDim (static_cast<const dim3&>(::simt::detail::rt().block_dim))
#define gridDim (static_cast<const dim3&>(::simt::detail::rt().grid_dim))
#define warpSize 32
#define __syncthreads() ::simt::detail::syncthreads(__FILE__, __LINE__)

template <typename T>
inline T __shfl_xor_sync_impl(unsigned int mask, T v, int lane_mask, const char* file, int line) {
  using namespace ::simt::detail;
  return from_bits<T>(warp_op(kShflXor, mask, to_bits(v), lane_mask, file, line));
}
template <typename T>
inline T __shfl_down_sync_impl(unsigned int mask, T v, unsigned int delta, const char* file,
                               int line) {
  using namespace ::simt::detail;
  return from_bits<T>(warp_op(kShflDown, mask, to_bits(v), static_cast<int>(delta), file, line));
}
inline unsigned int __ballot_sync_impl(unsigned int mask, int pred, const char* file, int line) {
  using namespace ::simt::detail;
  return static_cast<unsigned int>(warp_op(kBallot, mask, pred != 0, 0, file, line));
}
template <typename T>
inline unsigned int __match_any_sync_impl(unsigned int mask, T v, const char* file, int line) {
  using namespace ::simt::detail;
  return static_cast<unsigned int>(warp_op(kMatchAny, mask, to_bits(v), 0, file, line));
}
#define __shfl_xor_sync(mask, v, lane_mask) __shfl_xor_sync_impl(mask, v, lane_mask, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, delta) __shfl_down_sync_impl(mask, v, delta, __FILE__, __LINE__)
#define __ballot_sync(mask, pred) __ballot_sync_impl(mask, pred, __FILE__, __LINE__)
#define __match_any_sync(mask, v) __match_any_sync_impl(mask, v, __FILE__, __LINE__)

// An atomic is one indivisible step: another thread may go first (adversarial mode), but its
// read and write are never split, even when memory hooks split every other access.
template <typename T>
inline T atomicAdd(T* p, T v) {
  ::simt::detail::give_way(true);
  ++::simt::detail::rt().atomic_depth;
  const T old = *p;
  *p = old + v;
  --::simt::detail::rt().atomic_depth;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  ::simt::detail::give_way(true);
  ++::simt::detail::rt().atomic_depth;
  const T old = *p;
  *p = old < v ? v : old;
  --::simt::detail::rt().atomic_depth;
  return old;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __int_as_float(int u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline int __float_as_int(float f) {
  int u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// ------------------------------------------------------------------------------------------
// __half / __nv_bfloat16 (storage types; conversions round to nearest even)
// ------------------------------------------------------------------------------------------
struct alignas(2) __half {
  unsigned short x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  _Float16 v;  // GCC >= 12: IEEE binary16 with correctly rounded conversions
  std::memcpy(&v, &h.x, sizeof(v));
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.x, &v, sizeof(v));
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  return __uint_as_float(static_cast<unsigned int>(b.x) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const unsigned int u = __float_as_uint(f);
  __nv_bfloat16 b;
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    b.x = static_cast<unsigned short>((u >> 16) | 0x40u);  // NaN stays (quiet) NaN
  } else {
    b.x = static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) {
  return __half2{__float2half_rn(a), __float2half_rn(b)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return float2{__bfloat162float(h.x), __bfloat162float(h.y)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// ------------------------------------------------------------------------------------------
// runtime API
// ------------------------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() { return ::simt::take_error(nullptr, false); }
inline cudaError_t cudaPeekAtLastError() {
  const ::simt::detail::Runtime& r = ::simt::detail::rt();
  return r.sticky_error != cudaSuccess ? r.sticky_error : r.last_error;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  const ::simt::Config& c = ::simt::config();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = static_cast<int>(c.max_threads_per_block);
      return cudaSuccess;
    case cudaDevAttrMaxGridDimX:
      *value = static_cast<int>(c.max_grid_x);
      return cudaSuccess;
    case cudaDevAttrMaxGridDimY:
      *value = static_cast<int>(c.max_grid_y);
      return cudaSuccess;
    case cudaDevAttrMaxGridDimZ:
      *value = static_cast<int>(c.max_grid_z);
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = c.multiprocessors;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t stream = nullptr) {
  (void)stream;
  ++simt::counters().memsets;
  std::memset(p, v, n);
  return cudaSuccess;
}
