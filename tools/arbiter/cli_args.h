// CliArgs: `--name value` / `--flag` parsing for the arbiter subcommands, with errors that name
// the option. Every option must be consumed, so a misspelt flag is an error, not a silent default.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

namespace arbiter {

class CliArgs {
 public:
  // argv after the subcommand name.
  CliArgs(int argc, char** argv, const std::set<std::string>& boolean_flags);
  bool has(const std::string& name) const { return values_.count(name) != 0; }
  std::string get(const std::string& name, const std::string& fallback) const;
  std::string require(const std::string& name) const;
  long long get_int(const std::string& name, long long fallback) const;
  bool flag(const std::string& name) const;
  // Throws if any option was given that no get/require/flag call asked about.
  void check_all_used() const;

 private:
  std::map<std::string, std::string> values_;
  mutable std::set<std::string> used_;
};

// "1,2,3" -> ids; throws std::invalid_argument with the offending piece.
std::vector<int> parse_token_list(const std::string& text);

}  // namespace arbiter
