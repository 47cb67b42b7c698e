// The arbiter subcommands implemented outside main.cc, one function per subcommand: each parses
// its own options (CliArgs) and returns the process exit status.
#pragma once

#include "tools/arbiter/cli_args.h"

namespace arbiter {

// Each subcommand's usage text (`arbiter NAME --help`) is beside it: kNameUsage.

// tools/arbiter/cmd_text.cc
extern const char* const kTokenizeUsage;
extern const char* const kDetokenizeUsage;
extern const char* const kRenderUsage;
int cmd_tokenize(const CliArgs& args);
int cmd_detokenize(const CliArgs& args);
int cmd_render(const CliArgs& args);

// tools/arbiter/cmd_classify.cc
extern const char* const kClassifyUsage;
int cmd_classify(const CliArgs& args);
// tools/arbiter/cmd_bench.cc
extern const char* const kBenchUsage;
int cmd_bench(const CliArgs& args);
// tools/arbiter/cmd_serve.cc
extern const char* const kServeUsage;
int cmd_serve(const CliArgs& args);
// tools/arbiter/cmd_export.cc
extern const char* const kExportUsage;
int cmd_export(const CliArgs& args);
// tools/arbiter/cmd_triage.cc (`arbiter triage train|bench`: the action is the first word)
extern const char* const kTriageUsage;
int cmd_triage(const CliArgs& args);
// tools/arbiter/cmd_placement.cc
extern const char* const kPlacementUsage;
int cmd_placement(const CliArgs& args);
// tools/arbiter/cmd_eval.cc
extern const char* const kEvalUsage;
int cmd_eval(const CliArgs& args);

}  // namespace arbiter
