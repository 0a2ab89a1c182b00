#!/usr/bin/env bash
# Peer (c): "inotifywait + curl" without the inotifywait: the two curl calls per file, in a loop.
# usage: curl_loop.sh BASE_URL TOKEN DIR  (with CA_FILE set, HTTPS trusts that CA: --cacert)
set -euo pipefail
base=$1 token=$2 dir=$3
ca=()
if [ -n "${CA_FILE:-}" ]; then ca=(--cacert "$CA_FILE"); fi
n=0
for f in "$dir"/*.wav; do
  name=$(basename "$f")
  id=$(curl -sS --fail "${ca[@]}" -H "X-API-Token: $token" -H 'Content-Type: application/json' \
    -d "{\"type\":\"audio\",\"languageTag\":\"en-us\",\"vertical\":\"default\",\"originalFilename\":\"$name\"}" \
    "$base/interactions" | sed -E 's/.*"interactionIdentifier" *: *"([^"]+)".*/\1/')
  code=$(curl -sS "${ca[@]}" -o /dev/null -w '%{http_code}' -H "X-API-Token: $token" \
    -F "$name=@$f;type=application/octet-stream" "$base/interactions/$id/upload")
  [ "$code" = 201 ] || { echo "$name: upload answered $code" >&2; exit 1; }
  n=$((n + 1))
done
echo "$n"
