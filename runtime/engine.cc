#include "runtime/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "parallel/communicator.h"

namespace arbiter {
namespace {

bool expert_parallel(const Model& model) {
  const Communicator* comm = model.options().comm;
  return comm != nullptr && comm->size() > 1;
}

int model_rank(const Model& model) {
  const Communicator* comm = model.options().comm;
  return comm != nullptr ? comm->rank() : 0;
}

// SplitMix64's finalizer: a bijective 64-bit mix, good enough to turn a counter into random bits.
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A uniform draw in [0, 1) that depends only on (seed, position).
double uniform_at(uint64_t seed, int64_t position) {
  const uint64_t bits = splitmix64(splitmix64(seed) ^ static_cast<uint64_t>(position));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// The step a valid plan becomes, with the plan's sampled sequences in logit-row order.
struct PlannedStep {
  StepLayout layout;
  std::vector<const proto::SequenceWork*> sampled;
};

[[noreturn]] void reject(const proto::SequenceWork& work, const std::string& what) {
  throw std::invalid_argument("step plan: sequence " + std::to_string(work.sequence_id()) + ": " + what);
}

// Checks the whole plan against the model and builds the step. Throws std::invalid_argument naming
// the first problem; nothing has touched the cache then.
PlannedStep plan_step(const Model& model, const proto::StepPlan& plan, int num_blocks) {
  if (plan.shutdown()) throw std::invalid_argument("step plan: a shutdown plan runs no step");
  const ModelOptions& options = model.options();
  const int block_size = options.kv.block_size;
  const int vocab = model.config().vocab_size;
  PlannedStep step;
  step.layout.block_size = block_size;
  std::unordered_set<uint64_t> ids;
  std::unordered_map<int32_t, uint64_t> writer_of_block;  // blocks this step writes, and who writes them
  int64_t rows = 0;
  for (const proto::SequenceWork& work : plan.sequences()) {
    if (!ids.insert(work.sequence_id()).second) reject(work, "appears twice in the plan");
    const int64_t count = work.tokens_size();
    if (count == 0) reject(work, "no tokens");
    for (int32_t t : work.tokens())
      if (t < 0 || t >= vocab)
        reject(work, "token id " + std::to_string(t) + " outside the vocabulary (0.." + std::to_string(vocab - 1) + ")");
    if (work.num_cached() < 0) reject(work, "num_cached " + std::to_string(work.num_cached()) + " is negative");
    const int64_t end = static_cast<int64_t>(work.num_cached()) + count;
    if (static_cast<int64_t>(work.blocks_size()) * block_size < end)
      reject(work, "block table of " + std::to_string(work.blocks_size()) + " blocks does not cover " +
                       std::to_string(end) + " positions (block size " + std::to_string(block_size) + ")");
    for (int32_t b : work.blocks())
      if (b < 0 || b >= num_blocks)
        reject(work, "block id " + std::to_string(b) + " outside the KV pool (0.." + std::to_string(num_blocks - 1) + ")");
    for (int64_t i = work.num_cached() / block_size; i <= (end - 1) / block_size; ++i) {
      const int32_t b = work.blocks(static_cast<int>(i));
      const auto [at, fresh] = writer_of_block.emplace(b, work.sequence_id());
      if (!fresh && at->second != work.sequence_id())
        reject(work, "writes KV block " + std::to_string(b) + ", which sequence " + std::to_string(at->second) +
                         " also writes in this step");
    }
    if (work.top_logprobs() < 0 || work.top_logprobs() > Engine::kMaxReportedLogprobs)
      reject(work, "top_logprobs " + std::to_string(work.top_logprobs()) + " outside 0.." +
                       std::to_string(Engine::kMaxReportedLogprobs));
    if (work.candidate_tokens_size() > Model::kMaxCandidateTokens)
      reject(work, std::to_string(work.candidate_tokens_size()) + " candidate tokens (at most " +
                       std::to_string(Model::kMaxCandidateTokens) + ")");
    for (int32_t t : work.candidate_tokens())
      if (t < 0 || t >= vocab)
        reject(work, "candidate token id " + std::to_string(t) + " outside the vocabulary (0.." + std::to_string(vocab - 1) + ")");
    if (work.candidates_only() && work.candidate_tokens_size() == 0) reject(work, "candidates_only without candidate tokens");
    const float temperature = work.sampling().temperature(), top_p = work.sampling().top_p();
    if (!(temperature >= 0) || !std::isfinite(temperature))
      reject(work, "temperature " + std::to_string(temperature) + " is not a finite number >= 0");
    if (!(top_p >= 0 && top_p <= 1)) reject(work, "top_p " + std::to_string(top_p) + " outside [0, 1]");
    for (int32_t t : work.allowed_tokens())
      if (t < 0 || t >= vocab)
        reject(work, "allowed token id " + std::to_string(t) + " outside the vocabulary (0.." + std::to_string(vocab - 1) + ")");
    for (int32_t t : work.refused_tokens())
      if (t < 0 || t >= vocab)
        reject(work, "refused token id " + std::to_string(t) + " outside the vocabulary (0.." + std::to_string(vocab - 1) + ")");
    if (work.refused_tokens_size() > 0 && work.allowed_tokens_size() == 0)
      reject(work, "refused tokens without allowed tokens to fall back on");

    SequenceStep seq;
    seq.first_row = static_cast<int32_t>(rows);
    seq.num_new = static_cast<int32_t>(count);
    seq.num_cached = work.num_cached();
    seq.full_blocks.assign(work.blocks().begin(), work.blocks().end());
    seq.sliding_blocks = seq.full_blocks;
    rows += count;
    if (rows > options.max_step_rows)
      throw std::invalid_argument("step plan: more than " + std::to_string(options.max_step_rows) +
                                  " tokens in one step (the model's max_step_rows)");
    if (work.sample()) {
      step.layout.logit_rows.push_back(static_cast<int32_t>(rows - 1));
      step.sampled.push_back(&work);
    }
    step.layout.tokens.insert(step.layout.tokens.end(), work.tokens().begin(), work.tokens().end());
    step.layout.sequences.push_back(std::move(seq));
  }
  if (static_cast<int64_t>(step.sampled.size()) > options.max_logit_rows)
    throw std::invalid_argument("step plan: " + std::to_string(step.sampled.size()) +
                                " sequences sample in one step (at most " + std::to_string(options.max_logit_rows) +
                                ", the model's max_logit_rows)");
  return step;
}

// Candidates the step needs per sampled row: enough for every report and, when any sequence samples
// with a temperature, the full candidate list.
int candidates_for(const PlannedStep& step, int vocab) {
  int k = 1;
  for (const proto::SequenceWork* work : step.sampled) {
    k = std::max(k, work->top_logprobs());
    // Sampling, and a mask given by its refused tokens, look at the most likely candidates.
    if (work->sampling().temperature() > 0 || work->refused_tokens_size() > 0) k = std::max(k, Engine::kSampleCandidates);
  }
  return std::min(k, vocab);
}

}  // namespace

int32_t sample_token(const proto::Sampling& sampling, int64_t position, const int32_t* top_ids,
                     const float* top_logprobs, int count) {
  if (count < 1) throw std::invalid_argument("sample_token: no candidates");
  const double temperature = sampling.temperature();
  if (!(temperature > 0)) return top_ids[0];
  // Weights relative to the most likely candidate (top_logprobs[0]), so nothing overflows.
  std::vector<double> weight(static_cast<size_t>(count), 0.0);
  double total = 0;
  for (int j = 0; j < count; ++j) {
    if (top_ids[j] < 0 || !std::isfinite(top_logprobs[j])) continue;
    const double w = std::exp((static_cast<double>(top_logprobs[j]) - top_logprobs[0]) / temperature);
    weight[static_cast<size_t>(j)] = std::isfinite(w) ? w : 0.0;
    total += weight[static_cast<size_t>(j)];
  }
  if (!(total > 0)) return top_ids[0];
  int kept = count;
  double kept_mass = total;
  const double top_p = sampling.top_p();
  if (top_p > 0 && top_p < 1) {
    double mass = 0;
    for (int j = 0; j < count; ++j) {
      mass += weight[static_cast<size_t>(j)];
      if (mass >= top_p * total) {
        kept = j + 1;
        kept_mass = mass;
        break;
      }
    }
  }
  const double target = uniform_at(sampling.seed(), position) * kept_mass;
  double mass = 0;
  int last_candidate = 0;
  for (int j = 0; j < kept; ++j) {
    if (weight[static_cast<size_t>(j)] <= 0) continue;
    last_candidate = j;
    mass += weight[static_cast<size_t>(j)];
    if (target < mass) return top_ids[j];
  }
  return top_ids[last_candidate];  // rounding left the draw just past the end
}

Engine::Engine(Model& model) : model_(model) {}

int Engine::block_size() const { return model_.options().kv.block_size; }

int Engine::num_blocks() const {
  const KvCacheOptions& kv = model_.options().kv;
  return std::min(kv.full_blocks, kv.sliding_blocks);
}

int Engine::max_step_tokens() const { return model_.options().max_step_rows; }

int Engine::max_step_samples() const { return model_.options().max_logit_rows; }

proto::StepResult Engine::run(const proto::StepPlan& plan) {
  proto::StepResult result = run_plan(plan);
  if (plan.report_expert_load())
    for (const auto& row : model_.expert_load())
      for (const int64_t v : row) result.add_expert_load(v);
  return result;
}

proto::StepResult Engine::run_plan(const proto::StepPlan& plan) {
  const bool ep = expert_parallel(model_);
  proto::StepResult result;
  result.set_step(plan.step());
  result.set_rank(model_rank(model_));

  PlannedStep step;
  try {
    step = plan_step(model_, plan, num_blocks());
  } catch (...) {
    if (ep) {  // the other ranks' step goes on: take part with no tokens, then report
      StepLayout empty;
      empty.block_size = block_size();
      model_.forward(empty);
    }
    throw;
  }
  if (step.layout.tokens.empty() && !ep) return result;

  const int k = candidates_for(step, model_.config().vocab_size);
  const auto start = std::chrono::steady_clock::now();
  // Candidate tokens of the sampled rows (none when no sequence asked: the plain top-k path).
  std::vector<std::vector<int32_t>> candidates;
  for (const proto::SequenceWork* work : step.sampled)
    if (work->candidate_tokens_size() > 0) {
      candidates.resize(step.sampled.size());
      break;
    }
  if (!candidates.empty())
    for (size_t i = 0; i < step.sampled.size(); ++i)
      candidates[i].assign(step.sampled[i]->candidate_tokens().begin(), step.sampled[i]->candidate_tokens().end());
  // Every sampled sequence wants its candidates only: the lm_head runs on their rows alone.
  bool restricted = !step.sampled.empty();
  for (const proto::SequenceWork* work : step.sampled) restricted = restricted && work->candidates_only();
  TopLogprobs top;
  std::vector<std::vector<float>> candidate_logits;  // restricted steps
  try {
    if (restricted) candidate_logits = model_.forward_candidates(step.layout, candidates);
    else top = model_.forward_top(step.layout, k, candidates);
  } catch (const std::exception& e) {
    // Under expert parallelism the failure came in the middle of the step's collectives: the other
    // ranks cannot finish it, so make them fail fast instead of waiting for the timeout.
    if (ep) model_.options().comm->abort(std::string("engine: forward step failed on rank ") +
                                         std::to_string(result.rank()) + ": " + e.what());
    throw;
  }
  result.set_forward_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());

  // Masks given by their refused tokens: the permitted ones among the top candidates, when there are
  // any (else the sequence falls back on its allowed list below).
  std::vector<std::vector<size_t>> permitted_top(step.sampled.size());
  for (size_t i = 0; i < step.sampled.size(); ++i) {
    const proto::SequenceWork& work = *step.sampled[i];
    if (work.refused_tokens_size() == 0 || work.candidates_only()) continue;
    std::vector<int32_t> refused(work.refused_tokens().begin(), work.refused_tokens().end());
    std::sort(refused.begin(), refused.end());
    const int32_t* ids = top.ids.data() + i * static_cast<size_t>(k);
    for (int j = 0; j < k; ++j)
      if (ids[j] >= 0 && !std::binary_search(refused.begin(), refused.end(), ids[j])) permitted_top[i].push_back(static_cast<size_t>(j));
  }

  // Constrained rows: the unmasked log-probabilities of every allowed token, fetched for the whole
  // step at once (the allowed lists are short; nothing else leaves the device).
  std::vector<int32_t> masked_rows, masked_tokens;
  std::vector<size_t> masked_begin(step.sampled.size() + 1, 0);
  for (size_t i = 0; i < step.sampled.size(); ++i) {
    masked_begin[i] = masked_tokens.size();
    if (!permitted_top[i].empty()) continue;
    std::vector<int32_t> allowed(step.sampled[i]->allowed_tokens().begin(), step.sampled[i]->allowed_tokens().end());
    std::sort(allowed.begin(), allowed.end());
    allowed.erase(std::unique(allowed.begin(), allowed.end()), allowed.end());
    masked_tokens.insert(masked_tokens.end(), allowed.begin(), allowed.end());
    masked_rows.insert(masked_rows.end(), allowed.size(), static_cast<int32_t>(i));
  }
  masked_begin[step.sampled.size()] = masked_tokens.size();
  const std::vector<float> masked_logprobs = model_.step_logprobs(masked_rows, masked_tokens);

  for (size_t i = 0; i < step.sampled.size(); ++i) {
    const proto::SequenceWork& work = *step.sampled[i];
    if (work.candidates_only()) {
      // Renormalised over the candidates (from their logits, or their log-probabilities under the
      // whole distribution: the same up to rounding); the token is the best candidate.
      const std::vector<float>& scores = restricted ? candidate_logits[i] : top.candidate_logprobs[i];
      double max = -std::numeric_limits<double>::infinity();
      int best = 0;
      for (size_t j = 0; j < scores.size(); ++j) {
        if (scores[j] > scores[static_cast<size_t>(best)]) best = static_cast<int>(j);
        max = std::max(max, static_cast<double>(scores[j]));
      }
      double sum = 0;
      for (const float v : scores) sum += std::exp(static_cast<double>(v) - max);
      const double log_z = max + std::log(sum);
      proto::SampledToken* out = result.add_samples();
      out->set_sequence_id(work.sequence_id());
      out->set_token(work.candidate_tokens(best));
      out->set_logprob(static_cast<float>(scores[static_cast<size_t>(best)] - log_z));
      for (int j = 0; j < work.candidate_tokens_size(); ++j) {
        proto::TokenLogprob* c = out->add_candidates();
        c->set_token(work.candidate_tokens(j));
        c->set_logprob(static_cast<float>(scores[static_cast<size_t>(j)] - log_z));
      }
      continue;
    }
    const int32_t* ids = top.ids.data() + i * static_cast<size_t>(k);
    const float* logprobs = top.logprobs.data() + i * static_cast<size_t>(k);
    const int64_t position = static_cast<int64_t>(work.num_cached()) + work.tokens_size();
    proto::SampledToken* out = result.add_samples();
    out->set_sequence_id(work.sequence_id());
    if (!permitted_top[i].empty()) {
      // The permitted tokens among the top candidates, in their order (most likely first).
      std::vector<int32_t> cand_ids;
      std::vector<float> cand_lp;
      for (const size_t j : permitted_top[i]) {
        cand_ids.push_back(ids[j]);
        cand_lp.push_back(logprobs[j]);
      }
      const int32_t token = sample_token(work.sampling(), position, cand_ids.data(), cand_lp.data(), static_cast<int>(cand_ids.size()));
      out->set_token(token);
      for (size_t j = 0; j < cand_ids.size(); ++j)
        if (cand_ids[j] == token) {
          out->set_logprob(cand_lp[j]);
          break;
        }
    } else if (masked_begin[i] < masked_begin[i + 1]) {
      // The mask: only the allowed tokens are candidates, ordered as top_logprobs orders (largest
      // first, lowest id on ties), so greedy takes the most likely allowed token and temperature /
      // top-p sampling renormalizes over them with the same (seed, position) draw.
      const size_t begin = masked_begin[i], count = masked_begin[i + 1] - begin;
      std::vector<size_t> order(count);
      for (size_t j = 0; j < count; ++j) order[j] = begin + j;
      std::stable_sort(order.begin(), order.end(),
                       [&](size_t a, size_t b) { return masked_logprobs[a] > masked_logprobs[b]; });
      std::vector<int32_t> cand_ids(count);
      std::vector<float> cand_lp(count);
      for (size_t j = 0; j < count; ++j) {
        cand_ids[j] = masked_tokens[order[j]];
        cand_lp[j] = masked_logprobs[order[j]];
      }
      const int32_t token = sample_token(work.sampling(), position, cand_ids.data(), cand_lp.data(), static_cast<int>(count));
      out->set_token(token);
      for (size_t j = 0; j < count; ++j)
        if (cand_ids[j] == token) {
          out->set_logprob(cand_lp[j]);
          break;
        }
    } else {
      const int32_t token = sample_token(work.sampling(), position, ids, logprobs, k);
      out->set_token(token);
      for (int j = 0; j < k; ++j)
        if (ids[j] == token) {
          out->set_logprob(logprobs[j]);
          break;
        }
    }
    for (int j = 0; j < std::min(work.top_logprobs(), k); ++j) {
      proto::TokenLogprob* alt = out->add_top();
      alt->set_token(ids[j]);
      alt->set_logprob(logprobs[j]);
    }
    if (i < top.candidate_logprobs.size())
      for (int j = 0; j < work.candidate_tokens_size(); ++j) {
        proto::TokenLogprob* c = out->add_candidates();
        c->set_token(work.candidate_tokens(j));
        c->set_logprob(top.candidate_logprobs[i][static_cast<size_t>(j)]);
      }
  }
  return result;
}

namespace {

// Rank 0 sends segment r of `segments` to rank r (the other ranks pass nothing); every rank gets its own.
std::string scatter_from_root(Communicator& comm, const std::vector<std::string>& segments) {
  const size_t n = static_cast<size_t>(comm.size());
  std::vector<size_t> send_counts(n, 0);
  std::string send;
  if (comm.rank() == 0) {
    for (size_t r = 0; r < n; ++r) {
      send_counts[r] = segments[r].size();
      send += segments[r];
    }
  }
  const std::vector<size_t> recv_counts = exchange_counts(comm, send_counts);
  std::string mine(recv_counts[0], '\0');
  comm.all_to_all_v(send.data(), send_counts, mine.data(), recv_counts);
  return mine;
}

// Every rank sends `mine` to rank 0; rank 0 gets them all (index = rank), the others nothing.
std::vector<std::string> gather_to_root(Communicator& comm, const std::string& mine) {
  const size_t n = static_cast<size_t>(comm.size());
  std::vector<size_t> send_counts(n, 0);
  send_counts[0] = mine.size();
  const std::vector<size_t> recv_counts = exchange_counts(comm, send_counts);
  size_t total = 0;
  for (size_t c : recv_counts) total += c;
  std::string all(total, '\0');
  comm.all_to_all_v(mine.data(), send_counts, all.data(), recv_counts);
  std::vector<std::string> out;
  if (comm.rank() != 0) return out;
  size_t offset = 0;
  for (size_t c : recv_counts) {
    out.push_back(all.substr(offset, c));
    offset += c;
  }
  return out;
}

proto::StepResult failed_result(uint64_t step, int rank, const std::string& error) {
  proto::StepResult r;
  r.set_step(step);
  r.set_rank(rank);
  r.set_error(error.empty() ? std::string("step failed") : error);
  return r;
}

// Runs the local engine; a failed step becomes a result with `error` set. A broken communicator is
// not a step failure: it propagates.
proto::StepResult run_local(Engine& engine, const proto::StepPlan& plan, int rank) {
  try {
    return engine.run(plan);
  } catch (const CommError&) {
    throw;
  } catch (const std::exception& e) {
    return failed_result(plan.step(), rank, e.what());
  }
}

}  // namespace

StepExchange::StepExchange(Communicator* comm) : comm_(comm) {}

int StepExchange::rank() const { return comm_ ? comm_->rank() : 0; }

int StepExchange::world_size() const { return comm_ ? comm_->size() : 1; }

bool StepExchange::distributed() const { return comm_ != nullptr && comm_->size() > 1; }

std::vector<proto::StepResult> StepExchange::run_step(Engine& local, const std::vector<proto::StepPlan>& plans) {
  if (rank() != 0) throw std::logic_error("StepExchange::run_step: only rank 0 plans steps");
  if (shut_down_) throw std::logic_error("StepExchange::run_step: the workers were shut down");
  if (static_cast<int>(plans.size()) != world_size())
    throw std::invalid_argument("StepExchange::run_step: " + std::to_string(plans.size()) + " plans for " +
                                std::to_string(world_size()) + " ranks");
  for (const proto::StepPlan& p : plans)
    if (p.shutdown()) throw std::invalid_argument("StepExchange::run_step: use shutdown() to stop the workers");
  if (!distributed()) return {run_local(local, plans[0], 0)};

  std::vector<std::string> segments(plans.size());
  for (size_t r = 1; r < plans.size(); ++r) segments[r] = plans[r].SerializeAsString();
  last_exchange_ = std::chrono::steady_clock::now();
  if (observer_) observer_(++steps_);
  scatter_from_root(*comm_, segments);  // rank 0's own plan stays here (segment 0 is empty)
  const proto::StepResult own = run_local(local, plans[0], 0);
  const std::vector<std::string> payloads = gather_to_root(*comm_, std::string());
  last_exchange_ = std::chrono::steady_clock::now();
  std::vector<proto::StepResult> results(plans.size());
  results[0] = own;
  for (size_t r = 1; r < plans.size(); ++r)
    if (!results[r].ParseFromString(payloads[r]))
      results[r] = failed_result(plans[r].step(), static_cast<int>(r), "rank 0 could not parse the step result");
  return results;
}

void StepExchange::shutdown() {
  if (rank() != 0) throw std::logic_error("StepExchange::shutdown: only rank 0 stops the workers");
  if (shut_down_ || !distributed()) {
    shut_down_ = true;
    return;
  }
  proto::StepPlan stop;
  stop.set_shutdown(true);
  std::vector<std::string> segments(static_cast<size_t>(world_size()), stop.SerializeAsString());
  segments[0].clear();
  shut_down_ = true;
  scatter_from_root(*comm_, segments);
}

void StepExchange::serve(Engine& local) {
  if (rank() == 0) throw std::logic_error("StepExchange::serve: rank 0 plans steps, it does not serve them");
  for (;;) {
    proto::StepPlan plan;
    proto::StepResult result;
    if (!plan.ParseFromString(scatter_from_root(*comm_, {}))) {
      // Still take part in the step (under expert parallelism the others need us), then report.
      result = run_local(local, proto::StepPlan(), rank());
      result = failed_result(0, rank(), "could not parse the step plan");
    } else if (plan.shutdown()) {
      return;
    } else {
      result = run_local(local, plan, rank());
    }
    gather_to_root(*comm_, result.SerializeAsString());
    if (observer_) observer_(++steps_);
  }
}

void StepExchange::keep_alive(Engine& local) {
  if (rank() != 0) throw std::logic_error("StepExchange::keep_alive: only rank 0 plans steps");
  if (!distributed() || shut_down_) return;
  const auto idle = std::chrono::steady_clock::now() - last_exchange_;
  if (idle < std::chrono::duration<double>(comm_->timeout() / 4)) return;
  run_step(local, std::vector<proto::StepPlan>(static_cast<size_t>(world_size())));  // nothing to report but a CommError
}

}  // namespace arbiter
