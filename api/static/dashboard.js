// The analytics page at /: the site summary, the recent leads and a lead's profile, read from the
// /v1 API. Every value from the API becomes text in nodes made here (never HTML), so data cannot become markup.
"use strict";

const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("site") && fragment.get("key")) {
  sessionStorage.setItem("leadstream.site", fragment.get("site"));
  sessionStorage.setItem("leadstream.key", fragment.get("key"));
  history.replaceState(null, "", location.pathname + location.search);  // the key leaves the address bar
}
const site = sessionStorage.getItem("leadstream.site");
const key = sessionStorage.getItem("leadstream.key");
const el = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children.flat());
  return node;
}

async function api(path) {
  const r = await fetch(`/v1/sites/${encodeURIComponent(site)}${path}`, { headers: { "X-API-Key": key || "" } });
  const body = await r.json();
  if (!r.ok) throw new Error(`${body.title}${body.detail ? ": " + body.detail : ""}`);
  return body;
}

const titles = { events_by_type: "Events by type", events_by_channel: "Events by channel (humans)",
  sessions_by_channel: "Sessions by channel", leads: "Visitors and leads", top_accounts: "Top accounts", bots: "Bots (flagged, kept)" };

function showError(where, message) {
  el(where).replaceChildren(h("span", { class: "err" }, message));
}

async function load() {
  if (!site || !key) { showError("site", "open this page as /#site=SITE&key=KEY"); return; }
  el("site").textContent = `site ${site}`;
  try {
    const summary = await api("/summary");
    el("summary").replaceChildren(...Object.entries(summary).map(([name, rows]) =>
      h("div", { class: "card" }, h("h2", {}, titles[name] || name),
        h("table", {}, rows.map(([label, n]) =>
          h("tr", {}, h("td", {}, String(label || "(none)")), h("td", { class: "n" }, Number(n).toLocaleString())))))));
    const leads = await api("/leads?limit=25");
    el("leads").replaceChildren(...leads.map((lead) =>
      h("tr", {},
        h("td", {}, h("a", { onclick: () => profile(lead.lead_id) },
          lead.known ? String(lead.email) : `Anonymous lead ${String(lead.lead_id).slice(-6)}`)),
        h("td", {}, String(lead.account || "")),
        h("td", { class: "n" }, String(lead.visitors)))));
  } catch (e) { showError("site", e.message); }
}

async function profile(id) {
  try { el("profile").textContent = JSON.stringify(await api(`/leads/${encodeURIComponent(id)}`), null, 2); }
  catch (e) { showError("profile", e.message); }
}

load();
