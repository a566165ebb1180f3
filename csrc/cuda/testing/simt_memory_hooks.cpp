// Memory hooks of the adversarial mode of simt_host.h, for tests only. Code compiled with
// g++ -fsanitize=thread calls __tsan_readN / __tsan_writeN before every load and store that may
// touch shared data; linked without the ThreadSanitizer runtime, these definitions receive them
// instead. Each forwards the address to simt::detail::on_memory_access, which may switch threads
// when it lies in __shared__ memory or a tracked device buffer: then a plain `x += v` written in
// the kernel source (load; switch; store) loses the updates of the threads that ran in between,
// exactly the bug an atomicAdd prevents. This file itself is built without -fsanitize=thread.
#include "simt_host.h"

extern "C" {

int simt_memory_hooks_linked() { return 1; }

void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}

#define SIMT_HOOK(kind, n)                                                              \
  void __tsan_##kind##n(void* p) { ::simt::detail::on_memory_access(p); }               \
  void __tsan_unaligned_##kind##n(void* p) { ::simt::detail::on_memory_access(p); }
SIMT_HOOK(read, 1)
SIMT_HOOK(read, 2)
SIMT_HOOK(read, 4)
SIMT_HOOK(read, 8)
SIMT_HOOK(read, 16)
SIMT_HOOK(write, 1)
SIMT_HOOK(write, 2)
SIMT_HOOK(write, 4)
SIMT_HOOK(write, 8)
SIMT_HOOK(write, 16)
#undef SIMT_HOOK

void __tsan_read_range(void* p, unsigned long) { ::simt::detail::on_memory_access(p); }
void __tsan_write_range(void* p, unsigned long) { ::simt::detail::on_memory_access(p); }
void __tsan_vptr_read(void**) {}
void __tsan_vptr_update(void**, void*) {}

}  // extern "C"
