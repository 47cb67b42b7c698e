// Talks to `arbiter serve` through the real `openai` npm client (non-streaming and streaming chat
// completions, models, an error) and prints what it got as one JSON line.
// usage: NODE_PATH=<node_modules> node openai_client.cjs BASE_URL MODEL [API_KEY]
const OpenAI = require('openai');

async function main() {
  const [baseURL, model, apiKey] = process.argv.slice(2);
  const client = new OpenAI({ baseURL, apiKey: apiKey || 'unused', maxRetries: 0, timeout: 60000 });
  const request = {
    model,
    messages: [
      { role: 'system', content: 'Answer 0 or 1.' },
      { role: 'user', content: [{ type: 'text', text: 'Is this spam? Buy cheap watches.' }] },
    ],
    reasoning_effort: 'low',
    max_completion_tokens: 12,
    temperature: 0,
  };
  const plain = await client.chat.completions.create(request);
  const stream = await client.chat.completions.create({ ...request, stream: true, stream_options: { include_usage: true } });
  const streamed = { content: '', reasoning: '', reasoning_content: '', finish_reason: null, usage: null, chunks: 0, role: null };
  for await (const chunk of stream) {
    streamed.chunks += 1;
    if (chunk.usage) streamed.usage = chunk.usage;
    const choice = chunk.choices[0];
    if (!choice) continue;
    if (choice.delta.role) streamed.role = choice.delta.role;
    if (choice.delta.content) streamed.content += choice.delta.content;
    if (choice.delta.reasoning) streamed.reasoning += choice.delta.reasoning;
    if (choice.delta.reasoning_content) streamed.reasoning_content += choice.delta.reasoning_content;
    if (choice.finish_reason) streamed.finish_reason = choice.finish_reason;
  }
  const models = await client.models.list();
  let error = null;
  try {
    await client.chat.completions.create({ model, messages: [] });
  } catch (e) {
    error = { status: e.status, message: e.message, param: e.param ?? null };
  }
  const m = plain.choices[0].message;
  console.log(JSON.stringify({
    plain: { object: plain.object, content: m.content, reasoning: m.reasoning, reasoning_content: m.reasoning_content,
             finish_reason: plain.choices[0].finish_reason, usage: plain.usage },
    streamed,
    models: models.data.map((x) => x.id),
    error,
  }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
