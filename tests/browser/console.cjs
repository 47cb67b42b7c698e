// Drives the web console (GET / of `arbiter serve`) in headless Chromium against a real server and
// checks what it shows against the API: a wrong API key gives a clear message; registering a
// policy and a second version in the Policies tab puts them in the list and in the playground's
// version picker, and the diff shows the changed line; the playground classifies with effort auto
// and shows a verdict and the stage that decided (the same one the cascade's stage table marks),
// and two versions side by side; feedback given in the Decisions tab is stored (read back with
// GET /v1/decisions/{id}); a JSONL job submitted in the Jobs tab reaches 100% and its results
// download with every custom_id once.
// Throughout, the page may request nothing but the server, and nothing may break its
// Content-Security-Policy (a violation is a console error).
//
// usage: node tests/browser/console.cjs BASE_URL API_KEY [SCREENSHOT.png]
// Exits 77 (ctest SKIP_RETURN_CODE) when puppeteer-core or Chromium is missing.
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");

const [base, key, screenshot] = process.argv.slice(2);
if (!base || !key) {
  console.error("usage: node console.cjs BASE_URL API_KEY [SCREENSHOT.png]");
  process.exit(2);
}
const { puppeteer, chromium } = require("./chromium.cjs").browserTools();

const failures = [];
function check(what, ok, detail) {
  if (!ok) failures.push(`${what}${detail !== undefined ? ": " + detail : ""}`);
}
// The API as a client outside the page sees it.
async function apiGet(path) {
  const r = await fetch(base + path, { headers: { Authorization: "Bearer " + key } });
  return { status: r.status, body: await r.json() };
}

const POLICY_V1 = [
  "Spam policy.",
  "Content that advertises products with unsolicited links violates the policy.",
  "Return exactly one character: 0 or 1.",
].join("\n");
const POLICY_V2 = [
  "Spam policy.",
  "Content that advertises products or services with unsolicited links or phone numbers violates the policy.",
  "Return exactly one character: 0 or 1.",
].join("\n");

(async () => {
  // The server listens before its model is loaded; the console needs the model.
  for (let i = 0; ; i++) {
    const r = await fetch(base + "/ready").catch(() => null);
    if (r && r.status === 200) break;
    if (i > 1200) throw new Error("the server did not become ready in 120 s");
    await new Promise((res) => setTimeout(res, 100));
  }
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1440, height: 960 });
    page.setDefaultTimeout(60000);
    const elsewhere = [];
    page.on("request", (r) => {
      const url = r.url();
      if (!url.startsWith(base + "/") && !url.startsWith("blob:" + base + "/")) elsewhere.push(url);
      if (url.includes(key) || url.includes("wrong-key")) failures.push(`a request carried the API key in its URL: ${url}`);
    });
    const consoleErrors = [];
    page.on("console", (m) => {
      // The 401s and 404s the test provokes on purpose are logged by Chromium as failed loads.
      if (m.type() === "error" && !/status of (401|404)/.test(m.text())) consoleErrors.push(m.text());
    });
    page.on("pageerror", (e) => consoleErrors.push(String(e)));

    const text = (sel) => page.$eval(sel, (e) => e.textContent.trim());
    const visible = (sel) => page.$eval(sel, (e) => !e.classList.contains("hidden") && e.getBoundingClientRect().height > 0);
    async function fill(sel, value) {
      await page.$eval(sel, (e, v) => {
        e.value = v;
        e.dispatchEvent(new Event("input", { bubbles: true }));
        e.dispatchEvent(new Event("change", { bubbles: true }));
      }, value);
    }

    // ---- The page and a wrong key ----
    const resp = await page.goto(base + "/", { waitUntil: "load" });
    check("GET / status", resp.status() === 200, resp.status());
    check("GET / Content-Security-Policy", (resp.headers()["content-security-policy"] || "").startsWith("default-src 'self'"));
    await page.waitForSelector("#tab-playground");
    await fill("#api-key", "wrong-key");
    await page.click("#key-save");
    await page.waitForFunction(() => /refused the API key/.test(document.getElementById("banner").textContent) &&
      !document.getElementById("banner").classList.contains("hidden"));
    const banner = await text("#banner");
    check("wrong key message names the 401", /401/.test(banner) && /Incorrect API key/.test(banner), banner);
    check("wrong key marks the key field", await page.$eval("#key-box", (e) => e.classList.contains("missing")));

    // ---- The right key ----
    await fill("#api-key", key);
    await page.click("#key-save");
    await page.waitForFunction(() => document.getElementById("banner").classList.contains("hidden"));
    check("key kept in sessionStorage", (await page.evaluate(() => sessionStorage.getItem("arbiter.apiKey"))) === key);

    // ---- Policies: register two versions ----
    await page.click('#tabs button[data-tab="policies"]');
    await page.waitForSelector("#pol-form", { visible: true });
    async function register(policyText, version, cascade) {
      await fill("#pol-new-id", "spam");
      await fill("#pol-new-text", policyText);
      await fill("#pol-new-cascade", cascade ? JSON.stringify(cascade) : "");
      await fill("#pol-new-description", "unsolicited advertising");
      await page.click("#pol-register");
      await page.waitForFunction(() => /^Registered|error/.test(document.getElementById("pol-status").textContent +
        " " + document.getElementById("pol-status").className));
      const status = await text("#pol-status");
      if (status !== `Registered spam version ${version}.`) throw new Error(`registering version ${version}: ${status}`);
    }
    await register(POLICY_V1, 1);
    // Version 2 asks the score stage for more certainty than the tiny model has, so that the
    // cascade goes on to low.
    await register(POLICY_V2, 2, { stages: ["score", "low"], thresholds: { score: 0.999 } });
    await page.waitForFunction(() => {
      const row = document.querySelector('#pol-list tbody tr[data-id="spam"]');
      return row && row.children[1].textContent === "v2";
    });
    // The status appears once the list and the version pickers are up to date.
    const detailVersions = await page.$$eval("#pol-version option", (os) => os.map((o) => o.value));
    check("Policies tab versions", JSON.stringify(detailVersions) === '["2","1"]', JSON.stringify(detailVersions));
    const pickerVersions = await page.$$eval("#pg-version option", (os) => os.map((o) => o.value));
    check("playground versions", JSON.stringify(pickerVersions) === '["2","1"]', JSON.stringify(pickerVersions));
    const stored = await apiGet("/v1/policies/spam");
    check("GET /v1/policies/spam has both versions", JSON.stringify(stored.body.versions) === "[1,2]", JSON.stringify(stored.body));
    check("GET /v1/policies/spam latest text", stored.body.text === POLICY_V2);
    check("GET /v1/policies/spam latest cascade", stored.body.cascade && JSON.stringify(stored.body.cascade.stages) === '["score","low"]',
      JSON.stringify(stored.body.cascade));
    // The diff of v1 -> v2: one line out, one line in.
    await page.click("#pol-diff-run");
    await page.waitForSelector("#pol-diff span.add");
    const added = await page.$$eval("#pol-diff span.add", (s) => s.map((e) => e.textContent));
    const removed = await page.$$eval("#pol-diff span.del", (s) => s.map((e) => e.textContent));
    check("diff adds the new line", added.length === 1 && added[0] === "+ " + POLICY_V2.split("\n")[1], JSON.stringify(added));
    check("diff removes the old line", removed.length === 1 && removed[0] === "- " + POLICY_V1.split("\n")[1], JSON.stringify(removed));

    // ---- Playground: effort auto, two versions side by side ----
    await page.click('#tabs button[data-tab="playground"]');
    await page.waitForFunction(() => [...document.querySelectorAll("#pg-version option")].map((o) => o.value).join() === "2,1");
    check("playground policy picker", (await page.$eval("#pg-policy", (e) => e.value)) === "spam");
    check("registered policies offered", (await page.$eval('input[name="policy-source"]:checked', (e) => e.value)) === "registered");
    await page.click('input[name="policy-source"][value="registered"]');
    await fill("#pg-content", "WIN a FREE cruise!!! Click http://example.test/deal now, call 555-0100.");
    await fill("#pg-effort", "auto");
    check("mode is off under auto", await page.$eval("#pg-mode", (e) => e.disabled));
    await page.click("#pg-compare");
    await fill("#pg-version-b", "1");
    await page.click("#pg-run");
    await page.waitForFunction(() => document.querySelectorAll("#pg-results .result").length === 2 && !document.getElementById("pg-run").disabled);
    const cards = await page.$$eval("#pg-results .result", (cs) => cs.map((c) => ({
      policy: c.dataset.policy,
      error: c.querySelector(".error") ? c.querySelector(".error").textContent : null,
      verdict: c.querySelector('[data-field="verdict"]') ? c.querySelector('[data-field="verdict"]').textContent : null,
      decidedBy: c.querySelector('[data-field="decided_by"]') ? c.querySelector('[data-field="decided_by"]').textContent : null,
      stages: [...c.querySelectorAll("table.stages tbody tr")].map((r) => r.dataset.stage),
      decidedRows: [...c.querySelectorAll("table.stages tbody tr.decided")].map((r) => r.dataset.stage),
      decision: c.querySelector('[data-field="decision_id"]') ? c.querySelector('[data-field="decision_id"]').textContent : null,
      latency: c.querySelector('[data-field="latency"]') ? c.querySelector('[data-field="latency"]').textContent : null,
    })));
    check("cards are the two versions", cards.map((c) => c.policy).join() === "spam@2,spam@1", JSON.stringify(cards.map((c) => c.policy)));
    for (const c of cards) {
      check(`${c.policy}: no error`, c.error === null, c.error);
      check(`${c.policy}: a verdict is shown`, c.verdict !== null && c.verdict !== "", c.verdict);
      check(`${c.policy}: the deciding stage is shown`, !!c.decidedBy && c.stages.includes(c.decidedBy), JSON.stringify(c));
      check(`${c.policy}: the stage table marks it`, JSON.stringify(c.decidedRows) === JSON.stringify([c.decidedBy]), JSON.stringify(c));
      check(`${c.policy}: latency shown`, /ms/.test(c.latency || ""), c.latency);
      check(`${c.policy}: decision id`, /^dec_/.test(c.decision || ""), c.decision);
    }
    // Version 2's cascade went past score; the card lists both stages and the deciding one.
    check("spam@2 ran score then low", JSON.stringify(cards[0].stages) === '["score","low"]' && cards[0].decidedBy === "low",
      JSON.stringify(cards[0]));
    // What the page shows is what the server stored for that decision.
    const firstDecision = cards[0].decision;
    if (firstDecision) {
      const d = await apiGet("/v1/decisions/" + firstDecision);
      check("decision stored", d.status === 200, d.status);
      check("decision is spam@2, auto", d.body.policy_id === "spam" && d.body.policy_version === 2 && d.body.reasoning_effort === "auto",
        JSON.stringify(d.body));
      const shown = cards[0].verdict === "no verdict" ? null : cards[0].verdict;
      check("shown verdict is the stored one", JSON.stringify(d.body.verdict) === JSON.stringify(shown === null ? null : isNaN(shown) ? shown : Number(shown)),
        `${cards[0].verdict} vs ${JSON.stringify(d.body.verdict)}`);
    }
    if (screenshot) {
      await page.evaluate(() => window.scrollTo(0, 0));
      await page.screenshot({ path: screenshot, fullPage: false });
    }

    // ---- Decisions: feedback ----
    await fill("#dec-reviewer", "ann");
    await page.click('#tabs button[data-tab="decisions"]');
    await page.waitForSelector("#dec-list details.decision");
    const target = firstDecision || (await page.$eval("#dec-list details.decision", (e) => e.dataset.id));
    const item = `#dec-list details.decision[data-id="${target}"]`;
    await page.waitForSelector(item);
    await page.click(`${item} > summary`);
    const verdict = (await apiGet("/v1/decisions/" + target)).body.verdict;
    const label = verdict === 1 ? "0" : "1";
    await page.$eval(`${item} .fb-label`, (e, v) => { e.value = v; }, label);
    await page.$eval(`${item} .fb-note`, (e) => { e.value = "checked in the browser test"; });
    await page.click(`${item} .fb-incorrect`);
    await page.waitForFunction((sel) => /^Saved:/.test((document.querySelector(sel + " .fb-status") || {}).textContent || ""), {}, item);
    const after = await apiGet("/v1/decisions/" + target);
    check("feedback stored", after.body.feedback && after.body.feedback.label === Number(label) && after.body.feedback.reviewer === "ann" &&
      after.body.feedback.note === "checked in the browser test" && after.body.feedback_count === 1, JSON.stringify(after.body.feedback));
    check("feedback shown", /corrected to/.test(await text(`${item} [data-field="feedback"]`)));
    // The disagreement view lists it.
    await page.click("#dec-disagreement");
    await page.click("#dec-load");
    await page.waitForFunction(() => /decisions, newest first|No decisions/.test(document.getElementById("dec-status").textContent));
    const disagreeing = await page.$$eval("#dec-list details.decision", (ds) => ds.map((d) => d.dataset.id));
    check("disagreement view", JSON.stringify(disagreeing) === JSON.stringify([target]), JSON.stringify(disagreeing));

    // ---- Jobs: a JSONL file of OpenAI batch lines submitted, followed to 100%, its results downloaded ----
    await page.click('#tabs button[data-tab="jobs"]');
    check("jobs tab shown", await visible("#job-form"));
    const work = fs.mkdtempSync(path.join(os.tmpdir(), "arbiter-console-"));
    const ids = ["job-a", "job-b", "job-c"];
    const jobFile = path.join(work, "job.jsonl");
    fs.writeFileSync(jobFile, ids.map((id, i) => JSON.stringify({
      custom_id: id, method: "POST", url: "/v1/classify",
      body: { content: `item ${i}: win a prize`, policies: [{ id: "inline", text: POLICY_V1 }], reasoning_effort: "low", max_tokens: 8 },
    })).join("\n") + "\n");
    const downloads = path.join(work, "downloads");
    fs.mkdirSync(downloads);
    const cdp = await page.createCDPSession();
    await cdp.send("Browser.setDownloadBehavior", { behavior: "allow", downloadPath: downloads });
    const fileInput = await page.$("#job-file");
    await fileInput.uploadFile(jobFile);
    await page.click("#job-submit");
    await page.waitForFunction(() => document.getElementById("job-progress").value === 1 &&
      !document.getElementById("job-download").disabled, { timeout: 120000 });
    const jobId = await page.$eval("#job-download", (b) => b.dataset.id);
    const job = await apiGet("/v1/jobs/" + encodeURIComponent(jobId));
    check("job completed", job.status === 200 && job.body.state === "completed", JSON.stringify(job.body));
    await page.click("#job-download");
    let downloaded = null;
    for (let i = 0; i < 200 && !downloaded; i++) {
      const done = fs.readdirSync(downloads).filter((f) => f.endsWith(".jsonl"));
      if (done.length) downloaded = path.join(downloads, done[0]);
      else await new Promise((res) => setTimeout(res, 50));
    }
    check("results downloaded", downloaded !== null);
    if (downloaded) {
      const got = fs.readFileSync(downloaded, "utf8").split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l).custom_id).sort();
      check("every custom_id once in the download", JSON.stringify(got) === JSON.stringify(ids), JSON.stringify(got));
    }
    fs.rmSync(work, { recursive: true, force: true });

    check("requests outside the server", elsewhere.length === 0, JSON.stringify(elsewhere));
    check("console errors (CSP violations included)", consoleErrors.length === 0, JSON.stringify(consoleErrors));
  } finally {
    await browser.close();
  }
  if (failures.length) {
    console.error("console.cjs: the console disagrees with the API:\n  " + failures.join("\n  "));
    process.exit(1);
  }
  console.log("console.cjs: key, policies, playground (auto), feedback, jobs checked against " + base);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
