// InferLab scope: draws the engine's frames (see inferlab/scope/frames.py), live over SSE from
// /scope/events or replayed from a recorded trace at /scope/trace. The same render() serves both,
// so a replayed step looks exactly as it did live.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_POINTS = 600; // points kept on the time charts
  const MAX_LISTED = 100; // requests listed per queue
  const state = { header: null, frame: null, series: newSeries(), charts: {}, grid: null };
  // a replay of several traces shows the one named in ?trace=K (see /scope/beside)
  const TRACE = encodeURIComponent(new URLSearchParams(location.search).get("trace") ?? "0");

  // A request's colour comes from its id alone, so live and replay paint a block alike.
  function hue(id) {
    let h = 2166136261;
    for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 16777619);
    h = Math.imul(h ^ (h >>> 16), 0x85ebca6b); // ids that differ in one digit still get far-apart hues
    h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
    return ((h ^ (h >>> 16)) >>> 0) % 360;
  }
  const colour = (id) => `hsl(${hue(id)},65%,55%)`;
  const pct = (x) => `${(100 * x).toFixed(1)}%`;

  // ---- series: what the charts plot, accumulated frame by frame ---------------------------
  function newSeries() {
    return { t: [], tput: [], kv: [], hit: [], win: [], lastStep: -1,
             step: [], total: [], prefill: [], budget: [], stepLen: [] };
  }

  function ingest(s, f) {
    if (s.t.length && f.t < s.t[s.t.length - 1]) Object.assign(s, newSeries()); // a restarted server
    s.win.push([f.t, f.num_generation_tokens]);
    while (s.win.length > 2 && f.t - s.win[0][0] > 2) s.win.shift();
    const [t0, g0] = s.win[0];
    const kv = f.kv;
    s.t.push(f.t);
    s.tput.push(f.t > t0 ? (f.num_generation_tokens - g0) / (f.t - t0) : 0);
    s.kv.push(100 * kv.usage);
    s.hit.push(kv.prefix_queries ? (100 * kv.prefix_hits) / kv.prefix_queries : 0);
    for (const [step, , prefill, decode, budget] of f.steps) {
      if (step <= s.lastStep) continue;
      s.lastStep = step;
      s.step.push(step); s.total.push(prefill + decode); s.prefill.push(prefill); s.budget.push(budget);
    }
    s.stepLen.push(s.step.length);
  }

  function trim(s) {
    for (const k of ["t", "tput", "kv", "hit", "stepLen"]) if (s[k].length > MAX_POINTS) s[k].splice(0, s[k].length - MAX_POINTS);
    for (const k of ["step", "total", "prefill", "budget"]) if (s[k].length > MAX_POINTS) s[k].splice(0, s[k].length - MAX_POINTS);
  }

  // ---- charts ------------------------------------------------------------------------------
  function chartSize(el) { return { width: Math.max(200, el.clientWidth), height: 180 }; }
  const axis = { stroke: "#8a95a3", grid: { stroke: "#2a3038" }, ticks: { stroke: "#2a3038" } };

  function makeCharts() {
    const bars = uPlot.paths.bars;
    const b = $("chart-batch"), r = $("chart-rate"), l = $("chart-latency");
    state.charts.batch = new uPlot({
      // y fits the tokens, not the budget: a few decodes under a 2048-token budget would not show
      ...chartSize(b), scales: { x: { time: false }, y: { range: (u) => [0, Math.max(8, 1.15 * Math.max(0, ...u.data[1]))] } },
      axes: [{ ...axis, label: "step" }, axis],
      series: [{ label: "step" },
        { label: "decode", fill: "#4fb3d9", stroke: "#4fb3d9", paths: bars({ size: [1, 12] }), points: { show: false },
          value: (u, v, si, i) => (i == null || v == null ? "–" : v - u.data[2][i]) },
        { label: "prefill", fill: "#f0a347", stroke: "#f0a347", paths: bars({ size: [1, 12] }), points: { show: false } },
        { label: "budget", stroke: "#e05d5d", dash: [4, 4], points: { show: false } }],
    }, [[], [], [], []], b);
    state.charts.rate = new uPlot({
      ...chartSize(r), scales: { x: { time: false }, pct: { range: [0, 100] } },
      axes: [{ ...axis, label: "seconds" }, { ...axis, label: "tok/s" }, { ...axis, scale: "pct", side: 1, label: "%" }],
      series: [{ label: "t" },
        { label: "output tok/s", stroke: "#4fb3d9", width: 2, points: { show: false } },
        { label: "KV usage %", stroke: "#f0a347", scale: "pct", points: { show: false } },
        { label: "prefix hit %", stroke: "#7bd389", scale: "pct", points: { show: false } }],
    }, [[], [], [], []], r);
    const buckets = [...state.header.latency_buckets.map((s) => (s < 1 ? `${s * 1000}ms` : `${s}s`)), "+Inf"];
    state.charts.latency = new uPlot({
      ...chartSize(l), scales: { x: { time: false, range: [-0.5, buckets.length - 0.5] } },
      axes: [{ ...axis, values: (u, ticks) => ticks.map((t) => buckets[t] ?? ""), label: "≤ bucket" }, axis],
      series: [{ label: "bucket", value: (u, v) => (v == null ? "–" : buckets[v]) },
        { label: "TTFT", fill: "#f0a347", stroke: "#f0a347", paths: bars({ size: [0.4], align: -1 }), points: { show: false } },
        { label: "inter-token", fill: "#4fb3d9", stroke: "#4fb3d9", paths: bars({ size: [0.4], align: 1 }), points: { show: false } }],
    }, [buckets.map((_, i) => i), [], []], l);
    window.addEventListener("resize", () => {
      state.charts.batch.setSize(chartSize(b)); state.charts.rate.setSize(chartSize(r)); state.charts.latency.setSize(chartSize(l));
      if (state.frame) drawGrid(state.frame);
    });
  }

  function setCharts(s, upto) {
    // upto: how many entries of the series to show (replay shows the timeline up to its step)
    const n = upto ?? s.t.length, from = Math.max(0, n - MAX_POINTS);
    const m = upto == null ? s.step.length : s.stepLen[n - 1] ?? 0, sfrom = Math.max(0, m - MAX_POINTS);
    const cut = (a, lo, hi) => a.slice(lo, hi);
    state.charts.batch.setData([cut(s.step, sfrom, m), cut(s.total, sfrom, m), cut(s.prefill, sfrom, m), cut(s.budget, sfrom, m)]);
    state.charts.rate.setData([cut(s.t, from, n), cut(s.tput, from, n), cut(s.kv, from, n), cut(s.hit, from, n)]);
  }

  // ---- the block grid ----------------------------------------------------------------------
  function gridModel(f) {
    const kv = f.kv, n = kv.num_blocks;
    const states = new Int32Array(n), hashes = new Array(n), owners = Array.from({ length: n }, () => []);
    let i = 0;
    for (const [value, count] of kv.cells) { states.fill(value, i, i + count); i += count; }
    for (const [first, digits] of kv.hashes) {
      for (let k = 0; k < digits.length / 6; k++) hashes[first + k] = digits.slice(6 * k, 6 * k + 6);
    }
    for (const r of f.requests) for (const [first, count] of r.blocks) for (let b = first; b < first + count; b++) owners[b].push(r.id);
    return { n, states, hashes, owners };
  }

  function drawGrid(f) {
    const g = (state.grid = gridModel(f));
    const canvas = $("grid"), width = canvas.parentElement.clientWidth - 24;
    const cell = Math.max(3, Math.min(22, Math.floor(Math.sqrt((width * 360) / g.n))));
    const cols = Math.max(1, Math.floor(width / cell)), rows = Math.ceil(g.n / cols);
    Object.assign(g, { cell, cols });
    canvas.width = cols * cell; canvas.height = rows * cell;
    canvas.style.width = `${cols * cell}px`; canvas.style.height = `${rows * cell}px`;
    const ctx = canvas.getContext("2d"), gap = cell >= 6 ? 1 : 0, inner = cell - gap;
    ctx.fillStyle = "#0f1216"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    for (let i = 0; i < g.n; i++) {
      const x = (i % cols) * cell, y = Math.floor(i / cols) * cell, s = g.states[i];
      ctx.fillStyle = s > 0 ? (g.owners[i].length ? colour(g.owners[i][0]) : "#888") : "#232931";
      ctx.fillRect(x, y, inner, inner);
      if (s < 0 || s > 1) { // cached-but-free: a grey frame; shared: a white one
        ctx.strokeStyle = s < 0 ? "#4a5361" : "#ffffff";
        ctx.lineWidth = Math.max(1, Math.floor(cell / 6));
        const w = ctx.lineWidth / 2;
        ctx.strokeRect(x + w, y + w, inner - 2 * w, inner - 2 * w);
      }
    }
    $("pool-info").textContent = `${g.n} blocks × ${f.kv.block_size} tokens · ${f.kv.num_blocks - f.kv.free} used · `
      + `${f.kv.shared} shared · ${f.kv.cached_free} cached-free · ${f.kv.evictions} evictions`;
  }

  let pointer = null; // the last mouse position over the grid, so the tooltip follows new frames

  function onHover(ev) {
    pointer = ev;
    const g = state.grid, tip = $("tip");
    if (!g || !g.cols) return;
    const canvas = $("grid"), rect = canvas.getBoundingClientRect();
    const col = Math.floor((ev.clientX - rect.left) / g.cell), row = Math.floor((ev.clientY - rect.top) / g.cell);
    const i = row * g.cols + col;
    if (col < 0 || col >= g.cols || i < 0 || i >= g.n) { tip.hidden = true; return; }
    const s = g.states[i];
    const what = s > 0 ? `ref count ${s}${s > 1 ? " (shared prefix)" : ""}` : s < 0 ? "free, still cached" : "free";
    const lines = [`block ${i}: ${what}`];
    if (g.owners[i].length) lines.push(`owner${g.owners[i].length > 1 ? "s" : ""}: ${g.owners[i].join(", ")}`);
    if (g.hashes[i]) lines.push(`hash ${g.hashes[i]}…`);
    tip.textContent = lines.join("\n");
    const box = canvas.parentElement.getBoundingClientRect();
    tip.style.left = `${ev.clientX - box.left + 12}px`; tip.style.top = `${ev.clientY - box.top + 12}px`;
    tip.hidden = false;
  }

  // ---- queues and tiles --------------------------------------------------------------------
  function requestItem(r) {
    const li = document.createElement("li");
    const total = r.prompt + r.max_tokens;
    li.title = `${r.id}\npriority ${r.priority}\ncomputed ${r.computed} of ${r.prompt} prompt tokens\n`
      + `output ${r.output} of ${r.max_tokens}\npreempted ${r.preemptions}×`;
    li.innerHTML = `<span class="dot"></span><span class="id"></span><span></span>`
      + `<span class="bar"><i class="p"></i><i class="d"></i></span><span class="prio"></span>`;
    const [dot, id, nums, bar, prio] = li.children;
    dot.style.background = colour(r.id);
    id.textContent = r.id;
    nums.textContent = `${Math.min(r.computed, r.prompt)}/${r.prompt} +${r.output}`;
    bar.children[0].style.width = pct(Math.min(r.computed, r.prompt) / total);
    bar.children[1].style.width = pct(r.output / total);
    prio.textContent = `p${r.priority}`;
    return li;
  }

  function drawQueues(f) {
    for (const name of ["running", "waiting", "preempted"]) {
      const reqs = f.requests.filter((r) => r.state === name), ol = $(`q-${name}`);
      const items = reqs.slice(0, MAX_LISTED).map(requestItem);
      if (reqs.length > MAX_LISTED) {
        const more = document.createElement("li");
        more.className = "more"; more.textContent = `… ${reqs.length - MAX_LISTED} more`;
        items.push(more);
      }
      ol.replaceChildren(...items);
      $(`n-${name}`).textContent = reqs.length;
    }
  }

  function drawTiles(f, tput) {
    $("t-tput").textContent = tput.toFixed(1);
    $("t-kv").textContent = pct(f.kv.usage);
    $("t-hit").textContent = f.kv.prefix_queries ? pct(f.kv.prefix_hits / f.kv.prefix_queries) : "–";
    $("t-preempt").textContent = f.num_preemptions;
    $("t-running").textContent = f.num_running;
    $("t-waiting").textContent = f.num_waiting;
    const sd = f.spec_decode;  // speculative decoding: acceptance since start, and the last step's drafts
    $("tile-spec").hidden = !sd;
    if (sd) {
      $("t-spec").textContent = sd.acceptance_rate === null ? "–" : pct(sd.acceptance_rate);
      const last = sd.last_step.drafts ? `, last step ${sd.last_step.accepted}/${sd.last_step.draft_tokens}` : "";
      $("t-spec-label").textContent = `draft tokens accepted (${sd.method}, k=${sd.k}`
        + `${sd.mean_accepted_length === null ? "" : `, ${sd.mean_accepted_length.toFixed(2)} tokens a draft`}${last})`;
    }
    $("step").textContent = `step ${f.step} · t ${f.t.toFixed(1)} s`;
  }

  function render(f, s, upto) {
    state.frame = f;
    drawGrid(f);
    if (pointer && !$("tip").hidden) onHover(pointer);
    drawQueues(f);
    const n = upto ?? s.t.length;
    drawTiles(f, s.tput[n - 1] ?? 0);
    const b = f.batch;
    $("batch-info").textContent = `last step: ${b.prefill} prefill + ${b.decode} decode of ${b.budget} budget `
      + `(${(100 * (b.prefill + b.decode) / b.budget).toFixed(0)}%), ${b.seqs} seqs${b.preempted ? `, ${b.preempted} preempted` : ""}`;
    setCharts(s, upto);
    state.charts.latency.setData([state.charts.latency.data[0], f.latency.ttft, f.latency.itl]);
  }

  // ---- live: frames over SSE; EventSource reconnects by itself and the first frame resumes --
  function live() {
    let fresh = true;
    const conn = $("conn"), src = new EventSource("/scope/events");
    src.onopen = () => { fresh = true; conn.textContent = "connected"; conn.className = "badge ok"; };
    src.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "badge bad"; };
    src.onmessage = (ev) => {
      const f = JSON.parse(ev.data), s = state.series;
      if (fresh) { Object.assign(s, { lastStep: -1, step: [], total: [], prefill: [], budget: [], stepLen: [] }); fresh = false; }
      ingest(s, f);
      trim(s);
      render(f, s);
    };
    $("lab-form").addEventListener("submit", submitBurst);
    $("lab-cancel").addEventListener("click", cancelBursts);
  }

  // The lab is guarded by the server's API key when it has one (`serve --api-key`): asked once,
  // kept for this tab.
  async function labFetch(method, body) {
    for (;;) {
      const key = sessionStorage.getItem("inferlab-api-key");
      const headers = { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
      const resp = await fetch("/scope/lab", { method, headers, body: body && JSON.stringify(body) });
      if (resp.status !== 401) return resp;
      const entered = prompt("This server needs its API key for the lab:");
      if (!entered) return resp;
      sessionStorage.setItem("inferlab-api-key", entered);
    }
  }

  function showLab(resp, data, text) {
    const out = $("lab-result");
    out.className = resp.ok ? "muted" : "error";
    out.textContent = resp.ok ? text : `refused: ${data.error?.message ?? resp.statusText}`;
  }

  async function submitBurst(ev) {
    ev.preventDefault();
    const form = ev.target;
    const body = { shared_prefix: form.shared_prefix.checked };
    for (const k of ["count", "prompt_len", "output_len", "priority"]) body[k] = Number(form[k].value);
    const resp = await labFetch("POST", body);
    const data = await resp.json();
    showLab(resp, data, resp.ok && `submitted ${data.request_ids.length} requests (${data.request_ids[0]} …)`);
  }

  async function cancelBursts() {
    const resp = await labFetch("DELETE");
    const data = await resp.json();
    showLab(resp, data, resp.ok && `cancelled ${data.cancelled} lab requests`);
  }

  // ---- replay: the whole trace is loaded, then stepped through locally ----------------------
  async function replay() {
    document.body.classList.add("replay");
    $("replay").hidden = false;
    $("conn").textContent = state.header.file ?? "trace";
    const text = await (await fetch(`/scope/trace?trace=${TRACE}`)).text();
    const frames = text.split("\n").filter((l) => l).map((l) => JSON.parse(l));
    const s = newSeries();
    for (const f of frames) ingest(s, f);
    const slider = $("r-slider"), play = $("r-play");
    slider.max = Math.max(0, frames.length - 1);
    let i = 0, timer = null;
    const seek = (k) => {
      if (!frames.length) return;
      i = Math.max(0, Math.min(frames.length - 1, k));
      slider.value = i;
      $("r-label").textContent = `frame ${i + 1} / ${frames.length}`;
      render(frames[i], s, i + 1);
    };
    const pause = () => { clearTimeout(timer); timer = null; play.textContent = "▶ play"; };
    const tick = () => {
      if (i >= frames.length - 1) return pause();
      const dt = (frames[i + 1].t - frames[i].t) / Number($("r-speed").value);
      timer = setTimeout(() => { seek(i + 1); tick(); }, Math.min(1000, Math.max(16, dt * 1000)));
    };
    play.onclick = () => {
      if (timer) return pause();
      if (i >= frames.length - 1) seek(0);
      play.textContent = "❚❚ pause"; tick();
    };
    $("r-back").onclick = () => { pause(); seek(i - 1); };
    $("r-next").onclick = () => { pause(); seek(i + 1); };
    slider.oninput = () => { pause(); seek(Number(slider.value)); };
    window.scope.frames = frames;
    window.scope.seekStep = (step) => { pause(); seek(frames.findIndex((f) => f.step === step)); return state.frame?.step; };
    seek(0);
  }

  // ---- start -------------------------------------------------------------------------------
  async function main() {
    state.header = await (await fetch(`/scope/info?trace=${TRACE}`)).json();
    const c = state.header.config;
    $("mode").textContent = state.header.engine ? `${state.header.mode} · ${state.header.engine}` : state.header.mode;
    $("config").textContent = `${c.scheduling_policy} · ${state.header.num_blocks} blocks × ${state.header.block_size} · `
      + `budget ${c.max_num_batched_tokens} tokens · max ${c.max_num_seqs} seqs${c.enable_prefix_caching ? "" : " · no prefix cache"}`;
    makeCharts();
    $("grid").addEventListener("mousemove", onHover);
    $("grid").addEventListener("mouseleave", () => { $("tip").hidden = true; pointer = null; });
    if (state.header.mode === "replay") await replay();
    else live();
    window.scope.ready = true;
  }

  // For tests and the curious: the state, the charts and the grid as an image.
  window.scope = { state, gridImage: () => $("grid").toDataURL(), ready: false };
  main();
})();
