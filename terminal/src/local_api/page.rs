//! The operator's status page: one self-contained HTML document (no external assets — the
//! till may be offline) that polls `/status` and offers Retry, Reconcile and Verify.
//!
//! Element ids are part of the page's contract with its browser test: `online`,
//! `catalog-version`, `catalog-age`, `last-contact`, `snapshot`, `queue`, `oldest-pending`, `attention`,
//! `verify-btn`, `reconcile-btn`, `retry-all-btn`, `action-result`.
//!
//! Its buttons post with this daemon run's page token (embedded in a `<meta>` tag by
//! [`with_token`]), which opens the operator's actions only (see `access`).

/// Placeholder of the page token in [`STATUS_PAGE`].
const TOKEN_SLOT: &str = "{{PAGE_TOKEN}}";

/// The page as served: [`STATUS_PAGE`] with `token` in its slot. The token is generated
/// (`pgt_` + hex), so it needs no HTML escaping.
pub fn with_token(token: &str) -> String {
    STATUS_PAGE.replacen(TOKEN_SLOT, token, 1)
}

/// The page, served at `GET /`.
pub const STATUS_PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>possync terminal</title>
<meta name="possync-page-token" content="{{PAGE_TOKEN}}">
<style>
  :root { --ok:#1a7f37; --bad:#b42318; --warn:#b54708; --muted:#667085; --line:#e4e7ec; }
  * { box-sizing: border-box; }
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #101828; background: #f9fafb; }
  header { display: flex; align-items: center; gap: 12px; padding: 14px 20px; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 17px; margin: 0; }
  header .ids { color: var(--muted); font-size: 13px; }
  .pill { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 13px; }
  .pill.ok { background: #dcfae6; color: var(--ok); }
  .pill.bad { background: #fee4e2; color: var(--bad); }
  .pill.unknown { background: #f2f4f7; color: var(--muted); }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 14px; padding: 16px 20px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
  section h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); margin: 0 0 8px; }
  .big { font-size: 24px; font-weight: 650; }
  .muted { color: var(--muted); }
  .warn { color: var(--warn); font-weight: 600; }
  table { border-collapse: collapse; width: 100%; font-size: 14px; }
  td, th { text-align: left; padding: 4px 6px; border-bottom: 1px solid var(--line); vertical-align: top; }
  th { color: var(--muted); font-weight: 500; }
  button { font: inherit; padding: 5px 12px; border-radius: 7px; border: 1px solid #d0d5dd; background: #fff; cursor: pointer; }
  button.primary { background: #175cd3; border-color: #175cd3; color: #fff; }
  button:disabled { opacity: .55; cursor: default; }
  .actions { display: flex; gap: 8px; flex-wrap: wrap; margin-bottom: 8px; }
  progress { width: 100%; }
  #action-result { white-space: pre-wrap; font-size: 14px; min-height: 1.4em; }
  #action-result.error { color: var(--bad); }
  #outage { color: var(--bad); font-weight: 600; }
  .wide { grid-column: 1 / -1; }
</style>
</head>
<body>
<header>
  <h1>possync terminal</h1>
  <span id="online" class="pill unknown">…</span>
  <span class="ids" id="ids"></span>
  <span class="ids" id="updated" style="margin-left:auto"></span>
</header>
<main>
  <section>
    <h2>Catalog</h2>
    <div class="big">v<span id="catalog-version">–</span></div>
    <div><span id="catalog-entities">0</span> entities · last change <span id="catalog-age">never</span></div>
    <div class="muted">cloud last answered <span id="last-contact">never</span></div>
    <div id="snapshot" class="muted"></div>
  </section>
  <section>
    <h2>Sales queue</h2>
    <div id="outage" hidden></div>
    <div class="big"><span id="queued">0</span> waiting</div>
    <div id="queue" class="muted"></div>
    <div id="oldest-pending"></div>
  </section>
  <section>
    <h2>Catalog check</h2>
    <div class="actions">
      <button id="verify-btn" class="primary" type="button">Verify</button>
      <button id="reconcile-btn" type="button">Reconcile</button>
    </div>
    <div id="action-result" class="muted">Verify compares the local catalog with the cloud; Reconcile repairs it.</div>
  </section>
  <section class="wide">
    <h2>Needs attention <span id="attention-count" class="muted"></span></h2>
    <div class="actions"><button id="retry-all-btn" type="button">Retry all</button></div>
    <table><thead><tr><th>#</th><th>receipt</th><th>attempts</th><th>error</th><th></th></tr></thead>
      <tbody id="attention"></tbody></table>
  </section>
  <section class="wide">
    <h2>Sync workers</h2>
    <table><thead><tr><th>actor</th><th>state</th><th>restarts</th><th>last error</th></tr></thead>
      <tbody id="actors"></tbody></table>
    <div id="errors" class="muted"></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function text(el, value) { el.textContent = value == null ? "" : String(value); }
function ago(seconds) {
  if (seconds == null) return "never";
  if (seconds < 60) return seconds + " s ago";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
  return Math.floor(seconds / 86400) + " d ago";
}
function age(seconds) { return ago(seconds).replace(" ago", ""); }
function cell(row, value) { const td = document.createElement("td"); text(td, value); row.appendChild(td); return td; }

const PAGE_TOKEN = document.querySelector('meta[name="possync-page-token"]').content;
async function post(path, body) {
  const res = await fetch(path, { method: "POST",
    headers: { "content-type": "application/json", "authorization": "Bearer " + PAGE_TOKEN },
    body: JSON.stringify(body) });
  let data = null;
  try { data = await res.json(); } catch (_) { data = null; }
  if (res.status === 401) {
    // The page token is drawn per daemon run: after a restart, this copy of the page holds a
    // stale one. A reload fetches the current one.
    setTimeout(() => location.reload(), 1500);
    throw new Error("the daemon restarted since this page was loaded; reloading, then try again");
  }
  if (!res.ok) {
    const err = data && data.error ? data.error.code + ": " + data.error.message : "HTTP " + res.status;
    throw new Error(err);
  }
  return data;
}

function render(s) {
  const online = $("online");
  if (s.online === true) { online.className = "pill ok"; text(online, "online"); }
  else if (s.online === false) { online.className = "pill bad"; text(online, "offline"); }
  else { online.className = "pill unknown"; text(online, "unknown"); }
  const outage = $("outage");
  if (s.offline_since) {
    outage.hidden = false;
    text(outage, "cloud unreachable since " + new Date(s.offline_since).toLocaleString() +
      " (" + ago(s.offline_seconds) + "): sales are recorded and will be sent by themselves when it is back");
  } else { outage.hidden = true; text(outage, ""); }
  const change = (s.identity_changes || []).slice(-1)[0];
  text($("ids"), (s.branch_id || "not enrolled") + " · terminal " + (s.terminal_id || "–") + " · pos " + s.pos_id +
    (change ? " · identity " + change.reason + " " + change.at.slice(0, 19) + "Z (re-keyed " + change.rekeyed +
      ", already in cloud " + change.already_held + ")" : ""));
  text($("updated"), "updated " + new Date(s.generated_at).toLocaleTimeString());

  const c = s.catalog;
  text($("catalog-version"), c.version == null ? "–" : c.version);
  text($("catalog-entities"), c.entities);
  text($("catalog-age"), ago(c.age_seconds));
  text($("last-contact"), s.last_contact_at
    ? ago(Math.max(0, Math.round((Date.parse(s.generated_at) - Date.parse(s.last_contact_at)) / 1000)))
    : (s.daemon_running ? "never" : "unknown (daemon not running)"));
  const snap = $("snapshot");
  snap.replaceChildren();
  if (c.snapshot.in_progress) {
    const p = document.createElement("progress");
    p.max = Math.max(c.snapshot.total, 1); p.value = c.snapshot.received;
    const label = document.createElement("div");
    text(label, "first snapshot: " + c.snapshot.received + " / " + c.snapshot.total +
      (c.snapshot.percent == null ? "" : " (" + c.snapshot.percent + "%)"));
    snap.append(label, p);
  }

  const o = s.outbox;
  text($("queued"), o.queued);
  text($("queue"), "pending " + o.pending + " · in flight " + o.in_flight + " · retrying " + o.failed +
    " · synced " + o.synced + " · needs attention " + o.needs_attention);
  const oldest = $("oldest-pending");
  if (o.oldest_pending_age_seconds == null) { oldest.className = "muted"; text(oldest, "nothing waiting"); }
  else {
    oldest.className = o.oldest_pending_age_seconds > 300 ? "warn" : "";
    text(oldest, "oldest waiting sale: " + age(o.oldest_pending_age_seconds));
  }

  text($("attention-count"), "(" + o.needs_attention + ")");
  const tbody = $("attention");
  tbody.replaceChildren();
  for (const r of s.needs_attention) {
    const tr = document.createElement("tr");
    cell(tr, r.local_event_id);
    cell(tr, r.receipt_no || "");
    cell(tr, r.attempts);
    cell(tr, (r.last_error_code || "") + (r.last_error_message ? " — " + r.last_error_message : ""));
    const td = document.createElement("td");
    const b = document.createElement("button");
    b.type = "button"; b.textContent = "Retry"; b.className = "retry-btn";
    b.onclick = () => act(b, "/outbox/retry", { journal_id: r.journal_id },
      (d) => "Released " + d.released + " sale(s) for retry.");
    td.appendChild(b); tr.appendChild(td); tbody.appendChild(tr);
  }
  $("retry-all-btn").disabled = o.needs_attention === 0;

  const actors = $("actors");
  actors.replaceChildren();
  for (const a of s.actors) {
    const tr = document.createElement("tr");
    cell(tr, a.name); cell(tr, a.state); cell(tr, a.restarts); cell(tr, a.last_error || "");
    actors.appendChild(tr);
  }
  text($("errors"), s.daemon_running ? "" : "The sync daemon is not running.");
}

function describeReconcile(r) {
  const verb = r.applied ? "Reconcile applied" : "Verify";
  const drift = (r.upserts || 0) + (r.deletes || 0);
  const head = r.applied
    ? verb + ": repaired " + drift + " entr" + (drift === 1 ? "y" : "ies")
    : verb + ": " + (drift === 0 ? "catalog matches the cloud" : drift + " entr" + (drift === 1 ? "y differs" : "ies differ"));
  return head + " (checked " + (r.checked || 0) + ", unchanged " + (r.unchanged || 0) +
    ", upserts " + (r.upserts || 0) + ", deletes " + (r.deletes || 0) +
    (r.catalog_version == null ? "" : ", catalog v" + r.catalog_version) +
    (r.round_trips == null ? "" : "; cost " + r.round_trips + " round trip" + (r.round_trips === 1 ? "" : "s") +
      ", " + (r.bytes_sent || 0) + " B sent, " + (r.bytes_received || 0) + " B received" +
      (r.method ? " by " + r.method : "")) + ")";
}

async function act(button, path, body, describe) {
  const out = $("action-result");
  button.disabled = true;
  out.className = "muted";
  text(out, "working…");
  try {
    const data = await post(path, body);
    out.className = "";
    text(out, describe(data));
  } catch (e) {
    out.className = "error";
    text(out, e.message);
  } finally {
    button.disabled = false;
    refresh();
  }
}

let refreshing = false;
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const res = await fetch("/status", { cache: "no-store" });
    if (res.ok) render(await res.json());
  } catch (_) {
    const online = $("online"); online.className = "pill bad"; text(online, "daemon unreachable");
  } finally { refreshing = false; }
}

$("verify-btn").onclick = () => act($("verify-btn"), "/reconcile", { mode: "verify" }, describeReconcile);
$("reconcile-btn").onclick = () => act($("reconcile-btn"), "/reconcile", { mode: "apply" }, describeReconcile);
$("retry-all-btn").onclick = () => act($("retry-all-btn"), "/outbox/retry", { all: true },
  (d) => "Released " + d.released + " sale(s) for retry.");
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"##;
