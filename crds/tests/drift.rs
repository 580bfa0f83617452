//! The committed CRD YAML must be what the types generate: run
//! `cargo run -p hookrun-crds --bin crdgen` (or `make crds`) after changing a type.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(hookrun_crds::crd::MANIFEST_DIR);
    for (file, crd) in hookrun_crds::crd::all() {
        let generated = hookrun_crds::crd::to_yaml(&crd).expect("the CRD serializes");
        let committed = std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("{file} is missing ({e}); run `make crds`"));
        assert!(
            committed == generated,
            "{file} drifted from the types; run `make crds` and commit"
        );
    }
}
