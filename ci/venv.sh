# Sourced by ci/test and ci/demo: a virtualenv with the project installed, on a fresh Debian
# 12/13 machine or a developer's (run as root for the apt part; others need python3-venv).
VENV="${PYVFIO_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "== installing python3-venv"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        fi
        python3 -m venv "$VENV"
    fi
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e "${PYVFIO_EXTRAS:-.}"
export PATH="$PWD/$VENV/bin:$PATH"
