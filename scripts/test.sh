#!/usr/bin/env bash
# Run dqr's test suite. On a fresh Debian bookworm machine (as root) this
# installs what the real-PACS tests need (Orthanc, its DICOMweb plugin, dcmtk),
# PostgreSQL for the scale-out tests and Python's venv module, bootstraps
# .venv, then runs pytest; extra arguments go to pytest and the exit code is
# pytest's.
#
#   bash scripts/test.sh                  # everything
#   bash scripts/test.sh -m 'not slow' -x # pytest options pass through
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_bootstrap.sh

DEBIAN_PACKAGES=(orthanc orthanc-dicomweb dcmtk postgresql python3 python3-venv)

missing_debian_packages() {
    [[ -x /usr/sbin/Orthanc ]] || return 0
    [[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || return 0
    command -v getscu >/dev/null || return 0
    # The server binaries live in a folder per major version (15 on bookworm).
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || return 0
    python3 -c 'import ensurepip, venv' 2>/dev/null || return 0
    return 1
}

install_debian_packages() {
    local sudo=()
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install ${DEBIAN_PACKAGES[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo ">> apt-get install ${DEBIAN_PACKAGES[*]}" >&2
    # The orthanc and postgresql packages' postinsts start system services.
    # The tests run their own Orthanc and PostgreSQL clusters, so forbid
    # service starts for the install (a policy-rc.d answering 101), unless the
    # machine already has a policy.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        own_policy=1
    fi
    local status=0
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || status=$?
    if [[ $status -eq 0 ]]; then
        # A failing service start in a postinst must not stop us: what counts
        # is whether the files are there, checked below.
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${DEBIAN_PACKAGES[@]}" \
            || echo ">> apt-get install reported an error (a service start?); checking the files" >&2
    fi
    if [[ $own_policy -eq 1 ]]; then "${sudo[@]}" rm -f "$policy"; fi
    [[ $status -eq 0 ]] || { echo "apt-get update failed" >&2; exit 1; }
    if missing_debian_packages; then
        echo "still missing after apt-get install: Orthanc, its DICOMweb plugin, dcmtk, PostgreSQL or python3-venv" >&2
        exit 1
    fi
}

if missing_debian_packages; then
    install_debian_packages
fi
ensure_venv test
exec .venv/bin/python -m pytest "$@"
