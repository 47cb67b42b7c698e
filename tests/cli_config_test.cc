// Deployment configs (`--config FILE`, configs/deploy/*.yaml): the parser's accepted subset and its
// errors, a randomized test that malformed files only ever give a clean error naming the file, the
// command line winning over the file, and every shipped config read by the real `arbiter serve`.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "tests/test_util.h"
#include "tools/arbiter/cli_args.h"

namespace arbiter {
namespace {

using testing::run_command;
using testing::TempDir;

std::string error_of(const std::string& text) {
  try {
    parse_deploy_config(text, "x.yaml");
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

CliArgs args_of(std::vector<std::string> words, const std::set<std::string>& flags = {"no-prefix-cache"}) {
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  return CliArgs(static_cast<int>(argv.size()), argv.data(), flags);
}

TEST(DeployConfig, ParsesTheFlatMappingSubset) {
  const auto options = parse_deploy_config(
      "# a comment\n\ndevice: cpu   # trailing comment\nport: 8080\r\npolicy-db: \"/tmp/a b#c.sqlite\"\n"
      "effort: 'low'\nno-prefix-cache: true\n",
      "x.yaml");
  ASSERT_EQ(options.size(), 5u);
  EXPECT_EQ(options[0].name, "device");
  EXPECT_EQ(options[0].value, "cpu");
  EXPECT_EQ(options[0].line, 3);
  EXPECT_EQ(options[1].value, "8080");
  EXPECT_EQ(options[2].value, "/tmp/a b#c.sqlite");  // '#' inside quotes is not a comment
  EXPECT_EQ(options[3].value, "low");
  EXPECT_EQ(options[4].name, "no-prefix-cache");
  EXPECT_EQ(options[4].value, "true");
}

TEST(DeployConfig, RejectsWhatItDoesNotSupportWithFileAndLine) {
  EXPECT_EQ(error_of("device: cpu\n  nested: 1\n"), "x.yaml:2: indented line: only a flat mapping of `name: value` is supported");
  EXPECT_EQ(error_of("just words\n"), "x.yaml:1: expected `name: value`");
  EXPECT_EQ(error_of("Device: cpu\n"), "x.yaml:1: bad option name 'Device' (lowercase letters, digits and '-')");
  EXPECT_EQ(error_of("port: 1\nport: 2\n"), "x.yaml:2: option 'port' given twice");
  EXPECT_EQ(error_of("port:\n"), "x.yaml:1: option 'port' has no value");
  EXPECT_EQ(error_of("port: [1, 2]\n"),
            "x.yaml:1: value of 'port' is not a plain scalar (lists, mappings, anchors and blocks are not supported)");
  EXPECT_EQ(error_of("host: \"abc\n"), "x.yaml:1: unterminated quote in the value of 'host'");
  EXPECT_EQ(error_of("host: \"a\"b\"\n"), "x.yaml:1: stray quote in the value of 'host'");
  EXPECT_EQ(error_of("config: other.yaml\n"), "x.yaml:1: a config cannot include another (--config)");
  EXPECT_EQ(error_of(std::string("host: a\x01") + "b\n"), "x.yaml:1: control character");
  EXPECT_EQ(error_of("- port: 1\n"), "x.yaml:1: bad option name '- port' (lowercase letters, digits and '-')");
}

// Random bytes and random edits of a valid config: parsing either succeeds or throws
// std::invalid_argument naming the file; nothing else (no crash, no other exception).
TEST(DeployConfig, RandomizedInputsGiveCleanErrors) {
  const std::string valid = "# deploy\ndevice: cuda\nport: 8080\nhost: \"0.0.0.0\"\nwarm-efforts: low,medium\n";
  const std::string alphabet = "abcz-_:#\"' \t\n\r[]{}&*|>-0123456789\x01\x7f\xff";
  std::mt19937 rng(7);
  int parsed = 0, refused = 0;
  for (int i = 0; i < 4000; ++i) {
    std::string text;
    if (i % 2 == 0) {
      const size_t n = rng() % 80;
      for (size_t j = 0; j < n; ++j) text += alphabet[rng() % alphabet.size()];
    } else {
      text = valid;
      const int edits = 1 + static_cast<int>(rng() % 4);
      for (int e = 0; e < edits && !text.empty(); ++e) {
        const size_t at = rng() % text.size();
        switch (rng() % 3) {
          case 0: text[at] = alphabet[rng() % alphabet.size()]; break;
          case 1: text.erase(at, 1); break;
          default: text.insert(at, 1, alphabet[rng() % alphabet.size()]); break;
        }
      }
    }
    try {
      const auto options = parse_deploy_config(text, "fuzz.yaml");
      for (const ConfigOption& o : options) {
        EXPECT_FALSE(o.name.empty());
        EXPECT_FALSE(o.value.empty());
      }
      ++parsed;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind("fuzz.yaml:", 0), 0u) << e.what();
      ++refused;
    }
  }
  EXPECT_GT(parsed, 100);
  EXPECT_GT(refused, 100);
}

TEST(DeployConfig, CommandLineWinsAndFlagsAndUnknownOptionsNameTheFile) {
  TempDir dir;
  const std::string path = dir.file("d.yaml");
  std::ofstream(path) << "port: 9000\nhost: 10.0.0.1\nno-prefix-cache: true\n";
  const CliArgs a = args_of({"--config", path, "--port", "1234"});
  EXPECT_EQ(a.get("port", ""), "1234");
  EXPECT_EQ(a.get("host", ""), "10.0.0.1");
  EXPECT_TRUE(a.flag("no-prefix-cache"));
  EXPECT_NO_THROW(a.check_all_used());

  std::ofstream(path) << "no-prefix-cache: false\n";
  EXPECT_FALSE(args_of({"--config", path}).flag("no-prefix-cache"));
  std::ofstream(path) << "no-prefix-cache: yes\n";
  EXPECT_THROW(args_of({"--config", path}), std::invalid_argument);

  std::ofstream(path) << "port: 1\nsetp-tokens: 12\n";
  const CliArgs b = args_of({"--config", path});
  (void)b.get("port", "");
  try {
    b.check_all_used();
    FAIL() << "a misspelt option in the file must be refused";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()), path + ":2: unknown option 'setp-tokens'");
  }
  EXPECT_THROW(args_of({"--config", dir.file("missing.yaml")}), std::invalid_argument);
}

// Every shipped deployment config names only options `arbiter serve` knows: with a model folder
// that does not exist, serve gets past option checking and fails on the model (exit 1), not on
// an option (exit 2). The GPU/NCCL settings are overridden on the command line.
TEST(DeployConfig, ShippedConfigsAreReadByServe) {
  const std::filesystem::path deploy = std::filesystem::path(ARBITER_SOURCE_DIR) / "configs" / "deploy";
  int seen = 0;
  for (const auto& entry : std::filesystem::directory_iterator(deploy)) {
    if (entry.path().extension() != ".yaml") continue;
    ++seen;
    const auto r = run_command(std::string(ARBITER_BINARY) + " serve --config " + entry.path().string() +
                               " --model /nonexistent-model --port 0 --device cpu --transport threads" +
                               " --policy-db ''");
    EXPECT_EQ(r.status, 1) << entry.path() << "\n" << r.output;
    EXPECT_EQ(r.output.find("unknown option"), std::string::npos) << entry.path() << "\n" << r.output;
    EXPECT_NE(r.output.find("nonexistent-model"), std::string::npos) << entry.path() << "\n" << r.output;
  }
  EXPECT_GE(seen, 3);
}

}  // namespace
}  // namespace arbiter
