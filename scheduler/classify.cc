#include "scheduler/classify.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>

namespace arbiter {

int ReasoningBudgets::for_effort(ReasoningEffort effort) const {
  switch (effort) {
    case ReasoningEffort::kLow:
      return low;
    case ReasoningEffort::kMedium:
      return medium;
    case ReasoningEffort::kHigh:
      return high;
  }
  return medium;
}

ClassifyUsage& ClassifyUsage::operator+=(const ClassifyUsage& other) {
  prompt_tokens += other.prompt_tokens;
  cached_tokens += other.cached_tokens;
  reasoning_tokens += other.reasoning_tokens;
  completion_tokens += other.completion_tokens;
  forced_tokens += other.forced_tokens;
  return *this;
}

int finish_severity(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return 0;
    case FinishReason::kLength:
      return 1;
    case FinishReason::kCancelled:
      return 2;
    case FinishReason::kDeadline:
      return 3;
    case FinishReason::kError:
      return 4;
  }
  return 4;
}

bool PolicyResult::violation() const {
  if (verdict.is_null()) return false;
  const auto it = verdict_details.find("violation");
  return it != verdict_details.end() && it->is_number_integer() && it->get<int>() == 1;
}

nlohmann::json to_json(const ClassifyUsage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"cached_tokens", usage.cached_tokens},
          {"reasoning_tokens", usage.reasoning_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"forced_tokens", usage.forced_tokens},
          {"total_tokens", usage.prompt_tokens + usage.forced_tokens + usage.completion_tokens}};
}

nlohmann::json to_json(const PolicyResult& r) {
  nlohmann::json j;
  j["policy_id"] = r.policy_id;
  j["verdict"] = r.verdict;
  j["confidence"] = r.confidence ? nlohmann::json(*r.confidence) : nlohmann::json(nullptr);
  if (!r.scores.empty()) j["scores"] = r.scores;
  j["final"] = r.final_text;
  if (!r.reasoning.empty()) j["reasoning"] = r.reasoning;
  j["details"] = r.verdict_details;
  if (!r.verdict_error.empty()) j["verdict_error"] = r.verdict_error;
  j["violation"] = r.violation();
  j["finish_reason"] = to_string(r.finish);
  j["reasoning_truncated"] = r.reasoning_truncated;
  if (!r.error.empty()) j["error"] = r.error;
  j["usage"] = to_json(r.usage);
  return j;
}

nlohmann::json to_json(const ClassifyResult& r) {
  nlohmann::json j;
  j["id"] = r.id;
  j["object"] = "classification";
  nlohmann::json results = nlohmann::json::array();
  for (const auto& p : r.results) results.push_back(to_json(p));
  j["results"] = std::move(results);
  j["flagged"] = r.flagged;
  j["usage"] = to_json(r.usage);
  return j;
}

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// The bytes of a token, or "" for ids the tokenizer does not know.
std::string_view token_text(const Tokenizer& tokenizer, int32_t token) {
  const auto bytes = tokenizer.token_bytes(token);
  return bytes ? *bytes : std::string_view();
}

// The (token, logprob) alternatives reported with a generated token, the token itself included
// (with temperature sampling the drawn token need not be among the reported top ones).
std::vector<std::pair<int32_t, float>> alternatives(const GeneratedToken& g) {
  std::vector<std::pair<int32_t, float>> top;
  top.reserve(g.top.size() + 1);
  bool has_self = false;
  for (const auto& t : g.top) {
    top.emplace_back(t.token(), t.logprob());
    has_self = has_self || t.token() == g.token;
  }
  if (!has_self) top.emplace_back(g.token, g.logprob);
  return top;
}

// Confidence of a 0/1 (or false/true) value decided by one generated token: P(token) over the
// probability of it and its counterpart with the same leading whitespace ("1" vs "0", " true" vs
// " false"). nullopt when the token is not such a value or was not sampled (forced, no top list).
std::optional<double> value_confidence(const Tokenizer& tokenizer, const GeneratedToken& g) {
  if (g.forced || g.top.empty()) return std::nullopt;
  const std::string text(token_text(tokenizer, g.token));
  const size_t lead_end = text.find_first_not_of(" \t\n\r");
  if (lead_end == std::string::npos) return std::nullopt;
  const std::string lead = text.substr(0, lead_end), value = text.substr(lead_end);
  std::vector<std::string> labels;
  if (value == "0" || value == "1") labels = {lead + "0", lead + "1"};
  else if (value == "false" || value == "true") labels = {lead + "false", lead + "true"};
  else return std::nullopt;
  // The counterpart must be one token too, else the two are not alternatives at this position.
  for (const auto& l : labels)
    if (tokenizer.encode(l).size() != 1) return std::nullopt;
  const Confidence c = label_confidence_top(tokenizer, alternatives(g), labels, text);
  if (!c.ok || c.ambiguous) return std::nullopt;
  return c.probability;
}

// Confidence of a declared label. The labels are tokenized as the answer would be (with the answer's
// leading whitespace, then <|return|>) and followed along the chosen label's tokens: at each position
// where labels that agreed with it so far part ways, the probability of the chosen token is divided
// by the summed probability of the distinct tokens those labels would put there, and the confidence
// is the product over such positions. Labels sharing a first token ("SP0", "SP2") are thus told
// apart at their second, and a label that is a prefix of another ("spam", "spam-bot") by the stop
// token. With distinct first tokens this is label_confidence_top at the first final token. nullopt
// when the generated tokens do not spell the chosen label canonically where it matters.
std::optional<double> label_choice_confidence(const Tokenizer& tokenizer, const std::vector<std::string>& labels,
                                              const std::string& chosen, std::string_view final_text,
                                              const std::vector<GeneratedToken>& generated, int64_t final_first) {
  if (final_first < 0) return std::nullopt;
  const size_t lead_end = std::min(final_text.find_first_not_of(" \t\n\r\f\v"), final_text.size());
  const std::string lead(final_text.substr(0, lead_end));
  std::vector<std::vector<int32_t>> spelled;
  size_t chosen_index = labels.size();
  for (size_t i = 0; i < labels.size(); ++i) {
    spelled.push_back(tokenizer.encode(lead + labels[i]));
    spelled.back().push_back(kTokenReturn);
    if (labels[i] == chosen) chosen_index = i;
  }
  if (chosen_index == labels.size()) return std::nullopt;
  const auto& mine = spelled[chosen_index];
  std::vector<size_t> racing;  // labels equal to the chosen one's tokens so far
  for (size_t i = 0; i < labels.size(); ++i)
    if (labels[i] != chosen) racing.push_back(i);
  double confidence = 1;
  for (size_t d = 0; d < mine.size() && !racing.empty(); ++d) {
    const size_t at = static_cast<size_t>(final_first) + d;
    if (at >= generated.size() || generated[at].token != mine[d]) return std::nullopt;
    std::vector<int32_t> rivals;
    std::vector<size_t> still;
    for (const size_t i : racing) {
      if (d >= spelled[i].size()) continue;
      if (spelled[i][d] == mine[d]) still.push_back(i);
      else if (std::find(rivals.begin(), rivals.end(), spelled[i][d]) == rivals.end()) rivals.push_back(spelled[i][d]);
    }
    racing = std::move(still);
    if (rivals.empty()) continue;
    const GeneratedToken& g = generated[at];
    if (g.forced || g.top.empty()) return std::nullopt;
    const auto top = alternatives(g);
    auto probability = [&](int32_t token) {
      for (const auto& [t, lp] : top)
        if (t == token) return std::exp(static_cast<double>(lp));
      return 0.0;  // outside the reported top: counts as 0
    };
    const double p = probability(mine[d]);
    double sum = p;
    for (const int32_t r : rivals) sum += probability(r);
    if (!(sum > 0)) return std::nullopt;
    confidence *= p / sum;
  }
  return confidence;
}

// Index of the first final token that is not whitespace only (the one that decides a 0/1 answer).
std::optional<size_t> first_content_token(const Tokenizer& tokenizer, const std::vector<int32_t>& final_tokens) {
  for (size_t i = 0; i < final_tokens.size(); ++i)
    if (!trim(token_text(tokenizer, final_tokens[i])).empty()) return i;
  return std::nullopt;
}


constexpr size_t kMaxCachedPrefixes = 256;
constexpr ReasoningEffort kEfforts[] = {ReasoningEffort::kLow, ReasoningEffort::kMedium, ReasoningEffort::kHigh};

// The tokens the scheduler forces when a reasoning budget runs out: <|end|> closes the analysis
// message; the final message's header is rendered as harmony renders any assistant message (its
// trailing <|end|> dropped), so the ids are exactly the model's own.
std::vector<int32_t> close_reasoning_tokens(const Tokenizer& tokenizer) {
  const HarmonyRenderer renderer(tokenizer);
  std::vector<int32_t> close = {harmony_ids::kEnd};
  std::vector<int32_t> header;
  renderer.render_message({"assistant", "", "final", "", ""}, header);
  if (header.empty() || header.back() != harmony_ids::kEnd) throw std::logic_error("unexpected harmony header rendering");
  header.pop_back();
  close.insert(close.end(), header.begin(), header.end());
  return close;
}

// The developer message's text for a policy, as render_safeguard_prompt writes it.
std::string developer_text(const std::string& policy_text, const SafeguardPromptOptions& options) {
  if (policy_text.empty()) return "";
  return "# Instructions\n\n" + policy_text + (options.hf_template_newlines ? "\n\n" : "");
}

}  // namespace

const char* to_string(PromptStatus status) {
  switch (status) {
    case PromptStatus::kOk: return "ok";
    case PromptStatus::kPolicyTooLong: return "policy_too_long";
    case PromptStatus::kContentTooLong: return "content_too_long";
    case PromptStatus::kDeadline: return "deadline";
    case PromptStatus::kCancelled: return "cancelled";
  }
  return "ok";
}

void check_classifier_options(const Tokenizer& tokenizer, const ClassifierOptions& o) {
  if (o.answer_tokens < 1) throw std::invalid_argument("answer tokens must be positive (got " + std::to_string(o.answer_tokens) + ")");
  for (const ReasoningEffort effort : kEfforts)
    if (o.budgets.for_effort(effort) < 0)
      throw std::invalid_argument(std::string("the reasoning budget of effort '") + to_string(effort) + "' must not be negative");
  if (o.max_context <= 0) return;
  const int close = static_cast<int>(close_reasoning_tokens(tokenizer).size());
  for (const ReasoningEffort effort : kEfforts) {
    SafeguardPromptOptions p = o.prompt;
    p.effort = effort;
    const int64_t smallest = static_cast<int64_t>(render_safeguard_prompt(tokenizer, "x", "x", p).size());
    const int budget = o.budgets.for_effort(effort);
    const int64_t generation = int64_t{budget} + close + o.answer_tokens;
    if (generation + smallest > o.max_context)
      throw std::invalid_argument(
          std::string("reasoning effort '") + to_string(effort) + "': its reasoning budget (" + std::to_string(budget) + ") + " +
          std::to_string(close) + " tokens closing the reasoning + " + std::to_string(o.answer_tokens) + " answer tokens = " +
          std::to_string(generation) + " generated tokens leave no room for a prompt (the smallest takes " +
          std::to_string(smallest) + ") in the max context of " + std::to_string(o.max_context) +
          " tokens: raise the max context, or lower the reasoning budget or the answer tokens");
  }
}

std::string PolicyFit::describe() const {
  std::string text = "The policy's prompt takes " + std::string(exact ? "" : "at least ") + std::to_string(prompt_tokens) +
                     " tokens; with at least 1 content token and " + std::to_string(generation_tokens) +
                     " tokens for the reasoning and the answer (" + to_string(effort) + " reasoning effort) a request needs " +
                     std::string(exact ? "" : "at least ") + std::to_string(int64_t{prompt_tokens} + 1 + generation_tokens) +
                     " tokens";
  if (max_context > 0) text += ", and the context is " + std::to_string(max_context) + " tokens";
  return text + ".";
}

Classifier::Classifier(const Tokenizer& tokenizer, Scheduler& scheduler, const ClassifierOptions& options)
    : tokenizer_(tokenizer), scheduler_(scheduler), options_(options) {
  if (options_.top_logprobs < 0 || options_.top_logprobs > 20)
    throw std::invalid_argument("top_logprobs must be in 0..20 (got " + std::to_string(options_.top_logprobs) + ")");
  check_classifier_options(tokenizer_, options_);
  const HarmonyRenderer renderer(tokenizer_);
  close_reasoning_ = close_reasoning_tokens(tokenizer_);
  prompt_suffix_.push_back(harmony_ids::kEnd);
  renderer.render_generation_prefix(prompt_suffix_);
  // The policy prefix is rendered in three parts so that the policy can be tokenized under bounds:
  // the system message and the developer header, the policy text, then <|end|> and the user header.
  for (const ReasoningEffort effort : kEfforts) {
    SafeguardPromptOptions o = options_.prompt;
    o.effort = effort;
    std::vector<int32_t>& head = prefix_head_[static_cast<int>(effort)];
    renderer.render_system(safeguard_system_options(o), head);
    renderer.render_message({"developer", "", "", "", ""}, head);
    if (head.back() != harmony_ids::kEnd) throw std::logic_error("unexpected harmony message rendering");
    head.pop_back();
  }
  prefix_tail_.push_back(harmony_ids::kEnd);
  renderer.render_message({"user", "", "", "", ""}, prefix_tail_);
  if (prefix_tail_.back() != harmony_ids::kEnd) throw std::logic_error("unexpected harmony message rendering");
  prefix_tail_.pop_back();
  // The parts must give exactly the safeguard prompt's prefix: the prompt of an empty content ends
  // <|message|><|end|><|start|>assistant, and the content goes right after that <|message|>.
  for (const std::string probe : {"", "Policy.\n\nAnswer 0 or 1."}) {
    SafeguardPromptOptions o = options_.prompt;
    std::vector<int32_t> whole = render_safeguard_prompt(tokenizer_, probe, "", o);
    whole.resize(whole.size() - std::min(whole.size(), prompt_suffix_.size()));
    if (policy_prefix(probe, o.effort) != whole)
      throw std::logic_error("the policy prefix does not match the safeguard prompt's rendering");
  }
}

EncodeEnd Classifier::bounded_prefix(const std::string& policy_text, ReasoningEffort effort, const EncodeBounds& bounds,
                                     std::vector<int32_t>& out) const {
  auto key = std::make_pair(static_cast<int>(effort), policy_text);
  {
    const std::lock_guard<std::mutex> lock(prefix_mutex_);
    const auto it = prefixes_.find(key);
    if (it != prefixes_.end()) {
      out = it->second;
      return out.size() > bounds.max_tokens ? EncodeEnd::kOverLimit : EncodeEnd::kComplete;
    }
  }
  out = prefix_head_[static_cast<int>(effort)];
  const size_t fixed = out.size() + prefix_tail_.size();
  if (fixed > bounds.max_tokens) return EncodeEnd::kOverLimit;
  EncodeBounds text_bounds = bounds;
  if (bounds.max_tokens != std::numeric_limits<size_t>::max()) text_bounds.max_tokens = bounds.max_tokens - fixed;
  SafeguardPromptOptions o = options_.prompt;
  o.effort = effort;
  const EncodeEnd end = tokenizer_.encode_bounded(developer_text(policy_text, o), out, text_bounds);
  if (end != EncodeEnd::kComplete) return end;
  out.insert(out.end(), prefix_tail_.begin(), prefix_tail_.end());
  const std::lock_guard<std::mutex> lock(prefix_mutex_);
  if (prefixes_.size() >= kMaxCachedPrefixes) prefixes_.clear();  // many distinct policies: start over
  prefixes_.emplace(std::move(key), out);
  return EncodeEnd::kComplete;
}

std::vector<int32_t> Classifier::cached_prefix(const std::string& policy_text, ReasoningEffort effort) const {
  std::vector<int32_t> prefix;
  bounded_prefix(policy_text, effort, EncodeBounds{}, prefix);  // unbounded: always complete
  return prefix;
}

std::vector<int32_t> Classifier::policy_prefix(const std::string& policy_text, ReasoningEffort effort) const {
  return cached_prefix(policy_text, effort);
}

int Classifier::generation_tokens(ReasoningEffort effort, int max_tokens, int reasoning_budget) const {
  if (max_tokens > 0) return max_tokens;
  const int budget = reasoning_budget > 0 ? reasoning_budget : options_.budgets.for_effort(effort);
  return budget + static_cast<int>(close_reasoning_.size()) + options_.answer_tokens;
}

PolicyFit Classifier::policy_fit(const std::string& policy_text, ReasoningEffort effort, int max_tokens) const {
  PolicyFit fit;
  fit.effort = effort;
  fit.generation_tokens = generation_tokens(effort, max_tokens);
  fit.max_context = options_.max_context;
  const int suffix = suffix_tokens();
  EncodeBounds bounds;
  if (fit.max_context > 0)
    bounds.max_tokens = static_cast<size_t>(std::max<int64_t>(0, int64_t{fit.max_context} - suffix - 1 - fit.generation_tokens));
  std::vector<int32_t> prefix;
  if (bounded_prefix(policy_text, effort, bounds, prefix) == EncodeEnd::kComplete) {
    fit.prompt_tokens = static_cast<int>(prefix.size()) + suffix;
    fit.fits = fit.max_context <= 0 || int64_t{fit.prompt_tokens} + 1 + fit.generation_tokens <= fit.max_context;
  } else {
    const size_t fixed = prefix_head_[static_cast<int>(effort)].size() + prefix_tail_.size();
    fit.fits = false;
    fit.exact = false;
    fit.prompt_tokens = static_cast<int>(std::max(bounds.max_tokens + 1, fixed)) + suffix;
  }
  return fit;
}

PolicyFit Classifier::policy_fit_any(const std::string& policy_text) const {
  std::vector<ReasoningEffort> order(std::begin(kEfforts), std::end(kEfforts));
  std::stable_sort(order.begin(), order.end(),
                   [&](ReasoningEffort a, ReasoningEffort b) { return generation_tokens(a) < generation_tokens(b); });
  std::optional<PolicyFit> cheapest;
  for (const ReasoningEffort effort : order) {
    PolicyFit fit = policy_fit(policy_text, effort);
    if (fit.fits) return fit;
    if (!cheapest) cheapest = fit;
  }
  return *cheapest;
}

ClassifyPrompts Classifier::prepare(const ClassifyRequest& request) const {
  ClassifyPrompts out;
  PromptStatus stopped = PromptStatus::kOk;
  EncodeBounds bounds;
  if (request.cancelled || request.deadline)
    bounds.stop = [&] {
      if (request.cancelled && request.cancelled()) stopped = PromptStatus::kCancelled;
      else if (request.deadline && std::chrono::steady_clock::now() > *request.deadline) stopped = PromptStatus::kDeadline;
      return stopped != PromptStatus::kOk;
    };
  auto stop_here = [&] {
    out.status = stopped;
    out.why = stopped == PromptStatus::kDeadline ? "the deadline passed while the prompts were rendered"
                                                 : "cancelled while the prompts were rendered";
    out.sequences.clear();
    return out;
  };
  const int max_context = options_.max_context;
  std::vector<ScorePlan> plans;  // score mode: one per policy
  const bool score = request.mode == ClassifyMode::kScore;
  const int generation = score ? score_generation(request, &plans)
                           : generation_tokens(request.effort, request.max_tokens, request.reasoning_budget);
  const int suffix = suffix_tokens();
  // Each policy's prefix, tokenized only as far as it can fit with one content token and the
  // generation; the content may then take what the tightest policy leaves.
  std::vector<std::vector<int32_t>> prefixes(request.policies.size());
  size_t content_limit = std::numeric_limits<size_t>::max();
  int tightest = -1;
  for (size_t i = 0; i < request.policies.size(); ++i) {
    EncodeBounds b = bounds;
    if (max_context > 0) b.max_tokens = static_cast<size_t>(std::max<int64_t>(0, int64_t{max_context} - suffix - 1 - generation));
    const EncodeEnd end = bounded_prefix(request.policies[i].text, request.effort, b, prefixes[i]);
    if (end == EncodeEnd::kStopped) return stop_here();
    if (end == EncodeEnd::kOverLimit) {
      out.status = PromptStatus::kPolicyTooLong;
      out.policy = static_cast<int>(i);
      // Score mode: the generation is the forced tokens and the one read (given as max_tokens).
      out.why = policy_fit(request.policies[i].text, request.effort, score ? generation : request.max_tokens).describe();
      return out;
    }
    if (max_context > 0) {
      const size_t room = static_cast<size_t>(int64_t{max_context} - static_cast<int64_t>(prefixes[i].size()) - suffix - generation);
      if (room < content_limit) {
        content_limit = room;
        tightest = static_cast<int>(i);
      }
    }
  }
  std::vector<int32_t> content;
  EncodeBounds b = bounds;
  b.max_tokens = content_limit;
  const EncodeEnd end = tokenizer_.encode_bounded(request.content, content, b);
  if (end == EncodeEnd::kStopped) return stop_here();
  if (end == EncodeEnd::kOverLimit) {
    out.status = PromptStatus::kContentTooLong;
    out.policy = tightest;
    out.why = "The content takes more than " + std::to_string(content_limit) + " tokens, the most that fit next to policy '" +
              request.policies[static_cast<size_t>(tightest)].id + "' (its prompt takes " +
              std::to_string(prefixes[static_cast<size_t>(tightest)].size() + static_cast<size_t>(suffix)) + " tokens) with " +
              std::to_string(generation) + " tokens for the reasoning and the answer in the context of " +
              std::to_string(max_context) + " tokens.";
    return out;
  }
  out.content_tokens = static_cast<int>(content.size());
  out.sequences.reserve(request.policies.size());
  for (size_t i = 0; i < prefixes.size(); ++i) {
    std::vector<int32_t> prompt = std::move(prefixes[i]);
    prompt.reserve(prompt.size() + content.size() + prompt_suffix_.size());
    prompt.insert(prompt.end(), content.begin(), content.end());
    prompt.insert(prompt.end(), prompt_suffix_.begin(), prompt_suffix_.end());
    if (!score) {
      out.sequences.push_back(make_sequence(std::move(prompt), request, request.policies[i]));
      continue;
    }
    // Score mode: one sequence per node of the policy's answer trie, each the prompt + the forced
    // header + the node's path, generating one token whose candidates' log-probabilities decide.
    out.first_sequence.push_back(out.sequences.size());
    for (const ScorePlan::Node& node : plans[i].nodes) {
      SequenceSpec spec;
      spec.prompt.reserve(prompt.size() + plans[i].forced.size() + node.path.size());
      spec.prompt = prompt;
      spec.prompt.insert(spec.prompt.end(), plans[i].forced.begin(), plans[i].forced.end());
      spec.prompt.insert(spec.prompt.end(), node.path.begin(), node.path.end());
      spec.max_new_tokens = 1;
      spec.top_logprobs = 0;
      spec.candidate_tokens = node.candidates;
      spec.candidates_only = options_.score_restricted_lm_head;  // the lm_head on the candidates' rows alone
      out.sequences.push_back(std::move(spec));
    }
  }
  if (score) out.first_sequence.push_back(out.sequences.size());
  return out;
}

std::vector<int32_t> Classifier::render(const ClassifyPolicy& policy, const std::string& content,
                                        ReasoningEffort effort) const {
  std::vector<int32_t> ids = cached_prefix(policy.text, effort);
  ids.reserve(ids.size() + content.size() / 3 + prompt_suffix_.size() + 8);
  tokenizer_.encode_append(content, ids);
  ids.insert(ids.end(), prompt_suffix_.begin(), prompt_suffix_.end());
  return ids;
}

SequenceSpec Classifier::make_sequence(std::vector<int32_t> prompt, const ClassifyRequest& request,
                                       const ClassifyPolicy& policy) const {
  SequenceSpec s;
  s.prompt = std::move(prompt);
  s.max_reasoning_tokens = request.reasoning_budget > 0 ? request.reasoning_budget : options_.budgets.for_effort(request.effort);
  s.close_reasoning = close_reasoning_;
  s.top_logprobs = options_.top_logprobs;
  s.max_new_tokens = generation_tokens(request.effort, request.max_tokens, request.reasoning_budget);
  if (request.constrain) s.final_grammar = final_grammar(policy);
  return s;
}

SequenceSpec Classifier::sequence(const ClassifyRequest& request, const ClassifyPolicy& policy) const {
  return make_sequence(render(policy, request.content, request.effort), request, policy);
}

std::shared_ptr<const VerdictGrammar> Classifier::final_grammar(const ClassifyPolicy& policy) const {
  {
    const std::lock_guard<std::mutex> lock(grammar_mutex_);
    const auto it = grammars_.find(policy.labels);
    if (it != grammars_.end()) return it->second;
  }
  std::shared_ptr<const VerdictGrammar> grammar = VerdictGrammar::for_labels(tokenizer_, policy.labels);
  const std::lock_guard<std::mutex> lock(grammar_mutex_);
  if (grammars_.size() >= kMaxCachedPrefixes) grammars_.clear();  // many distinct label sets: start over
  grammars_.emplace(policy.labels, grammar);
  return grammar;
}

SubmitStatus Classifier::submit(const ClassifyRequest& request, std::function<void(ClassifyResult)> done,
                                std::string* why, std::function<void(size_t, const PolicyResult&)> on_policy) {
  if (request.policies.empty() || request.max_tokens < 0 || !done)
    return submit(request, ClassifyPrompts{}, std::move(done), why, std::move(on_policy));
  ClassifyPrompts prompts = prepare(request);
  if (!prompts.ok()) {
    if (why) *why = prompts.why;
    const bool too_long = prompts.status == PromptStatus::kPolicyTooLong || prompts.status == PromptStatus::kContentTooLong;
    return too_long ? SubmitStatus::kTooLong : SubmitStatus::kInvalid;
  }
  return submit(request, std::move(prompts), std::move(done), why, std::move(on_policy));
}

SubmitStatus Classifier::submit(const ClassifyRequest& request, ClassifyPrompts prompts,
                                std::function<void(ClassifyResult)> done, std::string* why,
                                std::function<void(size_t, const PolicyResult&)> on_policy) {
  auto fail = [&](SubmitStatus status, std::string what) {
    if (why) *why = std::move(what);
    return status;
  };
  if (request.policies.empty()) return fail(SubmitStatus::kInvalid, "no policies");
  if (request.max_tokens < 0) return fail(SubmitStatus::kInvalid, "max_tokens must not be negative");
  if (!done) return fail(SubmitStatus::kInvalid, "no completion callback");
  if (request.mode == ClassifyMode::kScore) {
    if (!prompts.ok() || prompts.first_sequence.size() != request.policies.size() + 1 ||
        prompts.first_sequence.back() != prompts.sequences.size())
      return fail(SubmitStatus::kInvalid, "the prompts were not prepared for this request");
    return submit_score(request, std::move(prompts), std::move(done), why, std::move(on_policy));
  }
  if (!prompts.ok() || prompts.sequences.size() != request.policies.size())
    return fail(SubmitStatus::kInvalid, "the prompts were not prepared for this request");
  RequestSpec spec;
  spec.id = request.id;
  spec.deadline = request.deadline;
  spec.continuation = request.continuation;
  spec.background = request.background;
  spec.sequences = std::move(prompts.sequences);
  // The request is kept without its content (the callbacks need the policies and the id only).
  auto kept = std::make_shared<ClassifyRequest>();
  kept->id = request.id;
  kept->policies = request.policies;
  kept->return_reasoning = request.return_reasoning;
  if (on_policy)
    spec.on_sequence_done = [this, kept, on_policy = std::move(on_policy)](int index, const SequenceResult& generated) {
      const size_t i = static_cast<size_t>(index);
      if (i < kept->policies.size()) on_policy(i, interpret(kept->policies[i], generated, kept->return_reasoning));
    };
  spec.on_done = [this, kept, done = std::move(done)](std::vector<SequenceResult> results) {
    done(assemble(*kept, results));
  };
  return scheduler_.submit(std::move(spec), why);
}

ClassifyResult Classifier::assemble(const ClassifyRequest& request, const std::vector<SequenceResult>& generated) const {
  ClassifyResult out;
  out.id = request.id;
  for (size_t i = 0; i < request.policies.size(); ++i) {
    PolicyResult r;
    if (i < generated.size()) {
      r = interpret(request.policies[i], generated[i], request.return_reasoning);
    } else {
      r.policy_id = request.policies[i].id;
      r.verdict = nullptr;
      r.finish = FinishReason::kError;
      r.error = "no generation for this policy";
    }
    out.flagged = out.flagged || r.violation();
    out.usage += r.usage;
    if (finish_severity(r.finish) > finish_severity(out.finish)) out.finish = r.finish;
    out.results.push_back(std::move(r));
  }
  return out;
}

PolicyResult Classifier::interpret(const ClassifyPolicy& policy, const SequenceResult& generated,
                                   bool return_reasoning) const {
  PolicyResult r;
  r.policy_id = policy.id;
  r.finish = generated.finish;
  r.error = generated.error;
  r.usage.prompt_tokens = generated.prompt_tokens;
  r.usage.cached_tokens = generated.cached_tokens;
  r.usage.reasoning_tokens = generated.reasoning_tokens;
  r.usage.completion_tokens = static_cast<int>(generated.tokens.size());
  r.verdict = nullptr;

  std::vector<int32_t> ids;
  ids.reserve(generated.tokens.size());
  for (const auto& g : generated.tokens) {
    ids.push_back(g.token);
    r.reasoning_truncated = r.reasoning_truncated || g.forced;
  }
  const SafeguardOutput out = parse_safeguard_output(tokenizer_, ids);
  if (return_reasoning) r.reasoning = out.reasoning;
  r.final_text = out.final_text;

  if (!out.has_final) {
    Verdict none;
    none.status = VerdictStatus::kEmpty;
    none.error = "no final answer";
    if (generated.finish != FinishReason::kStop) none.error += std::string(" (finished: ") + to_string(generated.finish) + ")";
    if (!out.errors.empty()) none.error += "; " + out.errors.front();
    r.verdict_error = none.error;
    r.verdict_details = none.to_json();
    return r;
  }

  // Which reading of the answer applies: a declared label, then 0/1, then a JSON object.
  const std::string_view answer = trim(out.final_text);
  Verdict v;
  enum class Kind { kLabel, kBinary, kJson } kind = Kind::kBinary;
  std::optional<Verdict> label_failure;
  if (!policy.labels.empty()) {
    v = parse_label_verdict(out.final_text, policy.labels, policy.violating_labels);
    kind = Kind::kLabel;
    if (!v.ok()) label_failure = v;
  }
  if (policy.labels.empty() || !v.ok()) {
    const bool looks_json = !answer.empty() && (answer.front() == '{' || answer.front() == '`');
    if (looks_json) {
      v = parse_json_verdict(out.final_text);
      kind = Kind::kJson;
    } else {
      v = parse_binary_verdict(out.final_text);
      kind = Kind::kBinary;
      if (!v.ok() && label_failure) v = *label_failure;  // the policy asked for labels: say so
    }
  }
  r.verdict_details = v.to_json();
  if (!v.ok()) {
    r.verdict_error = v.error;
    return r;
  }

  const auto& final_tokens = out.final_tokens;
  const int64_t first = out.final_first_index;
  switch (kind) {
    case Kind::kLabel: {
      r.verdict = *v.label;
      r.confidence = label_choice_confidence(tokenizer_, policy.labels, *v.label, out.final_text, generated.tokens, first);
      break;
    }
    case Kind::kBinary: {
      r.verdict = *v.violation;
      if (const auto at = first_content_token(tokenizer_, final_tokens); at && first >= 0)
        r.confidence = value_confidence(tokenizer_, generated.tokens.at(static_cast<size_t>(first) + *at));
      break;
    }
    case Kind::kJson: {
      r.verdict = *v.violation;
      if (const auto at = json_value_token(tokenizer_, final_tokens, {"violation"}); at && first >= 0)
        r.confidence = value_confidence(tokenizer_, generated.tokens.at(static_cast<size_t>(first) + *at));
      break;
    }
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Verdict-only scoring (ClassifyMode::kScore).

const char* to_string(AnswerFormat format) {
  switch (format) {
    case AnswerFormat::kAuto: return "auto";
    case AnswerFormat::kBinary: return "binary";
    case AnswerFormat::kLabels: return "labels";
    case AnswerFormat::kJson: return "json";
  }
  return "auto";
}

const char* to_string(ClassifyMode mode) { return mode == ClassifyMode::kScore ? "score" : "reason"; }

const char* to_string(ScorePrefix prefix) { return prefix == ScorePrefix::kDirect ? "direct" : "empty_analysis"; }

int ScorePlan::generation_tokens() const {
  size_t longest = 0;
  for (const Node& n : nodes) longest = std::max(longest, n.path.size());
  return static_cast<int>(forced.size() + longest + 1);
}

namespace {

// The JSON verdict's text up to its value: score mode forces it and weighs "0" against "1" (the
// verdict parser also accepts true/false, which this does not score).
constexpr const char* kJsonVerdictStart = "{\"violation\": ";

// Builds the trie of `plan.spelled` for the answers in `group` (all equal on tokens [0, depth)):
// tokens they all share are walked over; where they part ways a node is added and each branch built
// the same way. A branch with one answer ends (nothing more needs reading).
void build_score_trie(ScorePlan& plan, const std::vector<size_t>& group, size_t depth, std::vector<int32_t> path) {
  for (;;) {
    if (group.size() < 2) return;
    std::vector<int32_t> next;  // distinct tokens at `depth`, in the order of the answers
    for (const size_t a : group) {
      if (depth >= plan.spelled[a].size())  // an answer that is the start of another, unterminated
        throw std::invalid_argument("answer '" + plan.answers[a] + "' cannot be told apart from a longer one");
      const int32_t t = plan.spelled[a][depth];
      if (std::find(next.begin(), next.end(), t) == next.end()) next.push_back(t);
    }
    if (next.size() == 1) {
      path.push_back(next[0]);
      ++depth;
      continue;
    }
    if (next.size() > static_cast<size_t>(kMaxCandidateTokens))
      throw std::invalid_argument("more than " + std::to_string(kMaxCandidateTokens) + " answers part ways at one token");
    const size_t node = plan.nodes.size();
    plan.nodes.push_back({path, next});
    for (size_t c = 0; c < next.size(); ++c) {
      std::vector<size_t> branch;
      for (const size_t a : group)
        if (plan.spelled[a][depth] == next[c]) {
          branch.push_back(a);
          plan.steps[a].emplace_back(node, c);
        }
      std::vector<int32_t> longer = path;
      longer.push_back(next[c]);
      build_score_trie(plan, branch, depth + 1, std::move(longer));
    }
    return;
  }
}

}  // namespace

std::vector<int32_t> Classifier::score_prefix_tokens(ScorePrefix prefix) const {
  // The prompt ends <|start|>assistant: open an (empty) analysis message and close it, then the final
  // header exactly as the scheduler forces it when a reasoning budget runs out (close_reasoning).
  std::vector<int32_t> out;
  if (prefix == ScorePrefix::kEmptyAnalysis) {
    out = tokenizer_.encode_with_specials("<|channel|>analysis<|message|>");
    out.insert(out.end(), close_reasoning_.begin(), close_reasoning_.end());
  } else {
    // close_reasoning without its <|end|><|start|>assistant: the header's <|channel|>final<|message|>.
    out = tokenizer_.encode_with_specials("<|channel|>final<|message|>");
  }
  return out;
}

ScorePlan Classifier::score_plan(const ClassifyPolicy& policy, ScorePrefix prefix) const {
  ScorePlan plan;
  plan.forced = score_prefix_tokens(prefix);
  plan.format = policy.format;
  if (plan.format == AnswerFormat::kAuto)
    plan.format = !policy.labels.empty()                              ? AnswerFormat::kLabels
                  : policy.text.find("\"violation\"") != std::string::npos ? AnswerFormat::kJson
                                                                     : AnswerFormat::kBinary;
  switch (plan.format) {
    case AnswerFormat::kLabels:
      if (policy.labels.empty()) throw std::invalid_argument("policy '" + policy.id + "': the labels format needs labels");
      if (policy.labels.size() > static_cast<size_t>(kMaxCandidateTokens))
        throw std::invalid_argument("policy '" + policy.id + "': at most " + std::to_string(kMaxCandidateTokens) +
                                    " labels can be scored");
      for (const auto& label : policy.labels) {
        if (label.empty()) throw std::invalid_argument("policy '" + policy.id + "': empty label");
        if (std::find(plan.answers.begin(), plan.answers.end(), label) != plan.answers.end()) continue;  // given twice
        plan.answers.push_back(label);
        plan.spelled.push_back(tokenizer_.encode(label));
        plan.spelled.back().push_back(kTokenReturn);
      }
      break;
    case AnswerFormat::kBinary:
    case AnswerFormat::kAuto:
      for (const char* value : {"0", "1"}) {
        plan.answers.push_back(value);
        plan.spelled.push_back(tokenizer_.encode(value));
        plan.spelled.back().push_back(kTokenReturn);
      }
      plan.format = AnswerFormat::kBinary;
      break;
    case AnswerFormat::kJson:
      // Spelled as the whole text up to the value, so that the shared start is tokenized exactly as
      // in a written answer (the trie forces it: `{"`, `violation`, `":`, ` `) and "0"/"1" part ways.
      for (const char* value : {"0", "1"}) {
        plan.answers.push_back(value);
        plan.spelled.push_back(tokenizer_.encode(std::string(kJsonVerdictStart) + value));
      }
      break;
  }
  plan.steps.resize(plan.answers.size());
  std::vector<size_t> all(plan.answers.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  build_score_trie(plan, all, 0, {});
  if (plan.nodes.empty()) {  // one answer: read its first token anyway (its probability is 1)
    plan.nodes.push_back({{}, {plan.spelled[0][0]}});
    plan.steps[0].emplace_back(0, 0);
  }
  return plan;
}

int Classifier::score_generation(const ClassifyRequest& request, std::vector<ScorePlan>* plans) const {
  int most = 1;
  plans->clear();
  for (const ClassifyPolicy& policy : request.policies) {
    plans->push_back(score_plan(policy, request.score_prefix));
    most = std::max(most, plans->back().generation_tokens());
  }
  return most;
}

PolicyResult Classifier::score_result(const ClassifyPolicy& policy, const ScorePlan& plan,
                                      const std::vector<const SequenceResult*>& generated) const {
  PolicyResult r;
  r.policy_id = policy.id;
  r.verdict = nullptr;
  r.finish = FinishReason::kStop;
  // Usage: the prompt once; per node, the forced header and path it adds and the one token read.
  for (size_t n = 0; n < generated.size(); ++n) {
    const SequenceResult& g = *generated[n];
    const int added = static_cast<int>(plan.forced.size() + (n < plan.nodes.size() ? plan.nodes[n].path.size() : 0));
    if (n == 0) r.usage.prompt_tokens = std::max(0, g.prompt_tokens - added);
    r.usage.cached_tokens += g.cached_tokens;
    r.usage.forced_tokens += added;
    r.usage.completion_tokens += static_cast<int>(g.tokens.size());
    // One generated token ends a score sequence by length (or by stop, when it is a stop token):
    // both are the normal end; anything worse is the policy's finish.
    if (g.finish != FinishReason::kStop && g.finish != FinishReason::kLength && finish_severity(g.finish) > finish_severity(r.finish)) {
      r.finish = g.finish;
      r.error = g.error;
    }
  }
  auto fail = [&](std::string why) {
    Verdict none;
    none.status = VerdictStatus::kEmpty;
    none.error = std::move(why);
    r.verdict_error = none.error;
    r.verdict_details = none.to_json();
    return r;
  };
  if (r.finish != FinishReason::kStop)
    return fail(std::string("not scored (finished: ") + to_string(r.finish) + ")" + (r.error.empty() ? "" : ": " + r.error));
  if (generated.size() != plan.nodes.size()) return fail("not scored: the generations do not match the plan");
  // Each node's candidates renormalised among themselves (log-sum-exp in double).
  std::vector<std::vector<double>> share(plan.nodes.size());
  for (size_t n = 0; n < plan.nodes.size(); ++n) {
    const auto& candidates = plan.nodes[n].candidates;
    const SequenceResult& g = *generated[n];
    if (g.tokens.empty() || g.tokens[0].candidates.size() != candidates.size())
      return fail("not scored: the engine returned no candidate log-probabilities");
    std::vector<double> lp(candidates.size());
    double max = -std::numeric_limits<double>::infinity();
    for (size_t c = 0; c < candidates.size(); ++c) {
      const auto& got = g.tokens[0].candidates[c];
      if (got.token() != candidates[c]) return fail("not scored: the candidate log-probabilities are out of order");
      lp[c] = got.logprob();
      max = std::max(max, lp[c]);
    }
    if (!std::isfinite(max)) return fail("not scored: no allowed answer has any probability");
    double sum = 0;
    for (const double v : lp) sum += std::exp(v - max);
    share[n].resize(candidates.size());
    for (size_t c = 0; c < candidates.size(); ++c) share[n][c] = std::exp(lp[c] - max) / sum;
  }
  size_t best = 0;
  std::vector<double> probability(plan.answers.size(), 1.0);
  for (size_t a = 0; a < plan.answers.size(); ++a) {
    for (const auto& [node, c] : plan.steps[a]) probability[a] *= share[node][c];
    r.scores[plan.answers[a]] = probability[a];
    if (probability[a] > probability[best]) best = a;  // ties: the first declared
  }
  const std::string& answer = plan.answers[best];
  Verdict v;
  switch (plan.format) {
    case AnswerFormat::kLabels:
      v = parse_label_verdict(answer, policy.labels, policy.violating_labels);
      r.verdict = answer;
      break;
    case AnswerFormat::kJson:
      v = parse_json_verdict(std::string(kJsonVerdictStart) + answer + "}");
      r.verdict = answer == "1" ? 1 : 0;
      break;
    case AnswerFormat::kBinary:
    case AnswerFormat::kAuto:
      v = parse_binary_verdict(answer);
      r.verdict = answer == "1" ? 1 : 0;
      break;
  }
  r.verdict_details = v.to_json();
  r.confidence = probability[best];
  return r;
}

SubmitStatus Classifier::submit_score(const ClassifyRequest& request, ClassifyPrompts prompts,
                                      std::function<void(ClassifyResult)> done, std::string* why,
                                      std::function<void(size_t, const PolicyResult&)> on_policy) {
  // What the callbacks need, without the content: the policies, their plans and where each policy's
  // sequences are in the request.
  struct Kept {
    std::string id;
    std::vector<ClassifyPolicy> policies;
    std::vector<ScorePlan> plans;
    std::vector<size_t> first;
    std::vector<SequenceResult> finished;  // on_sequence_done's results so far (step-loop thread only)
    std::vector<size_t> left;              // per policy: sequences not finished yet
  };
  auto kept = std::make_shared<Kept>();
  kept->id = request.id;
  kept->policies = request.policies;
  score_generation(request, &kept->plans);
  kept->first = prompts.first_sequence;
  for (size_t i = 0; i < request.policies.size(); ++i) {
    if (kept->first[i + 1] - kept->first[i] != kept->plans[i].nodes.size()) {
      if (why) *why = "the prompts were not prepared for this request";
      return SubmitStatus::kInvalid;
    }
    kept->left.push_back(kept->plans[i].nodes.size());
  }
  RequestSpec spec;
  spec.id = request.id;
  spec.deadline = request.deadline;
  spec.continuation = request.continuation;
  spec.background = request.background;
  spec.sequences = std::move(prompts.sequences);
  auto results_of = [kept](size_t policy, const std::vector<SequenceResult>& all) {
    std::vector<const SequenceResult*> mine;
    for (size_t s = kept->first[policy]; s < kept->first[policy + 1] && s < all.size(); ++s) mine.push_back(&all[s]);
    return mine;
  };
  if (on_policy) {
    kept->finished.resize(spec.sequences.size());
    spec.on_sequence_done = [this, kept, results_of, on_policy = std::move(on_policy)](int index, const SequenceResult& g) {
      const size_t s = static_cast<size_t>(index);
      if (s >= kept->finished.size()) return;
      kept->finished[s] = g;
      const size_t policy = static_cast<size_t>(
          std::upper_bound(kept->first.begin(), kept->first.end(), s) - kept->first.begin() - 1);
      if (policy >= kept->left.size() || --kept->left[policy] > 0) return;
      on_policy(policy, score_result(kept->policies[policy], kept->plans[policy], results_of(policy, kept->finished)));
    };
  }
  spec.on_done = [this, kept, results_of, done = std::move(done)](std::vector<SequenceResult> results) {
    ClassifyResult out;
    out.id = kept->id;
    for (size_t i = 0; i < kept->policies.size(); ++i) {
      PolicyResult r = score_result(kept->policies[i], kept->plans[i], results_of(i, results));
      out.flagged = out.flagged || r.violation();
      out.usage += r.usage;
      if (finish_severity(r.finish) > finish_severity(out.finish)) out.finish = r.finish;
      out.results.push_back(std::move(r));
    }
    done(std::move(out));
  };
  return scheduler_.submit(std::move(spec), why);
}

}  // namespace arbiter
