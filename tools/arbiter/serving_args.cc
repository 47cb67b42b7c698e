#include "tools/arbiter/serving_args.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

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
    // N (every effort) or LOW,MEDIUM,HIGH.
    const std::string text = args.get("reasoning-budget", "");
    std::vector<int> budgets;
    for (size_t start = 0; start <= text.size();) {
      const size_t comma = std::min(text.find(',', start), text.size());
      const std::string item = text.substr(start, comma - start);
      size_t used = 0;
      int value = -1;
      try {
        value = std::stoi(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (item.empty() || used != item.size() || value < 0)
        throw std::invalid_argument("--reasoning-budget takes N or LOW,MEDIUM,HIGH (tokens, not negative); got '" + text + "'");
      budgets.push_back(value);
      start = comma + 1;
    }
    if (budgets.size() == 1) budgets.assign(3, budgets[0]);
    if (budgets.size() != 3)
      throw std::invalid_argument("--reasoning-budget takes N or LOW,MEDIUM,HIGH; got '" + text + "'");
    o.classifier.budgets = {budgets[0], budgets[1], budgets[2]};
  }
  return o;
}

}  // namespace arbiter
