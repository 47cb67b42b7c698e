// The engine and scheduler options that every serving subcommand (serve, classify) reads the same
// way from the command line: model, device, tokenizer, context, KV blocks, step budgets, prefix
// caching, top log-probabilities, answer room and the reasoning budget.
#pragma once

#include "scheduler/serving.h"
#include "tools/arbiter/cli_args.h"

namespace arbiter {

// --model (required) --device --tokenizer --max-context --kv-blocks --step-tokens --step-samples
// --no-prefix-cache --top-logprobs --answer-tokens --reasoning-budget (N for every effort, or
// LOW,MEDIUM,HIGH).
ServingOptions serving_options(const CliArgs& args);

}  // namespace arbiter
