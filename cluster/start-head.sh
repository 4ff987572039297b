#!/usr/bin/env bash
# Start the Ray head of an Orchard cluster on this Mac (run from anywhere).
#   cluster/start-head.sh [--dry-run] [--pin-ports] [--node-ip-address IP] [other `ray start` flags]
# Then on every other Mac: cluster/join.sh THIS_MAC_IP
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The Python of `make install`, so the `ray` next to it is the one Orchard runs with.
python="$root/.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
exec "$python" "$root/cluster/orchard_node.py" head "$@"
