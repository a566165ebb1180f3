// Test driver: runs the CUDA launchers of csrc/cuda/selective_loss.cu (compiled as C++ under
// simt_host.h) on host memory. Built and run by tests/unit/cuda/ (also with ASan + UBSan).
//
//   selective_loss_driver op=fwd|cpu_fwd|bwd|select|finalize dir=DIR [key=value ...]
//     fwd:    dtype(0 fp32, 1 fp16, 2 bf16) N V vocab_start misalign   in: logits target
//     cpu_fwd: as fwd, through the C++ CPU kernel (selective_loss_kernels.h), so that the
//             sanitizer builds check the CPU kernel's arithmetic (NaN rows) too
//     bwd:    ... + inplace gmisalign                                     in: + lse scale
//     select: G n                                                        in: scores eligible k
//     finalize: N v_global flags has_ref has_mask            in: stats target [ref] [mask]
//               out_<order>.bin = loss lse score (fp32) eligible selected (u8) totals (8 fp32)
//     add_top: N                                          in: top loss selected totals
//              out_<order>.bin = selected (u8) totals (8 fp32)
//     swiglu_fwd: dtype rows f misalign                in: x (rows x 2f)     out: y (rows x f)
//     swiglu_bwd: dtype rows f misalign                in: dy x              out: dx (rows x 2f)
//             (csrc/cuda/swiglu.cu, linked into the driver too)
//     rope: dtype rows rows_per_position d row_stride backward misalign
//           in: x (row r at element r * row_stride, d values) cos sin (fp32, rows /
//           rows_per_position x d)   out: rows x d   (csrc/cuda/rope.cu, linked in too)
//     select, add_top, swiglu_* and rope also write issued_<order>.txt: "kernel launches memsets
//             blocks" (blocks of all its launches)
//             of the call
//     orders=forward,reverse,random:SEED,adversarial:SEED   one run (and one output file
//             out_<order>.bin) each; adversarial needs the build with memory hooks
//     resident=B yield_permille=P   adversarial mode: blocks at once, yield chance per access
//     max_grid=X   the device's grid limit in x      fail_launch=CODE   inject a launch failure
// Inputs are raw little-endian arrays DIR/<name>.bin. Every buffer is allocated with its exact
// size (at byte offset `misalign` from a 16-byte boundary), so that ASan sees any overrun.
// Exit status: 0 ok, 2 a launcher reported an error, 3 the harness found kernel misuse.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/selective_loss_cuda.h"
#include "cuda/rope_cuda.h"
#include "cuda/swiglu_cuda.h"
#include "selective_loss_kernels.h"
#include "simt_host.h"

namespace {

std::map<std::string, std::string> g_args;

std::string arg(const char* key, const char* def = nullptr) {
  auto it = g_args.find(key);
  if (it != g_args.end()) return it->second;
  if (def == nullptr) {
    std::fprintf(stderr, "driver: missing argument %s\n", key);
    std::exit(1);
  }
  return def;
}
int64_t iarg(const char* key, const char* def = nullptr) { return std::stoll(arg(key, def)); }

std::vector<char> read_file(const std::string& path) {
  std::vector<char> data;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    std::fprintf(stderr, "driver: cannot open %s\n", path.c_str());
    std::exit(1);
  }
  char buf[1 << 16];
  size_t got;
  while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0) data.insert(data.end(), buf, buf + got);
  std::fclose(f);
  return data;
}

void write_file(const std::string& path, const void* p, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(p, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "driver: cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
}

// A "device" buffer of exactly `bytes` bytes starting `misalign` bytes after a 16-byte boundary.
struct Buffer {
  void* base = nullptr;
  char* p = nullptr;
  size_t bytes = 0;
  Buffer(size_t n, size_t misalign) : bytes(n) {
    if (posix_memalign(&base, 16, misalign + n + (n == 0 ? 1 : 0)) != 0) std::abort();
    p = static_cast<char*>(base) + misalign;
    std::memset(p, 0xA5, n);  // "uninitialised" device memory, not zeros
    simt::track(p, n);        // adversarial mode: accesses to it are switch points
  }
  ~Buffer() {
    simt::untrack(p);
    std::free(base);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void fill(const std::vector<char>& src) {
    if (src.size() != bytes) {
      std::fprintf(stderr, "driver: input has %zu bytes, expected %zu\n", src.size(), bytes);
      std::exit(1);
    }
    std::memcpy(p, src.data(), bytes);
  }
};

// Calls a launcher; launchers that report errors return a nonzero code.
template <typename F>
int status_of(F&& f) {
  if constexpr (std::is_void_v<decltype(f())>) {
    f();
    return 0;
  } else {
    return static_cast<int>(f());
  }
}

int finish(int launcher_status) {
  std::string msg;
  const cudaError_t e = simt::take_error(&msg);
  if (e == cudaErrorLaunchFailure) {  // kernel misuse found by the harness
    std::fprintf(stderr, "driver: harness error: %s\n", msg.c_str());
    std::exit(3);
  }
  if (launcher_status != 0) {
    std::fprintf(stderr, "driver: launcher returned error %d (%s)\n", launcher_status,
                 cudaGetErrorString(static_cast<cudaError_t>(launcher_status)));
    std::exit(2);
  }
  return 0;
}

// What the last call issued (simt::counters): "kernel launches memsets blocks" in
// issued_<order>.txt.
void write_issued(const std::string& dir, const std::string& order) {
  const std::string issued = std::to_string(simt::counters().launches) + " " +
                             std::to_string(simt::counters().memsets) + " " +
                             std::to_string(simt::counters().blocks);
  write_file(dir + "/issued_" + order + ".txt", issued.data(), issued.size());
}

size_t dtype_size(int dtype) { return dtype == megatron_slm::cuda::kFloat32 ? 4 : 2; }

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "driver: arguments are key=value, got %s\n", argv[i]);
      return 1;
    }
    g_args[a.substr(0, eq)] = a.substr(eq + 1);
  }
  namespace k = megatron_slm::cuda;
  const std::string op = arg("op");
  const std::string dir = arg("dir");
  simt::config().max_grid_x = static_cast<unsigned int>(iarg("max_grid", "2147483647"));
  simt::config().resident_blocks = static_cast<int>(iarg("resident", "8"));
  simt::config().yield_permille = static_cast<unsigned int>(
      iarg("yield_permille", std::to_string(simt::kDefaultYieldPermille).c_str()));
  const auto fail_launch = static_cast<cudaError_t>(iarg("fail_launch", "0"));

  std::vector<std::string> orders;
  {
    const std::string s = arg("orders", "forward");
    size_t start = 0;
    while (start <= s.size()) {
      const size_t comma = s.find(',', start);
      orders.push_back(s.substr(start, comma == std::string::npos ? std::string::npos
                                                                  : comma - start));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  auto set_order = [](const std::string& o) {
    if (!simt::set_order(o)) {
      std::fprintf(stderr, "driver: unknown order %s\n", o.c_str());
      std::exit(1);
    }
    if (simt::config().adversarial && !simt::memory_hooks_linked()) {
      std::fprintf(stderr, "driver: order %s needs the build with memory hooks\n", o.c_str());
      std::exit(1);
    }
  };

  if (op == "fwd" || op == "bwd" || op == "cpu_fwd") {
    const int dtype = static_cast<int>(iarg("dtype"));
    const int64_t N = iarg("N"), V = iarg("V"), vocab_start = iarg("vocab_start", "0");
    const size_t esz = dtype_size(dtype);
    const size_t misalign = static_cast<size_t>(iarg("misalign", "0"));
    const std::vector<char> logits_in = read_file(dir + "/logits.bin");
    Buffer logits(static_cast<size_t>(N * V) * esz, misalign);
    Buffer target(static_cast<size_t>(N) * 8, 0);
    target.fill(read_file(dir + "/target.bin"));
    if (op == "cpu_fwd") {
      namespace sl = megatron_slm::selective_loss;
      logits.fill(logits_in);
      Buffer stats(static_cast<size_t>(N) * 3 * 4, 0);
      float* st = reinterpret_cast<float*>(stats.p);
      const int64_t* tg = reinterpret_cast<const int64_t*>(target.p);
      for (int64_t r = 0; r < N; ++r) {
        const int64_t t = tg[r] - vocab_start;
        if (dtype == k::kFloat32) {
          sl::row_forward_stats(reinterpret_cast<const float*>(logits.p) + r * V, V, t, st + 3 * r);
        } else if (dtype == k::kFloat16) {
          sl::row_forward_stats(reinterpret_cast<const sl::fp16_t*>(logits.p) + r * V, V, t,
                                st + 3 * r);
        } else {
          sl::row_forward_stats(reinterpret_cast<const sl::bf16_t*>(logits.p) + r * V, V, t,
                                st + 3 * r);
        }
      }
      for (const std::string& o : orders) write_file(dir + "/out_" + o + ".bin", stats.p, stats.bytes);
    } else if (op == "fwd") {
      for (const std::string& o : orders) {
        set_order(o);
        logits.fill(logits_in);
        Buffer stats(static_cast<size_t>(N) * 3 * 4, 0);
        simt::config().fail_next_launch = fail_launch;
        finish(status_of([&] {
          return k::selective_loss_fwd_stats(logits.p, dtype,
                                             reinterpret_cast<const int64_t*>(target.p), N, V,
                                             vocab_start, reinterpret_cast<float*>(stats.p),
                                             nullptr);
        }));
        write_file(dir + "/out_" + o + ".bin", stats.p, stats.bytes);
      }
    } else {
      const bool inplace = iarg("inplace", "0") != 0;
      const size_t gmisalign = static_cast<size_t>(iarg("gmisalign", "0"));
      Buffer lse(static_cast<size_t>(N) * 4, 0), scale(static_cast<size_t>(N) * 4, 0);
      lse.fill(read_file(dir + "/lse.bin"));
      scale.fill(read_file(dir + "/scale.bin"));
      for (const std::string& o : orders) {
        set_order(o);
        logits.fill(logits_in);
        Buffer grad_buf(inplace ? 0 : logits.bytes, gmisalign);
        char* grad = inplace ? logits.p : grad_buf.p;
        simt::config().fail_next_launch = fail_launch;
        finish(status_of([&] {
          return k::selective_loss_backward(
              logits.p, grad, dtype, reinterpret_cast<const int64_t*>(target.p), N, V,
              vocab_start, reinterpret_cast<const float*>(lse.p),
              reinterpret_cast<const float*>(scale.p), nullptr);
        }));
        write_file(dir + "/out_" + o + ".bin", grad, logits.bytes);
      }
    }
  } else if (op == "select") {
    const int64_t G = iarg("G"), n = iarg("n");
    Buffer scores(static_cast<size_t>(G * n) * 4, 0), eligible(static_cast<size_t>(G * n), 0);
    Buffer kk(static_cast<size_t>(G) * 8, 0);
    scores.fill(read_file(dir + "/scores.bin"));
    eligible.fill(read_file(dir + "/eligible.bin"));
    const double ratio = std::stod(arg("ratio", "-1"));  // >= 0: k derived in the kernels
    if (ratio < 0) kk.fill(read_file(dir + "/k.bin"));
    for (const std::string& o : orders) {
      set_order(o);
      Buffer selected(static_cast<size_t>(G * n), 0);
      Buffer workspace(static_cast<size_t>(k::selective_loss_select_workspace_bytes(G, n)), 0);
      simt::config().fail_next_launch = fail_launch;
      simt::counters() = simt::Counters{};
      finish(status_of([&] {
        return k::selective_loss_select(
            reinterpret_cast<const float*>(scores.p), reinterpret_cast<const uint8_t*>(eligible.p),
            ratio < 0 ? reinterpret_cast<const int64_t*>(kk.p) : nullptr, ratio, G, n,
            reinterpret_cast<uint8_t*>(selected.p), workspace.p, nullptr);
      }));
      write_file(dir + "/out_" + o + ".bin", selected.p, selected.bytes);
      write_issued(dir, o);
    }
  } else if (op == "finalize") {
    const int64_t N = iarg("N"), v_global = iarg("v_global");
    const int flags = static_cast<int>(iarg("flags"));
    const bool has_ref = iarg("has_ref") != 0, has_mask = iarg("has_mask") != 0;
    Buffer stats(static_cast<size_t>(N) * 12, 0), target(static_cast<size_t>(N) * 8, 0);
    Buffer ref(has_ref ? static_cast<size_t>(N) * 4 : 0, 0);
    Buffer mask(has_mask ? static_cast<size_t>(N) : 0, 0);
    stats.fill(read_file(dir + "/stats.bin"));
    target.fill(read_file(dir + "/target.bin"));
    if (has_ref) ref.fill(read_file(dir + "/ref.bin"));
    if (has_mask) mask.fill(read_file(dir + "/mask.bin"));
    const size_t n = static_cast<size_t>(N);
    for (const std::string& o : orders) {
      set_order(o);
      // one output buffer: loss, lse, score [N] fp32, eligible, selected [N] u8, totals[8] fp32
      Buffer out(n * 12 + n * 2 + 8 * 4, 0);
      Buffer partials(static_cast<size_t>(k::selective_loss_finalize_blocks(N)) * 7 * 8, 0);
      float* f = reinterpret_cast<float*>(out.p);
      uint8_t* u = reinterpret_cast<uint8_t*>(out.p + n * 12);
      simt::config().fail_next_launch = fail_launch;
      finish(status_of([&] {
        return k::selective_loss_finalize(
            reinterpret_cast<const float*>(stats.p), reinterpret_cast<const int64_t*>(target.p),
            has_ref ? reinterpret_cast<const float*>(ref.p) : nullptr,
            has_mask ? reinterpret_cast<const uint8_t*>(mask.p) : nullptr, N, v_global, flags, f,
            f + n, f + 2 * n, u, u + n, reinterpret_cast<double*>(partials.p),
            reinterpret_cast<float*>(out.p + n * 14), nullptr);
      }));
      write_file(dir + "/out_" + o + ".bin", out.p, out.bytes);
    }
  } else if (op == "add_top") {
    const int64_t N = iarg("N");
    const size_t n = static_cast<size_t>(N);
    Buffer top(n, 0), loss(n * 4, 0);
    top.fill(read_file(dir + "/top.bin"));
    loss.fill(read_file(dir + "/loss.bin"));
    const std::vector<char> selected_in = read_file(dir + "/selected.bin");
    const std::vector<char> totals_in = read_file(dir + "/totals.bin");
    for (const std::string& o : orders) {
      set_order(o);
      Buffer selected(n, 0), totals(8 * 4, 0);  // both in/out, each its own allocation
      selected.fill(selected_in);
      totals.fill(totals_in);
      simt::config().fail_next_launch = fail_launch;
      simt::counters() = simt::Counters{};
      finish(status_of([&] {
        return k::selective_loss_add_top(reinterpret_cast<const uint8_t*>(top.p),
                                          reinterpret_cast<const float*>(loss.p), N,
                                          reinterpret_cast<uint8_t*>(selected.p),
                                          reinterpret_cast<float*>(totals.p), nullptr);
      }));
      std::vector<char> out(selected.p, selected.p + n);  // selected [N] u8, then totals[8] fp32
      out.insert(out.end(), totals.p, totals.p + totals.bytes);
      write_file(dir + "/out_" + o + ".bin", out.data(), out.size());
      write_issued(dir, o);
    }
  } else if (op == "swiglu_fwd" || op == "swiglu_bwd") {
    const int dtype = static_cast<int>(iarg("dtype"));
    const int64_t rows = iarg("rows"), f = iarg("f");
    const size_t half = static_cast<size_t>(rows * f) * dtype_size(dtype);
    const size_t misalign = static_cast<size_t>(iarg("misalign", "0"));
    Buffer x(2 * half, misalign);
    x.fill(read_file(dir + "/x.bin"));
    const bool fwd = op == "swiglu_fwd";
    Buffer dy(fwd ? 0 : half, misalign);
    if (!fwd) dy.fill(read_file(dir + "/dy.bin"));
    for (const std::string& o : orders) {
      set_order(o);
      Buffer out(fwd ? half : 2 * half, misalign);
      simt::config().fail_next_launch = fail_launch;
      simt::counters() = simt::Counters{};
      finish(status_of([&] {
        return fwd ? k::swiglu_forward(x.p, out.p, dtype, rows, f, nullptr)
                   : k::swiglu_backward(dy.p, x.p, out.p, dtype, rows, f, nullptr);
      }));
      write_file(dir + "/out_" + o + ".bin", out.p, out.bytes);
      write_issued(dir, o);
    }
  } else if (op == "rope") {
    const int dtype = static_cast<int>(iarg("dtype"));
    const int64_t rows = iarg("rows"), per_position = iarg("rows_per_position"), d = iarg("d");
    const int64_t row_stride = iarg("row_stride");
    const bool backward = iarg("backward") != 0;
    const size_t esz = dtype_size(dtype);
    const size_t misalign = static_cast<size_t>(iarg("misalign", "0"));
    // exactly the elements the rows span: the last row ends the buffer
    Buffer x(rows == 0 ? 0 : static_cast<size_t>((rows - 1) * row_stride + d) * esz, misalign);
    x.fill(read_file(dir + "/x.bin"));
    const size_t table = static_cast<size_t>(rows == 0 ? 0 : rows / per_position * d) * 4;
    Buffer cos(table, 0), sin(table, 0);
    cos.fill(read_file(dir + "/cos.bin"));
    sin.fill(read_file(dir + "/sin.bin"));
    for (const std::string& o : orders) {
      set_order(o);
      Buffer out(static_cast<size_t>(rows * d) * esz, misalign);
      simt::config().fail_next_launch = fail_launch;
      simt::counters() = simt::Counters{};
      finish(status_of([&] {
        return k::rope(x.p, row_stride, reinterpret_cast<const float*>(cos.p),
                       reinterpret_cast<const float*>(sin.p), out.p, dtype, rows, per_position,
                       d, backward, nullptr);
      }));
      write_file(dir + "/out_" + o + ".bin", out.p, out.bytes);
      write_issued(dir, o);
    }
  } else {
    std::fprintf(stderr, "driver: unknown op %s\n", op.c_str());
    return 1;
  }
  return 0;
}
