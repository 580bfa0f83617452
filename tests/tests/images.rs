//! The images `make images` builds: each tarball is unpacked the way a runtime
//! reads it (manifest.json → config → layers), its binary is statically linked, and it
//! runs `--version` outside any container, with an empty environment. The test runs
//! `images/build.sh` first (cargo and crane make that cheap when nothing changed), so it
//! always checks the images of the code under test.
//!
//! `make deploy` then pushes those images to a throwaway registry on 127.0.0.1 and
//! installs the chart on the local control plane; the test reads the manifests back from
//! the registry and checks that every image reference of the installed release is a
//! pushed digest. Both tests build through `images/build.sh`, one after the other, so
//! the slow static build happens once.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::LazyLock,
    time::{Duration, Instant},
};

use hookrun_tests::{
    TestNamespace, cluster,
    control_plane::{default_tools_bin, workspace_root},
};
use serde_json::Value;

const IMAGES: [&str; 3] = ["hookrun-operator", "hookrun-apiserver", "hookrun-harness"];

/// Held while a test builds or reads `target/images/`: the tests of this file take turns.
static IMAGES_DIR: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

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
    let _images = IMAGES_DIR.blocking_lock();
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

/// A throwaway OCI registry: `crane registry serve` on a free loopback port, in memory,
/// stopped when dropped.
struct LocalRegistry {
    child: Child,
    /// `127.0.0.1:<port>`.
    address: String,
    log: PathBuf,
}

impl LocalRegistry {
    fn start() -> Self {
        let dir = workspace_root().join("target/test-clusters");
        std::fs::create_dir_all(&dir).expect("the log directory");
        let log = dir.join(format!("registry-{}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("the registry log");
        let child = Command::new(default_tools_bin().join("crane"))
            .args(["registry", "serve", "--address", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the registry log"))
            .stderr(file)
            .spawn()
            .expect("crane registry serve starts (make tools builds crane)");
        let started = Instant::now();
        let port = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(port) = text
                .split("serving on port ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
            {
                break port.to_owned();
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the registry never said its port: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Self {
            child,
            address: format!("127.0.0.1:{port}"),
            log,
        }
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn crane(args: &[&str]) -> String {
    run(
        Command::new(default_tools_bin().join("crane")).args(args),
        &format!("crane {}", args.join(" ")),
    )
    .trim()
    .to_owned()
}

/// `make <args>` in the workspace against the test cluster, with helm's state under
/// `target/` and nothing inherited from a `make` this test may run under.
fn make(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    let home = workspace_root().join("target/test-clusters/helm-home");
    Command::new("make")
        .args(args)
        .current_dir(workspace_root())
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .env_remove("IMAGE_REGISTRY")
        .env_remove("INSECURE")
        .env_remove("HELM_ARGS")
        .output()
        .expect("make runs")
}

#[tokio::test]
async fn make_deploy_pushes_every_image_and_installs_the_chart_by_digest() {
    let _images = IMAGES_DIR.lock().await;
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let kubeconfig = cluster.kubeconfig_path();
    let version = workspace_version();

    // Without a registry it stops before building or pushing anything, and says why.
    let refused = make(
        &kubeconfig,
        &["deploy", "PUBLIC_URL=https://hooks.example.test"],
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("REGISTRY is required"), "{stderr}");

    let registry = LocalRegistry::start();
    let prefix = format!("{}/hookrun", registry.address);
    let release = "hr-deploy";
    let deployed = make(
        &kubeconfig,
        &[
            "deploy",
            &format!("REGISTRY={prefix}"),
            "PUBLIC_URL=https://hooks.example.test",
            &format!("RELEASE={release}"),
            &format!("NAMESPACE={}", ns.name()),
            &format!(
                "HELM_ARGS=--set watchNamespaces={{{}}} --set apiserver.replicas=1",
                ns.name()
            ),
        ],
    );
    let printed = String::from_utf8_lossy(&deployed.stdout).into_owned();
    assert!(
        deployed.status.success(),
        "make deploy failed:\n{printed}\n{}",
        String::from_utf8_lossy(&deployed.stderr)
    );

    // The registry holds each image as built: its digest is the tarball's, and the
    // manifest and config read back are the image's.
    let root = workspace_root();
    let mut pushed = Vec::new();
    for name in IMAGES {
        let tag = format!("{prefix}/{name}:{version}");
        let digest = crane(&["digest", &tag]);
        let tarball = root.join(format!("target/images/{name}.tar"));
        let built = crane(&["digest", "--tarball", &tarball.display().to_string()]);
        assert_eq!(digest, built, "{name}: the registry holds the built image");
        let by_digest = format!("{prefix}/{name}@{digest}");
        let manifest: Value =
            serde_json::from_str(&crane(&["manifest", &by_digest])).expect("a JSON manifest");
        assert_eq!(
            manifest["layers"].as_array().map(Vec::len),
            Some(1),
            "{name}"
        );
        let config: Value =
            serde_json::from_str(&crane(&["config", &by_digest])).expect("a JSON config");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!([format!("/usr/local/bin/{name}")])
        );
        assert!(
            printed.contains(&by_digest),
            "make deploy names what it pushed ({by_digest}):\n{printed}"
        );
        pushed.push(by_digest);
    }
    assert!(
        printed.contains("webhookUrl"),
        "make deploy says how to get the first Agent's URL:\n{printed}"
    );

    // Every image reference the release rendered is a pushed digest, and each image
    // is used.
    let helm_home = root.join("target/test-clusters/helm-home");
    let manifest = run(
        Command::new(default_tools_bin().join("helm"))
            .args(["get", "manifest", release, "-n", ns.name()])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env_remove("KUBECONFIG")
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_DATA_HOME", helm_home.join("data")),
        "helm get manifest",
    );
    let mut referenced: Vec<String> = manifest
        .lines()
        .filter_map(|line| {
            let line = line.trim_start().trim_start_matches("- ");
            line.strip_prefix("image: ")
                .or_else(|| line.strip_prefix("--default-harness-image="))
                .map(|image| image.trim().trim_matches('"').to_owned())
        })
        .collect();
    referenced.sort();
    let mut expected = pushed.clone();
    expected.sort();
    assert_eq!(referenced, expected, "{manifest}");

    // And the cluster stores exactly those in the Deployments.
    let stored: Value = serde_json::from_str(&run(
        Command::new(default_tools_bin().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["get", "deploy", "-n", ns.name(), "-o", "json"]),
        "kubectl get deploy",
    ))
    .expect("a Deployment list");
    let mut images: Vec<String> = Vec::new();
    for deployment in stored["items"].as_array().into_iter().flatten() {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        images.extend(container["image"].as_str().map(str::to_owned));
        for arg in container["args"].as_array().into_iter().flatten() {
            if let Some(image) = arg
                .as_str()
                .and_then(|a| a.strip_prefix("--default-harness-image="))
            {
                images.push(image.to_owned());
            }
        }
    }
    images.sort();
    assert_eq!(images, expected);

    run(
        Command::new(default_tools_bin().join("helm"))
            .args(["uninstall", release, "-n", ns.name()])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env_remove("KUBECONFIG")
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_DATA_HOME", helm_home.join("data")),
        "helm uninstall",
    );
}
