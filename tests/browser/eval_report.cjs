// Opens an `arbiter eval` report.html in headless Chromium (file://, no network) and reads the
// rendered numbers back: every policy's confusion counts and precision / recall / F1, each cell of
// its confusion matrix, the accuracy, the item count, the per-stage runs and the sweep's points,
// compared with report.json beside it. Also checks that the page asked for nothing over the network
// and that its charts have a size on screen.
//
// usage: node tests/browser/eval_report.cjs REPORT_DIR
// Exits 77 (ctest SKIP_RETURN_CODE) when puppeteer-core or Chromium is missing.
"use strict";
const fs = require("fs");
const path = require("path");

const dir = process.argv[2];
if (!dir) {
  console.error("usage: node eval_report.cjs REPORT_DIR");
  process.exit(2);
}
const { puppeteer, chromium } = require("./chromium.cjs").browserTools();

const report = JSON.parse(fs.readFileSync(path.join(dir, "report.json"), "utf8"));
const failures = [];
function expectEqual(what, got, want) {
  if (JSON.stringify(got) !== JSON.stringify(want)) failures.push(`${what}: page has ${JSON.stringify(got)}, report.json ${JSON.stringify(want)}`);
}
// Shown text of a number: integers as they are, fractions with three decimals, null as a dash.
function shown(v) {
  if (v === null || v === undefined) return "\u2013";
  return Number.isInteger(v) ? String(v) : v.toFixed(3);
}

(async () => {
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage();
    const requests = [];
    page.on("request", (r) => {
      if (!r.url().startsWith("file:")) requests.push(r.url());
    });
    await page.goto("file://" + path.resolve(dir, "report.html"), { waitUntil: "load" });
    // Every element with a data-metric, as the browser parsed it: attributes and the text shown.
    const cells = await page.$$eval("[data-metric]", (els) =>
      els.map((e) => ({
        policy: e.getAttribute("data-policy"),
        stage: e.getAttribute("data-stage"),
        metric: e.getAttribute("data-metric"),
        expected: e.getAttribute("data-expected"),
        predicted: e.getAttribute("data-predicted"),
        value: JSON.parse(e.getAttribute("data-value")),
        text: e.innerText.trim(),
      })),
    );
    const find = (pred) => cells.filter(pred);
    const one = (what, pred) => {
      const found = find(pred);
      if (found.length !== 1) failures.push(`${what}: ${found.length} elements on the page, expected 1`);
      return found[0] || {};
    };

    expectEqual("items", one("items", (c) => c.metric === "items").value, report.items);
    expectEqual("dataset_errors", one("dataset_errors", (c) => c.metric === "dataset_errors").value, report.dataset_errors.count);
    const acc = one("accuracy", (c) => c.metric === "accuracy" && !c.stage);
    expectEqual("accuracy", acc.value, report.accuracy.value);
    expectEqual("accuracy shown", acc.text, shown(report.accuracy.value));
    for (const [id, p] of Object.entries(report.policies)) {
      for (const m of ["tp", "fp", "tn", "fn", "unknown", "precision", "recall", "f1"]) {
        const c = one(`${id} ${m}`, (c) => c.policy === id && c.metric === m);
        expectEqual(`${id} ${m}`, c.value, p[m]);
        // The shown text starts with the number (an interval may follow).
        if (c.text !== undefined && !c.text.startsWith(shown(p[m]))) failures.push(`${id} ${m}: shown "${c.text}", expected ${shown(p[m])}`);
      }
      let total = 0;
      for (const [e, row] of Object.entries(p.confusion.matrix))
        for (const [pr, n] of Object.entries(row)) {
          const c = one(`${id} confusion ${e}/${pr}`, (c) => c.policy === id && c.metric === "confusion" && c.expected === e && c.predicted === pr);
          expectEqual(`${id} confusion ${e}/${pr}`, c.value, n);
          expectEqual(`${id} confusion ${e}/${pr} shown`, c.text, String(n));
          total += n;
        }
      expectEqual(`${id} confusion total`, total, p.tp + p.fp + p.tn + p.fn);
    }
    for (const [stage, s] of Object.entries(report.cost.stages)) {
      expectEqual(`stage ${stage} runs`, one(`stage ${stage} runs`, (c) => c.stage === stage && c.metric === "runs").value, s.runs);
      expectEqual(`stage ${stage} decided`, one(`stage ${stage} decided`, (c) => c.stage === stage && c.metric === "decided").value, s.decided);
    }
    const charts = ["#stage-cost-chart"];
    if (report.sweep) {
      charts.push("#sweep-chart");
      const dots = await page.$$eval("#sweep-chart circle.point", (els) => els.length);
      const plotted = report.sweep.points.filter((p) => p.agreement !== null).length;
      expectEqual("sweep points plotted", dots, plotted);
      if (report.sweep.best) expectEqual("sweep best cost", one("sweep best", (c) => c.metric === "sweep_best_cost").value, report.sweep.best.cost);
    }
    for (const sel of charts) {
      const box = await page.$eval(sel, (e) => {
        const r = e.getBoundingClientRect();
        return { w: r.width, h: r.height };
      });
      if (!(box.w > 100 && box.h > 10)) failures.push(`${sel} is not laid out (${box.w}x${box.h})`);
    }
    expectEqual("network requests", requests, []);
  } finally {
    await browser.close();
  }
  if (failures.length) {
    console.error("eval_report.cjs: the page disagrees with report.json:\n  " + failures.join("\n  "));
    process.exit(1);
  }
  console.log(`eval_report.cjs: ${Object.keys(report.policies).length} policies checked in ${dir}`);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
