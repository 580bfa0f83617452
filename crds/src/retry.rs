//! Retrying a write that lost a race (a 409 on a `resourceVersion` precondition): the one
//! loop both binaries use for Session status writes. It knows no client: the caller gives
//! one attempt as a closure, says which errors are conflicts, and gives the sleep.

use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng;

/// How long a write keeps retrying after conflicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConflictRetry {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No new attempt starts once this much time has passed since the first.
    pub budget: Duration,
}

impl ConflictRetry {
    /// A random pause before retry `attempt` (from 1), so that writers part ways: at
    /// least 1 ms, at most 5 ms doubling per attempt up to 100 ms.
    pub fn pause(attempt: u32) -> Duration {
        let ceiling = (5u64 << attempt.min(5)).min(100);
        Duration::from_millis(rand::rng().random_range(1..=ceiling))
    }

    /// Runs `attempt` (given the attempt number, from 1) until it succeeds, fails with an
    /// error `is_conflict` does not call a conflict, or the attempts or the time budget
    /// are spent; then the last conflict is returned. `sleep` waits between attempts.
    pub async fn run<T, E, A, F, S, P>(
        self,
        is_conflict: impl Fn(&E) -> bool,
        sleep: S,
        mut attempt: A,
    ) -> Result<T, E>
    where
        A: FnMut(u32) -> F,
        F: Future<Output = Result<T, E>>,
        S: Fn(Duration) -> P,
        P: Future<Output = ()>,
    {
        let started = Instant::now();
        let mut number = 1;
        loop {
            match attempt(number).await {
                Err(error)
                    if is_conflict(&error)
                        && number < self.max_attempts
                        && started.elapsed() < self.budget =>
                {
                    sleep(Self::pause(number)).await;
                    number += 1;
                }
                result => return result,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Failure {
        Conflict,
        Other,
    }

    fn block_on<T>(future: impl Future<Output = T>) -> T {
        // The futures here never wait on anything, so one poll finishes them.
        let mut future = std::pin::pin!(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(value) => value,
            std::task::Poll::Pending => panic!("the future waited"),
        }
    }

    fn run(
        retry: ConflictRetry,
        outcomes: Vec<Result<u32, Failure>>,
    ) -> (Result<u32, Failure>, Vec<u32>, Vec<Duration>) {
        let outcomes = Mutex::new(outcomes.into_iter());
        let seen = Mutex::new(Vec::new());
        let pauses = Mutex::new(Vec::new());
        let result = block_on(retry.run(
            |e| *e == Failure::Conflict,
            |pause| {
                pauses.lock().expect("unpoisoned").push(pause);
                std::future::ready(())
            },
            |number| {
                seen.lock().expect("unpoisoned").push(number);
                let next = outcomes.lock().expect("unpoisoned").next();
                std::future::ready(next.expect("an outcome per attempt"))
            },
        ));
        (
            result,
            seen.into_inner().expect("unpoisoned"),
            pauses.into_inner().expect("unpoisoned"),
        )
    }

    const FOUR: ConflictRetry = ConflictRetry {
        max_attempts: 4,
        budget: Duration::from_secs(60),
    };

    #[test]
    fn conflicts_are_retried_until_success() {
        let (result, seen, pauses) = run(
            FOUR,
            vec![Err(Failure::Conflict), Err(Failure::Conflict), Ok(7)],
        );
        assert_eq!(result, Ok(7));
        assert_eq!(seen, [1, 2, 3]);
        assert_eq!(pauses.len(), 2);
    }

    #[test]
    fn other_errors_end_at_once() {
        let (result, seen, pauses) = run(FOUR, vec![Err(Failure::Conflict), Err(Failure::Other)]);
        assert_eq!(result, Err(Failure::Other));
        assert_eq!(seen, [1, 2]);
        assert_eq!(pauses.len(), 1);
    }

    #[test]
    fn the_last_conflict_is_returned_when_attempts_run_out() {
        let (result, seen, pauses) = run(FOUR, (0..4).map(|_| Err(Failure::Conflict)).collect());
        assert_eq!(result, Err(Failure::Conflict));
        assert_eq!(seen, [1, 2, 3, 4]);
        assert_eq!(pauses.len(), 3);
    }

    #[test]
    fn a_spent_budget_stops_retrying() {
        let spent = ConflictRetry {
            max_attempts: u32::MAX,
            budget: Duration::ZERO,
        };
        let (result, seen, _) = run(spent, vec![Err(Failure::Conflict)]);
        // The first attempt always runs; a conflict after the budget is the answer.
        assert_eq!(result, Err(Failure::Conflict));
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn pauses_are_small_random_and_grow() {
        for attempt in 1..20 {
            let pause = ConflictRetry::pause(attempt);
            assert!(pause >= Duration::from_millis(1) && pause <= Duration::from_millis(100));
        }
        let first: Vec<_> = (0..200).map(|_| ConflictRetry::pause(1)).collect();
        assert!(first.iter().all(|p| *p <= Duration::from_millis(10)));
        assert!(
            first.iter().any(|p| *p != first[0]),
            "pauses vary between writers"
        );
    }
}
