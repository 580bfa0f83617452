//! Exec mode: the Agent is a program. It gets the title on stdin; what it prints goes out
//! as `agent.message` events (lines that arrive close together travel as one event), and
//! its whole output is the answer when it exits 0.
//!
//! When the Agent's Sessions take input (`idleTimeoutSeconds` above 0) the program is
//! [`Interactive`]: its stdin stays open, the title and then each input are written to
//! it, each followed by a newline, and what it prints until it has been quiet for the
//! turn gap ([`DEFAULT_TURN_GAP`]) is that turn's reply. Its stdin is closed when no
//! input came within the idle timeout; it should then exit (0 completes the Session with
//! the last reply).

use std::process::Stdio;
use std::time::Duration;

use hookrun_crds::agent::ExecSpec;
use hookrun_crds::session::{MAX_EVENT_CONTENT_BYTES, MAX_RESPONSE_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long a printed line may wait for company before it is posted.
pub const BATCH_WINDOW: Duration = Duration::from_millis(200);
/// The most one event carries; a longer line is split.
pub const BATCH_MAX_BYTES: usize = MAX_EVENT_CONTENT_BYTES / 2;
/// How much of stderr's end an error message quotes.
pub const STDERR_TAIL_BYTES: usize = 2048;

/// How the program ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

/// What the program did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// How it ended.
    pub exit: ExitKind,
    /// Its standard output (the first [`MAX_RESPONSE_BYTES`] and a little more).
    pub stdout: String,
    /// The end of its standard error.
    pub stderr_tail: String,
}

impl ExecOutcome {
    /// Whether it exited 0.
    pub fn succeeded(&self) -> bool {
        self.exit == ExitKind::Code(0)
    }

    /// The error message for a failed run: how it ended and stderr's tail.
    pub fn failure_message(&self) -> String {
        let ended = match self.exit {
            ExitKind::Code(code) => format!("the command exited with code {code}"),
            ExitKind::Signal(signal) => format!("the command was killed by signal {signal}"),
        };
        let tail = self.stderr_tail.trim();
        if tail.is_empty() {
            format!("{ended} (stderr was empty)")
        } else {
            format!("{ended}; end of stderr:\n{tail}")
        }
    }
}

/// Why the program could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// It could not be started.
    #[error("cannot start {program:?}{dir}: {reason}")]
    Spawn {
        /// The program.
        program: String,
        /// ` in <dir>` when a working directory was set.
        dir: String,
        /// The OS error.
        reason: String,
    },
    /// Reading its output or waiting for it failed.
    #[error("running the command: {0}")]
    Io(String),
    /// Nobody takes its messages any more (the session ended elsewhere); it was killed.
    #[error("the session ended while the command ran; it was stopped")]
    Cancelled,
}

/// How long an interactive program must be quiet, after printing something, for its
/// turn to be over.
pub const DEFAULT_TURN_GAP: Duration = Duration::from_millis(1000);

/// A program that runs for the whole Session and takes one input per turn on stdin.
pub struct Interactive {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    output: mpsc::Receiver<Vec<u8>>,
    stderr_tail: Option<tokio::task::JoinHandle<String>>,
    gap: Duration,
    /// The output of the program's finished turns, bounded, for its outcome.
    captured: Vec<u8>,
}

/// What the program printed for one turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnOutput {
    /// The reply: what it printed, trailing whitespace cut.
    pub reply: String,
    /// Its stdout closed: it will take no more turns.
    pub ended: bool,
}

impl Interactive {
    /// Starts the program with stdin, stdout and stderr piped; a turn is over once it
    /// has printed and then been quiet for `gap`.
    pub fn start(
        spec: &ExecSpec,
        env: &[(String, String)],
        gap: Duration,
    ) -> Result<Self, ExecError> {
        let mut child = spawn(spec, env)?;
        let stdin = child.stdin.take();
        let stderr_tail = child
            .stderr
            .take()
            .map(|stderr| tokio::spawn(forward_stderr(stderr)));
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| ExecError::Io("no stdout pipe".to_string()))?;
        let (chunks, output) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stdout.read(&mut buf).await {
                if n == 0 || chunks.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            output,
            stderr_tail,
            gap,
            captured: Vec::new(),
        })
    }

    /// Writes `input` and a newline to the program, then collects its reply: what it
    /// prints until it has been quiet for the gap, for at most `limit` in all.
    pub async fn turn(&mut self, input: &str, limit: Duration) -> Result<TurnOutput, ExecError> {
        if let Some(stdin) = self.stdin.as_mut() {
            let mut line = input.as_bytes().to_vec();
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            // A program that closed its stdin takes no more input; its output decides.
            if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                self.stdin = None;
            }
        }
        let hard = Instant::now() + limit;
        let mut reply: Vec<u8> = Vec::new();
        let mut quiet_at = hard;
        let ended = loop {
            match tokio::time::timeout_at(quiet_at, self.output.recv()).await {
                Ok(Some(chunk)) => {
                    let room = (MAX_RESPONSE_BYTES + 4).saturating_sub(reply.len());
                    reply.extend_from_slice(&chunk[..room.min(chunk.len())]);
                    quiet_at = hard.min(Instant::now() + self.gap);
                }
                Ok(None) => break true,
                Err(_elapsed) => break false,
            }
        };
        let room = (MAX_RESPONSE_BYTES + 4).saturating_sub(self.captured.len());
        self.captured
            .extend_from_slice(&reply[..room.min(reply.len())]);
        let reply = String::from_utf8_lossy(&reply).trim_end().to_string();
        Ok(TurnOutput { reply, ended })
    }

    /// Closes the program's stdin and waits for it to exit (at most `limit`, then it is
    /// killed): its outcome, with the output of all its turns.
    pub async fn finish(mut self, limit: Duration) -> Result<ExecOutcome, ExecError> {
        drop(self.stdin.take());
        let deadline = Instant::now() + limit;
        // Output after the last turn is kept for the outcome, not posted.
        while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, self.output.recv()).await {
            let room = (MAX_RESPONSE_BYTES + 4).saturating_sub(self.captured.len());
            self.captured
                .extend_from_slice(&chunk[..room.min(chunk.len())]);
        }
        let status = match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(waited) => waited.map_err(|error| ExecError::Io(error.to_string()))?,
            Err(_) => {
                let _ = self.child.kill().await;
                self.child
                    .wait()
                    .await
                    .map_err(|error| ExecError::Io(error.to_string()))?
            }
        };
        let stderr_tail = match self.stderr_tail.take() {
            Some(task) => task.await.unwrap_or_default(),
            None => String::new(),
        };
        Ok(ExecOutcome {
            exit: exit_kind(status),
            stdout: String::from_utf8_lossy(&self.captured).into_owned(),
            stderr_tail,
        })
    }
}

fn exit_kind(status: std::process::ExitStatus) -> ExitKind {
    match status.code() {
        Some(code) => ExitKind::Code(code),
        None => {
            use std::os::unix::process::ExitStatusExt;
            ExitKind::Signal(status.signal().unwrap_or(0))
        }
    }
}

/// Starts `spec.command` with every stream piped, killed when dropped.
fn spawn(spec: &ExecSpec, env: &[(String, String)]) -> Result<tokio::process::Child, ExecError> {
    let Some((program, args)) = spec.command.split_first() else {
        return Err(ExecError::Spawn {
            program: String::new(),
            dir: String::new(),
            reason: "the command is empty".to_string(),
        });
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = &spec.working_dir {
        command.current_dir(dir);
    }
    command.spawn().map_err(|error| ExecError::Spawn {
        program: program.clone(),
        dir: spec
            .working_dir
            .as_ref()
            .map(|d| format!(" in {d}"))
            .unwrap_or_default(),
        reason: error.to_string(),
    })
}

/// Splits a byte stream into lines, cutting lines longer than `max` bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter that never yields a line longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            pending: Vec::new(),
            max: max.max(4),
        }
    }

    /// Feeds bytes; answers the lines they complete (without their `\n`).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                lines.push(self.take());
            } else {
                self.pending.push(byte);
                if self.pending.len() >= self.max {
                    lines.push(self.take());
                }
            }
        }
        lines
    }

    /// The last line when the stream ended without a newline.
    pub fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.pending);
        let line = line.strip_suffix('\r').unwrap_or(&line).to_string();
        self.pending.clear();
        line
    }
}

/// Lines waiting to be posted as one event.
#[derive(Debug, Default)]
pub struct Batch {
    text: String,
}

impl Batch {
    /// Adds a line; answers the batch to post first when the line would not fit.
    pub fn push(&mut self, line: &str) -> Option<String> {
        let full = (!self.text.is_empty() && self.text.len() + 1 + line.len() > BATCH_MAX_BYTES)
            .then(|| self.take())
            .flatten();
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(line);
        full
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The batch to post, unless it holds only blank lines.
    pub fn take(&mut self) -> Option<String> {
        let text = std::mem::take(&mut self.text);
        (!text.trim().is_empty()).then_some(text)
    }
}

/// Runs the program to its end. Batches of output lines go to `messages`; when its
/// receiver is gone the program is killed and the run is [`ExecError::Cancelled`].
pub async fn run(
    spec: &ExecSpec,
    title: &str,
    env: &[(String, String)],
    messages: mpsc::Sender<String>,
) -> Result<ExecOutcome, ExecError> {
    let mut child = spawn(spec, env)?;

    // The title is written from its own task: a program that prints before it reads
    // must not deadlock against a full stdin pipe.
    if let Some(mut stdin) = child.stdin.take() {
        let title = title.as_bytes().to_vec();
        tokio::spawn(async move {
            // A program that never reads stdin closes it: that is its right.
            let _ = stdin.write_all(&title).await;
            let _ = stdin.shutdown().await;
        });
    }
    let stderr_tail = child
        .stderr
        .take()
        .map(|stderr| tokio::spawn(forward_stderr(stderr)));
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| ExecError::Io("no stdout pipe".to_string()))?;

    let mut captured = Vec::new();
    let mut splitter = LineSplitter::new(BATCH_MAX_BYTES);
    let mut batch = Batch::default();
    let mut flush_at: Option<Instant> = None;
    let mut buf = vec![0u8; 8192];
    let cancelled = loop {
        tokio::select! {
            read = stdout.read(&mut buf) => {
                let n = read.map_err(|error| ExecError::Io(error.to_string()))?;
                if n == 0 {
                    break false;
                }
                let bytes = &buf[..n];
                let room = (MAX_RESPONSE_BYTES + 4).saturating_sub(captured.len());
                captured.extend_from_slice(&bytes[..room.min(n)]);
                let mut gone = false;
                for line in splitter.push(bytes) {
                    if let Some(full) = batch.push(&line) {
                        gone |= messages.send(full).await.is_err();
                    }
                }
                if gone {
                    break true;
                }
                if batch.is_empty() {
                    flush_at = None;
                } else if flush_at.is_none() {
                    flush_at = Some(Instant::now() + BATCH_WINDOW);
                }
            }
            () = sleep_until(flush_at), if flush_at.is_some() => {
                flush_at = None;
                if let Some(text) = batch.take()
                    && messages.send(text).await.is_err()
                {
                    break true;
                }
            }
            () = messages.closed() => break true,
        }
    };
    if cancelled {
        let _ = child.kill().await;
        return Err(ExecError::Cancelled);
    }
    if let Some(line) = splitter.finish()
        && let Some(full) = batch.push(&line)
    {
        let _ = messages.send(full).await;
    }
    if let Some(text) = batch.take() {
        let _ = messages.send(text).await;
    }

    let status = child
        .wait()
        .await
        .map_err(|error| ExecError::Io(error.to_string()))?;
    let exit = exit_kind(status);
    let stderr_tail = match stderr_tail {
        Some(task) => task.await.unwrap_or_default(),
        None => String::new(),
    };
    Ok(ExecOutcome {
        exit,
        stdout: String::from_utf8_lossy(&captured).into_owned(),
        stderr_tail,
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Copies the program's stderr to ours (the pod log) line by line, secrets scrubbed,
/// and keeps its last bytes. A line longer than [`STDERR_LINE_MAX`] is cut, so a
/// secret can only get through when a program writes it across such a cut.
async fn forward_stderr(mut stderr: impl AsyncRead + Unpin) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut ours = tokio::io::stderr();
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(line) = next_stderr_line(&mut pending, false) {
            let _ = ours.write_all(line.as_bytes()).await;
            keep_tail(&mut tail, line.as_bytes());
        }
    }
    if let Some(line) = next_stderr_line(&mut pending, true) {
        let _ = ours.write_all(line.as_bytes()).await;
        keep_tail(&mut tail, line.as_bytes());
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// The longest stderr line forwarded whole.
pub const STDERR_LINE_MAX: usize = 16 * 1024;

/// The next complete line of `pending` (or what is left at the end), scrubbed, its
/// newline kept.
fn next_stderr_line(pending: &mut Vec<u8>, end: bool) -> Option<String> {
    let cut = match pending.iter().position(|&b| b == b'\n') {
        Some(newline) => newline + 1,
        None if pending.len() >= STDERR_LINE_MAX => STDERR_LINE_MAX,
        None if end && !pending.is_empty() => pending.len(),
        None => return None,
    };
    let line: Vec<u8> = pending.drain(..cut).collect();
    Some(crate::redact::scrub(&String::from_utf8_lossy(&line)))
}

fn keep_tail(tail: &mut Vec<u8>, bytes: &[u8]) {
    tail.extend_from_slice(bytes);
    if tail.len() > STDERR_TAIL_BYTES {
        tail.drain(..tail.len() - STDERR_TAIL_BYTES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_yields_whole_lines_across_reads() {
        let mut splitter = LineSplitter::new(100);
        assert_eq!(splitter.push(b"one\ntw"), ["one"]);
        assert_eq!(splitter.push(b"o\r\nthree"), ["two"]);
        assert_eq!(splitter.finish().as_deref(), Some("three"));
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn splitter_cuts_long_lines() {
        let mut splitter = LineSplitter::new(4);
        assert_eq!(splitter.push(b"abcdefghij\n"), ["abcd", "efgh", "ij"]);
    }

    #[test]
    fn batch_joins_lines_until_full() {
        let mut batch = Batch::default();
        assert_eq!(batch.push("a"), None);
        assert_eq!(batch.push("b"), None);
        let big = "x".repeat(BATCH_MAX_BYTES - 1);
        assert_eq!(batch.push(&big).as_deref(), Some("a\nb"));
        assert_eq!(batch.take(), Some(big));
        assert!(batch.is_empty());
        batch.push("");
        batch.push("  ");
        assert_eq!(batch.take(), None, "blank lines alone are not an event");
    }

    #[tokio::test]
    async fn stderr_is_forwarded_scrubbed_line_by_line() {
        crate::redact::remember(|secrets| secrets.add("stderr-secret-42"));
        let input: &[u8] = b"curl: using key stderr-secret-42\nhttp://u:pw@host/ failed\nlast";
        let tail = forward_stderr(input).await;
        assert_eq!(
            tail,
            "curl: using key [redacted]\nhttp://[redacted]@host/ failed\nlast"
        );
    }

    #[tokio::test]
    async fn an_interactive_program_answers_each_input_in_its_own_turn() {
        let spec = ExecSpec {
            command: vec!["cat".to_string()],
            working_dir: None,
        };
        let mut program =
            Interactive::start(&spec, &[], Duration::from_millis(200)).expect("cat starts");
        let limit = Duration::from_secs(10);
        let first = program.turn("hello", limit).await.expect("a turn");
        assert_eq!(first.reply, "hello");
        assert!(!first.ended);
        let second = program.turn("again\n", limit).await.expect("a turn");
        assert_eq!(second.reply, "again");
        let outcome = program.finish(limit).await.expect("cat exits");
        assert!(outcome.succeeded(), "{outcome:?}");
        assert_eq!(outcome.stdout, "hello\nagain\n");
    }

    #[test]
    fn failure_message_names_the_exit_and_stderr() {
        let outcome = ExecOutcome {
            exit: ExitKind::Code(3),
            stdout: String::new(),
            stderr_tail: "boom\n".into(),
        };
        assert_eq!(
            outcome.failure_message(),
            "the command exited with code 3; end of stderr:\nboom"
        );
        let killed = ExecOutcome {
            exit: ExitKind::Signal(9),
            stdout: String::new(),
            stderr_tail: String::new(),
        };
        assert!(killed.failure_message().contains("signal 9"));
        assert!(!killed.succeeded());
    }
}
