//go:build tools

// Package actionlint pins the actionlint binary that `make lint` runs on .github/workflows (the release
// workflow). Nothing here is compiled into the sidecar: the import only makes `go mod tidy` keep the
// command package that devcluster/build.py builds.
package actionlint

import (
	_ "github.com/rhysd/actionlint/cmd/actionlint"
)
