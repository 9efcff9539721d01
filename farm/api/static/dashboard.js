// The job dashboard: polls the farm's JSON API (/v1/...) and renders jobs, workers and
// models. Everything a user or a worker wrote (prompts, tags, errors, names) goes into the
// page as text nodes (textContent / append of strings), never as HTML.
"use strict";
(() => {
  const POLL_MS = 2000;
  const PAGE = 25; // jobs per page
  const SLOW_EVERY = 5; // models: every 5th poll
  const THUMBS = 12; // latest images shown for the selected job
  const FAILURES = 10; // last failures shown for the selected job
  const STATES = ["queued", "running", "paused", "done", "failed", "cancelled"];
  const ENDED = new Set(["done", "failed", "cancelled"]);

  const $ = (id) => document.getElementById(id);
  const view = { state: "", offset: 0, selected: null, polls: 0, busy: false, again: false };
  const specs = new Map(); // job id -> its spec (a spec never changes after submit)
  const rows = new Map(); // job id -> row of the jobs table
  const thumbs = new Map(); // image key -> figure of the selected job
  let timer = null;

  // --- helpers ---------------------------------------------------------------------

  /** An element with properties set (text via textContent) and children appended as
   * nodes or text. */
  function el(tag, props, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = String(v);
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else node[k] = v;
    }
    for (const kid of kids) {
      if (kid !== null && kid !== undefined) node.append(kid);
    }
    return node;
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** The API's own words for a refusal: its ``detail`` string, or "field: msg" items. */
  function describe(body, fallback) {
    const d = body && body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) {
      return d.map((p) => (p && p.field ? `${p.field}: ${p.msg}` : String(p && p.msg))).join("; ");
    }
    return fallback;
  }

  async function api(method, path, body) {
    const init = { method, headers: { Accept: "application/json" }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (exc) {
      throw new ApiError(0, `the API is unreachable (${exc.message})`);
    }
    let data = null;
    try {
      data = await resp.json();
    } catch (_exc) {
      data = null;
    }
    if (!resp.ok) {
      throw new ApiError(resp.status, describe(data, `HTTP ${resp.status} ${resp.statusText}`));
    }
    return data;
  }

  const jobPath = (id, suffix = "") => `/v1/jobs/${encodeURIComponent(id)}${suffix}`;

  function fmtRate(x) {
    if (!x) return "0";
    if (x >= 100) return x.toFixed(0);
    if (x >= 10) return x.toFixed(1);
    return x.toFixed(2);
  }

  function fmtDuration(s) {
    s = Math.round(s);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${String(Math.floor(s / 60) % 60).padStart(2, "0")} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor(s / 3600) % 24} h`;
  }

  function fmtEta(job) {
    if (ENDED.has(job.state)) return "–";
    if (job.eta_s === null || job.eta_s === undefined) return "?";
    return fmtDuration(job.eta_s);
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function fmtTime(t) {
    return typeof t === "number" ? new Date(t * 1000).toLocaleString() : "–";
  }

  function fmtAgo(t) {
    if (typeof t !== "number") return "–";
    return `${fmtDuration(Math.max(0, Date.now() / 1000 - t))} ago`;
  }

  const list = (xs) => (Array.isArray(xs) && xs.length ? xs.map(String).join(", ") : "–");

  function modelsOf(job) {
    const spec = specs.get(job.id);
    const swept = spec && spec.sweep && Array.isArray(spec.sweep.model) ? spec.sweep.model : null;
    return swept && swept.length ? [...new Set(swept.map(String))] : [job.model];
  }

  function setStatus(text, bad) {
    $("status").textContent = text;
    $("status").classList.toggle("bad", Boolean(bad));
  }

  function notify(text, bad) {
    $("notice-text").textContent = text;
    $("notice").classList.toggle("bad", Boolean(bad));
    $("notice").hidden = false;
  }

  /** Move ``nodes`` into ``parent`` in this order, touching the DOM only if it differs (a
   * node moved loses focus, e.g. a priority being typed). */
  function placeInOrder(parent, nodes) {
    const now = [...parent.children];
    if (now.length === nodes.length && now.every((n, i) => n === nodes[i])) return;
    for (const n of now) if (!nodes.includes(n)) n.remove();
    nodes.forEach((n, i) => {
      if (parent.children[i] !== n) parent.insertBefore(n, parent.children[i] || null);
    });
  }

  // --- totals ----------------------------------------------------------------------

  function buildCards() {
    const box = $("state-cards");
    for (const s of STATES) {
      const card = el(
        "button",
        { type: "button", class: "card", "data-state": s, title: `show ${s} jobs` },
        el("div", { class: "num", id: `count-${s}`, text: "–" }),
        el("div", { class: "lbl", text: s }),
      );
      card.addEventListener("click", () => setFilter(view.state === s ? "" : s));
      box.append(card);
      $("state-filter").append(el("option", { value: s, text: s }));
    }
  }

  /** The cards: jobs per state and images/s from /v1/stats (exact, one ledger read
   * whatever the number of jobs), live and busy workers from the workers listed. */
  function renderTotals(stats, workers) {
    for (const s of STATES) {
      const n = stats.jobs[s];
      $(`count-${s}`).textContent = typeof n === "number" ? String(n) : "–";
    }
    $("rate").textContent = fmtRate(stats.images_per_s);
    $("live").textContent = String(workers.length);
    $("busy").textContent = String(workers.filter((w) => w.current_task).length);
    for (const card of document.querySelectorAll("#state-cards .card")) {
      card.classList.toggle("on", card.dataset.state === view.state);
    }
  }

  // --- jobs table ------------------------------------------------------------------

  function newRow(id) {
    const tr = el("tr", { "data-job": id });
    const cell = (cls) => tr.appendChild(el("td", { class: cls }));
    const row = {
      tr,
      id: cell("id"),
      state: cell("state-cell"),
      priority: cell("priority n"),
      models: cell("models"),
      progress: cell("prog"),
      rate: cell("rate n"),
      eta: cell("eta n"),
      errors: cell("errors n"),
      controls: cell("ctl"),
      buttons: {},
    };
    const button = (action, label) => {
      const b = el("button", { type: "button", "data-action": action, text: label });
      row.buttons[action] = b;
      row.controls.append(b);
    };
    button("pause", "pause");
    button("resume", "resume");
    button("cancel", "cancel");
    button("retry", "retry");
    row.input = el("input", {
      type: "number",
      min: 0,
      max: 100,
      step: 1,
      "data-role": "priority",
      title: "priority 0 (lowest) to 100 (highest)",
    });
    row.input.setAttribute("aria-label", `priority of job ${id}`);
    row.controls.append(row.input);
    button("priority", "set");
    return row;
  }

  function updateRow(row, job) {
    row.tr.classList.toggle("sel", view.selected === job.id);
    const tags = (job.tags || []).map((t) => el("span", { class: "tag", text: t }));
    row.id.replaceChildren(
      el("button", { type: "button", class: "jobid mono", "data-open": job.id, text: job.id }),
      tags.length ? el("div", {}, ...tags) : null,
    );
    row.state.replaceChildren(el("span", { class: `state ${job.state}`, text: job.state }));
    row.priority.textContent = String(job.priority);
    row.models.textContent = modelsOf(job).join(", ");
    const total = Math.max(job.total, 1);
    const done = el("div", { class: "d" });
    const failed = el("div", { class: "f" });
    done.style.width = `${(100 * job.done) / total}%`;
    failed.style.width = `${(100 * job.failed) / total}%`;
    row.progress.replaceChildren(
      el("div", { class: "pbar", title: `${job.tasks_finished} of ${job.tasks} tasks finished` }, done, failed),
      el("div", { class: "ptext", text: `${job.done} done · ${job.failed} failed / ${job.total}` }),
    );
    row.rate.textContent = fmtRate(job.images_per_s);
    row.eta.textContent = fmtEta(job);
    row.errors.textContent = String(job.errors);
    const b = row.buttons;
    b.pause.disabled = !(job.state === "queued" || job.state === "running");
    b.resume.disabled = job.state !== "paused";
    b.cancel.disabled = ENDED.has(job.state);
    b.retry.disabled = !(job.failed > 0 && job.state !== "cancelled");
    if (document.activeElement !== row.input) row.input.value = String(job.priority);
  }

  function renderJobs(jobs) {
    const tbody = $("jobs").tBodies[0];
    const order = [];
    const seen = new Set();
    for (const job of jobs) {
      let row = rows.get(job.id);
      if (!row) {
        row = newRow(job.id);
        rows.set(job.id, row);
      }
      updateRow(row, job);
      order.push(row.tr);
      seen.add(job.id);
    }
    for (const id of [...rows.keys()]) if (!seen.has(id)) rows.delete(id);
    placeInOrder(tbody, order);
    $("jobs-empty").hidden = jobs.length > 0;
    const first = jobs.length ? view.offset + 1 : view.offset;
    $("page").textContent = `${first}–${view.offset + jobs.length}`;
    $("prev").disabled = view.offset === 0;
    $("next").disabled = jobs.length < PAGE;
  }

  /** Fetch the specs of listed jobs not seen yet (once each: they never change). */
  async function loadSpecs(jobs) {
    const missing = jobs.filter((j) => !specs.has(j.id));
    await Promise.all(
      missing.map(async (j) => {
        try {
          specs.set(j.id, (await api("GET", jobPath(j.id))).spec);
        } catch (_exc) {
          // shown without its sweep's models; tried again at the next poll
        }
      }),
    );
  }

  async function control(id, action, button, body) {
    button.disabled = true;
    try {
      await api("POST", jobPath(id, `/${action}`), body);
      notify(`${action} ${id}: done`, false);
    } catch (exc) {
      const code = exc.status ? ` (HTTP ${exc.status})` : "";
      notify(`${action} ${id} refused${code}: ${exc.message}`, true);
    } finally {
      button.disabled = false; // the refresh sets what the job's new state allows
    }
    refresh(true);
  }

  function onJobsClick(event) {
    const open = event.target.closest("[data-open]");
    if (open) {
      select(open.dataset.open);
      return;
    }
    const button = event.target.closest("button[data-action]");
    const tr = event.target.closest("tr[data-job]");
    if (!button || !tr) return;
    const id = tr.dataset.job;
    const action = button.dataset.action;
    if (action === "priority") {
      const raw = tr.querySelector("input[data-role=priority]").value.trim();
      // sent as typed (a number when it is one): the API says what is allowed
      const value = raw !== "" && Number.isFinite(Number(raw)) ? Number(raw) : raw;
      control(id, action, button, { priority: value });
    } else {
      control(id, action, button);
    }
  }

  // --- job detail ------------------------------------------------------------------

  function dlItem(dl, term, ...value) {
    dl.append(el("dt", { text: term }), el("dd", {}, ...value));
  }

  function renderSpec(job) {
    const s = job.spec;
    const dl = $("detail-spec");
    dl.replaceChildren();
    const prompts = Array.isArray(s.prompt) ? s.prompt : [s.prompt];
    const shown = prompts.slice(0, 20).map((p) => el("li", { class: "prompt", text: p }));
    const more = prompts.length > 20 ? el("li", { class: "muted", text: `… ${prompts.length - 20} more` }) : null;
    dlItem(dl, "state", el("span", { class: `state ${job.state}`, text: job.state }));
    dlItem(dl, "progress", `${job.done} done · ${job.failed} failed / ${job.total} images; ${job.tasks_finished} of ${job.tasks} tasks finished`);
    dlItem(dl, "models", modelsOf(job).join(", "));
    dlItem(dl, prompts.length === 1 ? "prompt" : `prompts (${prompts.length})`, el("ol", {}, ...shown, more));
    if (s.negative_prompt) dlItem(dl, "negative prompt", s.negative_prompt);
    dlItem(dl, "images per prompt", String(s.count));
    dlItem(dl, "size", `${s.width} × ${s.height}`);
    dlItem(dl, "sampler", `${s.sampler_name} (${s.scheduler}), ${s.steps} steps, cfg ${s.cfg_scale}`);
    dlItem(dl, "seed", String(job.seed));
    const sweep = Object.entries(s.sweep || {});
    if (sweep.length) {
      dlItem(dl, "sweep", ...sweep.map(([k, vs]) => el("div", { text: `${k}: ${list(vs)}` })));
    }
    dlItem(dl, "priority", String(job.priority));
    dlItem(dl, "batch size", job.batch_size === null ? "–" : String(job.batch_size));
    if (s.output_prefix) dlItem(dl, "output prefix", s.output_prefix);
    if ((s.tags || []).length) dlItem(dl, "tags", ...s.tags.map((t) => el("span", { class: "tag", text: t })));
    dlItem(dl, "images/s, ETA", `${fmtRate(job.images_per_s)}, ${fmtEta(job)}`);
    dlItem(dl, "submitted", fmtTime(job.created_at));
    dlItem(dl, "started", fmtTime(job.started_at));
    dlItem(dl, "finished", fmtTime(job.finished_at));
  }

  function renderFailures(page) {
    const tbody = $("detail-errors").tBodies[0];
    tbody.replaceChildren(
      ...page.errors.map((e) =>
        el(
          "tr",
          {},
          el("td", { text: fmtTime(e.at) }),
          el("td", { text: e.stage }),
          el("td", { class: "n", text: e.task === null ? "(load)" : String(e.task) }),
          el("td", { text: list(e.images) + (e.images_failed ? " (failed)" : " (sent again)") }),
          el("td", { class: "mono", text: e.worker }),
          el("td", { text: e.model }),
          el("td", { class: "err", text: e.error }),
        ),
      ),
    );
    $("detail-errors-total").textContent = page.total ? `(${page.errors.length} of ${page.total})` : "";
    $("detail-errors").hidden = page.errors.length === 0;
    $("detail-errors-none").hidden = page.errors.length > 0;
  }

  /** A thumbnail: the image where a browser can GET its URL (http/https, e.g. presigned on
   * S3); otherwise (a file:// store, or a failed load) the object key as text. */
  function thumb(img) {
    const fig = el("figure", { class: "thumb", "data-key": img.key, title: img.prompt });
    const keyBox = () =>
      el("div", { class: "nokey mono", text: img.key, title: `${img.key}\n(not loadable from this page: ${img.url.split(":")[0]} URL)` });
    if (/^https?:\/\//i.test(img.url)) {
      const pic = el("img", { src: img.url, alt: img.key, loading: "lazy", referrerPolicy: "no-referrer" });
      pic.addEventListener("error", () => pic.replaceWith(keyBox()), { once: true });
      fig.append(pic);
    } else {
      fig.append(keyBox());
    }
    fig.append(el("figcaption", { text: `#${img.index} · seed ${img.seed}` }), el("figcaption", { class: "prompt", text: img.prompt }));
    return fig;
  }

  function renderThumbs(page) {
    const images = [...page.images].reverse(); // newest first
    const figs = images.map((img) => {
      let fig = thumbs.get(img.key);
      if (!fig) {
        fig = thumb(img);
        thumbs.set(img.key, fig);
      }
      return fig;
    });
    const keep = new Set(images.map((i) => i.key));
    for (const k of [...thumbs.keys()]) if (!keep.has(k)) thumbs.delete(k);
    placeInOrder($("thumbs"), figs);
    $("thumbs-none").hidden = images.length > 0;
  }

  async function refreshDetail() {
    const id = view.selected;
    if (!id) return;
    try {
      const job = await api("GET", jobPath(id));
      specs.set(id, job.spec);
      const offset = Math.max(0, job.done - THUMBS);
      const [errors, images] = await Promise.all([
        api("GET", jobPath(id, `/errors?limit=${FAILURES}`)),
        api("GET", jobPath(id, `/images?offset=${offset}&limit=${THUMBS}`)),
      ]);
      if (view.selected !== id) return;
      renderSpec(job);
      renderFailures(errors);
      renderThumbs(images);
    } catch (exc) {
      if (view.selected === id) notify(`job ${id}: ${exc.message}`, true);
    }
  }

  function select(id) {
    view.selected = id;
    thumbs.clear();
    $("thumbs").replaceChildren();
    $("detail-spec").replaceChildren();
    $("detail-errors").tBodies[0].replaceChildren();
    $("detail-id").textContent = id || "";
    $("detail").hidden = !id;
    for (const [rid, row] of rows) row.tr.classList.toggle("sel", rid === id);
    if (id) refreshDetail();
  }

  // --- workers and models ----------------------------------------------------------

  function renderWorkers(workers) {
    const sorted = [...workers].sort((a, b) => String(a.name).localeCompare(String(b.name)));
    const tbody = $("workers").tBodies[0];
    tbody.replaceChildren(
      ...sorted.map((w) => {
        const vram = el("td", { class: "vram" });
        if (typeof w.vram_total === "number" && w.vram_total > 0) {
          const used = w.vram_total - (typeof w.vram_free === "number" ? w.vram_free : 0);
          const bar = el("div", { class: "d" });
          bar.style.width = `${(100 * used) / w.vram_total}%`;
          vram.append(el("div", { class: "pbar" }, bar), el("div", { class: "ptext", text: `${fmtBytes(used)} / ${fmtBytes(w.vram_total)}` }));
        } else {
          vram.textContent = "–";
        }
        const m = w.models || {};
        const resident = el(
          "td",
          { class: "models-res" },
          el("div", { text: `VRAM: ${list(m.vram)}` }),
          el("div", { text: `RAM: ${list(m.ram)}` }),
          el("div", { text: `disk: ${list(m.disk)}` }),
        );
        const about = [w.instance && `instance ${w.instance}`, w.pid && `pid ${w.pid}`,
          typeof w.loads === "number" && `${w.loads} model loads`].filter(Boolean).join(" · ");
        return el(
          "tr",
          { "data-worker": w.name },
          el("td", { class: "mono name", text: w.name, title: about }),
          el("td", { text: w.node ?? "–" }),
          el("td", { text: w.device ?? "–" }),
          vram,
          resident,
          el("td", { class: "loaded", text: w.model ?? "–" }),
          el("td", { class: "assigned", text: w.assigned ?? "–" }),
          el("td", { class: "task mono", text: w.current_task || "idle" }),
          el("td", { class: "n", text: w.tasks ?? "–" }),
          el("td", { class: "n", text: w.images ?? "–" }),
          el("td", { text: fmtAgo(w.last_seen) }),
        );
      }),
    );
    $("workers-empty").hidden = workers.length > 0;
  }

  function renderModels(models) {
    $("models").tBodies[0].replaceChildren(
      ...models.map((m) =>
        el(
          "tr",
          { "data-model": m.name },
          el("td", { text: m.name }),
          el("td", { text: m.engine }),
          el("td", { class: "n", text: m.size ? fmtBytes(m.size) : "–" }),
          el("td", { class: "mono", text: m.sha256 ? m.sha256.slice(0, 12) : "–", title: m.sha256 }),
          el("td", { text: m.added_at ? fmtTime(m.added_at) : "built in" }),
        ),
      ),
    );
  }

  // --- polling ---------------------------------------------------------------------

  async function refresh(full) {
    if (view.busy) {
      view.again = true;
      return;
    }
    view.busy = true;
    document.body.dataset.busy = "1";
    const want = { state: view.state, offset: view.offset };
    const slow = full || view.polls % SLOW_EVERY === 0;
    try {
      const q = new URLSearchParams({ limit: PAGE, offset: want.offset });
      if (want.state) q.set("state", want.state);
      // jobs are listed for the table only (its page, in its state filter)
      const [jobs, stats, workers, models] = await Promise.all([
        api("GET", `/v1/jobs?${q}`),
        api("GET", "/v1/stats"),
        api("GET", "/v1/workers"),
        slow ? api("GET", "/v1/models") : null,
      ]);
      await loadSpecs(jobs);
      if (want.state === view.state && want.offset === view.offset) renderJobs(jobs);
      renderTotals(stats, workers);
      renderWorkers(workers);
      if (models) renderModels(models);
      await refreshDetail();
      setStatus(`updated ${new Date().toLocaleTimeString()}`, false);
    } catch (exc) {
      setStatus(`refresh failed: ${exc.message}`, true);
    } finally {
      view.polls += 1;
      view.busy = false;
      document.body.dataset.polls = String(view.polls);
      document.body.dataset.busy = "";
      if (view.again) {
        view.again = false;
        refresh(full);
      }
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      if ($("auto").checked) await refresh(false);
      schedule();
    }, POLL_MS);
  }

  function setFilter(state) {
    view.state = state;
    view.offset = 0;
    $("state-filter").value = state;
    refresh(false);
  }

  function start() {
    buildCards();
    $("state-filter").addEventListener("change", (e) => setFilter(e.target.value));
    $("prev").addEventListener("click", () => {
      view.offset = Math.max(0, view.offset - PAGE);
      refresh(false);
    });
    $("next").addEventListener("click", () => {
      view.offset += PAGE;
      refresh(false);
    });
    $("jobs").tBodies[0].addEventListener("click", onJobsClick);
    $("jobs").tBodies[0].addEventListener("keydown", (e) => {
      if (e.key === "Enter" && e.target.matches("input[data-role=priority]")) {
        e.target.closest("tr").querySelector("button[data-action=priority]").click();
      }
    });
    $("detail-close").addEventListener("click", () => select(null));
    $("notice-close").addEventListener("click", () => {
      $("notice").hidden = true;
    });
    $("auto").addEventListener("change", (e) => {
      if (e.target.checked) refresh(false);
    });
    refresh(true);
    schedule();
  }

  start();
})();
