// The search page: queries the read-only JSON API and draws the results. No framework, no
// inline script (the Content-Security-Policy forbids it), text set with textContent only.
"use strict";

const LABELS = {
  gender: "Gender", master_category: "Category", sub_category: "Sub-category",
  article_type: "Article type", base_colour: "Colour", season: "Season", year: "Year",
  usage: "Usage", category: "Folder",
};
const $ = (id) => document.getElementById(id);
// The page size the page opens with: the option index.html marks selected.
const DEFAULT_TOP_K = [...$("top-k").options].find((option) => option.defaultSelected).value;
const state = { kind: null, image: null, text: "", id: "", offset: 0 };

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

async function callApi(url, options) {
  let reply;
  try {
    reply = await fetch(url, options);
  } catch (error) {
    throw new Error("The page's server does not answer. Is `python -m web` still running?");
  }
  const body = await reply.json().catch(() => null);
  if (!reply.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${reply.status}`;
    throw new Error(message);
  }
  return body;
}

async function loadStatus() {
  try {
    const status = await callApi("/api/status");
    const encoders = status.encoders;
    $("catalog").textContent =
      `${status.products.toLocaleString()} products · model ${status.model_id || "none yet"} · ` +
      `${status.index_type} index · encoders ${encoders.serving}/${encoders.total} serving`;
    const banner = $("banner");
    banner.hidden = !status.random_weights;
    banner.textContent = status.random_weights
      ? "The encoders run RANDOM weights (--pretrained none): scores and neighbours carry no " +
        "meaning. An exact copy of a catalog picture still comes first; nothing else does."
      : "";
  } catch (error) {
    $("catalog").textContent = "The search service is not reachable right now.";
    showMessage(error.message);
  }
}

async function loadFacets() {
  let reply;
  try {
    reply = await callApi("/api/facets");
  } catch (error) {
    return; // loadStatus has said why
  }
  const box = $("filters");
  box.replaceChildren();
  for (const facet of reply.facets) {
    if (facet.values.length < 2) continue; // one value filters nothing
    const label = document.createElement("label");
    label.textContent = LABELS[facet.field] || facet.field;
    const select = document.createElement("select");
    select.id = `filter-${facet.field}`;
    select.dataset.field = facet.field;
    select.append(new Option("Any", ""));
    for (const { value, count } of facet.values) {
      select.append(new Option(`${value} (${count})`, value));
    }
    select.addEventListener("change", () => rerun());
    label.append(select);
    box.append(label);
  }
}

function params() {
  const found = new URLSearchParams();
  found.set("top_k", $("top-k").value);
  found.set("offset", String(state.offset));
  const minScore = $("min-score").value.trim();
  if (minScore) found.set("min_score", minScore);
  for (const select of $("filters").querySelectorAll("select")) {
    if (select.value) found.set(`filter.${select.dataset.field}`, select.value);
  }
  return found;
}

async function runSearch(fromAddress = false) {
  if (!state.kind) return;
  const query = params();
  let options;
  if (state.kind === "image") {
    const form = new FormData();
    form.append("image", state.image, state.image.name || "pasted-image");
    options = { method: "POST", body: form };
  } else {
    query.set(state.kind, state[state.kind]);
  }
  if (!fromAddress) remember(query);
  $("summary").textContent = "Searching…";
  const started = performance.now();
  try {
    const reply = await callApi(`/api/search?${query}`, options);
    showMessage("");
    render(reply, performance.now() - started);
  } catch (error) {
    $("summary").textContent = "";
    $("results").replaceChildren();
    setPager(false);
    showMessage(error.message);
  }
}

function rerun() {
  state.offset = 0;
  runSearch();
}

// The address holds a text or product-id search with its options, in /api/search's own
// parameters (defaults left out), so that a search can be bookmarked, shared and gone back
// to. A photo stays in the page: its entry in the history keeps the options but no query in
// the address, and the next photo takes the same entry (the last one is kept to search again).
function remember(query) {
  const shown = new URLSearchParams(query);
  if (shown.get("top_k") === DEFAULT_TOP_K) shown.delete("top_k");
  if (shown.get("offset") === "0") shown.delete("offset");
  const photo = state.kind === "image";
  const address = photo ? location.pathname : `${location.pathname}?${shown}`;
  const entry = photo ? { photo, options: shown.toString() } : { photo };
  const same = photo ? onPhotoEntry() : address === location.pathname + location.search;
  (same ? history.replaceState : history.pushState).call(history, entry, "", address);
}

function onPhotoEntry() {
  return Boolean(history.state && history.state.photo);
}

// What the address (or a photo's entry) says: its options set in the form, its search run;
// with no query there, no results.
function followAddress() {
  const photo = onPhotoEntry() && state.image;
  const query = new URLSearchParams(photo ? history.state.options : location.search);
  const kind = photo ? "image" : ["text", "id"].find((name) => query.get(name));
  $("text").value = kind === "text" ? query.get("text") : "";
  setSelect($("top-k"), query.get("top_k") || DEFAULT_TOP_K);
  $("min-score").value = query.get("min_score") || "";
  for (const select of $("filters").querySelectorAll("select")) {
    setSelect(select, query.get(`filter.${select.dataset.field}`) || "");
  }
  state.offset = Math.max(0, Number(query.get("offset")) || 0);
  state.kind = kind || null;
  if (kind && kind !== "image") state[kind] = query.get(kind);
  if (kind) {
    runSearch(true);
  } else {
    $("summary").textContent = "";
    $("page").textContent = "";
    $("results").replaceChildren();
    setPager(false);
  }
}

function setSelect(select, value) {
  if (value && ![...select.options].some((option) => option.value === value)) {
    select.append(new Option(value, value)); // a value the address names, outside the list
  }
  select.value = value;
}

function describeQuery() {
  if (state.kind === "image") return "your photo";
  if (state.kind === "text") return `“${state.text}”`;
  return `product ${state.id}`;
}

function render(reply, roundTripMs) {
  const list = $("results");
  list.replaceChildren(...reply.matches.map(card));
  const first = reply.offset + 1;
  const last = reply.offset + reply.matches.length;
  $("summary").textContent = reply.matches.length
    ? `Results ${first}–${last} like ${describeQuery()} · search ${reply.took_ms} ms, ` +
      `page ${Math.round(roundTripMs)} ms`
    : `Nothing like ${describeQuery()} passes these filters and minimum score.`;
  setPager(reply.more, reply.offset > 0);
  $("page").textContent = reply.matches.length ? `Page ${reply.offset / reply.top_k + 1}` : "";
}

function setPager(more, back = false) {
  $("next").disabled = !more;
  $("prev").disabled = !back;
}

function card(match) {
  const item = document.createElement("li");
  item.className = "card";
  if (match.thumbnail) {
    const picture = document.createElement("img");
    picture.src = match.thumbnail;
    picture.alt = match.name || match.id;
    picture.loading = "lazy";
    item.append(picture);
  } else {
    const none = document.createElement("div");
    none.className = "no-picture";
    none.textContent = "no picture";
    item.append(none);
  }
  const name = document.createElement("h2");
  name.textContent = match.name || "(no name)";
  const details = [
    ["id", `id ${match.id}`],
    ["score", `score ${match.score.toFixed(3)}`],
    ["meta", [match.article_type || match.category, match.base_colour, match.gender,
              [match.season, match.year || ""].join(" ").trim()].filter(Boolean).join(" · ")],
  ].map(([kind, text]) => {
    const line = document.createElement("p");
    line.className = kind;
    line.textContent = text;
    return line;
  });
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more";
  more.dataset.id = match.id;
  more.textContent = "More like this";
  more.setAttribute("aria-label", `More like ${match.name || match.id}`);
  item.append(name, ...details, more);
  return item;
}

function searchImage(file) {
  if (!file) return;
  state.kind = "image";
  state.image = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  rerun();
}

function wire() {
  $("photo").addEventListener("change", (event) => searchImage(event.target.files[0]));
  const zone = $("dropzone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    searchImage(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData ? event.clipboardData.files : [])][0];
    if (file) {
      event.preventDefault();
      searchImage(file);
    }
  });
  $("query").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value.trim();
    if (!text) return;
    state.kind = "text";
    state.text = text;
    rerun();
  });
  $("results").addEventListener("click", (event) => {
    const button = event.target.closest("button.more");
    if (!button) return;
    state.kind = "id";
    state.id = button.dataset.id;
    rerun();
    $("results").focus();
  });
  $("top-k").addEventListener("change", rerun);
  $("min-score").addEventListener("change", rerun);
  $("clear-filters").addEventListener("click", () => {
    for (const select of $("filters").querySelectorAll("select")) select.value = "";
    $("min-score").value = "";
    rerun();
  });
  $("next").addEventListener("click", () => {
    state.offset += Number($("top-k").value);
    runSearch();
  });
  $("prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - Number($("top-k").value));
    runSearch();
  });
}

wire();
loadStatus();
// Filters named in the address need their lists drawn first.
loadFacets().then(followAddress);
window.addEventListener("popstate", followAddress);
