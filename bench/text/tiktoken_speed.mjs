// Encode throughput of OpenAI's tiktoken core (npm `tiktoken`, Rust compiled to WASM, one thread)
// on the benchmark corpus (one warm-up pass, best of 3); writes the corpus for the C++ side and
// prints one JSON line.
//   node tiktoken_speed.mjs NODE_DIR CORPUS_OUT [MB]
import { createRequire } from "node:module";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { benchCorpus } from "../../tests/text/corpus.mjs";

const [nodeDir, corpusOut, mb = "4"] = process.argv.slice(2);
if (!nodeDir || !corpusOut) {
  console.error("usage: node tiktoken_speed.mjs NODE_DIR CORPUS_OUT [MB]");
  process.exit(2);
}
const require = createRequire(path.resolve(nodeDir, "package.json"));
const { Tiktoken } = require("tiktoken/lite");
const o200k = require("tiktoken/encoders/o200k_base.json");

const text = benchCorpus(Number(mb) * 1e6);
const bytes = Buffer.byteLength(text, "utf8");
writeFileSync(corpusOut, text);
const enc = new Tiktoken(o200k.bpe_ranks, o200k.special_tokens, o200k.pat_str);
// Chunks end at the first "\n" at or after every 64 KiB of UTF-8 (text_bench.cc uses the same rule).
const buf = Buffer.from(text, "utf8");
const chunks = [];
for (let start = 0; start < buf.length;) {
  let end = Math.min(buf.length, start + 65536);
  if (end < buf.length) {
    const nl = buf.indexOf(10, end);
    end = nl < 0 ? buf.length : nl + 1;
  }
  chunks.push(buf.subarray(start, end).toString("utf8"));
  start = end;
}
let tokens = 0;
for (const c of chunks) tokens += enc.encode_ordinary(c).length;
let best = Infinity;
for (let rep = 0; rep < 3; ++rep) {
  const t0 = process.hrtime.bigint();
  for (const c of chunks) enc.encode_ordinary(c);
  best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
}
enc.free();
const version = JSON.parse(readFileSync(path.resolve(nodeDir, "node_modules/tiktoken/package.json"))).version;
console.log(JSON.stringify({ engine: "tiktoken", version, bytes, tokens, chunks: chunks.length, seconds: best,
                             mb_per_s: bytes / 1e6 / best }));
