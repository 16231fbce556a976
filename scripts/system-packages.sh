#!/usr/bin/env bash
# Installs the Debian packages that the tests and benchmarks drive as real programs:
# curl (HTTP client), wrk and h2load (load), haproxy and nginx (benchmark peers and
# upstreams), iproute2 and iptables (network-namespace tests), chromium (the dashboard's
# browser test, driven by Playwright; no browser download). Runs apt only when
# something is missing; without root it says what to install and carries on.
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx-light)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v chromium >/dev/null || need+=(chromium)
((${#need[@]})) || exit 0
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then SUDO=sudo; else
        echo "missing Debian packages: ${need[*]} (run as root: apt-get install -y ${need[*]})" >&2
        exit 0
    fi
else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
