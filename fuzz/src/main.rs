//! `hookrun-fuzz [--seconds N] [--seed S] [TARGET...]`: runs each fuzz target (all by
//! default) for N seconds of CPU time and prints what each did. A crashing input is
//! written to `fuzz/regressions/<target>/`, where `cargo test` replays it from then on.

use std::process::ExitCode;
use std::time::Duration;

use hookrun_fuzz::{engine, targets};

fn main() -> ExitCode {
    let mut seconds = 60.0_f64;
    let mut seed: u64 = rand::random();
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => match args.next().and_then(|s| s.parse().ok()) {
                Some(s) if s >= 0.0 => seconds = s,
                _ => return usage("--seconds takes a number of seconds"),
            },
            "--seed" => match args.next().and_then(|s| s.parse().ok()) {
                Some(s) => seed = s,
                None => return usage("--seed takes a whole number"),
            },
            "--list" => {
                for target in targets::ALL {
                    println!("{}", target.name);
                }
                return ExitCode::SUCCESS;
            }
            "-h" | "--help" => return usage(""),
            name => match targets::by_name(name) {
                Some(target) => names.push(target),
                None => return usage(&format!("no target {name:?} (see --list)")),
            },
        }
    }
    if names.is_empty() {
        names = targets::ALL.iter().collect();
    }
    let budget = Duration::from_secs_f64(seconds);
    println!(
        "fuzzing {} targets for {seconds} s of CPU each (seed {seed})",
        names.len()
    );
    println!(
        "{:<30} {:>12} {:>9} {:>7} {:>8}  result",
        "target", "iterations", "cpu s", "corpus", "classes"
    );
    let mut failed = false;
    for target in names {
        let report = engine::fuzz(
            target,
            budget,
            seed,
            Some(&hookrun_fuzz::corpus_dir()),
            Some(&hookrun_fuzz::regressions_dir()),
        );
        let result = match &report.crash {
            None => "ok".to_owned(),
            Some(crash) => {
                failed = true;
                format!(
                    "CRASH ({} bytes, saved to {}): {}",
                    crash.input.len(),
                    crash
                        .saved
                        .as_ref()
                        .map_or("nowhere".to_owned(), |p| p.display().to_string()),
                    crash.message
                )
            }
        };
        println!(
            "{:<30} {:>12} {:>9.1} {:>7} {:>8}  {result}",
            report.target,
            report.iterations,
            report.cpu.as_secs_f64(),
            report.corpus,
            report.classes
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn usage(problem: &str) -> ExitCode {
    if !problem.is_empty() {
        eprintln!("hookrun-fuzz: {problem}");
    }
    eprintln!("usage: hookrun-fuzz [--seconds N] [--seed S] [--list] [TARGET...]");
    if problem.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}
