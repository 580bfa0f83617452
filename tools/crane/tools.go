//go:build tools

// Package tools pins crane, which `make images` uses to assemble OCI image tarballs
// without a container daemon.
package tools

import _ "github.com/google/go-containerregistry/cmd/crane"
