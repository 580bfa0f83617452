//! A small mutation fuzzer that runs on stable Rust: it starts from a target's seeds
//! (and any committed corpus files), mutates inputs (bit flips, byte edits, cuts,
//! repeats, splices and dictionary tokens), runs the target under `catch_unwind`, keeps
//! inputs that produce an outcome class it has not seen, and stops at the first panic or
//! when its CPU-time budget is spent.
//!
//! It has no coverage feedback (that needs nightly's sanitizer instrumentation); the
//! outcome classes the targets report (`ok`, `err:<field>`) stand in for it.

use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::targets::Target;

/// The largest input the engine builds (budgets of 64 KiB and more must be reachable).
pub const MAX_INPUT: usize = 512 * 1024;
/// The most inputs kept in the in-memory corpus.
const MAX_CORPUS: usize = 1024;

/// Tokens worth inserting into any input: JSON structure, numbers at type edges, odd
/// characters.
const COMMON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1e999",
    "18446744073709551616",
    "\\u0000",
    "\\ud800",
    "é",
    "\u{202e}",
    "\r\n",
    "\n\n",
    " ",
    "%",
    "%2F",
    "%3F",
    "?",
    "&",
    "=",
    "/",
    "..",
    "\u{0}",
];

/// How one target's run went.
#[derive(Debug)]
pub struct Report {
    /// The target's name.
    pub target: &'static str,
    /// Inputs run.
    pub iterations: u64,
    /// CPU time spent (wall time where the platform gives no per-thread CPU time).
    pub cpu: Duration,
    /// Inputs in the corpus at the end.
    pub corpus: usize,
    /// Distinct outcome classes seen.
    pub classes: usize,
    /// The first input that made the target panic.
    pub crash: Option<Crash>,
}

/// An input that made a target panic.
#[derive(Debug)]
pub struct Crash {
    /// The input.
    pub input: Vec<u8>,
    /// The panic's message.
    pub message: String,
    /// Where the input was written, when it could be.
    pub saved: Option<PathBuf>,
}

/// The committed inputs of `target` under `dir/<target>/` (missing directory: none).
pub fn files(dir: &Path, target: &str) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// Runs `target` on `input`; `Err` carries the panic message.
pub fn run_one(target: &Target, input: &[u8]) -> Result<String, String> {
    panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

/// Fuzzes `target` for `budget` of CPU time, starting from its seeds and the files of
/// `corpus_dir`. A crashing input is written to `crash_dir/<target>/` when given.
pub fn fuzz(
    target: &Target,
    budget: Duration,
    seed: u64,
    corpus_dir: Option<&Path>,
    crash_dir: Option<&Path>,
) -> Report {
    let clock = CpuClock::start();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut corpus: Vec<Vec<u8>> = (target.seeds)();
    if let Some(dir) = corpus_dir {
        corpus.extend(files(dir, target.name));
    }
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut classes = HashSet::new();
    let mut iterations = 0;
    let mut crash = None;
    let quiet = QuietPanics::install();
    // Every seed runs once as it is, then mutated inputs until the budget is spent.
    let mut pending: Vec<Vec<u8>> = corpus.clone();
    while crash.is_none() && (!pending.is_empty() || clock.elapsed() < budget) {
        let input = pending.pop().unwrap_or_else(|| {
            let base = &corpus[rng.random_range(0..corpus.len())];
            let mut input = base.clone();
            for _ in 0..rng.random_range(1..=4) {
                mutate(&mut input, &corpus, target.dictionary, &mut rng);
            }
            input
        });
        iterations += 1;
        match run_one(target, &input) {
            Ok(class) => {
                if classes.insert(class) && corpus.len() < MAX_CORPUS {
                    corpus.push(input);
                }
            }
            Err(message) => {
                let saved = crash_dir.and_then(|dir| save(dir, target.name, &input));
                crash = Some(Crash {
                    input,
                    message,
                    saved,
                });
            }
        }
    }
    drop(quiet);
    Report {
        target: target.name,
        iterations,
        cpu: clock.elapsed(),
        corpus: corpus.len(),
        classes: classes.len(),
        crash,
    }
}

fn save(dir: &Path, target: &str, input: &[u8]) -> Option<PathBuf> {
    use sha2::{Digest, Sha256};
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).ok()?;
    let name = format!("crash-{}", &hex::encode(Sha256::digest(input))[..16]);
    let path = dir.join(name);
    std::fs::write(&path, input).ok()?;
    Some(path)
}

/// One random edit of `input`.
fn mutate(input: &mut Vec<u8>, corpus: &[Vec<u8>], dictionary: &[&str], rng: &mut StdRng) {
    let len = input.len();
    match rng.random_range(0..10) {
        0 if len > 0 => {
            let at = rng.random_range(0..len);
            input[at] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let at = rng.random_range(0..len);
            input[at] = rng.random();
        }
        2 => {
            let at = rng.random_range(0..=len);
            input.insert(at, rng.random());
        }
        3 if len > 0 => {
            let start = rng.random_range(0..len);
            let end = (start + rng.random_range(1..=16)).min(len);
            input.drain(start..end);
        }
        4 if len > 0 => {
            // Repeat a slice many times: reaches size limits and deep nesting.
            let start = rng.random_range(0..len);
            let end = (start + rng.random_range(1..=32)).min(len);
            let chunk = input[start..end].to_vec();
            let times = if rng.random_bool(0.2) {
                rng.random_range(64..=4096)
            } else {
                rng.random_range(1..=8)
            };
            let mut repeated = Vec::with_capacity(chunk.len() * times);
            for _ in 0..times {
                repeated.extend_from_slice(&chunk);
            }
            input.splice(end..end, repeated);
        }
        5 if !corpus.is_empty() => {
            let other = &corpus[rng.random_range(0..corpus.len())];
            if !other.is_empty() {
                let cut = rng.random_range(0..=len);
                let from = rng.random_range(0..other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
        }
        6 if len > 0 => {
            input.truncate(rng.random_range(0..len));
        }
        7 | 8 => {
            let tokens = if !dictionary.is_empty() && rng.random_bool(0.6) {
                dictionary
            } else {
                COMMON_TOKENS
            };
            let token = tokens[rng.random_range(0..tokens.len())].as_bytes();
            let at = rng.random_range(0..=len);
            input.splice(at..at, token.iter().copied());
        }
        _ => {
            // Replace a digit run with an interesting number.
            let numbers: &[&[u8]] = &[b"0", b"-0", b"4294967296", b"99999999999999999999", b"1.5"];
            if let Some(at) = input.iter().position(u8::is_ascii_digit) {
                let end = input[at..]
                    .iter()
                    .position(|b| !b.is_ascii_digit())
                    .map_or(input.len(), |n| at + n);
                let number = numbers[rng.random_range(0..numbers.len())];
                input.splice(at..end, number.iter().copied());
            }
        }
    }
    input.truncate(MAX_INPUT);
}

/// CPU time of the calling thread (Linux), else wall time.
struct CpuClock {
    wall: Instant,
    cpu: Option<Duration>,
}

impl CpuClock {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: thread_cpu(),
        }
    }

    fn elapsed(&self) -> Duration {
        match (self.cpu, thread_cpu()) {
            (Some(start), Some(now)) => now.saturating_sub(start),
            _ => self.wall.elapsed(),
        }
    }
}

/// The calling thread's CPU time from `/proc/thread-self/schedstat` (nanoseconds on the
/// CPU, its first field).
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

thread_local! {
    static FUZZING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Silences panic messages of the calling thread while it fuzzes (its panics are caught
/// and reported); other threads keep the hook they had.
struct QuietPanics;

impl QuietPanics {
    fn install() -> Self {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let previous = panic::take_hook();
            panic::set_hook(Box::new(move |info| {
                if !FUZZING.with(std::cell::Cell::get) {
                    previous(info);
                }
            }));
        });
        FUZZING.with(|f| f.set(true));
        Self
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        FUZZING.with(|f| f.set(false));
    }
}
