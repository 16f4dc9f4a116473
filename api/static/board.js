// LeadBoard page: renders a board from the /v1 board API, moves cards by drag and drop, opens the Account
// Panel (and, from it, a lead's profile), shows lead times, adds accounts by domain, and follows the board's
// live stream. No framework, no external requests.
// The page's other view (segments.js) uses its helpers through window.leadBoard: openCard(cardId) (a card of the
// board shown), openLead(leadId), openPanel(what, path, render) for a panel of its own.
"use strict";

const STORE = { site: "leadstream.site", key: "leadstream.key", board: "leadstream.board" };
const LEADS_SHOWN = 20; // lead rows the Account Panel shows before "more leads"
const LEAD_TIME_REFRESH_MS = 5000; // after a stage change: ClickHouse records it a moment after the stream
const state = {
  site: "", key: "", board: null, version: 0, lastEventId: "", source: null, reconnectTimer: 0,
  cards: new Map(), // card_id -> card view as the API sent it
  panelTicket: 0, // the latest panel asked for: an answer to an earlier request is dropped
  leadTimeTimer: 0,
  owners: new Map(), // owner id -> { id, name, email }: the site's owners (empty: owners are free text)
};

// ---------------------------------------------------------------- small DOM helpers (no innerHTML: every value is text)

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}
const $ = (selector) => document.querySelector(selector);
const enc = encodeURIComponent;

function say(message, isError = false) {
  const status = $("#status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

/** A length of time, coarse: 42m, 5h, 3d. */
function duration(ms) {
  const minutes = Math.max(0, Math.floor(ms / 60000));
  if (minutes < 60) return `${minutes}m`;
  if (minutes < 48 * 60) return `${Math.floor(minutes / 60)}h`;
  return `${Math.floor(minutes / 1440)}d`;
}
const ago = (ms) => (ms ? duration(Date.now() - ms) : "");
const when = (ms) => (ms ? new Date(ms).toLocaleString() : "");
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function randomKey() {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------- credentials: URL fragment or a form, kept per tab

function readCredentials() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("site") && fragment.get("key")) {
    sessionStorage.setItem(STORE.site, fragment.get("site"));
    sessionStorage.setItem(STORE.key, fragment.get("key"));
    history.replaceState(null, "", location.pathname + location.search);  // the key leaves the address bar
  }
  state.site = sessionStorage.getItem(STORE.site) || "";
  state.key = sessionStorage.getItem(STORE.key) || "";
  return Boolean(state.site && state.key);
}

function askForCredentials(message) {
  sessionStorage.removeItem(STORE.key);
  closeStream();
  $("#login").hidden = false;
  $("#board-choice").hidden = $("#add-account").hidden = true;
  say(message || "Enter the site and an API key for it.", Boolean(message));
}

// ---------------------------------------------------------------- API calls: problem+json errors become ApiProblem

class ApiProblem extends Error {
  constructor(status, body) {
    super(body.detail ? `${body.title}: ${body.detail}` : body.title || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || "";
    this.body = body;
  }
}

async function api(path, { method = "GET", body, headers = {} } = {}) {
  const response = await fetch(`/v1/sites/${enc(state.site)}${path}`, {
    method,
    headers: { "X-API-Key": state.key, ...(body ? { "Content-Type": "application/json" } : {}), ...headers },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (response.status === 401 || (response.status === 403 && method === "GET")) {  // (a read-only key may GET)
    askForCredentials(data && data.title ? data.title : "This API key is not valid for this site.");
  }
  if (!response.ok) throw new ApiProblem(response.status, data || {});
  return { status: response.status, data, etag: response.headers.get("ETag") || "" };
}

/** The board version to send as If-Match: the newest seen, from an ETag or the stream (they may arrive out of order). */
function noteVersion(version) {
  const seen = Number(String(version).replaceAll('"', ""));
  if (Number.isInteger(seen) && seen >= state.version) state.version = seen;
}

const boardPath = (suffix = "") => `/boards/${enc(state.board.id)}${suffix}`;
const cardPath = (cardId, suffix = "") => boardPath(`/cards/${enc(cardId)}${suffix}`);

// ---------------------------------------------------------------- boards

/** The site's owners, to show a card's owner by name (a failure leaves owners as the ids/text the card holds). */
async function loadOwners() {
  try {
    const { data } = await api("/owners");
    state.owners = new Map(data.owners.map((o) => [o.id, o]));
  } catch (err) {
    state.owners = new Map();
  }
}

const ownerName = (owner) => (state.owners.get(owner) || { name: owner }).name;

async function loadBoards() {
  await loadOwners();
  const { data } = await api("/boards");
  const select = $("#board-select");
  select.replaceChildren(...data.boards.map((b) => h("option", { value: b.id }, b.name)));
  $("#login").hidden = true;
  $("#board-choice").hidden = false;
  if (!data.boards.length) {
    say("This site has no boards yet: PUT one to /v1/sites/{site}/boards/{id}.");
    return;
  }
  const remembered = sessionStorage.getItem(STORE.board);
  select.value = data.boards.some((b) => b.id === remembered) ? remembered : data.boards[0].id;
  await openBoard(select.value);
}

async function openBoard(boardId) {
  sessionStorage.setItem(STORE.board, boardId);
  state.board = { id: boardId };
  closePanel();
  await loadBoard();
}

/** Load a snapshot of the board and follow its stream from exactly that snapshot's feed position. */
async function loadBoard() {
  closeStream();
  const { data } = await api(boardPath());
  state.board = { ...data.board, stages: data.stages.map(({ id, name }) => ({ id, name })) };
  state.version = data.version;
  state.lastEventId = data.feed_id;
  state.cards.clear();
  $("#add-account").hidden = data.board.card !== "account";
  $("#board").replaceChildren(...data.stages.map(renderColumn));
  say(`${data.board.name}: ${data.stages.reduce((n, s) => n + s.count, 0)} cards`);
  connectStream();
  loadLeadTime();
}

/** Each column's lead time figure: the median and p90 of the time its cards took from first seen to arrive
 * there (the last column's is the board's lead time). From ClickHouse: a failure leaves the figures empty. */
async function loadLeadTime() {
  const boardId = state.board.id;
  let data;
  try { data = (await api(boardPath("/lead-time"))).data; } catch (err) { return; }
  if (!state.board || state.board.id !== boardId) return;
  for (const stage of data.stages) {
    const figure = columnOf(stage.stage_id)?.querySelector(".stage-lead-time");
    if (!figure) continue;
    const final = stage.stage_id === data.final_stage_id;
    figure.textContent = stage.cards
      ? `${final ? "lead time" : "reached in"} ${duration(stage.median_ms)} median · ${duration(stage.p90_ms)} p90`
      : "";
    figure.title = stage.cards
      ? `From first seen to arriving in ${stage.name}, over ${plural(stage.cards, "card")}` : "";
  }
}

function refreshLeadTimeSoon() {
  clearTimeout(state.leadTimeTimer);
  state.leadTimeTimer = setTimeout(loadLeadTime, LEAD_TIME_REFRESH_MS);
}

function renderColumn(stage) {
  const list = h("ol", { class: "cards", "aria-label": `${stage.name} cards` });
  const column = h("section", { class: "column", dataset: { stage: stage.id }, "aria-labelledby": `stage-${stage.id}` },
    h("h2", { id: `stage-${stage.id}` }, h("span", {}, stage.name),
      h("span", { class: "count", "aria-label": "cards in this stage" }, String(stage.count))),
    h("div", { class: "stage-lead-time" }),
    list);
  for (const card of stage.cards) list.append(renderCard(card));
  if (stage.next_cursor) column.append(moreButton(stage));
  column.addEventListener("dragover", (e) => { e.preventDefault(); column.classList.add("drop-target"); });
  column.addEventListener("dragleave", () => column.classList.remove("drop-target"));
  column.addEventListener("drop", (e) => {
    e.preventDefault();
    column.classList.remove("drop-target");
    const cardId = e.dataTransfer.getData("text/plain");
    if (cardId && state.cards.has(cardId) && state.cards.get(cardId).stage_id !== stage.id) moveCard(cardId, stage.id);
  });
  return column;
}

function moreButton(stage) {
  const button = h("button", { type: "button", class: "more secondary" }, `Show more ${stage.name}`);
  button.addEventListener("click", async () => {
    const { data } = await api(boardPath(`?stage=${enc(stage.id)}&cursor=${enc(stage.next_cursor)}`));
    const page = data.stages[0];
    const list = button.parentElement.querySelector(".cards");
    for (const card of page.cards) if (!state.cards.has(card.card_id)) list.append(renderCard(card));
    if (page.next_cursor) stage.next_cursor = page.next_cursor; else button.remove();
  });
  return button;
}

function renderCard(card) {
  state.cards.set(card.card_id, card);
  const node = h("li", {
    class: card.archived ? "card archived" : "card", draggable: "true", tabindex: "0", dataset: { card: card.card_id },
    "aria-label": `${card.title || card.card_id}, score ${card.score}${card.archived ? ", archived" : ""}`,
    ondragstart: (e) => { e.dataTransfer.setData("text/plain", card.card_id); e.dataTransfer.effectAllowed = "move"; },
    onclick: () => openCard(card.card_id),
    onkeydown: (e) => { if (e.key === "Enter") openCard(card.card_id); },
  },
  h("div", { class: "title" }, card.title || card.card_id),
  h("div", { class: "tags" }, (card.tags || []).map((t) => h("span", { class: "tag" }, t))),
  h("div", { class: "meta" },
    h("span", { class: "score", title: "score" }, `score ${card.score}`),
    h("span", { class: "in-stage", title: "time in stage", dataset: { since: card.entered_stage_ms } },
      ago(card.entered_stage_ms)),
    card.owner ? h("span", { class: "owner", title: "owner", dataset: { owner: card.owner } }, ownerName(card.owner))
      : null));
  return node;
}

function removeCard(cardId) {
  const previous = state.cards.get(cardId);
  if (!previous) return;
  cardNode(cardId)?.remove();
  bumpCount(previous.stage_id, -1);  // it left the board without a stage change (merged into another card)
  state.cards.delete(cardId);
}

function cardNode(cardId) {
  return document.querySelector(`.card[data-card="${CSS.escape(cardId)}"]`);
}

function columnOf(stageId) {
  return document.querySelector(`.column[data-stage="${CSS.escape(stageId)}"]`);
}

function bumpCount(stageId, delta) {
  const count = columnOf(stageId)?.querySelector(".count");
  if (count) count.textContent = String(Math.max(0, Number(count.textContent) + delta));
}

/** Show a card's latest view in its column. Counts change only with stage changes (a column may hold more
 * cards than the page shows, so a card appearing in the page is not necessarily a new card in the stage). */
function placeCard(card) {
  const old = cardNode(card.card_id);
  const column = columnOf(card.stage_id);
  if (!column) return;
  const node = renderCard(card);
  if (old && old.parentElement === column.querySelector(".cards")) old.replaceWith(node);
  else { old?.remove(); column.querySelector(".cards").prepend(node); }
}

function applyStageChange(change) {
  if (change.from_stage) bumpCount(change.from_stage, -1);
  bumpCount(change.to_stage, +1);
  const title = state.cards.get(change.card_id)?.title || change.card_id;
  say(`${title}: ${change.from_stage || "(new)"} → ${change.to_stage} (${change.actor})`);
  refreshLeadTimeSoon();
}

// ---------------------------------------------------------------- commands: move (with the 409 force flow), add, notes

async function sendCommand(path, body, what) {
  try {
    const { status, data, etag } = await api(path, {
      method: "POST", body, headers: { "Idempotency-Key": randomKey(), "If-Match": `"${state.version}"` },
    });
    if (etag) noteVersion(etag);
    if (data.card) placeCard(data.card);
    say(status === 202 ? `${what}: sent (${data.command_id}); the board shows it when it is applied.` : `${what}: done.`);
    return data;
  } catch (err) {
    if (!(err instanceof ApiProblem)) { say(`${what}: ${err.message}`, true); return null; }
    if (err.status === 412) {
      await loadBoard();
      say(`${what}: the board changed since you loaded it. It is reloaded: please try again.`, true);
      return null;
    }
    throw err;
  }
}

async function moveCard(cardId, to, force = false, reason = "") {
  const card = state.cards.get(cardId);
  const what = `Move ${card ? card.title || cardId : cardId} to ${to}`;
  cardNode(cardId)?.classList.add("moving");
  try {
    return await sendCommand(cardPath(cardId, "/move"), { to, force, reason }, what);
  } catch (err) {
    if (err.code === "stage_regression" && !force) return askToForce(cardId, to, err.message);
    say(`${what}: ${err.message}`, true);
    return null;
  } finally {
    cardNode(cardId)?.classList.remove("moving");
  }
}

function askToForce(cardId, to, message) {
  const dialog = $("#force-dialog");
  const form = dialog.querySelector("form");
  form.reset();
  $("#force-message").textContent = message;
  say(message, true);
  dialog.returnValue = "";  // Escape closes it with the previous value otherwise
  dialog.onclose = () => {
    if (dialog.returnValue === "force") moveCard(cardId, to, true, form.elements.reason.value.trim());
  };
  dialog.showModal();
}

async function command(cardId, suffix, body, what) {
  try { return await sendCommand(cardPath(cardId, suffix), body, what); }
  catch (err) { say(`${what}: ${err.message}`, true); return null; }
}

async function addAccount(event) {
  event.preventDefault();
  const form = event.target;
  const domain = form.elements.domain.value.trim();
  try {
    await sendCommand(boardPath("/cards"), { domain }, `Add ${domain}`);
    form.reset();
  } catch (err) { say(`Add ${domain}: ${err.message}`, true); }
}

// ---------------------------------------------------------------- the live stream (EventSource cannot send headers:
// it opens with a short-lived token for this board, and resumes from the last event id it saw)

async function connectStream() {
  closeStream();
  const boardId = state.board.id;
  let token;
  try { token = (await api(boardPath("/stream-token"))).data.token; }
  catch (err) { scheduleReconnect(); return; }
  if (!state.board || state.board.id !== boardId) return;
  const params = new URLSearchParams({ token });
  if (state.lastEventId) params.set("last_event_id", state.lastEventId);
  const source = new EventSource(`/v1/sites/${enc(state.site)}${boardPath("/stream")}?${params}`);
  state.source = source;
  const live = $("#live");
  source.onopen = () => { live.textContent = "live"; live.classList.add("on"); };
  source.onerror = () => {
    live.textContent = "reconnecting…";
    live.classList.remove("on");
    if (source.readyState === EventSource.CLOSED) scheduleReconnect();  // e.g. the token expired: get a new one
  };
  const follow = (handler) => (e) => {
    if (e.lastEventId) state.lastEventId = e.lastEventId;
    handler(JSON.parse(e.data));
  };
  source.addEventListener("stage_change", follow(applyStageChange));
  source.addEventListener("card", follow(placeCard));  // the card's new view follows its stage change
  source.addEventListener("card_removed", follow((gone) => removeCard(gone.card_id)));
  source.addEventListener("version", follow((v) => noteVersion(v.version)));
  source.addEventListener("reset", follow(() => loadBoard()));
}

function scheduleReconnect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(connectStream, 2000);
}

function closeStream() {
  clearTimeout(state.reconnectTimer);
  clearTimeout(state.leadTimeTimer);
  if (state.source) state.source.close();
  state.source = null;
}

// ---------------------------------------------------------------- the Account Panel and the Lead Profile

const compact = (items) => items.flat(Infinity).filter((item) => item !== null && item !== undefined && item !== false);
const leadName = (identity) => (identity ? identity.email || `Anonymous lead ${identity.lead_id}` : "Lead");
const channels = (first, last) => (first === last ? first : `${first} → ${last}`);
const stageName = (stageId) => (state.board?.stages || []).find((s) => s.id === stageId)?.name || stageId;

/** Open the panel of a card of the board shown: an account card's Account Panel, a lead card's Lead Profile.
 * Resolves to false when the card cannot be read (e.g. it is not on this board). */
function openCard(cardId) {
  return openPanel(`Card ${cardId}`, cardPath(cardId), (data) => [data.card.title || cardId, renderCardPanel(data)]);
}

/** Open a lead's profile on its own, e.g. a lead listed by another view of the page. */
function openLead(leadId) {
  return openPanel(`Lead ${leadId}`, `/leads/${enc(leadId)}`,
    (data) => [leadName(data.identity), [renderLeadDetails(data), renderLeadSessions(data)]]);
}

/** Read `path` and show the panel `render(data)` makes of it ([title, children]). Resolves to false when the read
 * failed (the status line says why); an answer that arrives after another panel was asked for is dropped. */
async function openPanel(what, path, render) {
  const ticket = ++state.panelTicket;
  let data;
  try { data = (await api(path)).data; }
  catch (err) { say(`${what}: ${err.message}`, true); return false; }
  if (ticket === state.panelTicket) showPanel(...render(data));
  return true;
}

function showPanel(title, children) {
  const panel = $("#panel");
  $("#panel-title").textContent = title;
  $("#panel-body").replaceChildren(...compact(children));
  panel.hidden = false;
  panel.scrollTop = 0;
  panel.querySelector(".close").focus();
}

function closePanel() {
  $("#panel").hidden = true;
  state.panelTicket += 1;
}

function facts(pairs) {
  return h("dl", {}, pairs.filter(([, value]) => value !== "" && value !== null && value !== undefined)
    .map(([name, value]) => [h("dt", {}, name), h("dd", {}, value instanceof Node ? value : String(value))]));
}

function ownerText(owner) {
  if (!owner) return "(nobody)";
  const known = state.owners.get(owner);
  return known ? `${known.name} <${known.email}>` : owner;
}

function ownerInput(card) {
  if (!state.owners.size) return h("input", { name: "owner", value: card.owner || "", maxlength: "128" });
  return h("select", { name: "owner" }, h("option", { value: "", selected: !card.owner }, "(nobody)"),
    [...state.owners.values()].map((o) => h("option", { value: o.id, selected: o.id === card.owner }, o.name)));
}

function renderCardPanel(data) {
  const card = data.card;
  const details = data.kind === "account"
    ? [h("h3", {}, "Account"), renderAccountDetails(data.account, card)]
    : [h("h3", {}, "Lead"), renderLeadDetails(data)];
  const notes = (data.notes || []).map((n) => h("li", {}, n.text, h("span", { class: "muted" }, ` · ${n.actor} · ${when(n.ts_ms)}`)));
  return [
    details,
    h("h3", {}, "Card"),
    facts([["Stage", stageName(card.stage_id)], ["In stage for", ago(card.entered_stage_ms)], ["Score", card.score],
      ["Tags", (card.tags || []).join(", ")], ["Owner", ownerText(card.owner)]]),
    renderLeadTime(data.lead_time),
    data.kind === "account" ? renderLeads(data) : null,
    notes.length ? [h("h3", {}, "Notes"), h("ul", { class: "notes" }, notes)] : null,
    h("h3", {}, "Actions"),
    renderActions(card),
    data.kind === "account" ? renderAccountSessions(data) : renderLeadSessions(data),
  ];
}

function renderAccountDetails(account, card) {
  const company = account.company || {};
  const places = (account.places || []).map((p) =>
    h("li", {}, [...new Set([p.city, p.region, p.country].filter(Boolean))].join(", "),
      h("span", { class: "muted" }, ` · ${plural(p.visitors, "visitor")}`)));
  const networks = (account.networks || []).map((n) =>
    h("li", {}, n.org, h("span", { class: "muted" }, ` · ${n.kind || "network"} · ${plural(n.visitors, "visitor")}`)));
  return h("div", { class: "account-details" },
    facts([["Domain", account.domain], ["Company", account.company_name || card.title],
      ["Industry", company.industry], ["Employees", company.employees], ["Country", company.country],
      ["Website", link(company.website)], ["LinkedIn", link(company.linkedin_url)],
      ["Location", places.length ? h("ul", { class: "places" }, places) : ""],
      ["Networks", networks.length ? h("ul", { class: "networks" }, networks) : ""],
      ["Known contacts", account.known_leads], ["Anonymous leads", account.anonymous_leads],
      ["First seen", when(account.first_seen_ms)], ["Last seen", when(account.last_seen_ms)]]));
}

/** A web address as a link, only when it is one (http or https); anything else stays text. */
function link(url) {
  if (!url) return "";
  return /^https?:\/\//i.test(url) ? h("a", { href: url, rel: "noopener noreferrer", target: "_blank" }, url) : url;
}

function renderLeadTime(leadTime) {
  if (!leadTime || !leadTime.stages.length) return null;
  const final = stageName(leadTime.final_stage_id);
  return [
    h("h3", {}, "Lead time"),
    h("ol", { class: "lead-time", "aria-label": `Time from first seen (${when(leadTime.start_ms)}) to each stage` },
      leadTime.stages.map((s) => h("li", { dataset: { stage: s.stage_id } },
        h("span", { class: "stage-name" }, s.name), " ", h("span", { class: "after" }, duration(s.lead_time_ms))))),
    h("p", { class: "lead-time-total" }, leadTime.lead_time_ms === null
      ? `Not in ${final} yet; first seen ${ago(leadTime.start_ms)} ago.`
      : `Reached ${final} ${duration(leadTime.lead_time_ms)} after first seen.`),
  ];
}

function renderActions(card) {
  const stages = state.board.stages || [];
  const moveSelect = h("select", { name: "to", "aria-label": "Move to stage" },
    stages.map((s) => h("option", { value: s.id, selected: s.id === card.stage_id }, s.name)));
  return h("div", { class: "actions" },
    h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); moveCard(card.card_id, moveSelect.value); } },
      h("label", {}, "Stage", moveSelect), h("button", { type: "submit" }, "Move")),
    h("form", { class: "inline", onsubmit: (e) => {
      e.preventDefault(); command(card.card_id, "/owner", { owner: e.target.elements.owner.value.trim() }, "Set owner");
    } }, h("label", {}, "Owner", ownerInput(card)),
      h("button", { type: "submit" }, "Set owner")),
    h("form", { class: "inline", onsubmit: (e) => {
      e.preventDefault(); command(card.card_id, "/notes", { text: e.target.elements.text.value.trim() }, "Add note");
      e.target.reset();
    } }, h("label", {}, "Note", h("input", { name: "text", required: true, maxlength: "2000" })),
      h("button", { type: "submit" }, "Add note")),
    card.archived
      ? h("button", { type: "button", class: "secondary", onclick: () => command(card.card_id, "/unarchive", {}, "Unarchive") },
        "Unarchive card")
      : h("button", { type: "button", class: "secondary", onclick: () => command(card.card_id, "/archive", {}, "Archive") },
        "Archive card"));
}

// ---- the account's leads: a row each; a lead opens in place with its own sessions

function renderLeads(data) {
  const total = data.account.known_leads + data.account.anonymous_leads;
  const rows = h("tbody");
  const more = h("button", { type: "button", class: "more secondary" }, "More leads");
  let shown = 0;
  const showMore = () => {
    rows.append(...data.leads.slice(shown, shown + LEADS_SHOWN).map(leadRow));
    shown = Math.min(data.leads.length, shown + LEADS_SHOWN);
    more.hidden = shown >= data.leads.length;
  };
  more.onclick = showMore;
  showMore();
  return [
    h("h3", {}, `Leads (${total})`),
    data.leads.length < total ? h("p", { class: "muted" }, `The ${data.leads.length} most recently active.`) : null,
    data.leads.length
      ? h("table", { class: "lead-list", "aria-label": "Leads" },
        h("thead", {}, h("tr", {}, [["Lead"], ["Channel"], ["Sessions", "num"], ["Events", "num"], ["Score", "num"],
          ["Tags"]].map(([name, kind]) => h("th", { scope: "col", class: kind }, name)))),
        rows)
      : h("p", { class: "muted" }, "Nobody from this account has been seen yet."),
    more,
  ];
}

function leadRow(lead) {
  const name = lead.known ? lead.email : "Anonymous lead";
  const open = h("button", { type: "button", class: "lead-open", "aria-expanded": "false", title: lead.lead_id }, name);
  const row = h("tr", { dataset: { lead: lead.lead_id } },
    h("td", {}, open, h("div", { class: "muted" }, `seen ${ago(lead.last_seen_ms)} ago`)),
    h("td", { class: "channel" }, lead.session_count ? channels(lead.first_channel, lead.last_channel) : ""),
    h("td", { class: "num sessions-count" }, String(lead.session_count)),
    h("td", { class: "num events-count" }, String(lead.event_count)),
    h("td", { class: "num score" }, String(lead.score)),
    h("td", {}, h("div", { class: "tags" }, lead.tags.map((t) => h("span", { class: "tag" }, t)))));
  open.onclick = () => toggleLead(row, lead.lead_id, open);
  return row;
}

/** Expand a lead in place (its profile: the last 5 sessions with their click-stream, 5 more on demand), or
 * fold it again. */
async function toggleLead(row, leadId, button) {
  const open = () => row.nextElementSibling?.classList.contains("lead-detail") ? row.nextElementSibling : null;
  if (open()) {
    open().remove();
    button.setAttribute("aria-expanded", "false");
    return;
  }
  let data;
  try { data = (await api(`/leads/${enc(leadId)}`)).data; }
  catch (err) { say(`Lead ${leadId}: ${err.message}`, true); return; }
  if (open() || !row.isConnected) return;
  row.after(h("tr", { class: "lead-detail", dataset: { lead: leadId } }, h("td", { colspan: "6" },
    h("section", { class: "lead-profile", "aria-label": `Lead ${leadName(data.identity)}` },
      renderLeadDetails(data), renderLeadSessions(data)))));
  button.setAttribute("aria-expanded", "true");
}

function renderLeadDetails(data) {
  const identity = data.identity;
  if (!identity) return h("p", { class: "muted" }, "No tracked activity yet.");
  const touch = (t) => (t ? `${t.channel}${t.landing_url ? ` · ${t.landing_url}` : ""} · ${when(t.ts_ms)}` : "");
  const tags = (data.tags || []).map((t) => (t.rule_id ? `${t.tag} (rule ${t.rule_id})` : t.tag)).join(", ");
  const properties = Object.entries(data.properties || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
  return facts([["Email", identity.email || "(anonymous)"],
    ["Account", data.account ? `${data.account.domain} (${plural(data.account.other_leads, "other lead")})` : ""],
    ["First seen", when(identity.first_seen_ms)], ["Last seen", when(identity.last_seen_ms)],
    ["First touch", touch(data.first_touch)], ["Last touch", touch(data.last_touch)],
    ["Visitors", identity.visitors.length], ["Score", data.score ?? ""], ["Tags", tags], ["Properties", properties]]);
}

function renderLeadSessions(data) {
  if (!data.identity) return null;
  return sessionList(`Sessions (${data.session_count})`, data, "Lead sessions, newest first",
    async (page) => (await api(`/leads/${enc(data.identity.lead_id)}?page=${page}`)).data, new Map());
}

function renderAccountSessions(data) {
  const names = new Map(data.leads.map((l) => [l.lead_id, l.known ? l.email : "anonymous lead"]));
  return sessionList(`Sessions of all its leads (${data.session_count})`, data, "Sessions, newest first",
    async (page) => (await api(cardPath(data.card.card_id, `?page=${page}`))).data, names);
}

/** A click-stream 5 sessions at a time, newest first: `first` is page 0 as the API sent it, `fetchPage(n)`
 * gets page n. `names`: lead id -> name, for a stream of several leads. */
function sessionList(title, first, label, fetchPage, names) {
  const list = h("ol", { class: "sessions", "aria-label": label });
  const more = h("button", { type: "button", class: "more secondary" }, "5 more sessions");
  let page = 0;
  const add = (data) => {
    list.append(...data.sessions.map((s) => renderSession(s, names)));
    more.hidden = !data.has_more;
  };
  more.onclick = async () => {
    more.disabled = true;
    try { add(await fetchPage(page + 1)); page += 1; }
    catch (err) { say(`Sessions: ${err.message}`, true); }
    finally { more.disabled = false; }
  };
  add(first);
  return h("div", { class: "click-stream" }, h("h4", {}, title),
    first.sessions.length ? null : h("p", { class: "muted" }, "No sessions yet."), list, more);
}

function renderSession(s, names) {
  const who = s.lead_id ? ` · ${names.get(s.lead_id) || s.lead_id}` : "";
  return h("li", { class: "session", dataset: { session: s.session_id } },
    h("div", { class: "head" }, `${when(s.start_ms)} · ${s.channel}${who}`),
    h("div", { class: "muted" }, `${plural(s.event_count, "event")} · ${duration(s.duration_ms)} · ${s.landing_url}`),
    h("ol", { class: "events" }, s.events.map((e) =>
      h("li", {}, h("span", { class: "type" }, e.type), h("span", { class: "at" }, new Date(e.ts_ms).toLocaleTimeString()),
        e.url || e.name || e.title))));
}

// ---------------------------------------------------------------- what the page's other view uses (segments.js)

window.leadBoard = Object.freeze({
  api, h, say, when, ago, facts, leadName, openCard, openLead, openPanel,
  signedIn: () => Boolean(state.site && state.key),
  credentials: () => ({ site: state.site, key: state.key }),
  board: () => state.board,  // {id, name, card, stages} once a board is loaded
});

// ---------------------------------------------------------------- start

function start() {
  $("#login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(STORE.site, e.target.elements.site.value.trim());
    sessionStorage.setItem(STORE.key, e.target.elements.key.value);
    e.target.elements.key.value = "";
    start();
  });
  $("#board-select").onchange = (e) => openBoard(e.target.value);
  $("#add-account").onsubmit = addAccount;
  $("#panel .close").onclick = closePanel;
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("#panel").hidden) closePanel(); });
  setInterval(() => document.querySelectorAll(".in-stage").forEach((n) => { n.textContent = ago(Number(n.dataset.since)); }), 60000);
  if (!readCredentials()) { askForCredentials(); return; }
  loadBoards().catch((err) => say(err.message, true));
}

start();
