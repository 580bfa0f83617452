//! Child processes tied to the life of the process that starts them, and the pid files
//! that let a later run stop what an earlier one left behind.
//!
//! A tied child is started through util-linux's `setpriv --pdeathsig KILL`, which asks the
//! kernel to SIGKILL it when its parent dies, however the parent dies (SIGKILL, a panic,
//! a closed terminal). The kernel sends that signal when the parent *thread* exits, so
//! every tied child is spawned from one thread that lives as long as the process.
//!
//! Pid files hold `name pid` lines. A recorded pid is only signalled while
//! `/proc/<pid>/cmdline` still names that binary, so a pid the kernel gave to some other
//! program since is never touched.

use std::{
    ffi::OsStr,
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{OnceLock, mpsc},
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

/// The program that sets the parent-death signal and then runs the child.
const SETPRIV: &str = "setpriv";

/// `setpriv`'s path, looked up once in `PATH`.
fn setpriv() -> Option<&'static Path> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|dir| dir.join(SETPRIV))
                .find(|candidate| candidate.is_file())
        })
        .as_deref()
}

/// A command for `program` that dies with this process once started with [`spawn`].
///
/// Without `setpriv` (util-linux) on `PATH` the child is started directly and says so
/// once on stderr: it then outlives a killed parent, and only the pid files catch it.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    match setpriv() {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "KILL", "--"]).arg(program);
            command
        }
        None => {
            static WARNED: OnceLock<()> = OnceLock::new();
            WARNED.get_or_init(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "warning: {SETPRIV} (util-linux) is not on PATH: child processes will \
                     outlive this one if it is killed"
                );
            });
            Command::new(program)
        }
    }
}

type Job = (
    Command,
    tokio::runtime::Handle,
    tokio::sync::oneshot::Sender<std::io::Result<Child>>,
);

/// The thread tied children are spawned from. It never exits: the sender lives in a
/// static, so the parent-death signal fires only when the whole process dies.
fn spawner() -> std::io::Result<&'static mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    if let Some(sender) = SPAWNER.get() {
        return Ok(sender);
    }
    let (sender, jobs) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("tied-spawner".into())
        .spawn(move || {
            for (mut command, runtime, reply) in jobs {
                // The child's reaper belongs to the caller's runtime.
                let _entered = runtime.enter();
                let _ = reply.send(command.spawn());
            }
        })?;
    // Two first callers racing each start a thread; the loser's thread ends with its
    // channel, before it spawned anything.
    Ok(SPAWNER.get_or_init(|| sender))
}

/// Spawns `command` (from [`command`]) from the process-lifetime thread. Must be called
/// inside a tokio runtime, like `Command::spawn`.
pub async fn spawn(command: Command) -> std::io::Result<Child> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let gone = || std::io::Error::other("the thread that spawns child processes is gone");
    spawner()?
        .send((command, tokio::runtime::Handle::current(), reply))
        .map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}

/// Whether `pid` is a live process running the binary `name` (the file name of its
/// `argv[0]`; a zombie's command line is empty, so it does not count).
pub fn runs(pid: u32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    Path::new(&*String::from_utf8_lossy(argv0))
        .file_name()
        .is_some_and(|file| file == name)
}

/// Sends `signal` (`-TERM`, `-KILL`) with kill(1): the workspace denies unsafe code.
pub fn signal(pid: u32, signal: &str) {
    if pid > 0 {
        let _ = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Appends `name pid` to a pid file.
pub fn record(path: &Path, name: &str, pid: u32) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(format!("{name} {pid}\n").as_bytes())
}

/// The `name pid` lines of a pid file (none when it does not exist).
pub fn recorded(path: &Path) -> Vec<(String, u32)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.parse().ok()?))
        })
        .collect()
}

/// Stops `pid` if it still runs `name`: SIGTERM, up to `grace` to exit, then SIGKILL.
/// Answers whether it was running.
pub fn stop(pid: u32, name: &str, grace: Duration) -> bool {
    if !runs(pid, name) {
        return false;
    }
    signal(pid, "-TERM");
    let begun = Instant::now();
    while runs(pid, name) && begun.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    if runs(pid, name) {
        signal(pid, "-KILL");
    }
    true
}

/// Stops every process a pid file records that still runs its binary, newest first,
/// then removes the file. Answers what was stopped.
pub fn stop_recorded(path: &Path) -> Vec<(String, u32)> {
    let mut stopped = Vec::new();
    for (name, pid) in recorded(path).into_iter().rev() {
        if stop(pid, &name, Duration::from_secs(5)) {
            stopped.push((name, pid));
        }
    }
    let _ = std::fs::remove_file(path);
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_matches_the_binary_name_of_a_live_process_only() {
        let own = std::process::id();
        let exe = std::env::current_exe().expect("the test binary's path");
        let name = exe
            .file_name()
            .and_then(OsStr::to_str)
            .expect("a file name");
        assert!(runs(own, name));
        assert!(!runs(own, "etcd"));
        assert!(
            !runs(own, &name[1..]),
            "a suffix of the name is another binary"
        );
        assert!(!runs(u32::MAX, name), "no such pid");
    }

    #[test]
    fn pid_files_round_trip_and_skip_bad_lines() {
        let dir = std::env::temp_dir().join(format!("tied-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let path = dir.join("pids");
        let _ = std::fs::remove_file(&path);
        record(&path, "etcd", 12).expect("written");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"garbage\nkube-apiserver x\n"))
            .expect("appended");
        record(&path, "kube-apiserver", 34).expect("written");
        assert_eq!(
            recorded(&path),
            vec![("etcd".into(), 12), ("kube-apiserver".into(), 34)]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_tied_child_is_spawned_and_runs() {
        let mut child = spawn({
            let mut command = command("true");
            command.stdin(Stdio::null());
            command
        })
        .await
        .expect("spawned");
        assert!(child.wait().await.expect("its status").success());
    }
}
