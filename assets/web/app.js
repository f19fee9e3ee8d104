// Deep Metric search page: pick or drop an image, search (optionally filtered by label and
// metadata), show the nearest gallery images with their metadata, ask for more like any of
// them, add the image to the gallery or delete a result. Plain DOM, no framework, no
// external requests.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, previewUrl: null, config: null };

function showError(msg) {
  const el = $("error");
  el.textContent = msg;
  el.hidden = !msg;
  if (msg) $("notice").hidden = true;
}

function showNotice(msg) {
  const el = $("notice");
  el.textContent = msg;
  el.hidden = !msg;
}

// Turns a failed fetch response into the server's JSON error message (or a fallback).
async function errorOf(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return `The server answered ${resp.status} ${resp.statusText}.`;
}

function busy(button, on) {
  button.disabled = on || !state.file;
  button.classList.toggle("busy", on);
  button.setAttribute("aria-busy", on ? "true" : "false");
}

async function loadConfig() {
  try {
    const resp = await fetch("/api/config");
    if (!resp.ok) throw new Error(await errorOf(resp));
    const cfg = await resp.json();
    state.config = cfg;
    $("k").max = cfg.max_k;
    $("k").value = Math.min(cfg.default_k, cfg.max_k);
    $("add-panel").hidden = cfg.read_only;
    $("key-row").hidden = !cfg.auth_required || cfg.read_only;
    $("status").textContent = `${cfg.gallery_items.toLocaleString()} images · ${cfg.model}`;
    // An empty gallery says how to fill it (the upload route only where the server allows it).
    $("empty-gallery").hidden = cfg.gallery_items > 0;
    $("empty-upload").hidden = cfg.read_only;
  } catch (e) {
    $("status").textContent = "Server unreachable";
    showError(`Cannot reach the search server: ${e.message}`);
  }
}

function setFile(file) {
  showError("");
  showNotice("");
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`“${file.name}” is not an image (${file.type}). Choose a JPEG, PNG, WebP, GIF or BMP file.`);
    return;
  }
  if (state.config && file.size > state.config.max_upload_bytes) {
    const mb = (state.config.max_upload_bytes / 1e6).toFixed(0);
    showError(`“${file.name}” is ${(file.size / 1e6).toFixed(1)} MB; this server accepts up to ${mb} MB.`);
    return;
  }
  state.file = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  const img = $("preview");
  img.src = state.previewUrl;
  img.alt = `Query image: ${file.name}`;
  img.hidden = false;
  $("drop-text").hidden = true;
  $("search-btn").disabled = false;
  $("add-btn").disabled = false;
  search();
}

// The filter box's text, or "" when empty (the server checks it and explains mistakes).
function filterText() {
  return $("filter").value.trim();
}

// Write requests carry the API key when one is typed.
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// An item's metadata as "key: value" lines, for its card.
function metadataText(md) {
  if (!md) return "";
  return Object.entries(md)
    .map(([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`)
    .join(" · ");
}

function cardButton(text, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

function renderResults(body) {
  const grid = $("grid");
  grid.replaceChildren();
  $("took").textContent = `· ${body.results.length} in ${Math.round(body.took_ms)} ms`;
  $("empty").hidden = body.results.length > 0;
  if (body.results.length === 0) $("empty").textContent = "The gallery is empty: add images to search them.";
  body.results.forEach((r, i) => {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.id = r.id;
    const a = document.createElement("a");
    a.href = r.url;
    a.target = "_blank";
    a.rel = "noopener";
    const img = document.createElement("img");
    img.src = r.thumb_url;
    img.loading = "lazy";
    img.alt = r.label ? `${r.label} (result ${i + 1})` : `Result ${i + 1}`;
    a.append(img);
    const meta = document.createElement("div");
    meta.className = "meta";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${i + 1} · id ${r.id}`;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = r.label || "—";
    label.title = r.path;
    const score = document.createElement("span");
    score.className = "score";
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, r.score)) * 100}%`;
    bar.append(fill);
    const num = document.createElement("span");
    num.textContent = r.score.toFixed(3);
    score.append(bar, num);
    score.setAttribute("aria-label", `similarity ${r.score.toFixed(3)}`);
    meta.append(rank, label, score);
    const md = document.createElement("div");
    md.className = "metadata";
    md.textContent = metadataText(r.metadata);
    md.hidden = !r.metadata;
    const actions = document.createElement("div");
    actions.className = "actions";
    actions.append(cardButton("More like this", "similar", () => moreLike(r.id)));
    if (state.config && !state.config.read_only) {
      actions.append(cardButton("Delete", "delete", () => deleteItem(r.id, li)));
    }
    li.append(a, meta, md, actions);
    grid.append(li);
  });
}

async function search() {
  if (!state.file) return;
  const btn = $("search-btn");
  busy(btn, true);
  showError("");
  try {
    const k = Math.max(1, parseInt($("k").value, 10) || 10);
    const form = new FormData();
    form.append("image", state.file);
    const filter = filterText();
    if (filter) form.append("filter", filter);
    const resp = await fetch(`/api/search?k=${k}`, { method: "POST", body: form });
    if (!resp.ok) throw new Error(await errorOf(resp));
    renderResults(await resp.json());
  } catch (e) {
    showError(`Search failed: ${e.message}`);
  } finally {
    busy(btn, false);
  }
}

// Results like gallery item `id` (the filter box applies), without an upload.
async function moreLike(id) {
  showError("");
  showNotice("");
  try {
    const k = Math.max(1, parseInt($("k").value, 10) || 10);
    const filter = filterText();
    const q = filter ? `&filter=${encodeURIComponent(filter)}` : "";
    const resp = await fetch(`/api/images/${id}/similar?k=${k}${q}`);
    if (!resp.ok) throw new Error(await errorOf(resp));
    renderResults(await resp.json());
    showNotice(`More like image ${id}.`);
  } catch (e) {
    showError(`More like this failed: ${e.message}`);
  }
}

// Deletes gallery item `id` (with the API key when the server needs one) and drops its card.
async function deleteItem(id, card) {
  showError("");
  showNotice("");
  try {
    const resp = await fetch(`/api/images/${id}`, { method: "DELETE", headers: authHeaders() });
    if (!resp.ok) throw new Error(await errorOf(resp));
    card.remove();
    showNotice(`Deleted image ${id} from the gallery.`);
    await loadConfig();
  } catch (e) {
    showError(`Deleting failed: ${e.message}`);
  }
}

async function addToGallery() {
  if (!state.file) return;
  const btn = $("add-btn");
  busy(btn, true);
  showError("");
  showNotice("");
  try {
    const form = new FormData();
    form.append("image", state.file);
    const label = $("label").value.trim();
    if (label) form.append("label", label);
    const metadata = $("metadata").value.trim();
    if (metadata) form.append("metadata", metadata);
    const resp = await fetch("/api/images", { method: "POST", body: form, headers: authHeaders() });
    if (!resp.ok) throw new Error(await errorOf(resp));
    const body = await resp.json();
    showNotice(body.duplicate
      ? `This image is already in the gallery (id ${body.id}).`
      : `Added to the gallery as id ${body.id}.`);
    await loadConfig();
    search();
  } catch (e) {
    showError(`Adding failed: ${e.message}`);
  } finally {
    busy(btn, false);
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("dragging")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) setFile(file);
  });
  // Pasting an image (e.g. a screenshot) works too.
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (item) setFile(item.getAsFile());
  });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  $("add-form").addEventListener("submit", (e) => { e.preventDefault(); addToGallery(); });
  loadConfig();
}

document.addEventListener("DOMContentLoaded", init);
