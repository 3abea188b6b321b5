#!/usr/bin/env bash
# Install a wheelhouse made by `python -m benchmarks.wheelhouse` offline:
#   bash benchmarks/wheelhouse_install.sh DIR SITE [CHECKOUT]   (then: export PYTHONPATH=SITE)
# joins every split wheel (NAME.whl.part000, .part001, ...), checks each wheel against
# DIR/SHA256SUMS (a part missing or damaged stops here, naming it), builds the project's own wheel
# from CHECKOUT (default: this script's checkout) without network, and installs them all with pip
# into SITE: no index, no dependencies resolved, nothing fetched.
set -euo pipefail
DIR=${1:?usage: wheelhouse_install.sh DIR SITE}
SITE=${2:?usage: wheelhouse_install.sh DIR SITE}
CHECKOUT=$(cd "${3:-$(dirname "$0")/..}" && pwd)
PY=${PYTHON:-python3}
cd "$DIR"
[ -f SHA256SUMS ] || { echo "error: $DIR/SHA256SUMS is missing: the last transfer did not arrive" >&2; exit 2; }
shopt -s nullglob
for first in *.whl.part000; do
  whl=${first%.part000}
  cat "$whl".part[0-9][0-9][0-9] > "$whl.joining"
  mv "$whl.joining" "$whl"
  rm -f "$whl".part[0-9][0-9][0-9]
done
if ! sha256sum --quiet -c SHA256SUMS; then
  echo "error: a wheel in $DIR does not match SHA256SUMS (a part missing or damaged in transit): send its transfer again" >&2
  exit 2
fi
# the project itself, as it is in the checkout that travelled (never a stale copy)
rm -f maskdm-*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w . "$CHECKOUT"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" ./*.whl
echo "installed $(ls ./*.whl | wc -l) wheel(s) into $SITE"
