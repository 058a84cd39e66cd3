// tunelab board: runs table, live curves (uPlot), launch form, run details.
// Polls the JSON API every POLL_MS; metrics are fetched incrementally by byte offset.
"use strict";

// ?poll=MS in the URL changes the refresh interval (tests use a short one)
const POLL_MS = Math.max(200, Number(new URLSearchParams(location.search).get("poll")) || 1500);
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
// One chart per entry; a chart shows when a plotted run logged one of its keys.
// [key, dashed] — eval curves are dashed in the run's colour.
const CHARTS = [
  { id: "loss", title: "loss (dashed: eval)", keys: [["loss", false], ["eval_loss", true]] },
  { id: "lr", title: "learning rate", keys: [["lr", false]] },
  { id: "tokens", title: "tokens / s", keys: [["tokens_per_s", false]] },
  { id: "grad", title: "grad norm", keys: [["grad_norm", false]] },
  { id: "acc", title: "reward accuracy (DPO)", keys: [["rewards/accuracy", false], ["eval_rewards/accuracy", true]] },
  { id: "margins", title: "reward margins (DPO, KTO)", keys: [["rewards/margins", false], ["eval_rewards/margins", true]] },
  { id: "reward", title: "mean reward (GRPO)", keys: [["reward/mean", false]] },
  { id: "kl", title: "KL estimate (KTO, GRPO with beta)", keys: [["kl", false]] },
];

const state = {
  runs: [],
  plotted: new Set(),     // run names overlaid on the charts
  userTouched: false,     // once the user ticks boxes, stop auto-plotting
  metrics: {},            // name -> {offset, rows}
  colors: {},             // name -> colour (stable)
  charts: {},             // chart id -> {plot, signature}
  selected: null,
  recipes: null,
  fields: [],
};

// The token (non-loopback binds) arrives in the URL; the server also sets a cookie from it.
const TOKEN = new URLSearchParams(location.search).get("token");

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (TOKEN) headers["Authorization"] = "Bearer " + TOKEN;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  const type = resp.headers.get("content-type") || "";
  const data = type.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) {
    const err = new Error((data && data.errors) ? data.errors.join("\n") : String(data));
    err.errors = (data && data.errors) || [String(data)];
    throw err;
  }
  return data;
}

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) e.append(c);
  return e;
}
function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  return Number(v.toPrecision(digits)).toString();
}
function colorOf(name) {
  if (!(name in state.colors)) state.colors[name] = COLORS[Object.keys(state.colors).length % COLORS.length];
  return state.colors[name];
}

// ------------------------------------------------------------------ runs table
async function refreshRuns() {
  const data = await api("api/runs");
  $("#runs-dir").textContent = data.runs_dir;
  state.runs = data.runs;
  if (!state.userTouched) {
    // default: overlay the newest few runs and anything running
    data.runs.forEach((r, i) => { if (i < 4 || r.status === "running") state.plotted.add(r.name); });
  }
  const body = $("#runs tbody");
  body.replaceChildren();
  for (const r of data.runs) {
    const box = el("input", { type: "checkbox", "data-run": r.name });
    box.checked = state.plotted.has(r.name);
    box.addEventListener("click", (ev) => ev.stopPropagation());
    box.addEventListener("change", () => {
      state.userTouched = true;
      box.checked ? state.plotted.add(r.name) : state.plotted.delete(r.name);
      refreshMetrics();
    });
    const tr = el("tr", { "data-run": r.name, class: r.name === state.selected ? "selected" : "",
                          onclick: () => select(r.name) },
      el("td", {}, box),
      el("td", {}, el("span", { class: "swatch", style: `background:${colorOf(r.name)}` }), r.name),
      el("td", { text: r.recipe || "?" }),
      el("td", { text: r.config || "—" }),
      el("td", {}, el("span", { class: "status " + r.status, text: r.status })),
      el("td", { text: fmt(r.last_step) }),
      el("td", { text: fmt(r.loss) }),
      el("td", { text: fmt(r.tokens_per_s, 3) }),
      el("td", { text: r.checkpoints.length ? r.checkpoints.join(", ") : "—" }));
    body.append(tr);
  }
  $("#no-runs").hidden = data.runs.length > 0;
}

// ------------------------------------------------------------------ metrics + charts
async function refreshMetrics() {
  const names = [...state.plotted].filter((n) => state.runs.some((r) => r.name === n));
  await Promise.all(names.map(async (name) => {
    const m = state.metrics[name] || (state.metrics[name] = { offset: 0, rows: [] });
    for (let i = 0; i < 20; i++) {  // several chunks for a long file, bounded
      const data = await api(`api/runs/${encodeURIComponent(name)}/metrics?offset=${m.offset}`);
      if (data.reset) m.rows = [];
      m.rows.push(...data.rows);
      const more = data.offset !== m.offset && data.rows.length > 0 && data.offset - m.offset >= (4 << 20) - 65536;
      m.offset = data.offset;
      if (!more) break;
    }
  }));
  drawCharts(names);
}

function drawCharts(names) {
  const container = $("#charts");
  for (const spec of CHARTS) {
    const tables = [], series = [{ label: "step" }];
    for (const name of names) {
      const rows = (state.metrics[name] || { rows: [] }).rows;
      for (const [key, dashed] of spec.keys) {
        const pts = rows.filter((r) => typeof r.step === "number" && typeof r[key] === "number");
        if (!pts.length) continue;
        tables.push([pts.map((r) => r.step), pts.map((r) => r[key])]);
        series.push({
          label: names.length > 1 ? `${name}${dashed ? " " + key : ""}` : key,
          stroke: colorOf(name), width: 2, dash: dashed ? [6, 4] : undefined, spanGaps: true,
          points: { show: pts.length < 40, size: 5 },
        });
      }
    }
    let box = document.getElementById("chart-" + spec.id);
    if (!tables.length) {
      if (box) box.hidden = true;
      continue;
    }
    if (!box) {
      box = el("div", { class: "chart", id: "chart-" + spec.id }, el("h3", { text: spec.title }));
      container.append(box);
    }
    box.hidden = false;
    const data = uPlot.join(tables);
    const points = tables.reduce((n, t) => n + t[0].length, 0);
    box.dataset.points = String(points);
    box.dataset.series = String(tables.length);
    const signature = series.map((s) => s.label + s.stroke + (s.points && s.points.show)).join("|");
    const width = Math.max(300, box.clientWidth || 420);
    const existing = state.charts[spec.id];
    if (existing && existing.signature === signature) {
      existing.plot.setData(data);
      if (Math.abs(existing.plot.width - width) > 4) existing.plot.setSize({ width, height: 220 });
    } else {
      if (existing) existing.plot.destroy();
      const opts = {
        width, height: 220, series,
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { size: 60 }],
        legend: { live: true },
      };
      state.charts[spec.id] = { plot: new uPlot(opts, data, box), signature };
    }
  }
}

// ------------------------------------------------------------------ run details
async function select(name) {
  state.selected = name;
  document.querySelectorAll("#runs tbody tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.run === name));
  $("#detail-panel").hidden = false;
  $("#detail-name").textContent = name;
  $("#config-download").href = `api/runs/${encodeURIComponent(name)}/config?download=1` + (TOKEN ? `&token=${encodeURIComponent(TOKEN)}` : "");
  $("#config-download").setAttribute("download", name + ".yaml");
  await refreshDetail();
}

async function refreshDetail() {
  const name = state.selected;
  if (!name) return;
  const run = state.runs.find((r) => r.name === name);
  if (!run) return;
  const status = $("#detail-status");
  status.textContent = run.status;
  status.className = "status " + run.status;
  $("#stop").hidden = run.status !== "running";
  $("#detail-cmd").textContent = [run.recipe, run.config, ...(run.overrides || [])].filter(Boolean).join("  ");
  const enc = encodeURIComponent(name);
  const [log, cfg] = await Promise.all([
    api(`api/runs/${enc}/log`).catch((e) => ({ log: e.message })),
    api(`api/runs/${enc}/config`).catch((e) => e.message),
  ]);
  const pre = $("#log");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
  pre.textContent = log.log || "(no log: this run was not launched from the board)";
  if (atBottom) pre.scrollTop = pre.scrollHeight;
  $("#config-yaml").textContent = cfg;
}

$("#stop").addEventListener("click", async () => {
  const name = state.selected;
  $("#stop").disabled = true;
  try { await api(`api/runs/${encodeURIComponent(name)}/stop`, { method: "POST", body: "{}" }); }
  catch (e) { alert(e.message); }
  finally { $("#stop").disabled = false; }
  await tick();
});

// ------------------------------------------------------------------ launch form
async function loadRecipes() {
  state.recipes = await api("api/recipes");
  const sel = $("#recipe");
  sel.replaceChildren(...state.recipes.recipes.map((r) =>
    el("option", { value: r.name, text: r.builtin ? r.name : `${r.name} (runs folder)` })));
  const tiny = state.recipes.recipes.find((r) => r.configs.includes("tiny/lora"));
  if (tiny) sel.value = tiny.name;
  fillConfigs();
}

function fillConfigs() {
  const recipe = state.recipes.recipes.find((r) => r.name === $("#recipe").value);
  const names = [...(recipe ? recipe.configs : []), ...state.recipes.local_configs];
  $("#config").replaceChildren(...names.map((c) => el("option", { value: c, text: c })));
  if (names.includes("tiny/lora")) $("#config").value = "tiny/lora";
  loadForm();
}

async function loadForm() {
  const recipe = $("#recipe").value, config = $("#config").value;
  const form = $("#fields");
  form.replaceChildren();
  showErrors([]);
  if (!recipe || !config) return;
  let data;
  try { data = await api(`api/config?recipe=${encodeURIComponent(recipe)}&config=${encodeURIComponent(config)}`); }
  catch (e) { showErrors(e.errors); return; }
  state.fields = data.fields;
  for (const f of data.fields) {
    let input;
    if (f.kind === "bool" || f.kind === "choice") {
      const options = f.kind === "bool" ? ["true", "false"] : [...f.choices];
      if (f.nullable) options.push("null");
      input = el("select", {}, ...options.map((o) => el("option", { value: o, text: o })));
      input.value = f.value;
    } else {
      const numeric = (f.kind === "int" || f.kind === "float") && !f.nullable;
      input = el("input", { type: numeric ? "number" : "text", step: numeric ? "any" : undefined,
                            placeholder: f.nullable ? "null" : undefined, autocomplete: "off" });
      input.value = f.nullable && f.value === "null" ? "" : f.value;
    }
    input.dataset.key = f.key;
    input.dataset.initial = input.value;
    input.dataset.nullable = f.nullable ? "1" : "";
    input.title = `${f.key}: ${f.kind}${f.nullable ? " or null (empty)" : ""}`;
    if (f.readonly) { input.disabled = true; input.value = "(runs folder)/<name>"; }
    input.addEventListener("input", () => input.classList.toggle("changed", input.value !== input.dataset.initial));
    input.addEventListener("change", () => input.classList.toggle("changed", input.value !== input.dataset.initial));
    form.append(el("label", {}, `${f.key} `, input));
  }
}

// Overrides exactly as typed on a `tune run` command line: changed fields + the extra lines.
function overrides() {
  const out = [];
  document.querySelectorAll("#fields [data-key]").forEach((input) => {
    if (input.disabled || input.value === input.dataset.initial) return;
    const value = input.value === "" && input.dataset.nullable ? "null" : input.value;
    out.push(`${input.dataset.key}=${value}`);
  });
  for (const line of $("#extra").value.split("\n")) if (line.trim()) out.push(line.trim());
  return out;
}

function showErrors(errors) {
  $("#errors").replaceChildren(...(errors || []).map((e) => el("li", { text: e })));
}

$("#recipe").addEventListener("change", fillConfigs);
$("#config").addEventListener("change", loadForm);
$("#validate").addEventListener("click", async () => {
  const body = JSON.stringify({ recipe: $("#recipe").value, config: $("#config").value, overrides: overrides() });
  try {
    const data = await api("api/validate", { method: "POST", body });
    showErrors(data.errors);
    $("#launch-msg").textContent = data.errors.length ? "" : "config OK";
  } catch (e) { showErrors(e.errors); }
});
$("#launch").addEventListener("click", async () => {
  if (!$("#run-name").value.trim()) {  // a default name: config + time
    const t = new Date().toTimeString().slice(0, 8).replaceAll(":", "");
    $("#run-name").value = `${$("#config").value.replace(/[^A-Za-z0-9._-]+/g, "-")}-${t}`;
  }
  const name = $("#run-name").value.trim();
  const body = JSON.stringify({ name, recipe: $("#recipe").value, config: $("#config").value, overrides: overrides() });
  $("#launch").disabled = true;
  $("#launch-msg").textContent = "launching…";
  try {
    const run = await api("api/runs", { method: "POST", body });
    showErrors([]);
    $("#launch-msg").textContent = `launched ${run.name}`;
    state.plotted.add(run.name);
    await refreshRuns();
    await select(run.name);
    await refreshMetrics();
  } catch (e) {
    showErrors(e.errors);
    $("#launch-msg").textContent = "refused";
  } finally { $("#launch").disabled = false; }
});

// ------------------------------------------------------------------ polling
let busy = false;
async function tick() {
  if (busy) return;
  busy = true;
  try {
    await refreshRuns();
    await refreshMetrics();
    await refreshDetail();
    $("#conn").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("#conn").textContent = "connection problem: " + e.message;
  } finally { busy = false; }
}

loadRecipes().catch((e) => showErrors(e.errors || [e.message]));
tick();
setInterval(tick, POLL_MS);
