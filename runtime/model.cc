#include "runtime/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <numbers>
#include <set>
#include <stdexcept>

#include "kernels/device_arena.h"
#include "parallel/communicator.h"
#include "parallel/expert_placement.h"
#include "parallel/moe_dispatch.h"

namespace arbiter {
namespace {

bool expert_parallel(const ModelOptions& o) { return o.comm && o.comm->size() > 1; }
MoeDispatcher::Path dispatch_path(const ModelOptions& o) {
  return o.ep_host_staged ? MoeDispatcher::Path::kHostStaged : MoeDispatcher::Path::kBackendOps;
}

std::shared_ptr<const ExpertPlacement> placement_for(const ModelConfig& c, const ModelOptions& o) {
  auto p = o.placement ? o.placement
                       : std::make_shared<const ExpertPlacement>(
                             ExpertPlacement::contiguous(c.num_local_experts, o.comm->size()));
  p->check_fits(c.num_local_experts, c.num_hidden_layers, o.comm->size());
  return p;
}

// What this rank loads: a contiguous range of every layer's experts, or per layer a set.
struct LocalExperts {
  ExpertRange range;
  LayerExperts sets;  // empty: range
  int most() const {  // the most experts of one layer
    if (sets.empty()) return range.count;
    size_t m = 0;
    for (const auto& s : sets) m = std::max(m, s.size());
    return static_cast<int>(m);
  }
};

// The experts this rank loads. Under expert parallelism this is collective: the ranks first check
// they agree on config, weight files (names, dtypes, shapes, file sizes) and placement, so ranks
// started with different models fail here with a clear error instead of computing garbage.
LocalExperts local_experts(const ModelConfig& c, const Checkpoint& ck, const ModelOptions& o) {
  if (!expert_parallel(o)) {
    LocalExperts one{o.experts, {}};
    if (one.range.count < 0) one.range.count = c.num_local_experts - one.range.first;
    return one;
  }
  const auto placement = placement_for(c, o);
  uint64_t h = fnv1a64(c.to_json());
  std::set<std::string> files;
  for (const std::string& name : ck.names()) {
    const TensorInfo& t = ck.info(name);
    h = fnv1a64(name + " " + dtype_name(t.dtype) + t.shape.str() + " " + std::to_string(t.end - t.begin), h);
    files.insert(ck.file_of(name));
  }
  for (const std::string& f : files)
    h = fnv1a64(std::filesystem::path(f).filename().string() + " " + std::to_string(std::filesystem::file_size(f)), h);
  h = fnv1a64(placement->to_text(), h);
  check_same_fingerprint(*o.comm, h, "the model (config.json, weight files, expert placement)");
  const int me = o.comm->rank();
  LocalExperts mine;
  for (int l = 0; l < c.num_hidden_layers; ++l) mine.sets.push_back(placement->experts_of(l, me));
  // One run in every layer: the range form (slices of the checkpoint, as before).
  const auto& first = mine.sets[0];
  const bool same_run = std::all_of(mine.sets.begin(), mine.sets.end(), [&](const std::vector<int>& s) {
    return s == first && s.back() - s.front() + 1 == static_cast<int>(s.size());
  });
  if (same_run) {
    mine.range = {first.front(), static_cast<int>(first.size())};
    mine.sets.clear();
  }
  return mine;
}

}  // namespace

RopeParams yarn_rope_params(const ModelConfig& c) {
  const int half = c.head_dim / 2;
  const double d = c.head_dim, base = c.rope_theta, factor = c.rope_factor;
  const double L0 = c.rope_original_max_position;
  auto correction_dim = [&](double rotations) {
    return d * std::log(L0 / (rotations * 2 * std::numbers::pi)) / (2 * std::log(base));
  };
  double low = correction_dim(c.rope_beta_fast), high = correction_dim(c.rope_beta_slow);
  if (c.rope_truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, d - 1);
  if (high == low) high += 0.001;
  RopeParams p;
  p.inv_freq.resize(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) {
    const double freq = std::pow(base, 2.0 * i / d);
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    p.inv_freq[static_cast<size_t>(i)] = static_cast<float>((1 - ramp) / freq + ramp / (factor * freq));
  }
  p.concentration = factor > 1 ? static_cast<float>(0.1 * std::log(factor) + 1.0) : 1.0f;
  return p;
}

namespace {
// Positions a sequence can reach: one KV slot each in a full-attention layer's pool (later ones, in a
// model with sliding layers only, have their cos/sin computed per step).
int64_t rope_table_positions(const ModelConfig& config, const ModelOptions& options) {
  const int64_t pool = static_cast<int64_t>(options.kv.full_blocks) * options.kv.block_size;
  return std::max<int64_t>(1, std::min<int64_t>(pool, config.max_position_embeddings));
}
}  // namespace

std::vector<Model::BufferSpec> Model::buffer_specs(const ModelConfig& config, const ModelOptions& options, DType act) {
  const int64_t R = options.max_step_rows, L = options.max_logit_rows;
  if (R <= 0 || L <= 0) throw std::invalid_argument("Model: max_step_rows and max_logit_rows must be positive");
  const int64_t H = config.hidden_size, D = config.head_dim;
  const int64_t Q = config.num_attention_heads * D, KV = config.num_key_value_heads * D;
  const int64_t E = config.num_local_experts, K = config.num_experts_per_tok;
  return {
      {&Model::x_, act, {R, H}},
      {&Model::normed_, act, {R, H}},
      {&Model::q_, act, {R, Q}},
      {&Model::k_, act, {R, KV}},
      {&Model::v_, act, {R, KV}},
      {&Model::attn_, act, {R, Q}},
      {&Model::delta_, act, {R, H}},
      {&Model::router_logits_, DType::kF32, {R, E}},
      {&Model::expert_ids_, DType::kI32, {R, K}},
      {&Model::expert_weights_, DType::kF32, {R, K}},
      {&Model::final_rows_, act, {L, H}},
      {&Model::logits_, DType::kF32, {L, static_cast<int64_t>(config.vocab_size)}},
      {&Model::argmax_, DType::kI32, {L}},
      {&Model::top_ids_, DType::kI32, {L, kMaxTopLogprobs}},
      {&Model::top_logprobs_, DType::kF32, {L, kMaxTopLogprobs}},
      {&Model::candidate_ids_, DType::kI32, {L, kMaxCandidateTokens}},
      {&Model::candidate_logprobs_, DType::kF32, {L, kMaxCandidateTokens}},
      {&Model::rope_table_, DType::kF32, {rope_table_positions(config, options), D}},
      {&Model::expert_load_, DType::kI32, {static_cast<int64_t>(config.num_hidden_layers), E}},
  };
}

// Everything the Model allocates on the backend, summed from the same lists the allocations use
// (weights_reserve_bytes, KvCache::reserve_bytes, buffer_specs, MoeDispatcher::reserve_bytes), is
// announced with one Backend::reserve before the first of them; then the weights are loaded.
ModelWeights Model::reserve_and_load_weights(const ModelConfig& config, const Checkpoint& checkpoint, Backend& backend,
                                             const ModelOptions& options) {
  const LocalExperts experts = local_experts(config, checkpoint, options);
  size_t bytes = experts.sets.empty() ? weights_reserve_bytes(config, checkpoint, experts.range)
                                      : weights_reserve_bytes(config, checkpoint, experts.sets);
  bytes += KvCache::reserve_bytes(backend.kv_dtype(), config, options.kv);
  for (const BufferSpec& b : buffer_specs(config, options, backend.activation_dtype()))
    bytes += device_arena_bytes(static_cast<size_t>(b.shape.elements()) * dtype_size(b.dtype));
  const int ranks = expert_parallel(options) ? options.comm->size() : 1;
  if (expert_parallel(options))
    bytes += MoeDispatcher::reserve_bytes(ranks, options.max_step_rows, config.hidden_size,
                                          config.num_experts_per_tok, backend.activation_dtype(),
                                          config.num_local_experts, dispatch_path(options),
                                          placement_for(config, options)->num_layers(), options.ep_capacity_limit);
  MoeLimits moe;
  // Under expert parallelism this rank's experts may get a row from every rank.
  moe.max_rows = static_cast<int64_t>(options.max_step_rows) * ranks;
  moe.k = config.num_experts_per_tok;
  moe.experts = experts.most();
  moe.hidden = config.hidden_size;
  moe.intermediate = config.intermediate_size;
  backend.reserve(bytes, moe);
  return experts.sets.empty() ? load_weights(config, checkpoint, backend, experts.range)
                              : load_weights(config, checkpoint, backend, experts.sets);
}

Model::Model(const ModelConfig& config, const Checkpoint& checkpoint, Backend& backend, const ModelOptions& options)
    : config_(config),
      options_(options),
      backend_(backend),
      weights_(reserve_and_load_weights(config, checkpoint, backend, options)),
      kv_(backend, config, options.kv),
      rope_(yarn_rope_params(config)) {
  for (const BufferSpec& b : buffer_specs(config, options, backend.activation_dtype())) {
    buffers_.push_back(backend.allocate(static_cast<size_t>(b.shape.elements()) * dtype_size(b.dtype)));
    this->*b.member = buffers_.back().view(b.dtype, b.shape);
  }
  // RoPE's cos/sin precomputed once for every position the full-attention KV pool can hold.
  const std::vector<float> table = rope_table(rope_, rope_table_.rows());
  backend.upload(table.data(), rope_table_);
  rope_.table = rope_table_;
  backend.fill_zero(expert_load_);
  if (expert_parallel(options))
    dispatcher_ = std::make_unique<MoeDispatcher>(*options.comm, *placement_for(config, options), backend,
                                                  config.hidden_size, config.num_experts_per_tok,
                                                  options.max_step_rows, dispatch_path(options), options.ep_capacity_limit);
}

// Recorded steps (Backend::run_step) point at this model's buffers.
Model::~Model() { backend_.forget_steps(this); }

void Model::run_empty_step() {
  for (size_t i = 0; i < weights_.layers.size(); ++i)
    dispatcher_->moe(normed_.slice_rows(0, 0), expert_ids_.slice_rows(0, 0), expert_weights_.slice_rows(0, 0),
                     weights_.layers[i].experts, config_.swiglu_limit, delta_.slice_rows(0, 0), static_cast<int>(i));
  dispatcher_->finish_step();
}

void Model::serve_peers() {
  if (!dispatcher_) return;
  for (;;) {
    const auto start = std::chrono::steady_clock::now();
    const bool more = dispatcher_->begin_step(false, 0);
    if (profiling_) dispatcher_->add_wait(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    if (!more) return;
    run_empty_step();
  }
}

Tensor Model::load_row(size_t layer) const {
  if (!options_.count_expert_load) return Tensor{};
  return expert_load_.slice_rows(static_cast<int64_t>(layer), 1).reshaped({config_.num_local_experts});
}

std::vector<std::vector<int64_t>> Model::expert_load() {
  if (!options_.count_expert_load) return {};
  std::vector<int32_t> host(static_cast<size_t>(expert_load_.elements()));
  backend_.download(expert_load_, host.data());
  const size_t E = static_cast<size_t>(config_.num_local_experts);
  std::vector<std::vector<int64_t>> out(weights_.layers.size());
  for (size_t l = 0; l < out.size(); ++l) out[l].assign(host.begin() + static_cast<int64_t>(l * E), host.begin() + static_cast<int64_t>((l + 1) * E));
  return out;
}

void Model::reset_expert_load() { backend_.fill_zero(expert_load_); }

void Model::set_profiling(bool on) {
  profiling_ = on;
  if (dispatcher_) dispatcher_->set_profiling(on);
}

uint64_t Model::bytes_sent_to_peers() const { return dispatcher_ ? dispatcher_->traffic().to_peers : 0; }

ForwardPhaseTimes Model::phase_times() const {
  ForwardPhaseTimes t = times_;
  if (dispatcher_) {
    const MoePhaseTimes& m = dispatcher_->phase_times();
    t.dispatch = m.dispatch;
    t.experts = m.experts;
    t.combine = m.combine;
    t.wait = m.wait;
  }
  return t;
}

void Model::reset_phase_times() {
  times_ = {};
  if (dispatcher_) dispatcher_->reset_phase_times();
}

void Model::run_timed(const StepLayout& layout, const std::vector<std::vector<int32_t>>* restricted) {
  if (!profiling_) return run(layout, restricted);
  const auto start = std::chrono::steady_clock::now();
  run(layout, restricted);
  backend_.synchronize();
  times_.forward += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ++times_.steps;
}

void Model::run(const StepLayout& layout, const std::vector<std::vector<int32_t>>* restricted) {
  const int64_t rows = static_cast<int64_t>(layout.tokens.size());
  const int64_t logit_rows = static_cast<int64_t>(layout.logit_rows.size());
  if (rows < (dispatcher_ ? 0 : 1) || rows > options_.max_step_rows)
    throw std::invalid_argument("forward: step has " + std::to_string(rows) + " rows (1.." +
                                std::to_string(options_.max_step_rows) + " allowed)");
  if (logit_rows > options_.max_logit_rows)
    throw std::invalid_argument("forward: " + std::to_string(logit_rows) + " logit rows requested (at most " +
                                std::to_string(options_.max_logit_rows) + ")");
  if (layout.block_size != kv_.options().block_size)
    throw std::invalid_argument("forward: step block size differs from the KV cache's");
  for (int32_t t : layout.tokens)
    if (t < 0 || t >= config_.vocab_size)
      throw std::out_of_range("forward: token id " + std::to_string(t) + " outside the vocabulary of " +
                              std::to_string(config_.vocab_size));
  for (int32_t r : layout.logit_rows)
    if (r < 0 || r >= rows) throw std::out_of_range("forward: logit row outside the step");
  if (dispatcher_) {
    const auto start = std::chrono::steady_clock::now();
    dispatcher_->begin_step(true, rows);
    if (profiling_) dispatcher_->add_wait(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    if (rows == 0) return run_empty_step();
  }
  // Under expert parallelism a recorded step's exchanges have the step's capacity in their sizes,
  // so the capacity is part of the step's shape.
  StepLayout with_capacity;
  if (dispatcher_) {
    with_capacity = layout;
    with_capacity.exchange_capacity = static_cast<int32_t>(dispatcher_->step_capacity());
  }
  const auto step = backend_.prepare_step(dispatcher_ ? with_capacity : layout);
  const ModelConfig& c = config_;
  // Restricted lm_head: the candidates as one [logit_rows, m] table (short rows padded with -1).
  Tensor restricted_ids, restricted_logits;
  if (restricted && logit_rows > 0) {
    size_t widest = 0;
    for (const auto& r : *restricted) widest = std::max(widest, r.size());
    const int64_t m = static_cast<int64_t>(widest);
    std::vector<int32_t> table(static_cast<size_t>(logit_rows * m), -1);
    for (int64_t r = 0; r < logit_rows; ++r)
      std::copy((*restricted)[static_cast<size_t>(r)].begin(), (*restricted)[static_cast<size_t>(r)].end(), table.begin() + r * m);
    restricted_ids = candidate_ids_.reshaped({candidate_ids_.elements()}).slice_rows(0, logit_rows * m).reshaped({logit_rows, m});
    restricted_logits =
        candidate_logprobs_.reshaped({candidate_logprobs_.elements()}).slice_rows(0, logit_rows * m).reshaped({logit_rows, m});
    backend_.upload(table.data(), restricted_ids);
  }
  Tensor x = x_.slice_rows(0, rows), normed = normed_.slice_rows(0, rows), q = q_.slice_rows(0, rows),
         k = k_.slice_rows(0, rows), v = v_.slice_rows(0, rows), attn = attn_.slice_rows(0, rows),
         delta = delta_.slice_rows(0, rows), router = router_logits_.slice_rows(0, rows),
         ids = expert_ids_.slice_rows(0, rows), weights = expert_weights_.slice_rows(0, rows);

  // The step's operations. A device backend may record them once per step shape and replay the
  // recording (Backend::run_step); under expert parallelism only when every layer's exchange is a
  // fixed-capacity one that waits on nothing (MoeDispatcher::step_recordable).
  auto body = [&] {
    backend_.embedding(weights_.embed_tokens, *step, x);
    AttentionParams ap;
    ap.num_q_heads = c.num_attention_heads;
    ap.num_kv_heads = c.num_key_value_heads;
    ap.head_dim = c.head_dim;
    ap.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    for (size_t i = 0; i < weights_.layers.size(); ++i) {
      const LayerWeights& l = weights_.layers[i];
      // Attention block. The previous layer's MoE output is still in delta: fuse its residual add.
      if (i == 0) backend_.rms_norm(x, l.input_norm, c.rms_norm_eps, normed);
      else backend_.add_rms_norm(x, delta, l.input_norm, c.rms_norm_eps, normed);
      const LinearTerm qkv[] = {{l.q_weight, l.q_bias, q}, {l.k_weight, l.k_bias, k}, {l.v_weight, l.v_bias, v}};
      backend_.linear_group_rope(normed, qkv, c.head_dim, rope_, *step);
      ap.window = l.sliding ? c.sliding_window : 0;
      const KvLayer& cache = kv_.layer(static_cast<int>(i));
      backend_.attention_store(q, k, v, cache, l.sinks, ap, *step, attn);
      // The output projection and the MoE block's norm.
      backend_.linear_add_rms_norm(attn, l.o_weight, l.o_bias, delta, x, l.post_attention_norm, c.rms_norm_eps, normed);
      backend_.route(normed, l.router_weight, l.router_bias, c.num_experts_per_tok, router, ids, weights);
      if (dispatcher_) {
        dispatcher_->moe(normed, ids, weights, l.experts, c.swiglu_limit, delta, static_cast<int>(i), load_row(i));
      } else {
        if (options_.count_expert_load) backend_.count_expert_load(ids, load_row(i));
        // Profiling on one rank times the experts too, where the backend runs them synchronously
        // (host memory); a device backend's step may be a recording, which must not synchronize.
        const bool timed = profiling_ && backend_.host_memory();
        const auto start = timed ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
        backend_.moe_experts(normed, ids, weights, l.experts, c.swiglu_limit, delta);
        if (timed) times_.experts += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
    }
    backend_.add(x, delta);
    if (logit_rows == 0) return;
    const Tensor gathered = final_rows_.slice_rows(0, logit_rows);
    backend_.gather_logit_rows(x, *step, gathered);
    backend_.rms_norm(gathered, weights_.final_norm, c.rms_norm_eps, gathered);
    if (restricted) backend_.linear_rows(gathered, weights_.lm_head, restricted_ids, restricted_logits);
    else backend_.linear(gathered, weights_.lm_head, Tensor{}, logits_.slice_rows(0, logit_rows));
  };
  // A restricted step runs directly: a recording is keyed by the step's shape, which does not say
  // which lm_head ran.
  if (restricted || (dispatcher_ && !dispatcher_->step_recordable())) body();
  else backend_.run_step(this, *step, body);
  if (dispatcher_) dispatcher_->finish_step();
}

std::vector<std::vector<float>> Model::forward_candidates(const StepLayout& layout,
                                                          const std::vector<std::vector<int32_t>>& candidates) {
  if (candidates.size() != layout.logit_rows.size())
    throw std::invalid_argument("forward_candidates: " + std::to_string(candidates.size()) + " candidate lists for " +
                                std::to_string(layout.logit_rows.size()) + " logit rows");
  size_t widest = 0;
  for (const auto& c : candidates) {
    if (c.empty() || c.size() > static_cast<size_t>(kMaxCandidateTokens))
      throw std::invalid_argument("forward_candidates: every row needs 1.." + std::to_string(kMaxCandidateTokens) +
                                  " candidate tokens");
    for (const int32_t t : c)
      if (t < 0 || t >= config_.vocab_size) throw std::out_of_range("forward_candidates: candidate outside the vocabulary");
    widest = std::max(widest, c.size());
  }
  run_timed(layout, &candidates);
  const int64_t n = static_cast<int64_t>(candidates.size()), m = static_cast<int64_t>(widest);
  std::vector<std::vector<float>> out(static_cast<size_t>(n));
  if (n == 0) return out;
  std::vector<float> host(static_cast<size_t>(n * m));
  backend_.download(candidate_logprobs_.reshaped({candidate_logprobs_.elements()}).slice_rows(0, n * m), host.data());
  for (int64_t r = 0; r < n; ++r)
    out[static_cast<size_t>(r)].assign(host.begin() + r * m,
                                       host.begin() + r * m + static_cast<int64_t>(candidates[static_cast<size_t>(r)].size()));
  return out;
}

std::vector<float> Model::forward(const StepLayout& layout) {
  run_timed(layout, nullptr);
  const Tensor out = logits_.slice_rows(0, static_cast<int64_t>(layout.logit_rows.size()));
  std::vector<float> host(static_cast<size_t>(out.elements()));
  if (!host.empty()) backend_.download(out, host.data());
  return host;
}

std::vector<int32_t> Model::forward_argmax(const StepLayout& layout) {
  run_timed(layout, nullptr);
  const int64_t n = static_cast<int64_t>(layout.logit_rows.size());
  std::vector<int32_t> host(static_cast<size_t>(n));
  if (n == 0) return host;
  backend_.argmax(logits_.slice_rows(0, n), argmax_.slice_rows(0, n));
  backend_.download(argmax_.slice_rows(0, n), host.data());
  return host;
}

std::vector<float> Model::score_table(const std::vector<int32_t>& table, int64_t n, int64_t m) {
  const Tensor cids = candidate_ids_.reshaped({candidate_ids_.elements()}).slice_rows(0, n * m).reshaped({n, m}),
               clp = candidate_logprobs_.reshaped({candidate_logprobs_.elements()}).slice_rows(0, n * m).reshaped({n, m});
  backend_.upload(table.data(), cids);
  backend_.token_logprobs(logits_.slice_rows(0, n), cids, clp);
  std::vector<float> scored(static_cast<size_t>(n * m));
  backend_.download(clp, scored.data());
  return scored;
}

std::vector<float> Model::step_logprobs(std::span<const int32_t> rows, std::span<const int32_t> tokens) {
  std::vector<float> out(tokens.size());
  if (tokens.empty()) return out;
  if (rows.size() != tokens.size()) throw std::invalid_argument("step_logprobs: rows and tokens differ in length");
  int32_t last = 0;
  for (const int32_t r : rows) {
    if (r < 0 || r >= options_.max_logit_rows) throw std::invalid_argument("step_logprobs: row outside the step's logit rows");
    last = std::max(last, r);
  }
  // The entries as a [rows, m] table of token ids (-1 padded), scored by Backend::token_logprobs in
  // rounds of at most kMaxCandidateTokens columns (the candidate buffers' width).
  const int64_t n = int64_t{last} + 1;
  std::vector<std::vector<size_t>> of_row(static_cast<size_t>(n));
  for (size_t i = 0; i < tokens.size(); ++i) of_row[static_cast<size_t>(rows[i])].push_back(i);
  size_t widest = 0;
  for (const auto& e : of_row) widest = std::max(widest, e.size());
  for (size_t from = 0; from < widest; from += static_cast<size_t>(kMaxCandidateTokens)) {
    const int64_t m = static_cast<int64_t>(std::min(widest - from, static_cast<size_t>(kMaxCandidateTokens)));
    std::vector<int32_t> table(static_cast<size_t>(n * m), -1);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < m && from + static_cast<size_t>(j) < of_row[static_cast<size_t>(r)].size(); ++j)
        table[static_cast<size_t>(r * m + j)] = tokens[of_row[static_cast<size_t>(r)][from + static_cast<size_t>(j)]];
    const std::vector<float> scored = score_table(table, n, m);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < m && from + static_cast<size_t>(j) < of_row[static_cast<size_t>(r)].size(); ++j)
        out[of_row[static_cast<size_t>(r)][from + static_cast<size_t>(j)]] = scored[static_cast<size_t>(r * m + j)];
  }
  return out;
}

TopLogprobs Model::forward_top(const StepLayout& layout, int k) { return forward_top(layout, k, {}); }

TopLogprobs Model::forward_top(const StepLayout& layout, int k, const std::vector<std::vector<int32_t>>& candidates) {
  if (!candidates.empty() && candidates.size() != layout.logit_rows.size())
    throw std::invalid_argument("forward_top: " + std::to_string(candidates.size()) + " candidate lists for " +
                                std::to_string(layout.logit_rows.size()) + " logit rows");
  size_t widest = 0;
  for (const auto& c : candidates) widest = std::max(widest, c.size());
  if (widest > static_cast<size_t>(kMaxCandidateTokens))
    throw std::invalid_argument("forward_top: more than " + std::to_string(kMaxCandidateTokens) + " candidate tokens in a row");
  if (k < 1 || k > kMaxTopLogprobs || k > config_.vocab_size)
    throw std::invalid_argument("forward_top: k = " + std::to_string(k) + " outside 1.." + std::to_string(kMaxTopLogprobs));
  run_timed(layout, nullptr);
  TopLogprobs top;
  top.k = k;
  const int64_t n = static_cast<int64_t>(layout.logit_rows.size());
  if (n == 0) return top;
  // The first n * k entries of the [max_logit_rows, kMaxTopLogprobs] buffers, viewed as [n, k].
  const Tensor ids = top_ids_.reshaped({top_ids_.elements()}).slice_rows(0, n * k).reshaped({n, k}),
               lp = top_logprobs_.reshaped({top_logprobs_.elements()}).slice_rows(0, n * k).reshaped({n, k});
  backend_.top_logprobs(logits_.slice_rows(0, n), k, ids, lp);
  top.ids.resize(static_cast<size_t>(n * k));
  top.logprobs.resize(static_cast<size_t>(n * k));
  backend_.download(ids, top.ids.data());
  backend_.download(lp, top.logprobs.data());
  if (widest == 0) return top;
  // The candidates as one [n, m] table (rows with fewer padded with -1), scored in one call.
  const int64_t m = static_cast<int64_t>(widest);
  std::vector<int32_t> table(static_cast<size_t>(n * m), -1);
  for (int64_t r = 0; r < n; ++r)
    std::copy(candidates[static_cast<size_t>(r)].begin(), candidates[static_cast<size_t>(r)].end(),
              table.begin() + r * m);
  const std::vector<float> scored = score_table(table, n, m);
  top.candidate_logprobs.resize(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r)
    top.candidate_logprobs[static_cast<size_t>(r)].assign(
        scored.begin() + r * m, scored.begin() + r * m + static_cast<int64_t>(candidates[static_cast<size_t>(r)].size()));
  return top;
}

}  // namespace arbiter
