//! The images `make images` builds: each tarball is unpacked the way a runtime
//! reads it (manifest.json → config → layers), its binary is statically linked, and it
//! runs `--version` outside any container, with an empty environment. The test runs
//! `images/build.sh` first (cargo and crane make that cheap when nothing changed), so it
//! always checks the images of the code under test.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use hookrun_tests::control_plane::workspace_root;
use serde_json::Value;

const IMAGES: [&str; 3] = ["hookrun-operator", "hookrun-apiserver", "hookrun-harness"];

fn run(command: &mut Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what} runs: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{} is readable: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is JSON: {e}", path.display()))
}

/// True when the ELF file has no PT_INTERP program header, i.e. nothing loads it at run
/// time (a static or static-pie executable).
fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    assert_eq!(bytes.get(..4), Some(&b"\x7fELF"[..]), "an ELF file");
    assert_eq!(bytes.get(4), Some(&2), "a 64-bit ELF file");
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        panic!("a truncated ELF header");
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            != Some(PT_INTERP)
    })
}

fn workspace_version() -> String {
    let manifest =
        std::fs::read_to_string(workspace_root().join("Cargo.toml")).expect("Cargo.toml");
    manifest
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("a workspace version")
}

#[test]
fn every_image_unpacks_and_its_static_binary_prints_its_version() {
    let root = workspace_root();
    run(
        Command::new(root.join("images/build.sh"))
            .current_dir(&root)
            .env_remove("IMAGE_REGISTRY"),
        "images/build.sh",
    );
    let version = workspace_version();
    let scratch = root.join("target/images/unpacked");
    let _ = std::fs::remove_dir_all(&scratch);
    for name in IMAGES {
        let tarball = root.join(format!("target/images/{name}.tar"));
        let size = std::fs::metadata(&tarball)
            .unwrap_or_else(|e| panic!("{} exists: {e}", tarball.display()))
            .len();
        let dir = scratch.join(name);
        std::fs::create_dir_all(dir.join("rootfs")).expect("a scratch directory");
        run(
            Command::new("tar")
                .arg("-xf")
                .arg(&tarball)
                .arg("-C")
                .arg(&dir),
            "tar -x (image)",
        );

        let manifest = read_json(&dir.join("manifest.json"));
        let manifest = &manifest[0];
        assert_eq!(
            manifest["RepoTags"],
            serde_json::json!([format!("ghcr.io/hookrun/{name}:{version}")])
        );
        let config = read_json(&dir.join(manifest["Config"].as_str().expect("a config path")));
        assert_eq!(config["os"], "linux");
        assert_eq!(config["architecture"], "amd64");
        let config = &config["config"];
        assert_eq!(config["User"], "65532:65532", "{name} runs as non-root");
        let entrypoint = format!("/usr/local/bin/{name}");
        assert_eq!(config["Entrypoint"], serde_json::json!([entrypoint]));
        let labels = &config["Labels"];
        assert_eq!(labels["org.opencontainers.image.title"], name);
        assert_eq!(labels["org.opencontainers.image.version"], version.as_str());
        assert_eq!(
            labels["org.opencontainers.image.source"],
            "https://github.com/hookrun/hookrun"
        );
        let revision = labels["org.opencontainers.image.revision"]
            .as_str()
            .unwrap_or("");
        assert!(
            revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()),
            "a commit id as revision: {revision:?}"
        );

        let layers = manifest["Layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 1, "{name}: one layer on an empty base");
        for layer in layers {
            let layer = dir.join(layer.as_str().expect("a layer path"));
            run(
                Command::new("tar")
                    .arg("-xzf")
                    .arg(&layer)
                    .arg("-C")
                    .arg(dir.join("rootfs")),
                "tar -x (layer)",
            );
        }
        let binary: PathBuf = dir.join("rootfs").join(entrypoint.trim_start_matches('/'));
        let bytes = std::fs::read(&binary)
            .unwrap_or_else(|e| panic!("{name}: the layer holds {entrypoint}: {e}"));
        assert!(is_static_elf(&bytes), "{name} is statically linked");
        assert!(
            dir.join("rootfs/etc/ssl/certs/ca-certificates.crt")
                .exists(),
            "{name} carries the CA bundle"
        );

        let printed = run(
            Command::new(&binary).arg("--version").env_clear(),
            &format!("{name} --version"),
        );
        assert_eq!(printed.trim(), format!("{name} {version}"));
        eprintln!(
            "{name}: image tarball {:.1} MiB, binary {:.1} MiB",
            size as f64 / (1024.0 * 1024.0),
            bytes.len() as f64 / (1024.0 * 1024.0)
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
