// The MLaaS Hub admin page: profiles, quotas, history and usage over the service's REST API.
"use strict";

const api = async (method, path, body) => {
  const response = await fetch(`${window.mlaas.prefix}api/${path}`, {
    method,
    headers: { "Content-Type": "application/json", "X-XSRFToken": window.mlaas.xsrf },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = { message: response.statusText }; }
  return { status: response.status, ok: response.ok, data };
};

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
};

const message = (text, ok) => {
  const box = document.getElementById("message");
  box.textContent = text;
  box.className = ok ? "ok" : "bad";
};

const show = (name) => {
  document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === `panel-${name}`));
  ({ profiles: loadProfiles, quotas: loadQuotas, history: loadHistory, usage: loadUsage })[name]();
};

// --- forms ----------------------------------------------------------------------------------
const clearErrors = (form) => form.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });

const showErrors = (form, errors) => {
  clearErrors(form);
  for (const err of errors) {
    const parts = err.field ? err.field.split(".") : [];
    let box = null;
    for (let n = parts.length; n >= 0 && !box; n--) {
      box = form.querySelector(`.error[data-error="${parts.slice(0, n).join(".")}"]`);
    }
    const rest = parts.length > 1 ? `${parts.slice(1).join(".")}: ` : "";
    box.textContent = (box.textContent ? box.textContent + " " : "") + rest + err.message;
  }
};

const fillFiles = (form, files, kind) => {
  const select = form.querySelector("select[name=file]");
  select.innerHTML = "";
  const fallback = `${kind}.yaml`;
  const names = files.includes(fallback) ? files : [...files, fallback];
  for (const f of names) select.append(el("option", { value: f }, f));
};

const text = (form, name) => form.querySelector(`[name="${name}"]`).value.trim();
const setText = (form, name, value) => { form.querySelector(`[name="${name}"]`).value = value ?? ""; };
const number = (s) => (s === "" ? undefined : (isNaN(Number(s)) ? s : Number(s)));

// --- profiles ---------------------------------------------------------------------------------
let profiles = [];
let editing = null; // {kind, key, version, item} or {kind, key: null} for a new item

const resources = (p) => {
  const parts = [`${p.cpu?.limit ?? "?"} CPU`, `${p.memory?.limit ?? "?"}`];
  if (p.gpu) parts.push(`${p.gpu.count ?? 1} GPU${p.gpu.model ? " " + p.gpu.model : ""}`);
  if (p.mig) parts.push(typeof p.mig === "string" ? `MIG ${p.mig}` : `${p.mig.count ?? 1}× MIG ${p.mig.profile}`);
  return parts.join(", ");
};

async function loadProfiles() {
  const r = await api("GET", "profiles");
  if (!r.ok) return message(r.data.message, false);
  profiles = r.data.profiles;
  fillFiles(document.getElementById("profile-form"), r.data.files, "profiles");
  const body = document.querySelector("#profiles-table tbody");
  body.innerHTML = "";
  for (const entry of profiles) {
    const p = entry.item;
    const enabled = p.enabled !== false;
    body.append(
      el("tr", { class: enabled ? "" : "disabled", "data-slug": entry.key },
        el("td", {}, el("code", {}, entry.key)),
        el("td", {}, p.display_name, p.default ? " (default)" : ""),
        el("td", {}, resources(p)),
        el("td", {}, (p.groups || []).join(", ")),
        el("td", {}, entry.file),
        el("td", {}, enabled ? "enabled" : "disabled"),
        el("td", {},
          el("button", { type: "button", class: "edit", onclick: () => editProfile(entry) }, "Edit"), " ",
          el("button", { type: "button", class: "toggle", onclick: () => toggleProfile(entry, !enabled) }, enabled ? "Disable" : "Enable"), " ",
          el("button", { type: "button", class: "delete", onclick: () => deleteItem("profiles", entry) }, "Delete"))));
  }
}

function editProfile(entry) {
  const form = document.getElementById("profile-form");
  clearErrors(form);
  editing = entry ? { kind: "profiles", key: entry.key, version: entry.version, item: entry.item } : { kind: "profiles", key: null, item: {} };
  const p = editing.item;
  document.getElementById("profile-form-title").textContent = entry ? `Edit profile ${entry.key}` : "New profile";
  setText(form, "slug", p.slug);
  form.querySelector("[name=slug]").readOnly = Boolean(entry);
  setText(form, "display_name", p.display_name);
  setText(form, "description", p.description);
  setText(form, "cpu.guarantee", p.cpu?.guarantee);
  setText(form, "cpu.limit", p.cpu?.limit);
  setText(form, "memory.guarantee", p.memory?.guarantee);
  setText(form, "memory.limit", p.memory?.limit);
  setText(form, "gpu.count", p.gpu?.count ?? (p.gpu ? 1 : ""));
  setText(form, "gpu.model", p.gpu?.model);
  const mig = typeof p.mig === "string" ? { profile: p.mig } : p.mig;
  setText(form, "mig.profile", mig?.profile);
  setText(form, "mig.count", mig?.count);
  setText(form, "groups", (p.groups || []).join(", "));
  setText(form, "node_pool", p.node_pool);
  setText(form, "sites", (p.sites || []).join(", "));
  setText(form, "image", p.image);
  setText(form, "env", Object.entries(p.env || {}).map(([k, v]) => `${k}=${v}`).join("\n"));
  form.querySelector("[name=default]").checked = Boolean(p.default);
  form.querySelector("[name=enabled]").checked = p.enabled !== false;
  form.querySelectorAll(".new-only").forEach((n) => { n.hidden = Boolean(entry); });
  form.hidden = false;
  form.scrollIntoView();
}

function profileFromForm(form) {
  const item = { ...editing.item };
  const set = (key, value) => { if (value === undefined || value === "" || value === null) delete item[key]; else item[key] = value; };
  set("slug", text(form, "slug"));
  set("display_name", text(form, "display_name"));
  set("description", text(form, "description"));
  const pair = (a, b) => {
    const out = {};
    if (text(form, a) !== "") out[a.split(".")[1]] = number(text(form, a));
    if (text(form, b) !== "") out[b.split(".")[1]] = number(text(form, b));
    return Object.keys(out).length ? out : undefined;
  };
  set("cpu", pair("cpu.guarantee", "cpu.limit"));
  set("memory", pair("memory.guarantee", "memory.limit"));
  set("gpu", text(form, "gpu.count") === "" && text(form, "gpu.model") === "" ? undefined : pair("gpu.count", "gpu.model"));
  set("mig", text(form, "mig.profile") === "" ? undefined : pair("mig.profile", "mig.count"));
  set("groups", text(form, "groups") === "" ? undefined : text(form, "groups").split(",").map((g) => g.trim()).filter(Boolean));
  set("node_pool", text(form, "node_pool"));
  set("sites", text(form, "sites") === "" ? undefined : text(form, "sites").split(",").map((s) => s.trim()).filter(Boolean));
  set("image", text(form, "image"));
  const env = {};
  for (const line of form.querySelector("[name=env]").value.split("\n")) {
    if (!line.trim()) continue;
    const i = line.indexOf("=");
    env[i < 0 ? line.trim() : line.slice(0, i).trim()] = i < 0 ? "" : line.slice(i + 1);
  }
  set("env", Object.keys(env).length ? env : undefined);
  set("default", form.querySelector("[name=default]").checked ? true : (item.default === undefined ? undefined : false));
  set("enabled", form.querySelector("[name=enabled]").checked ? (item.enabled === undefined ? undefined : true) : false);
  return item;
}

async function save(form, kind, item, reload) {
  const r = editing.key === null
    ? await api("POST", kind, { item, file: text(form, "file") })
    : await api("PUT", `${kind}/${encodeURIComponent(editing.key)}`, { item, version: editing.version });
  if (r.ok) {
    form.hidden = true;
    message(`Saved (change #${r.data.change.id}). It applies to the next server start.`, true);
    await reload();
    return;
  }
  if (r.status === 422) showErrors(form, r.data.errors || []);
  else showErrors(form, [{ field: "", message: r.data.message }]);
  message(r.data.message, false);
}

async function toggleProfile(entry, enabled) {
  const r = await api("PATCH", `profiles/${encodeURIComponent(entry.key)}`, { fields: { enabled }, version: entry.version });
  message(r.ok ? `${entry.key} ${enabled ? "enabled" : "disabled"} (change #${r.data.change.id}).` : r.data.message, r.ok);
  await loadProfiles();
}

async function deleteItem(kind, entry) {
  if (!window.confirm(`Delete ${kind === "profiles" ? "profile" : "the quota of"} ${entry.key}? It can be restored from the history.`)) return;
  const r = await api("DELETE", `${kind}/${encodeURIComponent(entry.key)}?version=${entry.version}`);
  message(r.ok ? `Deleted ${entry.key} (change #${r.data.change.id}).` : r.data.message, r.ok);
  await (kind === "profiles" ? loadProfiles() : loadQuotas());
}

// --- quotas -------------------------------------------------------------------------------------
async function loadQuotas() {
  const r = await api("GET", "quotas");
  if (!r.ok) return message(r.data.message, false);
  fillFiles(document.getElementById("quota-form"), r.data.files, "quotas");
  const body = document.querySelector("#quotas-table tbody");
  body.innerHTML = "";
  for (const entry of r.data.quotas) {
    const q = entry.item;
    body.append(el("tr", { "data-group": entry.key },
      el("td", {}, el("code", {}, entry.key)), el("td", {}, q.gpus ?? "–"),
      el("td", {}, Object.entries(q.mig || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "–"),
      el("td", {}, q.cpu ?? "–"), el("td", {}, q.memory ?? "–"), el("td", {}, q.servers_per_user ?? "–"),
      el("td", {}, entry.file),
      el("td", {},
        el("button", { type: "button", onclick: () => editQuota(entry) }, "Edit"), " ",
        el("button", { type: "button", onclick: () => deleteItem("quotas", entry) }, "Delete"))));
  }
}

function editQuota(entry) {
  const form = document.getElementById("quota-form");
  clearErrors(form);
  editing = entry ? { kind: "quotas", key: entry.key, version: entry.version, item: entry.item } : { kind: "quotas", key: null, item: {} };
  const q = editing.item;
  document.getElementById("quota-form-title").textContent = entry ? `Edit the quota of ${entry.key}` : "New quota";
  setText(form, "group", q.group);
  form.querySelector("[name=group]").readOnly = Boolean(entry);
  for (const f of ["gpus", "cpu", "memory", "servers_per_user"]) setText(form, f, q[f]);
  setText(form, "mig", Object.entries(q.mig || {}).map(([k, v]) => `${k}=${v}`).join(", "));
  form.querySelectorAll(".new-only").forEach((n) => { n.hidden = Boolean(entry); });
  form.hidden = false;
}

function quotaFromForm(form) {
  const item = { ...editing.item };
  const set = (key, value) => { if (value === undefined || value === "") delete item[key]; else item[key] = value; };
  set("group", text(form, "group"));
  for (const f of ["gpus", "cpu", "memory", "servers_per_user"]) set(f, number(text(form, f)));
  const mig = {};
  for (const part of text(form, "mig").split(",")) {
    if (!part.trim()) continue;
    const [k, v] = part.split("=");
    mig[k.trim()] = number((v || "").trim());
  }
  set("mig", Object.keys(mig).length ? mig : undefined);
  return item;
}

// --- history --------------------------------------------------------------------------------------
const diff = (before, after) => {
  if (!before) return "created";
  if (!after) return "deleted";
  const keys = new Set([...Object.keys(before), ...Object.keys(after)]);
  const out = [];
  for (const k of keys) {
    const a = JSON.stringify(before[k]);
    const b = JSON.stringify(after[k]);
    if (a !== b) out.push(`${k}: ${a ?? "–"} → ${b ?? "–"}`);
  }
  return out.join("; ") || "no change";
};

async function loadHistory() {
  const r = await api("GET", "history");
  if (!r.ok) return message(r.data.message, false);
  const body = document.querySelector("#history-table tbody");
  body.innerHTML = "";
  for (const c of r.data.changes) {
    const when = [el("td", {}, c.id), el("td", {}, new Date(c.time * 1000).toLocaleString()), el("td", {}, c.who)];
    if (c.action === "deploy") {  // the site's files changed by `mlaas deploy` (Kubernetes): nothing to restore here
      const note = c.after && c.after.live_edit_in_force ? "a live edit of this file stays in force over it" : "in force";
      body.append(el("tr", { "data-change": c.id, class: "deploy" }, ...when,
        el("td", {}, `deployed file ${c.key}`), el("td", {}, note), el("td", {})));
      continue;
    }
    const what = `${c.action} ${c.kind === "profiles" ? "profile" : "quota"} ${c.key}` + (c.restored_from ? ` (from before #${c.restored_from})` : "");
    body.append(el("tr", { "data-change": c.id }, ...when,
      el("td", {}, what), el("td", {}, diff(c.before, c.after)),
      el("td", {}, el("button", { type: "button", class: "restore", onclick: () => restore(c) }, "Restore version before this change"))));
  }
}

async function restore(change) {
  const r = await api("POST", `history/${change.id}/restore`);
  message(r.ok ? `Restored ${change.key} as it was before change #${change.id} (change #${r.data.change.id}).` : r.data.message, r.ok);
  await loadHistory();
}

// --- usage ------------------------------------------------------------------------------------------
const gib = (bytes) => `${(bytes / 2 ** 30).toFixed(2).replace(/\.?0+$/, "")} GiB`;
// what the devices of a server (or a group's servers) are doing now: NVML's utilisation and memory
const gpuUse = (u) => !u || !u.devices ? "–" : `${u.utilization === null ? "? %" : `${u.utilization} %`}, ${gib(u.memory_used)}`;

async function loadUsage() {
  const r = await api("GET", "usage");
  if (!r.ok) return message(r.data.message, false);
  const servers = document.querySelector("#usage-servers tbody");
  servers.innerHTML = "";
  for (const s of r.data.servers) {
    const accel = [
      s.gpus ? `${s.gpus} GPU` : "",
      ...Object.entries(s.mig).map(([k, v]) => `${v}× MIG ${k}`),
      ...s.devices.map((d) => d.uuid),
    ].filter(Boolean).join(", ") || "–";
    servers.append(el("tr", {}, el("td", {}, s.user), el("td", {}, s.server || "(default)"), el("td", {}, s.site || "–"), el("td", {}, s.groups.join(", ")),
      el("td", {}, `${s.profile_name} (${s.profile})`), el("td", {}, s.cpu), el("td", {}, gib(s.memory)), el("td", {}, accel),
      el("td", { class: "gpu-use" }, gpuUse(s.gpu_use))));
  }
  if (!r.data.servers.length) servers.append(el("tr", {}, el("td", { colspan: 9 }, "No server is running.")));
  const quotas = Object.fromEntries((r.data.quotas || []).map((q) => [q.group, q]));
  const groups = document.querySelector("#usage-groups tbody");
  groups.innerHTML = "";
  for (const [name, g] of Object.entries(r.data.groups)) {
    const q = quotas[name];
    const limits = q ? Object.entries(q.limits).map(([k, v]) => `${k} ${k === "memory" ? gib(v) : v}`).join(", ") : "none";
    groups.append(el("tr", {}, el("td", {}, name), el("td", {}, g.servers), el("td", {}, g.users.join(", ")), el("td", {}, g.cpu),
      el("td", {}, gib(g.memory)), el("td", {}, g.gpus), el("td", {}, Object.entries(g.mig).map(([k, v]) => `${v}× ${k}`).join(", ") || "–"),
      el("td", { class: "gpu-use" }, gpuUse(g.gpu_use)), el("td", {}, limits)));
  }
  // experiment tracking: each group's MLflow artifacts (as the tracking service measures them), against its `tracking_artifacts` limit
  const tracking = document.querySelector("#usage-tracking tbody");
  tracking.innerHTML = "";
  for (const t of r.data.tracking || []) {
    tracking.append(el("tr", {}, el("td", {}, t.group || "(no hub group now)"), el("td", {}, t.workspace),
      el("td", {}, gib(t.artifact_bytes)), el("td", {}, t.limit_bytes === null ? "none" : gib(t.limit_bytes))));
  }
  if (!(r.data.tracking || []).length) {
    const why = r.data.tracking_error || (r.data.tracking ? "No group has stored artifacts." : "Experiment tracking is off.");
    tracking.append(el("tr", {}, el("td", { colspan: 4 }, why)));
  }
  // processes on a GPU their server was not given (one machine; the fence prevents it where it is in force)
  const outside = r.data.gpu_processes_outside_assignment || [];
  const warning = document.getElementById("usage-outside");
  warning.hidden = !outside.length;
  warning.textContent = outside.length ? "GPU processes outside their assignment: " + outside.map((p) =>
    `process ${p.pid} of ${p.server ? `server ${p.server}` : "no server"} on ${p.uuid} (${p.held_by ? `held by ${p.held_by}` : "not handed out"})`).join("; ") : "";
  const devices = document.querySelector("#usage-devices tbody");
  devices.innerHTML = "";
  // on Kubernetes the cluster's device plugin hands out GPUs: no machine inventory (servers show their profile's)
  const inventory = r.data.devices || { devices: [], unavailable_reason: "GPUs are handed out by the cluster; each server above shows what its profile holds." };
  for (const d of inventory.devices || []) {
    devices.append(el("tr", {}, el("td", {}, d.uuid), el("td", {}, d.model), el("td", {}, d.mig_profile || "–"), el("td", {}, d.held_by || "free")));
  }
  if (!(inventory.devices || []).length) {
    devices.append(el("tr", {}, el("td", { colspan: 4 }, inventory.unavailable_reason || "No GPUs on this machine.")));
  }
}

// --- wiring -------------------------------------------------------------------------------------------
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => show(b.dataset.panel)));
document.getElementById("new-profile").addEventListener("click", () => editProfile(null));
document.getElementById("new-quota").addEventListener("click", () => editQuota(null));
document.getElementById("usage-refresh").addEventListener("click", loadUsage);
document.querySelectorAll("form.editor .cancel").forEach((b) => b.addEventListener("click", () => { b.closest("form").hidden = true; }));
document.getElementById("profile-form").addEventListener("submit", (e) => {
  e.preventDefault();
  save(e.target, "profiles", profileFromForm(e.target), loadProfiles);
});
document.getElementById("quota-form").addEventListener("submit", (e) => {
  e.preventDefault();
  save(e.target, "quotas", quotaFromForm(e.target), loadQuotas);
});
show("profiles");
