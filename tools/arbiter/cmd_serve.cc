// `arbiter serve`: the HTTP API (api/server.h), and with --grpc-port its gRPC twin
// (api/grpc_server.h), over the serving engine. Rank 0 listens and prints the address(es) as soon as
// they are bound (model endpoints answer 503 and /ready fails until the
// weights are loaded on every rank), runs the step loop and answers requests; under mpirun (or
// --ranks N thread ranks) the other ranks only run steps. SIGTERM or SIGINT (to rank 0) drains: no
// new work is accepted, requests in flight are answered, then every rank exits cleanly.
//
// Under mpirun rank 0 also watches the other ranks (heartbeats, parallel/heartbeat.h): while one
// stalls, /ready and model requests answer 503 and requests in flight fail at once; once one died
// (or the exchange with the ranks broke), rank 0 answers what is in flight with 503 and ends the
// job with kRankFaultExit, so that whoever runs the job restarts the whole group.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <future>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "api/auth.h"
#include "api/grpc_server.h"
#include "api/pg_util.h"
#include "api/server.h"
#include "api/webhook_client.h"
#include "scheduler/serving.h"
#include "tools/arbiter/cli_args.h"
#include "tools/arbiter/commands.h"
#include "tools/arbiter/ranks.h"
#include "tools/arbiter/serving_args.h"

namespace arbiter {
namespace {

// Exit status of a job that rank 0 ended because a rank died or the exchange with the ranks broke
// (EX_TEMPFAIL: restarting the group is expected to help).
constexpr int kRankFaultExit = 75;
// How long rank 0 lets requests in flight take to receive their 503 before it ends the job.
constexpr auto kFaultAnswerWait = std::chrono::seconds(2);

// The non-empty items of a comma-separated list.
std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> out;
  for (size_t start = 0; start <= list.size();) {
    const size_t comma = std::min(list.find(',', start), list.size());
    if (comma > start) out.push_back(list.substr(start, comma - start));
    start = comma + 1;
  }
  return out;
}

// Options of `arbiter serve` that are not the engine's.
api::ApiOptions api_options(const CliArgs& args) {
  api::ApiOptions o;
  o.host = args.get("host", o.host);
  o.port = static_cast<int>(args.get_int("port", o.port));
  if (o.port < 0 || o.port > 65535) throw std::invalid_argument("--port must be 0..65535");
  if (args.has("api-key-file")) o.keys = api::ApiKeys::load(args.get("api-key-file", ""));
  const long long body = args.get_int("max-body-bytes", static_cast<long long>(o.max_body_bytes));
  if (body < 1) throw std::invalid_argument("--max-body-bytes must be positive");
  o.max_body_bytes = static_cast<size_t>(body);
  o.request_timeout = std::stod(args.get("request-timeout", std::to_string(o.request_timeout)));
  if (o.request_timeout < 0) throw std::invalid_argument("--request-timeout must not be negative (0: none)");
  o.http_threads = static_cast<int>(args.get_int("http-threads", o.http_threads));
  if (o.http_threads < 1) throw std::invalid_argument("--http-threads must be positive");
  o.max_waiting = static_cast<int>(args.get_int("max-waiting", o.max_waiting));
  if (o.max_waiting < 0) throw std::invalid_argument("--max-waiting must not be negative");
  o.max_connections = static_cast<int>(args.get_int("max-connections", o.max_connections));
  if (o.max_connections < 1) throw std::invalid_argument("--max-connections must be positive");
  auto positive_seconds = [&](const char* name, double& value) {
    value = std::stod(args.get(name, std::to_string(value)));
    if (!(value > 0)) throw std::invalid_argument(std::string("--") + name + " must be a positive number of seconds");
  };
  positive_seconds("header-timeout", o.header_timeout);
  positive_seconds("body-timeout", o.body_timeout);
  positive_seconds("idle-timeout", o.idle_timeout);
  o.default_effort = parse_reasoning_effort(args.get("effort", "medium"));
  o.policy_db = args.get("policy-db", "");
  o.policy_db_readonly = args.flag("policy-db-readonly");
  o.triage_dir = args.get("triage-dir", "");
  o.moderation_config = args.get("moderation-config", "");
  if (o.policy_db_readonly && o.policy_db.empty()) throw std::invalid_argument("--policy-db-readonly needs --policy-db");
  // The decision log: --db, else a writable --policy-db; its settings only with one.
  const std::string db = args.get("db", "");
  if (o.policy_db.empty()) o.policy_db = db;
  api::DecisionLogSettings& d = o.decision_log;
  d.db = !db.empty() ? db : o.policy_db_readonly ? "" : o.policy_db;
  // Jobs live in the same database (with or without a decision log).
  api::JobOptions& jobs = o.jobs;
  jobs.db = d.db;
  jobs.max_items = static_cast<int>(args.get_int("max-job-items", jobs.max_items));
  if (jobs.max_items < 1) throw std::invalid_argument("--max-job-items must be positive");
  const double lease = std::stod(args.get("job-lease-seconds", "30"));
  if (!(lease >= 1 && lease <= 3600)) throw std::invalid_argument("--job-lease-seconds must be 1..3600");
  if (args.has("job-lease-seconds") && !api::pg::is_url(jobs.db))
    throw std::invalid_argument("--job-lease-seconds is for jobs in PostgreSQL (--db postgres://...)");
  jobs.lease = std::chrono::milliseconds(static_cast<long long>(lease * 1000));
  jobs.concurrency = static_cast<int>(args.get_int("job-concurrency", jobs.concurrency));
  if (jobs.concurrency < 1 || jobs.concurrency > 256) throw std::invalid_argument("--job-concurrency must be 1..256");
  jobs.webhook_attempts = static_cast<int>(args.get_int("webhook-attempts", jobs.webhook_attempts));
  if (jobs.webhook_attempts < 1 || jobs.webhook_attempts > 20) throw std::invalid_argument("--webhook-attempts must be 1..20");
  for (const std::string& prefix : split_list(args.get("webhook-allow", "")))
    // The host must be whole: a prefix ends its host with a '/', so "http://hooks.internal" cannot
    // also allow "http://hooks.internal.example.com".
    if (!api::valid_webhook_prefix(prefix))
      throw std::invalid_argument("--webhook-allow takes http(s)://HOST[:PORT]/[PATH] URL prefixes, the host ended by a '/' (got '" +
                                  prefix + "')");
    else jobs.webhook_allow.push_back(prefix);
  jobs.webhook_ca = args.get("webhook-ca", "");
  if (!jobs.webhook_ca.empty() && jobs.webhook_allow.empty()) throw std::invalid_argument("--webhook-ca is for webhooks (--webhook-allow)");
  if (args.has("webhook-secret-file")) {
    std::ifstream in(args.get("webhook-secret-file", ""), std::ios::binary);
    if (!in) throw std::invalid_argument("--webhook-secret-file cannot be read");
    jobs.webhook_secret.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    while (!jobs.webhook_secret.empty() && std::isspace(static_cast<unsigned char>(jobs.webhook_secret.back()))) jobs.webhook_secret.pop_back();
    if (jobs.webhook_secret.empty()) throw std::invalid_argument("--webhook-secret-file is empty");
  }
  if (!jobs.webhook_allow.empty() && jobs.webhook_secret.empty())
    throw std::invalid_argument("--webhook-allow needs --webhook-secret-file (webhooks are signed)");
  if (!jobs.webhook_allow.empty() && jobs.db.empty()) throw std::invalid_argument("--webhook-allow needs a database for jobs (--db FILE)");
  jobs.retention_days = std::stod(args.get("job-retention-days", "0"));
  if (!(jobs.retention_days >= 0)) throw std::invalid_argument("--job-retention-days must not be negative (0: keep every job)");
  if (jobs.retention_days > 0 && jobs.db.empty()) throw std::invalid_argument("--job-retention-days needs a database for jobs (--db FILE)");
  if (args.flag("no-decision-log")) d.db.clear();
  for (const char* name : {"store-content", "store-reasoning", "retention-days"})
    if (args.has(name) && d.db.empty())
      throw std::invalid_argument(std::string("--") + name + " needs a decision log (--db FILE, or a writable --policy-db)");
  const std::string content = args.get("store-content", "hash");
  if (content == "full") d.content = api::ContentStorage::kFull;
  else if (content == "hash") d.content = api::ContentStorage::kHash;
  else if (content == "none") d.content = api::ContentStorage::kNone;
  else throw std::invalid_argument("--store-content takes full, hash or none (got '" + content + "')");
  const std::string reasoning = args.get("store-reasoning", "on");
  if (reasoning != "on" && reasoning != "off") throw std::invalid_argument("--store-reasoning takes on or off (got '" + reasoning + "')");
  d.store_reasoning = reasoning == "on";
  d.log.retention_days = std::stod(args.get("retention-days", "0"));
  if (!(d.log.retention_days >= 0)) throw std::invalid_argument("--retention-days must not be negative (0: keep every decision)");
  const double interval = std::stod(args.get("retention-interval", "3600"));
  if (!(interval > 0)) throw std::invalid_argument("--retention-interval must be a positive number of seconds");
  d.log.retention_interval = std::chrono::milliseconds(static_cast<long long>(interval * 1000));
  jobs.retention_interval = d.log.retention_interval;
  if (args.has("retention-interval") && d.db.empty() && !(jobs.retention_days > 0))
    throw std::invalid_argument("--retention-interval needs a decision log (--db FILE) or --job-retention-days");
  if (args.has("warm-efforts")) {  // e.g. "low,medium"; "none": registered policies are not precomputed
    o.warm_efforts.clear();
    std::string list = args.get("warm-efforts", "");
    for (size_t start = 0; start <= list.size();) {
      const size_t comma = std::min(list.find(',', start), list.size());
      const std::string item = list.substr(start, comma - start);
      if (!item.empty() && item != "none") o.warm_efforts.push_back(parse_reasoning_effort(item));
      start = comma + 1;
    }
  }
  o.max_policies_per_request = static_cast<int>(args.get_int("max-policies", o.max_policies_per_request));
  return o;
}

// --grpc-port: absent, no gRPC server.
std::optional<int> grpc_port(const CliArgs& args) {
  if (!args.has("grpc-port")) return std::nullopt;
  const long long port = args.get_int("grpc-port", 0);
  if (port < 0 || port > 65535) throw std::invalid_argument("--grpc-port must be 0..65535");
  return static_cast<int>(port);
}

// The engine's options; `http_threads` bounds the scheduler's queue: every queued request is waited
// for by one handler thread, so a longer queue could never fill and its 429 would never be sent.
ServingOptions serve_options(const CliArgs& args, int http_threads) {
  ServingOptions o = serving_options(args);
  o.max_queued_requests = static_cast<int>(args.get_int("max-queued", http_threads));
  if (o.max_queued_requests < 1) throw std::invalid_argument("--max-queued must be positive");
  if (o.max_queued_requests > http_threads)
    throw std::invalid_argument("--max-queued (" + std::to_string(o.max_queued_requests) + ") exceeds --http-threads (" +
                                std::to_string(http_threads) +
                                "): each queued request holds a handler thread, so the queue could never fill and "
                                "clients would wait unseen instead of getting 429; lower --max-queued or raise --http-threads");
  o.count_expert_load = !args.flag("no-expert-stats");
  o.heartbeat_timeout = std::stod(args.get("heartbeat-timeout", "3"));
  if (!(o.heartbeat_timeout >= 0)) throw std::invalid_argument("--heartbeat-timeout must not be negative (0: no heartbeats)");
  o.step_timeout = std::stod(args.get("step-timeout", "30"));
  if (!(o.step_timeout >= 0)) throw std::invalid_argument("--step-timeout must not be negative (0: no limit)");
  return o;
}

// Waits up to `timeout` for SIGTERM / SIGINT (blocked in every thread, see cmd_serve); 0 when none came.
int wait_for_signal(const sigset_t& signals, std::chrono::milliseconds timeout) {
  const timespec ts{static_cast<time_t>(timeout.count() / 1000), static_cast<long>(timeout.count() % 1000) * 1000000L};
  const int sig = sigtimedwait(&signals, nullptr, &ts);
  return sig > 0 ? sig : 0;
}

// Rank 0 after a fault the job cannot serve through (a rank died, or the exchange broke; or any
// fault while shutting down): requests in flight get their 503 (the handlers see the fault), then
// every rank ends with kRankFaultExit. Does not return.
[[noreturn]] void end_job(api::ApiServer& server, const RankContext& rank, const RankFault& fault) {
  std::cerr << "arbiter serve: " << fault.message << "; answering requests in flight with 503, then ending the job (exit "
            << kRankFaultExit << ")" << std::endl;
  if (!server.wait_idle(std::chrono::duration_cast<std::chrono::milliseconds>(kFaultAnswerWait)))
    std::cerr << "arbiter serve: requests still open after " << kFaultAnswerWait.count() << " s" << std::endl;
  // Let the HTTP threads write the last replies; stopping can wait on slow connections, so bounded.
  auto stopped = std::make_shared<std::promise<void>>();
  std::future<void> done = stopped->get_future();
  std::thread([&server, stopped] {
    server.stop();
    stopped->set_value();
  }).detach();
  done.wait_for(std::chrono::seconds(1));
  std::cout.flush();
  std::cerr.flush();
  // MPI_Abort ends every rank (a stalled one too); thread ranks share this process.
  if (rank.comm && rank.comm->name() != "threads") rank.comm->abort(fault.message, kRankFaultExit);
  std::_Exit(kRankFaultExit);
}

}  // namespace

const char* const kServeUsage =
    "usage: arbiter serve --model DIR [options]        (mpirun -np N arbiter serve ... : experts over N ranks)\n"
    "  --host H                 listen address (127.0.0.1)\n"
    "  --port P                 port (8080; 0: any free port); the address and pid are printed once bound\n"
    "  --grpc-port P            also serve the gRPC API (api/grpc.proto) on this port (0: any free port)\n"
    "  --api-key-file F         bearer keys, one per line: /v1/* then needs 'Authorization: Bearer <key>'\n"
    "  --policy-db F|URL        SQLite file (or postgres:// URL) keeping registered policies across restarts; it\n"
    "                           (and its folder) must be writable, and every row one the API could have stored, or\n"
    "                           start-up fails\n"
    "  --policy-db-readonly     serve the policies of --policy-db without changing them (POST/DELETE /v1/policies: 403)\n"
    "  --triage-dir DIR         folder of fastText triage models (`arbiter triage train`) that policies' cascades\n"
    "                           name by file name (\"triage_model\"; pipeline/README.md)\n"
    "  --moderation-config F    POST /v1/moderations (OpenAI-compatible): which policies answer for which\n"
    "                           categories (configs/moderation/example.json)\n"
    "  --db F|URL               SQLite file of the decision log (docs/decisions.md) and jobs, and of the policies when\n"
    "                           no --policy-db is given. Without --db the decision log goes into a writable --policy-db;\n"
    "                           with neither there is no decision log. A postgres://USER:PASSWORD@HOST[:PORT]/DB URL\n"
    "                           keeps them in PostgreSQL instead, shared by every replica started on it (schema\n"
    "                           created and migrated at start; docs/operating.md, \"Many replicas on PostgreSQL\")\n"
    "  --no-decision-log        keep no decision log even with a database\n"
  "  --max-job-items N        items per job of POST /v1/jobs (10000; jobs live in the --db database, docs/jobs.md)\n"
  "  --job-concurrency N      job items classified at once, behind synchronous requests (4)\n"
  "  --job-lease-seconds S    PostgreSQL: how long a replica holds a job item without renewing its lease; the items\n"
  "                           of a replica that died are taken over by the others after this (30)\n"
  "  --webhook-allow P[,P...] URL prefixes http(s)://HOST[:PORT]/[PATH] a job's webhook_url may start with (none: refused)\n"
  "  --webhook-ca FILE        PEM CAs trusted for https webhook receivers, besides the system's\n"
  "  --webhook-secret-file F  key of the webhooks' X-Arbiter-Signature (HMAC-SHA256); needed with --webhook-allow\n"
  "  --webhook-attempts N     deliveries tried per webhook, with exponential backoff from 0.5 s (5)\n"
    "  --store-content full|hash|none  what the decision log keeps of the content (hash: its SHA-256 only)\n"
    "  --store-reasoning on|off whether the decision log keeps the reasoning (on)\n"
    "  --retention-days N       delete decisions older than N days, at start and every --retention-interval (0: keep)\n"
    "  --retention-interval S   seconds between retention sweeps, of decisions and of jobs (3600)\n"
    "  --job-retention-days N   delete finished jobs, their items and results, N days after they finished once no\n"
    "                           webhook of theirs is pending; at start and every --retention-interval (0: keep)\n"
    "  --request-timeout S      seconds a request may take (600; 0: none); a request's 'timeout' may shorten it\n"
    "  --max-body-bytes N       larger bodies get 413 (4194304); gRPC: the largest request message\n"
    "  --http-threads N         requests handled at once, each waiting for the model (256); gRPC: calls at once\n"
    "  --max-queued N           requests waiting for a rank before 429 (= --http-threads; at most that)\n"
    "  --max-waiting N          complete requests waiting for a free handler thread before 429 (1024)\n"
    "  --max-connections N      open connections before 503 (4096, capped by the descriptor limit)\n"
    "  --header-timeout S       seconds for a request head from its first byte (10)\n"
    "  --body-timeout S         seconds for a request body after its head (60)\n"
    "  --idle-timeout S         seconds a keep-alive connection may stay idle (5)\n"
    "  --effort low|medium|high default reasoning effort (medium)\n"
    "  --warm-efforts LIST      efforts registered policies are precomputed for (low,medium,high; none)\n"
    "  --served-model-name NAME the model id of /v1/models (the model folder's name)\n"
    "  --max-policies N         policies per classify request (32)\n"
    "  --no-prefix-cache        disable prefix caching\n"
    "  --no-expert-stats        do not count tokens per layer and expert (GET /v1/stats/experts, the\n"
    "                           arbiter_expert_* metrics; on one GPU the count is one small kernel per layer)\n"
    "  engine: --device cpu|cuda[:N]|auto (auto) --tokenizer DIR (the model's) --kv-blocks N (0: enough for two\n"
    "          sequences of --max-context, at least 2048) --step-tokens N (256) --step-samples N (64)\n"
    "          --top-logprobs N (20)\n"
    "  --transport auto|threads|mpi|nccl, --ranks N, --placement FILE  expert parallelism (see `arbiter logits --help`)\n"
    "  --max-context N          prompt + generated tokens per request and policy (8192)\n"
    "  --reasoning-budget N|L,M,H  reasoning tokens per effort (256,1024,4096); --answer-tokens N after it (256).\n"
    "                           Each effort's budget + answer tokens must leave room for a prompt in --max-context,\n"
    "                           or start-up fails. A policy whose prompt leaves no room for content and an answer\n"
    "                           at the cheapest effort is refused (413 policy_too_long) and not warmed.\n"
    "  --heartbeat-timeout S    mpirun: a worker rank not heard from for S seconds stalls (3; 0: no heartbeats)\n"
    "  --step-timeout S         mpirun: a worker rank that has not completed a step S seconds after rank 0\n"
    "                           started it stalls (30; 0: no limit); must exceed the longest step\n"
    "SIGTERM/SIGINT (to rank 0) drains: in-flight requests are answered, then every rank exits 0.\n"
    "A worker rank that stalls: /ready and model requests answer 503 (rank_fault, rank_unavailable) until it\n"
    "is back. A worker rank that died: requests in flight get 503, then rank 0 ends the job (MPI_Abort, status\n"
    "75; mpirun may report the dead rank's status instead). Restart the whole group (docs/operating.md).\n";

int cmd_serve(const CliArgs& args) {
  // Termination signals are taken synchronously by rank 0's thread; every thread started from
  // here on inherits the mask (worker ranks ignore them and stop when rank 0 shuts the loop down).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  run_ranks(args, [&](const CliArgs& rank_args, const RankContext& rank) {
    // The HTTP options are read (and checked) on every rank; only rank 0 serves them.
    const api::ApiOptions opts = api_options(rank_args);
    const ServingOptions serving_opts = serve_options(rank_args, opts.http_threads);
    if (!rank.leads()) {
      (void)grpc_port(rank_args);
      (void)rank_args.get("served-model-name", "");
      rank_args.check_all_used();
      ServingRank serving(serving_opts, rank.comm, rank.placement);
      std::cout << "arbiter serve: rank " << rank.comm->rank() << " of " << rank.comm->size() << " running steps (pid "
                << getpid() << ")" << std::endl;
      serving.serve_workers();
      return;
    }
    const std::optional<int> grpc_at = grpc_port(rank_args);
    const std::string served_name = rank_args.get("served-model-name", "");
    rank_args.check_all_used();
    api::ApiServer server(opts);
    const int port = server.bind();
    server.start();
    // The pid: under mpirun, SIGTERM to rank 0 drains the job and every process exits 0 (mpirun
    // itself, signalled, forwards the signal, rank 0 still drains, but mpirun reports failure).
    std::cout << "arbiter serve: listening on http://" << opts.host << ":" << port << " (pid " << getpid() << ")" << std::endl;
    if (api::pg::is_url(opts.policy_db) || api::pg::is_url(opts.jobs.db))
      std::cout << "arbiter serve: storage in PostgreSQL " << api::pg::masked(api::pg::is_url(opts.jobs.db) ? opts.jobs.db : opts.policy_db)
                << " (schema version " << api::pg::schema_version() << ")" << std::endl;
    std::optional<api::GrpcServer> grpc;  // stops before `server`, whose handle() it calls
    if (grpc_at) {
      grpc.emplace(server, opts, *grpc_at);
      const int grpc_bound = grpc->start();
      std::cout << "arbiter serve: gRPC on " << opts.host << ":" << grpc_bound << std::endl;
    }

    ServingRank serving(serving_opts, rank.comm, rank.placement);
    serving.loop().start();
    api::ServingHandles handles;
    handles.classifier = &serving.classifier();
    handles.scheduler = &serving.scheduler();
    handles.loop = &serving.loop();
    handles.tokenizer = &serving.tokenizer();
    handles.model_name = served_name.empty() ? serving.model_name() : served_name;
    handles.max_context = std::min(serving.options().max_context, serving.config().max_position_embeddings);
    handles.world_size = serving.world_size();
    handles.rank_fault = [&serving]() -> std::optional<std::string> {
      if (auto fault = serving.rank_fault()) return fault->message;
      return std::nullopt;
    };
    server.attach(handles);
    if (grpc) grpc->set_serving(true);
    std::cout << "arbiter serve: ready (model " << handles.model_name << ", " << handles.world_size << " rank"
              << (handles.world_size > 1 ? "s" : "") << ", " << server.policies().list().size() << " policies)"
              << std::endl;

    // Until a signal or a fatal rank fault; a stall is reported when it starts and when it ends.
    int sig = 0;
    std::optional<RankFault> fault;
    for (;;) {
      sig = wait_for_signal(signals, std::chrono::milliseconds(100));
      std::optional<RankFault> now = serving.rank_fault();
      if (now && (!fault || now->rank != fault->rank || now->fatal != fault->fatal))
        std::cerr << "arbiter serve: " << now->message << "; /ready and model requests answer 503" << std::endl;
      if (!now && fault) std::cerr << "arbiter serve: rank " << fault->rank << " is back; ready" << std::endl;
      fault = std::move(now);
      if ((fault && fault->fatal) || sig) break;
    }
    if (fault) end_job(server, rank, *fault);  // a rank died, or a signal while one stalls

    std::cout << "arbiter serve: " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ", draining" << std::endl;
    server.drain();                   // /ready fails, new model requests get 503
    if (grpc) grpc->set_serving(false);
    // In-flight generations finish, while the ranks are watched: when a rank dies mpirun signals every
    // other rank, and a drain waiting on a dead or stalled rank would hang until the communicator's timeout.
    serving.scheduler().stop_accepting();
    while (serving.scheduler().has_work()) {
      if ((fault = serving.rank_fault())) end_job(server, rank, *fault);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    serving.loop().stop(true);        // nothing left in flight: the workers are released
    if (!server.wait_idle(std::chrono::seconds(30)))  // their replies (and streams) are written
      std::cerr << "arbiter serve: requests still open after 30 s; closing\n";
    if (grpc) grpc->stop();           // streams write their last message
    server.stop();
    std::cout << "arbiter serve: stopped" << std::endl;
  });
  return 0;
}

}  // namespace arbiter
