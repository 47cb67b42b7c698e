// Plain scalar versions of every CPU kernel: the definition the optimized kernels are tested
// against. Single-threaded, no intrinsics, written to read like the model math in DESIGN.md §1.
#pragma once

#include <cstdint>

namespace arbiter::cpu::ref {

// FP4 E2M1 code -> value, and E8M0 scale byte -> 2^(s-127).
float fp4_value(uint8_t code);
float e8m0_value(uint8_t scale);

void rms_norm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* out);
// y[r, o] = sum_i x[r, i] * bf16(w[o, i]) + bias[o]; bias may be null.
void linear_bf16(const float* x, int64_t rows, int64_t in, const uint16_t* w, int64_t out_features,
                 const uint16_t* bias, float* y);
// y[o] = sum_i x[i] * W[o, i] for an MXFP4 matrix [out, in] (blocks [out, in/32, 16], scales [out, in/32]).
void mxfp4_matvec(const float* x, int64_t in, const uint8_t* blocks, const uint8_t* scales, int64_t out_features,
                  float* y);
// The same with the activations quantized per 32-block to int8 (the opt-in quantized mode of the
// one-row kernels): d = max|x| / 127, q = round(x / d) clamped to [-127, 127]; each block's integer
// sum of q times the doubled code values, times 2^(s-127) * d / 2, added up in fp32 block by block.
void mxfp4_matvec_q8(const float* x, int64_t in, const uint8_t* blocks, const uint8_t* scales, int64_t out_features,
                     float* y);
// Rotate-half YaRN RoPE of `heads` heads of one row at `position`.
void rope_row(float* row, int heads, int head_dim, int64_t position, const float* inv_freq, float concentration);
// Clamped SwiGLU over interleaved gate/up pairs: act[j] from u[2j], u[2j+1].
void swiglu(const float* u, int64_t intermediate, float limit, float* act);
// Top-k (ties: lowest index) and softmax over the chosen logits.
void topk_softmax(const float* logits, int64_t n, int k, int32_t* ids, float* weights);
// The k largest of logits[0..n) (largest first, lowest id first on ties) and their log-probabilities
// under the softmax of all n (computed in double).
void top_logprobs(const float* logits, int64_t n, int k, int32_t* ids, float* logprobs);
// log(sum_i exp(logits[i])), as top_logprobs computes it (max in float, the sum in double), so that
// logits[i] - log_normalizer gives top_logprobs' values bit for bit.
double log_normalizer(const float* logits, int64_t n);
// Log-probabilities of the m tokens `ids` under the softmax of logits[0..n) (the normalizer as
// top_logprobs computes it); ids outside [0, n) get -inf.
void token_logprobs(const float* logits, int64_t n, const int32_t* ids, int64_t m, float* logprobs);

}  // namespace arbiter::cpu::ref
