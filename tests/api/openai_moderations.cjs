// Calls POST /v1/moderations through the real `openai` npm client (one input, several inputs, an
// error) and prints what it got as one JSON line.
// usage: NODE_PATH=<node_modules> node openai_moderations.cjs BASE_URL
const OpenAI = require('openai');

async function main() {
  const [baseURL] = process.argv.slice(2);
  const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 60000 });
  const one = await client.moderations.create({ input: 'Buy cheap watches now, limited offer!' });
  const many = await client.moderations.create({ input: ['hello there', 'click here to win', 'see you tomorrow'] });
  let error = null;
  try {
    await client.moderations.create({ input: [] });
  } catch (e) {
    error = { status: e.status, param: e.param ?? null, code: e.code ?? null };
  }
  console.log(JSON.stringify({ one, many, error }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
