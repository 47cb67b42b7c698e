// The CPU kernels written once over a SIMD traits type `S` (vector type S::V of S::W float lanes
// plus the handful of operations below), compiled once per instruction set: kernels_avx512.cc,
// kernels_avx2.cc and the portable build in kernels.cc each open their own namespace, define S,
// and include this file inside it. It therefore includes nothing itself and uses no library
// templates, so no function compiled for a wide ISA can be shared with (and picked by the linker
// for) a narrower one. Algorithms, per kernel:
//  - bf16/MXFP4 matvec (decode): each weight row streamed once for all activation rows; one row:
//    the thread's rows as one sequential stream with software prefetch; several rows: tiles of 4
//    weight rows x up to 4 activation rows; dot products reduced at the end. Activations arrive
//    re-ordered so weights need no widening shuffles: de-interleaved (even/odd elements), or for
//    the one-row MXFP4 kernel of the AVX2 build in the order of the nibbles of 32-bit code words
//    (layout_nibbles).
//  - bf16 GEMM (prefill): a panel of kGemmNV*W output features x kGemmKC inputs is converted to
//    fp32 and transposed once into a k-major buffer, then a kGemmMR x NR register-tiled FMA
//    microkernel runs it against every activation row.
//  - MXFP4 GEMM (prefill experts): transposed, C^T = W x^T: weight rows dequantized row-major per
//    256-input block into L1, broadcast against packed x^T token vectors; no transposes.
//  - attention: per block of keys, K^T is built with in-register transposes, scores for a tile of
//    queries x 16 keys come from broadcast-FMA, softmax is online over key blocks (with the sink as
//    the initial maximum and denominator 1), and P V accumulates over d-vectorized value rows.

using V = S::V;
constexpr int W = S::W;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

inline float bf16f(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// ---------------------------------------------------------------------------------------------
// bf16 matvec: O output rows x R activation rows per tile.

// x arrives de-interleaved in blocks of 2W (the W even elements, then the W odd ones) over the
// first in / (2W) * 2W inputs, so 2W bf16 weights become two fp32 vectors with one shift and one
// mask (no widening shuffles); the tail is in natural order.
template <int O, int R>
void bf16_mv_tile(const LinearArgs& a, int64_t o0, int no, int64_t r0) {
  const int64_t in = a.in, paired = in / (2 * W) * (2 * W);
  const uint16_t* wr[O];
  for (int o = 0; o < O; ++o) wr[o] = a.w + (o0 + (o < no ? o : 0)) * in;
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = a.x + (r0 + r) * in;
  // A single row keeps separate even/odd chains (latency); more rows have enough chains already.
  constexpr int C = R == 1 ? 2 : 1;
  V acc[O][R], acc2[O][C];
  for (int o = 0; o < O; ++o) {
    for (int r = 0; r < R; ++r) acc[o][r] = S::zero();
    for (int r = 0; r < C; ++r) acc2[o][r] = S::zero();
  }
  int64_t k = 0;
  for (; k < paired; k += 2 * W) {
    V xe[R], xo[R];
    for (int r = 0; r < R; ++r) {
      xe[r] = S::load(xr[r] + k);
      xo[r] = S::load(xr[r] + k + W);
    }
    for (int o = 0; o < O; ++o) {
      if ((k & 63) == 0) S::prefetch(wr[o] + k + 1024);
      V we, wo;
      S::bf16_pair(wr[o] + k, we, wo);
      for (int r = 0; r < R; ++r) {
        acc[o][r] = S::fma(we, xe[r], acc[o][r]);
        if constexpr (R == 1) acc2[o][0] = S::fma(wo, xo[r], acc2[o][0]);
        else acc[o][r] = S::fma(wo, xo[r], acc[o][r]);
      }
    }
  }
  for (; k < in; k += W) {
    const int n = static_cast<int>(imin(W, in - k));
    V xv[R];
    for (int r = 0; r < R; ++r) xv[r] = S::load_n(xr[r] + k, n);
    for (int o = 0; o < O; ++o) {
      const V w = S::bf16_n(wr[o] + k, n);
      for (int r = 0; r < R; ++r) acc[o][r] = S::fma(w, xv[r], acc[o][r]);
    }
  }
  for (int o = 0; o < no; ++o) {
    const float b = a.bias ? bf16f(a.bias[o0 + o]) : 0.0f;
    if constexpr (R == 1) acc[o][0] = S::add(acc[o][0], acc2[o][0]);
    for (int r = 0; r < R; ++r) a.y[(r0 + r) * a.out + o0 + o] = S::hsum(acc[o][r]) + b;
  }
}

template <int O>
void bf16_mv_rows(const LinearArgs& a, int64_t o0, int no) {
  int64_t r0 = 0;
  for (; r0 + 4 <= a.rows; r0 += 4) bf16_mv_tile<O, 4>(a, o0, no, r0);
  switch (a.rows - r0) {
    case 1: bf16_mv_tile<O, 1>(a, o0, no, r0); break;
    case 2: bf16_mv_tile<O, 2>(a, o0, no, r0); break;
    case 3: bf16_mv_tile<O, 3>(a, o0, no, r0); break;
    default: break;
  }
}

// One activation row: weight rows one after another (the range is one sequential stream), with
// software prefetch 4 KiB ahead and two FMA chains (more chains measured no faster on Zen 5: the
// loop is bound by memory, and a lighter loop leaves more room for outstanding misses).
void bf16_matvec_row(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  const int64_t in = a.in, paired = in / (2 * W) * (2 * W);
  const float* x = a.x;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint16_t* w = a.w + o * in;
    V acc0 = S::zero(), acc1 = S::zero();
    int64_t k = 0;
    for (; k < paired; k += 2 * W) {
      if ((k & 127) == 0)
        for (int j = 0; j < 256; j += 64) S::prefetch(reinterpret_cast<const char*>(w + k) + 4096 + j);
      V we, wo;
      S::bf16_pair(w + k, we, wo);
      acc0 = S::fma(we, S::load(x + k), acc0);
      acc1 = S::fma(wo, S::load(x + k + W), acc1);
    }
    for (; k < in; k += W) {
      const int n = static_cast<int>(imin(W, in - k));
      acc0 = S::fma(S::bf16_n(w + k, n), S::load_n(x + k, n), acc0);
    }
    a.y[o] = S::hsum(S::add(acc0, acc1)) + (a.bias ? bf16f(a.bias[o]) : 0.0f);
  }
}

void bf16_matvec(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  if (a.rows == 1) {
    bf16_matvec_row(a, o_begin, o_end);
    return;
  }
  for (int64_t o0 = o_begin; o0 < o_end; o0 += 4) bf16_mv_rows<4>(a, o0, static_cast<int>(imin(4, o_end - o0)));
}

// ---------------------------------------------------------------------------------------------
// MXFP4 matvec. x is de-interleaved per 32-block (even elements, then odd ones).

constexpr int kHalves = 16 / W;  // vectors per 16 even (or odd) elements of a block

template <int O, int R>
void mxfp4_mv_tile(const LinearArgs& a, int64_t o0, int no, int64_t r0) {
  const int64_t in = a.in, groups = in / 32;
  const uint8_t* br[O];
  const uint8_t* sr[O];
  for (int o = 0; o < O; ++o) {
    const int64_t row = o0 + (o < no ? o : 0);
    br[o] = a.blocks + row * groups * 16;
    sr[o] = a.scales + row * groups;
  }
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = a.x + (r0 + r) * in;
  V acc[O][R];
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) acc[o][r] = S::zero();
  for (int64_t g = 0; g < groups; ++g) {
    V xe[R][kHalves], xo[R][kHalves];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < kHalves; ++h) {
        xe[r][h] = S::load(xr[r] + g * 32 + h * W);
        xo[r][h] = S::load(xr[r] + g * 32 + 16 + h * W);
      }
    for (int o = 0; o < O; ++o) {
      if ((g & 3) == 0) S::prefetch(br[o] + g * 16 + 512);
      V ev[kHalves], od[kHalves];
      for (int h = 0; h < kHalves; ++h) {
        const V c = S::load_codes(br[o] + g * 16 + h * W);
        ev[h] = S::fp4_lo(c);
        od[h] = S::fp4_hi(c);
      }
      const V s = S::set1(kE8m0.v[sr[o][g]]);
      if constexpr (R == 1) {
        V t = S::mul(ev[0], xe[0][0]);
        t = S::fma(od[0], xo[0][0], t);
        for (int h = 1; h < kHalves; ++h) {
          t = S::fma(ev[h], xe[0][h], t);
          t = S::fma(od[h], xo[0][h], t);
        }
        acc[o][0] = S::fma(t, s, acc[o][0]);
      } else {
        for (int h = 0; h < kHalves; ++h) {
          ev[h] = S::mul(ev[h], s);
          od[h] = S::mul(od[h], s);
        }
        for (int r = 0; r < R; ++r)
          for (int h = 0; h < kHalves; ++h) {
            acc[o][r] = S::fma(ev[h], xe[r][h], acc[o][r]);
            acc[o][r] = S::fma(od[h], xo[r][h], acc[o][r]);
          }
      }
    }
  }
  for (int o = 0; o < no; ++o) {
    const float b = a.bias ? bf16f(a.bias[o0 + o]) : 0.0f;
    for (int r = 0; r < R; ++r) a.y[(r0 + r) * a.out + o0 + o] = S::hsum(acc[o][r]) + b;
  }
}

// One activation row, block at a time: weight rows one after another (one sequential stream), two
// blocks per step into two accumulators, the scale applied once per block. x de-interleaved.
void mxfp4_block_rows(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  const int64_t groups = a.in / 32;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* b = a.blocks + o * groups * 16;
    const uint8_t* sc = a.scales + o * groups;
    auto block = [&](int64_t g, V acc) {
      const float* x = a.x + g * 32;
      V c = S::load_codes(b + g * 16);
      V t = S::mul(S::fp4_lo(c), S::load(x));
      t = S::fma(S::fp4_hi(c), S::load(x + 16), t);
      for (int h = 1; h < kHalves; ++h) {
        c = S::load_codes(b + g * 16 + h * W);
        t = S::fma(S::fp4_lo(c), S::load(x + h * W), t);
        t = S::fma(S::fp4_hi(c), S::load(x + 16 + h * W), t);
      }
      return S::fma(t, S::set1(kE8m0.v[sc[g]]), acc);
    };
    V acc0 = S::zero(), acc1 = S::zero();
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      if ((g & 3) == 0) S::prefetch(b + g * 16 + 2048);
      acc0 = block(g, acc0);
      acc1 = block(g + 1, acc1);
    }
    if (g < groups) acc0 = block(g, acc0);
    a.y[o] = S::hsum(S::add(acc0, acc1)) + (a.bias ? bf16f(a.bias[o]) : 0.0f);
  }
}

// One activation row, nibble groups (where S::kNibbleRows: the AVX2 build): each thread's weight
// rows in pairs (two sequential streams, sharing the activation loads). The codes are read W 32-bit
// words (W/4 blocks, 8W values) at a time and never widened byte by byte: T decodes nibble n of
// every word in its own lane (one vpshufb per byte shared by all nibbles, then shifts and a
// conversion), against activations that arrive in the matching order (layout_nibbles); each lane
// keeps its own block's scale (group_scales, which matches fp4_nibble's values), applied once per
// group. Blocks past the last whole group are decoded one at a time. Results equal the block
// kernel's up to fp32 summation order. Written over T (= S) so that builds without the nibble
// operations never instantiate it.
inline constexpr int kNibbleGroupBlocks = W / 4;

// R consecutive weight rows against the one activation row, sharing its loads.
template <typename T, int R>
void mxfp4_nibble_tile(const LinearArgs& a, int64_t o) {
  const int64_t groups = a.in / 32, whole = groups / kNibbleGroupBlocks;
  constexpr int kGroupBytes = 4 * W;  // 16 bytes per block
  const uint8_t* b[R];
  const uint8_t* sc[R];
  V acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    b[r] = a.blocks + (o + r) * groups * 16;
    sc[r] = a.scales + (o + r) * groups;
    acc0[r] = S::zero();
    acc1[r] = S::zero();
  }
  for (int64_t g = 0; g < whole; ++g) {
    const float* x = a.x + g * 8 * W;
    typename T::NibbleWords c[R];
    V t0[R], t1[R];
    for (int r = 0; r < R; ++r) {
      if ((g * kGroupBytes & 63) == 0) S::prefetch(b[r] + g * kGroupBytes + 4096);
      c[r] = T::nibble_words(b[r] + g * kGroupBytes);
    }
    V xv = T::load_pinned(x);
    for (int r = 0; r < R; ++r) t0[r] = S::mul(T::template fp4_nibble<0>(c[r]), xv);
    xv = T::load_pinned(x + W);
    for (int r = 0; r < R; ++r) t1[r] = S::mul(T::template fp4_nibble<4>(c[r]), xv);
    xv = T::load_pinned(x + 2 * W);
    for (int r = 0; r < R; ++r) t0[r] = S::fma(T::template fp4_nibble<8>(c[r]), xv, t0[r]);
    xv = T::load_pinned(x + 3 * W);
    for (int r = 0; r < R; ++r) t1[r] = S::fma(T::template fp4_nibble<12>(c[r]), xv, t1[r]);
    xv = T::load_pinned(x + 4 * W);
    for (int r = 0; r < R; ++r) t0[r] = S::fma(T::template fp4_nibble<16>(c[r]), xv, t0[r]);
    xv = T::load_pinned(x + 5 * W);
    for (int r = 0; r < R; ++r) t1[r] = S::fma(T::template fp4_nibble<20>(c[r]), xv, t1[r]);
    xv = T::load_pinned(x + 6 * W);
    for (int r = 0; r < R; ++r) t0[r] = S::fma(T::template fp4_nibble<24>(c[r]), xv, t0[r]);
    xv = T::load_pinned(x + 7 * W);
    for (int r = 0; r < R; ++r) t1[r] = S::fma(T::template fp4_nibble<28>(c[r]), xv, t1[r]);
    for (int r = 0; r < R; ++r) {
      const V s = T::group_scales(sc[r] + g * kNibbleGroupBlocks);
      acc0[r] = S::fma(t0[r], s, acc0[r]);
      acc1[r] = S::fma(t1[r], s, acc1[r]);
    }
  }
  for (int64_t g = whole * kNibbleGroupBlocks; g < groups; ++g) {
    const float* x = a.x + g * 32;
    for (int r = 0; r < R; ++r) {
      V c = S::load_codes(b[r] + g * 16);
      V t = S::mul(S::fp4_lo(c), S::load(x));
      t = S::fma(S::fp4_hi(c), S::load(x + 16), t);
      for (int h = 1; h < kHalves; ++h) {
        c = S::load_codes(b[r] + g * 16 + h * W);
        t = S::fma(S::fp4_lo(c), S::load(x + h * W), t);
        t = S::fma(S::fp4_hi(c), S::load(x + 16 + h * W), t);
      }
      acc0[r] = S::fma(t, S::set1(kE8m0.v[sc[r][g]]), acc0[r]);
    }
  }
  for (int r = 0; r < R; ++r) a.y[o + r] = S::hsum(S::add(acc0[r], acc1[r])) + (a.bias ? bf16f(a.bias[o + r]) : 0.0f);
}

// The one-row kernel each build uses, chosen by measurement (one core streaming cold expert
// matrices of the real shape from memory, Zen 5 VM, 2026-12-06): AVX2 nibble groups 1.13-1.15x
// blocks; AVX-512 nibble groups 0.73x blocks, though 1.6x from L2, measured on matrices 16 bytes off
// a cache line, which later the same day proved to cost MXFP4 kernels 12-20% (docs/performance.md).
template <typename T = S>
void mxfp4_matvec_row(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  if constexpr (T::kNibbleRows) {
    int64_t o = o_begin;
    for (; o + 2 <= o_end; o += 2) mxfp4_nibble_tile<T, 2>(a, o);
    if (o < o_end) mxfp4_nibble_tile<T, 1>(a, o);
  } else {
    mxfp4_block_rows(a, o_begin, o_end);
  }
}

void mxfp4_matvec(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  if (a.rows == 1) {
    mxfp4_matvec_row<>(a, o_begin, o_end);
    return;
  }
  for (int64_t o0 = o_begin; o0 < o_end; o0 += 4) {
    const int no = static_cast<int>(imin(4, o_end - o0));
    int64_t r0 = 0;
    for (; r0 + 4 <= a.rows; r0 += 4) mxfp4_mv_tile<4, 4>(a, o0, no, r0);
    switch (a.rows - r0) {
      case 1: mxfp4_mv_tile<4, 1>(a, o0, no, r0); break;
      case 2: mxfp4_mv_tile<4, 2>(a, o0, no, r0); break;
      case 3: mxfp4_mv_tile<4, 3>(a, o0, no, r0); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM: packed fp32 panel bp[k][NR] (k-major), microkernel MR x NR.

constexpr int NV = S::kGemmNV;
constexpr int NR = NV * W;
constexpr int MR = S::kGemmMR;
constexpr int KC = S::kGemmKC;
static_assert(KC % 32 == 0 && KC % W == 0, "KC must hold whole MXFP4 blocks");

template <int M>
void micro(const float* a, int64_t lda, const float* bp, int kc, float* c, int64_t ldc, int nr, bool first,
           const float* bias) {
  V acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = S::zero();
  const float* ar[M];
  for (int m = 0; m < M; ++m) ar[m] = a + m * lda;
#pragma GCC unroll 4
  for (int k = 0; k < kc; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = S::load(bp + k * NR + v * W);
    for (int m = 0; m < M; ++m) {
      const V av = S::set1(ar[m][k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = S::fma(av, b[v], acc[m][v]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) {
      const int n = nr - v * W;
      if (n <= 0) break;
      float* cp = c + m * ldc + v * W;
      if (n >= W) {
        S::store(cp, S::add(acc[m][v], first ? S::load(bias + v * W) : S::load(cp)));
      } else {
        S::store_n(cp, S::add(acc[m][v], first ? S::load(bias + v * W) : S::load_n(cp, n)), n);
      }
    }
}

void pack_bf16(const LinearArgs& a, int64_t n0, int nr, int64_t k0, int kc, float* bp) {
  for (int g = 0; g < NV; ++g) {
    const int valid = static_cast<int>(imax(0, imin(W, nr - g * W)));
    for (int kk = 0; kk < kc; kk += W) {
      const int kn = static_cast<int>(imin(W, kc - kk));
      V r[W];
      for (int i = 0; i < W; ++i) {
        if (i >= valid) {
          r[i] = S::zero();
          continue;
        }
        const uint16_t* src = a.w + (n0 + g * W + i) * a.in + k0 + kk;
        r[i] = kn == W ? S::bf16(src) : S::bf16_n(src, kn);
      }
      S::transpose(r);
      for (int t = 0; t < kn; ++t) S::store(bp + (kk + t) * NR + g * W, r[t]);
    }
  }
}

template <void (*Pack)(const LinearArgs&, int64_t, int, int64_t, int, float*)>
void gemm(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  alignas(64) float bp[KC * NR];
  alignas(64) float biasf[NR];
  for (int64_t k0 = 0; k0 < a.in; k0 += KC) {
    const int kc = static_cast<int>(imin(KC, a.in - k0));
    const bool first = k0 == 0;
    for (int64_t n0 = o_begin; n0 < o_end; n0 += NR) {
      const int nr = static_cast<int>(imin(NR, o_end - n0));
      Pack(a, n0, nr, k0, kc, bp);
      if (first)
        for (int i = 0; i < NR; ++i) biasf[i] = (a.bias && i < nr) ? bf16f(a.bias[n0 + i]) : 0.0f;
      const float* x = a.x + k0;
      float* y = a.y + n0;
      int64_t m0 = 0;
      for (; m0 + MR <= a.rows; m0 += MR) micro<MR>(x + m0 * a.in, a.in, bp, kc, y + m0 * a.out, a.out, nr, first, biasf);
      const int rest = static_cast<int>(a.rows - m0);
      if (rest > 0) {
        const float* xm = x + m0 * a.in;
        float* ym = y + m0 * a.out;
        switch (rest) {
          case 1: micro<1>(xm, a.in, bp, kc, ym, a.out, nr, first, biasf); break;
          case 2: micro<2>(xm, a.in, bp, kc, ym, a.out, nr, first, biasf); break;
          case 3: micro<3>(xm, a.in, bp, kc, ym, a.out, nr, first, biasf); break;
          case 4: micro<4>(xm, a.in, bp, kc, ym, a.out, nr, first, biasf); break;
          case 5: micro<5>(xm, a.in, bp, kc, ym, a.out, nr, first, biasf); break;
          case 6: micro<6>(xm, a.in, bp, kc, ym, a.out, nr, first, biasf); break;
          case 7: micro<7>(xm, a.in, bp, kc, ym, a.out, nr, first, biasf); break;
          default: break;
        }
      }
    }
  }
}
static_assert(MR <= 8, "remainder dispatch covers MR <= 8");

void bf16_gemm(const LinearArgs& a, int64_t o_begin, int64_t o_end) { gemm<pack_bf16>(a, o_begin, o_end); }
// ---------------------------------------------------------------------------------------------
// MXFP4 GEMM, transposed: C^T = W x^T. Tiles of TN weight rows x XC tokens. Per block of KD
// inputs, the tile's weight rows are dequantized row-major into an L1 buffer (in the even/odd
// order of each 32-block: no transposes) and consumed at once by broadcast-FMA against x^T,
// which arrives packed per chunk of XC tokens ([in][XC], rows in the same even/odd order,
// zero-padded). K is not blocked outside the registers: each output is written once.

constexpr int TN = S::kGemmTN;  // weight rows per tile
constexpr int TV = S::kGemmTV;  // token vectors per tile
constexpr int XC = TV * W;      // tokens per x^T chunk (one tile)
constexpr int KD = 256;         // inputs dequantized per block
static_assert(KD % 32 == 0 && 32 % TV == 0, "blocks hold whole MXFP4 groups and split over accumulator sets");

// With fewer than TV token vectors the k loop is split over P interleaved accumulator sets, so
// there are always about TN * TV independent FMA chains.
template <int MV>
void mxfp4_tile(const LinearArgs& a, int64_t n0, int nr, const float* xt, int64_t ldx, float* tile) {
  constexpr int P = TV / MV > 1 ? TV / MV : 1;
  alignas(64) float wp[TN * KD];
  for (int n = nr; n < TN; ++n)
    for (int k = 0; k < KD; k += W) S::store(wp + n * KD + k, S::zero());
  V acc[P][TN][MV];
  for (int p = 0; p < P; ++p)
    for (int n = 0; n < TN; ++n)
      for (int v = 0; v < MV; ++v) acc[p][n][v] = S::zero();
  const int64_t groups = a.in / 32;
  for (int64_t kb = 0; kb < a.in; kb += KD) {
    const int kn = static_cast<int>(imin(KD, a.in - kb));
    for (int n = 0; n < nr; ++n) {
      const uint8_t* b = a.blocks + ((n0 + n) * groups + kb / 32) * 16;
      const uint8_t* sc = a.scales + (n0 + n) * groups + kb / 32;
      float* dst = wp + n * KD;
      for (int g = 0; g < kn / 32; ++g) {
        const V s = S::set1(kE8m0.v[sc[g]]);
        for (int h = 0; h < kHalves; ++h) {
          const V c = S::load_codes(b + g * 16 + h * W);
          S::store(dst + g * 32 + h * W, S::mul(S::fp4_lo(c), s));
          S::store(dst + g * 32 + 16 + h * W, S::mul(S::fp4_hi(c), s));
        }
      }
    }
    const float* xk = xt + kb * ldx;
#pragma GCC unroll 2
    for (int k = 0; k < kn; k += P) {
      for (int p = 0; p < P; ++p) {
        V xv[MV];
        for (int v = 0; v < MV; ++v) xv[v] = S::load(xk + (k + p) * ldx + v * W);
        for (int n = 0; n < TN; ++n) {
          const V wb = S::set1(wp[n * KD + k + p]);
          for (int v = 0; v < MV; ++v) acc[p][n][v] = S::fma(wb, xv[v], acc[p][n][v]);
        }
      }
    }
  }
  for (int n = 0; n < TN; ++n)
    for (int v = 0; v < MV; ++v) {
      V r = acc[0][n][v];
      for (int p = 1; p < P; ++p) r = S::add(r, acc[p][n][v]);
      S::store(tile + n * XC + v * W, r);
    }
}

void mxfp4_gemm(const LinearArgs& a, int64_t o_begin, int64_t o_end) {
  alignas(64) float tile[TN * XC];
  const int64_t ldx = a.xt_chunk, chunks = (a.rows + ldx - 1) / ldx;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t m0 = c * ldx;
    const int mr = static_cast<int>(imin(ldx, a.rows - m0));
    const float* xt = a.x + c * a.in * ldx;
    for (int64_t n0 = o_begin; n0 < o_end; n0 += TN) {
      const int nr = static_cast<int>(imin(TN, o_end - n0));
      switch ((mr + W - 1) / W) {
        case 1: mxfp4_tile<1>(a, n0, nr, xt, ldx, tile); break;
        case 2: mxfp4_tile<2 < TV ? 2 : TV>(a, n0, nr, xt, ldx, tile); break;
        case 3: mxfp4_tile<3 < TV ? 3 : TV>(a, n0, nr, xt, ldx, tile); break;
        default: mxfp4_tile<TV>(a, n0, nr, xt, ldx, tile); break;
      }
      for (int n = 0; n < nr; ++n) {
        const float b = a.bias ? bf16f(a.bias[n0 + n]) : 0.0f;
        for (int m = 0; m < mr; ++m) a.y[(m0 + m) * a.out + n0 + n] = tile[n * XC + m] + b;
      }
    }
  }
}
static_assert(TV <= 4, "tile dispatch covers up to 4 token vectors");

// ---------------------------------------------------------------------------------------------
// Attention.

constexpr int KB = kAttnKeyBlock;
constexpr int QB = S::kScoreQ;  // queries per score tile
constexpr int CB = S::kScoreC;  // key chunks (W keys each) per score tile
constexpr int PQ = S::kPvQ;     // queries per P V tile
static_assert(KB % (W * CB) == 0, "key block must hold whole score tiles");

template <int NVD>
void pv_tile(const AttentionTask& t, int64_t b0, int nk, const float* sc, float* o, int q0, int e0) {
  const int d = t.head_dim;
  const float* pr[PQ];
  float* orow[PQ];
  for (int q = 0; q < PQ; ++q) {
    pr[q] = sc + (q0 + q) * KB;
    orow[q] = o + (q0 + q) * d + e0;
  }
  V acc[PQ][NVD];
  for (int q = 0; q < PQ; ++q)
    for (int v = 0; v < NVD; ++v) acc[q][v] = S::load(orow[q] + v * W);
  const float* const* vals = t.values + (b0 - t.key_base);
  const int64_t off = t.head_offset + e0;
  for (int j = 0; j < nk; ++j) {
    const float* vr = vals[j] + off;
    V vv[NVD];
    for (int v = 0; v < NVD; ++v) vv[v] = S::load(vr + v * W);
    for (int q = 0; q < PQ; ++q) {
      const V p = S::set1(pr[q][j]);
      for (int v = 0; v < NVD; ++v) acc[q][v] = S::fma(p, vv[v], acc[q][v]);
    }
  }
  for (int q = 0; q < PQ; ++q)
    for (int v = 0; v < NVD; ++v) S::store(orow[q] + v * W, acc[q][v]);
}

void attention(const AttentionTask& t, float* scratch) {
  const int d = t.head_dim, nq = t.num_queries, nd = d / W;
  const int nq_pad = static_cast<int>((nq + 15) / 16 * 16);
  float* kt = scratch;               // [KB / W chunks][d][W]
  float* sc = kt + KB * d;           // [nq_pad][KB]
  float* o = sc + nq_pad * KB;       // [nq_pad][d]
  float* mx = o + nq_pad * d;        // [nq]
  float* l = mx + nq;                // [nq]
  int64_t kmin = 0, kmax = -1;
  for (int q = 0; q < nq; ++q) {
    const int64_t pos = t.q_pos[q];
    const int64_t lo = t.window > 0 ? imax(0, pos - t.window + 1) : 0;
    kmin = q == 0 ? lo : imin(kmin, lo);
    kmax = imax(kmax, pos);
    mx[q] = t.sinks[q];
    l[q] = 1.0f;
  }
  for (int64_t i = 0; i < static_cast<int64_t>(nq_pad) * d; ++i) o[i] = 0.0f;
  for (int64_t b0 = kmin; b0 <= kmax; b0 += KB) {
    const int nk = static_cast<int>(imin(KB, kmax + 1 - b0));
    const int nc = (nk + W - 1) / W;
    const float* const* keys = t.keys + (b0 - t.key_base);
    // K^T of this block, one W x W transpose per chunk and d-slice.
    for (int c = 0; c < nc; ++c) {
      const float* rows[W];
      for (int i = 0; i < W; ++i) rows[i] = keys[imin(c * W + i, nk - 1)] + t.head_offset;
      for (int s = 0; s < nd; ++s) {
        V r[W];
        for (int i = 0; i < W; ++i) r[i] = S::load(rows[i] + s * W);
        S::transpose(r);
        for (int i = 0; i < W; ++i) S::store(kt + (c * d + s * W + i) * W, r[i]);
      }
    }
    // Scores of QB queries x CB chunks per tile (padding queries repeat the last one).
    const V scale = S::set1(t.scale);
    for (int q0 = 0; q0 < nq; q0 += QB) {
      const float* qp[QB];
      for (int q = 0; q < QB; ++q) qp[q] = t.q[imin(q0 + q, nq - 1)];
      for (int c0 = 0; c0 < nc; c0 += CB) {
        V acc[QB][CB];
        for (int q = 0; q < QB; ++q)
          for (int c = 0; c < CB; ++c) acc[q][c] = S::zero();
        const float* ktc = kt + c0 * d * W;
        for (int e = 0; e < d; ++e) {
          V kv[CB];
          for (int c = 0; c < CB; ++c) kv[c] = S::load(ktc + (c * d + e) * W);
          for (int q = 0; q < QB; ++q) {
            const V qv = S::set1(qp[q][e]);
            for (int c = 0; c < CB; ++c) acc[q][c] = S::fma(qv, kv[c], acc[q][c]);
          }
        }
        for (int q = 0; q < QB; ++q)
          for (int c = 0; c < CB; ++c) S::store(sc + (q0 + q) * KB + (c0 + c) * W, S::mul(acc[q][c], scale));
      }
    }
    // Online softmax: mask to each query's visible keys, rescale the running sums.
    for (int q = 0; q < nq; ++q) {
      float* sq = sc + q * KB;
      const int64_t pos = t.q_pos[q];
      const int64_t lo = t.window > 0 ? imax(0, pos - t.window + 1) : 0;
      const int64_t hi = imin(pos, b0 + nk - 1);
      if (hi < imax(lo, b0)) {
        for (int i = 0; i < nc * W; ++i) sq[i] = 0.0f;
        continue;
      }
      V bm = S::set1(-__builtin_huge_valf());
      for (int c = 0; c < nc; ++c) {
        const float first = static_cast<float>(b0 + c * W);
        const V s = S::select_range(S::load(sq + c * W), static_cast<float>(lo) - first, static_cast<float>(hi) - first);
        S::store(sq + c * W, s);
        bm = S::max(bm, s);
      }
      const float m_new = mx[q] > S::hmax(bm) ? mx[q] : S::hmax(bm);
      const V mv = S::set1(m_new);
      V sum = S::zero();
      for (int c = 0; c < nc; ++c) {
        const V p = S::exp(S::sub(S::load(sq + c * W), mv));
        S::store(sq + c * W, p);
        sum = S::add(sum, p);
      }
      if (m_new != mx[q]) {
        const float cf = S::exp1(mx[q] - m_new);
        const V corr = S::set1(cf);
        l[q] *= cf;
        float* oq = o + q * d;
        for (int e = 0; e < d; e += W) S::store(oq + e, S::mul(S::load(oq + e), corr));
        mx[q] = m_new;
      }
      l[q] += S::hsum(sum);
    }
    // P V.
    for (int q0 = 0; q0 < nq; q0 += PQ)
      for (int v0 = 0; v0 < nd; v0 += 4) switch (imin(4, nd - v0)) {
          case 1: pv_tile<1>(t, b0, nk, sc, o, q0, v0 * W); break;
          case 2: pv_tile<2>(t, b0, nk, sc, o, q0, v0 * W); break;
          case 3: pv_tile<3>(t, b0, nk, sc, o, q0, v0 * W); break;
          default: pv_tile<4>(t, b0, nk, sc, o, q0, v0 * W); break;
        }
  }
  for (int q = 0; q < nq; ++q) {
    const V den = S::set1(l[q]);
    const float* oq = o + q * d;
    for (int e = 0; e < d; e += W) S::store(t.out[q] + e, S::div(S::load(oq + e), den));
  }
}

// ---------------------------------------------------------------------------------------------
// Element-wise kernels.

void swiglu(const float* u, int64_t n, float limit, float* act) {
  const V lim = S::set1(limit), nlim = S::set1(-limit), one = S::set1(1.0f), k = S::set1(-1.702f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    V gate, up;
    S::deinterleave(S::load(u + 2 * j), S::load(u + 2 * j + W), gate, up);
    gate = S::min(gate, lim);
    up = S::max(nlim, S::min(up, lim));
    const V sig = S::div(gate, S::add(one, S::exp(S::mul(k, gate))));
    S::store(act + j, S::mul(sig, S::add(up, one)));
  }
  for (; j < n; ++j) {
    const float g = u[2 * j] < limit ? u[2 * j] : limit;
    float up = u[2 * j + 1] < limit ? u[2 * j + 1] : limit;
    up = up > -limit ? up : -limit;
    act[j] = g / (1.0f + S::exp1(-1.702f * g)) * (up + 1.0f);
  }
}

void rms_norm(const float* x, int64_t dim, const float* w, float eps, float* out) {
  V s0 = S::zero(), s1 = S::zero();
  int64_t i = 0;
  for (; i + 2 * W <= dim; i += 2 * W) {
    const V a = S::load(x + i), b = S::load(x + i + W);
    s0 = S::fma(a, a, s0);
    s1 = S::fma(b, b, s1);
  }
  float sum = S::hsum(S::add(s0, s1));
  for (; i < dim; ++i) sum += x[i] * x[i];
  const float inv = 1.0f / S::sqrt1(sum / static_cast<float>(dim) + eps);
  const V iv = S::set1(inv);
  i = 0;
  for (; i + W <= dim; i += W) S::store(out + i, S::mul(S::mul(S::load(x + i), iv), S::load(w + i)));
  for (; i < dim; ++i) out[i] = x[i] * inv * w[i];
}

void rope(float* row, int heads, int head_dim, const float* cos, const float* sin) {
  const int half = head_dim / 2;
  for (int h = 0; h < heads; ++h) {
    float* v = row + static_cast<int64_t>(h) * head_dim;
    int i = 0;
    for (; i + W <= half; i += W) {
      const V a = S::load(v + i), b = S::load(v + half + i), c = S::load(cos + i), s = S::load(sin + i);
      S::store(v + i, S::sub(S::mul(a, c), S::mul(b, s)));
      S::store(v + half + i, S::add(S::mul(b, c), S::mul(a, s)));
    }
    for (; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

void add(float* x, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) S::store(x + i, S::add(S::load(x + i), S::load(y + i)));
  for (; i < n; ++i) x[i] += y[i];
}

void axpy(float* out, float w, const float* y, int64_t n) {
  const V wv = S::set1(w);
  int64_t i = 0;
  for (; i + W <= n; i += W) S::store(out + i, S::fma(wv, S::load(y + i), S::load(out + i)));
  for (; i < n; ++i) out[i] += w * y[i];
}

void bf16_to_f32(const uint16_t* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + W <= n; i += W) S::store(out + i, S::bf16(in + i));
  for (; i < n; ++i) out[i] = bf16f(in[i]);
}

// Index of the largest of n values (the lowest such index on ties).
int64_t argmax(const float* x, int64_t n) {
  if (n <= 0) return -1;
  float best = x[0];
  int64_t i = 0;
  if (n >= W) {
    V m = S::load(x);
    for (i = W; i + W <= n; i += W) m = S::max(m, S::load(x + i));
    best = S::hmax(m);
  }
  for (; i < n; ++i) best = x[i] > best ? x[i] : best;
  for (i = 0; i < n; ++i)
    if (x[i] == best) return i;
  return 0;  // all NaN
}

// The int8-activation entries (q8_group_blocks, quantize_q8, mxfp4_q8_row, mxfp4_q8_row_vnni) are written per
// instruction set outside this file; each build fills them in after make_table.
constexpr KernelTable make_table(const char* name) {
  return KernelTable{name,   NR,       W,       TN,      XC,         S::kNibbleRows, bf16_matvec, bf16_gemm, mxfp4_matvec,
                     1,      nullptr,  nullptr, nullptr, mxfp4_gemm, attention, W,            swiglu,      rms_norm,  rope,
                     add,    axpy,     bf16_to_f32, argmax};
}
