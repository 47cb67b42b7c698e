// The text subcommands of `arbiter`: tokenize, detokenize and render (a safeguard prompt in
// harmony format). Output is JSON on stdout; errors go to stderr via main's handler.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/safeguard.h"
#include "runtime/tokenizer.h"
#include "tools/arbiter/cli_args.h"
#include "tools/arbiter/commands.h"

namespace arbiter {
namespace {

Tokenizer load_tokenizer(const CliArgs& args) {
  const bool file = args.has("tokenizer"), model = args.has("model");
  if (file == model) throw std::invalid_argument("give exactly one of --tokenizer FILE and --model DIR");
  return file ? Tokenizer::load(args.require("tokenizer")) : Tokenizer::load(args.require("model"));
}

std::string read_stdin() {
  std::ostringstream ss;
  ss << std::cin.rdbuf();
  return ss.str();
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

InvalidUtf8 invalid_policy(const CliArgs& args) {
  const std::string v = args.get("invalid-utf8", "replace");
  if (v == "replace") return InvalidUtf8::kReplace;
  if (v == "error") return InvalidUtf8::kError;
  throw std::invalid_argument("--invalid-utf8 must be replace or error, not '" + v + "'");
}

std::string ids_json(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s + "]";
}

std::vector<int32_t> ids_from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_array()) throw std::invalid_argument(where + ": expected a JSON array of token ids");
  std::vector<int32_t> ids;
  for (const auto& v : j) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 0x7fffffff)
      throw std::invalid_argument(where + ": bad token id " + v.dump());
    ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
  }
  return ids;
}

}  // namespace

const char* const kTokenizeUsage =
    "usage: arbiter tokenize (--tokenizer FILE | --model DIR) [--text T | stdin] [options]\n"
    "Prints the o200k_harmony token ids of the text as a JSON array.\n"
    "  --tokenizer FILE         tokenizer.json (or a tiktoken rank file); or --model DIR: the checkpoint's\n"
    "  --text T                 the text (default: all of stdin)\n"
    "  --specials               encode special tokens written as text (<|start|> ...) as their ids\n"
    "  --jsonl                  stdin holds one JSON string per line; one array per line out\n"
    "  --invalid-utf8 replace|error  what to do with bytes that are not UTF-8 (replace)\n";

const char* const kDetokenizeUsage =
    "usage: arbiter detokenize (--tokenizer FILE | --model DIR) [--tokens 1,2,3 | stdin] [--jsonl]\n"
    "Prints the text of token ids.\n"
    "  --tokenizer FILE         tokenizer.json (or a tiktoken rank file); or --model DIR: the checkpoint's\n"
    "  --tokens IDS             comma-separated ids (default: a JSON array on stdin)\n"
    "  --jsonl                  stdin holds one JSON array per line; one JSON string per line out\n";

const char* const kRenderUsage =
    "usage: arbiter render (--tokenizer FILE | --model DIR) (--policy FILE | --joint ID=FILE,...) [options]\n"
    "Prints the harmony prompt of a safeguard classification: {\"ids\", \"num_tokens\", \"text\"}.\n"
    "  --tokenizer FILE         tokenizer.json (or a tiktoken rank file); or --model DIR: the checkpoint's\n"
    "  --policy FILE            the policy text\n"
    "  --joint ID=FILE,...      several policies judged in one prompt\n"
    "  --content T              the content (or --content-file F; default: all of stdin)\n"
    "  --content-file F         read the content from a file\n"
    "  --reasoning low|medium|high  the reasoning effort in the system message (medium)\n"
    "  --date YYYY-MM-DD        add a `Current date:` line to the system message\n"
    "  --hf-newlines            the newlines of Hugging Face's chat template\n";

int cmd_tokenize(const CliArgs& args) {
  const bool specials = args.flag("specials"), jsonl = args.flag("jsonl");
  const InvalidUtf8 invalid = invalid_policy(args);
  const bool has_text = args.has("text");
  const std::string text = has_text ? args.require("text") : "";
  if (has_text && jsonl) throw std::invalid_argument("--jsonl reads stdin; it cannot be used with --text");
  const Tokenizer tok = load_tokenizer(args);
  args.check_all_used();
  auto encode = [&](const std::string& t) {
    return specials ? tok.encode_with_specials(t, invalid) : tok.encode(t, invalid);
  };
  if (!jsonl) {
    std::cout << ids_json(encode(has_text ? text : read_stdin())) << "\n";
    return 0;
  }
  std::string line;
  size_t line_no = 0;
  while (std::getline(std::cin, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw std::invalid_argument("stdin line " + std::to_string(line_no) + ": not JSON: " + e.what());
    }
    if (!j.is_string()) throw std::invalid_argument("stdin line " + std::to_string(line_no) + ": expected a JSON string");
    std::cout << ids_json(encode(j.get<std::string>())) << "\n";
  }
  return 0;
}

int cmd_detokenize(const CliArgs& args) {
  const bool jsonl = args.flag("jsonl");
  const bool has_tokens = args.has("tokens");
  const std::string tokens = has_tokens ? args.require("tokens") : "";
  if (has_tokens && jsonl) throw std::invalid_argument("--jsonl reads stdin; it cannot be used with --tokens");
  const Tokenizer tok = load_tokenizer(args);
  args.check_all_used();
  if (!jsonl) {
    std::vector<int32_t> ids;
    if (has_tokens) {
      for (const int id : parse_token_list(tokens)) ids.push_back(id);
    } else {
      const std::string in = read_stdin();
      try {
        ids = ids_from_json(nlohmann::json::parse(in), "stdin");
      } catch (const nlohmann::json::exception& e) {
        throw std::invalid_argument(std::string("stdin: expected a JSON array of token ids: ") + e.what());
      }
    }
    const std::string text = tok.decode(ids);
    std::fwrite(text.data(), 1, text.size(), stdout);
    return 0;
  }
  std::string line;
  size_t line_no = 0;
  while (std::getline(std::cin, line)) {
    ++line_no;
    const std::string where = "stdin line " + std::to_string(line_no);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw std::invalid_argument(where + ": not JSON: " + e.what());
    }
    std::cout << json_line(tok.decode(ids_from_json(j, where))) << "\n";
  }
  return 0;
}

int cmd_render(const CliArgs& args) {
  SafeguardPromptOptions o;
  o.effort = parse_reasoning_effort(args.get("reasoning", "medium"));
  if (args.has("date")) o.current_date = args.require("date");
  o.hf_template_newlines = args.flag("hf-newlines");
  const bool joint = args.has("joint");
  if (joint == args.has("policy")) throw std::invalid_argument("give exactly one of --policy FILE and --joint ID=FILE,...");
  const std::string policy_arg = joint ? args.require("joint") : args.require("policy");
  const bool has_content = args.has("content"), has_content_file = args.has("content-file");
  if (has_content && has_content_file) throw std::invalid_argument("give at most one of --content and --content-file");
  std::string content = has_content ? args.require("content") : "";
  const std::string content_file = has_content_file ? args.require("content-file") : "";
  const Tokenizer tok = load_tokenizer(args);
  args.check_all_used();
  if (has_content_file) content = read_text_file(content_file);
  else if (!has_content) content = read_stdin();
  std::vector<int32_t> ids;
  if (joint) {
    std::vector<PolicyRef> policies;
    std::stringstream ss(policy_arg);
    std::string item;
    while (std::getline(ss, item, ',')) {
      const size_t eq = item.find('=');
      if (eq == std::string::npos || eq == 0) throw std::invalid_argument("--joint expects ID=FILE[,ID=FILE...]");
      policies.push_back({item.substr(0, eq), read_text_file(item.substr(eq + 1))});
    }
    ids = render_joint_prompt(tok, policies, content, o);
  } else {
    ids = render_safeguard_prompt(tok, read_text_file(policy_arg), content, o);
  }
  nlohmann::json out;
  out["ids"] = ids;
  out["num_tokens"] = ids.size();
  out["text"] = tok.decode(ids);
  std::cout << json_line(out) << "\n";
  return 0;
}

}  // namespace arbiter
