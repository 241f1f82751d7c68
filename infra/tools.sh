# shellcheck shell=bash
# Sourced by the infra/*-check.sh scripts: installs the checking tools they use into
# $PARLEY_HOME/tools (default <repo>/.parley/tools, ignored by git) once, then reuses them.
# Only package registries are used: the Go module proxy (go install), Debian's archive
# (apt-get download, unpacked without installing) and PyPI (pip).

# shellcheck disable=SC2034 # the versions are read by the scripts that source this file
KUSTOMIZE_VERSION="v5.7.1"
# shellcheck disable=SC2034
PROMTOOL_PACKAGE="prometheus"  # Debian's package, which ships promtool
PYTHON_PACKAGES="kubernetes-validate==1.37.0 jsonschema==4.26.0 pyyaml==6.0.3"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${PARLEY_HOME:-$REPO/.parley}/tools"
mkdir -p "$TOOLS/bin"

tools_log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }

# go_tool NAME PACKAGE VERSION [TAGS]: $TOOLS/bin/NAME built from PACKAGE@VERSION with the
# build tags TAGS, rebuilt when the version or the tags change. Prints the binary's path.
go_tool() {
    local name="$1" package="$2" version="$3" tags="${4:-}"
    local bin="$TOOLS/bin/$name" stamp="$TOOLS/bin/$name.version"
    if [ ! -x "$bin" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$version $tags" ]; then
        local go
        go="$(command -v go || echo /usr/local/go/bin/go)"
        [ -x "$go" ] || { tools_log "error: go is needed to install $name"; return 1; }
        tools_log "go install $package@$version (once; cached in $TOOLS/bin)"
        GOBIN="$TOOLS/bin" "$go" install -tags "$tags" "$package@$version" >&2 || return 1
        echo "$version $tags" >"$stamp"
    fi
    echo "$bin"
}

# deb_tool NAME PACKAGE: $TOOLS/bin/NAME taken from Debian's PACKAGE, downloaded and unpacked
# (not installed: nothing is started, nothing outside $TOOLS changes). Seconds, where
# building the same tool from its Go sources takes minutes. Prints the binary's path.
deb_tool() {
    local name="$1" package="$2"
    local bin="$TOOLS/bin/$name"
    if [ ! -x "$bin" ]; then
        tools_log "apt-get download $package (once; cached in $TOOLS/bin)"
        local work
        work="$(mktemp -d)"
        (cd "$work" && apt-get download "$package" >&2 2>/dev/null) \
            || { apt-get update >&2 && (cd "$work" && apt-get download "$package" >&2); } \
            || { rm -rf "$work"; return 1; }
        dpkg -x "$work"/"$package"_*.deb "$work/root" >&2 || { rm -rf "$work"; return 1; }
        cp "$work/root/usr/bin/$name" "$bin"
        rm -rf "$work"
    fi
    echo "$bin"
}

# python_tools: a venv holding $PYTHON_PACKAGES, rebuilt when that list changes. Prints its
# python.
python_tools() {
    local venv="$TOOLS/venv" stamp="$TOOLS/venv/packages"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$PYTHON_PACKAGES" ]; then
        tools_log "pip install $PYTHON_PACKAGES (once; cached in $venv)"
        python3 -m venv "$venv" >&2 || return 1
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $PYTHON_PACKAGES >&2 || return 1
        echo "$PYTHON_PACKAGES" >"$stamp"
    fi
    echo "$venv/bin/python"
}
