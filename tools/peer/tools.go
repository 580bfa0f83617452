//go:build tools

// Wrapper module that builds Flux's notification-controller, the peer `make bench`
// measures beside hookrun's webhook door. Benchmark only; it never ships.
package tools

import _ "github.com/fluxcd/notification-controller"
