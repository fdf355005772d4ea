# Shared by scripts/test.sh and scripts/demo.sh (sourced, not run): create or
# reuse the repo's .venv and install dqr into it, editable. Idempotent and
# quick on a second run: pip is skipped while a stamp in .venv matches the
# hash of pyproject.toml.

# ensure_venv [EXTRAS] -- EXTRAS like "test" (installs '.[test]'), or nothing.
ensure_venv() {
    local extras="${1:-}"
    local spec="." stamp_name="base"
    if [[ -n "$extras" ]]; then
        spec=".[$extras]"
        stamp_name="$extras"
    fi

    # A venv whose python no longer runs (repo moved, python upgraded) is rebuilt.
    if ! .venv/bin/python -c '' 2>/dev/null; then
        echo ">> creating .venv" >&2
        rm -rf .venv
        python3 -m venv .venv
    fi

    local key
    key="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    local stamp=".venv/.dqr-installed-$stamp_name"
    # The test extras include everything the base install has.
    if [[ "$(cat "$stamp" 2>/dev/null)" == "$key" || ( -z "$extras" && "$(cat .venv/.dqr-installed-test 2>/dev/null)" == "$key" ) ]] \
        && .venv/bin/python -c 'import dqr' 2>/dev/null; then
        return 0
    fi
    echo ">> installing dqr ($spec) into .venv" >&2
    .venv/bin/python -m pip install --quiet -e "$spec"
    echo "$key" > "$stamp"
}
