/*
 * What the console's two forms (an export, a connection) share: labelled controls that name their place in the
 * definition, the definitions document with its ETag, saving one item, and the definitions check's messages put
 * beside the field at fault. The server checks everything; the form only gathers and shows.
 */

import {
  ADMIN, ApiError, api, append, current, el, enc, fill, link, may, pageHeading, setMessage, showError,
} from "./common.js";

const slug = (path) => `f-${path.replace(/[^A-Za-z0-9]+/g, "-").replace(/-$/, "")}`;

/** A control labelled `label`, with an optional hint and a hidden place for the check's message. `path` is where
 * the value goes in the definition (destination.list); problems name fields by that path. */
function field(path, label, control, hint = "") {
  const id = slug(path);
  control.id = id;
  control.setAttribute("data-field", path);
  const hintEl = hint ? el("p", { class: "hint", id: `${id}-hint` }, hint) : null;
  const error = el("p", { class: "field-error", id: `${id}-error`, "data-error-for": path, hidden: true });
  control.setAttribute("aria-describedby", [hintEl ? hintEl.id : "", error.id].filter(Boolean).join(" "));
  const checkbox = control.type === "checkbox";
  const labelEl = el("label", { for: id }, label);
  return el("div", { class: checkbox ? "field field-check" : "field", "data-path": path },
    checkbox ? [control, labelEl] : [labelEl, control], hintEl, error);
}

function textInput(value, attrs = {}) {
  return el("input", { type: "text", value: value ?? "", autocomplete: "off", spellcheck: "false", ...attrs });
}

function numberInput(value, attrs = {}) {
  return el("input", { type: "number", value: value ?? "", inputmode: "decimal", ...attrs });
}

function checkbox(checked, attrs = {}) {
  return el("input", { type: "checkbox", checked: Boolean(checked), ...attrs });
}

/** A <select> of [value, label] pairs; a current value not among them is kept, marked as such. */
function select(options, value, attrs = {}, missingLabel = "(not offered)") {
  const node = el("select", attrs);
  setOptions(node, options, value, missingLabel);
  return node;
}

function setOptions(node, options, value, missingLabel = "(not offered)") {
  const pairs = options.map((o) => (Array.isArray(o) ? o : [o, o]));
  if (value && !pairs.some(([v]) => v === value)) pairs.push([value, `${value} ${missingLabel}`]);
  fill(node, ...pairs.map(([v, label]) => el("option", { value: v, selected: v === value }, label)));
  node.value = value && pairs.some(([v]) => v === value) ? value : pairs.length ? pairs[0][0] : "";
}

const valueOf = (form, path) => {
  const control = form.querySelector(`[data-field="${CSS.escape(path)}"]`);
  if (!control) return undefined;
  return control.type === "checkbox" ? control.checked : control.value.trim();
};

function clearProblems(form) {
  for (const error of form.querySelectorAll("[data-error-for]")) {
    error.hidden = true;
    error.textContent = "";
  }
  for (const control of form.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
  const summary = form.querySelector(".form-problems");
  if (summary) {
    summary.hidden = true;
    fill(summary);
  }
}

/** The control a problem is about: its own path; else the nearest enclosing one (customFields[0].type inside
 * customFields[0]); else the first control inside the path the problem names ("fields" -> fields.Email). */
function controlFor(form, path) {
  if (!path) return null;
  const controls = [...form.querySelectorAll("[data-field]")];
  const paths = controls.map((c) => c.getAttribute("data-field"));
  let at = paths.indexOf(path);
  if (at < 0) {
    const enclosing = paths.filter((p) => path.startsWith(`${p}.`) || path.startsWith(`${p}[`));
    const longest = enclosing.sort((a, b) => b.length - a.length)[0];
    at = longest ? paths.indexOf(longest) : paths.findIndex((p) => p.startsWith(`${path}.`) || p.startsWith(`${path}[`));
  }
  return at >= 0 ? controls[at] : null;
}

/** Show the definitions check's problems: beside the field at fault when it is this item's (`mine(at)`), else in
 * the form's summary; the first field at fault gets the focus. */
function showProblems(form, problems, mine) {
  clearProblems(form);
  const rest = [];
  let first = null;
  for (const problem of problems) {
    const control = mine(problem.at || "") ? controlFor(form, problem.field || "") : null;
    if (!control) {
      rest.push(`${problem.at ? `${problem.at}: ` : ""}${problem.field ? `${problem.field} ` : ""}${problem.message}`);
      continue;
    }
    const error = form.querySelector(`[data-error-for="${CSS.escape(control.getAttribute("data-field"))}"]`);
    const own = control.getAttribute("data-field") === problem.field;
    const text = own || !problem.field ? problem.message : `${problem.field} ${problem.message}`;
    error.textContent = error.textContent ? `${error.textContent} ${text}` : text;
    error.hidden = false;
    control.setAttribute("aria-invalid", "true");
    first = first || control;
  }
  const summary = form.querySelector(".form-problems");
  if (summary && rest.length) {
    fill(summary, el("p", {}, "The definitions check also says:"), el("ul", {}, rest.map((t) => el("li", {}, t))));
    summary.hidden = false;
  }
  (first || summary || form).focus();
}

/** The definitions document as stored, with its ETag (GET /api/definitions). */
async function loadDefinitions() {
  const { data } = await api("GET", "definitions");
  const document = data.document && typeof data.document === "object" ? data.document : {};
  return { ...data, document };
}

/** Save one item of the definitions (PUT): only if nobody changed them since `etag` was read. Answers the
 * server's data; 422 shows the problems beside the fields, 409 says someone else saved meanwhile. */
async function saveItem(form, kind, name, body, etag, mine) {
  const condition = etag ? { "If-Match": etag } : { "If-None-Match": "*" };
  clearProblems(form);
  try {
    const { data } = await api("PUT", `definitions/${kind}/${enc(name)}`, body, condition);
    return data;
  } catch (error) {
    if (error instanceof ApiError && error.status === 422 && error.data && Array.isArray(error.data.problems)) {
      setMessage(`Not saved: the definitions check found ${error.data.problems.length} problem` +
        `${error.data.problems.length === 1 ? "" : "s"} (shown beside the fields).`, "error");
      showProblems(form, error.data.problems, mine);
    } else if (error instanceof ApiError && error.status === 409) {
      setMessage(`Not saved (409): ${error.message} Nothing was overwritten: reload the page to see the other ` +
        "change, then make yours again.", "error");
    } else {
      showError(error, `Saving ${name}`);
    }
    return null;
  }
}

/** Open the item an Admin's form edits (`list`: "exports" or "connections"; `name` "" for a new one): the page's
 * heading, then the definitions with their ETag, and `extra()`'s answer if given. Null, with the reason on the
 * page, when the caller may not edit, the definitions cannot be edited here, or no item has that name. */
async function openItem(main, gen, { list, noun, name, blank, extra = async () => null }) {
  append(main, pageHeading(name ? `Edit ${noun} ${name}` : `Add ${/^[aeiou]/.test(noun) ? "an" : "a"} ${noun}`),
    el("p", { class: "lead" }, link(`#/${list}`, `All ${list}`)));
  const refuse = (text) => {
    append(main, el("p", { class: "error-box" }, text));
    return null;
  };
  if (!may(ADMIN)) return refuse(`Changing ${list} needs the Exports.Admin role.`);
  let definitions;
  let more;
  try {
    [definitions, more] = await Promise.all([loadDefinitions(), extra()]);
  } catch (error) {
    if (current(gen)) showError(error, "Reading the definitions");
    return null;
  }
  if (!current(gen)) return null;
  if (!definitions.editable) {
    return refuse(`The definitions live in ${definitions.source}, which the console cannot change: edit them there.`);
  }
  const items = Array.isArray(definitions.document[list]) ? definitions.document[list] : [];
  const index = name ? items.findIndex((item) => item && item.name === name) : items.length;
  if (index < 0) return refuse(`No ${noun} named ${name} in the definitions.`);
  return { definitions, index, item: name ? items[index] : blank, more };
}

/** Whether a problem's `at` ("exports[2] \"news\"", "connections[0]") is about the item at `index` of `list`. */
function itemAt(list, index) {
  const prefix = `${list}[${index}]`;
  return (at) => at === prefix || at.startsWith(`${prefix} `);
}

export {
  checkbox, clearProblems, field, itemAt, loadDefinitions, numberInput, openItem, saveItem, select, setOptions,
  showProblems, textInput, valueOf,
};
