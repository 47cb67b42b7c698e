// Chat completions without a model: harmony rendering of OpenAI messages (with the real tokenizer)
// and reading generated tokens back into reasoning and content, with stop strings; messages
// tokenized only as far as they fit, and stoppable.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "api/chat_api.h"
#include "api/json_io.h"
#include "runtime/safeguard.h"
#include "runtime/tokenizer.h"

namespace arbiter::api {
namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer t = Tokenizer::load(std::string(ARBITER_TOKENIZER_DIR) + "/tokenizer.json");
  return t;
}

wire::ChatCompletionRequest request(const std::string& body) {
  wire::ChatCompletionRequest r;
  parse_json(body, r);
  return r;
}

TEST(ApiChatPlan, RendersHarmonyLikeTheSafeguardPrompt) {
  const HarmonyRenderer renderer(tokenizer());
  const ChatPlan plan = plan_chat(request(R"({"messages": [{"role": "system", "content": "POLICY"},)"
                                          R"( {"role": "user", "content": [{"type": "text", "text": "CONTENT"}]}],)"
                                          R"( "reasoning_effort": "low", "max_completion_tokens": 5, "temperature": 0})"),
                                  renderer, {ReasoningEffort::kMedium, 4096});
  SafeguardPromptOptions o;
  o.effort = ReasoningEffort::kLow;
  EXPECT_EQ(plan.sequence.prompt, render_safeguard_prompt(tokenizer(), "POLICY", "CONTENT", o));
  EXPECT_EQ(plan.sequence.max_new_tokens, 5);
  EXPECT_EQ(plan.sequence.sampling.temperature(), 0.0f);
  EXPECT_FALSE(plan.stream);
}

TEST(ApiChatPlan, RejectsWhatItCannotServe) {
  const HarmonyRenderer renderer(tokenizer());
  struct Case {
    const char* body;
    const char* param;
  };
  const Case cases[] = {
      {R"({"messages": []})", "messages"},
      {R"({"messages": [{"role": "tool", "content": "x"}]})", "messages[0].role"},
      {R"({"messages": [{"content": "x"}]})", "messages[0].role"},
      {R"({"messages": [{"role": "user", "content": 5}]})", "messages[0].content"},
      {R"({"messages": [{"role": "user"}]})", "messages[0].content"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})", "messages[0].content[0].type"},
      {R"({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]})", "messages[0].content[0].text"},
      {R"({"messages": [{"role": "user", "content": ["x"]}]})", "messages[0].content[0]"},
      {R"({"messages": [{"role": "user", "content": "x"}], "n": 2})", "n"},
      {R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})", "tools"},
      {R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true})", "logprobs"},
      {R"({"messages": [{"role": "user", "content": "x"}], "temperature": 3})", "temperature"},
      {R"({"messages": [{"role": "user", "content": "x"}], "top_p": 0})", "top_p"},
      {R"({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})", "max_tokens"},
      {R"({"messages": [{"role": "user", "content": "x"}], "stop": [1]})", "stop[0]"},
      {R"({"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]})", "stop"},
      {R"({"messages": [{"role": "user", "content": "x"}], "stop": {"a": 1}})", "stop"},
      {R"({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "none"})", "reasoning_effort"},
  };
  for (const Case& c : cases) {
    try {
      plan_chat(request(c.body), renderer, {ReasoningEffort::kMedium, 4096});
      ADD_FAILURE() << "accepted " << c.body;
    } catch (const ApiException& e) {
      EXPECT_EQ(e.error().status, 400) << c.body;
      EXPECT_EQ(e.error().param, c.param) << c.body << ": " << e.error().message;
    }
  }
  try {
    plan_chat(request(R"({"messages": [{"role": "user", "content": ")" + std::string(3000, 'x') + " " + std::string(3000, 'y') + R"("}]})"),
              renderer, {ReasoningEffort::kMedium, 100});
    ADD_FAILURE() << "a prompt longer than the context was accepted";
  } catch (const ApiException& e) {
    EXPECT_EQ(e.error().code, "context_length_exceeded");
  }
}

TEST(ApiChatOutput, SplitsReasoningAndContentAndAppliesStopStrings) {
  const auto ids = tokenizer().encode_with_specials(
      "<|channel|>analysis<|message|>Thinking about it.<|end|><|start|>assistant<|channel|>final<|message|>"
      "Hello there STOP and more<|return|>");
  ChatOutput plain(tokenizer(), {});
  std::string reasoning, content;
  for (int32_t t : ids) {
    const auto d = plain.push(t);
    reasoning += d.reasoning;
    content += d.content;
  }
  const auto tail = plain.finish();
  reasoning += tail.reasoning;
  content += tail.content;
  EXPECT_EQ(plain.reasoning(), "Thinking about it.");
  EXPECT_EQ(plain.content(), "Hello there STOP and more");
  EXPECT_EQ(reasoning, plain.reasoning());
  EXPECT_EQ(content, plain.content());

  ChatOutput stopped(tokenizer(), {" STOP", "never"});
  content.clear();
  for (int32_t t : ids) content += stopped.push(t).content;
  content += stopped.finish().content;
  EXPECT_TRUE(stopped.stopped());
  EXPECT_EQ(stopped.content(), "Hello there");
  EXPECT_EQ(content, "Hello there");
}

TEST(ApiChatOutput, CutOffOutputKeepsWhatWasThere) {
  const auto ids = tokenizer().encode_with_specials("<|channel|>analysis<|message|>abc");
  ChatOutput out(tokenizer(), {"zzz"});
  for (int32_t t : ids) out.push(t);
  out.finish();
  EXPECT_EQ(out.reasoning(), "abc");
  EXPECT_EQ(out.content(), "");
}

TEST(ApiChatPlan, LongMessagesAreTokenizedOnlyAsFarAsTheyFitAndStoppable) {
  const HarmonyRenderer renderer(tokenizer());
  std::string text;
  while (text.size() < (4u << 20)) text += "tell me a long story about a cruise. ";
  wire::ChatCompletionRequest body;
  body.add_messages()->set_role("user");
  body.mutable_messages(0)->mutable_content()->set_string_value(text);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    plan_chat(body, renderer, {ReasoningEffort::kMedium, 8192});
    FAIL() << "4 MB of messages fit 8192 tokens";
  } catch (const ApiException& e) {
    EXPECT_EQ(e.error().status, 400);
    EXPECT_EQ(e.error().code, "context_length_exceeded");
    EXPECT_NE(e.error().message.find("maximum context length is 8192 tokens"), std::string::npos) << e.error().message;
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.5);
  // A stop predicate (client gone, deadline) ends the rendering.
  body.mutable_messages(0)->mutable_content()->set_string_value(text.substr(0, 20000));
  int polls = 0;
  EXPECT_THROW(plan_chat(body, renderer, {ReasoningEffort::kMedium, 1 << 20}, [&] { return ++polls > 1; }), RenderStopped);
  EXPECT_EQ(polls, 2);
  // What fits renders as before.
  body.mutable_messages(0)->mutable_content()->set_string_value("hello");
  const ChatPlan plan = plan_chat(body, renderer, {ReasoningEffort::kMedium, 8192}, [] { return false; });
  std::vector<int32_t> expected;
  renderer.render_system(SystemOptions{}, expected);
  const auto rest = renderer.render_conversation({{"user", "", "", "", "hello"}}, true);
  expected.insert(expected.end(), rest.begin(), rest.end());
  EXPECT_EQ(plan.sequence.prompt, expected);
}

}  // namespace
}  // namespace arbiter::api
