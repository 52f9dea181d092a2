//go:build tools

// Package helm pins the helm binary the project's chart tests run (helm lint, template, install,
// upgrade, uninstall against the real control plane). Nothing here is compiled into the sidecar: the
// import only makes `go mod tidy` keep the command package that devcluster/build.py builds.
package helm

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
