//! The build script of the shipped binaries (operator, apiserver, harness): links them
//! with packed relative relocations (`-z pack-relative-relocs`, DT_RELR). A
//! position-independent binary the operator's size carries about 1.7 MB of relocation
//! records that the loader reads at every start and that then stay resident, about a
//! tenth of the operator's memory; packed, they take a few kilobytes. Needs GNU
//! ld 2.38 or later and glibc 2.36 or later (for the static images too), and changes
//! nothing else: the binary stays position-independent.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
