// The Arbiter web console: a playground for classifications, the policy registry (versions, a
// diff, registering a version), the decision log with reviewer feedback, and batch jobs. It talks
// to the server's public API (/v1/...) and nothing else; the API key lives in sessionStorage (this
// tab only) and goes out as an Authorization header, never in a URL. Text from the server is put
// on the page as text (textContent), never as markup.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "arbiter.apiKey";
  const REVIEWER_STORAGE = "arbiter.reviewer";

  // ---- DOM helpers ----------------------------------------------------------------------------

  // el("td", {class: "x", text: "y", dataset: {a: 1}}, child, ...): an element with its text or children.
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === "text") e.textContent = String(v);
      else if (k === "class") e.className = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    return e;
  }
  function fields(pairs) {
    const dl = el("dl", { class: "fields" });
    for (const [k, v, name] of pairs) {
      if (v === undefined || v === null || v === "") continue;
      dl.append(el("dt", { text: k }), el("dd", { dataset: name ? { field: name } : undefined }, v));
    }
    return dl;
  }
  function options(select, items, selected) {
    select.replaceChildren(...items.map(([value, label]) => el("option", { value, text: label })));
    if (selected !== undefined) select.value = String(selected);
  }
  const fmt = (x) => (typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(3)) : String(x));
  const verdictText = (v) => (v === null || v === undefined ? "no verdict" : typeof v === "string" ? v : JSON.stringify(v));
  const when = (unix) => (unix ? new Date(unix * 1000).toLocaleString() : "");
  function setStatus(node, text, isError) {
    node.textContent = text || "";
    node.classList.toggle("error", !!isError);
  }

  // ---- The API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, errors) {
      super(message);
      this.status = status;
      this.code = code;
      this.errors = errors || []; // per-item errors (a refused job)
    }
  }
  const apiKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

  function showBanner(text, kind) {
    const b = $("banner");
    b.textContent = text;
    b.className = kind === "info" ? "info" : "";
    b.dataset.kind = kind || "error";
  }
  function hideBanner(kind) {
    const b = $("banner");
    if (!kind || b.dataset.kind === kind) b.className = "hidden";
  }

  // One API call: method, path, and a body (an object is sent as JSON, a string as JSONL). Resolves
  // to the parsed reply (or the Response with raw: true); rejects with ApiError carrying the error
  // body's message. A 401 also says so in the banner, next to the key field.
  async function api(method, path, body, { raw = false } = {}) {
    const headers = {};
    const key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    let payload;
    if (typeof body === "string") {
      payload = body;
      headers["Content-Type"] = "application/jsonl";
    } else if (body !== undefined) {
      payload = JSON.stringify(body);
      headers["Content-Type"] = "application/json";
    }
    let resp;
    try {
      resp = await fetch(path, { method, headers, body: payload, cache: "no-store", credentials: "omit" });
    } catch (e) {
      throw new ApiError(0, "network", "The server could not be reached (" + e.message + ").");
    }
    if (resp.ok) {
      hideBanner("key");
      hideBanner("info");
      $("key-box").classList.remove("missing");
      if (raw) return resp;
      const text = await resp.text();
      return text ? JSON.parse(text) : null;
    }
    let message = `${resp.status} ${resp.statusText}`;
    let code = "";
    let errors;
    try {
      const err = JSON.parse(await resp.text()).error;
      if (err && err.message) message = err.message;
      if (err && err.code) code = err.code;
      if (err && Array.isArray(err.errors)) errors = err.errors;
    } catch (e) {
      // Not an error body: keep the status line.
    }
    if (resp.status === 401) {
      const text = key
        ? `The server refused the API key (401): ${message} Enter the right key above.`
        : `This server needs an API key (401): ${message} Enter it above.`;
      showBanner(text, "key");
      $("banner").dataset.kind = "key";
      $("key-box").classList.add("missing");
    }
    throw new ApiError(resp.status, code, message, errors);
  }

  // ---- The API key ------------------------------------------------------------------------------

  function initKey() {
    $("api-key").value = apiKey();
    $("key-save").addEventListener("click", () => {
      const k = $("api-key").value.trim();
      if (k) sessionStorage.setItem(KEY_STORAGE, k);
      else sessionStorage.removeItem(KEY_STORAGE);
      hideBanner("key");
      reloadAll();
    });
    $("api-key").addEventListener("keydown", (e) => {
      if (e.key === "Enter") $("key-save").click();
    });
    $("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("api-key").value = "";
    });
  }

  async function serverStatus() {
    try {
      const r = await fetch("/ready", { cache: "no-store", credentials: "omit" });
      const body = await r.json();
      $("server-status").textContent = `${body.model || "server"}: ${body.status}${body.message ? " (" + body.message + ")" : ""}`;
    } catch (e) {
      $("server-status").textContent = "server unreachable";
    }
  }

  // ---- Tabs -------------------------------------------------------------------------------------

  const tabLoaders = {};
  function showTab(name) {
    if (!$("tab-" + name)) name = "playground";
    for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
    for (const s of document.querySelectorAll("section.tab")) s.classList.toggle("hidden", s.id !== "tab-" + name);
    if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
    if (tabLoaders[name]) tabLoaders[name]();
  }
  function initTabs() {
    for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  }

  // ---- Policies shared by the tabs ---------------------------------------------------------------

  const policyCache = new Map(); // "id@version" -> the policy version
  async function policyVersion(id, version) {
    const ref = `${id}@${version}`;
    if (!policyCache.has(ref)) policyCache.set(ref, await api("GET", "/v1/policies/" + encodeURIComponent(ref)));
    return policyCache.get(ref);
  }
  async function policyVersions(id) {
    const p = await api("GET", "/v1/policies/" + encodeURIComponent(id));
    const versions = (p.versions && p.versions.length ? p.versions : [p.version]).slice().sort((a, b) => b - a);
    return { latest: p, versions };
  }
  let policyList = [];
  async function loadPolicyList() {
    const list = await api("GET", "/v1/policies");
    policyList = (list.data || []).slice().sort((a, b) => a.id.localeCompare(b.id));
    return policyList;
  }

  // ---- Playground -------------------------------------------------------------------------------

  async function playgroundPolicies(selectId) {
    const list = await loadPolicyList();
    const select = $("pg-policy");
    const keep = selectId || select.value;
    options(select, list.map((p) => [p.id, p.id]));
    if (list.some((p) => p.id === keep)) select.value = keep;
    // With nothing registered, policy text is the only choice; once policies exist, they are offered
    // again (unless the user chose text).
    if (!list.length) {
      options($("pg-version"), []);
      options($("pg-version-b"), []);
      if (policySource() === "registered") {
        choosePolicySource("text");
        textChosenForUs = true;
      }
      return;
    }
    if (textChosenForUs) choosePolicySource("registered");
    textChosenForUs = false;
    await playgroundVersions();
  }
  async function playgroundVersions() {
    const id = $("pg-policy").value;
    if (!id) return;
    const { versions } = await policyVersions(id);
    const items = versions.map((v, i) => [v, i === 0 ? `v${v} (latest)` : `v${v}`]);
    options($("pg-version"), items, versions[0]);
    options($("pg-version-b"), items, versions[1] !== undefined ? versions[1] : versions[0]);
  }
  let textChosenForUs = false;
  function choosePolicySource(value) {
    document.querySelector(`input[name="policy-source"][value="${value}"]`).checked = true;
    syncPlaygroundControls();
  }
  function policySource() {
    return document.querySelector('input[name="policy-source"]:checked').value;
  }
  function syncPlaygroundControls() {
    const registered = policySource() === "registered";
    $("policy-registered").classList.toggle("hidden", !registered);
    $("policy-text").classList.toggle("hidden", registered);
    $("pg-version-b").disabled = !$("pg-compare").checked;
    // The cascade chooses its own stages: "score" is one of them, not a mode of the request.
    const auto = $("pg-effort").value === "auto";
    $("pg-mode").disabled = auto;
    if (auto) $("pg-mode").value = "reason";
  }

  function stageTable(r) {
    const t = el("table", { class: "stages" },
      el("thead", {}, el("tr", {}, ["stage", "verdict", "confidence", "tokens", "seconds", ""].map((h) => el("th", { text: h })))));
    const body = el("tbody");
    for (const s of r.stages) {
      const tokens = s.usage ? s.usage.total_tokens || s.usage.completion_tokens || 0 : "";
      const note = s.error || s.reason || (s.finish_reason && s.finish_reason !== "stop" ? s.finish_reason : "");
      const decided = s.stage === r.decided_by;
      body.append(el("tr", { class: decided ? "decided" : "", dataset: { stage: s.stage } },
        el("td", { text: s.stage }),
        el("td", { text: verdictText(s.verdict) }),
        el("td", { text: s.confidence === null || s.confidence === undefined ? "\u2013" : fmt(s.confidence) }),
        el("td", { text: tokens }),
        el("td", { text: s.seconds !== undefined ? s.seconds.toFixed(3) : "" }),
        el("td", { text: (decided ? "decided" : "") + (note ? " " + note : "") })));
    }
    t.append(body);
    return t;
  }

  function resultCard(title, r, ms, effort) {
    const v = r.verdict;
    const cls = v === null || v === undefined ? "none" : r.violation ? "violation" : "ok";
    const u = r.usage || {};
    const card = el("div", { class: "panel result", dataset: { policy: title } },
      el("h3", { text: title + (r.policy_version ? ` (v${r.policy_version})` : "") }),
      el("div", { class: "verdict " + cls, dataset: { field: "verdict" } }, verdictText(v)),
      fields([
        ["violation", r.violation ? "yes" : "no", "violation"],
        ["confidence", r.confidence === null || r.confidence === undefined ? "\u2013" : fmt(r.confidence), "confidence"],
        ["decided by", r.decided_by || effort, "decided_by"],
        ["scores", r.scores && Object.keys(r.scores).length
          ? Object.entries(r.scores).map(([k, p]) => `${k}: ${fmt(p)}`).join(", ") : null, "scores"],
        ["finish", (r.finish_reason || "") + (r.reasoning_truncated ? " (reasoning budget ran out)" : ""), "finish_reason"],
        ["tokens", `${u.prompt_tokens || 0} prompt (${u.cached_tokens || 0} cached), ${u.reasoning_tokens || 0} reasoning, ` +
          `${u.completion_tokens || 0} generated, ${u.total_tokens || 0} total`, "tokens"],
        ["latency", `${ms.toFixed(0)} ms (round trip)`, "latency"],
        ["final", r.verdict_error ? JSON.stringify(r.final) : null, "final"],
        ["verdict error", r.verdict_error, "verdict_error"],
        ["decision", r.decision_id, "decision_id"],
      ]));
    if (r.stages && r.stages.length) card.append(el("h3", { text: "Cascade stages" }), stageTable(r));
    if (r.reasoning) {
      card.append(el("details", { class: "reasoning" },
        el("summary", { text: `Reasoning (${r.reasoning.length} characters)` }),
        el("pre", { class: "text", text: r.reasoning })));
    }
    return card;
  }

  async function classifyOne(title, policy) {
    const effort = $("pg-effort").value;
    const body = { content: $("pg-content").value, policies: [policy], reasoning_effort: effort, return_reasoning: true };
    if (effort !== "auto") body.mode = $("pg-mode").value;
    const start = performance.now();
    try {
      const resp = await api("POST", "/v1/classify", body);
      return resultCard(title, resp.results[0], performance.now() - start, effort);
    } catch (e) {
      return el("div", { class: "panel result" }, el("h3", { text: title }), el("p", { class: "error", text: e.message }));
    }
  }

  async function runPlayground(ev) {
    ev.preventDefault();
    const out = $("pg-results");
    const status = $("pg-status");
    if (!$("pg-content").value.trim()) return setStatus(status, "Enter some content to classify.", true);
    const runs = [];
    if (policySource() === "registered") {
      const id = $("pg-policy").value;
      if (!id) return setStatus(status, "No policy registered yet: register one in Policies, or use Text.", true);
      runs.push([`${id}@${$("pg-version").value}`, { id: `${id}@${$("pg-version").value}` }]);
      if ($("pg-compare").checked) runs.push([`${id}@${$("pg-version-b").value}`, { id: `${id}@${$("pg-version-b").value}` }]);
    } else {
      const text = $("pg-policy-text").value;
      if (!text.trim()) return setStatus(status, "Enter the policy text.", true);
      runs.push(["inline policy", { id: "inline", text }]);
    }
    $("pg-run").disabled = true;
    setStatus(status, "Classifying\u2026");
    try {
      const cards = await Promise.all(runs.map(([title, policy]) => classifyOne(title, policy)));
      out.replaceChildren(...cards);
      setStatus(status, "");
    } finally {
      $("pg-run").disabled = false;
    }
  }

  function initPlayground() {
    for (const r of document.querySelectorAll('input[name="policy-source"]'))
      r.addEventListener("change", () => {
        textChosenForUs = false;
        syncPlaygroundControls();
      });
    $("pg-compare").addEventListener("change", syncPlaygroundControls);
    $("pg-effort").addEventListener("change", syncPlaygroundControls);
    $("pg-policy").addEventListener("change", () => playgroundVersions().catch(() => {}));
    $("classify-form").addEventListener("submit", runPlayground);
    syncPlaygroundControls();
  }

  // ---- Policies tab -----------------------------------------------------------------------------

  let selectedPolicy = null; // {id, versions}

  async function refreshPolicies() {
    const status = $("pol-status");
    try {
      const list = await loadPolicyList();
      const tbody = $("pol-list").querySelector("tbody");
      tbody.replaceChildren(...list.map((p) => el("tr", {
        dataset: { id: p.id }, class: selectedPolicy && selectedPolicy.id === p.id ? "selected" : "",
        onclick: () => selectPolicy(p.id),
      }, el("td", { text: p.id }), el("td", { text: "v" + p.version }),
      el("td", { text: (p.versions || [p.version]).length }), el("td", { text: p.description || "" }))));
      if (!list.length) tbody.append(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "No policies registered." })));
    } catch (e) {
      setStatus(status, e.message, true);
    }
  }

  async function showPolicyText() {
    if (!selectedPolicy) return;
    const p = await policyVersion(selectedPolicy.id, $("pol-version").value);
    const meta = [];
    if (p.labels && p.labels.length) meta.push(`labels: ${p.labels.join(", ")}; violating: ${(p.violating_labels || []).join(", ")}`);
    if (p.created) meta.push(`created ${when(p.created)}`);
    if (p.cascade) meta.push("has a cascade");
    if (p.rules) meta.push("has rules");
    $("pol-text").textContent = (meta.length ? "# " + meta.join("; ") + "\n\n" : "") + p.text;
  }

  async function selectPolicy(id) {
    const { versions } = await policyVersions(id);
    selectedPolicy = { id, versions };
    for (const tr of $("pol-list").querySelectorAll("tbody tr")) tr.classList.toggle("selected", tr.dataset.id === id);
    $("pol-title").textContent = id;
    const items = versions.map((v) => [v, "v" + v]);
    options($("pol-version"), items, versions[0]);
    options($("pol-diff-a"), items, versions[1] !== undefined ? versions[1] : versions[0]);
    options($("pol-diff-b"), items, versions[0]);
    $("pol-diff").replaceChildren();
    await showPolicyText();
  }

  // The lines of `a` and `b` as a list of ["same" | "del" | "add", line], from their longest
  // common subsequence of lines (policies are short; beyond ~4M cells it falls back to showing
  // every line of a removed and every line of b added).
  function lineDiff(aText, bText) {
    const a = aText.split("\n");
    const b = bText.split("\n");
    const n = a.length;
    const m = b.length;
    if (n * m > 4e6) return [...a.map((l) => ["del", l]), ...b.map((l) => ["add", l])];
    // lcs[i][j]: the length of the longest common subsequence of a[i..] and b[j..].
    const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
    for (let i = n - 1; i >= 0; i--)
      for (let j = m - 1; j >= 0; j--) lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    const out = [];
    let i = 0;
    let j = 0;
    while (i < n && j < m) {
      if (a[i] === b[j]) {
        out.push(["same", a[i]]);
        i++;
        j++;
      } else if (lcs[i + 1][j] >= lcs[i][j + 1]) out.push(["del", a[i++]]);
      else out.push(["add", b[j++]]);
    }
    while (i < n) out.push(["del", a[i++]]);
    while (j < m) out.push(["add", b[j++]]);
    return out;
  }

  async function showDiff() {
    if (!selectedPolicy) return;
    const va = $("pol-diff-a").value;
    const vb = $("pol-diff-b").value;
    const [pa, pb] = await Promise.all([policyVersion(selectedPolicy.id, va), policyVersion(selectedPolicy.id, vb)]);
    const lines = lineDiff(pa.text, pb.text);
    const changed = lines.filter(([k]) => k !== "same").length;
    const pre = $("pol-diff");
    pre.replaceChildren(el("span", { class: "same", text: `v${va} \u2192 v${vb}: ${changed ? changed + " lines changed" : "no changes"}` }),
      ...lines.map(([kind, line]) => el("span", { class: kind, text: (kind === "add" ? "+ " : kind === "del" ? "- " : "  ") + line })));
  }

  const splitList = (s) => s.split(",").map((x) => x.trim()).filter((x) => x);

  async function editFromSelected() {
    if (!selectedPolicy) return;
    const p = await policyVersion(selectedPolicy.id, $("pol-version").value);
    $("pol-new-id").value = p.id;
    $("pol-new-text").value = p.text;
    $("pol-new-description").value = p.description || "";
    $("pol-new-labels").value = (p.labels || []).join(", ");
    $("pol-new-violating").value = (p.violating_labels || []).join(", ");
    $("pol-new-rules").value = p.rules ? JSON.stringify(p.rules, null, 2) : "";
    $("pol-new-cascade").value = p.cascade ? JSON.stringify(p.cascade, null, 2) : "";
    $("pol-advanced").open = !!(p.rules || p.cascade);
    setStatus($("pol-status"), `Editing a copy of ${p.id} v${p.version} (its rules and cascade included).`);
    $("pol-new-text").focus();
  }

  async function registerPolicy(ev) {
    ev.preventDefault();
    const status = $("pol-status");
    const body = { id: $("pol-new-id").value.trim(), text: $("pol-new-text").value };
    const labels = splitList($("pol-new-labels").value);
    const violating = splitList($("pol-new-violating").value);
    if (labels.length) body.labels = labels;
    if (violating.length) body.violating_labels = violating;
    if ($("pol-new-description").value.trim()) body.description = $("pol-new-description").value.trim();
    for (const field of ["rules", "cascade"]) {
      const text = $("pol-new-" + field).value.trim();
      if (!text) continue;
      try {
        body[field] = JSON.parse(text);
      } catch (e) {
        return setStatus(status, `The ${field} are not valid JSON: ${e.message}`, true);
      }
    }
    $("pol-register").disabled = true;
    setStatus(status, "Registering\u2026");
    try {
      const p = await api("POST", "/v1/policies", body);
      // The list, the version pickers and then the message: once it shows, everything shows the new version.
      await refreshPolicies();
      await selectPolicy(p.id);
      await playgroundPolicies($("pg-policy").value || p.id);
      setStatus(status, `Registered ${p.id} version ${p.version}.`);
    } catch (e) {
      setStatus(status, e.message, true);
    } finally {
      $("pol-register").disabled = false;
    }
  }

  function initPolicies() {
    $("pol-refresh").addEventListener("click", refreshPolicies);
    $("pol-version").addEventListener("change", () => showPolicyText().catch(() => {}));
    $("pol-diff-run").addEventListener("click", () => showDiff().catch((e) => setStatus($("pol-status"), e.message, true)));
    $("pol-edit").addEventListener("click", () => editFromSelected().catch(() => {}));
    $("pol-form").addEventListener("submit", registerPolicy);
    tabLoaders.policies = refreshPolicies;
  }

  // ---- Decisions tab ----------------------------------------------------------------------------

  let decisionsAfter = null;

  function feedbackTag(d) {
    if (!d.feedback) return el("span", { class: "tag", dataset: { field: "feedback" }, text: "no feedback" });
    const agrees = JSON.stringify(d.feedback.label) === JSON.stringify(d.verdict);
    return el("span", { class: "tag " + (agrees ? "good" : "bad"), dataset: { field: "feedback" },
      text: `${agrees ? "confirmed" : "corrected to " + verdictText(d.feedback.label)} by ${d.feedback.reviewer}` });
  }

  // A reviewer's label as the API wants it: a number for numeric verdicts, else the label text.
  function labelValue(text, verdict) {
    const t = text.trim();
    if (/^-?\d+$/.test(t) && (typeof verdict === "number" || verdict === null || verdict === undefined)) return Number(t);
    return t;
  }

  function decisionItem(d) {
    const summary = el("summary", {},
      el("span", { class: "id", text: d.id }),
      el("span", { text: when(d.created) }),
      el("span", { text: d.policy_id + (d.policy_version ? "@" + d.policy_version : "") }),
      el("span", { class: "tag " + (d.violation ? "bad" : "good"), text: "verdict " + verdictText(d.verdict) }),
      el("span", { text: d.confidence === null || d.confidence === undefined ? "" : "confidence " + fmt(d.confidence) }),
      el("span", { class: "muted", text: d.reasoning_effort + (d.mode && d.mode !== "reasoning" ? " / " + d.mode : "") }),
      feedbackTag(d));
    const u = d.usage || {};
    const body = el("div", { class: "body" },
      fields([
        ["request", d.request_id],
        ["model", d.model],
        ["finish", d.finish_reason],
        ["tokens", `${u.prompt_tokens || 0} prompt, ${u.reasoning_tokens || 0} reasoning, ${u.total_tokens || 0} total`],
        ["latency", d.latency_ms !== undefined ? d.latency_ms.toFixed(1) + " ms" : null],
        ["content", d.content],
        ["content sha256", d.content ? null : d.content_sha256],
        ["final", d.final],
        ["feedback", d.feedback ? `${verdictText(d.feedback.label)} by ${d.feedback.reviewer}${d.feedback.note ? " (" + d.feedback.note + ")" : ""}, ` +
          `${when(d.feedback.created)}; ${d.feedback_count} in all` : null, "feedback"],
      ]));
    if (d.reasoning) body.append(el("details", {}, el("summary", { text: "Reasoning" }), el("pre", { class: "text", text: d.reasoning })));
    else body.append(el("p", { class: "muted", text: "No reasoning stored for this decision." }));

    const guess = typeof d.verdict === "number" && (d.verdict === 0 || d.verdict === 1) ? String(1 - d.verdict) : "";
    const label = el("input", { class: "fb-label", size: 10, placeholder: "correct label", value: guess });
    const note = el("input", { class: "fb-note", placeholder: "note (optional)" });
    const status = el("span", { class: "fb-status muted" });
    const send = async (labelText) => {
      const reviewer = $("dec-reviewer").value.trim();
      if (!reviewer) return setStatus(status, "Enter your name as reviewer (above) first.", true);
      if (labelText === "") return setStatus(status, "Enter the correct label.", true);
      sessionStorage.setItem(REVIEWER_STORAGE, reviewer);
      setStatus(status, "Saving\u2026");
      try {
        await api("POST", `/v1/decisions/${encodeURIComponent(d.id)}/feedback`,
          { label: labelValue(labelText, d.verdict), reviewer, note: note.value.trim() });
        // Read back what the server stored.
        const fresh = await api("GET", "/v1/decisions/" + encodeURIComponent(d.id));
        const item = decisionItem(fresh);
        item.open = true;
        wrapper.replaceWith(item);
        setStatus(item.querySelector(".fb-status"), `Saved: ${verdictText(fresh.feedback.label)} by ${fresh.feedback.reviewer}.`);
      } catch (e) {
        setStatus(status, e.message, true);
      }
    };
    body.append(el("div", { class: "row feedback" },
      el("strong", { text: "Feedback" }),
      el("button", { type: "button", class: "fb-correct", onclick: () => send(verdictText(d.verdict)) }, "Correct"),
      el("span", { class: "muted", text: "or" }),
      label,
      el("button", { type: "button", class: "fb-incorrect", onclick: () => send(label.value) }, "Incorrect"),
      note, status));
    if (d.verdict === null || d.verdict === undefined) body.querySelector(".fb-correct").disabled = true;
    const wrapper = el("details", { class: "decision", dataset: { id: d.id } }, summary, body);
    return wrapper;
  }

  async function loadDecisions(more) {
    const status = $("dec-status");
    const q = new URLSearchParams();
    if ($("dec-policy").value.trim()) q.set("policy", $("dec-policy").value.trim());
    if ($("dec-verdict").value.trim()) q.set("verdict", $("dec-verdict").value.trim());
    if ($("dec-disagreement").checked) q.set("disagreement", "true");
    q.set("limit", "20");
    if (more && decisionsAfter) q.set("after", decisionsAfter);
    setStatus(status, "Loading\u2026");
    try {
      const list = await api("GET", "/v1/decisions?" + q.toString());
      const items = (list.data || []).map(decisionItem);
      if (more) $("dec-list").append(...items);
      else $("dec-list").replaceChildren(...items);
      decisionsAfter = list.last_id || null;
      $("dec-more").classList.toggle("hidden", !list.has_more);
      const shown = $("dec-list").querySelectorAll("details.decision").length;
      setStatus(status, shown ? `${shown} decisions, newest first` : "No decisions match.");
    } catch (e) {
      setStatus(status, e.code === "decision_log_disabled"
        ? "This server keeps no decision log (start it with --db FILE)." : e.message, true);
    }
  }

  function initDecisions() {
    $("dec-reviewer").value = sessionStorage.getItem(REVIEWER_STORAGE) || "";
    $("dec-filters").addEventListener("submit", (ev) => {
      ev.preventDefault();
      loadDecisions(false);
    });
    $("dec-more").addEventListener("click", () => loadDecisions(true));
    tabLoaders.decisions = () => loadDecisions(false);
  }

  // ---- Jobs tab ---------------------------------------------------------------------------------

  let jobTimer = null;
  const TERMINAL = new Set(["completed", "failed", "cancelled", "canceled", "expired"]);

  // What to say when a jobs call fails: a server without the endpoint says so plainly; a refused
  // job lists its first bad items.
  function noJobs(e) {
    if (e.status === 404 && (e.code === "unknown_path" || !e.code))
      return "This server has no jobs endpoint (/v1/jobs answered 404): batch jobs are not available here.";
    const items = e.errors.slice(0, 5).map((x) =>
      `line ${x.line !== undefined ? x.line : x.index}${x.custom_id ? " (" + x.custom_id + ")" : ""}: ${x.message}`);
    return e.message + (items.length ? " " + items.join("; ") + (e.errors.length > 5 ? "; \u2026" : "") : "");
  }

  async function refreshJobs() {
    const status = $("job-status");
    try {
      const list = await api("GET", "/v1/jobs?limit=20");
      $("job-list-panel").classList.remove("hidden");
      const tbody = $("job-list").querySelector("tbody");
      tbody.replaceChildren(...(list.data || []).map((j) => el("tr", { dataset: { id: j.id }, onclick: () => followJob(j.id) },
        el("td", { text: j.id }), el("td", { text: j.state }),
        el("td", { text: `${Math.round(jobFraction(j) * 100)}%` }), el("td", { text: when(j.created_at) }))));
      if (!tbody.children.length) tbody.append(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "No jobs yet." })));
    } catch (e) {
      $("job-list-panel").classList.add("hidden");
      setStatus(status, noJobs(e), true);
    }
  }

  async function cancelJob() {
    const id = $("job-cancel").dataset.id;
    try {
      await api("POST", `/v1/jobs/${encodeURIComponent(id)}/cancel`, {});
      followJob(id);
    } catch (e) {
      setStatus($("job-status"), noJobs(e), true);
    }
  }

  // The share done, from `progress` (a fraction or a percentage) or from the counts.
  function jobFraction(job) {
    if (typeof job.progress === "number") return job.progress > 1 ? job.progress / 100 : job.progress;
    const c = job.counts || job.request_counts || {};
    const total = c.total || 0;
    const done = (c.completed || 0) + (c.failed || 0);
    return total ? done / total : 0;
  }

  function renderJob(job) {
    $("job-view").classList.remove("hidden");
    $("job-title").textContent = "Job " + job.id;
    const pairs = [];
    for (const [k, v] of Object.entries(job)) {
      if (k === "id" || k === "object" || v === null || v === undefined) continue;
      const shown = v && typeof v === "object" ? Object.entries(v).map(([a, b]) => `${a}: ${fmt(b)}`).join(", ")
        : /(_at|created)$/.test(k) && typeof v === "number" ? when(v) : fmt(v);
      pairs.push([k, shown, k]);
    }
    $("job-fields").replaceWith(Object.assign(fields(pairs), { id: "job-fields" }));
    $("job-progress").value = jobFraction(job);
    const finished = TERMINAL.has(job.state) || TERMINAL.has(job.status);
    $("job-download").disabled = !finished;
    $("job-download").dataset.id = job.id;
    $("job-cancel").disabled = finished;
    $("job-cancel").dataset.id = job.id;
  }

  async function followJob(id) {
    clearTimeout(jobTimer);
    const status = $("job-status");
    try {
      const job = await api("GET", "/v1/jobs/" + encodeURIComponent(id));
      renderJob(job);
      setStatus(status, "");
      if (!(TERMINAL.has(job.state) || TERMINAL.has(job.status))) jobTimer = setTimeout(() => followJob(id), 1000);
      else refreshJobs();
    } catch (e) {
      setStatus(status, noJobs(e), true);
    }
  }

  async function submitJob(ev) {
    ev.preventDefault();
    const status = $("job-status");
    const file = $("job-file").files[0];
    if (!file) return setStatus(status, "Choose a JSONL file first.", true);
    $("job-submit").disabled = true;
    setStatus(status, "Submitting\u2026");
    try {
      const job = await api("POST", "/v1/jobs", await file.text());
      setStatus(status, `Submitted job ${job.id}.`);
      $("job-id").value = job.id;
      followJob(job.id);
    } catch (e) {
      setStatus(status, noJobs(e), true);
    } finally {
      $("job-submit").disabled = false;
    }
  }

  async function downloadResults() {
    const id = $("job-download").dataset.id;
    try {
      const resp = await api("GET", `/v1/jobs/${encodeURIComponent(id)}/results`, undefined, { raw: true });
      const url = URL.createObjectURL(await resp.blob());
      const a = $("job-link");
      a.href = url;
      a.download = `${id}-results.jsonl`;
      a.click();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (e) {
      setStatus($("job-status"), noJobs(e), true);
    }
  }

  function initJobs() {
    $("job-form").addEventListener("submit", submitJob);
    $("job-follow").addEventListener("click", () => $("job-id").value.trim() && followJob($("job-id").value.trim()));
    $("job-download").addEventListener("click", downloadResults);
    $("job-cancel").addEventListener("click", cancelJob);
    $("job-refresh").addEventListener("click", refreshJobs);
    tabLoaders.jobs = refreshJobs;
  }

  // ---- Start ------------------------------------------------------------------------------------

  function reloadAll() {
    policyCache.clear();
    playgroundPolicies().catch(() => {});
    const active = document.querySelector("#tabs button.active");
    if (active && tabLoaders[active.dataset.tab]) tabLoaders[active.dataset.tab]();
  }

  initKey();
  initTabs();
  initPlayground();
  initPolicies();
  initDecisions();
  initJobs();
  serverStatus();
  if (!apiKey()) showBanner("If this server needs an API key, enter it above (it is kept for this tab only).", "info");
  showTab(location.hash.slice(1) || "playground");
  playgroundPolicies().catch(() => {});
})();
