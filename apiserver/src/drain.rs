//! Shutting down without losing a caller. On SIGTERM the server:
//!
//! 1. fails `/readyz` at once ([`Stage::Draining`]) and keeps serving for the drain
//!    period, so endpoints and load balancers stop sending traffic here first; every
//!    answer meanwhile carries `Connection: close`, so keep-alive clients move on;
//! 2. then ([`Stage::Closing`]) stops accepting connections, answers every held
//!    wait-mode request with its 202 and `pollUrl` and ends every event stream with an
//!    event to resume from (the [`SessionHub`] is flushed), lets requests in flight
//!    (Session creates included) finish and closes idle connections;
//! 3. exits once every connection is done, or after [`FINISH_BUDGET`].
//!
//! The pod's `terminationGracePeriodSeconds` must exceed the drain period plus
//! [`FINISH_BUDGET`] ([`grace_needed`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::hub::SessionHub;

/// How long requests in flight (Session creates, answers being written) get to finish
/// once the listeners stop accepting.
pub const FINISH_BUDGET: Duration = Duration::from_secs(10);

/// Where the server is in its shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Ready and serving.
    Serving,
    /// SIGTERM came: not ready, still serving, connections not kept alive.
    Draining,
    /// No new connections; held requests answered; in-flight requests finishing.
    Closing,
}

/// The shutdown stage, shared by the listeners, `/readyz` and the signal handler.
#[derive(Clone, Debug)]
pub struct Drain {
    stage: Arc<watch::Sender<Stage>>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A server that is serving.
    pub fn new() -> Self {
        Self {
            stage: Arc::new(watch::channel(Stage::Serving).0),
        }
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    /// Whether shutdown has begun (`/readyz` fails, connections are not kept alive).
    pub fn is_draining(&self) -> bool {
        self.stage() >= Stage::Draining
    }

    /// Moves forward to `stage` (never back).
    pub fn advance(&self, stage: Stage) {
        self.stage.send_if_modified(|current| {
            let later = stage > *current;
            if later {
                *current = stage;
            }
            later
        });
    }

    /// Resolves once the stage is `stage` or later.
    pub async fn reached(&self, stage: Stage) {
        let mut receiver = self.stage.subscribe();
        // The sender lives as long as `self`: it cannot close while this waits.
        let _ = receiver.wait_for(|current| *current >= stage).await;
    }

    /// Runs the shutdown once `signal` resolves: [`Stage::Draining`] at once,
    /// [`Stage::Closing`] and the hub's flush after `period`.
    pub async fn run(
        self,
        signal: impl std::future::Future<Output = ()>,
        period: Duration,
        hub: Arc<SessionHub>,
    ) {
        signal.await;
        tracing::info!(
            drain_period_ms = period.as_millis() as u64,
            "shutdown requested: not ready, still serving for the drain period"
        );
        self.advance(Stage::Draining);
        tokio::time::sleep(period).await;
        tracing::info!(
            waiting = hub.followed(),
            "drain period over: answering held requests and closing"
        );
        self.advance(Stage::Closing);
        hub.flush();
    }
}

/// The smallest `terminationGracePeriodSeconds` that lets a drain of `period` finish:
/// the period, [`FINISH_BUDGET`], and a few seconds for the answers to be written.
pub fn grace_needed(period: Duration) -> Duration {
    period + FINISH_BUDGET + Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_only_move_forward() {
        let drain = Drain::new();
        assert_eq!(drain.stage(), Stage::Serving);
        assert!(!drain.is_draining());
        drain.advance(Stage::Draining);
        assert!(drain.is_draining());
        drain.advance(Stage::Closing);
        drain.advance(Stage::Draining);
        assert_eq!(drain.stage(), Stage::Closing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_drains_at_once_and_closes_after_the_period() {
        let drain = Drain::new();
        let hub = SessionHub::new();
        let held = hub.subscribe("team", "s");
        let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
        let started = tokio::time::Instant::now();
        tokio::spawn(drain.clone().run(
            async move {
                let _ = signalled.await;
            },
            Duration::from_secs(15),
            hub.clone(),
        ));
        tokio::task::yield_now().await;
        assert_eq!(drain.stage(), Stage::Serving);
        let _ = signal.send(());
        drain.reached(Stage::Draining).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        drain.reached(Stage::Closing).await;
        assert_eq!(started.elapsed(), Duration::from_secs(15));
        // Held requests are told at the same moment.
        held.flushed().await;
        assert_eq!(started.elapsed(), Duration::from_secs(15));
    }

    #[test]
    fn the_grace_period_covers_the_drain_and_the_finish() {
        assert_eq!(
            grace_needed(Duration::from_secs(15)),
            Duration::from_secs(30)
        );
        assert!(grace_needed(Duration::ZERO) > FINISH_BUDGET);
    }
}
