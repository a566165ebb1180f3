// Self-test kernels of simt_host.h (run by tests/unit/cuda/test_simt_harness.py): correct warp
// exchanges, and misuse the harness must report. `simt_selftest CASE ORDER` prints the kernel's
// output, or "launch error: <message>" (exit 3) when the launch failed.
#include <cstdio>
#include <string>
#include <vector>

#include "simt_host.h"

namespace {

__global__ void shuffles(unsigned int* out) {
  const unsigned int t = threadIdx.x;
  const unsigned int x = __shfl_xor_sync(0xffffffffu, t * 10u, 5);
  const unsigned int d = __shfl_down_sync(0xffffffffu, t * 10u, 3);
  const unsigned int b = __ballot_sync(0xffffffffu, t % 3 == 0);
  const unsigned int m = __match_any_sync(0xffffffffu, static_cast<int>(t % 5) - 1);
  out[4 * t + 0] = x;
  out[4 * t + 1] = d;
  out[4 * t + 2] = b;
  out[4 * t + 3] = m;
}

// Every thread adds its id into one shared counter: exact when atomics are atomic.
__global__ void block_sum(unsigned int* out) {
  __shared__ unsigned int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, threadIdx.x + 1000u * blockIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = total;
}

// Thread 0 publishes a value that the others read: correct with the barrier, a race without.
// (not a template: GCC ignores the section attribute, hence the poisoning, of statics in
// template instantiations)
__global__ void publish(unsigned int* out, bool barrier) {
  __shared__ unsigned int value;
  if (threadIdx.x == 0) value = 7u + blockIdx.x;
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

// Which block started when: out[1 + i] is the i-th block to reach the counter out[0].
__global__ void block_order(unsigned int* out) {
  if (threadIdx.x == 0) out[1 + atomicAdd(&out[0], 1u)] = blockIdx.x;
}

// block_sum, with a plain `+=` (a lost-update race) unless `atomic`.
__global__ void block_sum_plain(unsigned int* out, bool atomic) {
  __shared__ unsigned int sum;
  if (threadIdx.x == 0) sum = 0;
  __syncthreads();
  if (atomic) {
    atomicAdd(&sum, threadIdx.x + 1000u * blockIdx.x);
  } else {
    sum += threadIdx.x + 1000u * blockIdx.x;
  }
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

// Every thread of every block counts itself in global memory.
__global__ void global_count(unsigned int* out, bool atomic) {
  if (atomic) {
    atomicAdd(&out[0], 1u);
  } else {
    out[0] += 1u;
  }
}

// The same operation and mask, from two call sites.
__global__ void divergent_shuffle(unsigned int* out) {
  unsigned int v = threadIdx.x;
  if (threadIdx.x & 1u) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void divergent_barrier(unsigned int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exited_before_barrier(unsigned int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_with_exited_lane(unsigned int* out) {
  if (threadIdx.x == 7) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, threadIdx.x, 1);
}

// Lanes 0-15 wait in a shuffle for lanes 16-31, which wait at a barrier: deadlock.
__global__ void shuffle_barrier_deadlock(unsigned int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, threadIdx.x, 1);
  } else {
    __syncthreads();
  }
}

__global__ void shared_poison(unsigned int* out) {
  __shared__ unsigned int never_written;
  out[threadIdx.x] = never_written;
}

__global__ void nothing(unsigned int*) {}

int report_launch() {
  std::string msg;
  const cudaError_t e = simt::take_error(&msg);
  if (e != cudaSuccess) {
    std::printf("launch error %d: %s\n", static_cast<int>(e), msg.c_str());
    return 3;
  }
  return 0;
}

void print(const std::vector<unsigned int>& v) {
  for (unsigned int x : v) std::printf("%u ", x);
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return 1;
  const std::string c = argv[1], order = argv[2];
  if (!simt::set_order(order)) return 1;
  if (simt::config().adversarial && !simt::memory_hooks_linked()) return 1;
  std::vector<unsigned int> out(4096, 0);
  unsigned int* p = out.data();
  simt::track(p, out.size() * sizeof(unsigned int));  // device memory
  size_t n = 32;
  if (c == "shuffles") {
    SLM_LAUNCH(1, 32, 0, nullptr, shuffles)(p);
    n = 128;
  } else if (c == "block_sum") {
    SLM_LAUNCH(3, 256, 0, nullptr, block_sum)(p);
    n = 3;
  } else if (c == "publish") {
    SLM_LAUNCH(2, 64, 0, nullptr, publish)(p, true);
    n = 128;
  } else if (c == "publish_race") {
    SLM_LAUNCH(2, 64, 0, nullptr, publish)(p, false);
    n = 128;
  } else if (c == "block_order") {
    SLM_LAUNCH(16, 32, 0, nullptr, block_order)(p);
    n = 17;
  } else if (c == "shared_plain_add" || c == "shared_atomic_add") {
    SLM_LAUNCH(3, 256, 0, nullptr, block_sum_plain)(p, c == "shared_atomic_add");
    n = 3;
  } else if (c == "global_plain_add" || c == "global_atomic_add") {
    SLM_LAUNCH(8, 64, 0, nullptr, global_count)(p, c == "global_atomic_add");
    n = 1;
  } else if (c == "divergent_shuffle") {
    SLM_LAUNCH(1, 32, 0, nullptr, divergent_shuffle)(p);
  } else if (c == "divergent_barrier") {
    SLM_LAUNCH(1, 32, 0, nullptr, divergent_barrier)(p);
  } else if (c == "exited_before_barrier") {
    SLM_LAUNCH(1, 32, 0, nullptr, exited_before_barrier)(p);
  } else if (c == "shuffle_with_exited_lane") {
    SLM_LAUNCH(1, 32, 0, nullptr, shuffle_with_exited_lane)(p);
  } else if (c == "deadlock") {
    SLM_LAUNCH(1, 32, 0, nullptr, shuffle_barrier_deadlock)(p);
  } else if (c == "shared_poison") {
    SLM_LAUNCH(1, 32, 0, nullptr, shared_poison)(p);
  } else if (c == "grid_too_large") {
    simt::config().max_grid_x = 4;
    SLM_LAUNCH(5, 32, 0, nullptr, nothing)(p);
  } else if (c == "block_too_large") {
    SLM_LAUNCH(1, 1025, 0, nullptr, nothing)(p);
  } else {
    return 1;
  }
  const int rc = report_launch();
  if (rc) return rc;
  out.resize(n);
  print(out);
  return 0;
}
