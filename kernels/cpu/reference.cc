#include "kernels/cpu/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/tensor.h"

namespace arbiter::cpu::ref {

float fp4_value(uint8_t code) {
  static const float kTable[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  return kTable[code & 0xF];
}

float e8m0_value(uint8_t scale) { return std::ldexp(1.0f, static_cast<int>(scale) - 127); }

void rms_norm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    double sum = 0;
    for (int64_t i = 0; i < dim; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    float inv = 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(dim)) + eps);
    for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = xr[i] * inv * weight[i];
  }
}

void linear_bf16(const float* x, int64_t rows, int64_t in, const uint16_t* w, int64_t out_features,
                 const uint16_t* bias, float* y) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out_features; ++o) {
      double acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += static_cast<double>(x[r * in + i]) * bf16_to_f32(w[o * in + i]);
      if (bias) acc += bf16_to_f32(bias[o]);
      y[r * out_features + o] = static_cast<float>(acc);
    }
}

void mxfp4_matvec(const float* x, int64_t in, const uint8_t* blocks, const uint8_t* scales, int64_t out_features,
                  float* y) {
  const int64_t groups = in / 32;
  for (int64_t o = 0; o < out_features; ++o) {
    double acc = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* b = blocks + (o * groups + g) * 16;
      const double s = e8m0_value(scales[o * groups + g]);
      for (int j = 0; j < 16; ++j) {
        acc += s * fp4_value(b[j] & 0xF) * x[g * 32 + 2 * j];
        acc += s * fp4_value(b[j] >> 4) * x[g * 32 + 2 * j + 1];
      }
    }
    y[o] = static_cast<float>(acc);
  }
}

void mxfp4_matvec_q8(const float* x, int64_t in, const uint8_t* blocks, const uint8_t* scales, int64_t out_features,
                     float* y) {
  const int64_t groups = in / 32;
  std::vector<int> q(static_cast<size_t>(in));
  std::vector<float> half_scale(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[g * 32 + i]));
    const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    half_scale[static_cast<size_t>(g)] = 0.5f * d;
    for (int i = 0; i < 32; ++i)
      q[static_cast<size_t>(g * 32 + i)] = static_cast<int>(std::clamp(std::nearbyint(x[g * 32 + i] * inv), -127.0f, 127.0f));
  }
  for (int64_t o = 0; o < out_features; ++o) {
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* b = blocks + (o * groups + g) * 16;
      int dot = 0;
      for (int j = 0; j < 16; ++j) {
        dot += static_cast<int>(2.0f * fp4_value(b[j] & 0xF)) * q[static_cast<size_t>(g * 32 + 2 * j)];
        dot += static_cast<int>(2.0f * fp4_value(b[j] >> 4)) * q[static_cast<size_t>(g * 32 + 2 * j + 1)];
      }
      acc += static_cast<float>(dot) * (e8m0_value(scales[o * groups + g]) * half_scale[static_cast<size_t>(g)]);
    }
    y[o] = acc;
  }
}

void rope_row(float* row, int heads, int head_dim, int64_t position, const float* inv_freq, float concentration) {
  const int half = head_dim / 2;
  for (int h = 0; h < heads; ++h) {
    float* v = row + static_cast<int64_t>(h) * head_dim;
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(position) * inv_freq[i];
      const float c = std::cos(angle) * concentration, s = std::sin(angle) * concentration;
      const float a = v[i], b = v[i + half];
      v[i] = a * c - b * s;
      v[i + half] = b * c + a * s;
    }
  }
}

void swiglu(const float* u, int64_t intermediate, float limit, float* act) {
  for (int64_t j = 0; j < intermediate; ++j) {
    const float gate = std::min(u[2 * j], limit);
    const float up = std::max(-limit, std::min(u[2 * j + 1], limit));
    act[j] = gate / (1.0f + std::exp(-1.702f * gate)) * (up + 1.0f);
  }
}

void topk_softmax(const float* logits, int64_t n, int k, int32_t* ids, float* weights) {
  std::vector<bool> taken(static_cast<size_t>(n), false);
  for (int j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < n; ++e)
      if (!taken[static_cast<size_t>(e)] && (best < 0 || logits[e] > logits[best])) best = e;
    taken[static_cast<size_t>(best)] = true;
    ids[j] = static_cast<int32_t>(best);
  }
  float max = logits[ids[0]], sum = 0;
  for (int j = 0; j < k; ++j) sum += (weights[j] = std::exp(logits[ids[j]] - max));
  for (int j = 0; j < k; ++j) weights[j] /= sum;
}

double log_normalizer(const float* logits, int64_t n) {
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) max_logit = std::max(max_logit, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i]) - max_logit);
  return static_cast<double>(max_logit) + std::log(sum);
}

void top_logprobs(const float* logits, int64_t n, int k, int32_t* ids, float* logprobs) {
  // Selection by a small sorted list: k is at most 64, so one pass with insertion is cheap.
  std::vector<std::pair<float, int32_t>> best;
  best.reserve(static_cast<size_t>(k) + 1);
  for (int64_t i = 0; i < n; ++i) {
    const float v = logits[i];
    if (static_cast<int>(best.size()) == k && !(v > best.back().first)) continue;
    auto at = std::find_if(best.begin(), best.end(), [v](const auto& e) { return v > e.first; });
    best.insert(at, {v, static_cast<int32_t>(i)});
    if (static_cast<int>(best.size()) > k) best.pop_back();
  }
  const double log_z = log_normalizer(logits, n);
  for (int j = 0; j < k; ++j) {
    const bool have = j < static_cast<int>(best.size());
    ids[j] = have ? best[static_cast<size_t>(j)].second : -1;
    logprobs[j] = have ? static_cast<float>(best[static_cast<size_t>(j)].first - log_z)
                       : -std::numeric_limits<float>::infinity();
  }
}

void token_logprobs(const float* logits, int64_t n, const int32_t* ids, int64_t m, float* logprobs) {
  const double log_z = log_normalizer(logits, n);
  for (int64_t j = 0; j < m; ++j)
    logprobs[j] = ids[j] >= 0 && ids[j] < n ? static_cast<float>(logits[ids[j]] - log_z)
                                            : -std::numeric_limits<float>::infinity();
}

}  // namespace arbiter::cpu::ref
