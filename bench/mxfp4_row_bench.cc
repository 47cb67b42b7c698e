// arbiter_bench_mxfp4_row: the one-row MXFP4 matvec (the experts of a batch-1 decode step) on one
// thread, every kernel variant against a plain read of the same bytes, interleaved in shuffled
// order within each round so that the machine's drifting load hits all variants alike. Two
// regimes: from memory (each timing streams a cold 5760 x 2880 expert matrix, the real gate_up
// shape, from a pool far larger than the caches) and from L2 (256 rows, repeated). Prints the median
// (memory) and the median of each round's best (L2) GB/s of weights per variant, and the ratio to
// the plain read from memory.
//
// Variants: for each instruction set the CPU has, exact fp32 activations, and int8 activations
// with and without VNNI (where the CPU has it); and the bf16 one-row matvec of the dense products
// on bf16 matrices of the same shape, for comparison. ARBITER_BENCH_ROUNDS sets the rounds (60).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/huge_page_arena.h"
#include "kernels/cpu/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace arbiter {
namespace {

using Clock = std::chrono::steady_clock;

// Sum of the bytes as floats with four independent AVX-512 chains and the kernels' 4 KiB prefetch
// (the benchmark's plain read, as arbiter_bench_cpu's; n a multiple of 256 bytes); without
// AVX-512 a plain 64-bit integer sum.
#if defined(__x86_64__)
__attribute__((target("avx512f"))) float plain_read(const uint8_t* p, size_t n) {
  const float* f = reinterpret_cast<const float*>(p);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i < n / 4; i += 64) {
    for (int j = 0; j < 64; j += 16) _mm_prefetch(reinterpret_cast<const char*>(f + i + j) + 4096, _MM_HINT_T0);
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(f + i));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(f + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_loadu_ps(f + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_loadu_ps(f + i + 48));
  }
  alignas(64) float v[16];
  _mm512_store_ps(v, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  float total = 0;
  for (float f : v) total += f;
  return total;
}
#endif
float plain_read_portable(const uint8_t* p, size_t n) {
  uint64_t s = 0;
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t w;
    __builtin_memcpy(&w, p + i, 8);
    s += w;
  }
  return static_cast<float>(s);
}
float read_bytes(const uint8_t* p, size_t n) {
#if defined(__x86_64__)
  if (cpu::detected_isa() == cpu::Isa::kAvx512) return plain_read(p, n);
#endif
  return plain_read_portable(p, n);
}

// One expert matrix: codes and scales in one allocation (as in a checkpoint's tensors), in memory
// of the kind the CPU backend keeps its weights in (huge pages where the kernel gives them).
struct Matrix {
  uint8_t* bytes = nullptr;
  size_t offset = 0;
  const uint8_t* blocks() const { return bytes + offset; }
  const uint8_t* scales(int64_t out, int64_t in) const { return bytes + offset + out * in / 2; }
};

struct Variant {
  std::string name;
  cpu::Isa isa = cpu::Isa::kPortable;
  cpu::Mxfp4Activations activations = cpu::Mxfp4Activations::kExact;
  bool vnni = false;
  bool read = false;  // the plain read
  bool bf16 = false;  // the bf16 one-row matvec (the dense products), on bf16 matrices
  bool shifted = false;  // on the matrices 16 bytes off a cache line
  std::vector<double> memory_gbs, l2_gbs;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

int run() {
  const int64_t in = 2880, out = 5760, hot_rows = 256;
  const int rounds = std::getenv("ARBITER_BENCH_ROUNDS") ? std::atoi(std::getenv("ARBITER_BENCH_ROUNDS")) : 60;
  const size_t matrix_bytes = static_cast<size_t>(out * in / 2 + out * in / 32);
  const int pool_matrices = 48;  // ~420 MB: far beyond any cache
  std::mt19937 rng(5);
  cpu::HugePageArena arena;
  std::vector<Matrix> matrices(static_cast<size_t>(pool_matrices));
  for (auto& m : matrices) {
    m.bytes = static_cast<uint8_t*>(arena.allocate(matrix_bytes));  // 64-byte aligned: on a cache line
    uint8_t* base = m.bytes + m.offset;
    for (size_t i = 0; i + 4 <= matrix_bytes; i += 4) {
      const uint32_t r = static_cast<uint32_t>(rng());
      __builtin_memcpy(base + i, &r, 4);
    }
    for (int64_t i = 0; i < out * in / 32; ++i) base[out * in / 2 + i] = static_cast<uint8_t>(118 + rng() % 12);
  }
  // bf16 matrices of the same shape (the dense products' kernel, for comparison): 2 bytes a weight.
  // Each starts on a cache line and has 64 spare weights behind, so that it can be read from there
  // (offset 0) or from 16 bytes past it (offset 8 weights).
  std::vector<uint16_t*> dense(static_cast<size_t>(pool_matrices / 2));
  for (auto& m : dense) {
    m = static_cast<uint16_t*>(arena.allocate(static_cast<size_t>(out * in + 64) * 2));
    for (int64_t i = 0; i < out * in + 64; ++i) m[i] = static_cast<uint16_t>(0x3c00 + (rng() & 0x1ff));
  }
  auto dense_at = [](const uint16_t* m, bool shifted) { return m + (shifted ? 8 : 0); };
  size_t next_dense = 0;
  // The same matrices 16 bytes off a cache line (as a checkpoint's tensors may be: their offsets in
  // the file are only 8-byte aligned), for the variants marked "+16 B".
  std::vector<Matrix> shifted(matrices.size());
  for (size_t i = 0; i < matrices.size(); ++i) {
    shifted[i].bytes = static_cast<uint8_t*>(arena.allocate(matrix_bytes + 16));
    shifted[i].offset = 16;
    __builtin_memcpy(shifted[i].bytes + shifted[i].offset, matrices[i].blocks(), matrix_bytes);
  }
  std::vector<float> x(static_cast<size_t>(in)), y(static_cast<size_t>(out));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : x) v = nd(rng);

  std::vector<Variant> variants;
  auto add = [&](std::string name, cpu::Isa isa, cpu::Mxfp4Activations act, bool vnni, bool read, bool bf16) {
    Variant v;
    v.name = std::move(name);
    v.isa = isa;
    v.activations = act;
    v.vnni = vnni;
    v.read = read;
    v.bf16 = bf16;
    variants.push_back(std::move(v));
  };
  const auto exact = cpu::Mxfp4Activations::kExact, int8 = cpu::Mxfp4Activations::kInt8;
  add("plain read", cpu::detected_isa(), exact, false, true, false);
  for (cpu::Isa isa : {cpu::Isa::kAvx512, cpu::Isa::kAvx2, cpu::Isa::kPortable}) {
    if (static_cast<int>(isa) > static_cast<int>(cpu::detected_isa())) continue;
    const std::string n = cpu::isa_name(isa);
    add(n + " exact fp32", isa, exact, false, false, false);
    add(n + " int8", isa, int8, false, false, false);
    if (isa == cpu::Isa::kAvx512 && cpu::vnni_available()) add(n + " int8 vnni", isa, int8, true, false, false);
    if (isa != cpu::Isa::kPortable) add(n + " bf16 (dense)", isa, exact, false, false, true);
    if (isa == cpu::Isa::kAvx512) {
      add(n + " exact fp32 +16 B", isa, exact, false, false, false);
      variants.back().shifted = true;
      add(n + " int8 vnni +16 B", isa, int8, cpu::vnni_available(), false, false);
      variants.back().shifted = true;
      add(n + " bf16 (dense) +16 B", isa, exact, false, false, true);
      variants.back().shifted = true;
    }
  }
  cpu::ThreadPool pool(1);
  volatile float sink = 0;
  auto run_variant = [&](const Variant& v, const Matrix& m, int64_t rows) {
    cpu::set_active_isa(v.isa);
    cpu::set_vnni_active(v.vnni);
    const auto t = Clock::now();
    if (v.bf16) {
      const bool cold = rows == out;
      const uint16_t* w = dense_at(dense[cold ? next_dense : 0], v.shifted);
      if (cold) next_dense = (next_dense + 1) % dense.size();
      cpu::linear_bf16(pool, x.data(), 1, in, w, rows / 2, nullptr, y.data(), cpu::LinearPath::kMatvec);
      const double s = std::chrono::duration<double>(Clock::now() - t).count();
      return static_cast<double>(rows / 2 * in * 2) / s / 1e9;
    }
    if (v.read) {
      sink = sink + read_bytes(m.blocks(), (static_cast<size_t>(rows * in / 2)) / 256 * 256) +
             read_bytes(m.scales(out, in), static_cast<size_t>(rows * in / 32) / 256 * 256);
    } else {
      cpu::linear_mxfp4(pool, x.data(), 1, in, m.blocks(), m.scales(out, in), rows, nullptr, y.data(),
                        cpu::LinearPath::kMatvec, v.activations);
    }
    const double s = std::chrono::duration<double>(Clock::now() - t).count();
    return static_cast<double>(rows * in / 2 + rows * in / 32) / s / 1e9;
  };
  std::vector<size_t> order(variants.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  size_t next = 0;
  for (int r = 0; r < rounds; ++r) {
    std::shuffle(order.begin(), order.end(), rng);
    for (size_t i : order) {
      variants[i].memory_gbs.push_back(run_variant(variants[i], (variants[i].shifted ? shifted : matrices)[next], out));
      next = (next + 1) % matrices.size();
    }
    // L2: 256 rows of one matrix (~390 KB; bf16: 128 rows, 740 KB), warmed, then the best of 50 timings.
    std::shuffle(order.begin(), order.end(), rng);
    for (size_t i : order) {
      const Matrix& hot = (variants[i].shifted ? shifted : matrices)[0];
      run_variant(variants[i], hot, hot_rows);
      double best = 0;
      for (int k = 0; k < 50; ++k) best = std::max(best, run_variant(variants[i], hot, hot_rows));
      variants[i].l2_gbs.push_back(best);
    }
  }
  cpu::set_active_isa(cpu::detected_isa());
  cpu::set_vnni_active(true);
  const double read_memory = median(variants[0].memory_gbs);
  std::printf("one thread, %d rounds, 5760 x 2880 MXFP4 (%.1f MB) per cold timing; GB/s of weights\n", rounds,
              static_cast<double>(matrix_bytes) / 1e6);
  std::printf("%-22s %14s %10s %12s\n", "variant", "memory median", "vs read", "L2 median-of-best");
  for (const auto& v : variants)
    std::printf("%-22s %14.2f %10.2f %12.2f\n", v.name.c_str(), median(v.memory_gbs), median(v.memory_gbs) / read_memory,
                median(v.l2_gbs));
  return 0;
}

}  // namespace
}  // namespace arbiter

int main() { return arbiter::run(); }
