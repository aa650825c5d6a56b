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
# vendor/LICENSE-MPL.dompurify; and
#   @highlightjs/cdn-assets 11.11.1  es/core.min.js, es/languages/<lang>.min.js (BSD-3-Clause)
#                                    -> vendor/highlight/ (+ LICENSE)
#   katex      0.19.1  dist/katex.mjs, dist/katex.min.css, dist/fonts/*.woff2 (MIT)
#                      -> vendor/katex/ (+ LICENSE)
#   axe-core   4.14.1  axe.min.js (MPL-2.0) -> tests/data/axe/ (+ LICENSE); test-only, never served
# highlight.js comes from @highlightjs/cdn-assets, the project's prebuilt browser files of the
# same release: the `highlight.js` package's es/core.js only re-exports its CommonJS
# lib/core.js, which a browser cannot load. Its core and language modules import nothing.
# For these three packages (many files each) the sha256 checked is the npm tarball's.
#
# To upgrade: change the versions below, run with UPDATE_HASHES=1, review the diff of
# the vendored files, then paste the printed hashes here.
set -euo pipefail

MARKED_VERSION=18.2.1
DOMPURIFY_VERSION=3.4.18
MARKED_SHA256=5371fea86fd0656b4fc7bea7c94c663109d82789b69433eeee78d42895aa44de
DOMPURIFY_SHA256=1a06b721ad8b46d6174b21f22ea70290aaf3e5a81d65af3b7178113953f7c9b1
HLJS_VERSION=11.11.1
KATEX_VERSION=0.19.1
AXE_VERSION=4.14.1
HLJS_TGZ_SHA256=28a06bf6ebcc2218c6e842bdb4f1c8353508a8cada59e85110f91892f5726195
KATEX_TGZ_SHA256=24da5a599eb2fcede2e270b99a6ff48bca816beecc95feeb84e8cccbd1bb34fd
AXE_TGZ_SHA256=e6b0ce02b84d892e2e33e403485e7f3d6c29e2be6df65daf44d89ba564139745
# highlight.js grammars: "xml" also covers html; "shell" is console sessions (uses bash)
HLJS_LANGUAGES=(python javascript typescript json bash shell c cpp java go rust sql xml css
    yaml markdown diff)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/src/hexin/web/vendor"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cd "$tmp"
npm pack --silent "marked@$MARKED_VERSION" "dompurify@$DOMPURIFY_VERSION" \
    "@highlightjs/cdn-assets@$HLJS_VERSION" "katex@$KATEX_VERSION" "axe-core@$AXE_VERSION" \
    >/dev/null
mkdir marked dompurify highlight katex axe
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
check "highlightjs-cdn-assets-$HLJS_VERSION.tgz" "$HLJS_TGZ_SHA256"
check "katex-$KATEX_VERSION.tgz" "$KATEX_TGZ_SHA256"
check "axe-core-$AXE_VERSION.tgz" "$AXE_TGZ_SHA256"
tar -xzf "highlightjs-cdn-assets-$HLJS_VERSION.tgz" -C highlight
tar -xzf "katex-$KATEX_VERSION.tgz" -C katex
tar -xzf "axe-core-$AXE_VERSION.tgz" -C axe

mkdir -p "$dest"
cp marked/package/lib/marked.esm.js "$dest/marked.esm.js"
cp marked/package/LICENSE "$dest/LICENSE.marked"
cp dompurify/package/dist/purify.es.mjs "$dest/purify.es.mjs"
cp dompurify/package/LICENSE "$dest/LICENSE.dompurify"
cp dompurify/package/LICENSE-MPL "$dest/LICENSE-MPL.dompurify"

rm -rf "$dest/highlight" "$dest/katex"
mkdir -p "$dest/highlight/languages" "$dest/katex/fonts"
cp highlight/package/es/core.min.js "$dest/highlight/core.min.js"
for lang in "${HLJS_LANGUAGES[@]}"; do
    cp "highlight/package/es/languages/$lang.min.js" "$dest/highlight/languages/$lang.min.js"
done
cp highlight/package/LICENSE "$dest/highlight/LICENSE"
cp katex/package/dist/katex.mjs katex/package/dist/katex.min.css "$dest/katex/"
cp katex/package/dist/fonts/*.woff2 "$dest/katex/fonts/"
cp katex/package/LICENSE "$dest/katex/LICENSE"

axe_dest="$root/tests/data/axe"
mkdir -p "$axe_dest"
cp axe/package/axe.min.js "$axe_dest/axe.min.js"
cp axe/package/LICENSE "$axe_dest/LICENSE"
echo "vendored marked $MARKED_VERSION, dompurify $DOMPURIFY_VERSION," \
    "highlight.js $HLJS_VERSION and katex $KATEX_VERSION into $dest;" \
    "axe-core $AXE_VERSION into $axe_dest"
