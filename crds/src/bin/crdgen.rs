//! Writes the CRD YAML of every hookrun resource into `crds/manifests/` (or the directory
//! given as the first argument). `--check` compares instead of writing and fails on drift.

use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut check = false;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(hookrun_crds::crd::MANIFEST_DIR);
    for arg in env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!(
                    "usage: crdgen [--check] [DIR]\nwrites (or with --check, compares) the CRD YAML"
                );
                return ExitCode::SUCCESS;
            }
            other => dir = PathBuf::from(other),
        }
    }
    let mut drift = false;
    for (file, crd) in hookrun_crds::crd::all() {
        let path = dir.join(file);
        let yaml = match hookrun_crds::crd::to_yaml(&crd) {
            Ok(yaml) => yaml,
            Err(error) => {
                eprintln!("crdgen: cannot serialize {file}: {error}");
                return ExitCode::FAILURE;
            }
        };
        if check {
            if fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                eprintln!(
                    "crdgen: {} differs from the types; run `make crds`",
                    path.display()
                );
                drift = true;
            }
        } else if let Err(error) = fs::create_dir_all(&dir).and_then(|()| fs::write(&path, yaml)) {
            eprintln!("crdgen: cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("crdgen: wrote {}", path.display());
        }
    }
    if drift {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
