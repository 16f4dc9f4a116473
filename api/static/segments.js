// LeadBoard page, segments view: the site's segments with their member counts, a segment's members (sorted
// by score or last seen, a page at a time, downloadable as CSV), and a click on a member opens its card's
// panel when the board shows it, else its Lead Profile or its account's leads, read-only. The panels are the
// board page's (window.leadBoard, board.js); every value from the API becomes text, never markup.
"use strict";

(() => {
  const lb = window.leadBoard;
  const { h } = lb;
  const $ = (selector) => document.querySelector(selector);
  const enc = encodeURIComponent;
  const PAGE = 50;
  const view = { segment: null, sort: "score", cursor: null, request: 0 };

  // ---------------------------------------------------------------- the two tabs

  function showTab(name) {
    for (const [tab, panel] of [["#tab-board", "#board"], ["#tab-segments", "#segments-view"]]) {
      const selected = tab === `#tab-${name}`;
      $(tab).setAttribute("aria-selected", String(selected));
      $(tab).tabIndex = selected ? 0 : -1;
      $(panel).hidden = !selected;
    }
    if (name === "segments") loadSegments();
  }

  // ---------------------------------------------------------------- the segments and their counts

  async function loadSegments() {
    if (!lb.signedIn()) { lb.say("Enter the site and an API key for it.", true); return; }
    let data;
    try { data = (await lb.api("/segments")).data; }
    catch (err) { lb.say(`Segments: ${err.message}`, true); return; }
    const list = $("#segment-list .segments");
    if (!data.segments.length) {
      list.replaceChildren(h("li", { class: "muted" }, "No segments yet: PUT one to /v1/sites/{site}/segments/{id}."));
      $("#members").hidden = true;
      return;
    }
    list.replaceChildren(...data.segments.map((segment) => h("li", {},
      h("button", {
        type: "button", dataset: { segment: segment.id }, "aria-pressed": String(segment.id === view.segment?.id),
        onclick: () => openSegment(segment),
      },
      h("span", { class: "name" }, segment.name),
      h("span", { class: "count", "aria-label": "members" }, segment.members.toLocaleString()),
      h("span", { class: "detail" }, segment.of === "account" ? "accounts" : "leads",
        segment.imported_by.length ? ` · cards on ${segment.imported_by.join(", ")}` : "")))));
    const current = data.segments.find((s) => s.id === view.segment?.id) || data.segments[0];
    openSegment(current);
  }

  function openSegment(segment) {
    view.segment = segment;
    for (const button of document.querySelectorAll("#segment-list button")) {
      button.setAttribute("aria-pressed", String(button.dataset.segment === segment.id));
    }
    $("#members").hidden = false;
    $("#members-title").textContent = segment.name;
    loadMembers(true);
  }

  // ---------------------------------------------------------------- the members table

  const COLUMNS = {
    lead: [["Lead"], ["Account"], ["Score", "score"], ["Tags"], ["Last seen", "last_seen"], ["Channel"]],
    account: [["Company"], ["Domain"], ["Leads"], ["Score", "score"], ["Last seen", "last_seen"]],
  };

  function renderHead(of) {
    $("#members-table thead").replaceChildren(h("tr", {}, COLUMNS[of].map(([title, sort]) => {
      if (!sort) return h("th", { scope: "col" }, title);
      const sorted = view.sort === sort;
      return h("th", { scope: "col", class: "num", "aria-sort": sorted ? "descending" : "none" },
        h("button", { type: "button", dataset: { sort }, title: `Sort by ${title.toLowerCase()}, highest first`,
          onclick: () => { if (view.sort !== sort) { view.sort = sort; loadMembers(true); } } }, title));
    })));
  }

  async function loadMembers(reset) {
    const segment = view.segment;
    const request = ++view.request;  // answers to older requests (another segment, another sort) are dropped
    const params = new URLSearchParams({ sort: view.sort, limit: String(PAGE) });
    if (!reset && view.cursor) params.set("cursor", view.cursor);
    let data;
    try { data = (await lb.api(`/segments/${enc(segment.id)}/members?${params}`)).data; }
    catch (err) { lb.say(`Members of ${segment.name}: ${err.message}`, true); return; }
    if (request !== view.request) return;
    const body = $("#members-table tbody");
    if (reset) {
      renderHead(data.of);
      body.replaceChildren();
    }
    body.append(...data.members.map((member) => (data.of === "account" ? accountRow(member) : leadRow(member))));
    const shown = body.rows.length;
    $("#members-count").textContent = `${data.count.toLocaleString()} ${data.of === "account" ? "accounts" : "leads"}`
      + (shown < data.count ? ` · ${shown.toLocaleString()} shown` : "");
    view.cursor = data.next_cursor;
    $("#members-more").hidden = !data.next_cursor;
  }

  const lastSeen = (ms) => h("td", { class: "num", title: lb.when(ms) }, ms ? `${lb.ago(ms)} ago` : "");

  function leadRow(m) {
    const channel = m.first_channel === m.last_channel ? m.first_channel : `${m.first_channel} → ${m.last_channel}`;
    return h("tr", { dataset: { member: m.lead_id } },
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => openMember("lead", m) }, m.name)),
      h("td", {}, m.account_domain),
      h("td", { class: "num" }, String(m.score)),
      h("td", {}, h("div", { class: "tags" }, m.tags.map((t) => h("span", { class: "tag" }, t)))),
      lastSeen(m.last_seen_ms),
      h("td", {}, channel));
  }

  function accountRow(m) {
    return h("tr", { dataset: { member: m.domain } },
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => openMember("account", m) },
        m.company_name || m.domain)),
      h("td", {}, m.domain),
      h("td", { class: "num" }, String(m.leads)),
      h("td", { class: "num" }, String(m.score)),
      lastSeen(m.last_seen_ms));
  }

  // ---------------------------------------------------------------- CSV: fetched with the key header (a link
  // cannot send it, and a key in a URL is refused), then saved from memory

  async function downloadCsv() {
    const segment = view.segment;
    const { site, key } = lb.credentials();
    const response = await fetch(`/v1/sites/${enc(site)}/segments/${enc(segment.id)}/members.csv?sort=${view.sort}`,
      { headers: { "X-API-Key": key } });
    if (!response.ok) { lb.say(`CSV of ${segment.name}: HTTP ${response.status}`, true); return; }
    const url = URL.createObjectURL(await response.blob());
    const link = h("a", { href: url, download: `segment-${segment.id}.csv`, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ---------------------------------------------------------------- a member's panel

  /** The member's card on the board shown, if that board can hold it: an account's card on a board of account
   * cards; a lead's on a board of lead cards, or on one of account cards when the lead has no account. */
  function cardOf(of, m) {
    const board = lb.board();
    if (!board || !board.card) return null;
    if (of === "account") return board.card === "account" ? `account:${m.domain}` : null;
    return board.card === "lead" || !m.account_domain ? `lead:${m.lead_id}` : null;
  }

  async function openMember(of, m) {
    const cardId = cardOf(of, m);
    if (cardId) {
      if (await lb.openCard(cardId)) return;
      lb.say("");  // not on this board after all: the read-only view below says so
    }
    if (of === "account") await showAccount(m);
    else await lb.openLead(m.lead_id);
  }

  /** An account without a card on this board: what the segment knows of it and its leads, each opening its Lead
   * Profile. */
  function showAccount(m) {
    const title = m.company_name || m.domain;
    return lb.openPanel(`Account ${m.domain}`, `/accounts/${enc(m.domain)}/leads`, (leads) => [title, [
      h("p", { class: "muted read-only" }, "Not a card on this board: shown read-only."),
      lb.facts([["Domain", m.domain], ["Company", m.company_name], ["Leads", m.leads], ["Best score", m.score],
        ["Last seen", lb.when(m.last_seen_ms)]]),
      h("h3", {}, `Leads (${leads.length})`),
      h("ul", { class: "leads" }, leads.map((l) => h("li", {},
        h("button", { type: "button", class: "link", onclick: () => lb.openLead(l.lead_id) }, lb.leadName(l)),
        h("span", { class: "muted" }, ` · last seen ${lb.when(l.last_seen_ms)}`)))),
    ]]);
  }

  // ---------------------------------------------------------------- start

  $("#tab-board").addEventListener("click", () => showTab("board"));
  $("#tab-segments").addEventListener("click", () => showTab("segments"));
  $("#views").addEventListener("keydown", (e) => {  // arrow keys move between the tabs
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
    const next = $("#tab-board").getAttribute("aria-selected") === "true" ? "segments" : "board";
    showTab(next);
    $(`#tab-${next}`).focus();
  });
  $("#members-more").addEventListener("click", () => loadMembers(false));
  $("#members-csv").addEventListener("click", () => downloadCsv().catch((err) => lb.say(err.message, true)));
})();
