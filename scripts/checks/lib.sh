# Shared helpers of the runtime checks (sourced, not run). Requires bash, curl and python3
# (standard library only).
#
# Every check reads:
#   CLOUD_URL          base URL of a live cloud, e.g. http://127.0.0.1:8080
#   POSSYNC_TOKEN      a terminal's bearer token
# and, where the check needs the token's identity (`cloud terminal add` prints them):
#   POSSYNC_TERMINAL_ID, POSSYNC_BRANCH_ID
# Optional:
#   EVIDENCE           a JSON-lines file each step appends one record to
#                      {"check","step","command","http_status","verdict","detail"}
# A check prints one line per step and exits non-zero if any step failed.

set -uo pipefail

: "${CLOUD_URL:?set CLOUD_URL to the cloud base URL}"
CLOUD_URL="${CLOUD_URL%/}"
CHECK_NAME="${CHECK_NAME:-$(basename "$0")}"
FAILED=0
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

need_token() { : "${POSSYNC_TOKEN:?set POSSYNC_TOKEN to a terminal token}"; }
need_identity() {
  need_token
  : "${POSSYNC_TERMINAL_ID:?set POSSYNC_TERMINAL_ID (from cloud terminal add)}"
  : "${POSSYNC_BRANCH_ID:?set POSSYNC_BRANCH_ID (from cloud terminal add)}"
}

# json FILE EXPR — evaluates a Python expression over the parsed JSON `d` and prints it.
json() {
  python3 - "$1" "$2" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception:
    d = None
try:
    v = eval(sys.argv[2], {"d": d, "len": len, "sum": sum, "all": all, "any": any})
except Exception as e:
    v = f"<error: {e}>"
print(json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v)
PY
}

# http NAME METHOD PATH [BODY_FILE] [extra curl args...] — sets STATUS, BODY (file), HEADERS
# (file) and CMD (the command as shown in the evidence, with the token written as a variable).
http() {
  local name="$1" method="$2" path="$3" body="${4:-}"
  if [ "$#" -ge 4 ]; then shift 4; else shift "$#"; fi
  BODY="$WORK/$name.body"; HEADERS="$WORK/$name.headers"
  local args=(-sS -o "$BODY" -D "$HEADERS" -w '%{http_code}' -X "$method" "$CLOUD_URL$path")
  if [ -n "$body" ]; then args+=(-H 'content-type: application/json' --data-binary "@$body"); fi
  args+=("$@")
  local shown=() a
  for a in "$@"; do
    if [ -n "${POSSYNC_TOKEN:-}" ]; then a="${a//$POSSYNC_TOKEN/\$POSSYNC_TOKEN}"; fi
    shown+=("'$a'")
  done
  CMD="curl -X $method '$CLOUD_URL$path'${body:+ --data-binary @$(basename "$body")} ${shown[*]}"
  STATUS="$(curl "${args[@]}" 2>"$WORK/$name.err" || true)"
}

# Authorization header args for the configured token.
bearer() { AUTH=(-H "authorization: Bearer $POSSYNC_TOKEN"); }

header() { grep -i "^$1:" "$HEADERS" | head -1 | cut -d: -f2- | tr -d ' \r'; }

# verdict STEP OK DETAIL — records one step.
verdict() {
  local step="$1" ok="$2" detail="$3" v=pass
  if [ "$ok" != "true" ]; then v=fail; FAILED=1; fi
  printf '%-5s %-22s %-44s HTTP %s  %s\n' "$v" "$CHECK_NAME" "$step" "$STATUS" "$detail"
  if [ -n "${EVIDENCE:-}" ]; then
    python3 - "$CHECK_NAME" "$step" "$CMD" "$STATUS" "$v" "$detail" >>"$EVIDENCE" <<'PY'
import json, sys
c, s, cmd, st, v, d = sys.argv[1:7]
print(json.dumps({"check": c, "step": s, "command": cmd, "http_status": int(st) if st.isdigit() else st, "verdict": v, "detail": d}))
PY
  fi
}

# expect STEP WANT_STATUS CONDITION_RESULT DETAIL
expect() {
  local step="$1" want="$2" cond="$3" detail="$4" ok=false
  if [ "$STATUS" = "$want" ] && [ "$cond" = "true" ]; then ok=true; fi
  verdict "$step" "$ok" "want $want; $detail"
}

finish() { exit "$FAILED"; }

# sale_event FILE LOCAL_EVENT_ID [BRANCH] [TERMINAL] [POS_ID] — writes a valid one-event body.
sale_event() {
  python3 - "$@" <<'PY'
import json, sys, uuid, datetime
path, lei = sys.argv[1], int(sys.argv[2])
branch = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
terminal = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
pos = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else str(uuid.uuid4())
import os
ev = {"terminal_id": terminal or os.environ["POSSYNC_TERMINAL_ID"], "pos_id": pos,
      "local_event_id": lei, "branch_id": branch or os.environ["POSSYNC_BRANCH_ID"],
      "type": "sale", "occurred_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
      "payload": {"receipt_no": f"CHK-{lei:06d}", "currency": "EUR",
                  "lines": [{"product_id": "p-check", "sku": "SKU-CHK", "name": "Check", "qty": 2,
                             "unit_price_minor": 250, "discount_minor": 0, "tax_minor": 80, "total_minor": 500}],
                  "totals": {"subtotal_minor": 420, "tax_minor": 80, "total_minor": 500},
                  "payments": [{"method": "cash", "amount_minor": 500}]}}
json.dump({"events": [ev]}, open(path, "w"))
PY
}
