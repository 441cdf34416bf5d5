//! The operator's fleet page, `GET /admin/fleet`: one self-contained HTML document that shows
//! `GET /v1/admin/fleet` per branch — terminals and their last contact, pending gap ranges
//! ("missing 1042–1047 from T") and chain breaks.
//!
//! The page itself holds no data and needs no token, so it is served without one: it asks the
//! operator for the admin token (kept in `sessionStorage`, i.e. this tab only, never in a URL
//! where logs and history would keep it) and fetches the JSON with `Authorization: Bearer`.
//! Everything it shows is written with `textContent`, never parsed as HTML.
//!
//! Element ids are part of the page's contract with its browser test (`cloud/tests/fleet_page.rs`):
//! `token`, `load-btn`, `forget-btn`, `fleet-status`, `branches`; each branch is a
//! `section.branch` with `data-branch`, holding `.terminal`, `.gap` and `.break` rows.

use actix_web::HttpResponse;

/// `GET /admin/fleet`: the page. `no-store`, and a policy that lets it talk to this origin
/// only and be framed by nobody (it handles the admin token).
pub async fn page() -> HttpResponse {
    let mut res = HttpResponse::Ok();
    res.content_type("text/html; charset=utf-8").insert_header((
        "content-security-policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
         connect-src 'self'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    ));
    for header in possync_protocol::OPERATOR_PAGE_HEADERS {
        res.insert_header(header);
    }
    res.body(FLEET_PAGE)
}

/// The page.
pub const FLEET_PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>possync fleet</title>
<style>
  :root { --ok:#1a7f37; --bad:#b42318; --warn:#b54708; --muted:#667085; --line:#e4e7ec; }
  * { box-sizing: border-box; }
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #101828; background: #f9fafb; }
  header { display: flex; align-items: center; gap: 12px; flex-wrap: wrap; padding: 14px 20px; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 17px; margin: 0; }
  input { font: inherit; padding: 4px 8px; border: 1px solid #d0d5dd; border-radius: 7px; min-width: 260px; }
  button { font: inherit; padding: 5px 12px; border-radius: 7px; border: 1px solid #d0d5dd; background: #fff; cursor: pointer; }
  button.primary { background: #175cd3; border-color: #175cd3; color: #fff; }
  main { display: grid; gap: 14px; padding: 16px 20px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
  section h2 { font-size: 16px; margin: 0 0 8px; }
  h3 { font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); margin: 12px 0 4px; }
  table { border-collapse: collapse; width: 100%; font-size: 14px; }
  td, th { text-align: left; padding: 4px 6px; border-bottom: 1px solid var(--line); vertical-align: top; }
  th { color: var(--muted); font-weight: 500; }
  .muted { color: var(--muted); }
  .gap { color: var(--warn); font-weight: 600; }
  .break, .needs-attention { color: var(--bad); font-weight: 600; }
  #fleet-status.error { color: var(--bad); }
</style>
</head>
<body>
<header>
  <h1>possync fleet</h1>
  <label for="token" class="muted">Admin token</label>
  <input id="token" type="password" autocomplete="off" spellcheck="false">
  <button id="load-btn" class="primary">Show</button>
  <button id="forget-btn">Forget token</button>
  <span id="fleet-status" class="muted">Enter the admin token.</span>
</header>
<main id="branches"></main>
<script>
"use strict";
const KEY = "possync-admin-token";
const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function ago(seconds) {
  if (seconds < 60) return seconds + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}
function status(text, error) {
  const s = $("fleet-status");
  s.textContent = text;
  s.className = error ? "error" : "muted";
}
function range(r) { return r[0] === r[1] ? String(r[0]) : r[0] + "\u2013" + r[1]; }
function render(f) {
  const branches = new Map();
  const branch = (id) => {
    if (!branches.has(id)) branches.set(id, { terminals: [], gaps: [], breaks: [] });
    return branches.get(id);
  };
  for (const t of f.terminals) branch(t.branch_id).terminals.push(t);
  for (const g of f.gaps) branch(g.branch_id).gaps.push(g);
  for (const b of f.chain_breaks) branch(b.branch_id).breaks.push(b);
  const main = $("branches");
  main.replaceChildren();
  const now = Date.parse(f.generated_at);
  for (const id of [...branches.keys()].sort()) {
    const b = branches.get(id);
    const sec = el("section", "branch");
    sec.dataset.branch = id;
    const missing = b.gaps.reduce((n, g) => n + g.missing_events, 0);
    sec.append(el("h2", "", "Branch " + id));
    sec.append(el("div", "muted", b.terminals.length + " terminal(s) \u00b7 " + missing +
      " sale(s) missing \u00b7 " + b.breaks.length + " chain break(s)"));
    sec.append(el("h3", "", "Terminals"));
    const table = el("table");
    const head = el("tr");
    for (const h of ["Terminal", "Name", "Last contact", "Catalog versions behind", "Needs attention"]) head.append(el("th", "", h));
    table.append(head);
    for (const t of b.terminals) {
      const tr = el("tr", "terminal");
      tr.dataset.terminal = t.terminal_id;
      tr.append(el("td", "", t.terminal_id));
      tr.append(el("td", "", (t.name || "") + (t.revoked_at ? " (revoked)" : "")));
      tr.append(el("td", "last-contact", t.last_contact_at
        ? ago(Math.max(0, Math.round((now - Date.parse(t.last_contact_at)) / 1000))) + " (" + t.last_contact_at + ")"
        : "never"));
      tr.append(el("td", "muted", t.catalog_versions_behind === null ? "not reported" : String(t.catalog_versions_behind)));
      tr.append(el("td", t.needs_attention > 0 ? "needs-attention" : "muted",
        t.needs_attention === null ? "not reported" : String(t.needs_attention)));
      table.append(tr);
    }
    sec.append(table);
    sec.append(el("h3", "", "Gaps"));
    if (b.gaps.length === 0) sec.append(el("div", "muted", "none"));
    for (const g of b.gaps) {
      const shown = g.missing.map(range).join(", ");
      const more = g.missing.reduce((n, r) => n + r[1] - r[0] + 1, 0) < g.missing_events ? ", \u2026" : "";
      sec.append(el("div", "gap", "missing " + shown + more + " from " + g.terminal_id +
        " (pos " + g.pos_id + ", " + g.missing_events + " sale(s))"));
    }
    sec.append(el("h3", "", "Chain breaks"));
    if (b.breaks.length === 0) sec.append(el("div", "muted", "none"));
    for (const k of b.breaks) {
      sec.append(el("div", "break", "chain break at event " + k.local_event_id + " of pos " + k.pos_id +
        " from " + k.terminal_id));
    }
    main.append(sec);
  }
  if (branches.size === 0) main.append(el("section", "muted", "No terminals enrolled."));
  status("As of " + f.generated_at + ".", false);
}
async function load() {
  const token = sessionStorage.getItem(KEY);
  if (!token) { status("Enter the admin token.", false); return; }
  status("Loading\u2026", false);
  try {
    const r = await fetch("/v1/admin/fleet", { headers: { "Authorization": "Bearer " + token }, cache: "no-store" });
    const body = await r.json().catch(() => null);
    if (!r.ok) {
      const code = body && body.error ? body.error.code + ": " + body.error.message : "HTTP " + r.status;
      status("Could not load the fleet (" + code + ").", true);
      return;
    }
    render(body);
  } catch (e) {
    status("Could not reach the cloud: " + e, true);
  }
}
$("load-btn").addEventListener("click", () => {
  const v = $("token").value.trim();
  if (v) sessionStorage.setItem(KEY, v);
  $("token").value = "";
  load();
});
$("token").addEventListener("keydown", (e) => { if (e.key === "Enter") $("load-btn").click(); });
$("forget-btn").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  $("branches").replaceChildren();
  status("Token forgotten. Enter the admin token.", false);
});
load();
setInterval(load, 30000);
</script>
</body>
</html>
"##;
