/*
 * #/connections: each destination connection, whether its key can be read, and a Test that makes one harmless
 * read call. #/connections/new and #/connections/<name>/edit: an Admin's form. Keys are never shown or typed
 * here: the page says how to put one in Key Vault.
 */

import {
  ADMIN, api, append, current, el, enc, fill, fmtNumber, link, load, may, OPERATOR, pageHeading, setMessage,
  showError,
} from "./common.js";
import {
  field, itemAt, numberInput, openItem, saveItem, select, textInput, valueOf,
} from "./forms.js";

const OUTCOMES = {
  accepted: "key accepted",
  refused: "key refused",
  throttled: "throttled (the account's rate is spent: try again shortly)",
  unreachable: "unreachable",
  "no-key": "no key: Key Vault holds no readable secret of that name",
};

async function renderConnections(main, gen) {
  append(main, [
    pageHeading("Connections"),
    el("p", { class: "lead" }, "The destination accounts the exports send to. Test makes one harmless read call " +
      "with the connection's key and shows the answer."),
    may(ADMIN) ? el("p", {}, link("#/connections/new", "Add a connection", { id: "add-connection", class: "button-link" }))
      : null,
  ]);
  const holder = el("div", { class: "table-wrap" }, el("p", { class: "loading" }, "Loading connections…"));
  const help = el("p", { id: "key-help", class: "hint" });
  append(main, [holder, help]);
  const data = await load(gen, holder, "connections", "connections");
  if (!data) return;
  const connections = Array.isArray(data.connections) ? data.connections : [];
  const body = el("tbody", {}, connections.map(connectionRow));
  fill(holder, el("table", { id: "connections-table", class: "data-table" },
    el("caption", {}, `Connections (${connections.length})`),
    el("thead", {}, el("tr", {}, ["Connection", "Platform", "Region", "Rate", "Key", "Used by", "Test", ""]
      .map((h) => el("th", { scope: "col" }, h)))),
    body));
  help.textContent = data.keyHelp || "";
}

function describeRate(item) {
  const rate = typeof item.requestsPerSecond === "number" ? `${fmtNumber(item.requestsPerSecond)} requests/s` : "—";
  return item.plan ? `${rate} (plan ${item.plan})` : rate;
}

function connectionRow(item) {
  const name = String(item.name || "");
  const row = el("tr", { "data-connection": name });
  row.append(el("th", { scope: "row" }, name,
    item.fromAppSettings ? el("span", { class: "line sub" }, "from the app settings") : null));
  row.append(el("td", {}, item.platform || "—"), el("td", {}, item.region || "—"), el("td", {}, describeRate(item)));
  const key = el("td", { "data-field": "key" }, item.keyReadable ? "readable" : el("strong", { class: "warn" }, "not readable"),
    el("span", { class: "line sub" }, `secret ${item.secretName || "—"}`),
    item.keyProblem ? el("span", { class: "line sub error-text" }, item.keyProblem) : null);
  row.append(key);
  const exports = Array.isArray(item.exports) ? item.exports : [];
  row.append(el("td", {}, exports.length ? exports.join(", ") : "no export"));
  const result = el("div", { "data-field": "test-result", "aria-live": "polite" });
  if (may(OPERATOR)) {
    const test = el("button", { type: "button", "data-action": "test", "aria-label": `Test ${name}` }, "Test");
    test.addEventListener("click", () => testConnection(name, test, result));
    row.append(el("td", {}, test, result));
  } else {
    row.append(el("td", {}, result));
  }
  const edit = may(ADMIN) && !item.fromAppSettings
    ? link(`#/connections/${enc(name)}/edit`, "Edit", { class: "button-link", "data-action": "edit",
      "aria-label": `Edit ${name}` }) : null;
  row.append(el("td", {}, edit));
  return row;
}

async function testConnection(name, button, result) {
  button.disabled = true;
  result.textContent = "testing…";
  try {
    const { data } = await api("POST", `connections/${enc(name)}/test`);
    const outcome = OUTCOMES[data.outcome] || String(data.outcome);
    result.setAttribute("data-outcome", String(data.outcome));
    fill(result, el("strong", {}, outcome),
      el("span", { class: "line sub" }, [data.call, data.status ? `answered ${data.status}` : "",
        typeof data.elapsedMs === "number" ? `in ${fmtNumber(data.elapsedMs)} ms` : ""].filter(Boolean).join(" ")),
      data.detail ? el("span", { class: "line sub" }, String(data.detail)) : null);
  } catch (error) {
    result.textContent = "";
    showError(error, `Testing ${name}`);
  } finally {
    if (button.isConnected) button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// #/connections/new, #/connections/<name>/edit

const PLATFORMS = [["autopilot", "Autopilot"], ["ortto", "Ortto"]];
const REGIONS = [["", "— (Autopilot)"], ["us", "us"], ["eu", "eu"], ["au", "au"]];
const PLANS = [["", "— (Autopilot, or give a rate)"], ["free", "free (1/s)"], ["campaigns", "campaigns (5/s)"],
  ["professional", "professional (10/s)"], ["business", "business (30/s)"]];

async function renderConnectionForm(main, gen, name) {
  const opened = await openItem(main, gen, { list: "connections", noun: "connection", name, blank: {} });
  if (!opened) return;
  const { definitions, index, item } = opened;
  const form = connectionForm(item, Boolean(name));
  main.append(form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = connectionBody(form, item);
    const target = body.name || name;
    const saved = await saveItem(form, "connections", target, body, definitions.etag, itemAt("connections", index));
    if (!saved || !current(gen)) return;
    setMessage(`Connection ${target} saved.`, "success");
    window.location.hash = "#/connections";
  });
}

function connectionForm(item, editing) {
  return el("form", { id: "connection-form", class: "definition-form", novalidate: true },
    el("div", { class: "form-problems error-box", tabindex: "-1", hidden: true }),
    field("name", "Name", textInput(item.name, { readonly: editing, required: true }),
      "Lower-case letters, digits and hyphens; exports name it as destination.connection."),
    field("platform", "Platform", select(PLATFORMS, item.platform || "autopilot")),
    field("region", "Region (Ortto)", select(REGIONS, item.region || "")),
    field("plan", "Plan (Ortto)", select(PLANS, item.plan || ""), "Sets the request rate from Ortto's plan."),
    field("requestsPerSecond", "Requests per second", numberInput(item.requestsPerSecond, { min: "0", step: "any" }),
      "The account's rate: Autopilot allows 5/s unless raised on request. Empty: the plan's, or the default."),
    field("secretName", "Key Vault secret holding the key", textInput(item.secretName, { required: true }),
      "The key itself never goes through this page: put it in Key Vault (see the connections page)."),
    field("baseUrl", "API base URL (optional)", textInput(item.baseUrl, { inputmode: "url" }),
      "Empty: the platform's (and region's) own. Another host only if app setting ALLOWED_API_HOSTS lists it "
      + "(the key goes there)."),
    field("phoneRegion", "Phone region (Ortto, optional)", textInput(item.phoneRegion),
      "Two-letter country code for phone numbers written without one."),
    el("div", { class: "button-row" }, el("button", { type: "submit", id: "save-connection" }, "Save connection"),
      link("#/connections", "Cancel", { class: "button-link" })));
}

/** The connection as the document writes it: the item's other keys kept, empty optional values left out. */
function connectionBody(form, item) {
  const body = { ...item };
  for (const key of ["name", "platform", "region", "plan", "secretName", "baseUrl", "phoneRegion"]) {
    const value = valueOf(form, key);
    if (value) body[key] = value;
    else delete body[key];
  }
  const rate = valueOf(form, "requestsPerSecond");
  if (rate) body.requestsPerSecond = Number(rate);
  else delete body.requestsPerSecond;
  return body;
}

export { renderConnectionForm, renderConnections };
