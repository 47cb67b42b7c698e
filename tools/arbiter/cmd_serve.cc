// `arbiter serve`: the HTTP API (api/server.h) over the serving engine. Rank 0 listens and prints
// the address as soon as it is bound (model endpoints answer 503 and /ready fails until the
// weights are loaded on every rank), runs the step loop and answers requests; under mpirun (or
// --ranks N thread ranks) the other ranks only run steps. SIGTERM or SIGINT (to rank 0) drains: no
// new work is accepted, requests in flight are answered, then every rank exits cleanly.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <stdexcept>
#include <string>

#include "api/auth.h"
#include "api/server.h"
#include "scheduler/serving.h"
#include "tools/arbiter/cli_args.h"
#include "tools/arbiter/ranks.h"
#include "tools/arbiter/serving_args.h"

namespace arbiter {
namespace {

const char* kServeUsage =
    "usage: arbiter serve --model DIR [options]        (mpirun -np N arbiter serve ... : experts over N ranks)\n"
    "  --host H                 listen address (127.0.0.1)\n"
    "  --port P                 port (8080; 0: any free port); the address and pid are printed once bound\n"
    "  --api-key-file F         bearer keys, one per line: /v1/* then needs 'Authorization: Bearer <key>'\n"
    "  --policy-db F            SQLite file keeping registered policies across restarts; it (and its folder)\n"
    "                           must be writable, and every row one the API could have stored, or start-up fails\n"
    "  --policy-db-readonly     serve the policies of --policy-db without changing them (POST/DELETE /v1/policies: 403)\n"
    "  --request-timeout S      seconds a request may take (600; 0: none); a request's 'timeout' may shorten it\n"
    "  --max-body-bytes N       larger bodies get 413 (4194304)\n"
    "  --max-queued N           requests waiting for a rank before 429 (1024)\n"
    "  --http-threads N         connections served at once (128)\n"
    "  --effort low|medium|high default reasoning effort (medium)\n"
    "  --warm-efforts LIST      efforts registered policies are precomputed for (low,medium,high; none)\n"
    "  --served-model-name NAME the model id of /v1/models (the model folder's name)\n"
    "  --max-policies N         policies per classify request (32)\n"
    "  --no-prefix-cache        disable prefix caching\n"
    "  engine: --device cpu|cuda[:N]|auto --tokenizer DIR --kv-blocks N --step-tokens N --step-samples N\n"
    "          --top-logprobs N --transport auto|threads|mpi|nccl --ranks N --placement FILE\n"
    "  --max-context N          prompt + generated tokens per request and policy (8192)\n"
    "  --reasoning-budget N|L,M,H  reasoning tokens per effort (256,1024,4096); --answer-tokens N after it (256).\n"
    "                           Each effort's budget + answer tokens must leave room for a prompt in --max-context,\n"
    "                           or start-up fails. A policy whose prompt leaves no room for content and an answer\n"
    "                           at the cheapest effort is refused (413 policy_too_long) and not warmed.\n"
    "SIGTERM/SIGINT (to rank 0) drains: in-flight requests are answered, then every rank exits 0.\n";

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
  o.default_effort = parse_reasoning_effort(args.get("effort", "medium"));
  o.policy_db = args.get("policy-db", "");
  o.policy_db_readonly = args.flag("policy-db-readonly");
  if (o.policy_db_readonly && o.policy_db.empty()) throw std::invalid_argument("--policy-db-readonly needs --policy-db");
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

ServingOptions serve_options(const CliArgs& args) {
  ServingOptions o = serving_options(args);
  o.max_queued_requests = static_cast<int>(args.get_int("max-queued", o.max_queued_requests));
  return o;
}

// Waits for SIGTERM / SIGINT (blocked in every thread, see cmd_serve).
int wait_for_signal(const sigset_t& signals) {
  for (;;) {
    const int sig = sigwaitinfo(&signals, nullptr);
    if (sig > 0) return sig;
  }
}

}  // namespace

int cmd_serve(const CliArgs& args) {
  if (args.flag("help")) {
    std::cout << kServeUsage;
    return 0;
  }
  // Termination signals are taken synchronously by rank 0's thread; every thread started from
  // here on inherits the mask (worker ranks ignore them and stop when rank 0 shuts the loop down).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  run_ranks(args, [&](const CliArgs& rank_args, const RankContext& rank) {
    const ServingOptions serving_opts = serve_options(rank_args);
    if (!rank.leads()) {
      (void)api_options(rank_args);  // consumes (and checks) the HTTP options on every rank
      (void)rank_args.get("served-model-name", "");
      rank_args.check_all_used();
      ServingRank serving(serving_opts, rank.comm, rank.placement);
      serving.serve_workers();
      return;
    }
    api::ApiOptions opts = api_options(rank_args);
    const std::string served_name = rank_args.get("served-model-name", "");
    rank_args.check_all_used();
    api::ApiServer server(opts);
    const int port = server.bind();
    server.start();
    // The pid: under mpirun, SIGTERM to rank 0 drains the job and every process exits 0 (mpirun
    // itself, signalled, forwards the signal, rank 0 still drains, but mpirun reports failure).
    std::cout << "arbiter serve: listening on http://" << opts.host << ":" << port << " (pid " << getpid() << ")" << std::endl;

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
    server.attach(handles);
    std::cout << "arbiter serve: ready (model " << handles.model_name << ", " << handles.world_size << " rank"
              << (handles.world_size > 1 ? "s" : "") << ", " << server.policies().list().size() << " policies)"
              << std::endl;

    const int sig = wait_for_signal(signals);
    std::cout << "arbiter serve: " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ", draining" << std::endl;
    server.drain();                   // /ready fails, new model requests get 503
    serving.loop().stop(true);        // in-flight generations finish, workers are released
    if (!server.wait_idle(std::chrono::seconds(30)))  // their replies (and streams) are written
      std::cerr << "arbiter serve: requests still open after 30 s; closing\n";
    server.stop();
    std::cout << "arbiter serve: stopped" << std::endl;
  });
  return 0;
}

}  // namespace arbiter
