/*
 * Operator console for the segment sync HTTP API (docs/http-api.md). Plain ES module, no framework, no build.
 * Served at /api/console/ under a strict Content-Security-Policy: no inline script or style, no eval, nothing
 * but this origin. Every value from the API reaches the page through textContent / createTextNode /
 * setAttribute on harmless attributes; never through HTML parsing.
 *
 * Test hooks (stable ids and data attributes):
 *   Layout      #skip-link (href="#main"), #main (the page; focused on navigation), #page-title (each page's h1),
 *               #message (role=status, aria-live=polite: status and error messages)
 *   Key         #key-panel, #key-form, #key-input (type=password), #key-save, #key-error (the 401 message),
 *               #key-state (shown while a key is kept), #forget-key, #no-key ("Continue without a key": Entra ID)
 *               Without a key (or #no-key) the page calls no API and shows "A function key is needed".
 *   #/exports   #exports-table; rows tr[data-export="<name>"]; in each row a[data-link="runs"] and
 *               button[data-action="dry-run"], button[data-action="run"], button[data-action="resync"]
 *               #confirm-dialog (<dialog> of a full resync), #confirm-text, #confirm-cost, #confirm-ok,
 *               #confirm-cancel, #confirm-preview (a dry run with force: the exact cost)
 *   #/exports/<name>[?before=<run id>]
 *               #runs-chart (the svg; rect.bar-joiners / .bar-changed / .bar-leavers with data-run,
 *               circle.duration-point with data-run), #runs-legend, #runs-table; rows tr[data-run="<id>"],
 *               #newer, #older, #page-info
 *   #/runs/<id> #run-status, #run-summary, #run-error, #run-progress (<progress>: value = batches settled,
 *               max = batches planned), #run-progress-text (aria-live=polite), #run-rate, #run-counts,
 *               #cancel-run, #replay-run (present, hidden when not applicable), #plan-preview, #plan-samples,
 *               #rejected-table, #download-rejected (a[download] with a blob: URL), #refused-table, #run-reports,
 *               #dead-batches, #dead-table (rows tr[data-batch="<n>"])
 *   Roles       #role-state (the header: "function key: Admin", "signed in: Reader"); buttons and links a role
 *               may not use are left out: run/dry-run/resync/cancel/replay/test need Operator, edit/add Admin
 *   #/connections  #connections-table; rows tr[data-connection="<name>"] with button[data-action="test"],
 *               [data-field="test-result"] (data-outcome: accepted, refused, throttled, unreachable, no-key),
 *               a[data-action="edit"]; #add-connection, #key-help
 *   #/exports/new, #/exports/<name>/edit
 *               #export-form: every control has data-field="<its path in the definition>" (name,
 *               source.container, destination.list, fields.Email, customFields[0].column, ...) and its message
 *               in [data-error-for="<path>"]; #find-segments, #source-status, #add-custom-field, #save-export,
 *               .form-problems (messages about other items); #add-export, a[data-action="edit"] on the exports page
 *   #/connections/new, #/connections/<name>/edit   #connection-form, #save-connection (same data-field rule)
 */

import {
  $, ADMIN, api, ApiError, append, canCallApi, clearMessage, current, currentGeneration, el, enc, fill, fmtDuration,
  fmtNumber, fmtRate, forgetRoles, initKeyPanel, labelFormat, link, load, loadRoles, may, nextGeneration,
  onUnauthorized, OPERATOR, pageHeading, parseTime, rolesState, runIdTime, setMessage, showError, showKeyState,
  statusBadge, statusSlug, svgEl, timeEl, truncate, yesNo,
} from "./common.js";
import { renderConnectionForm, renderConnections } from "./connections.js";
import { renderExportForm } from "./export-form.js";

const ACTIVE = new Set(["queued", "planning", "running"]); // cancellable
const POLLED = new Set(["queued", "planning", "running", "cancelling"]);
const POLL_MS = 2000;
const PAGE_SIZE = 20;

const exportHash = (name, before) => `#/exports/${enc(name)}${before ? `?before=${enc(before)}` : ""}`;
const runHash = (id) => `#/runs/${enc(id)}`;

/** When a run started (timings.started, else created, else its id) and how long it ran / has been running. */
function runStart(run) {
  const t = run.timings || {};
  return t.started || t.created || runIdTime(run.runId);
}

function runDurationMs(run, now = Date.now()) {
  const t = run.timings || {};
  const start = parseTime(runStart(run));
  if (start === null) return null;
  const end = parseTime(t.finished);
  if (end !== null) return Math.max(0, end - start);
  return POLLED.has(run.status) ? Math.max(0, now - start) : null;
}

function countOf(run, key) {
  const value = (run.counts || {})[key];
  return typeof value === "number" ? value : null;
}


// ---------------------------------------------------------------------------------------------------------------
// Routing (hash based)

let pollTimer = null;
let objectUrls = [];
const pageCursors = new Map(); // export name -> the `before` cursors of the pages seen, newest first ("" = first)

function stopPolling() {
  if (pollTimer !== null) window.clearTimeout(pollTimer);
  pollTimer = null;
}

function releaseObjectUrls() {
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls = [];
}

function parseRoute(hash) {
  const raw = hash.replace(/^#/, "");
  if (raw === "" || raw === "/" || raw === "/exports" || raw === "/exports/") return { page: "exports" };
  if (!raw.startsWith("/")) return null; // an in-page anchor (the skip link): not a route
  const [path, query = ""] = raw.split("?", 2);
  const params = new URLSearchParams(query);
  const parts = path.split("/").filter(Boolean).map((part) => {
    try {
      return decodeURIComponent(part);
    } catch {
      return part;
    }
  });
  if (raw.split("?")[0] === "/connections") return { page: "connections" };
  if (parts.length === 2 && parts[0] === "exports" && parts[1] === "new") return { page: "export-form", name: "" };
  if (parts.length === 3 && parts[0] === "exports" && parts[2] === "edit") return { page: "export-form", name: parts[1] };
  if (parts.length === 2 && parts[0] === "connections" && parts[1] === "new") return { page: "connection-form", name: "" };
  if (parts.length === 3 && parts[0] === "connections" && parts[2] === "edit") {
    return { page: "connection-form", name: parts[1] };
  }
  if (parts.length === 2 && parts[0] === "exports") return { page: "runs", name: parts[1], before: params.get("before") || "" };
  if (parts.length === 2 && parts[0] === "runs") return { page: "run", id: parts[1] };
  return { page: "missing" };
}

function route(focus = false) {
  const target = parseRoute(window.location.hash);
  if (target === null) return;
  stopPolling();
  releaseObjectUrls();
  const gen = nextGeneration();
  const main = $("#main");
  fill(main);
  if (!canCallApi()) {
    renderKeyNeeded(main);
    showRoles();
    return;
  }
  loadRoles().then(() => {
    if (!current(gen)) return;
    showRoles();
    renderPage(main, gen, target);
    if (focus && $("#page-title")) $("#page-title").focus();
  }).catch((error) => {
    if (!current(gen)) return;
    showRoles();
    if (!(error instanceof ApiError && error.status === 401)) {
      append(main, pageHeading("The console could not start"));
      showError(error, "Reading your roles");
    } else {
      renderKeyNeeded(main);
    }
  });
}

function renderPage(main, gen, target) {
  const pages = {
    exports: () => renderExports(main, gen),
    runs: () => renderRuns(main, gen, target.name, target.before),
    run: () => renderRun(main, gen, target.id),
    connections: () => renderConnections(main, gen),
    "export-form": () => renderExportForm(main, gen, target.name),
    "connection-form": () => renderConnectionForm(main, gen, target.name),
  };
  (pages[target.page] || (() => renderMissing(main)))();
}

/** Who the page is working for, in the header: the roles the server grants (it checks every call). */
function showRoles() {
  const box = $("#role-state");
  if (!box) return;
  const state = rolesState();
  box.textContent = state;
  box.hidden = !state;
}


function renderKeyNeeded(main) {
  append(main, [
    pageHeading("A function key is needed"),
    el("p", {}, "Enter the Function App's key above to read the exports and runs. It stays in this browser tab " +
      "only and is forgotten when the tab closes."),
    el("p", { class: "hint" }, "When the app signs you in with Entra ID instead, choose “Continue without a key”."),
  ]);
  showKeyState($("#key-error").textContent);
}

function renderMissing(main) {
  append(main, [pageHeading("Page not found"), el("p", {}, link("#/exports", "Back to the exports"))]);
}


// ---------------------------------------------------------------------------------------------------------------
// Starting runs

const RUN_KINDS = {
  "dry-run": { label: "Dry run", options: { dryRun: true }, doing: "Starting a dry run" },
  run: { label: "Run", options: {}, doing: "Starting a run" },
  resync: { label: "Full resync", options: { force: true }, doing: "Starting a full resync" },
  "resync-preview": { label: "Dry run of a full resync", options: { dryRun: true, force: true },
    doing: "Starting a dry run of a full resync" },
};

async function startRun(name, kind, button) {
  const { options, doing, label } = RUN_KINDS[kind];
  if (button) button.disabled = true;
  setMessage(`${doing} of ${name}…`);
  try {
    const { data } = await api("POST", `exports/${enc(name)}/runs`, options);
    setMessage(`${label} of ${name} started: run ${data.runId || "?"}.`, "success");
    if (data.runId && window.location.hash !== runHash(data.runId)) {
      carryMessage = true;
      window.location.hash = runHash(data.runId);
    }
  } catch (error) {
    if (error instanceof ApiError && error.status === 409 && error.data && error.data.runId) {
      setMessage(`${doing} of ${name} was refused (409): ${error.message}`, "error",
        link(runHash(error.data.runId), `Open run ${error.data.runId}`));
    } else {
      showError(error, `${doing} of ${name}`);
    }
  } finally {
    if (button && button.isConnected) button.disabled = false;
  }
}

/** What a full resync costs, from the newest planned forced run (a dry run with force or a real one) among the
 * export's recent runs; else what the last planned run says; else null. */
async function resyncCost(name) {
  const { data } = await api("GET", `exports/${enc(name)}/runs?limit=${PAGE_SIZE}`);
  const runs = Array.isArray(data.runs) ? data.runs : [];
  const planned = runs.filter((r) => typeof r.plannedRequests === "number");
  const forced = planned.find((r) => r.force);
  if (forced) {
    const { data: view } = await api("GET", `runs/${enc(forced.runId)}`);
    const plan = view.plan || {};
    const profiles = countOf(view, "profiles");
    const parts = [`The newest planned full resync (${forced.dryRun ? "dry " : ""}run ${forced.runId}) planned ` +
      `${fmtNumber(view.plannedRequests)} requests`];
    if (plan.estimated_duration) parts.push(`: about ${plan.estimated_duration} at the connection's request budget`);
    if (profiles !== null) parts.push(` for ${fmtNumber(profiles)} profiles`);
    return `${parts.join("")}. The snapshot may have changed since.`;
  }
  const last = planned[0];
  if (last) {
    const profiles = countOf(last, "profiles");
    const { data: view } = await api("GET", `runs/${enc(last.runId)}`);
    const plan = view.plan || {};
    const then = profiles !== null ? ` (${fmtNumber(profiles)} profiles then)` : "";
    const time = plan.estimated_duration ? ` (about ${plan.estimated_duration} at the budget)` : "";
    return `The last planned run (${last.runId}, not a full resync) planned ${fmtNumber(last.plannedRequests)} ` +
      `requests${time} for its changes only. A full resync re-sends the whole segment${then}, so it sends ` +
      "more. Preview the exact cost with a dry run.";
  }
  return null;
}

let dialogReady = false;

function initDialog() {
  const dialog = $("#confirm-dialog");
  if (dialogReady || !dialog) return;
  dialogReady = true;
  $("#confirm-cancel").addEventListener("click", () => dialog.close("cancel"));
  $("#confirm-ok").addEventListener("click", () => dialog.close("resync"));
  $("#confirm-preview").addEventListener("click", () => dialog.close("resync-preview"));
}

function confirmResync(name, button) {
  const dialog = $("#confirm-dialog");
  initDialog();
  const gen = currentGeneration();
  $("#confirm-title").textContent = `Full resync of ${name}`;
  $("#confirm-text").textContent = "A full resync ignores what earlier runs sent and re-sends every profile of " +
    "the segment to the destination. It spends the connection's request budget, which other exports on the " +
    "same connection share, and a run of this export in progress stops and ends failed.";
  const cost = $("#confirm-cost");
  cost.textContent = "Looking up the cost from the export's recent runs…";
  resyncCost(name).then((text) => {
    if (dialog.open) cost.textContent = text || "Its cost is not known yet: it re-sends the whole segment. " +
      "Preview the exact number of requests and the time at the budget with a dry run.";
  }).catch(() => {
    if (dialog.open) cost.textContent = "Its cost could not be read: it re-sends the whole segment. Preview it " +
      "with a dry run first.";
  });
  dialog.returnValue = "";
  dialog.addEventListener("close", () => {
    const choice = dialog.returnValue;
    if (button && button.isConnected) button.focus();
    if (!current(gen)) return;
    if (choice === "resync" || choice === "resync-preview") startRun(name, choice, button);
    else setMessage(`Full resync of ${name} not started.`);
  }, { once: true });
  dialog.showModal();
  $("#confirm-cancel").focus();
}

// ---------------------------------------------------------------------------------------------------------------
// Page 1: #/exports

async function renderExports(main, gen) {
  append(main, [
    pageHeading("Exports"),
    el("p", { class: "lead" }, "The export definitions in force and each one's last run. A dry run plans and " +
      "reports without sending anything."),
    may(ADMIN) ? el("p", {}, link("#/exports/new", "Add an export", { id: "add-export", class: "button-link" })) : null,
  ]);
  const holder = el("div", { class: "table-wrap" }, el("p", { class: "loading" }, "Loading exports…"));
  main.append(holder);
  const data = await load(gen, holder, "exports", "exports");
  if (!data) return;
  const exports = Array.isArray(data.exports) ? data.exports : [];
  const table = el("table", { id: "exports-table", class: "data-table" },
    el("caption", {}, `Exports (${exports.length})`),
    el("thead", {}, el("tr", {}, ["Export", "Destination", "Membership", "Enabled", "Last run", "Started",
      "Finished", "Next start", "Actions"].map((h) => el("th", { scope: "col" }, h)))));
  const body = el("tbody");
  if (exports.length === 0) {
    body.append(el("tr", {}, el("td", { colspan: "9", class: "empty" }, "No exports are defined.")));
  }
  for (const item of exports) body.append(exportRow(item));
  table.append(body);
  fill(holder, table);
}

function describeDestination(dest) {
  if (!dest || typeof dest !== "object") return ["—"];
  const lines = [];
  if (dest.membership === "list" && dest.list !== undefined) lines.push(`list “${dest.list}”`);
  else if (dest.field !== undefined) lines.push(`field “${dest.field}”`);
  lines.push(`connection ${dest.connection || "default"}`);
  if (dest.onLeave) lines.push(`on leave: ${dest.onLeave}`);
  if (dest.newPeople && dest.newPeople.emailPermission !== undefined) {
    lines.push(`new people's email permission: ${dest.newPeople.emailPermission}`);
  }
  return lines;
}

function lines(texts) {
  return texts.map((text, i) => el("span", { class: i ? "line sub" : "line" }, text));
}

function exportRow(item) {
  const name = String(item.name || "");
  const last = item.lastRun || null;
  const row = el("tr", { "data-export": name });
  row.append(el("th", { scope: "row", class: "nowrap" }, link(exportHash(name), name, { "data-link": "runs",
    "aria-label": `Runs of ${name}` })));
  row.append(el("td", {}, lines(describeDestination(item.destination))));
  row.append(el("td", {}, (item.destination && item.destination.membership) || "—"));
  const enabled = el("td", {}, item.enabled ? "yes" : "no");
  if (item.dataTransferAcknowledged === false) enabled.append(el("span", { class: "line sub warn" },
    "data transfer not acknowledged"));
  row.append(enabled);
  const status = el("td", { "data-field": "last-status" });
  if (last) {
    status.append(statusBadge(last.status), " ", link(runHash(last.runId), last.runId, { class: "run-id",
      "aria-label": `Last run ${last.runId} of ${name}` }));
    if (last.error) status.append(el("span", { class: "line sub error-text", title: last.error },
      truncate(last.error, 160)));
    if (last.nextAttempt) status.append(el("span", { class: "line sub" }, "next attempt ", timeEl(last.nextAttempt)));
  } else {
    status.append("no runs yet");
  }
  row.append(status);
  row.append(el("td", { "data-field": "last-started" }, last ? timeEl(runIdTime(last.runId)) : "—"));
  row.append(el("td", { "data-field": "last-finished" }, last && last.finished ? timeEl(last.finished) : "—"));
  const next = item.nextStart ? [timeEl(item.nextStart), el("span", { class: "line sub" }, "the timer looks for a snapshot")]
    : [item.enabled ? "—" : "disabled"];
  row.append(el("td", { "data-field": "next-start" }, next));
  const actions = el("div", { class: "actions" });
  if (may(ADMIN)) {
    actions.append(link(`#/exports/${enc(name)}/edit`, "Edit", { class: "button-link", "data-action": "edit",
      "aria-label": `Edit ${name}` }));
  }
  if (!may(OPERATOR)) {
    row.append(el("td", {}, actions.firstChild ? actions : el("span", { class: "sub" }, "read only")));
    return row;
  }
  for (const [action, label] of [["dry-run", "Dry run"], ["run", "Run"], ["resync", "Full resync"]]) {
    const button = el("button", { type: "button", "data-action": action, class: action === "resync" ? "danger" : "",
      "aria-label": `${label}: ${name}` }, label);
    button.addEventListener("click", () => {
      if (action === "resync") confirmResync(name, button);
      else startRun(name, action, button);
    });
    actions.append(button);
  }
  row.append(el("td", {}, actions));
  return row;
}

// ---------------------------------------------------------------------------------------------------------------
// Page 2: #/exports/<name>: run history, paged, with a chart of the page's runs

async function renderRuns(main, gen, name, before) {
  let cursors = pageCursors.get(name) || [""];
  let index = cursors.indexOf(before);
  const deepLink = index === -1 && Boolean(before); // an older page opened directly: its number is not known
  if (index === -1) {
    cursors = before ? ["", before] : [""];
    index = cursors.length - 1;
  } else {
    cursors = cursors.slice(0, index + 1);
  }
  pageCursors.set(name, cursors);

  append(main, [
    pageHeading(`Runs of ${name}`),
    el("p", { class: "lead" }, link("#/exports", "All exports"), " · newest first, ", String(PAGE_SIZE),
      " runs a page."),
  ]);
  const chartSection = el("section", { class: "chart-section", "aria-labelledby": "chart-heading" },
    el("h2", { id: "chart-heading" }, "Changes and durations of the runs on this page"));
  const pager = el("nav", { class: "pager", "aria-label": "Pages of runs" });
  const newer = el("button", { type: "button", id: "newer", disabled: index === 0 }, "Newer");
  const older = el("button", { type: "button", id: "older", disabled: true }, "Older");
  const pageInfo = el("span", { id: "page-info", class: "page-info" },
    index === 0 ? "Newest runs" : deepLink ? "Older runs" : `Page ${index + 1}`);
  pager.append(newer, older, pageInfo);
  const holder = el("div", { class: "table-wrap" }, el("p", { class: "loading" }, "Loading runs…"));
  append(main, [chartSection, pager, holder]);

  newer.addEventListener("click", () => {
    window.location.hash = exportHash(name, cursors[index - 1] || "");
  });

  const query = `limit=${PAGE_SIZE}${before ? `&before=${enc(before)}` : ""}`;
  const data = await load(gen, holder, `exports/${enc(name)}/runs?${query}`, "runs", `Reading the runs of ${name}`);
  if (!data) return;
  const runs = Array.isArray(data.runs) ? data.runs : [];
  const nextBefore = olderCursor(data.next);
  if (runs.length > 0 && nextBefore) {
    older.disabled = false;
    older.addEventListener("click", () => {
      cursors.push(nextBefore);
      window.location.hash = exportHash(name, nextBefore);
    });
  }
  chartSection.append(runsChart(runs, name), chartLegend());
  fill(holder, runsTable(runs, name, index));
}

/** The `before` run id of the API's `next` URL (/api/exports/<name>/runs?limit=20&before=<id>), or "". */
function olderCursor(next) {
  if (typeof next !== "string" || !next) return "";
  try {
    return new URL(next, window.location.origin).searchParams.get("before") || "";
  } catch {
    return "";
  }
}

function runsTable(runs, name, index) {
  const table = el("table", { id: "runs-table", class: "data-table" },
    el("caption", {}, `Runs of ${name}, newest first${index ? " (older page)" : ""}`),
    el("thead", {}, el("tr", {}, ["Run", "Status", "Trigger", "Started", "Duration", "Joiners", "Changed",
      "Leavers", "Accepted", "Failed"].map((h, i) => el("th", { scope: "col", class: i >= 5 ? "num" : "" }, h)))));
  const body = el("tbody");
  if (runs.length === 0) {
    body.append(el("tr", {}, el("td", { colspan: "10", class: "empty" },
      index ? "No older runs." : "This export has no runs yet.")));
  }
  for (const run of runs) {
    const row = el("tr", { "data-run": run.runId });
    row.append(el("th", { scope: "row" }, link(runHash(run.runId), run.runId, { class: "run-id" })));
    const status = el("td", {}, statusBadge(run.status));
    if (run.error) status.append(el("span", { class: "line sub error-text", title: run.error }, truncate(run.error, 120)));
    row.append(status);
    const flags = [run.dryRun ? "dry run" : "", run.force ? "force" : ""].filter(Boolean);
    row.append(el("td", {}, run.trigger || "—", flags.length ? el("span", { class: "line sub" }, flags.join(", ")) : null));
    row.append(el("td", {}, timeEl(runStart(run))));
    const duration = runDurationMs(run);
    row.append(el("td", {}, duration === null ? "—" : `${fmtDuration(duration)}${run.timings && run.timings.finished ? "" : " so far"}`));
    for (const key of ["joiners", "changed", "leavers", "accepted", "failed"]) {
      row.append(el("td", { class: "num" }, fmtNumber(countOf(run, key))));
    }
    body.append(row);
  }
  table.append(body);
  return table;
}

function chartLegend() {
  const item = (cls, text) => el("li", {}, el("span", { class: `swatch ${cls}`, "aria-hidden": "true" }), text);
  return el("ul", { id: "runs-legend", class: "legend" },
    item("swatch-joiners", "joiners"), item("swatch-changed", "changed"), item("swatch-leavers", "leavers"),
    item("swatch-duration", "duration of a finished run (lower chart)"),
    item("swatch-dry", "paler bars: dry runs (planned, nothing sent)"));
}

/** Grouped bars (joiners, changed, leavers) per run, oldest on the left, and below them the runs' durations. */
function runsChart(runs, name) {
  const W = 960;
  const H = 262;
  const left = 64;
  const right = 16;
  const barTop = 24;
  const barBottom = 146;
  const durTop = 192;
  const durBottom = 246;
  const plotW = W - left - right;
  const ordered = [...runs].reverse();
  const kinds = ["joiners", "changed", "leavers"];
  const summary = ordered.length === 0 ? `No runs of ${name} on this page.`
    : `Joiners, changed and leavers of ${ordered.length} runs of ${name}, oldest first, and the duration of each ` +
      "finished run. The table below lists the same values.";
  const svg = svgEl("svg", { id: "runs-chart", class: "runs-chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-labelledby": "runs-chart-title runs-chart-desc", preserveAspectRatio: "xMidYMid meet" },
  svgEl("title", { id: "runs-chart-title" }, `Runs of ${name}: joiners, changed, leavers and durations`),
  svgEl("desc", { id: "runs-chart-desc" }, summary));
  if (ordered.length === 0) {
    svg.setAttribute("viewBox", `0 0 ${W} 60`);
    svg.append(svgEl("text", { x: W / 2, y: 34, "text-anchor": "middle", class: "chart-text" }, "No runs on this page."));
    return svg;
  }
  const maxCount = Math.max(1, ...ordered.flatMap((run) => kinds.map((k) => countOf(run, k) || 0)));
  const groupW = plotW / ordered.length;
  const barW = Math.max(2, Math.min(24, (groupW * 0.8) / 3));
  const yCount = (v) => barBottom - ((barBottom - barTop) * v) / maxCount;

  // axes and gridlines of the bar chart
  const grid = svgEl("g", { class: "chart-grid", "aria-hidden": "true" });
  for (const v of [0, maxCount / 2, maxCount]) {
    const y = yCount(v);
    grid.append(svgEl("line", { x1: left, x2: W - right, y1: y, y2: y, class: v ? "gridline" : "axis" }),
      svgEl("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "chart-text" },
        fmtNumber(Math.round(v))));
  }
  grid.append(svgEl("text", { x: 4, y: barTop - 12, class: "chart-text chart-label" }, "contacts"));
  svg.append(grid);

  const bars = svgEl("g", { class: "bars" });
  ordered.forEach((run, i) => {
    const x0 = left + i * groupW + (groupW - 3 * barW) / 2;
    const group = svgEl("g", { class: run.dryRun ? "run-group dry" : "run-group", "data-run": run.runId });
    kinds.forEach((kind, k) => {
      const value = countOf(run, kind);
      const v = value || 0;
      const y = yCount(v);
      group.append(svgEl("rect", { x: (x0 + k * barW).toFixed(1), y: y.toFixed(1), width: (barW - 1).toFixed(1),
        height: Math.max(0, barBottom - y).toFixed(1), class: `bar bar-${kind}`, "data-run": run.runId,
        "data-kind": kind },
      svgEl("title", {}, `${run.runId}: ${value === null ? "no" : fmtNumber(value)} ${kind}${run.dryRun ? " (dry run)" : ""}`)));
    });
    bars.append(group);
    // x labels: a run's start time, when there is room
    const every = Math.max(1, Math.ceil(ordered.length / 7));
    if (i % every === 0) {
      const start = parseTime(runStart(run));
      const label = start === null ? run.runId.slice(0, 8)
        : labelFormat.format(new Date(start));
      bars.append(svgEl("text", { x: (left + (i + 0.5) * groupW).toFixed(1), y: barBottom + 16,
        "text-anchor": "middle", class: "chart-text", "aria-hidden": "true" }, label));
    }
  });
  svg.append(bars);

  // durations
  const durations = ordered.map((run) => (run.timings && run.timings.finished ? runDurationMs(run) : null));
  const maxDur = Math.max(1000, ...durations.filter((d) => d !== null));
  const yDur = (ms) => durBottom - ((durBottom - durTop) * ms) / maxDur;
  const dur = svgEl("g", { class: "durations" });
  dur.append(svgEl("text", { x: 4, y: durTop - 12, class: "chart-text chart-label" }, "duration"),
    svgEl("line", { x1: left, x2: W - right, y1: durBottom, y2: durBottom, class: "axis", "aria-hidden": "true" }),
    svgEl("line", { x1: left, x2: W - right, y1: durTop, y2: durTop, class: "gridline", "aria-hidden": "true" }),
    svgEl("text", { x: left - 6, y: durTop + 4, "text-anchor": "end", class: "chart-text" }, fmtDuration(maxDur)),
    svgEl("text", { x: left - 6, y: durBottom + 4, "text-anchor": "end", class: "chart-text" }, "0"));
  let segment = [];
  const flush = () => {
    if (segment.length > 1) dur.append(svgEl("polyline", { points: segment.join(" "), class: "duration-line" }));
    segment = [];
  };
  durations.forEach((ms, i) => {
    if (ms === null) {
      flush();
      return;
    }
    const x = (left + (i + 0.5) * groupW).toFixed(1);
    const y = yDur(ms).toFixed(1);
    segment.push(`${x},${y}`);
  });
  flush();
  durations.forEach((ms, i) => {
    if (ms === null) return;
    dur.append(svgEl("circle", { cx: (left + (i + 0.5) * groupW).toFixed(1), cy: yDur(ms).toFixed(1), r: 3.5,
      class: "duration-point", "data-run": ordered[i].runId },
    svgEl("title", {}, `${ordered[i].runId}: ${fmtDuration(ms)}`)));
  });
  if (durations.every((d) => d === null)) {
    dur.append(svgEl("text", { x: left + plotW / 2, y: (durTop + durBottom) / 2, "text-anchor": "middle",
      class: "chart-text" }, "No finished run on this page."));
  }
  svg.append(dur);
  return svg;
}

// ---------------------------------------------------------------------------------------------------------------
// Page 3: #/runs/<id>: one run's report, live while it is active

const COUNT_ORDER = ["read", "valid", "rejected", "duplicates", "profiles", "members_before", "values_left_out",
  "joiners", "changed", "leavers", "unchanged", "kept_leavers", "sent", "accepted", "refused", "failed", "cancelled",
  "dead_batches"];

function renderRun(main, gen, runId) {
  const status = el("span", { id: "run-status", class: "status status-unknown" }, "loading…");
  const cancel = el("button", { type: "button", id: "cancel-run", class: "danger", hidden: true }, "Cancel run");
  const replay = el("button", { type: "button", id: "replay-run", hidden: true }, "Replay dead batches");
  const progress = el("progress", { id: "run-progress", max: "1", "aria-labelledby": "progress-heading",
    "aria-describedby": "run-progress-text" });
  const parts = {
    status,
    cancel,
    replay,
    progress,
    summary: el("dl", { id: "run-summary", class: "summary" }),
    error: el("p", { id: "run-error", class: "error-box", hidden: true }),
    progressText: el("p", { id: "run-progress-text", class: "progress-text", "aria-live": "polite" }),
    rate: el("dl", { id: "run-rate", class: "summary rate" }),
    counts: el("table", { id: "run-counts", class: "data-table counts-table" }),
    plan: el("section", { id: "plan-preview", class: "panel", "aria-labelledby": "plan-heading", hidden: true }),
    rejected: el("section", { class: "panel", "aria-labelledby": "rejected-heading" }),
    refused: el("section", { class: "panel", "aria-labelledby": "refused-heading" }),
    dead: el("section", { id: "dead-batches", class: "panel", "aria-labelledby": "dead-heading", hidden: true }),
    reports: el("section", { id: "run-reports", class: "panel", "aria-labelledby": "reports-heading" }),
    exportLink: el("p", { class: "lead" }),
    rejectedKey: null,
    view: null,
  };
  append(main, [
    pageHeading(`Run ${runId}`),
    parts.exportLink,
    el("div", { class: "run-top" },
      el("section", { class: "panel", "aria-labelledby": "status-heading" },
        el("h2", { id: "status-heading" }, "Status: ", status),
        parts.error, el("div", { class: "button-row" }, cancel, replay), parts.summary),
      el("section", { class: "panel", "aria-labelledby": "progress-heading" },
        el("h2", { id: "progress-heading" }, "Progress"), progress, parts.progressText, parts.rate)),
    el("section", { class: "panel", "aria-labelledby": "counts-heading" },
      el("h2", { id: "counts-heading" }, "Counts"), parts.counts),
    parts.plan, parts.rejected, parts.refused, parts.dead, parts.reports,
  ]);

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    setMessage(`Cancelling run ${runId}… (the answer comes once no request of it will start, a few seconds)`);
    try {
      const { data } = await api("POST", `runs/${enc(runId)}/cancel`);
      if (!current(gen)) return;
      if (data.runId) updateRun(parts, data);
      setMessage(`Run ${runId} is ${data.status || "cancelling"}: requests in flight settle, then it ends.`, "success");
      schedulePoll(gen, runId, parts);
    } catch (error) {
      if (current(gen)) showError(error, `Cancelling run ${runId}`);
    } finally {
      cancel.disabled = false;
    }
  });
  replay.addEventListener("click", async () => {
    replay.disabled = true;
    setMessage(`Putting the dead batches of run ${runId} back on the queue…`);
    try {
      const { data } = await api("POST", `runs/${enc(runId)}/replay`);
      if (!current(gen)) return;
      setMessage(`Run ${runId}: ${fmtNumber(data.replayedBatches)} dead batches put back on the queue.`, "success");
      await refreshRun(gen, runId, parts, true);
    } catch (error) {
      if (current(gen)) showError(error, `Replaying the dead batches of run ${runId}`);
    } finally {
      replay.disabled = false;
    }
  });

  refreshRun(gen, runId, parts, false);
}

async function refreshRun(gen, runId, parts, pollAnyway) {
  if (!current(gen)) return;
  pollTimer = null;
  let view;
  try {
    ({ data: view } = await api("GET", `runs/${enc(runId)}`));
  } catch (error) {
    if (!current(gen)) return;
    showError(error, `Reading run ${runId}`);
    if (parts.view === null) parts.status.textContent = "unknown";
    // keep watching through an answer that may pass (no answer, a server error); stop on the others
    if (parts.view && POLLED.has(parts.view.status) && (error.status === 0 || error.status >= 500)) {
      schedulePoll(gen, runId, parts);
    }
    return;
  }
  if (!current(gen)) return;
  updateRun(parts, view);
  if (POLLED.has(view.status) || pollAnyway) schedulePoll(gen, runId, parts);
}

function schedulePoll(gen, runId, parts) {
  if (!current(gen)) return;
  stopPolling();
  pollTimer = window.setTimeout(() => refreshRun(gen, runId, parts, false), POLL_MS);
}

function updateRun(parts, view) {
  const previous = parts.view;
  parts.view = view;
  const status = view.status || "unknown";
  parts.status.textContent = status;
  parts.status.className = `status status-${statusSlug(status)}`;
  if (previous && previous.status !== status) setMessage(`Run ${view.runId} is now ${status}.`);

  fill(parts.exportLink, view.export ? link(exportHash(view.export), `Runs of ${view.export}`) : "",
    " · ", link("#/exports", "All exports"));

  parts.error.hidden = !view.error;
  parts.error.textContent = view.error ? `Error: ${view.error}` : "";

  updateSummary(parts.summary, view);
  parts.cancel.hidden = !ACTIVE.has(status) || !may(OPERATOR);
  const dead = Math.max(Number((view.batches || {}).dead) || 0, countOf(view, "dead_batches") || 0);
  parts.replay.hidden = !(dead > 0) || !may(OPERATOR);
  parts.replay.textContent = dead > 0 ? `Replay ${fmtNumber(dead)} dead batch${dead === 1 ? "" : "es"}` : "Replay dead batches";
  updateProgress(parts, view);
  updateCounts(parts.counts, view.counts || {});
  updatePlan(parts.plan, view);
  updateRejected(parts, view);
  updateRefused(parts.refused, view);
  updateDead(parts.dead, view);
  updateReports(parts.reports, view);
}

function dlRow(dl, term, ...value) {
  dl.append(el("dt", {}, term), el("dd", {}, ...value));
}

function updateSummary(dl, view) {
  fill(dl);
  const t = view.timings || {};
  dlRow(dl, "Export", view.export ? link(exportHash(view.export), view.export) : "—");
  dlRow(dl, "Trigger", view.trigger || "—");
  dlRow(dl, "Dry run", yesNo(view.dryRun));
  dlRow(dl, "Force (full resync)", yesNo(view.force));
  dlRow(dl, "Snapshot", view.snapshot ? el("code", {}, view.snapshot) : "—");
  const dest = view.destination;
  if (dest && typeof dest === "object") {
    dlRow(dl, "Destination", dest.name || dest.target || "—",
      dest.connection ? el("span", { class: "line sub" }, `connection ${dest.connection}`) : null,
      dest.firstSync ? el("span", { class: "line sub" }, "first sync") : null,
      dest.changedFrom ? el("span", { class: "line sub" }, `changed from ${dest.changedFrom}`) : null,
      dest.note ? el("span", { class: "line sub" }, dest.note) : null);
  } else {
    dlRow(dl, "Destination", "— (known once planned)");
  }
  dlRow(dl, "Started", timeEl(runStart(view)));
  if (t.planning_started) dlRow(dl, "Planning started", timeEl(t.planning_started));
  if (t.planned_at) dlRow(dl, "Planning ended", timeEl(t.planned_at));
  dlRow(dl, "Finished", t.finished ? timeEl(t.finished) : POLLED.has(view.status) ? "not yet" : "—");
  const duration = runDurationMs(view);
  dlRow(dl, t.finished ? "Duration" : "Elapsed", fmtDuration(duration));
}

function updateProgress(parts, view) {
  const batches = view.batches || {};
  const planned = Number(batches.planned) || 0;
  const settled = Number(batches.settled) || 0;
  const dead = Number(batches.dead) || 0;
  const progress = parts.progress;
  const active = POLLED.has(view.status);
  progress.setAttribute("max", String(planned > 0 ? planned : 1));
  if (planned === 0 && active) progress.removeAttribute("value"); // indeterminate while it plans
  else progress.setAttribute("value", String(Math.min(settled, planned > 0 ? planned : settled)));
  progress.setAttribute("data-settled", String(settled));
  progress.setAttribute("data-planned", String(planned));

  let text;
  if (view.dryRun) text = "A dry run: nothing is sent.";
  else if (planned === 0 && active) text = `${view.status}: no batches planned yet.`;
  else if (planned === 0) text = "No batches were planned.";
  else text = `${fmtNumber(settled)} of ${fmtNumber(planned)} batches settled` +
    `${planned ? ` (${Math.floor((100 * Math.min(settled, planned)) / planned)}%)` : ""}` +
    `${dead ? `, ${fmtNumber(dead)} dead` : ""}.`;
  if (parts.progressText.textContent !== text) parts.progressText.textContent = text;

  // Rates. The view has no measured request rate: the budget's rate is derived from the plan (planned requests
  // over the seconds they take at the budget), and the rate so far from the batches settled.
  const rate = parts.rate;
  fill(rate);
  const t = view.timings || {};
  const start = parseTime(runStart(view));
  const end = parseTime(t.finished) ?? (active ? Date.now() : null);
  const sendStart = parseTime(t.planned_at) ?? parseTime(t.planning_started) ?? start;
  if (start !== null && end !== null) dlRow(rate, "Elapsed", fmtDuration(end - start));
  const sendSeconds = sendStart !== null && end !== null ? (end - sendStart) / 1000 : null;
  const plan = view.plan || {};
  const plannedRequests = typeof view.plannedRequests === "number" ? view.plannedRequests : null;
  const atBudget = typeof plan.seconds_at_budget === "number" ? plan.seconds_at_budget : null;
  if (plannedRequests !== null) dlRow(rate, "Planned requests", fmtNumber(plannedRequests));
  if (plan.estimated_duration) dlRow(rate, "Estimated time at the budget", plan.estimated_duration);
  if (view.dryRun) return;
  // The connection's rate (plan.rate), else derived from the plan (views of runs planned before it was shown).
  const budgetRate = typeof plan.rate === "number" ? plan.rate
    : plannedRequests && atBudget ? plannedRequests / atBudget : null;
  if (sendSeconds && sendSeconds > 0 && settled > 0) {
    dlRow(rate, "Settled batches per second", fmtRate(settled / sendSeconds, "batches/s"));
    if (budgetRate !== null && planned > 0) {
      const observed = (settled * (plannedRequests / planned)) / sendSeconds;
      dlRow(rate, "Requests per second against the budget",
        `about ${fmtRate(observed, "requests/s")} of ${fmtRate(budgetRate, "requests/s")} ` +
        `(${Math.round((100 * observed) / budgetRate)}%)`,
        el("span", { class: "line sub" }, "estimated: batches settled × planned requests per batch, against the " +
          "connection's rate"));
    }
  } else if (budgetRate !== null) {
    dlRow(rate, "Budget", fmtRate(budgetRate, "requests/s"),
      el("span", { class: "line sub" }, "planned requests over the planned seconds at the budget"));
  }
}

function humanKey(key) {
  return String(key).replace(/_/g, " ");
}

function updateCounts(table, counts) {
  const keys = Object.keys(counts);
  const ordered = [...COUNT_ORDER.filter((k) => keys.includes(k)), ...keys.filter((k) => !COUNT_ORDER.includes(k))];
  const body = el("tbody");
  for (const key of ordered) {
    const value = counts[key];
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      for (const [sub, subValue] of Object.entries(value)) {
        body.append(el("tr", { "data-count": `${key}.${sub}` }, el("th", { scope: "row" }, `${humanKey(key)}: ${sub}`),
          el("td", { class: "num" }, typeof subValue === "number" ? fmtNumber(subValue) : String(subValue))));
      }
    } else {
      body.append(el("tr", { "data-count": key }, el("th", { scope: "row" }, humanKey(key)),
        el("td", { class: "num" }, typeof value === "number" ? fmtNumber(value) : String(value))));
    }
  }
  if (ordered.length === 0) body.append(el("tr", {}, el("td", { colspan: "2", class: "empty" }, "No counts yet.")));
  fill(table, el("caption", {}, "Counts of the run"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Count"), el("th", { scope: "col", class: "num" }, "Value"))),
    body);
}

function updatePlan(section, view) {
  const plan = view.plan || {};
  if (Object.keys(plan).length === 0) {
    section.hidden = true;
    fill(section);
    return;
  }
  section.hidden = false;
  const counts = view.counts || {};
  const dl = el("dl", { class: "summary" });
  for (const key of ["joiners", "changed", "leavers", "unchanged", "rejected"]) {
    if (key in counts) dlRow(dl, humanKey(key), fmtNumber(counts[key]));
  }
  if (typeof view.plannedRequests === "number") dlRow(dl, "Requests", fmtNumber(view.plannedRequests));
  if (plan.estimated_duration) {
    dlRow(dl, "Estimated time at the budget", plan.estimated_duration,
      typeof plan.seconds_at_budget === "number" ? ` (${fmtNumber(plan.seconds_at_budget)} s)` : "");
  }
  const dest = plan.destination;
  if (dest && typeof dest === "object" && (dest.name || dest.target)) {
    dlRow(dl, "Destination", dest.name || dest.target,
      dest.changedFrom ? el("span", { class: "line sub" }, `changed from ${dest.changedFrom}`) : null);
  }
  const people = plan.newPeople;
  if (people && typeof people === "object") {
    if (people.emailPermission !== undefined) dlRow(dl, "New people's email permission", String(people.emailPermission));
    if (people.existingPeopleKeepTheirs !== undefined) dlRow(dl, "Existing people keep theirs", yesNo(people.existingPeopleKeepTheirs));
    if (typeof people.addedRequests === "number") dlRow(dl, "Requests added for new people", fmtNumber(people.addedRequests));
  }
  if (plan.removalGuard) dlRow(dl, "Removal guard", el("strong", { class: "warn" }, String(plan.removalGuard)));

  const samples = plan.samples && typeof plan.samples === "object" ? plan.samples : {};
  const sampleBody = el("tbody");
  for (const [kind, emails] of Object.entries(samples)) {
    for (const email of Array.isArray(emails) ? emails : []) {
      sampleBody.append(el("tr", {}, el("td", {}, humanKey(kind)), el("td", {}, el("code", {}, String(email)))));
    }
  }
  if (!sampleBody.firstChild) sampleBody.append(el("tr", {}, el("td", { colspan: "2", class: "empty" }, "No samples.")));
  const sampleTable = el("table", { id: "plan-samples", class: "data-table" },
    el("caption", {}, "Masked samples of the plan"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Change"), el("th", { scope: "col" }, "Email (masked)"))),
    sampleBody);
  fill(section,
    el("h2", { id: "plan-heading" }, view.dryRun ? "Dry-run preview" : "Plan"),
    view.dryRun ? el("p", { class: "hint" }, "What a real run would send; this run sent nothing.") : null,
    dl, sampleTable);
}

function csvField(value) {
  const text = value === null || value === undefined ? "" : typeof value === "object" ? JSON.stringify(value) : String(value);
  return `"${text.replace(/"/g, '""')}"`;
}

/** CSV of rows (every field quoted, quotes doubled, CRLF line ends): known columns first, then any others. */
function toCsv(rows) {
  const known = ["partition", "row", "reason", "email"];
  const columns = [...known];
  for (const row of rows) for (const key of Object.keys(row || {})) if (!columns.includes(key)) columns.push(key);
  const lines = [columns.map(csvField).join(",")];
  for (const row of rows) lines.push(columns.map((c) => csvField((row || {})[c])).join(","));
  return `${lines.join("\r\n")}\r\n`;
}

function updateRejected(parts, view) {
  const rows = Array.isArray(view.rejectedSample) ? view.rejectedSample : [];
  const key = JSON.stringify(rows);
  if (parts.rejectedKey === key) return; // unchanged: keep the table and its download link
  parts.rejectedKey = key;
  const rejectedTotal = countOf(view, "rejected");
  const body = el("tbody");
  for (const row of rows) {
    body.append(el("tr", {}, el("td", { class: "wrap" }, String(row.partition ?? "")),
      el("td", { class: "num" }, row.row ?? ""), el("td", { class: "wrap" }, String(row.reason ?? "")),
      el("td", {}, el("code", {}, String(row.email ?? "")))));
  }
  if (rows.length === 0) body.append(el("tr", {}, el("td", { colspan: "4", class: "empty" }, "No rejected rows.")));
  const table = el("table", { id: "rejected-table", class: "data-table" },
    el("caption", {}, `Rejected rows: a sample of ${fmtNumber(rows.length)}` +
      `${rejectedTotal !== null ? ` of ${fmtNumber(rejectedTotal)}` : ""}`),
    el("thead", {}, el("tr", {}, ["Partition", "Row", "Reason", "Email (masked)"].map((h, i) =>
      el("th", { scope: "col", class: i === 1 ? "num" : "" }, h)))),
    body);
  const children = [el("h2", { id: "rejected-heading" }, "Rejected rows")];
  if (rows.length > 0) {
    for (const url of objectUrls) URL.revokeObjectURL(url);
    const url = URL.createObjectURL(new Blob([toCsv(rows)], { type: "text/csv;charset=utf-8" }));
    objectUrls = [url];
    children.push(el("p", {}, el("a", { id: "download-rejected", href: url, download: `rejected-${view.runId}.csv` },
      `Download ${rows.length === 1 ? "this row" : `these ${fmtNumber(rows.length)} rows`} as CSV`)));
  }
  children.push(el("div", { class: "table-wrap" }, table));
  if (rejectedTotal !== null && rejectedTotal > rows.length) {
    const all = el("button", { type: "button", id: "download-all-rejected" },
      `Download all ${fmtNumber(rejectedTotal)} rejected rows as CSV`);
    all.addEventListener("click", () => downloadAllRejected(view.runId));
    children.push(el("p", {}, all));
  }
  fill(parts.rejected, ...children);
}

/** Every rejected row of the run (GET runs/{id}/rejected), saved as CSV through a temporary link. */
async function downloadAllRejected(runId) {
  try {
    const { data } = await api("GET", `runs/${encodeURIComponent(runId)}/rejected`);
    const rows = Array.isArray(data.rows) ? data.rows : [];
    const url = URL.createObjectURL(new Blob([toCsv(rows)], { type: "text/csv;charset=utf-8" }));
    const link = el("a", { href: url, download: `rejected-${runId}-all.csv`, hidden: "" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    setMessage(`Saved ${fmtNumber(rows.length)} rejected rows` +
      (data.truncated ? " (the first ones; the run's report in storage holds them all)." : "."));
  } catch (error) {
    setMessage(`The rejected rows could not be read: ${error.message}`, "error");
  }
}

function updateRefused(section, view) {
  const rows = Array.isArray(view.deliveryProblems) ? view.deliveryProblems : [];
  const body = el("tbody");
  for (const row of rows) {
    body.append(el("tr", {}, el("td", {}, el("code", {}, String(row.email ?? "—"))),
      el("td", { class: "wrap" }, String(row.reason ?? ""))));
  }
  if (rows.length === 0) body.append(el("tr", {}, el("td", { colspan: "2", class: "empty" }, "No contact was refused.")));
  const refused = countOf(view, "refused");
  const failed = countOf(view, "failed");
  fill(section,
    el("h2", { id: "refused-heading" }, "Delivery problems"),
    el("p", { class: "hint" }, "Contacts the destination refused or that failed, with the API's reason " +
      `(the first ${rows.length >= 20 ? "20" : "ones"}; refused ${fmtNumber(refused)}, failed ${fmtNumber(failed)}).`),
    el("div", { class: "table-wrap" }, el("table", { id: "refused-table", class: "data-table" },
      el("caption", {}, `Refused or failed contacts (${fmtNumber(rows.length)} shown)`),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Email (masked)"), el("th", { scope: "col" }, "Reason"))),
      body)));
}

/** The run's dead batches (kept for replay), with the reason each one died. */
function updateDead(section, view) {
  const rows = Array.isArray(view.deadBatchList) ? view.deadBatchList : [];
  section.hidden = rows.length === 0;
  if (rows.length === 0) {
    fill(section);
    return;
  }
  const body = el("tbody");
  for (const row of rows) {
    body.append(el("tr", { "data-batch": String(row.batch) }, el("td", { class: "num" }, fmtNumber(row.batch)),
      el("td", {}, String(row.kind ?? "")), el("td", { class: "num" }, fmtNumber(row.contacts)),
      el("td", { class: "wrap" }, String(row.reason ?? "")), el("td", {}, row.replaying ? "being replayed" : "dead")));
  }
  fill(section, el("h2", { id: "dead-heading" }, "Dead batches"),
    el("p", { class: "hint" }, "Batches that failed on every attempt. Replay puts them back on the queue once the " +
      "cause is fixed; a newer run of the export refuses it (it would send older data)."),
    el("div", { class: "table-wrap" }, el("table", { id: "dead-table", class: "data-table" },
      el("caption", {}, `Dead batches (${fmtNumber(rows.length)})`),
      el("thead", {}, el("tr", {}, ["Batch", "Kind", "Contacts", "Reason", "State"].map((h, i) =>
        el("th", { scope: "col", class: i === 0 || i === 2 ? "num" : "" }, h)))),
      body)));
}

function updateReports(section, view) {
  const reports = view.reports || {};
  const dl = el("dl", { class: "summary" });
  if (reports.report) dlRow(dl, "Report", el("code", {}, String(reports.report)));
  if (reports.rejectedRows) dlRow(dl, "Rejected rows", el("code", {}, String(reports.rejectedRows)));
  fill(section, el("h2", { id: "reports-heading" }, "Reports"),
    el("p", { class: "hint" }, "Blobs in the app's host storage (docs/operations.md says how to download them)."), dl);
}

// ---------------------------------------------------------------------------------------------------------------
// Start

function init() {
  initKeyPanel(() => {
    forgetRoles();
    route();
  });
  onUnauthorized(stopPolling);
  initDialog();
  const skip = $("#skip-link");
  if (skip) {
    skip.addEventListener("click", (event) => {
      event.preventDefault(); // keep the route in the hash
      $("#main").focus();
    });
  }
  window.addEventListener("hashchange", () => {
    clearMessageOnNavigation();
    route(true);
  });
  if (!window.location.hash || window.location.hash === "#") {
    window.history.replaceState(null, "", "#/exports");
  }
  route(false);
}

let carryMessage = false; // a message set just before a navigation (a run started) stays for the page it opens

function clearMessageOnNavigation() {
  if (carryMessage) carryMessage = false;
  else clearMessage();
}

init();
