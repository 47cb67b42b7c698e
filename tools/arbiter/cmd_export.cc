// `arbiter export`: a labelled dataset from the decision log (docs/decisions.md). One JSON object
// per line, oldest decision first, for the decisions of one policy that have their content stored
// (--store-content full) and a label: the latest human feedback, else (with --model-labels) the
// model's own verdict. The lines are also `arbiter classify --input` lines ({"id", "content"}).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "api/decisions_api.h"
#include "api/pg_decision_store.h"
#include "api/policy_registry.h"
#include "api/sqlite_decision_store.h"
#include "tools/arbiter/cli_args.h"
#include "tools/arbiter/commands.h"

namespace arbiter {

const char* const kExportUsage =
    "usage: arbiter export --db FILE --policy ID[@V] --out FILE.jsonl [options]\n"
    "Writes a labelled dataset from the decision log (docs/decisions.md): one JSON object per line for each\n"
    "decision of the policy whose content is stored in full, labelled by its latest human feedback.\n"
    "  --db FILE|URL            the database `arbiter serve --db` (or --policy-db) logged decisions to (required;\n"
    "                           an SQLite file or a postgres:// URL)\n"
    "  --policy ID[@V]          the policy, or one version of it (required)\n"
    "  --out FILE.jsonl         output file (required)\n"
    "  --since T, --until T     only decisions in this window (unix seconds or RFC 3339)\n"
    "  --model-labels           label decisions without feedback by the model's own verdict\n";

int cmd_export(const CliArgs& args) {
  const std::string db = args.require("db");
  const std::string policy = args.require("policy");
  const std::string out_path = args.require("out");
  const std::string since = args.get("since", "");
  const std::string until = args.get("until", "");
  const bool model_labels = args.flag("model-labels");
  args.check_all_used();

  api::DecisionQuery q;
  const auto ref = api::PolicyRegistry::parse_ref(policy);
  if (ref && ref->version) {
    q.policy_id = ref->id;
    q.policy_version = ref->version;
  } else {
    q.policy_id = policy;
  }
  if (!since.empty() && !(q.since_ms = api::parse_time_ms(since)))
    throw std::invalid_argument("--since takes unix seconds or an RFC 3339 time (got '" + since + "')");
  if (!until.empty() && !(q.until_ms = api::parse_time_ms(until)))
    throw std::invalid_argument("--until takes unix seconds or an RFC 3339 time (got '" + until + "')");

  std::unique_ptr<api::DecisionStore> opened;
  if (api::pg::is_url(db)) opened = std::make_unique<api::PgDecisionStore>(db);
  else opened = std::make_unique<api::SqliteDecisionStore>(db, true);
  const api::DecisionStore& store = *opened;
  // Written next to the destination and renamed over it once complete.
  const std::string partial = out_path + ".partial";
  std::ofstream out(partial, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write " + partial);
  long long written = 0, no_content = 0, no_label = 0, human = 0;
  store.for_each(q, [&](const api::DecisionRecord& d) {
    if (!d.content) {
      ++no_content;
      return;
    }
    nlohmann::json label;
    std::string source;
    if (d.feedback) {
      label = nlohmann::json::parse(d.feedback->label_json, nullptr, false);
      source = "human";
      ++human;
    } else if (model_labels && d.verdict_key) {
      label = nlohmann::json::parse(d.verdict_json, nullptr, false);
      source = "model";
    } else {
      ++no_label;
      return;
    }
    nlohmann::json line = {{"id", d.id},
                           {"content", *d.content},
                           {"label", label},
                           {"label_source", source},
                           {"policy_id", d.policy_id},
                           {"policy_version", d.policy_version ? nlohmann::json(*d.policy_version) : nlohmann::json(nullptr)},
                           {"policy_sha256", d.policy_sha256},
                           {"decision_id", d.id},
                           {"created", d.created_ms / 1000}};
    out << json_line(line) << '\n';
    ++written;
  });
  out.close();
  if (!out) throw std::runtime_error("cannot write " + partial);
  std::filesystem::rename(partial, out_path);
  std::cerr << "arbiter export: wrote " << written << " lines (" << human << " human labels, " << (written - human)
            << " model labels) to " << out_path << "; skipped " << no_content << " without stored content and " << no_label
            << " without a label" << (model_labels ? "" : " (--model-labels uses the model's verdict)") << "\n";
  return 0;
}

}  // namespace arbiter
