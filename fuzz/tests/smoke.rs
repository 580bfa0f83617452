//! The fuzz targets' smoke run for `cargo test`/`make test`: every committed regression
//! input, then each target for a short CPU budget (`FUZZ_SMOKE_SECONDS`, default 1 s).

use hookrun_fuzz::{engine, targets};

#[test]
fn every_regression_input_passes() {
    let mut failures = Vec::new();
    for (target, count, result) in targets::regressions(&hookrun_fuzz::regressions_dir()) {
        if let Err(message) = result {
            failures.push(format!("{target} ({count} inputs): {message}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_target_survives_a_short_run() {
    let budget = targets::smoke_budget();
    let seed = rand::random();
    // One thread per target: the budget is CPU time, so the run takes about
    // targets × budget / cores.
    let failures: Vec<String> = std::thread::scope(|scope| {
        let runs: Vec<_> = targets::ALL
            .iter()
            .map(|target| {
                scope.spawn(move || {
                    let report = engine::fuzz(
                        target,
                        budget,
                        seed,
                        Some(&hookrun_fuzz::corpus_dir()),
                        None,
                    );
                    assert!(report.iterations > 0, "{} ran nothing", target.name);
                    report.crash.map(|crash| {
                        format!(
                            "{} (seed {seed}): {} on {:?}",
                            target.name,
                            crash.message,
                            String::from_utf8_lossy(&crash.input[..crash.input.len().min(300)])
                        )
                    })
                })
            })
            .collect();
        runs.into_iter()
            .filter_map(|run| run.join().expect("a fuzz thread"))
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
