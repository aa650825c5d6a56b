#!/usr/bin/env bash
# Refresh the browser libraries the web UI ships in src/hexin/web/vendor/.
#
# The UI runs offline and needs no Node.js: the files below are committed. This script
# is only for a maintainer who wants to re-fetch or upgrade them. It needs `npm` (for
# `npm pack`, which downloads a package tarball from the configured registry without
# installing anything) plus tar and sha256sum.
#
# Vendored:
#   marked     18.2.1  lib/marked.esm.js    (MIT)                  -> vendor/marked.esm.js
#   dompurify  3.4.18  dist/purify.es.mjs   (MPL-2.0 OR Apache-2.0) -> vendor/purify.es.mjs
# with their licence files as vendor/LICENSE.marked, vendor/LICENSE.dompurify and
# vendor/LICENSE-MPL.dompurify.
#
# To upgrade: change the versions below, run with UPDATE_HASHES=1, review the diff of
# the vendored files, then paste the printed hashes here.
set -euo pipefail

MARKED_VERSION=18.2.1
DOMPURIFY_VERSION=3.4.18
MARKED_SHA256=5371fea86fd0656b4fc7bea7c94c663109d82789b69433eeee78d42895aa44de
DOMPURIFY_SHA256=1a06b721ad8b46d6174b21f22ea70290aaf3e5a81d65af3b7178113953f7c9b1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/src/hexin/web/vendor"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cd "$tmp"
npm pack --silent "marked@$MARKED_VERSION" "dompurify@$DOMPURIFY_VERSION" >/dev/null
mkdir marked dompurify
tar -xzf "marked-$MARKED_VERSION.tgz" -C marked
tar -xzf "dompurify-$DOMPURIFY_VERSION.tgz" -C dompurify

check() {  # file expected-hash
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    if [[ "${UPDATE_HASHES:-0}" == 1 ]]; then
        echo "$1: $got"
    elif [[ "$got" != "$2" ]]; then
        echo "sha256 mismatch for $1: got $got, expected $2" >&2
        exit 1
    fi
}
check marked/package/lib/marked.esm.js "$MARKED_SHA256"
check dompurify/package/dist/purify.es.mjs "$DOMPURIFY_SHA256"

mkdir -p "$dest"
cp marked/package/lib/marked.esm.js "$dest/marked.esm.js"
cp marked/package/LICENSE "$dest/LICENSE.marked"
cp dompurify/package/dist/purify.es.mjs "$dest/purify.es.mjs"
cp dompurify/package/LICENSE "$dest/LICENSE.dompurify"
cp dompurify/package/LICENSE-MPL "$dest/LICENSE-MPL.dompurify"
echo "vendored marked $MARKED_VERSION and dompurify $DOMPURIFY_VERSION into $dest"
