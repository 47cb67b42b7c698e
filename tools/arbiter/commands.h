// The arbiter subcommands implemented outside main.cc, one function per subcommand: each parses
// its own options (CliArgs) and returns the process exit status.
#pragma once

#include "tools/arbiter/cli_args.h"

namespace arbiter {

// tools/arbiter/cmd_text.cc
int cmd_tokenize(const CliArgs& args);
int cmd_detokenize(const CliArgs& args);
int cmd_render(const CliArgs& args);

// tools/arbiter/cmd_classify.cc
int cmd_classify(const CliArgs& args);
// tools/arbiter/cmd_bench.cc
int cmd_bench(const CliArgs& args);

}  // namespace arbiter
