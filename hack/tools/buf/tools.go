//go:build tools

// Package buf pins the buf binary that `make lint` runs over protos/ (buf lint, and buf breaking against
// the last release's image). Nothing here is compiled into the sidecar: the import only makes
// `go mod tidy` keep the command package that devcluster/build.py builds.
package buf

import (
	_ "github.com/bufbuild/buf/cmd/buf"
)
