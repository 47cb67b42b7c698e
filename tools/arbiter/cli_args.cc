#include "tools/arbiter/cli_args.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

namespace arbiter {

CliArgs::CliArgs(int argc, char** argv, const std::set<std::string>& boolean_flags, size_t max_words) {
  int first = 0;
  for (; first < argc && words_.size() < max_words && std::string(argv[first]).rfind("--", 0) != 0; ++first)
    words_.push_back(argv[first]);
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0 || a.size() < 3) throw std::invalid_argument("unexpected argument '" + a + "'");
    a = a.substr(2);
    if (const auto eq = a.find('='); eq != std::string::npos) {
      values_[a.substr(0, eq)] = a.substr(eq + 1);
      repeated_[a.substr(0, eq)].push_back(a.substr(eq + 1));
    } else if (boolean_flags.count(a)) {
      values_[a] = "1";
    } else {
      if (i + 1 >= argc) throw std::invalid_argument("option --" + a + " needs a value");
      values_[a] = argv[++i];
      repeated_[a].push_back(values_[a]);
    }
  }
  const auto config = values_.find("config");
  if (config == values_.end()) return;
  const std::string path = config->second;
  values_.erase(config);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument("--config: cannot read " + path);
  std::ostringstream text;
  text << in.rdbuf();
  for (const ConfigOption& o : parse_deploy_config(text.str(), path)) {
    if (values_.count(o.name)) continue;  // the command line wins
    if (boolean_flags.count(o.name)) {
      if (o.value == "true") values_[o.name] = "1";
      else if (o.value != "false")
        throw std::invalid_argument(path + ":" + std::to_string(o.line) + ": " + o.name + " is a flag: true or false, not '" +
                                    o.value + "'");
    } else {
      values_[o.name] = o.value;
    }
    origin_[o.name] = path + ":" + std::to_string(o.line);
  }
}

std::string CliArgs::get(const std::string& name, const std::string& fallback) const {
  used_.insert(name);
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

std::vector<std::string> CliArgs::get_all(const std::string& name) const {
  used_.insert(name);
  if (const auto it = repeated_.find(name); it != repeated_.end()) return it->second;
  const auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : std::vector<std::string>{it->second};
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

const std::string* CliArgs::peek(const std::string& name) const {
  const auto it = values_.find(name);
  return it == values_.end() ? nullptr : &it->second;
}

void CliArgs::check_all_used() const {
  for (const auto& [name, value] : values_)
    if (!used_.count(name)) {
      const auto from = origin_.find(name);
      throw std::invalid_argument(from == origin_.end() ? "unknown option --" + name
                                                        : from->second + ": unknown option '" + name + "'");
    }
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

namespace {

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

bool valid_name(const std::string& name) {
  if (name.empty() || name.size() > 64 || name[0] == '-') return false;
  for (const char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  return true;
}

}  // namespace

std::vector<ConfigOption> parse_deploy_config(const std::string& text, const std::string& source) {
  std::vector<ConfigOption> out;
  std::set<std::string> seen;
  int line_no = 0;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string raw = text.substr(start, end - start);
    start = end + 1;
    ++line_no;
    auto fail = [&](const std::string& why) {
      throw std::invalid_argument(source + ":" + std::to_string(line_no) + ": " + why);
    };
    for (const char c : raw)
      if ((static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\r') || c == 0x7f) fail("control character");
    // A comment starts at a '#' outside quotes.
    std::string line;
    char quote = 0;
    for (const char c : raw) {
      if (quote) {
        if (c == quote) quote = 0;
      } else if (c == '"' || c == '\'') {
        quote = c;
      } else if (c == '#') {
        break;
      }
      line += c;
    }
    line = trim(line);
    if (line.empty()) continue;
    if (raw[0] == ' ' || raw[0] == '\t') fail("indented line: only a flat mapping of `name: value` is supported");
    const size_t colon = line.find(':');
    if (colon == std::string::npos) fail("expected `name: value`");
    const std::string name = trim(line.substr(0, colon));
    std::string value = trim(line.substr(colon + 1));
    if (!valid_name(name)) fail("bad option name '" + name + "' (lowercase letters, digits and '-')");
    if (name == "config") fail("a config cannot include another (--config)");
    if (!seen.insert(name).second) fail("option '" + name + "' given twice");
    if (value.empty()) fail("option '" + name + "' has no value");
    if (value[0] == '"' || value[0] == '\'') {
      if (value.size() < 2 || value.back() != value[0]) fail("unterminated quote in the value of '" + name + "'");
      const char q = value[0];
      value = value.substr(1, value.size() - 2);
      if (value.find(q) != std::string::npos) fail("stray quote in the value of '" + name + "'");
    } else if (value[0] == '[' || value[0] == '{' || value[0] == '&' || value[0] == '*' || value[0] == '|' ||
               value[0] == '>' || value == "-") {
      fail("value of '" + name + "' is not a plain scalar (lists, mappings, anchors and blocks are not supported)");
    }
    out.push_back({name, value, line_no});
  }
  return out;
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::string piece;
  std::istringstream in(text);
  while (std::getline(in, piece, ','))
    if (!piece.empty()) out.push_back(piece);
  return out;
}

std::string json_line(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

}  // namespace arbiter
