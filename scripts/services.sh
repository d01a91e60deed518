#!/usr/bin/env bash
# Install and start the system services the whole test suite needs, beside the virtualenv that
# scripts/bootstrap.sh makes: Debian packages (a one-node SLURM cluster, Chromium for the browser
# tests, HAProxy and pgbouncer for the scale-out tests) and whatever each scripts/services/*.sh
# starts. Needs root for apt-get (CI runs as root); idempotent, so running it twice is harmless.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(slurm-wlm slurmdbd mariadb-server munge chromium haproxy pgbouncer)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "services: missing Debian packages (${missing[*]}); run this script as root" >&2
    exit 2
  fi
  echo "services: installing ${missing[*]}" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# One script per service; each starts its service if it is not running yet.
for script in scripts/services/*.sh; do
  [ -e "$script" ] || continue
  echo "services: $script" >&2
  bash "$script"
done
echo "services: ready" >&2
