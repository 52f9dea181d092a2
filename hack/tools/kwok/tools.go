//go:build tools

// kwok (Kubernetes WithOut Kubelet): simulated nodes and kubelets for the dev control plane, so that the
// pods of a Deployment get IPs, turn Ready, terminate and are deleted as on a real cluster. Built by
// `python -m devcluster build` (devcluster/build.py, GO_TOOLS) into ~/.cache, keyed on this go.mod/go.sum.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
