//! The stand-in for the kubelet of `make dev` and of cluster tests that need sessions to
//! run for real: it watches session pods, runs the harness image
//! as the local `hookrun-harness` binary with the pod's environment and a pod-bound token
//! from TokenRequest, and reports the pod's status (Running, then Succeeded or Failed
//! with the exit code) through `pods/status`. Any other image is refused with a message.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hookrun_crds::{Session, names};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, EnvVar, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

/// The container of a session pod (the operator's name for it).
pub const CONTAINER: &str = "agent";
/// The token is minted again this often, well inside its lifetime.
const TOKEN_REFRESH: Duration = Duration::from_secs(names::TOKEN_EXPIRATION_SECONDS as u64 / 2);

/// What the runner needs to run pods.
#[derive(Clone)]
pub struct PodRunner {
    client: Client,
    /// The only image it runs.
    pub harness_image: String,
    /// The local binary that stands for that image.
    pub harness_binary: PathBuf,
    /// Per-session working directories and logs go under here.
    pub work_dir: PathBuf,
    running: Arc<Mutex<HashMap<String, watch::Sender<bool>>>>,
    /// Only pods of this namespace, when set (tests share one cluster).
    namespace: Option<String>,
}

/// A pod's environment could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError(pub String);

/// The Secrets and ConfigMaps a pod's environment reads, by name (`None`: not found).
#[derive(Debug, Default)]
pub struct EnvSources {
    /// Secret name → its data.
    pub secrets: BTreeMap<String, Option<BTreeMap<String, String>>>,
    /// ConfigMap name → its data.
    pub config_maps: BTreeMap<String, Option<BTreeMap<String, String>>>,
}

/// Names of the Secrets and ConfigMaps `env` refers to.
pub fn referenced(env: &[EnvVar]) -> (HashSet<String>, HashSet<String>) {
    let mut secrets = HashSet::new();
    let mut config_maps = HashSet::new();
    for source in env.iter().filter_map(|v| v.value_from.as_ref()) {
        if let Some(r) = &source.secret_key_ref {
            secrets.insert(r.name.clone());
        }
        if let Some(r) = &source.config_map_key_ref {
            config_maps.insert(r.name.clone());
        }
    }
    (secrets, config_maps)
}

/// The pod's environment as the kubelet would set it: literal values, and Secret and
/// ConfigMap keys (an `optional` key that is missing is left out). Field and resource
/// references do not exist outside a node and are refused.
pub fn resolve_env(
    env: &[EnvVar],
    sources: &EnvSources,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut resolved = Vec::new();
    for var in env {
        let Some(from) = &var.value_from else {
            resolved.push((var.name.clone(), var.value.clone().unwrap_or_default()));
            continue;
        };
        let (kind, name, key, optional, objects) = if let Some(r) = &from.secret_key_ref {
            ("Secret", &r.name, &r.key, r.optional, &sources.secrets)
        } else if let Some(r) = &from.config_map_key_ref {
            (
                "ConfigMap",
                &r.name,
                &r.key,
                r.optional,
                &sources.config_maps,
            )
        } else {
            return Err(EnvError(format!(
                "env {}: only value, secretKeyRef and configMapKeyRef work in make dev",
                var.name
            )));
        };
        let value = match objects.get(name.as_str()) {
            Some(Some(data)) => data.get(key.as_str()).cloned(),
            _ if optional == Some(true) => continue,
            _ => {
                return Err(EnvError(format!(
                    "env {}: {kind} {name:?} not found (create it in the pod's namespace)",
                    var.name
                )));
            }
        };
        match value {
            Some(value) => resolved.push((var.name.clone(), value)),
            None if optional == Some(true) => {}
            None => {
                return Err(EnvError(format!(
                    "env {}: {kind} {name:?} has no key {key:?}",
                    var.name
                )));
            }
        }
    }
    Ok(resolved)
}

/// The refusal of a pod whose image is not the harness image, or `None` to run it.
pub fn refuse_image(pod: &Pod, harness_image: &str) -> Option<String> {
    let image = agent_container(pod)
        .and_then(|c| c.image.as_deref())
        .unwrap_or("(none)");
    (image != harness_image).then(|| {
        format!(
            "make dev's local pod runner only runs {harness_image} (the local hookrun-harness \
             binary), not {image:?}: remove spec.session.image from the Agent, or run it on a \
             real cluster"
        )
    })
}

fn agent_container(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::Container> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == CONTAINER)
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).unwrap_or(Value::Null)
}

/// The status of a pod whose harness runs.
pub fn running_status(image: &str, started: &Value) -> Value {
    json!({"status": {
        "phase": "Running",
        "startTime": started,
        "containerStatuses": [{
            "name": CONTAINER,
            "image": image,
            "imageID": "",
            "ready": true,
            "started": true,
            "restartCount": 0,
            "state": {"running": {"startedAt": started}}
        }]
    }})
}

/// The status of a pod whose harness exited with `code`.
pub fn exited_status(image: &str, code: i32, message: &str, started: &Value) -> Value {
    let (phase, reason) = if code == 0 {
        ("Succeeded", "Completed")
    } else {
        ("Failed", "Error")
    };
    let mut terminated = json!({
        "exitCode": code,
        "reason": reason,
        "startedAt": started,
        "finishedAt": now(),
    });
    if !message.is_empty() {
        terminated["message"] = json!(message);
    }
    json!({"status": {
        "phase": phase,
        "containerStatuses": [{
            "name": CONTAINER,
            "image": image,
            "imageID": "",
            "ready": false,
            "started": false,
            "restartCount": 0,
            "state": {"terminated": terminated}
        }]
    }})
}

/// The status of a pod that never ran.
pub fn failed_status(reason: &str, message: &str) -> Value {
    json!({"status": {"phase": "Failed", "reason": reason, "message": message}})
}

/// The last non-empty line of a harness log without its time and level, cut for a
/// status message.
pub fn last_line(log: &str) -> String {
    let line = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let line = line
        .split_once(" hookrun_harness: ")
        .map_or(line, |(_, message)| message);
    hookrun_crds::session::truncate_utf8(line.trim(), 1024)
        .0
        .to_owned()
}

impl PodRunner {
    /// A runner that runs `harness_binary` for pods of `harness_image`.
    pub fn new(
        client: Client,
        harness_image: &str,
        harness_binary: PathBuf,
        work_dir: PathBuf,
    ) -> Self {
        Self {
            client,
            harness_image: harness_image.to_owned(),
            harness_binary,
            work_dir,
            running: Arc::default(),
            namespace: None,
        }
    }

    /// The same runner, running only the pods of `namespace`.
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    /// Watches session pods (of every namespace, or of its own) until the stream ends.
    pub async fn run(self) {
        let pods: Api<Pod> = match &self.namespace {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        };
        let config = watcher::Config::default().labels(names::SESSION_LABEL);
        let mut seen: HashSet<String> = HashSet::new();
        let mut events = watcher(pods, config).boxed();
        while let Some(event) = events.next().await {
            let pod = match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
                Ok(watcher::Event::Delete(pod)) => {
                    self.stop(&pod);
                    continue;
                }
                Ok(_) => continue,
                Err(error) => {
                    crate::say_err!("dev: watching session pods: {error}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let uid = pod.uid().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() {
                self.stop(&pod);
                continue;
            }
            if !seen.insert(uid) {
                continue;
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            let runner = self.clone();
            match phase.as_deref() {
                Some("Succeeded" | "Failed") => {}
                Some("Running") => {
                    // Running, but not by us: a pod of an earlier make dev.
                    tokio::spawn(async move {
                        runner
                            .set_status(
                                &pod,
                                failed_status(
                                    "DevRunnerRestarted",
                                    "make dev stopped while this session ran",
                                ),
                            )
                            .await;
                    });
                }
                _ => {
                    tokio::spawn(async move { runner.run_pod(pod).await });
                }
            }
        }
    }

    /// Stops the harness of a pod that is going away.
    fn stop(&self, pod: &Pod) {
        let uid = pod.uid().unwrap_or_default();
        if let Some(stop) = self.running.lock().ok().and_then(|r| r.get(&uid).cloned()) {
            let _ = stop.send(true);
        }
    }

    /// Stops every harness it runs (make dev is shutting down).
    pub fn stop_all(&self) {
        if let Ok(running) = self.running.lock() {
            for stop in running.values() {
                let _ = stop.send(true);
            }
        }
    }

    /// Whether any harness still runs.
    pub fn busy(&self) -> bool {
        self.running.lock().map(|r| !r.is_empty()).unwrap_or(false)
    }

    async fn set_status(&self, pod: &Pod, status: Value) {
        let namespace = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(error) = api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
        {
            crate::say_err!(
                "dev: cannot set the status of pod {namespace}/{}: {error}",
                pod.name_any()
            );
        }
    }

    async fn env_sources(&self, namespace: &str, env: &[EnvVar]) -> EnvSources {
        let (secret_names, config_map_names) = referenced(env);
        let mut sources = EnvSources::default();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        for name in secret_names {
            let data = secrets.get_opt(&name).await.ok().flatten().map(|secret| {
                let mut data: BTreeMap<String, String> = secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                    .collect();
                data.extend(secret.string_data.unwrap_or_default());
                data
            });
            sources.secrets.insert(name, data);
        }
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        for name in config_map_names {
            let data = config_maps
                .get_opt(&name)
                .await
                .ok()
                .flatten()
                .map(|cm| cm.data.unwrap_or_default());
            sources.config_maps.insert(name, data);
        }
        sources
    }

    async fn mint_token(&self, pod: &Pod) -> Result<String, String> {
        let namespace = pod.namespace().unwrap_or_default();
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![names::TOKEN_AUDIENCE.to_owned()]),
                expiration_seconds: Some(names::TOKEN_EXPIRATION_SECONDS),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Pod".to_owned()),
                    name: Some(pod.name_any()),
                    uid: pod.uid(),
                }),
            }),
            ..Default::default()
        };
        let answer = accounts
            .create_token_request(&account, &PostParams::default(), &request)
            .await
            .map_err(|error| {
                format!("TokenRequest for ServiceAccount {namespace}/{account}: {error}")
            })?;
        answer
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| "TokenRequest answered no token".to_owned())
    }

    async fn run_pod(self, pod: Pod) {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let label = format!("{namespace}/{name}");
        if let Some(message) = refuse_image(&pod, &self.harness_image) {
            crate::say!("dev: session {label} refused: {message}");
            self.set_status(&pod, failed_status("UnsupportedImage", &message))
                .await;
            return;
        }
        let image = self.harness_image.clone();
        let env = agent_container(&pod)
            .and_then(|c| c.env.clone())
            .unwrap_or_default();
        let sources = self.env_sources(&namespace, &env).await;
        let mut env = match resolve_env(&env, &sources) {
            Ok(env) => env,
            Err(EnvError(message)) => {
                crate::say!("dev: session {label} cannot start: {message}");
                self.set_status(&pod, failed_status("CreateContainerConfigError", &message))
                    .await;
                return;
            }
        };
        let dir = self.work_dir.join(format!("{namespace}.{name}"));
        let token_file = dir.join("token");
        let log_path = self.work_dir.join(format!("{namespace}.{name}.log"));
        let prepared = async {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let token = self.mint_token(&pod).await?;
            write_private(&token_file, &token)?;
            std::fs::File::create(&log_path)
                .map_err(|e| format!("creating {}: {e}", log_path.display()))
        };
        let log = match prepared.await {
            Ok(log) => log,
            Err(message) => {
                crate::say!("dev: session {label} cannot start: {message}");
                self.set_status(&pod, failed_status("CreateContainerError", &message))
                    .await;
                return;
            }
        };
        env.retain(|(k, _)| k != names::env::TOKEN_FILE);
        env.push((
            names::env::TOKEN_FILE.to_owned(),
            token_file.display().to_string(),
        ));

        let (stop_tx, mut stop_rx) = watch::channel(false);
        if let Ok(mut running) = self.running.lock() {
            running.insert(uid.clone(), stop_tx);
        }
        let started_at = now();
        let started = Instant::now();
        self.set_status(&pod, running_status(&image, &started_at))
            .await;
        let agent = pod
            .labels()
            .get(names::AGENT_LABEL)
            .cloned()
            .unwrap_or_default();
        crate::say!(
            "dev: ▶ session {label} started (agent {agent}; log {})",
            log_path.display()
        );

        let mut command = crate::tied::command(&self.harness_binary);
        command
            .env_clear()
            .envs(std::env::var_os("PATH").map(|p| (std::ffi::OsString::from("PATH"), p)))
            .env("HOME", &dir)
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map(Stdio::from).unwrap_or(Stdio::null()))
            .stderr(Stdio::from(log))
            // Its own process group, so that stopping it stops what exec mode started.
            .process_group(0)
            .kill_on_drop(true);
        // Tied: it dies with the supervisor however that dies.
        let mut child = match crate::tied::spawn(command).await {
            Ok(child) => child,
            Err(error) => {
                let message = format!("cannot run {}: {error}", self.harness_binary.display());
                crate::say!("dev: session {label} cannot start: {message}");
                self.set_status(&pod, exited_status(&image, 128, &message, &started_at))
                    .await;
                self.forget(&uid, &dir);
                return;
            }
        };
        let deadline = pod
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds)
            .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
            .unwrap_or(Duration::from_secs(7 * 24 * 3600));
        let refresher = {
            let runner = self.clone();
            let pod = pod.clone();
            let token_file = token_file.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(TOKEN_REFRESH).await;
                    match runner.mint_token(&pod).await {
                        Ok(token) => {
                            let _ = write_private(&token_file, &token);
                        }
                        Err(error) => crate::say_err!("dev: refreshing a session token: {error}"),
                    }
                }
            })
        };
        enum End {
            Exited(std::io::Result<std::process::ExitStatus>),
            Deadline,
            Stopped,
        }
        let end = tokio::select! {
            status = child.wait() => End::Exited(status),
            () = tokio::time::sleep(deadline) => End::Deadline,
            _ = stop_rx.wait_for(|stop| *stop) => End::Stopped,
        };
        refresher.abort();
        if !matches!(end, End::Exited(_)) {
            kill_group(child.id());
            let _ = child.wait().await;
        }
        let took = started.elapsed().as_secs_f64();
        match end {
            End::Exited(status) => {
                let code = match status {
                    Ok(status) => status.code().unwrap_or(128),
                    Err(_) => 128,
                };
                let message = if code == 0 {
                    String::new()
                } else {
                    last_line(&std::fs::read_to_string(&log_path).unwrap_or_default())
                };
                self.set_status(&pod, exited_status(&image, code, &message, &started_at))
                    .await;
                let outcome = self.session_outcome(&namespace, &name).await;
                crate::say!(
                    "dev: ■ session {label} ended after {took:.1}s: harness exit {code}{outcome}"
                );
            }
            End::Deadline => {
                self.set_status(
                    &pod,
                    failed_status(
                        "DeadlineExceeded",
                        "Pod was active on the node longer than the specified deadline",
                    ),
                )
                .await;
                crate::say!("dev: ■ session {label} stopped at its deadline after {took:.1}s");
            }
            End::Stopped => crate::say!(
                "dev: ■ session {label} stopped after {took:.1}s (pod deleted or make dev stopping)"
            ),
        }
        self.forget(&uid, &dir);
    }

    fn forget(&self, uid: &str, dir: &Path) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(uid);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// `, Complete: <response>` from the Session, for the console line.
    async fn session_outcome(&self, namespace: &str, name: &str) -> String {
        let sessions: Api<Session> = Api::namespaced(self.client.clone(), namespace);
        // The operator follows the pod within moments; give it a few.
        for _ in 0..20 {
            if let Ok(Some(session)) = sessions.get_opt(name).await
                && let Some(status) = session.status.filter(|s| s.is_finished())
            {
                let text = status
                    .response
                    .clone()
                    .or(status.message.clone())
                    .unwrap_or_default();
                let first = text.lines().next().unwrap_or("");
                let (short, cut) = hookrun_crds::session::truncate_utf8(first, 100);
                let more = if cut || text.lines().count() > 1 {
                    " …"
                } else {
                    ""
                };
                return format!(", session {}: {short}{more}", status.phase().as_str());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        String::new()
    }
}

/// Writes `content` to `path` readable by its owner only, replacing it atomically.
fn write_private(path: &Path, content: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let partial = path.with_extension("new");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .and_then(|mut file| file.write_all(content.as_bytes()))
        .and_then(|()| std::fs::rename(&partial, path));
    written.map_err(|e| format!("writing {}: {e}", path.display()))
}

/// SIGKILL to a process group (the harness and whatever exec mode started).
pub fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapKeySelector, Container, EnvVarSource, ObjectFieldSelector, PodSpec,
        SecretKeySelector,
    };

    fn literal(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn secret_ref(name: &str, secret: &str, key: &str, optional: Option<bool>) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.into(),
                    key: key.into(),
                    optional,
                }),
                ..Default::default()
            }),
        }
    }

    fn config_map_ref(name: &str, map: &str, key: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: map.into(),
                    key: key.into(),
                    optional: None,
                }),
                ..Default::default()
            }),
        }
    }

    fn sources() -> EnvSources {
        let mut sources = EnvSources::default();
        sources.secrets.insert(
            "anthropic".into(),
            Some(BTreeMap::from([("api-key".into(), "sk-ant-x".into())])),
        );
        sources.secrets.insert("missing".into(), None);
        sources.config_maps.insert(
            "settings".into(),
            Some(BTreeMap::from([("level".into(), "debug".into())])),
        );
        sources
    }

    #[test]
    fn env_is_resolved_like_the_kubelet_does() {
        let env = [
            literal("A", "1"),
            secret_ref("ANTHROPIC_API_KEY", "anthropic", "api-key", None),
            config_map_ref("LOG_LEVEL", "settings", "level"),
            secret_ref("OPTIONAL", "missing", "k", Some(true)),
            secret_ref("OPTIONAL_KEY", "anthropic", "nope", Some(true)),
        ];
        assert_eq!(
            resolve_env(&env, &sources()).expect("resolved"),
            [
                ("A".to_owned(), "1".to_owned()),
                ("ANTHROPIC_API_KEY".to_owned(), "sk-ant-x".to_owned()),
                ("LOG_LEVEL".to_owned(), "debug".to_owned()),
            ]
        );
        let (secrets, maps) = referenced(&env);
        assert_eq!(secrets.len(), 2);
        assert!(maps.contains("settings"));
    }

    #[test]
    fn missing_sources_and_field_refs_are_refused_by_name() {
        let missing = resolve_env(&[secret_ref("K", "missing", "k", None)], &sources())
            .expect_err("missing secret");
        assert!(
            missing.0.contains("Secret \"missing\" not found"),
            "{missing:?}"
        );
        let no_key = resolve_env(&[secret_ref("K", "anthropic", "other", None)], &sources())
            .expect_err("missing key");
        assert!(no_key.0.contains("no key \"other\""), "{no_key:?}");
        let field = EnvVar {
            name: "NODE".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    api_version: None,
                }),
                ..Default::default()
            }),
        };
        assert!(resolve_env(&[field], &sources()).is_err());
    }

    fn pod_with_image(image: &str) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: CONTAINER.into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_harness_image_runs() {
        assert_eq!(
            refuse_image(
                &pod_with_image("hookrun-harness:dev"),
                "hookrun-harness:dev"
            ),
            None
        );
        let refusal = refuse_image(
            &pod_with_image("ghcr.io/acme/agent:1"),
            "hookrun-harness:dev",
        )
        .expect("refused");
        assert!(
            refusal.contains("ghcr.io/acme/agent:1") && refusal.contains("hookrun-harness:dev"),
            "{refusal}"
        );
    }

    #[test]
    fn statuses_carry_phase_and_exit_code() {
        let started = now();
        let running = running_status("img", &started);
        assert_eq!(running["status"]["phase"], "Running");
        assert_eq!(running["status"]["containerStatuses"][0]["name"], CONTAINER);
        let ok = exited_status("img", 0, "", &started);
        assert_eq!(ok["status"]["phase"], "Succeeded");
        let terminated = &ok["status"]["containerStatuses"][0]["state"]["terminated"];
        assert_eq!(terminated["exitCode"], 0);
        assert!(terminated.get("message").is_none());
        let failed = exited_status("img", 2, "boom", &started);
        assert_eq!(failed["status"]["phase"], "Failed");
        assert_eq!(
            failed["status"]["containerStatuses"][0]["state"]["terminated"]["message"],
            "boom"
        );
        assert_eq!(last_line("a\nb\n\n"), "b");
        assert_eq!(
            last_line("2026-11-23T01:04:51Z ERROR hookrun_harness: cannot complete the session\n"),
            "cannot complete the session"
        );
    }
}
