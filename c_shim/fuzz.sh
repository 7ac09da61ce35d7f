#!/usr/bin/env bash
# Coverage-guided fuzzing of the message reader in c_shim/msg.c (libFuzzer): c_shim/fuzz_msg.c.
# Not part of CI. Needs clang with its runtime (Debian: apt-get install clang-14
# libclang-rt-14-dev) and the project's virtualenv (python, to write c_shim/pyvfio_wire.h).
#
#   c_shim/fuzz.sh                            # 10 minutes, corpus in c_shim/build/fuzz-corpus
#   c_shim/fuzz.sh -max_total_time=3600       # any libFuzzer options
#   FUZZ_STANDALONE=1 c_shim/fuzz.sh FILE...  # gcc, no libFuzzer: run saved inputs (crash-*)
#
# A crash, a sanitizer report or a failed check stops the run and libFuzzer saves the input as
# c_shim/build/crash-<sha1>. docs/reliability.md has the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import runpy; runpy.run_path("c_shim/build_msg.py")'  # writes pyvfio_wire.h
mkdir -p c_shim/build
if [ -n "${FUZZ_STANDALONE:-}" ]; then
    gcc -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -DFUZZ_STANDALONE \
        -Ic_shim c_shim/fuzz_msg.c -o c_shim/build/fuzz_msg_standalone
    exec c_shim/build/fuzz_msg_standalone "$@"
fi
CLANG="${CLANG:-$(command -v clang || command -v clang-14)}"
"$CLANG" -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -Ic_shim c_shim/fuzz_msg.c -o c_shim/build/fuzz_msg
corpus=c_shim/build/fuzz-corpus
python c_shim/fuzz_seeds.py "$corpus"  # QEMU-shaped messages to start from
exec c_shim/build/fuzz_msg -artifact_prefix=c_shim/build/ -max_total_time=600 -max_len=8192 -timeout=10 -rss_limit_mb=1024 \
    -print_final_stats=1 "$@" "$corpus"
