//go:build tools

// Package tools pins the helm CLI that the chart tests run.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
