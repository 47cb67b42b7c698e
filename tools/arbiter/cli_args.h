// CliArgs: `--name value` / `--flag` parsing for the arbiter subcommands, with errors that name
// the option. Every option must be consumed, so a misspelt flag is an error, not a silent default.
// `--config FILE` reads more options from a deployment config (configs/deploy/*.yaml, see
// parse_deploy_config); options given on the command line win over the file's.
#pragma once

#include <map>
#include <set>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace arbiter {

class CliArgs {
 public:
  // argv after the subcommand name. Up to `max_words` leading arguments that are not options are
  // the command's words (`arbiter triage train ...`: "train"), read with word(); none by default.
  CliArgs(int argc, char** argv, const std::set<std::string>& boolean_flags, size_t max_words = 0);
  // Leading word `i`, or "" when fewer were given.
  std::string word(size_t i) const { return i < words_.size() ? words_[i] : std::string(); }
  bool has(const std::string& name) const { return values_.count(name) != 0; }
  std::string get(const std::string& name, const std::string& fallback) const;
  std::string require(const std::string& name) const;
  long long get_int(const std::string& name, long long fallback) const;
  bool flag(const std::string& name) const;
  // Every value of an option that may be given more than once (`--policy A --policy B`), in order:
  // each command-line occurrence, else the config file's value; empty when absent. get() sees the last.
  std::vector<std::string> get_all(const std::string& name) const;
  // The value given for `name`, or nullptr; does not count as using the option.
  const std::string* peek(const std::string& name) const;
  // Sets (or replaces) an option, as if it had been given on the command line.
  void set(const std::string& name, const std::string& value) { values_[name] = value; }
  // Throws if any option was given that no get/require/flag call asked about.
  void check_all_used() const;

 private:
  std::vector<std::string> words_;
  std::map<std::string, std::string> values_;
  std::map<std::string, std::vector<std::string>> repeated_;  // command-line values in order
  std::map<std::string, std::string> origin_;  // options that came from a config file: "FILE:LINE"
  mutable std::set<std::string> used_;
};

// One option of a deployment config: `name: value` on line `line`.
struct ConfigOption {
  std::string name;
  std::string value;
  int line = 0;
};

// A deployment config: the YAML subset of one flat mapping of scalars, one `name: value` per line
// (names as the command-line options without the dashes, e.g. `step-tokens: 512`); `#` starts a
// comment, blank lines are skipped, values may be quoted ("..." or '...'), `true` / `false` set or
// clear a boolean flag. Anything else (nesting, lists, duplicate names, control characters) throws
// std::invalid_argument naming `source` and the line.
std::vector<ConfigOption> parse_deploy_config(const std::string& text, const std::string& source);

// "1,2,3" -> ids; throws std::invalid_argument with the offending piece.
std::vector<int> parse_token_list(const std::string& text);

// "a,b,,c" -> {"a", "b", "c"}: the non-empty pieces of a comma-separated option value.
std::vector<std::string> split_list(const std::string& text);

// One JSON value on one line, invalid UTF-8 replaced (what the commands print and write as JSONL).
std::string json_line(const nlohmann::json& j);

}  // namespace arbiter
