# Sourced by the other scripts: create or refresh .venv from pyproject.toml, then put it first on PATH.
# Needs only a Python >= 3.10 on the machine (set PYTHON=... to choose one).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "error: $PYTHON is older than Python 3.10" >&2; exit 1; }
# The stamp names a hash of pyproject.toml: editing the dependencies refreshes the environment.
STAMP="$VENV/.installed-$("$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest()[:16])' "$ROOT/pyproject.toml")"
if [ ! -f "$STAMP" ]; then
  echo "setting up $VENV from pyproject.toml (the first time takes a few minutes) ..." >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-compile -e "$ROOT[data,dev,eval]" \
      >"$VENV/install.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/install.log" | tail -40 >&2
    echo "error: installing the environment failed; full log in $VENV/install.log" >&2
    exit 1
  fi
  # pip byte-compiles one file at a time; compileall uses every core (about 40% less time on 2 cores). Its exit
  # status is not checked: a few test files inside the packages use newer syntax than this Python, as with pip.
  "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >/dev/null 2>&1 || true
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
