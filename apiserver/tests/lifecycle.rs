//! The binary starts, answers on its admin port, and exits 0 on SIGTERM, with a
//! kubeconfig whose cluster is unreachable (it builds its client at start; the watches
//! retry in the background and `/readyz` stays unready).

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn starts_serves_healthz_and_stops_on_sigterm() {
    let admin = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let runner = format!("127.0.0.1:{}", free_port());
    let kubeconfig = std::env::temp_dir().join(format!(
        "hookrun-lifecycle-{}.kubeconfig",
        std::process::id()
    ));
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster: {server: \"https://127.0.0.1:1\"}\nusers:\n- name: none\n  user: {token: unused}\ncontexts:\n- name: none\n  context: {cluster: none, user: none}\ncurrent-context: none\n",
    )
    .expect("a kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hookrun-apiserver"))
        .args([
            "--admin-listen",
            &admin,
            "--listen",
            &listen,
            "--runner-listen",
            &runner,
        ])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");

    let started = Instant::now();
    let healthy = loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(&admin) {
            use std::io::{Read, Write};
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).expect("read");
            break answer.starts_with("HTTP/1.1 200");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the admin port never opened"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(healthy, "/healthz answers 200");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    let status = child.wait().expect("the binary exits");
    let _ = std::fs::remove_file(&kubeconfig);
    assert!(status.success(), "exit status after SIGTERM: {status}");
}
