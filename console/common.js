/*
 * What every page of the console shares: DOM helpers that never parse HTML, formatting, the key kept in session
 * storage, the message line, and the API call. See app.js for the test hooks.
 */

const KEY_STORAGE = "segmentSyncConsole.functionKey";
const SVG_NS = "http://www.w3.org/2000/svg";

// ---------------------------------------------------------------------------------------------------------------
// Small DOM helpers (no HTML strings anywhere)

/** An element: attrs.class -> className, attrs.text -> textContent, booleans toggle attributes, the rest
 * setAttribute; children: nodes or strings (as text nodes); null/undefined/false skipped. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function svgEl(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.setAttribute("class", String(value));
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
}

/** Append children: nodes, strings (as text nodes) or lists of them, at any depth; null/undefined/false skipped. */
function append(node, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace a node's children (null/undefined/false skipped, strings as text nodes). */
function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

const $ = (selector, root = document) => root.querySelector(selector);

function link(hash, text, attrs = {}) {
  return el("a", { href: hash, ...attrs }, text);
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------------------------------
// Formatting

const numberFormat = new Intl.NumberFormat("en-US");
const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const labelFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit",
  minute: "2-digit", hourCycle: "h23" });

function fmtNumber(value) {
  return typeof value === "number" && Number.isFinite(value) ? numberFormat.format(value) : "—";
}

function parseTime(iso) {
  if (typeof iso !== "string" || !iso) return null;
  const ms = Date.parse(iso);
  return Number.isNaN(ms) ? null : ms;
}

/** When a run was created, read from its id (YYYYMMDDTHHMMSSZ-xxxxxxxx, UTC), as an ISO string. */
function runIdTime(runId) {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z-/.exec(runId || "");
  return m ? `${m[1]}-${m[2]}-${m[3]}T${m[4]}:${m[5]}:${m[6]}Z` : null;
}

/** A <time> element showing the local date and time, the ISO value in datetime and title. */
function timeEl(iso) {
  const ms = parseTime(iso);
  if (ms === null) return document.createTextNode("—");
  return el("time", { datetime: iso, title: iso }, dateFormat.format(new Date(ms)));
}

function fmtDuration(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms) || ms < 0) return "—";
  const seconds = ms / 1000;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.floor(seconds % 60)} s`;
  const hours = Math.floor(minutes / 60);
  if (hours < 24) return `${hours} h ${minutes % 60} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

function fmtRate(value, unit) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "—";
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${value.toFixed(digits)} ${unit}`;
}

const yesNo = (value) => (value ? "yes" : "no");

function statusSlug(status) {
  return String(status || "unknown").toLowerCase().replace(/[^a-z]+/g, "-").replace(/^-|-$/g, "") || "unknown";
}

function statusBadge(status, attrs = {}) {
  return el("span", { class: `status status-${statusSlug(status)}`, ...attrs }, status || "unknown");
}

function truncate(text, max) {
  const s = String(text);
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

// ---------------------------------------------------------------------------------------------------------------
// The key (session storage only; never local storage, never the URL)

let memoryKey = ""; // when session storage is unavailable
let memorySession = false;
const SESSION_STORAGE = "segmentSyncConsole.signedInSession"; // "1": call the API without a key (Entra ID)

function getKey() {
  try {
    return window.sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return memoryKey;
  }
}

function setKey(key) {
  memoryKey = key;
  try {
    if (key) window.sessionStorage.setItem(KEY_STORAGE, key);
    else window.sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: kept in memory for this page only */
  }
}

/** Whether the operator chose to call the API without a key (Entra ID: the platform's signed-in session). */
function usesSession() {
  try {
    return window.sessionStorage.getItem(SESSION_STORAGE) === "1";
  } catch {
    return memorySession;
  }
}

function setUsesSession(on) {
  memorySession = on;
  try {
    if (on) window.sessionStorage.setItem(SESSION_STORAGE, "1");
    else window.sessionStorage.removeItem(SESSION_STORAGE);
  } catch {
    /* storage disabled */
  }
}

/** The API is called only with a key, or once the operator said the app signs them in (Entra ID): a page that
 * called it before would only collect a 401. */
const canCallApi = () => Boolean(getKey()) || usesSession();

function showKeyState(errorText = "") {
  const signedIn = Boolean(getKey()) || usesSession();
  const form = $("#key-form");
  const error = $("#key-error");
  form.hidden = signedIn && !errorText;
  $("#key-state").hidden = !signedIn || Boolean(errorText);
  $("#key-state-text").textContent = getKey() ? "A function key is kept for this tab."
    : "Calling the API as the signed-in user (Entra ID).";
  $("#forget-key").textContent = getKey() ? "Forget key" : "Use a key instead";
  error.textContent = errorText;
  error.hidden = !errorText;
}

/** The key form; `changed` re-renders the page once the key (or the choice of a session) changes. */
function initKeyPanel(changed) {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("#key-input");
    const key = input.value.trim();
    input.value = "";
    if (!key) {
      showKeyState("Enter a function key (or leave it empty when Entra ID signs you in).");
      input.focus();
      return;
    }
    if (!/^[\x21-\x7e]+$/.test(key)) {
      showKeyState("A function key holds printable ASCII characters only.");
      input.focus();
      return;
    }
    setKey(key);
    setUsesSession(false);
    showKeyState();
    setMessage("Key saved for this tab.");
    changed();
  });
  $("#forget-key").addEventListener("click", () => {
    setKey("");
    setUsesSession(false);
    showKeyState();
    changed(); // drops the page shown with the key
    setMessage("Key forgotten. Enter a key to call the API again.");
    $("#key-input").focus();
  });
  $("#no-key").addEventListener("click", () => {
    setKey("");
    setUsesSession(true);
    showKeyState();
    setMessage("Calling the API without a key, as the signed-in user.");
    changed();
  });
  showKeyState();
}

// ---------------------------------------------------------------------------------------------------------------
// Messages (#message is the polite live region)

function setMessage(text, kind = "info", ...extra) {
  const box = $("#message");
  box.className = `message message-${kind}`;
  fill(box);
  if (text) append(box, [el("span", {}, text), ...extra.map((node) => [" ", node])]);
}

function clearMessage() {
  setMessage("");
}

class ApiError extends Error {
  constructor(status, message, data) {
    super(message);
    this.status = status;
    this.data = data;
  }
}

function showError(error, doing) {
  if (!(error instanceof ApiError)) {
    setMessage(`${doing} failed: ${error && error.message ? error.message : error}`, "error");
    return;
  }
  if (error.status === 401) return; // the key form says it (api() showed it)
  const prefix = error.status === 403 ? `${doing} is not allowed (403)`
    : error.status === 0 ? `${doing} failed` : `${doing} failed (${error.status})`;
  setMessage(`${prefix}: ${error.message}`, "error");
}

// ---------------------------------------------------------------------------------------------------------------
// The API

/** The API's base path, from where the console is served: /api/console/... -> /api/ */
function apiBase() {
  const path = window.location.pathname;
  const at = path.lastIndexOf("/console");
  return at >= 0 ? `${path.slice(0, at)}/` : "/api/";
}

let unauthorized = () => {};
/** What the page does besides asking for a key when the API answers 401 (app.js stops its polling). */
function onUnauthorized(handler) {
  unauthorized = handler;
}

const SIGN_IN = "/.auth/login/aad?post_login_redirect_uri=";

/** The platform's sign-in (Entra ID), coming back to this console page. */
function signInLink() {
  const back = window.location.pathname + window.location.hash;
  return el("a", { href: SIGN_IN + enc(back), id: "sign-in" }, "Sign in with Entra ID");
}

/** One call to the API: { status, data } or an ApiError. A body goes as JSON; `headers` adds to the request's. */
async function api(method, path, body, extraHeaders = {}) {
  const headers = { Accept: "application/json", "X-Requested-With": "console", ...extraHeaders };
  const key = getKey();
  if (key) headers["x-functions-key"] = key;
  const init = { method, headers, credentials: "same-origin", cache: "no-store", redirect: "error" };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body || {});
  }
  let response;
  try {
    response = await fetch(apiBase() + path, init);
  } catch (error) {
    throw new ApiError(0, `the API did not answer (${error && error.message ? error.message : "network error"})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (response.ok) return { status: response.status, data: data || {} };
  const serverMessage = data && typeof data.error === "string" ? data.error : "";
  if (response.status === 401) signedOut(serverMessage);
  throw new ApiError(response.status, serverMessage || `HTTP ${response.status} ${response.statusText}`.trim(), data);
}

function signedOut(serverMessage) {
  unauthorized();
  forgetRoles();
  if (usesSession()) { // Entra ID: the platform's session is missing or has expired
    setUsesSession(false);
    showKeyState();
    setMessage(`Not signed in (401): ${serverMessage || "the session is missing or has expired"}.`, "error",
      signInLink(), " or enter a function key above.");
    return;
  }
  const why = serverMessage || (getKey() ? "the key was refused" : "a function key is needed");
  setKey(""); // a refused key is not kept: the next page asks again
  showKeyState(`The API answered 401: ${why}. Enter a function key.`);
  setMessage(`Not signed in (401): ${why}. Enter a function key above.`, "error");
  $("#key-input").focus();
}

// ---------------------------------------------------------------------------------------------------------------
// Roles: what the server says the caller may do (GET /api/me). The page only hides what the server would refuse;
// the server checks every call.

const READER = "Exports.Reader";
const OPERATOR = "Exports.Operator";
const ADMIN = "Exports.Admin";
let me = null; // { authentication, roles, principalId } once read

async function loadRoles() {
  if (me === null) me = (await api("GET", "me")).data;
  return me;
}

function forgetRoles() {
  me = null;
}

/** Whether the caller holds `role` (the server expands Admin to Operator and Reader). */
const may = (role) => Boolean(me && Array.isArray(me.roles) && me.roles.includes(role));

// ---------------------------------------------------------------------------------------------------------------
// Pages

let generation = 0; // bumped on every navigation: answers for an older page are dropped
const nextGeneration = () => ++generation;
const currentGeneration = () => generation;
const current = (gen) => gen === generation;

function pageHeading(text, ...extra) {
  document.title = `${text} · Segment sync console`;
  return el("h1", { id: "page-title", tabindex: "-1" }, text, ...extra);
}

/** GET `path` for the page of generation `gen`: its data, or null when the page has moved on or the call failed
 * (then `holder` says the `what` could not be read, and the message line says why). */
async function load(gen, holder, path, what, doing = `Reading the ${what}`) {
  try {
    const { data } = await api("GET", path);
    return current(gen) ? data : null;
  } catch (error) {
    if (!current(gen)) return null;
    fill(holder, el("p", { class: "empty" }, `The ${what} could not be read.`));
    showError(error, doing);
    return null;
  }
}

/** The roles line of the header: what the server grants this caller. */
function rolesState() {
  if (!me) return "";
  const roles = Array.isArray(me.roles) ? me.roles : [];
  const top = [ADMIN, OPERATOR, READER].find((role) => roles.includes(role));
  const how = me.authentication === "key" ? "function key" : "signed in";
  if (!top) return `${how}: no role (ask an admin for Exports.Reader, Exports.Operator or Exports.Admin)`;
  return `${how}: ${top.replace("Exports.", "")}`;
}

export {
  $, ADMIN, api, ApiError, append, canCallApi, clearMessage, current, currentGeneration, el, enc, fill, fmtDuration,
  fmtNumber, fmtRate, forgetRoles, initKeyPanel, labelFormat, link, load, loadRoles, may, nextGeneration,
  onUnauthorized, OPERATOR, pageHeading, parseTime, READER, rolesState, runIdTime, setMessage, showError,
  showKeyState, signInLink, statusBadge, statusSlug, svgEl, timeEl, truncate, usesSession, yesNo,
};
