#!/usr/bin/env bash
# Builds the dstl binary. The Dockerfile runs this same script, and so does
# the test command, so the image's build is exercised by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bin/dstl}"
VERSION="${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo devel)}"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o "$OUT" ./cmd/dstl
echo "built $OUT ($VERSION)"
