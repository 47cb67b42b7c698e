#include "tools/arbiter/serving_args.h"

#include <stdexcept>

namespace arbiter {

ServingOptions serving_options(const CliArgs& args) {
  ServingOptions o;
  o.model_dir = args.require("model");
  o.device = args.get("device", "auto");
  o.tokenizer_dir = args.get("tokenizer", "");
  o.max_context = static_cast<int>(args.get_int("max-context", o.max_context));
  o.kv_blocks = static_cast<int>(args.get_int("kv-blocks", o.kv_blocks));
  o.max_step_tokens = static_cast<int>(args.get_int("step-tokens", o.max_step_tokens));
  o.max_step_samples = static_cast<int>(args.get_int("step-samples", o.max_step_samples));
  o.prefix_caching = !args.flag("no-prefix-cache");
  o.classifier.top_logprobs = static_cast<int>(args.get_int("top-logprobs", o.classifier.top_logprobs));
  o.classifier.answer_tokens = static_cast<int>(args.get_int("answer-tokens", o.classifier.answer_tokens));
  if (args.has("reasoning-budget")) {
    const int budget = static_cast<int>(args.get_int("reasoning-budget", 0));
    if (budget < 0) throw std::invalid_argument("--reasoning-budget must not be negative");
    o.classifier.budgets = {budget, budget, budget};
  }
  return o;
}

}  // namespace arbiter
