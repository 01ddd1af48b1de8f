/*
 * #/exports/new and #/exports/<name>/edit: an export by form (Admin). The segment is picked from the segments found
 * in the source container, the field mapping from the newest snapshot's own columns. Saving sends the export to
 * the server, which runs the definitions check on the whole document and writes it only if nobody changed it
 * since this page read it (ETag); the check's messages appear beside the fields at fault.
 */

import { api, current, el, link, setMessage } from "./common.js";
import {
  checkbox, field, itemAt, numberInput, openItem, saveItem, select, setOptions, textInput, valueOf,
} from "./forms.js";

// The standard fields and custom types offered are the definitions check's own (GET /api/definitions answers
// them as `vocabulary`): the form keeps no copy to fall out of step with it.
const MAIN_FIELDS = ["Email", "FirstName", "LastName"];
const NOT_MAPPED = ["", "— not mapped —"];
const PERMISSIONS = [["ortto-default", "Ortto's default (subscribed)"], ["false", "not subscribed"],
  ["column", "from a consent column"]];

async function renderExportForm(main, gen, name) {
  const opened = await openItem(main, gen, { list: "exports", noun: "export", name, extra: () => api("GET", "connections"),
    blank: { enabled: false, source: { connection: "EXPORT_STORAGE" }, destination: { membership: "list",
      onLeave: "remove" }, fields: {} } });
  if (!opened) return;
  const { definitions, index, item, more: { data: connections } } = opened;
  const platforms = new Map((connections.connections || []).map((c) => [c.name, c.platform]));
  const form = new ExportForm(item, Boolean(name), platforms, definitions.vocabulary);
  main.append(form.node);
  form.node.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = form.body();
    const target = body.name || name;
    const saved = await saveItem(form.node, "exports", target, body, definitions.etag, itemAt("exports", index));
    if (!saved || !current(gen)) return;
    setMessage(`Export ${target} saved${body.enabled ? "" : " (not enabled: the timer leaves it alone)"}.`, "success");
    window.location.hash = "#/exports";
  });
  if (item.source && item.source.container) form.findSegments(true);
}

const sub = (item, key) => (item && typeof item[key] === "object" && item[key] !== null ? item[key] : {});

class ExportForm {
  constructor(item, editing, platforms, { standardFields, customTypes }) {
    this.item = item;
    this.platforms = platforms;
    this.customTypes = customTypes;
    this.columns = [];
    const source = sub(item, "source");
    const dest = sub(item, "destination");
    const permission = sub(dest, "newPeople").emailPermission;
    this.segment = select([["", "— find the segments first —"]], source.segment || "", { required: true });
    this.status = el("p", { id: "source-status", class: "hint", "aria-live": "polite" });
    const find = el("button", { type: "button", id: "find-segments" }, "Find segments");
    find.addEventListener("click", () => this.findSegments(false));
    this.segment.addEventListener("change", () => this.loadColumns());
    this.connection = select([...platforms.keys()], dest.connection || "default");
    this.connection.addEventListener("change", () => this.showPlatform());
    this.membership = select([["list", "a list"], ["field", "a boolean field"]], dest.membership || "list");
    this.membership.addEventListener("change", () => this.showMembership());
    this.permission = select(PERMISSIONS, permission === false ? "false" : permission && permission.column ? "column"
      : "ortto-default");
    this.permission.addEventListener("change", () => this.showPlatform());
    this.permissionColumn = select([NOT_MAPPED], permission && permission.column ? permission.column : "");
    this.mapped = new Map(standardFields.map((key) => [key, select([NOT_MAPPED], sub(item, "fields")[key] || "")]));
    this.customBody = el("div", { id: "custom-fields" });
    this.customCount = 0;
    const addCustom = el("button", { type: "button", id: "add-custom-field" }, "Add a custom field");
    addCustom.addEventListener("click", () => this.addCustom({}, true));
    this.node = el("form", { id: "export-form", class: "definition-form", novalidate: true },
      el("div", { class: "form-problems error-box", tabindex: "-1", hidden: true }),
      this.section("The export",
        field("name", "Name", textInput(item.name, { readonly: editing, required: true }),
          "Lower-case letters, digits and hyphens: it appears in URLs and in the run history."),
        field("enabled", "Enabled: the timer and Event Grid start its runs", checkbox(item.enabled !== false)),
        field("dataTransferAcknowledged", "Data transfer acknowledged",
          checkbox(item.dataTransferAcknowledged === true),
          "Sending profiles to the destination moves customer data outside the Customer Insights compliance " +
          "boundary: tick this once your Customer Insights admin has agreed to it. Until then runs are refused.")),
      this.section("Source: the Customer Insights export",
        field("source.connection", "Storage connection (app setting)", textInput(source.connection || "EXPORT_STORAGE"),
          "The app setting naming the storage account Customer Insights writes to."),
        field("source.container", "Container", textInput(source.container, { required: true })),
        field("source.prefix", "Folder prefix (optional)", textInput(source.prefix)),
        el("div", { class: "button-row" }, find), this.status,
        field("source.segment", "Segment", this.segment, "The segments found in the container's model.json files.")),
      this.section("Destination",
        field("destination.connection", "Connection", this.connection),
        field("destination.membership", "Membership kept as", this.membership),
        field("destination.list", "List name", textInput(dest.list), "Created when missing."),
        field("destination.field", "Boolean field name", textInput(dest.field)),
        field("destination.onLeave", "People who leave the segment",
          select([["remove", "are removed from the list (or the field set false)"], ["keep", "are kept"]],
            dest.onLeave || "remove")),
        field("destination.newPeople.emailPermission", "New people's email permission (Ortto)", this.permission,
          "Existing people keep theirs."),
        field("destination.newPeople.emailPermission.column", "Consent column", this.permissionColumn)),
      this.section("Fields: which column fills each one",
        ...MAIN_FIELDS.map((key) => field(`fields.${key}`, key === "Email" ? "Email (required)" : key,
          this.mapped.get(key))),
        el("details", { id: "other-fields" }, el("summary", {}, "Other standard fields"),
          standardFields.filter((key) => !MAIN_FIELDS.includes(key))
            .map((key) => field(`fields.${key}`, key, this.mapped.get(key))))),
      this.section("Custom fields", this.customBody, el("div", { class: "button-row" }, addCustom)),
      this.section("Limits",
        field("maxProfiles", "Most profiles a snapshot may hold", numberInput(item.maxProfiles, { min: "1", step: "1" }),
          "A bigger snapshot fails its run before anything is sent. Empty: 100,000."),
        field("maxRemovalPercent", "Removal guard: most members one run may remove (%)",
          numberInput(item.maxRemovalPercent, { min: "0", max: "100", step: "any" }),
          "A run removing more stops before sending, unless forced. Empty: 20."),
        field("phoneRegion", "Phone region (Ortto, optional)", textInput(item.phoneRegion))),
      el("div", { class: "button-row" }, el("button", { type: "submit", id: "save-export" }, "Save export"),
        link("#/exports", "Cancel", { class: "button-link" })));
    for (const custom of Array.isArray(item.customFields) ? item.customFields : []) this.addCustom(custom, false);
    this.showMembership();
    this.showPlatform();
  }

  section(title, ...children) {
    return el("fieldset", { class: "form-section" }, el("legend", {}, title), children);
  }

  showMembership() {
    const list = this.membership.value === "list";
    this.node.querySelector('[data-path="destination.list"]').hidden = !list;
    this.node.querySelector('[data-path="destination.field"]').hidden = list;
  }

  showPlatform() {
    const ortto = this.platforms.get(this.connection.value) === "ortto";
    for (const path of ["destination.newPeople.emailPermission", "phoneRegion"]) {
      this.node.querySelector(`[data-path="${path}"]`).hidden = !ortto;
    }
    this.node.querySelector('[data-path="destination.newPeople.emailPermission.column"]').hidden =
      !ortto || this.permission.value !== "column";
  }

  addCustom(custom, focus) {
    const i = this.customCount++;
    const path = `customFields[${i}]`;
    const name = textInput(custom.name);
    const row = el("div", { class: "custom-row", "data-custom": String(i) },
      field(`${path}.name`, "Name", name),
      field(`${path}.type`, "Type", select(this.customTypes, custom.type || "string")),
      field(`${path}.column`, "Column", select([NOT_MAPPED, ...this.columns], custom.column || "")));
    const remove = el("button", { type: "button", class: "danger", "aria-label": `Remove custom field ${i + 1}` },
      "Remove");
    remove.addEventListener("click", () => {
      row.remove();
      this.renumberCustom();
    });
    row.append(remove);
    this.customBody.append(row);
    if (focus) name.focus();
  }

  /** Custom field rows keep paths customFields[0..n-1] in page order, as the saved list will have them. */
  renumberCustom() {
    [...this.customBody.querySelectorAll(".custom-row")].forEach((row, i) => {
      for (const node of row.querySelectorAll("[data-field], [data-error-for], [data-path]")) {
        for (const attr of ["data-field", "data-error-for", "data-path"]) {
          const value = node.getAttribute(attr);
          if (value) node.setAttribute(attr, value.replace(/^customFields\[\d+\]/, `customFields[${i}]`));
        }
      }
    });
  }

  sourceQuery() {
    const query = new URLSearchParams({ connection: valueOf(this.node, "source.connection") || "EXPORT_STORAGE",
      container: valueOf(this.node, "source.container"), prefix: valueOf(this.node, "source.prefix") });
    return query;
  }

  async findSegments(quiet) {
    this.status.textContent = "Looking for segments…";
    try {
      const { data } = await api("GET", `sources/segments?${this.sourceQuery()}`);
      const segments = Array.isArray(data.segments) ? data.segments.map((s) => s.name) : [];
      setOptions(this.segment, [["", "— pick a segment —"], ...segments], this.segment.value || "",
        "(not in the container)");
      this.status.textContent = segments.length ? `${segments.length} segment${segments.length === 1 ? "" : "s"} found.`
        : "No segment found there: check the container and prefix.";
      if (this.segment.value) await this.loadColumns();
    } catch (error) {
      this.status.textContent = `The segments could not be read: ${error.message}`;
      if (!quiet) this.segment.focus();
    }
  }

  async loadColumns() {
    const segment = this.segment.value;
    if (!segment) return;
    const query = this.sourceQuery();
    query.set("segment", segment);
    try {
      const { data } = await api("GET", `sources/columns?${query}`);
      this.columns = Array.isArray(data.columns) ? data.columns.map((c) => c.name) : [];
      const suggested = data.suggested || {};
      for (const [key, control] of this.mapped) {
        const value = control.value || (!this.item.name ? suggested[key] || "" : "");
        setOptions(control, [NOT_MAPPED, ...this.columns], value, "(not in the newest snapshot)");
      }
      for (const control of this.node.querySelectorAll('[data-field$=".column"]')) {
        setOptions(control, [NOT_MAPPED, ...this.columns], control.value, "(not in the newest snapshot)");
      }
      this.status.textContent = `${this.columns.length} columns in the newest snapshot of ${segment}.`;
    } catch (error) {
      this.status.textContent = `The columns of ${segment} could not be read: ${error.message}`;
    }
  }

  /** The export as the document writes it: the item's other keys kept, empty optional values left out. */
  body() {
    const v = (path) => valueOf(this.node, path);
    const body = { ...this.item, name: v("name"), enabled: v("enabled"), dataTransferAcknowledged: v("dataTransferAcknowledged") };
    const source = { ...sub(this.item, "source"), connection: v("source.connection"), container: v("source.container"),
      prefix: v("source.prefix"), segment: v("source.segment") };
    body.source = source;
    const dest = { ...sub(this.item, "destination"), connection: v("destination.connection"),
      membership: v("destination.membership"), onLeave: v("destination.onLeave") };
    const other = dest.membership === "list" ? "field" : "list";
    dest[dest.membership] = v(`destination.${dest.membership}`);
    delete dest[other];
    const ortto = this.platforms.get(dest.connection) === "ortto";
    const permission = v("destination.newPeople.emailPermission");
    if (ortto && permission === "false") dest.newPeople = { emailPermission: false };
    else if (ortto && permission === "column") {
      dest.newPeople = { emailPermission: { column: v("destination.newPeople.emailPermission.column") } };
    } else delete dest.newPeople;
    body.destination = dest;
    body.fields = Object.fromEntries([...this.mapped].filter(([, c]) => c.value).map(([k, c]) => [k, c.value]));
    body.customFields = [...this.customBody.querySelectorAll(".custom-row")].map((_, i) => ({
      name: v(`customFields[${i}].name`), type: v(`customFields[${i}].type`), column: v(`customFields[${i}].column`),
    }));
    for (const key of ["maxProfiles", "maxRemovalPercent"]) {
      const value = v(key);
      if (value) body[key] = Number(value);
      else delete body[key];
    }
    if (ortto && v("phoneRegion")) body.phoneRegion = v("phoneRegion");
    else delete body.phoneRegion;
    return body;
  }
}

export { renderExportForm };
