//! Fuzz targets for every parser of untrusted bytes in hookrun (webhook bodies and
//! headers, every signature scheme, `X-Forwarded-For`, provider payloads and titles, the
//! runner API's bodies, the read API's path and query, model answers), and a mutation
//! engine that runs them on stable Rust. `make fuzz` runs each for a while; `cargo test`
//! runs a short smoke of each and every committed regression input.

#![forbid(unsafe_code)]

pub mod engine;
pub mod targets;

use std::path::PathBuf;

/// `fuzz/` in the source tree.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Committed inputs that once made a target panic; each is replayed by `cargo test`.
pub fn regressions_dir() -> PathBuf {
    crate_dir().join("regressions")
}

/// Committed seed inputs beyond the targets' built-in ones.
pub fn corpus_dir() -> PathBuf {
    crate_dir().join("corpus")
}
