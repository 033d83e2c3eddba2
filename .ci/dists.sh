#!/usr/bin/env bash
# The distributions as a user installs them: wheels and sdists of the core and the three
# plugins (each wheel built from its sdist, so the sdist is complete), installed into a fresh
# venv from those files alone (their third-party dependencies from the package index); then
# `multifd plugins --check` and a demo from that venv, and a plugin written by
# `multifd new-plugin`, pip-installed there and its tests run. Everything lives in a temporary
# directory, removed at the end; run from the repository's root (.ci/run does).
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dist="$work/dist"
ours=(multifd-core multifd-zlib multifd-zstd multifd-lz4)

step() { printf '+ dists: %s\n' "$*"; }

step "build wheels and sdists into $dist"
"$python" -m venv "$work/build"
"$work/build/bin/pip" install -q build 'setuptools>=77'
for src in . plugins/multifd_zlib plugins/multifd_zstd plugins/multifd_lz4; do
    "$work/build/bin/python" -m build --no-isolation --outdir "$dist" "$src" >/dev/null
done
ls "$dist"
[ "$(ls "$dist"/*.whl | wc -l)" -eq 4 ] && [ "$(ls "$dist"/*.tar.gz | wc -l)" -eq 4 ]

step "install ${ours[*]} from $dist alone into a fresh venv"
"$python" -m venv "$work/venv"
bin="$work/venv/bin"
"$bin/pip" install -q --no-index --no-deps --find-links "$dist" "${ours[@]}"
"$bin/pip" install -q "${ours[@]}"  # theirs (trio, pluggy, numpy, zstandard, lz4): the index
"$bin/pip" check
cd "$work"  # nothing of the source tree on sys.path from here on
"$bin/python" -c 'import multifd_core, sys; assert multifd_core.__file__.startswith(sys.prefix)'

step "multifd plugins --check; multifd demo --size 16M --compression zstd"
"$bin/multifd" plugins --check
"$bin/multifd" demo --size 16M --compression zstd

step "multifd new-plugin ci_demo --value 5: install it, run its tests"
"$bin/multifd" new-plugin ci_demo --value 5 --output "$work/ci_demo"
"$bin/pip" install -q "$work/ci_demo[test]"  # its build backend from the index, as a user's
"$bin/multifd" plugins --check
"$bin/python" -m pytest -q -p no:cacheprovider "$work/ci_demo"
