//go:build tools

// Package controlplane pins the Kubernetes and etcd server binaries that the
// project's tests and demo run against. Nothing here is compiled into the
// sidecar: the imports only make `go mod tidy` keep the command packages that
// devcluster/build.py builds with `go build`.
package controlplane

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
