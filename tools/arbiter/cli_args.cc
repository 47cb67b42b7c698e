#include "tools/arbiter/cli_args.h"

#include <stdexcept>

namespace arbiter {

CliArgs::CliArgs(int argc, char** argv, const std::set<std::string>& boolean_flags) {
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0 || a.size() < 3) throw std::invalid_argument("unexpected argument '" + a + "'");
    a = a.substr(2);
    if (const auto eq = a.find('='); eq != std::string::npos) {
      values_[a.substr(0, eq)] = a.substr(eq + 1);
    } else if (boolean_flags.count(a)) {
      values_[a] = "1";
    } else {
      if (i + 1 >= argc) throw std::invalid_argument("option --" + a + " needs a value");
      values_[a] = argv[++i];
    }
  }
}

std::string CliArgs::get(const std::string& name, const std::string& fallback) const {
  used_.insert(name);
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

std::string CliArgs::require(const std::string& name) const {
  used_.insert(name);
  auto it = values_.find(name);
  if (it == values_.end()) throw std::invalid_argument("missing required option --" + name);
  return it->second;
}

long long CliArgs::get_int(const std::string& name, long long fallback) const {
  const std::string v = get(name, "");
  if (v.empty()) return fallback;
  size_t pos = 0;
  long long n = 0;
  try {
    n = std::stoll(v, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos != v.size()) throw std::invalid_argument("option --" + name + " expects an integer, got '" + v + "'");
  return n;
}

bool CliArgs::flag(const std::string& name) const {
  used_.insert(name);
  return values_.count(name) != 0;
}

void CliArgs::check_all_used() const {
  for (const auto& [name, value] : values_)
    if (!used_.count(name)) throw std::invalid_argument("unknown option --" + name);
}

std::vector<int> parse_token_list(const std::string& text) {
  std::vector<int> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = text.find(',', start);
    const std::string piece = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    size_t pos = 0;
    long long v = -1;
    try {
      v = std::stoll(piece, &pos);
    } catch (const std::exception&) {
      pos = 0;
    }
    if (piece.empty() || pos != piece.size() || v < 0 || v > 0x7fffffff)
      throw std::invalid_argument("bad token id '" + piece + "' in --tokens");
    out.push_back(static_cast<int>(v));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace arbiter
