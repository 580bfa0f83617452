//! A small driver of real headless Chromium over the DevTools protocol, for tests that
//! look at a page as a person would: navigate, evaluate JavaScript to fill, click and read
//! the rendered DOM, wait for a condition, and take screenshots.
//!
//! Chromium starts with `--remote-debugging-port=0` and a throwaway profile; it writes the
//! port it chose into `DevToolsActivePort` in that profile, and the driver connects to the
//! browser's WebSocket, opens one page and talks to it through a flattened target session.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::control_plane::workspace_root;
use crate::tied;

/// How long the browser may take to start and to answer one command.
const BROWSER_BUDGET: Duration = Duration::from_secs(30);

/// Where the browser is: `$CHROMIUM`, else `chromium` or `chromium-browser` on `PATH`.
pub fn chromium_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// One headless Chromium with one open page; killed (and its profile removed) on drop.
pub struct Browser {
    process: tokio::process::Child,
    profile: PathBuf,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The page's flattened target session.
    page_session: String,
    next_id: u64,
}

impl Browser {
    /// Starts headless Chromium with a `width`×`height` page. Fails the test, saying how to
    /// install it, when Chromium is missing.
    pub async fn start(width: u32, height: u32) -> Self {
        let chromium = chromium_path().unwrap_or_else(|| {
            panic!(
                "Chromium is needed for the browser tests and was not found (set CHROMIUM or \
                 put chromium on PATH): on Debian or Ubuntu `sudo apt-get install -y chromium`, \
                 which `bash .ci/run` does when it is missing"
            )
        });
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let profile = workspace_root()
            .join("target/test-clusters")
            .join(format!("chromium-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&profile).expect("the browser profile directory");
        let log = std::fs::File::create(profile.with_extension("log")).expect("the browser log");
        let mut command = tied::command(&chromium);
        command
            .args([
                "--headless=new",
                "--remote-debugging-port=0",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("the browser log"))
            .stderr(log)
            .kill_on_drop(true);
        let process = tied::spawn(command)
            .await
            .unwrap_or_else(|e| panic!("{} starts: {e}", chromium.display()));

        let active_port = profile.join("DevToolsActivePort");
        let started = Instant::now();
        let (port, path) = loop {
            let text = std::fs::read_to_string(&active_port).unwrap_or_default();
            let mut lines = text.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                break (port.to_owned(), path.to_owned());
            }
            assert!(
                started.elapsed() < BROWSER_BUDGET,
                "Chromium wrote no DevToolsActivePort within {BROWSER_BUDGET:?}; see {}",
                profile.with_extension("log").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
            .await
            .expect("the DevTools WebSocket accepts");
        let mut browser = Browser {
            process,
            profile,
            socket,
            page_session: String::new(),
            next_id: 0,
        };
        let target = browser
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target_id = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        browser.page_session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        browser.page("Page.enable", json!({})).await;
        // A page in front is not throttled as a background tab (its timers run on time).
        browser.page("Page.bringToFront", json!({})).await;
        browser
            .page(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await;
        browser
    }

    /// Sends one command (to the page's session when `session` is given) and returns its
    /// result, skipping the events that arrive meanwhile.
    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap_or_else(|e| panic!("{method}: the browser went away: {e}"));
        let deadline = Instant::now() + BROWSER_BUDGET;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer within {BROWSER_BUDGET:?}"));
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("{method}: the DevTools socket failed: {e}"),
                None => panic!("{method}: the browser closed the DevTools socket"),
            };
            let answer: Value = serde_json::from_str(&text).expect("DevTools speaks JSON");
            if answer["id"] != json!(id) {
                continue;
            }
            if let Some(error) = answer.get("error") {
                panic!("{method} failed: {error}");
            }
            return answer["result"].clone();
        }
    }

    async fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.page_session.clone();
        self.send(Some(&session), method, params).await
    }

    /// Opens `url` and waits until the document has loaded.
    pub async fn navigate(&mut self, url: &str) {
        let answer = self.page("Page.navigate", json!({"url": url})).await;
        if let Some(error) = answer.get("errorText") {
            panic!("navigating to the page failed: {error}");
        }
        self.wait_for("document.readyState === 'complete'", BROWSER_BUDGET)
            .await
            .expect("the page loads");
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value as
    /// JSON. A thrown exception fails the test with its text.
    pub async fn evaluate(&mut self, expression: &str) -> Value {
        let answer = self
            .page(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(exception) = answer.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        answer["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is truthy (not null, false, 0 or ""), within
    /// `budget`; its last value when it is.
    pub async fn wait_for(&mut self, expression: &str, budget: Duration) -> Option<Value> {
        let started = Instant::now();
        loop {
            let value = self.evaluate(expression).await;
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return Some(value);
            }
            if started.elapsed() > budget {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of what the page shows now to `path` (directories created).
    pub async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .page("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let data = shot["data"].as_str().expect("screenshot data");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("the screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot directory");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The profile is only scratch; the browser goes first so it writes no more there.
        let _ = self.process.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
