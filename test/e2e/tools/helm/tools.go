//go:build tools

// Helm, which make chart and the deploy tier run (hack/e2e-tools.sh builds
// it into the e2e cache). A module of its own: Helm brings its own
// Kubernetes libraries, which need not match the cluster's in ../go.mod.
//
// To move to a newer release: go get helm.sh/helm/v4@<version> && go mod
// tidy, here.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
