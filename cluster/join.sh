#!/usr/bin/env bash
# Join this Mac to the Orchard cluster whose head runs on HEAD_IP.
#   cluster/join.sh HEAD_IP[:PORT] [--dry-run] [--pin-ports] [--node-ip-address IP] [other `ray start` flags]
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: $0 HEAD_IP[:PORT] [--dry-run] [ray start flags...]" >&2
  exit 2
fi
head="$1"; shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
exec "$python" "$root/cluster/orchard_node.py" worker --address "$head" "$@"
