// Host-side check of the MoE kernels' MXFP4 decoding and tensor-core operand layouts
// (kernels/cuda/mxfp4.cuh, used by kernels/cuda/moe.cu): the lanes' registers are built as moe.cu
// builds them, then multiplied by an emulation of mma.m16n8k16 and ldmatrix written from the PTX
// ISA's fragment tables, and the results are compared with a plain product of the decoded weights.
// Needs no GPU (runs wherever the CUDA headers are), so CI checks the layouts on every run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/mxfp4.cuh"

namespace arbiter {
namespace {

using namespace cuda::mxfp4;

float fp4_value(int code) {
  static const float table[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  return (code & 8 ? -1.0f : 1.0f) * table[code & 7];
}
double scale_value(int s) { return std::ldexp(1.0, s - 127); }
float bf(uint32_t bits) { return bf16_bits_to_float(bits & 0xffffu); }

// mma.m16n8k16.row.col, bf16 in, accumulate in double. Fragments (PTX ISA, "Matrix fragments for
// mma.m16n8k16 with floating point type"), g = lane / 4, t = lane % 4:
//   A register r (halves h = 0, 1): row g + 8 * (r % 2), column 2t + h + 8 * (r / 2);
//   B register r: k row 2t + h + 8r, column g;  C element i: row g + 8 * (i / 2), column 2t + i % 2.
struct MmaRegs {
  uint32_t a[32][4];
  uint32_t b[32][2];
};
void mma(const MmaRegs& m, double (&d)[16][8]) {
  float A[16][16] = {}, B[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) A[g + 8 * (r % 2)][2 * t + h + 8 * (r / 2)] = bf(m.a[lane][r] >> (16 * h));
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) B[2 * t + h + 8 * r][g] = bf(m.b[lane][r] >> (16 * h));
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j)
      for (int k = 0; k < 16; ++k) d[i][j] += static_cast<double>(A[i][k]) * B[k][j];
}
double c_of(const double (&d)[16][8], int lane, int i) { return d[lane / 4 + 8 * (i / 2)][2 * (lane % 4) + i % 2]; }

uint32_t bf16_of(float v) { return float_to_bf16_bits(v); }

TEST(Mxfp4, DecodeIsExactForEveryCodeAndScale) {
  for (int s = 0; s < 256; ++s) {
    for (int code = 0; code < 16; ++code) {
      // Put the code at every position of a word; decode_word's pair i holds values (3-i, 7-i).
      for (int pos = 0; pos < 8; ++pos) {
        const uint32_t q = static_cast<uint32_t>(code) << (4 * pos);
        uint32_t p[4];
        if (big(static_cast<uint32_t>(s))) decode_word<true>(q, factor(s), factor2(s), p);
        else decode_word<false>(q, factor(s), factor2(s), p);
        const uint4 nat = natural_order(p);
        for (int v = 0; v < 8; ++v) {
          const double want = v == pos ? fp4_value(code) * scale_value(s) : 0.0;
          const int pair = v < 4 ? 3 - v : 7 - v;
          const float got = bf(p[pair] >> (v < 4 ? 0 : 16));
          const float got_nat = bf(word(nat, v / 2) >> (16 * (v % 2)));
          const float want_f = static_cast<float>(want);  // inf where the true value overflows
          ASSERT_EQ(got, want_f) << "s " << s << " code " << code << " pos " << pos << " v " << v;
          ASSERT_EQ(got_nat, want_f) << "natural order: s " << s << " code " << code << " pos " << pos << " v " << v;
        }
      }
    }
  }
}

TEST(Mxfp4, ActivationPairsMatchDecodePairs) {
  uint4 x = make_uint4(0, 0, 0, 0);
  uint32_t* words[4] = {&x.x, &x.y, &x.z, &x.w};
  for (int v = 0; v < 8; ++v) *words[v / 2] |= static_cast<uint32_t>(100 + v) << (16 * (v % 2));
  uint32_t b[4];
  activation_pairs(x, b);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(b[i] & 0xffffu, static_cast<uint32_t>(100 + 3 - i));
    EXPECT_EQ(b[i] >> 16, static_cast<uint32_t>(100 + 7 - i));
  }
}

struct Expert {
  int rows, groups;
  std::vector<uint8_t> blocks, scales;  // [rows, groups, 16], [rows, groups]
  double weight(int row, int k) const {
    const uint8_t byte = blocks[(static_cast<size_t>(row) * groups + k / 32) * 16 + (k % 32) / 2];
    const int code = (k % 2) ? byte >> 4 : byte & 15;
    return fp4_value(code) * scale_value(scales[static_cast<size_t>(row) * groups + k / 32]);
  }
};

Expert random_expert(int rows, int groups, int s_lo, int s_hi, std::mt19937& rng) {
  Expert e{rows, groups, std::vector<uint8_t>(static_cast<size_t>(rows) * groups * 16),
           std::vector<uint8_t>(static_cast<size_t>(rows) * groups)};
  for (auto& b : e.blocks) b = static_cast<uint8_t>(rng() & 0xff);
  for (auto& s : e.scales) s = static_cast<uint8_t>(s_lo + static_cast<int>(rng() % static_cast<unsigned>(s_hi - s_lo + 1)));
  return e;
}

std::vector<uint16_t> random_bf16(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = static_cast<uint16_t>(bf16_of(d(rng)));
  return v;
}

uint4 load8(const std::vector<uint16_t>& row, int first) {
  uint32_t w[4];
  for (int i = 0; i < 4; ++i) w[i] = row[static_cast<size_t>(first + 2 * i)] | (static_cast<uint32_t>(row[static_cast<size_t>(first + 2 * i + 1)]) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}
uint4 load16(const std::vector<uint8_t>& bytes, size_t offset) {
  uint32_t w[4];
  for (int i = 0; i < 4; ++i) std::memcpy(&w[i], bytes.data() + offset + 4 * i, 4);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// moe.cu's vec_tile for one warp, lane by lane: MMA rows r / r+8 are weight rows row_a[r] / row_b[r]
// (-1: none), tokens 0..count-1 are x[n], groups [gb, ge).
void emulate_vec_tile(const Expert& e, const int (&row_a)[8], const int (&row_b)[8],
                      const std::vector<std::vector<uint16_t>>& x, int count, int gb, int ge, double (&d)[16][8]) {
  constexpr int kUnroll = 4;  // moe.cu's kVecUnroll (the emulation does not depend on it)
  for (int g0 = gb; g0 < ge; g0 += 4 * kUnroll) {
    for (int u = 0; u < kUnroll; ++u) {
      if (g0 + 4 * u >= ge) break;
      uint4 wa[32], wb[32], xv[32][4];
      uint32_t sa[32], sb[32];
      bool any_big = false;
      for (int lane = 0; lane < 32; ++lane) {
        const int r = vec_row(lane), g = g0 + 4 * u + vec_group(lane);
        wa[lane] = wb[lane] = make_uint4(0, 0, 0, 0);
        sa[lane] = sb[lane] = 127;
        if (g < ge) {
          if (row_a[r] >= 0) {
            wa[lane] = load16(e.blocks, (static_cast<size_t>(row_a[r]) * e.groups + g) * 16);
            sa[lane] = e.scales[static_cast<size_t>(row_a[r]) * e.groups + g];
          }
          if (row_b[r] >= 0) {
            wb[lane] = load16(e.blocks, (static_cast<size_t>(row_b[r]) * e.groups + g) * 16);
            sb[lane] = e.scales[static_cast<size_t>(row_b[r]) * e.groups + g];
          }
        }
        for (int w = 0; w < 4; ++w) {
          xv[lane][w] = make_uint4(0, 0, 0, 0);
          if (r < count && g < ge) xv[lane][w] = load8(x[static_cast<size_t>(r)], g * 32 + w * 8);
        }
        any_big = any_big || big(sa[lane]) || big(sb[lane]);
      }
      for (int w = 0; w < 4; ++w) {
        MmaRegs m0{}, m1{};
        for (int lane = 0; lane < 32; ++lane) {
          uint32_t pa[4], pb[4], bx[4];
          if (any_big) {
            decode_word<true>(word(wa[lane], w), factor(sa[lane]), factor2(sa[lane]), pa);
            decode_word<true>(word(wb[lane], w), factor(sb[lane]), factor2(sb[lane]), pb);
          } else {
            decode_word<false>(word(wa[lane], w), factor(sa[lane]), factor2(sa[lane]), pa);
            decode_word<false>(word(wb[lane], w), factor(sb[lane]), factor2(sb[lane]), pb);
          }
          activation_pairs(xv[lane][w], bx);
          const uint32_t a0[4] = {pa[0], pb[0], pa[1], pb[1]}, a1[4] = {pa[2], pb[2], pa[3], pb[3]};
          for (int i = 0; i < 4; ++i) {
            m0.a[lane][i] = a0[i];
            m1.a[lane][i] = a1[i];
          }
          m0.b[lane][0] = bx[0];
          m0.b[lane][1] = bx[1];
          m1.b[lane][0] = bx[2];
          m1.b[lane][1] = bx[3];
        }
        mma(m0, d);
        mma(m1, d);
      }
    }
  }
}

double reference(const Expert& e, int row, const std::vector<uint16_t>& x, int gb, int ge) {
  double s = 0;
  for (int k = gb * 32; k < ge * 32; ++k) s += e.weight(row, k) * bf(x[static_cast<size_t>(k)]);
  return s;
}

// Within 1e-6 of `scale` (the largest result, or the sum of the terms' magnitudes); exact when 0.
void expect_close(double got, double want, double scale, const std::string& what) {
  EXPECT_LE(std::fabs(got - want), 1e-6 * scale) << what << ": got " << got << " want " << want;
}

// The gate_up mapping (MMA rows 0-7: channels' gate rows 2c, 8-15: their up rows 2c+1) and the down
// mapping (MMA rows are weight rows), full K and K halves, a ragged last step, 1..8 tokens, missing rows,
// and scales above 2^1 (the two-factor decode).
TEST(Mxfp4, VectorPathLanesComputeTheProduct) {
  std::mt19937 rng(7);
  struct Case {
    const char* name;
    int groups, gb, ge, count, s_lo, s_hi;
    bool gate_up;
    int missing;  // MMA row pair index without weight rows (-1: none)
  };
  for (const Case c : {Case{"gate_up_full", 9, 0, 9, 8, 118, 126, true, -1}, Case{"gate_up_one_token", 90, 0, 90, 1, 120, 124, true, 5},
                       Case{"down_first_half", 90, 0, 45, 3, 118, 122, false, -1},
                       Case{"down_second_half", 90, 45, 90, 5, 118, 122, false, 2},
                       Case{"big_scales", 6, 0, 6, 7, 120, 140, false, -1}, Case{"tiny_k", 2, 1, 2, 8, 0, 3, true, -1}}) {
    SCOPED_TRACE(c.name);
    const Expert e = random_expert(16, c.groups, c.s_lo, c.s_hi, rng);
    std::vector<std::vector<uint16_t>> x;
    for (int n = 0; n < 8; ++n) x.push_back(random_bf16(static_cast<size_t>(c.groups) * 32, rng));
    int row_a[8], row_b[8];
    for (int r = 0; r < 8; ++r) {
      row_a[r] = c.gate_up ? 2 * r : r;
      row_b[r] = c.gate_up ? 2 * r + 1 : r + 8;
      if (r == c.missing) row_a[r] = row_b[r] = -1;
    }
    double d[16][8] = {};
    emulate_vec_tile(e, row_a, row_b, x, c.count, c.gb, c.ge, d);
    double scale = 0;
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < c.count; ++n) {
        const int row = m < 8 ? row_a[m] : row_b[m - 8];
        if (row >= 0) scale = std::max(scale, std::fabs(reference(e, row, x[static_cast<size_t>(n)], c.gb, c.ge)));
      }
    // Read the results the way the kernels' epilogues do: lane (r, j) has c0, c1 = MMA row r, tokens
    // 2j, 2j+1 and c2, c3 = row r + 8.
    for (int lane = 0; lane < 32; ++lane) {
      const int r = vec_row(lane);
      for (int i = 0; i < 4; ++i) {
        const int tok = 2 * vec_group(lane) + i % 2;
        const int row = i < 2 ? row_a[r] : row_b[r];
        const double want = (row < 0 || tok >= c.count) ? 0.0 : reference(e, row, x[static_cast<size_t>(tok)], c.gb, c.ge);
        expect_close(c_of(d, lane, i), want, scale, "lane " + std::to_string(lane) + " c" + std::to_string(i));
      }
    }
  }
}

// moe.cu's tile kernel for one 64-wide K slice: weights decoded into shared rows in natural order by
// (row, group) threads, fragments by ldmatrix.x4 at the kernel's lane addresses, 8 warps of 64 tokens x
// 32 rows, and the epilogue's (token, row) reading of the accumulators.
TEST(Mxfp4, TilePathLanesComputeTheProduct) {
  constexpr int kM = 128, kN = 128, kK = 64, kLd = kK + 8;
  std::mt19937 rng(11);
  const int groups = 3;  // K = 96: the second slice is half outside K
  const Expert e = random_expert(kN, groups, 116, 131, rng);
  std::vector<std::vector<uint16_t>> x;
  for (int m = 0; m < kM; ++m) x.push_back(random_bf16(static_cast<size_t>(groups) * 32, rng));
  const int tokens = 100;  // rows 100..127 of the tile are empty
  for (int kb = 0; kb < groups * 32; kb += kK) {
    SCOPED_TRACE("slice " + std::to_string(kb));
    std::vector<uint16_t> xs(static_cast<size_t>(kM) * kLd, 0xffff), ws(static_cast<size_t>(kN) * kLd, 0xffff);
    for (int m = 0; m < kM; ++m)
      for (int col = 0; col < kK; ++col)
        xs[static_cast<size_t>(m) * kLd + col] =
            m < tokens && kb + col < groups * 32 ? x[static_cast<size_t>(m)][static_cast<size_t>(kb + col)] : 0;
    for (int tid = 0; tid < 256; ++tid) {  // store_w
      const int wn = tid >> 1, wg = tid & 1, g = kb / 32 + wg;
      const bool valid = g < groups;
      const uint4 codes = valid ? load16(e.blocks, (static_cast<size_t>(wn) * groups + g) * 16) : make_uint4(0, 0, 0, 0);
      const uint32_t s = valid ? e.scales[static_cast<size_t>(wn) * groups + g] : 127;
      for (int w = 0; w < 4; ++w) {
        uint32_t p[4];
        if (big(s)) decode_word<true>(word(codes, w), factor(s), factor2(s), p);
        else decode_word<false>(word(codes, w), factor(s), factor2(s), p);
        const uint4 o = natural_order(p);
        for (int i = 0; i < 8; ++i)
          ws[static_cast<size_t>(wn) * kLd + wg * 32 + w * 8 + i] = static_cast<uint16_t>(word(o, i / 2) >> (16 * (i % 2)));
      }
    }
    // ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; lane t receives, in register i,
    // row t/4, columns 2(t%4) and 2(t%4)+1 of matrix i.
    auto ldmatrix = [&](const std::vector<uint16_t>& sm, const int (&row)[32], const int (&col)[32], uint32_t (&reg)[32][4]) {
      for (int t = 0; t < 32; ++t)
        for (int i = 0; i < 4; ++i) {
          const int src = 8 * i + t / 4;
          const size_t at = static_cast<size_t>(row[src]) * kLd + static_cast<size_t>(col[src] + 2 * (t % 4));
          reg[t][i] = sm[at] | (static_cast<uint32_t>(sm[at + 1]) << 16);
        }
    };
    for (int warp = 0; warp < 8; ++warp) {
      const int wm0 = (warp >> 2) * 64, wn0 = (warp & 3) * 32;
      double acc[4][4][16][8] = {};
      for (int ks = 0; ks < kK / 16; ++ks) {
        uint32_t af[4][32][4], bfr[2][32][4];
        for (int mt = 0; mt < 4; ++mt) {
          int row[32], col[32];
          for (int l = 0; l < 32; ++l) {
            row[l] = wm0 + mt * 16 + ldsm_a_row(l);
            col[l] = ks * 16 + ldsm_a_col(l);
          }
          ldmatrix(xs, row, col, af[mt]);
        }
        for (int np = 0; np < 2; ++np) {
          int row[32], col[32];
          for (int l = 0; l < 32; ++l) {
            row[l] = wn0 + np * 16 + ldsm_b_row(l);
            col[l] = ks * 16 + ldsm_b_col(l);
          }
          ldmatrix(ws, row, col, bfr[np]);
        }
        for (int mt = 0; mt < 4; ++mt)
          for (int n8 = 0; n8 < 4; ++n8) {
            MmaRegs m{};
            for (int l = 0; l < 32; ++l) {
              for (int i = 0; i < 4; ++i) m.a[l][i] = af[mt][l][i];
              m.b[l][0] = bfr[n8 >> 1][l][(n8 & 1) * 2];
              m.b[l][1] = bfr[n8 >> 1][l][(n8 & 1) * 2 + 1];
            }
            mma(m, acc[mt][n8]);
          }
      }
      for (int lane = 0; lane < 32; ++lane)
        for (int mt = 0; mt < 4; ++mt)
          for (int n8 = 0; n8 < 4; ++n8)
            for (int q = 0; q < 4; ++q) {
              const int m = wm0 + mt * 16 + (lane >> 2) + (q / 2) * 8;
              const int col = wn0 + n8 * 8 + 2 * (lane & 3) + q % 2;
              double want = 0, scale = 0;
              if (m < tokens) {
                const int ge = std::min(groups, (kb + kK) / 32);
                want = reference(e, col, x[static_cast<size_t>(m)], kb / 32, ge);
                for (int k = kb; k < ge * 32; ++k)
                  scale += std::fabs(e.weight(col, k) * bf(x[static_cast<size_t>(m)][static_cast<size_t>(k)]));
              }
              expect_close(c_of(acc[mt][n8], lane, q), want, scale,
                           "warp " + std::to_string(warp) + " token " + std::to_string(m) + " row " + std::to_string(col));
            }
    }
  }
}

}  // namespace
}  // namespace arbiter
