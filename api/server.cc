#include "api/server.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <map>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <random>
#include <chrono>
#include <iostream>
#include <thread>

#include "api/api.pb.h"
#include "api/chat_api.h"
#include "api/classify_api.h"
#include "api/console.h"
#include "api/decisions_api.h"
#include "api/http_transport.h"
#include "api/errors.h"
#include "api/jobs.h"
#include "api/json_io.h"
#include "api/moderation_api.h"
#include "api/pending.h"
#include "api/percent_decode.h"
#include "api/pg_decision_store.h"
#include "api/pg_job_store.h"
#include "api/pg_util.h"
#include "api/sqlite_decision_store.h"
#include "pipeline/cascade.h"
#include "pipeline/sha256.h"
#include "pipeline/triage.h"
#include "scheduler/classify.h"
#include "scheduler/scheduler.h"
#include "runtime/expert_stats.h"
#include "scheduler/step_loop.h"

namespace arbiter::api {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kPoll = std::chrono::milliseconds(50);
// Help texts of the counters whose series are created at start (at 0, so that rate() and alerts
// see them before the first event) and again where they are counted.
constexpr const char* kFlaggedHelp = "Classify requests with a violation.";
constexpr const char* kCascadeHelp = "Policy decisions of reasoning_effort auto, by the cascade stage that decided.";
constexpr const char* kPromptsStoppedHelp =
    "Classify requests refused while their prompts were rendered, before any scheduling, by reason.";
constexpr const char* kPromptsStoppedReasons[] = {"too_long", "deadline", "client_gone"};
constexpr const char* kJobsCreatedHelp = "Jobs created (POST /v1/jobs answered 201).";
constexpr const char* kJobItemsHelp = "Job items finished, by outcome (completed: a 200 classify response; failed: an error stored).";
constexpr const char* kJobsFinishedHelp = "Jobs finished, by state.";
constexpr const char* kWebhooksHelp = "Webhook delivery tries, by outcome (retried: failed and tried again later; failed: given up).";
constexpr const char* kItemWebhooksHelp = "Delivery tries of item webhooks (jobs with webhook_items), by outcome as for job webhooks.";
constexpr const char* kJobItemsInFlightHelp = "Job items being classified now (at most --job-concurrency).";
// How long past its deadline (or its cancellation) a handler waits for the scheduler's answer.
constexpr auto kGrace = std::chrono::seconds(30);

uint32_t unix_now() {
  return static_cast<uint32_t>(
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

HttpReply json_reply(int status, std::string body) {
  HttpReply r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

std::string header(const HttpRequest& r, const std::string& name) {
  const auto it = r.headers.find(name);
  return it == r.headers.end() ? "" : it->second;
}

// Token counts of one answered request, for the token counters.
struct TokenCounts {
  int prompt = 0, cached = 0, reasoning = 0, completion = 0;
};

// The state a chat generation shares between the step-loop thread (callbacks) and the HTTP thread.
struct ChatRun {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<int32_t> tokens;  // delivered by on_token
  std::optional<SequenceResult> result;
  bool finished() {
    std::lock_guard<std::mutex> lock(mutex);
    return result.has_value();
  }
};

}  // namespace

HttpReply error_reply(const ApiError& e) {
  HttpReply r = json_reply(e.status, error_json(e));
  if (e.retry_after > 0) r.headers.emplace_back("Retry-After", std::to_string(e.retry_after));
  if (e.status == 401) r.headers.emplace_back("WWW-Authenticate", "Bearer");
  return r;
}

// The server's state: options, registries, the serving handles once attached, the HTTP transport.
struct ApiServer::Impl {
  explicit Impl(ApiOptions o) : options(std::move(o)), registry(options.policy_db, options.policy_db_readonly) {
    if (!options.moderation_config.empty()) moderation = load_moderation_config(options.moderation_config);
    if (!options.decision_log.db.empty())
      decisions = std::make_unique<DecisionLog>(
          pg::is_url(options.decision_log.db) ? std::unique_ptr<DecisionStore>(std::make_unique<PgDecisionStore>(options.decision_log.db))
                                              : std::make_unique<SqliteDecisionStore>(options.decision_log.db),
          options.decision_log.log);
    if (!options.jobs.db.empty()) {
      if (pg::is_url(options.jobs.db)) job_store = std::make_unique<PgJobStore>(options.jobs.db, options.jobs.lease);
      else job_store = std::make_unique<SqliteJobStore>(options.jobs.db);
      // Webhooks of jobs that finished before a restart are (re)sent from the start.
      webhooks = std::make_unique<WebhookSender>(*job_store, options.jobs, [this](bool item, const char* outcome) {
        if (item) metrics.counter("arbiter_job_item_webhooks_total", kItemWebhooksHelp, {{"outcome", outcome}}).inc();
        else metrics.counter("arbiter_job_webhooks_total", kWebhooksHelp, {{"outcome", outcome}}).inc();
      });
      job_runner = std::make_unique<JobRunner>(
          *job_store, options.jobs.concurrency, [this](const ClaimedItem& item) { return run_job_item(item); },
          [this](const JobInfo& job) { job_finished(job); },
          // Items of jobs with item webhooks are sent as they are stored.
          [this] {
            if (!options.jobs.webhook_allow.empty()) webhooks->wake();
          });
      job_runner->set_retention(options.jobs.retention_days, options.jobs.retention_interval);
    }
  }

  ApiOptions options;
  PolicyRegistry registry;
  RulesCache rules_cache;
  TriageModels triage_models{options.triage_dir};
  std::optional<ModerationConfig> moderation;  // POST /v1/moderations' categories (none: 404)
  std::unique_ptr<DecisionLog> decisions;  // null: no decision log
  MetricsRegistry metrics;
  std::mutex handles_mutex;
  std::optional<ServingHandles> handles;
  // The cascade (reasoning_effort "auto") over the attached Classifier; set with `handles`.
  std::shared_ptr<ClassifierStages> cascade_stages;
  std::shared_ptr<Cascade> cascade;
  std::atomic<bool> draining{false};
  // Requests between their admission check and their submission to the scheduler; drain() waits
  // for them, so a request that was admitted is never refused by a scheduler that stopped accepting.
  std::mutex admit_mutex;
  std::condition_variable admit_done;
  int admitting = 0;
  std::atomic<uint64_t> next_id{1};
  std::string id_salt;
  uint32_t started = unix_now();

  std::mutex idle_mutex;
  std::condition_variable idle_changed;
  int in_flight = 0;

  std::unique_ptr<HttpTransport> http;
  // Jobs (null without a job db). Declared last: the runner's threads use everything above, and are
  // joined first.
  std::unique_ptr<JobStore> job_store;
  std::unique_ptr<WebhookSender> webhooks;
  std::unique_ptr<JobRunner> job_runner;

  // Counts a request in flight for as long as it lives (streams keep it alive until they end).
  struct InFlight {
    explicit InFlight(Impl& impl) : impl(impl) {
      std::lock_guard<std::mutex> lock(impl.idle_mutex);
      ++impl.in_flight;
    }
    ~InFlight() {
      {
        std::lock_guard<std::mutex> lock(impl.idle_mutex);
        --impl.in_flight;
      }
      impl.idle_changed.notify_all();
    }
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
    Impl& impl;
  };

  std::string new_id(const char* prefix) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%06llx", static_cast<unsigned long long>(next_id.fetch_add(1)));
    return std::string(prefix) + "-" + id_salt + buf;
  }

  std::optional<ServingHandles> serving() {
    std::lock_guard<std::mutex> lock(handles_mutex);
    return handles;
  }

  // Admits a request for the model (503 while loading / draining) until it has been submitted.
  class Admission {
   public:
    explicit Admission(Impl& impl) : impl_(impl) {
      std::lock_guard<std::mutex> lock(impl.admit_mutex);
      handles_ = impl.require_serving();
      ++impl.admitting;
    }
    ~Admission() {
      {
        std::lock_guard<std::mutex> lock(impl_.admit_mutex);
        --impl_.admitting;
      }
      impl_.admit_done.notify_all();
    }
    Admission(const Admission&) = delete;
    Admission& operator=(const Admission&) = delete;
    const ServingHandles& handles() const { return handles_; }

   private:
    Impl& impl_;
    ServingHandles handles_;
  };

  // The loaded model, or 503 while loading / draining / a rank is at fault.
  ServingHandles require_serving() {
    auto h = serving();
    if (h)
      if (auto why = rank_fault(*h)) throw ApiException(rank_unavailable(*why));
    if (draining.load())
      throw ApiException({503, "The server is shutting down.", "server_error", "", "shutting_down", options.retry_after_seconds});
    if (!h) throw ApiException({503, "The model is still loading.", "server_error", "", "model_loading", options.retry_after_seconds});
    return *h;
  }

  static std::optional<std::string> rank_fault(const ServingHandles& h) {
    return h.rank_fault ? h.rank_fault() : std::nullopt;
  }

  // A rank cannot serve (ServingHandles::rank_fault says why).
  ApiError rank_unavailable(const std::string& why) const {
    return {503, "The model is unavailable: " + why + ".", "server_error", "", "rank_unavailable", options.retry_after_seconds};
  }

  void check_model(const std::string& requested, const ServingHandles& h) {
    if (!requested.empty() && requested != h.model_name)
      throw ApiException({404, "The model '" + printable(requested) + "' does not exist (this server serves '" + h.model_name + "').",
                          "not_found_error", "model", "model_not_found", 0});
  }

  // A cascade's triage model; `status` 400 where a client named it (registration), 500 where a
  // registered policy names a model the server cannot load any more.
  std::shared_ptr<const TriageModel> triage_model(const std::string& name, const std::string& param, int status) const {
    try {
      return triage_models.get(name);
    } catch (const std::invalid_argument& e) {
      throw ApiException({status, std::string("The triage model cannot be used: ") + e.what() + ".",
                          status == 400 ? "invalid_request_error" : "server_error", param, "triage_model_unavailable", 0});
    }
  }

  // The request's deadline, counted from `from` (when the handler got it).
  std::optional<Clock::time_point> deadline(std::optional<double> requested, Clock::time_point from = Clock::now()) const {
    double seconds = options.request_timeout;
    if (requested) seconds = seconds > 0 ? std::min(seconds, *requested) : *requested;
    if (!(seconds > 0)) return std::nullopt;
    return from + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  }

  // Why a classify request's prompts could not be rendered, as an error (413 for a policy that
  // leaves no room, 400 for content that does not fit, 504 deadline, 499 client gone), counted.
  ApiError prompt_error(const ClassifyPrompts& p, const ClassifyRequest& request, const std::vector<std::optional<int>>& versions) {
    const char* reason = p.status == PromptStatus::kDeadline    ? "deadline"
                         : p.status == PromptStatus::kCancelled ? "client_gone"
                                                                : "too_long";
    metrics.counter("arbiter_classify_prompts_stopped_total", kPromptsStoppedHelp, {{"reason", reason}}).inc();
    const std::string param = "policies[" + std::to_string(p.policy) + "]";
    switch (p.status) {
      case PromptStatus::kPolicyTooLong: {
        const size_t i = static_cast<size_t>(p.policy);
        const bool registered = i < versions.size() && versions[i].has_value();
        return {413, "Policy '" + printable(request.policies[i].id) + "' does not fit the context. " + p.why, "invalid_request_error",
                param + (registered ? ".id" : ".text"), "policy_too_long", 0};
      }
      case PromptStatus::kContentTooLong:
        return {400, p.why, "invalid_request_error", "content", "context_length_exceeded", 0};
      case PromptStatus::kDeadline: return *finish_error(FinishReason::kDeadline, false, "");
      case PromptStatus::kCancelled: return *finish_error(FinishReason::kCancelled, true, "");
      case PromptStatus::kOk: break;
    }
    return {500, "Internal error: " + p.why, "server_error", "", "internal_error", 0};
  }

  // POST/DELETE /v1/policies on a read-only policy db.
  void require_writable_policies() const {
    if (registry.read_only())
      throw ApiException({403, "Policies are read-only on this server: it serves the policies of its database and cannot "
                               "register or delete any.", "permission_error", "", "policies_read_only", 0});
  }

  // The scheduler's refusal as an error.
  ApiError submit_error(SubmitStatus status, const std::string& why) const {
    switch (status) {
      case SubmitStatus::kQueueFull:
        return {429, "The request queue is full; retry later.", "rate_limit_error", "", "queue_full", options.retry_after_seconds};
      case SubmitStatus::kTooLong:
        return {400, "The prompt does not fit the model's context: " + why, "invalid_request_error", "", "context_length_exceeded", 0};
      case SubmitStatus::kShuttingDown:
        return {503, "The server is shutting down.", "server_error", "", "shutting_down", options.retry_after_seconds};
      case SubmitStatus::kInvalid:
      default: return {400, "The request was refused: " + why, "invalid_request_error", "", "invalid_request", 0};
    }
  }

  // The error for a generation that ended other than normally; nullopt when it did end normally.
  std::optional<ApiError> finish_error(FinishReason finish, bool client_gone, const std::string& why) const {
    switch (finish) {
      case FinishReason::kDeadline:
        return ApiError{504, "The request did not finish before its deadline.", "timeout_error", "", "timeout", 0};
      case FinishReason::kError:
        return ApiError{500, "The generation failed: " + why, "server_error", "", "generation_failed", 0};
      case FinishReason::kCancelled:
        if (client_gone) return ApiError{499, "The client closed the connection.", "invalid_request_error", "", "client_closed", 0};
        return ApiError{503, "The request was cancelled (the server is shutting down).", "server_error", "", "cancelled",
                        options.retry_after_seconds};
      default: return std::nullopt;
    }
  }

  void count_tokens(const TokenCounts& t) {
    const char* help = "Tokens of answered requests, by kind.";
    metrics.counter("arbiter_tokens_total", help, {{"kind", "prompt"}}).inc(t.prompt);
    metrics.counter("arbiter_tokens_total", help, {{"kind", "cached"}}).inc(t.cached);
    metrics.counter("arbiter_tokens_total", help, {{"kind", "reasoning"}}).inc(t.reasoning);
    metrics.counter("arbiter_tokens_total", help, {{"kind", "completion"}}).inc(t.completion);
  }

  // Computes the policy's prefix into the prefix cache for every warmed effort at which the policy
  // leaves room for content and an answer (at no other can a request use it).
  void warm(const ServingHandles& h, const std::string& policy_text) {
    if (!h.classifier || !h.scheduler) return;
    for (ReasoningEffort effort : options.warm_efforts)
      if (h.classifier->policy_fit(policy_text, effort).fits) h.scheduler->warm(h.classifier->policy_prefix(policy_text, effort));
  }

  // A cascade's request at its most demanding stage (the longest reasoning it may reach), for the
  // fit check before it is admitted.
  static ClassifyRequest cascade_fit_request(const ResolvedClassify& resolved, const Classifier& classifier) {
    ClassifyRequest check = resolved.request;
    int most = -1;
    for (const CascadeConfig& c : resolved.cascades)
      for (const Stage s : c.stages) {
        if (!is_model_stage(s) || s == Stage::kScore) continue;
        const int need = classifier.generation_tokens(stage_effort(s), 0, c.budget(s));
        if (need > most) {
          most = need;
          check.effort = stage_effort(s);
          check.reasoning_budget = c.budget(s);
        }
      }
    return check;
  }
  // The cascade's request: each policy with its cascade, rules and triage model.
  CascadeRequest make_cascade_request(const ResolvedClassify& resolved) const {
    CascadeRequest out;
    out.base = resolved.request;
    for (size_t i = 0; i < resolved.request.policies.size(); ++i) {
      CascadePolicy p;
      p.policy = resolved.request.policies[i];
      p.config = resolved.cascades[i];
      if (const auto rules = resolved.rules[i]) p.rules = [rules](std::string_view content) { return rules->match(content); };
      if (p.config.has(Stage::kTriage)) {
        const auto model = triage_model(p.config.triage_model, "policies[" + std::to_string(i) + "]", 500);
        p.triage = [model](std::string_view content) { return model->predict(content); };
      }
      out.policies.push_back(std::move(p));
    }
    return out;
  }

  HttpReply dispatch(const HttpRequest& req, std::string& endpoint, const std::shared_ptr<InFlight>& guard);
  // job_owner: a job item run for that key (not refused for a full queue; its decisions recorded under that key).
  HttpReply classify(const HttpRequest& req, const ApiKeyIdentity* job_owner = nullptr);
  // guard: keeps the server busy (wait_idle) while the results stream.
  HttpReply moderations(const HttpRequest& req);
  HttpReply jobs_endpoint(const HttpRequest& req, const std::string& endpoint, const std::string& id,
                          const std::shared_ptr<InFlight>& guard);
  HttpReply jobs_post(const HttpRequest& req, const ApiKeyIdentity& who);
  HttpReply jobs_list(const HttpRequest& req, const ApiKeyIdentity& who);
  JobInfo visible_job(const std::string& id, const ApiKeyIdentity& who);
  ItemOutcome run_job_item(const ClaimedItem& item);
  void job_finished(const JobInfo& job);
  // job_item: a job's item (never streamed; background work in the scheduler, bounded already).
  HttpReply chat(const HttpRequest& req, const std::shared_ptr<InFlight>& guard, bool job_item = false);
  HttpReply policies_post(const HttpRequest& req);
  HttpReply policies_list();
  HttpReply policy_get(const std::string& ref_text);
  HttpReply policy_delete(const std::string& ref_text);
  HttpReply models();
  HttpReply expert_stats();
  HttpReply health(bool readiness);
  HttpReply metrics_text();
  HttpReply decisions_endpoint(const HttpRequest& req, const std::string& endpoint, const std::string& id);
  void record_decisions(const ApiKeyIdentity& who, const ResolvedClassify& resolved, const ClassifyResult& result,
                        Clock::time_point received, wire::ClassifyResponse& response);
  wire::Policy policy_wire(const StoredPolicy& p, bool with_versions);
};

// ---------------------------------------------------------------------------------------------
// Routing.

HttpReply ApiServer::Impl::dispatch(const HttpRequest& req, std::string& endpoint, const std::shared_ptr<InFlight>& guard) {
  const std::string& path = req.path;
  const std::string& method = req.method;
  auto allow = [&](std::initializer_list<const char*> methods) {
    for (const char* m : methods)
      if (method == m || (method == "HEAD" && std::string(m) == "GET")) return;
    throw ApiException({405, "Method " + printable(method) + " is not allowed on " + endpoint + ".", "invalid_request_error", "",
                        "method_not_allowed", 0});
  };

  if (path == "/health" || path == "/ready") {
    endpoint = path;
    allow({"GET"});
    return health(path == "/ready");
  }
  if (path == "/metrics") {
    endpoint = path;
    allow({"GET"});
    return metrics_text();
  }
  // The web console (api/console.h): static files, no key needed to load them.
  if (is_console_path(path)) {
    endpoint = "console";
    return console_reply(req);
  }
  if (path.rfind("/v1/", 0) != 0)
    throw ApiException({404, "Unknown path " + printable(path) + ".", "not_found_error", "", "unknown_path", 0});

  if (path == "/v1/classify" || path == "/v1/chat/completions" || path == "/v1/models" || path == "/v1/policies") endpoint = path;
  else if (path.rfind("/v1/policies/", 0) == 0) endpoint = "/v1/policies/{id}";
  else if (path == "/v1/decisions" || path == "/v1/moderations") endpoint = path;
  else if (path == "/v1/jobs" || path == "/v1/stats/experts") endpoint = path;
  else if (path.rfind("/v1/jobs/", 0) == 0) {
    const std::string rest = path.substr(std::string("/v1/jobs/").size());
    auto ends = [&](const std::string& tail) {
      return rest.size() > tail.size() && rest.compare(rest.size() - tail.size(), tail.size(), tail) == 0;
    };
    endpoint = ends("/results") ? "/v1/jobs/{id}/results" : ends("/cancel") ? "/v1/jobs/{id}/cancel" : "/v1/jobs/{id}";
  }
  else if (path.rfind("/v1/decisions/", 0) == 0) {
    const std::string rest = path.substr(std::string("/v1/decisions/").size());
    endpoint = rest.size() >= 9 && rest.compare(rest.size() - 9, 9, "/feedback") == 0 ? "/v1/decisions/{id}/feedback" : "/v1/decisions/{id}";
  }
  else throw ApiException({404, "Unknown path " + printable(path) + ".", "not_found_error", "", "unknown_path", 0});

  if (!options.keys.accepts(header(req, "authorization"))) {
    const bool missing = header(req, "authorization").empty();
    throw ApiException({401,
                        missing ? "You didn't provide an API key (Authorization: Bearer <key>)."
                                : "Incorrect API key provided.",
                        "invalid_request_error", "", "invalid_api_key", 0});
  }
  if (req.body.size() > options.max_body_bytes)
    throw ApiException({413, "The request body is " + std::to_string(req.body.size()) + " bytes; the limit is " +
                                 std::to_string(options.max_body_bytes) + ".",
                        "invalid_request_error", "", "request_too_large", 0});

  if (endpoint == "/v1/classify") {
    allow({"POST"});
    return classify(req);
  }
  if (endpoint == "/v1/moderations") {
    allow({"POST"});
    return moderations(req);
  }
  if (endpoint == "/v1/chat/completions") {
    allow({"POST"});
    return chat(req, guard);
  }
  if (endpoint == "/v1/models") {
    allow({"GET"});
    return models();
  }
  if (endpoint == "/v1/stats/experts") {
    allow({"GET"});
    return expert_stats();
  }
  if (endpoint.rfind("/v1/decisions", 0) == 0) {
    allow({endpoint == "/v1/decisions/{id}/feedback" ? "POST" : "GET"});
    std::string id = path.substr(std::min(path.size(), std::string("/v1/decisions/").size()));
    if (endpoint == "/v1/decisions/{id}/feedback") id.resize(id.size() - 9);
    return decisions_endpoint(req, endpoint, id);
  }
  if (endpoint.rfind("/v1/jobs", 0) == 0) {
    if (endpoint == "/v1/jobs") allow({"GET", "POST"});
    else if (endpoint == "/v1/jobs/{id}/cancel") allow({"POST"});
    else allow({"GET"});
    std::string id = path.substr(std::min(path.size(), std::string("/v1/jobs/").size()));
    if (endpoint == "/v1/jobs/{id}/results") id.resize(id.size() - 8);
    if (endpoint == "/v1/jobs/{id}/cancel") id.resize(id.size() - 7);
    return jobs_endpoint(req, endpoint, id, guard);
  }
  if (endpoint == "/v1/policies") {
    allow({"GET", "POST"});
    return method == "POST" ? policies_post(req) : policies_list();
  }
  allow({"GET", "DELETE"});
  const std::string ref = path.substr(std::string("/v1/policies/").size());
  return method == "DELETE" ? policy_delete(ref) : policy_get(ref);
}

// ---------------------------------------------------------------------------------------------
// POST /v1/classify

HttpReply ApiServer::Impl::classify(const HttpRequest& req, const ApiKeyIdentity* job_owner) {
  const Clock::time_point received = Clock::now();  // parsing and rendering count in the deadline
  wire::ClassifyRequest body;
  parse_json(req.body, body);
  ClassifyLimits limits;
  limits.default_effort = options.default_effort;
  limits.max_policies = options.max_policies_per_request;
  const auto loaded = serving();
  if (loaded) limits.max_context = loaded->max_context;
  ResolvedClassify resolved = resolve_classify(body, registry, limits, &rules_cache);
  const ServingHandles ready = require_serving();
  check_model(body.model(), ready);

  ClassifyRequest& request = resolved.request;
  request.id = new_id("clf");
  request.deadline = deadline(resolved.timeout, received);
  request.cancelled = req.client_gone;
  // A job item is one of at most --job-concurrency the runner keeps in the scheduler: bounded
  // already, it is not refused for a queue that synchronous requests filled.
  request.continuation = job_owner != nullptr;
  request.background = job_owner != nullptr;  // behind synchronous requests, never starved
  // Every policy's prompt, the content tokenized once and only as far as it can fit, before any
  // scheduling (and before admission, so that draining does not wait for it). A cascade is checked
  // at its most demanding stage: an escalation must never find the content too long.
  ClassifyPrompts prompts = ready.classifier->prepare(resolved.cascade ? cascade_fit_request(resolved, *ready.classifier) : request);
  if (!prompts.ok()) throw ApiException(prompt_error(prompts, request, resolved.versions));
  std::optional<CascadeRequest> cascade_request;
  if (resolved.cascade) cascade_request = make_cascade_request(resolved);
  std::optional<Admission> admission(std::in_place, *this);
  const ServingHandles h = admission->handles();
  std::shared_ptr<Cascade> cascade_runner;
  if (resolved.cascade) {
    std::lock_guard<std::mutex> lock(handles_mutex);
    cascade_runner = cascade;
  }
  auto pending = std::make_shared<Pending<ClassifyResult>>();
  auto cascade_result = std::make_shared<std::optional<CascadeResult>>();
  std::string why;
  SubmitStatus status;
  // Early per-policy results, for callers that asked (only generations that ended normally).
  std::function<void(size_t, const PolicyResult&)> on_policy;
  if (req.on_policy_result && !resolved.cascade) {
    auto shape = std::make_shared<ResolvedClassify>();  // what policy_result_wire reads, without the content
    shape->versions = resolved.versions;
    shape->request.return_reasoning = request.return_reasoning;
    on_policy = [sink = req.on_policy_result, shape](size_t index, const PolicyResult& r) {
      if (r.finish == FinishReason::kStop || r.finish == FinishReason::kLength) sink(index, print_json(policy_result_wire(r, *shape, index)));
    };
  }
  // The decision log keeps the reasoning even when the client does not want it back.
  const bool return_reasoning = request.return_reasoning;
  if (decisions && options.decision_log.store_reasoning) request.return_reasoning = true;
  try {
    if (cascade_request) {
      cascade_request->base.return_reasoning = request.return_reasoning;
      status = cascade_runner->submit(
          std::move(*cascade_request),
          [pending, cascade_result](CascadeResult r) {
            ClassifyResult plain = r.result;
            *cascade_result = std::move(r);
            pending->set(std::move(plain));
          },
          &why);
    } else {
      status = h.classifier->submit(request, std::move(prompts), [pending](ClassifyResult r) { pending->set(std::move(r)); }, &why,
                                    std::move(on_policy));
    }
  } catch (const std::invalid_argument& e) {
    throw bad_request(std::string("The request was refused: ") + e.what(), "", "invalid_request");
  }
  request.return_reasoning = return_reasoning;
  admission.reset();
  if (status != SubmitStatus::kAccepted) throw ApiException(submit_error(status, why));
  const auto cancel = [&] {
    if (cascade_runner) cascade_runner->cancel(request.id);
    else h.scheduler->cancel(request.id);
  };

  bool gone = false, cancelled = false;
  Clock::time_point cancelled_at{};
  while (!pending->wait_for(kPoll)) {
    const auto now = Clock::now();
    if (auto why = rank_fault(h)) {  // the answer would come late or never: say so now
      cancel();
      throw ApiException(rank_unavailable(*why));
    }
    if (!cancelled && req.client_gone && req.client_gone()) gone = true;
    if (!cancelled && (gone || (request.deadline && now > *request.deadline + kGrace))) {
      cancel();
      cancelled = true;
      cancelled_at = now;
    }
    if (cancelled && now > cancelled_at + kGrace) {
      throw ApiException(gone ? *finish_error(FinishReason::kCancelled, true, "")
                              : *finish_error(FinishReason::kDeadline, false, ""));
    }
  }
  const ClassifyResult result = pending->take();
  std::string error;
  for (const auto& r : result.results)
    if (!r.error.empty()) error = r.error;
  if (auto e = finish_error(result.finish, gone, error)) throw ApiException(*e);
  count_tokens({result.usage.prompt_tokens, result.usage.cached_tokens, result.usage.reasoning_tokens,
                result.usage.completion_tokens});
  if (result.flagged) metrics.counter("arbiter_classify_flagged_total", kFlaggedHelp).inc();
  wire::ClassifyResponse response = classify_response(result, resolved, h.model_name, unix_now());
  if (*cascade_result) {
    add_cascade_results(**cascade_result, response);
    for (const auto& p : (*cascade_result)->policies) {
      const std::string stage = p.decided_by ? to_string(*p.decided_by) : "none";
      resolved.decided_by.push_back(stage);
      metrics.counter("arbiter_cascade_decisions_total", kCascadeHelp, {{"stage", stage}}).inc();
    }
  }
  if (decisions)  // 503 unless stored
    record_decisions(job_owner ? *job_owner : options.keys.identify(header(req, "authorization")).value_or(ApiKeyIdentity{}),
                     resolved, result, received, response);
  return json_reply(200, print_json(response));
}

// ---------------------------------------------------------------------------------------------
// POST /v1/moderations

HttpReply ApiServer::Impl::moderations(const HttpRequest& req) {
  const Clock::time_point received = Clock::now();
  if (!moderation)
    throw ApiException({404, "This server answers no moderations (start it with --moderation-config FILE).", "not_found_error", "",
                        "moderations_disabled", 0});
  wire::ModerationRequest body;
  parse_json(req.body, body);
  const std::vector<std::string> inputs = moderation_inputs(body, *moderation);
  const ServingHandles ready = require_serving();
  check_model(body.model(), ready);
  const std::vector<ClassifyPolicy> policies = moderation_policies(*moderation, registry);
  const std::string id = new_id("modr");
  const std::vector<std::optional<int>> no_versions(policies.size());
  // Every input's prompts before anything is scheduled: one that cannot fit refuses the request.
  std::vector<ClassifyRequest> requests;
  std::vector<ClassifyPrompts> prompts;
  for (size_t i = 0; i < inputs.size(); ++i) {
    ClassifyRequest r;
    r.id = id + "/" + std::to_string(i);
    r.content = inputs[i];
    r.policies = policies;
    r.mode = moderation->mode;
    r.effort = moderation->effort;
    r.return_reasoning = false;
    r.deadline = deadline(std::nullopt, received);
    r.cancelled = req.client_gone;
    prompts.push_back(ready.classifier->prepare(r));
    if (!prompts.back().ok()) throw ApiException(prompt_error(prompts.back(), r, no_versions));
    requests.push_back(std::move(r));
  }
  std::optional<Admission> admission(std::in_place, *this);
  const ServingHandles h = admission->handles();
  std::vector<std::shared_ptr<Pending<ClassifyResult>>> pending;
  auto cancel_all = [&] {
    for (size_t i = 0; i < pending.size(); ++i) h.scheduler->cancel(requests[i].id);
  };
  for (size_t i = 0; i < requests.size(); ++i) {
    auto p = std::make_shared<Pending<ClassifyResult>>();
    std::string why;
    const SubmitStatus status =
        h.classifier->submit(requests[i], std::move(prompts[i]), [p](ClassifyResult r) { p->set(std::move(r)); }, &why);
    if (status != SubmitStatus::kAccepted) {
      cancel_all();  // the inputs submitted so far
      throw ApiException(submit_error(status, why));
    }
    pending.push_back(std::move(p));
  }
  admission.reset();

  wire::ModerationResponse response;
  response.set_id(id);
  response.set_model(h.model_name);
  bool gone = false, cancelled = false;
  Clock::time_point cancelled_at{};
  const auto request_deadline = requests.front().deadline;
  for (size_t i = 0; i < pending.size(); ++i) {
    while (!pending[i]->wait_for(kPoll)) {
      const auto now = Clock::now();
      if (auto why = rank_fault(h)) {
        cancel_all();
        throw ApiException(rank_unavailable(*why));
      }
      if (!cancelled && req.client_gone && req.client_gone()) gone = true;
      if (!cancelled && (gone || (request_deadline && now > *request_deadline + kGrace))) {
        cancel_all();
        cancelled = true;
        cancelled_at = now;
      }
      if (cancelled && now > cancelled_at + kGrace)
        throw ApiException(gone ? *finish_error(FinishReason::kCancelled, true, "") : *finish_error(FinishReason::kDeadline, false, ""));
    }
    const ClassifyResult result = pending[i]->take();
    std::string error;
    for (const auto& r : result.results)
      if (!r.error.empty()) error = r.error;
    if (auto e = finish_error(result.finish, gone, error)) {
      cancel_all();
      throw ApiException(*e);
    }
    count_tokens({result.usage.prompt_tokens, result.usage.cached_tokens, result.usage.reasoning_tokens,
                  result.usage.completion_tokens});
    *response.add_results() = moderation_result(*moderation, policies, result);
  }
  return json_reply(200, print_json(response));
}

// ---------------------------------------------------------------------------------------------
// The decision log (api/decisions_api.h, docs/decisions.md).

void ApiServer::Impl::record_decisions(const ApiKeyIdentity& who, const ResolvedClassify& resolved, const ClassifyResult& result,
                                       Clock::time_point received, wire::ClassifyResponse& response) {
  const double latency_ms = std::chrono::duration<double, std::milli>(Clock::now() - received).count();
  std::vector<DecisionRecord> records =
      decision_records(result, resolved, options.decision_log, who, latency_ms, decisions->now_ms(), response);
  try {
    decisions->record(std::move(records));
  } catch (const DecisionLogUnavailable& e) {
    throw ApiException({503, std::string("The classification could not be recorded (") + e.what() + "); retry later.", "server_error",
                        "", "decision_log_unavailable", options.retry_after_seconds});
  }
}

HttpReply ApiServer::Impl::decisions_endpoint(const HttpRequest& req, const std::string& endpoint, const std::string& id) {
  if (!decisions)
    throw ApiException({404, "This server keeps no decision log (start it with --db FILE).", "not_found_error", "",
                        "decision_log_disabled", 0});
  const ApiKeyIdentity who = options.keys.identify(header(req, "authorization")).value_or(ApiKeyIdentity{});
  if (endpoint == "/v1/decisions") return json_reply(200, decision_list_json(decisions->store(), req.query, who));
  if (!req.query.empty() && endpoint == "/v1/decisions/{id}")
    throw bad_request("GET /v1/decisions/{id} takes no query parameters.", "", "unknown_parameter");
  if (endpoint == "/v1/decisions/{id}") return json_reply(200, decision_get_json(decisions->store(), id, who));
  return json_reply(200, decision_feedback_json(*decisions, id, req.body, who));
}

// ---------------------------------------------------------------------------------------------
// Jobs (api/jobs.h, docs/jobs.md).

namespace {
// JSON text of a reply (invalid UTF-8 a client sent, e.g. in an idempotency key, replaced).
std::string dump_json(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

// The media type of a Content-Type header, lower-case, without parameters.
std::string media_type(const std::string& content_type) {
  std::string t = content_type.substr(0, content_type.find(';'));
  t.erase(std::remove_if(t.begin(), t.end(), [](unsigned char c) { return std::isspace(c); }), t.end());
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return t;
}

// name -> value of a query string; 400 for a malformed escape or a name not in `known`.
std::map<std::string, std::string> query_params(const std::string& query, std::initializer_list<const char*> known) {
  std::map<std::string, std::string> out;
  size_t start = 0;
  while (start < query.size()) {
    size_t end = query.find('&', start);
    if (end == std::string::npos) end = query.size();
    const std::string item = query.substr(start, end - start);
    start = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    const auto name = percent_decode(item.substr(0, eq), true);
    const auto value = percent_decode(eq == std::string::npos ? "" : item.substr(eq + 1), true);
    if (!name || !value) throw bad_request("Malformed percent-escape in the query string.", name ? *name : "", "invalid_value");
    if (std::none_of(known.begin(), known.end(), [&](const char* k) { return *name == k; }))
      throw bad_request("Unknown query parameter '" + printable(*name) + "'.", *name, "unknown_parameter");
    out[*name] = *value;
  }
  return out;
}
}  // namespace

HttpReply ApiServer::Impl::jobs_endpoint(const HttpRequest& req, const std::string& endpoint, const std::string& id,
                                         const std::shared_ptr<InFlight>& guard) {
  if (!job_store)
    throw ApiException({404, "This server runs no jobs (start it with --db FILE).", "not_found_error", "", "jobs_disabled", 0});
  const ApiKeyIdentity who = options.keys.identify(header(req, "authorization")).value_or(ApiKeyIdentity{});
  if (endpoint == "/v1/jobs") return req.method == "POST" ? jobs_post(req, who) : jobs_list(req, who);
  if (!req.query.empty()) throw bad_request(req.method + " " + endpoint + " takes no query parameters.", "", "unknown_parameter");
  if (endpoint == "/v1/jobs/{id}") return json_reply(200, dump_json(job_json(visible_job(id, who))));
  if (endpoint == "/v1/jobs/{id}/cancel") {
    visible_job(id, who);
    bool changed = false;
    const auto job = job_store->cancel(id, changed);
    if (!job) throw ApiException({404, "No job '" + printable(id) + "'.", "not_found_error", "id", "job_not_found", 0});
    if (!changed)
      throw ApiException({409, "Job '" + job->id + "' is " + job->state + " already and cannot be cancelled.", "invalid_request_error",
                          "id", "job_finished", 0});
    job_finished(*job);
    return json_reply(200, dump_json(job_json(*job)));
  }
  // Results: one JSONL line per finished item, in submission order (OpenAI batch output lines),
  // streamed a page of items at a time so that a large job's results are never all in memory.
  const JobInfo job = visible_job(id, who);
  HttpReply r;
  r.content_type = "application/jsonl";
  r.stream = [guard, store = job_store.get(), seq = job.seq](const std::function<bool(std::string_view)>& write) {
    constexpr size_t kPage = 256;
    int64_t after = -1;
    for (;;) {
      std::string page;
      const size_t n = store->results(seq, after, kPage, [&](int64_t index, const std::string& custom_id, int status, const std::string& body) {
        after = index;
        page += dump_json(job_result_line(custom_id, status, body));
        page += '\n';
      });
      if (!page.empty() && !write(page)) return;  // the client is gone
      if (n < kPage) return;
    }
  };
  return r;
}

JobInfo ApiServer::Impl::visible_job(const std::string& id, const ApiKeyIdentity& who) {
  auto job = id.empty() ? std::nullopt : job_store->get(id);
  // Another key's job is reported as absent: keys do not learn of each other's jobs.
  if (!job || (!who.admin && job->owner != who.id))
    throw ApiException({404, "No job '" + printable(id) + "'.", "not_found_error", "id", "job_not_found", 0});
  return *job;
}

HttpReply ApiServer::Impl::jobs_post(const HttpRequest& req, const ApiKeyIdentity& who) {
  const std::string type = media_type(header(req, "content-type"));
  const bool jsonl = type == "application/jsonl" || type == "application/x-ndjson" || type == "application/x-jsonlines" ||
                     type == "application/jsonlines";
  // JSONL bodies hold only items: the idempotency key and the webhook come as query parameters
  // (or the Idempotency-Key header, for either form).
  const auto params = query_params(req.query, {"idempotency_key", "webhook_url", "webhook_items"});
  if (!jsonl && !params.empty())
    throw bad_request("Query parameters are for JSONL bodies; a JSON body carries idempotency_key and webhook_url itself.",
                      params.begin()->first, "unknown_parameter");
  ClassifyLimits limits;
  limits.default_effort = options.default_effort;
  limits.max_policies = options.max_policies_per_request;
  const auto loaded = serving();
  if (loaded) limits.max_context = loaded->max_context;
  // Every item is checked as its endpoint would check it, before anything is stored.
  const auto check = [&](const std::string& url, const std::string& text) {
    if (url == kChatUrl) {
      wire::ChatCompletionRequest body;
      parse_json(text, body);
      if (body.stream()) throw bad_request("A job item cannot stream: drop \"stream\".", "stream", "invalid_value");
      if (loaded) {
        check_model(body.model(), *loaded);
        ChatLimits chat_limits;
        chat_limits.default_effort = options.default_effort;
        chat_limits.max_context = loaded->max_context;
        plan_chat(body, HarmonyRenderer(*loaded->tokenizer), chat_limits, [] { return false; });
      }
      return;
    }
    wire::ClassifyRequest body;
    parse_json(text, body);
    resolve_classify(body, registry, limits, &rules_cache);
    if (loaded) check_model(body.model(), *loaded);
  };
  JobSubmission sub;
  try {
    sub = parse_job_submission(req.body, jsonl, static_cast<size_t>(options.jobs.max_items), check);
  } catch (const JobItemsInvalid& e) {
    return json_reply(400, e.body());
  }
  if (jsonl) {
    if (auto it = params.find("idempotency_key"); it != params.end() && !it->second.empty()) sub.idempotency_key = it->second;
    if (auto it = params.find("webhook_url"); it != params.end() && !it->second.empty()) sub.webhook_url = it->second;
    if (auto it = params.find("webhook_items"); it != params.end()) {
      if (it->second != "true" && it->second != "false")
        throw bad_request("webhook_items must be true or false.", "webhook_items", "invalid_value");
      sub.webhook_items = it->second == "true";
    }
  }
  if (sub.webhook_items && !sub.webhook_url)
    throw bad_request("webhook_items needs a webhook_url to post the items to.", "webhook_items", "missing_webhook_url");
  if (!sub.idempotency_key && !header(req, "idempotency-key").empty()) sub.idempotency_key = header(req, "idempotency-key");
  if (sub.idempotency_key && sub.idempotency_key->size() > 256)
    throw bad_request("The idempotency key is longer than 256 bytes.", "idempotency_key", "invalid_value");
  if (sub.webhook_url) {
    if (options.jobs.webhook_allow.empty())
      throw bad_request("This server sends no webhooks (no --webhook-allow); leave webhook_url out.", "webhook_url", "webhook_not_allowed");
    if (!webhook_allowed(*sub.webhook_url, options.jobs.webhook_allow))
      throw bad_request("webhook_url '" + printable(*sub.webhook_url) + "' is not allowed: it must be an http:// or https:// URL "
                        "starting with one of the server's allowed prefixes.",
                        "webhook_url", "webhook_not_allowed");
  }
  // What the items were, to tell a repeated submission from a reused key.
  std::string fingerprint;
  for (const JobItemInput& item : sub.items)
    fingerprint += sha256_hex(item.custom_id + '\0' + item.body + (item.url == kClassifyUrl ? "" : '\0' + item.url));
  bool created = false;
  const JobInfo job = job_store->create(who.id, sub, sha256_hex(fingerprint), created);
  if (!created && job.request_sha256 != sha256_hex(fingerprint))
    throw ApiException({409, "The idempotency key was used before for a job with other items ('" + job.id + "').",
                        "invalid_request_error", "idempotency_key", "idempotency_key_reused", 0});
  if (created) {
    metrics.counter("arbiter_jobs_created_total", kJobsCreatedHelp).inc();
    job_runner->wake();
  }
  return json_reply(created ? 201 : 200, dump_json(job_json(job)));
}

HttpReply ApiServer::Impl::jobs_list(const HttpRequest& req, const ApiKeyIdentity& who) {
  const auto params = query_params(req.query, {"limit", "after"});
  size_t limit = 20;
  if (auto it = params.find("limit"); it != params.end()) {
    char* end = nullptr;
    const long n = std::strtol(it->second.c_str(), &end, 10);
    if (it->second.empty() || *end != '\0' || n < 1 || n > 100) throw bad_request("limit must be 1..100.", "limit", "invalid_value");
    limit = static_cast<size_t>(n);
  }
  int64_t before = 0;
  if (auto it = params.find("after"); it != params.end()) {
    const auto job = job_store->get(it->second);
    if (!job || (!who.admin && job->owner != who.id))
      throw bad_request("after names no job of this key.", "after", "invalid_value");
    before = job->seq;
  }
  std::vector<JobInfo> jobs = job_store->list(who.admin ? std::nullopt : std::optional<std::string>(who.id), before, limit + 1);
  const bool more = jobs.size() > limit;
  if (more) jobs.resize(limit);
  nlohmann::json data = nlohmann::json::array();
  for (const JobInfo& j : jobs) data.push_back(job_json(j));
  nlohmann::json out = {{"object", "list"}, {"data", std::move(data)}, {"has_more", more}};
  out["first_id"] = jobs.empty() ? nlohmann::json() : nlohmann::json(jobs.front().id);
  out["last_id"] = jobs.empty() ? nlohmann::json() : nlohmann::json(jobs.back().id);
  return json_reply(200, dump_json(out));
}

ItemOutcome ApiServer::Impl::run_job_item(const ClaimedItem& item) {
  if (draining.load()) return {503, "", true};  // stays pending for the next start
  HttpRequest req;
  req.method = "POST";
  req.path = item.url;
  req.body = item.body;
  const ApiKeyIdentity owner{item.owner, false};
  HttpReply r;
  try {
    r = item.url == kChatUrl ? chat(req, nullptr, true) : classify(req, &owner);
  } catch (const ApiException& e) {
    r = error_reply(e.error());
  } catch (const StorageUnavailable&) {
    return {503, "", true};  // the database is away: the item stays pending
  }
  // A full queue, a draining server, a rank at fault, a busy decision log: the item runs later.
  if (r.status == 429 || r.status == 503) return {r.status, r.body, true};
  metrics.counter("arbiter_job_items_finished_total", kJobItemsHelp, {{"outcome", r.status == 200 ? "completed" : "failed"}}).inc();
  return {r.status, r.body, false};
}

void ApiServer::Impl::job_finished(const JobInfo& job) {
  metrics.counter("arbiter_jobs_finished_total", kJobsFinishedHelp, {{"state", job.state}}).inc();
  if (job.webhook_url && webhooks) webhooks->wake();
}

// ---------------------------------------------------------------------------------------------
// POST /v1/chat/completions

namespace {

// Waits (briefly) for new tokens and feeds them to `out`; returns true once the generation is over
// and every token was read.
bool read_tokens(ChatRun& run, ChatOutput& out, size_t& consumed, ChatOutput::Delta& delta) {
  std::vector<int32_t> fresh;
  bool done = false;
  {
    std::unique_lock<std::mutex> lock(run.mutex);
    run.changed.wait_for(lock, kPoll, [&] { return run.tokens.size() > consumed || run.result.has_value(); });
    fresh.assign(run.tokens.begin() + static_cast<std::ptrdiff_t>(std::min(consumed, run.tokens.size())), run.tokens.end());
    if (run.result) {
      done = true;
      // Tokens the result holds beyond what on_token delivered.
      const auto& all = run.result->tokens;
      for (size_t i = consumed + fresh.size(); i < all.size(); ++i) fresh.push_back(all[i].token);
    }
  }
  consumed += fresh.size();
  for (int32_t t : fresh) {
    const ChatOutput::Delta d = out.push(t);
    delta.reasoning += d.reasoning;
    delta.content += d.content;
  }
  return done;
}

void fill_chat_usage(const SequenceResult& r, wire::ChatUsage& u) {
  const int completion = static_cast<int>(r.tokens.size());
  u.set_prompt_tokens(r.prompt_tokens);
  u.set_completion_tokens(completion);
  u.set_total_tokens(r.prompt_tokens + completion);
  u.mutable_prompt_tokens_details()->set_cached_tokens(r.cached_tokens);
  u.mutable_completion_tokens_details()->set_reasoning_tokens(r.reasoning_tokens);
}

std::string sse(const std::string& json) { return "data: " + json + "\n\n"; }

// Cancels a generation whose reply was dropped before it finished (a stream never started).
class CancelUnlessFinished {
 public:
  CancelUnlessFinished(Scheduler* scheduler, std::string id, std::shared_ptr<ChatRun> run)
      : scheduler(scheduler), id(std::move(id)), run(std::move(run)) {}
  CancelUnlessFinished(const CancelUnlessFinished&) = delete;
  CancelUnlessFinished& operator=(const CancelUnlessFinished&) = delete;
  ~CancelUnlessFinished() {
    if (!run->finished()) scheduler->cancel(id);
  }

 private:
  Scheduler* scheduler;
  std::string id;
  std::shared_ptr<ChatRun> run;
};

}  // namespace

HttpReply ApiServer::Impl::chat(const HttpRequest& req, const std::shared_ptr<InFlight>& guard, bool job_item) {
  const Clock::time_point received = Clock::now();  // parsing and rendering count in the deadline
  wire::ChatCompletionRequest body;
  parse_json(req.body, body);
  std::optional<Admission> admission(std::in_place, *this);
  const ServingHandles h = admission->handles();
  check_model(body.model(), h);
  const HarmonyRenderer renderer(*h.tokenizer);
  ChatLimits limits;
  limits.default_effort = options.default_effort;
  limits.max_context = h.max_context;
  // Tokenizing the messages stops for a client that hung up or a deadline that passed.
  const auto render_deadline = deadline(body.has_timeout() && body.timeout() > 0 ? std::optional<double>(body.timeout()) : std::nullopt, received);
  bool gone = false;
  const std::function<bool()> stop = [&] {
    gone = req.client_gone && req.client_gone();
    return gone || (render_deadline && Clock::now() > *render_deadline);
  };
  ChatPlan plan;
  try {
    plan = plan_chat(body, renderer, limits, stop);
  } catch (const RenderStopped&) {
    throw ApiException(*finish_error(gone ? FinishReason::kCancelled : FinishReason::kDeadline, gone, ""));
  }
  if (job_item && plan.stream) throw bad_request("A job item cannot stream: drop \"stream\".", "stream", "invalid_value");

  auto run = std::make_shared<ChatRun>();
  RequestSpec spec;
  spec.id = new_id("chatcmpl");
  spec.deadline = deadline(plan.timeout, received);
  spec.sequences.push_back(plan.sequence);
  spec.continuation = job_item;
  spec.background = job_item;
  spec.on_token = [run](int, const GeneratedToken& t) {
    {
      std::lock_guard<std::mutex> lock(run->mutex);
      run->tokens.push_back(t.token);
    }
    run->changed.notify_all();
  };
  spec.on_done = [run](std::vector<SequenceResult> results) {
    {
      std::lock_guard<std::mutex> lock(run->mutex);
      run->result = results.empty() ? SequenceResult{} : std::move(results[0]);
      if (results.empty()) run->result->finish = FinishReason::kError;
    }
    run->changed.notify_all();
  };
  const std::string id = spec.id;
  const auto deadline_at = spec.deadline;
  std::string why;
  const SubmitStatus status = h.scheduler->submit(std::move(spec), &why);
  admission.reset();
  if (status != SubmitStatus::kAccepted) throw ApiException(submit_error(status, why));

  const std::string model = h.model_name;
  const uint32_t created = unix_now();
  auto output = std::make_shared<ChatOutput>(*h.tokenizer, plan.stop);
  auto cleanup = std::make_shared<CancelUnlessFinished>(h.scheduler, id, run);
  Scheduler* scheduler = h.scheduler;
  std::function<bool()> client_gone = req.client_gone;
  std::function<std::optional<std::string>()> fault = h.rank_fault;

  // How reading a generation ended (besides its FinishReason).
  struct Outcome {
    bool stopped_by_string = false;
    bool gone = false;
    std::optional<std::string> rank_fault;  // abandoned: a rank cannot serve (why)
  };
  // Reads the generation to its end, calling `on_delta` with each piece of text (false: the client
  // is gone); cancels on a stop string, a gone client, a rank at fault or a scheduler that never answers.
  auto drive = [run, output, scheduler, id, deadline_at, client_gone, fault](
                   const std::function<bool(const ChatOutput::Delta&)>& on_delta) -> Outcome {
    Outcome o;
    size_t consumed = 0;
    bool cancelled = false;
    Clock::time_point cancelled_at{};
    for (;;) {
      ChatOutput::Delta delta;
      const bool done = read_tokens(*run, *output, consumed, delta);
      if (done) {
        const ChatOutput::Delta tail = output->finish();
        delta.reasoning += tail.reasoning;
        delta.content += tail.content;
      }
      if (!delta.empty() && !o.gone && !on_delta(delta)) o.gone = true;
      if (done) break;
      if (fault) o.rank_fault = fault();
      if (o.rank_fault) {
        scheduler->cancel(id);
        break;
      }
      const auto now = Clock::now();
      if (!o.gone && client_gone && client_gone()) o.gone = true;
      if (!cancelled && output->stopped()) o.stopped_by_string = true;
      if (!cancelled && (o.gone || o.stopped_by_string || (deadline_at && now > *deadline_at + kGrace))) {
        scheduler->cancel(id);
        cancelled = true;
        cancelled_at = now;
      }
      if (cancelled && now > cancelled_at + kGrace) {
        // The scheduler never answered: give up (the generation is abandoned).
        std::lock_guard<std::mutex> lock(run->mutex);
        if (!run->result) {
          run->result = SequenceResult{};
          run->result->finish = o.gone ? FinishReason::kCancelled : FinishReason::kDeadline;
        }
      }
    }
    if (output->stopped()) o.stopped_by_string = true;
    return o;
  };
  auto finish_reason = [run](const Outcome& o) -> std::string {
    if (o.stopped_by_string) return "stop";
    return run->result->finish == FinishReason::kLength ? "length" : "stop";
  };
  auto tokens_of = [this](const SequenceResult& r) {
    count_tokens({r.prompt_tokens, r.cached_tokens, r.reasoning_tokens, static_cast<int>(r.tokens.size())});
  };

  if (!plan.stream) {
    const Outcome o = drive([](const ChatOutput::Delta&) { return true; });
    if (o.rank_fault) throw ApiException(rank_unavailable(*o.rank_fault));
    const SequenceResult& r = *run->result;
    if (!o.stopped_by_string)
      if (auto e = finish_error(r.finish, o.gone, r.error)) throw ApiException(*e);
    tokens_of(r);
    wire::ChatCompletionResponse out;
    out.set_id(id);
    out.set_object("chat.completion");
    out.set_created(created);
    out.set_model(model);
    wire::ChatChoice* choice = out.add_choices();
    choice->set_index(0);
    choice->mutable_message()->set_role("assistant");
    choice->mutable_message()->set_content(output->content());
    choice->mutable_message()->set_reasoning(output->reasoning());
    choice->mutable_message()->set_reasoning_content(output->reasoning());
    choice->set_finish_reason(finish_reason(o));
    choice->mutable_logprobs()->set_null_value(google::protobuf::NULL_VALUE);
    fill_chat_usage(r, *out.mutable_usage());
    return json_reply(200, print_json(out));
  }

  HttpReply reply;
  reply.content_type = "text/event-stream";
  reply.headers.emplace_back("Cache-Control", "no-cache");
  reply.stream_probe = ":\n\n";  // an SSE comment
  const bool include_usage = plan.include_usage;
  reply.stream = [=, this](const std::function<bool(std::string_view)>& write) {
    (void)guard;    // the request stays in flight until the stream ends
    (void)cleanup;  // cancels the generation if this never runs
    auto chunk = [&]() {
      wire::ChatCompletionChunk c;
      c.set_id(id);
      c.set_object("chat.completion.chunk");
      c.set_created(created);
      c.set_model(model);
      return c;
    };
    auto choice_of = [](wire::ChatCompletionChunk& c) {
      wire::ChatChunkChoice* choice = c.add_choices();
      choice->set_index(0);
      choice->mutable_finish_reason()->set_null_value(google::protobuf::NULL_VALUE);
      choice->mutable_logprobs()->set_null_value(google::protobuf::NULL_VALUE);
      return choice;
    };
    {
      wire::ChatCompletionChunk first = chunk();
      wire::ChatChunkChoice* choice = choice_of(first);
      choice->mutable_delta()->set_role("assistant");
      choice->mutable_delta()->set_content("");
      if (!write(sse(print_json(first)))) {
        scheduler->cancel(id);
        return;
      }
    }
    const Outcome o = drive([&](const ChatOutput::Delta& d) {
      wire::ChatCompletionChunk c = chunk();
      wire::ChatDelta* delta = choice_of(c)->mutable_delta();
      if (!d.reasoning.empty()) {
        delta->set_reasoning(d.reasoning);
        delta->set_reasoning_content(d.reasoning);
      }
      if (!d.content.empty()) delta->set_content(d.content);
      return write(sse(print_json(c)));
    });
    if (o.gone) return;
    if (o.rank_fault) {
      write(sse(error_json(rank_unavailable(*o.rank_fault))));
      write("data: [DONE]\n\n");
      return;
    }
    const SequenceResult& r = *run->result;
    if (!o.stopped_by_string)
      if (auto e = finish_error(r.finish, false, r.error)) {
        write(sse(error_json(*e)));
        write("data: [DONE]\n\n");
        return;
      }
    tokens_of(r);
    wire::ChatCompletionChunk last = chunk();
    wire::ChatChunkChoice* choice = choice_of(last);
    choice->mutable_delta();
    choice->mutable_finish_reason()->set_string_value(finish_reason(o));
    if (!write(sse(print_json(last)))) return;
    if (include_usage) {
      wire::ChatCompletionChunk usage = chunk();
      fill_chat_usage(r, *usage.mutable_usage());
      if (!write(sse(print_json(usage)))) return;
    }
    write("data: [DONE]\n\n");
  };
  return reply;
}

// ---------------------------------------------------------------------------------------------
// Policies.

wire::Policy ApiServer::Impl::policy_wire(const StoredPolicy& p, bool with_versions) {
  wire::Policy w;
  w.set_object("policy");
  w.set_id(p.draft.id);
  w.set_version(p.version);
  w.set_text(p.draft.text);
  for (const auto& l : p.draft.labels) w.add_labels(l);
  for (const auto& l : p.draft.violating_labels) w.add_violating_labels(l);
  w.set_description(p.draft.description);
  if (p.draft.rules.is_object()) *w.mutable_rules() = to_struct(p.draft.rules);
  if (p.draft.cascade.is_object()) *w.mutable_cascade() = to_struct(p.draft.cascade);
  w.set_created(static_cast<uint32_t>(p.created));
  if (with_versions)
    for (int v : registry.versions(p.draft.id)) w.add_versions(v);
  if (auto h = serving(); h && h->classifier)  // tokenized only as far as the context (a lower bound beyond)
    w.set_prompt_tokens(h->classifier->policy_fit(p.draft.text, options.default_effort).prompt_tokens -
                        h->classifier->suffix_tokens());
  return w;
}

HttpReply ApiServer::Impl::policies_post(const HttpRequest& req) {
  require_writable_policies();
  wire::PolicyCreateRequest body;
  parse_json(req.body, body);
  if (body.id().empty()) throw bad_request("Missing required parameter: 'id'.", "id", "missing_required_parameter");
  if (!PolicyRegistry::valid_id(body.id()))
    throw bad_request("Policy ids are 1-128 letters, digits, '_', '-' or '.' (got '" + printable(body.id()) + "').", "id", "invalid_value");
  if (body.text().empty()) throw bad_request("'text' must be a non-empty string.", "text", "empty_policy");
  PolicyDraft draft;
  draft.id = body.id();
  draft.text = body.text();
  draft.labels.assign(body.labels().begin(), body.labels().end());
  draft.violating_labels.assign(body.violating_labels().begin(), body.violating_labels().end());
  draft.description = body.description();
  for (size_t i = 0; i < draft.labels.size(); ++i)
    if (draft.labels[i].empty()) throw bad_request("Labels must not be empty.", "labels[" + std::to_string(i) + "]", "invalid_value");
  for (size_t i = 0; i < draft.violating_labels.size(); ++i)
    if (std::find(draft.labels.begin(), draft.labels.end(), draft.violating_labels[i]) == draft.labels.end())
      throw bad_request("Violating label '" + printable(draft.violating_labels[i]) + "' is not one of the policy's labels.",
                        "violating_labels[" + std::to_string(i) + "]", "invalid_value");
  // The moderation pipeline: rules must compile, the cascade must be valid and its triage model load.
  if (body.has_rules()) draft.rules = struct_json(body.rules());
  if (body.has_cascade()) draft.cascade = struct_json(body.cascade());
  policy_rules(draft.rules, draft.labels, draft.violating_labels, &rules_cache, "rules");
  const CascadeConfig config = policy_cascade(draft.cascade, !draft.rules.is_null(), true, "cascade");
  if (config.has(Stage::kTriage)) triage_model(config.triage_model, "cascade.triage_model", 400);
  // A policy whose prompt leaves no room for content and an answer at any effort is refused (with a
  // model loaded; policies registered while it loads are checked when it is attached).
  if (auto h = serving(); h && h->classifier)
    if (const PolicyFit fit = h->classifier->policy_fit_any(draft.text); !fit.fits)
      throw ApiException({413, fit.describe(), "invalid_request_error", "text",
                          "policy_too_long", 0});
  bool created = false;
  const StoredPolicy stored = registry.put(draft, &created);
  if (created)
    if (auto h = serving()) warm(*h, stored.draft.text);
  metrics.gauge("arbiter_policies", "Registered policies (latest versions).").set(static_cast<double>(registry.list().size()));
  return json_reply(created ? 201 : 200, print_json(policy_wire(stored, true)));
}

HttpReply ApiServer::Impl::policies_list() {
  wire::PolicyList list;
  list.set_object("list");
  for (const StoredPolicy& p : registry.list()) *list.add_data() = policy_wire(p, true);
  return json_reply(200, print_json(list));
}

namespace {
PolicyRef parse_policy_path(const std::string& text) {
  const auto ref = PolicyRegistry::parse_ref(text);
  if (!ref) throw bad_request("Malformed policy reference '" + printable(text) + "' (expected 'id' or 'id@version').", "id", "invalid_value");
  return *ref;
}
}  // namespace

HttpReply ApiServer::Impl::policy_get(const std::string& ref_text) {
  const auto stored = registry.get(parse_policy_path(ref_text));
  if (!stored)
    throw ApiException({404, "No policy '" + printable(ref_text) + "' is registered.", "not_found_error", "id", "policy_not_found", 0});
  return json_reply(200, print_json(policy_wire(*stored, true)));
}

HttpReply ApiServer::Impl::policy_delete(const std::string& ref_text) {
  require_writable_policies();
  const PolicyRef ref = parse_policy_path(ref_text);
  const std::vector<int> removed = registry.remove(ref);
  if (removed.empty())
    throw ApiException({404, "No policy '" + printable(ref_text) + "' is registered.", "not_found_error", "id", "policy_not_found", 0});
  wire::PolicyDeleted out;
  out.set_object("policy.deleted");
  out.set_id(ref.id);
  for (int v : removed) out.add_versions(v);
  out.set_deleted(true);
  metrics.gauge("arbiter_policies", "Registered policies (latest versions).").set(static_cast<double>(registry.list().size()));
  return json_reply(200, print_json(out));
}

// ---------------------------------------------------------------------------------------------
// Models, health, metrics.

HttpReply ApiServer::Impl::models() {
  const ServingHandles h = require_serving();
  wire::ModelList list;
  list.set_object("list");
  wire::Model* m = list.add_data();
  m->set_id(h.model_name);
  m->set_object("model");
  m->set_created(started);
  m->set_owned_by("arbiter");
  m->set_max_context(h.max_context);
  return json_reply(200, print_json(list));
}

// The expert-load statistics file (runtime/expert_stats.h) from the step loop's last snapshot of
// every rank's counters, with the aggregates /metrics shows.
HttpReply ApiServer::Impl::expert_stats() {
  const ServingHandles h = require_serving();
  if (!h.loop) throw ApiException({503, "No step loop to read expert statistics from.", "server_error", "", "unavailable", 0});
  const ExpertLoadSnapshot snap = h.loop->expert_load();
  nlohmann::json out;
  out["model"] = h.model_name;
  out["ranks"] = h.world_size;
  out["ready"] = !snap.load.empty();  // false until a step ran after the first request
  out["expert_load"] = expert_load_json(snap.load);
  out["rank_tokens"] = snap.rank_tokens;
  out["rank_imbalance"] = snap.rank_imbalance;
  out["expert_imbalance"] = snap.expert_imbalance;
  return json_reply(200, dump_json(out));
}

HttpReply ApiServer::Impl::health(bool readiness) {
  wire::HealthResponse out;
  const auto h = serving();
  const bool drain = draining.load();
  if (h) {
    out.set_model(h->model_name);
    out.set_ranks(h->world_size);
  }
  if (!readiness) {
    out.set_status("ok");
    return json_reply(200, print_json(out));
  }
  const std::optional<std::string> fault = h ? rank_fault(*h) : std::nullopt;
  out.set_status(fault ? "rank_fault" : drain ? "draining" : h ? "ready" : "loading");
  if (fault) out.set_message(*fault);
  HttpReply r = json_reply(h && !drain && !fault ? 200 : 503, print_json(out));
  if (r.status == 503) r.headers.emplace_back("Retry-After", std::to_string(options.retry_after_seconds));
  return r;
}

HttpReply ApiServer::Impl::metrics_text() {
  const auto h = serving();
  const bool fault = h && rank_fault(*h);
  metrics.gauge("arbiter_ready", "1 when the model is loaded, every rank is up and the server is not draining.")
      .set(h && !draining.load() && !fault ? 1 : 0);
  metrics.gauge("arbiter_rank_fault", "1 while a rank died or stalls (/ready says which).").set(fault ? 1 : 0);
  {
    std::lock_guard<std::mutex> lock(idle_mutex);
    metrics.gauge("arbiter_http_in_flight", "HTTP requests being handled.").set(in_flight - 1);  // less this scrape
  }
  metrics.gauge("arbiter_policies", "Registered policies (latest versions).").set(static_cast<double>(registry.list().size()));
  metrics.gauge("arbiter_job_items_in_flight", kJobItemsInFlightHelp).set(job_runner ? static_cast<double>(job_runner->in_flight()) : 0);
  if (decisions) {
    const DecisionLog::Stats d = decisions->stats();
    metrics.counter("arbiter_decisions_stored_total", "Decisions written to the decision log.").set_total(static_cast<double>(d.stored));
    metrics.counter("arbiter_decision_commits_total", "Decision log transactions (each holds the decisions of concurrent requests).")
        .set_total(static_cast<double>(d.commits));
    metrics.counter("arbiter_decisions_unstored_total", "Decisions not stored (their requests were answered 503), by reason.", {{"reason", "queue_full"}})
        .set_total(static_cast<double>(d.refused));
    metrics.counter("arbiter_decisions_unstored_total", "Decisions not stored (their requests were answered 503), by reason.", {{"reason", "store_failed"}})
        .set_total(static_cast<double>(d.failed));
    metrics.counter("arbiter_decisions_expired_total", "Decisions deleted by the retention period.").set_total(static_cast<double>(d.swept));
  }
  if (h && h->scheduler) {
    const SchedulerStats s = h->scheduler->stats();
    metrics.gauge("arbiter_queue_depth", "Requests waiting in the scheduler's queue.").set(s.queued_requests);
    metrics.gauge("arbiter_waiting_sequences", "Sequences admitted but not placed on a rank (or preempted).").set(s.waiting_sequences);
    metrics.gauge("arbiter_running_sequences", "Sequences placed on a rank.").set(s.running_sequences);
    metrics.counter("arbiter_steps_total", "Forward steps run.").set_total(static_cast<double>(s.steps));
    const char* token_help = "Tokens the scheduler ran, by kind (prefill computed, cached reused, decode sampled).";
    metrics.counter("arbiter_scheduler_tokens_total", token_help, {{"kind", "prefill"}}).set_total(static_cast<double>(s.prefill_tokens));
    metrics.counter("arbiter_scheduler_tokens_total", token_help, {{"kind", "cached"}}).set_total(static_cast<double>(s.cached_tokens));
    metrics.counter("arbiter_scheduler_tokens_total", token_help, {{"kind", "decode"}}).set_total(static_cast<double>(s.decode_tokens));
    metrics.gauge("arbiter_batch_tokens", "Input tokens of the last step, all ranks.").set(s.last_step_tokens);
    metrics.gauge("arbiter_batch_tokens_per_step", "Input tokens per step on average, all ranks.")
        .set(s.steps ? static_cast<double>(s.prefill_tokens + s.decode_tokens) / static_cast<double>(s.steps) : 0);
    metrics.counter("arbiter_prefix_cache_lookups_total", "Sequences admitted (prefix-cache lookups).").set_total(static_cast<double>(s.prefix_lookups));
    metrics.counter("arbiter_prefix_cache_hits_total", "Admitted sequences that reused at least one cached block.").set_total(static_cast<double>(s.prefix_hits));
    metrics.gauge("arbiter_prefix_cache_hit_rate", "Share of admitted sequences that reused cached prefix blocks.")
        .set(s.prefix_lookups ? static_cast<double>(s.prefix_hits) / static_cast<double>(s.prefix_lookups) : 0);
    metrics.gauge("arbiter_prefix_cache_token_hit_rate", "Share of prompt tokens taken from the prefix cache.")
        .set(s.cached_tokens + s.prefill_tokens ? static_cast<double>(s.cached_tokens) / static_cast<double>(s.cached_tokens + s.prefill_tokens) : 0);
    metrics.counter("arbiter_preemptions_total", "Sequences preempted for lack of KV blocks.").set_total(static_cast<double>(s.preemptions));
    static const char* kFinish[] = {"stop", "length", "cancelled", "deadline", "error"};
    for (int i = 0; i < 5; ++i)
      metrics.counter("arbiter_sequences_finished_total", "Finished sequences, by reason.", {{"reason", kFinish[i]}})
          .set_total(static_cast<double>(s.finished[i]));
    for (size_t r = 0; r < s.ranks.size(); ++r) {
      const MetricLabels rank{{"rank", std::to_string(r)}};
      metrics.gauge("arbiter_kv_blocks_used", "KV blocks referenced by running sequences, per rank.", rank).set(s.ranks[r].blocks_used);
      metrics.gauge("arbiter_kv_blocks_cached", "Unreferenced KV blocks kept by the prefix cache, per rank.", rank).set(s.ranks[r].blocks_cached);
      metrics.gauge("arbiter_kv_blocks_total", "KV blocks per rank.", rank).set(s.ranks[r].blocks_total);
      metrics.gauge("arbiter_rank_running_sequences", "Sequences running per rank.", rank).set(s.ranks[r].running);
    }
  }
  if (h && h->loop) {
    const StepLoopStats ls = h->loop->stats();
    const std::vector<double> bounds(std::begin(StepLoopStats::kStepBuckets), std::end(StepLoopStats::kStepBuckets));
    if (ls.step_histogram.size() == bounds.size() + 1)
      metrics.histogram("arbiter_step_latency_seconds", "Wall time of whole forward steps.", bounds).set(ls.step_histogram, ls.step_seconds);
    const char* help = "Where step-loop time goes: scheduler (plan + results), exchange (plans/results between ranks), forward.";
    metrics.counter("arbiter_step_seconds_total", help, {{"part", "scheduler"}}).set_total(ls.scheduler_seconds);
    metrics.counter("arbiter_step_seconds_total", help, {{"part", "exchange"}}).set_total(ls.exchange_seconds);
    metrics.counter("arbiter_step_seconds_total", help, {{"part", "forward"}}).set_total(ls.forward_seconds);
    // Expert load: the step loop's last snapshot (refreshed at most once a second, on a step after a scrape).
    const ExpertLoadSnapshot el = h->loop->expert_load();
    if (!el.load.empty()) {
      int64_t total = 0;
      for (int64_t t : el.rank_tokens) total += t;
      metrics.counter("arbiter_expert_tokens_routed_total", "Token-to-expert assignments (k per token per MoE layer), all ranks.")
          .set_total(static_cast<double>(total));
      for (size_t r = 0; r < el.rank_tokens.size(); ++r)
        metrics.gauge("arbiter_expert_load_share", "Share of routed tokens processed by each rank's experts (all layers).",
                      {{"rank", std::to_string(r)}})
            .set(total ? static_cast<double>(el.rank_tokens[r]) / static_cast<double>(total) : 0);
      auto stats = [&](const std::vector<double>& v, const char* over) {
        double mean = 0, most = 0;
        for (double x : v) {
          mean += x / static_cast<double>(v.size());
          most = std::max(most, x);
        }
        const char* help = "Expert load imbalance: per layer the most loaded rank's (or expert's) tokens over the mean; "
                           "the mean and the worst over layers.";
        metrics.gauge("arbiter_expert_load_imbalance", help, {{"over", over}, {"stat", "mean"}}).set(mean);
        metrics.gauge("arbiter_expert_load_imbalance", help, {{"over", over}, {"stat", "max"}}).set(most);
      };
      stats(el.rank_imbalance, "ranks");
      stats(el.expert_imbalance, "experts");
    }
  }
  HttpReply r = json_reply(200, metrics.render());
  r.content_type = "text/plain; version=0.0.4; charset=utf-8";
  return r;
}

// ---------------------------------------------------------------------------------------------
// ApiServer.

ApiServer::ApiServer(ApiOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {
  std::random_device rd;
  char salt[16];
  std::snprintf(salt, sizeof(salt), "%08x", rd());
  impl_->id_salt = salt;
  impl_->metrics.gauge("arbiter_policies", "Registered policies (latest versions).")
      .set(static_cast<double>(impl_->registry.list().size()));
  impl_->metrics.counter("arbiter_classify_flagged_total", kFlaggedHelp);
  for (const char* stage : {"rules", "triage", "score", "low", "medium", "high", "none"})
    impl_->metrics.counter("arbiter_cascade_decisions_total", kCascadeHelp, {{"stage", stage}});
  for (const char* reason : kPromptsStoppedReasons)
    impl_->metrics.counter("arbiter_classify_prompts_stopped_total", kPromptsStoppedHelp, {{"reason", reason}});
  impl_->metrics.counter("arbiter_jobs_created_total", kJobsCreatedHelp);
  for (const char* outcome : {"completed", "failed"})
    impl_->metrics.counter("arbiter_job_items_finished_total", kJobItemsHelp, {{"outcome", outcome}});
  for (const char* state : {"completed", "failed", "cancelled"})
    impl_->metrics.counter("arbiter_jobs_finished_total", kJobsFinishedHelp, {{"state", state}});
  for (const char* outcome : {"delivered", "retried", "failed"}) {
    impl_->metrics.counter("arbiter_job_webhooks_total", kWebhooksHelp, {{"outcome", outcome}});
    impl_->metrics.counter("arbiter_job_item_webhooks_total", kItemWebhooksHelp, {{"outcome", outcome}});
  }
  impl_->metrics.gauge("arbiter_job_items_in_flight", kJobItemsInFlightHelp).set(0);
}

ApiServer::~ApiServer() { stop(); }

MetricsRegistry& ApiServer::metrics() { return impl_->metrics; }
PolicyRegistry& ApiServer::policies() { return impl_->registry; }

HttpReply ApiServer::handle(const HttpRequest& request) {
  const auto start = Clock::now();
  auto guard = std::make_shared<Impl::InFlight>(*impl_);
  std::string endpoint = "other";
  HttpReply reply;
  try {
    reply = impl_->dispatch(request, endpoint, guard);
  } catch (const ApiException& e) {
    reply = error_reply(e.error());
  } catch (const StorageUnavailable& e) {
    reply = error_reply({503, std::string("The database is unavailable (") + e.what() + "); nothing was stored, retry later.",
                         "server_error", "", "database_unavailable", impl_->options.retry_after_seconds});
  } catch (const std::exception& e) {
    reply = error_reply({500, std::string("Internal error: ") + e.what(), "server_error", "", "internal_error", 0});
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  impl_->metrics.counter("arbiter_http_requests_total", "HTTP requests answered, by endpoint and status.",
                         {{"endpoint", endpoint}, {"status", std::to_string(reply.status)}})
      .inc();
  impl_->metrics
      .histogram("arbiter_http_request_duration_seconds", "Time to answer (streams: to the first byte), by endpoint.",
                 {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}, {{"endpoint", endpoint}})
      .observe(seconds);
  return reply;
}

void ApiServer::attach(const ServingHandles& handles) {
  {
    std::lock_guard<std::mutex> lock(impl_->handles_mutex);
    impl_->handles = handles;
    if (handles.classifier) {
      impl_->cascade_stages = std::make_shared<ClassifierStages>(*handles.classifier);
      impl_->cascade = std::make_shared<Cascade>(*impl_->cascade_stages);
    }
  }
  // Policies from the db (or registered while loading) that leave no room for content and an answer
  // stay stored but are not warmed; requests naming them get 413.
  for (const StoredPolicy& p : impl_->registry.list()) {
    if (handles.classifier)
      if (const PolicyFit fit = handles.classifier->policy_fit_any(p.draft.text); !fit.fits) {
        std::cerr << "arbiter serve: warning: policy '" << p.draft.id << "' version " << p.version
                  << " is not warmed: " << fit.describe() << std::endl;
        continue;
      }
    impl_->warm(handles, p.draft.text);
  }
  // Jobs run once the model is attached (items left pending by a crash or a stop included).
  if (impl_->job_runner) impl_->job_runner->start();
}

void ApiServer::drain() {
  std::unique_lock<std::mutex> lock(impl_->admit_mutex);
  impl_->draining.store(true);
  impl_->admit_done.wait(lock, [&] { return impl_->admitting == 0; });
}

bool ApiServer::wait_idle(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(impl_->idle_mutex);
  return impl_->idle_changed.wait_for(lock, timeout, [&] { return impl_->in_flight == 0; });
}

int ApiServer::bind() {
  const ApiOptions& o = impl_->options;
  HttpTransportOptions t;
  t.host = o.host;
  t.port = o.port;
  t.max_body_bytes = o.max_body_bytes;
  t.handler_threads = o.http_threads;
  t.max_waiting = o.max_waiting;
  t.max_connections = o.max_connections;
  t.header_timeout = o.header_timeout;
  t.body_timeout = o.body_timeout;
  t.idle_timeout = o.idle_timeout;
  t.retry_after_seconds = o.retry_after_seconds;
  impl_->http = std::make_unique<HttpTransport>(t, [this](const HttpRequest& r) { return handle(r); }, impl_->metrics);
  return impl_->http->bind();
}

void ApiServer::start() {
  if (!impl_->http) throw std::logic_error("ApiServer::start before bind");
  impl_->http->start();
}

void ApiServer::stop() {
  // The job runner first: its items wait on the model, which the caller stops after this returns;
  // an item not finished by then stays pending and runs after a restart.
  if (impl_->job_runner) impl_->job_runner->stop();
  if (impl_->http) impl_->http->stop();
}

}  // namespace arbiter::api
