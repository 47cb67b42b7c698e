// Expected token ids from OpenAI's tiktoken core (npm `tiktoken`, the Rust library compiled to
// WASM) and from js-tiktoken, for the tokenizer agreement test. Usage:
//   node oracle.mjs NODE_DIR cases OUT.jsonl   one line per corpus text:
//        {"text": ..., "ids": [tiktoken o200k_base encode_ordinary], "js": [js-tiktoken] or null}
//        (js-tiktoken's merge loop is quadratic: texts over 400 UTF-16 units get "js": null)
//   node oracle.mjs NODE_DIR trusted OUT.jsonl harmony specials allowed (o200k_base ranks plus
//        the o200k_harmony special table): {"text": ..., "ids": [...]}
//   node oracle.mjs NODE_DIR ranks OUT.tiktoken  o200k_base as a tiktoken rank file
// NODE_DIR holds node_modules with tiktoken and js-tiktoken (scripts/fetch-tokenizer.sh).
import { createRequire } from "node:module";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { testCorpus, handPicked } from "./corpus.mjs";

const [nodeDir, mode, out] = process.argv.slice(2);
if (!nodeDir || !mode || !out) {
  console.error("usage: node oracle.mjs NODE_DIR cases|trusted|ranks OUT");
  process.exit(2);
}
const require = createRequire(path.resolve(nodeDir, "package.json"));
const o200k = require("tiktoken/encoders/o200k_base.json");

function harmonySpecials() {
  const named = { 199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
                  200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
                  200012: "<|call|>", 200018: "<|endofprompt|>" };
  const s = {};
  for (let id = 199998; id < 201088; ++id) s[named[id] ?? `<|reserved_${id}|>`] = id;
  return s;
}

if (mode === "ranks") {
  const lines = [];
  for (const line of o200k.bpe_ranks.split("\n").filter(Boolean)) {
    const [, offset, ...tokens] = line.split(" ");
    tokens.forEach((t, i) => lines.push(`${t} ${Number(offset) + i}`));
  }
  writeFileSync(out, lines.join("\n") + "\n");
} else if (mode === "cases") {
  const { Tiktoken } = require("tiktoken/lite");
  const { getEncoding } = require("js-tiktoken");
  const core = new Tiktoken(o200k.bpe_ranks, o200k.special_tokens, o200k.pat_str);
  const js = getEncoding("o200k_base");
  const lines = testCorpus().map((text) =>
    JSON.stringify({ text, ids: Array.from(core.encode_ordinary(text)),
                    js: text.length <= 400 ? js.encode(text, [], []) : null }));
  core.free();
  writeFileSync(out, lines.join("\n") + "\n");
} else if (mode === "trusted") {
  const { Tiktoken } = require("tiktoken/lite");
  const core = new Tiktoken(o200k.bpe_ranks, harmonySpecials(), o200k.pat_str);
  const texts = [
    "<|startoftext|><|start|><|message|>Hello World<|end|><|endoftext|>",
    "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>1<|return|>",
    "x<|reserved_200050|>y<|reserved_201087|><|endofprompt|>z<|not_special|>",
    "<|<|start|>|> <|start|<|end|>",
    ...handPicked.slice(0, 40).map((t, i) => t + ["<|end|>", "<|start|>", "<|call|>", ""][i % 4]),
  ];
  const lines = texts.map((text) => JSON.stringify({ text, ids: Array.from(core.encode(text, "all", [])) }));
  core.free();
  writeFileSync(out, lines.join("\n") + "\n");
} else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}
