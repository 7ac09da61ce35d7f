#!/usr/bin/env bash
# Run pytest against the C shim built with AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   c_shim/sanitize.sh tests/test_msg_shim.py -q          # any pytest arguments
#   PYVFIO_SANITIZE=undefined c_shim/sanitize.sh ...       # other -fsanitize= lists
#
# The three cffi modules are built with PYVFIO_SANITIZE (c_shim/cflags.py) into
# vfio_user_server/ under the interpreter's own extension suffix (.cpython-3XX-...so), which
# Python prefers to the .abi3.so that `pip install -e .` builds; they are removed again on exit,
# so the normal build is back afterwards. The interpreter itself is not instrumented: libasan is
# preloaded, and leak detection is off (CPython keeps its arenas to the end). Every sanitizer
# report aborts the process (-fno-sanitize-recover=all; halt_on_error), so a report is a failed
# run. Run it from the project's virtualenv (python on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYVFIO_SANITIZE="${PYVFIO_SANITIZE:-address,undefined}"
suffix=$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
built=()
cleanup() { [ -n "${PYVFIO_SANITIZE_KEEP:-}" ] || rm -f "${built[@]}"; }
trap cleanup EXIT
tmp=$(mktemp -d)
for b in dma msg poll; do
    out=$(python - "$b" "$tmp" <<'PY'
import runpy, sys
ns = runpy.run_path(f"c_shim/build_{sys.argv[1]}.py")
print(ns["ffibuilder"].compile(tmpdir=sys.argv[2]))
PY
)
    dest="vfio_user_server/_${b}_shim${suffix}"
    mv "$(echo "$out" | tail -n 1)" "$dest"
    built+=("$dest")
done
rm -rf "$tmp"
runtime=$(gcc -print-file-name=libasan.so)
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:abort_on_error=1:allow_user_segv_handler=1:handle_sigbus=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
case "$PYVFIO_SANITIZE" in
    *address*) LD_PRELOAD="$runtime${LD_PRELOAD:+:$LD_PRELOAD}" python -m pytest -p no:cacheprovider "$@" ;;
    *) python -m pytest -p no:cacheprovider "$@" ;;
esac
