//! The committed CRD YAML must be what the types generate: run
//! `cargo run -p hookrun-crds --bin crdgen` (or `make crds`) after changing a type.
//! The Helm chart ships the same files in `charts/hookrun/crds/`.

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

#[test]
fn the_chart_ships_exactly_the_generated_crds() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart_crds = crate_dir.join("../charts/hookrun/crds");
    let mut expected: Vec<&str> = hookrun_crds::crd::all()
        .iter()
        .map(|(file, _)| *file)
        .collect();
    expected.sort_unstable();
    let mut shipped: Vec<String> = std::fs::read_dir(&chart_crds)
        .unwrap_or_else(|e| panic!("{} is missing ({e})", chart_crds.display()))
        .map(|entry| {
            let entry = entry.expect("a readable directory entry");
            entry.file_name().to_string_lossy().into_owned()
        })
        .collect();
    shipped.sort_unstable();
    assert_eq!(
        shipped, expected,
        "charts/hookrun/crds/ must hold exactly the generated CRDs; run `make crds`"
    );
    for (file, crd) in hookrun_crds::crd::all() {
        let generated = hookrun_crds::crd::to_yaml(&crd).expect("the CRD serializes");
        let in_chart = std::fs::read_to_string(chart_crds.join(file)).expect("read above");
        assert!(
            in_chart == generated,
            "charts/hookrun/crds/{file} differs from the types; run `make crds` and commit"
        );
    }
}
