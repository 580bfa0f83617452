//! A wait-mode request whose Session is stored: held until the Session finishes (or, for
//! an Agent whose Sessions take input, until the reply of the caller's own turn), the
//! wait runs out or the Session is gone, then answered (see [`crate::wait`]).

use crate::index::AgentKey;
use crate::wait;

use super::AppState;
use super::intake::decorate;
use super::routes::Answered;

/// A wait-mode request whose Session is stored (or replayed).
pub(super) struct Hold {
    pub(super) name: String,
    pub(super) replayed: bool,
    pub(super) rate: Option<(u32, u32)>,
    /// What to wait with, or the answer already known (finished, or gone).
    pub(super) waiting: Result<wait::Waiting, wait::Held>,
    /// `delivered` or `buffered` when the request was an input into a live Session.
    pub(super) delivery: Option<&'static str>,
}

/// Begins holding a request for the Session it started: until the reply of its first
/// turn (`agent.turn_complete`, which the harness posts whenever more turns follow), or
/// else until the Session finishes.
pub(super) fn begin(request: wait::HeldRequest) -> Result<wait::Waiting, wait::Held> {
    wait::begin_turn(request, Some(0))
}

impl Hold {
    pub(super) async fn answer(self, state: &AppState, key: &AgentKey) -> Answered {
        let Hold {
            name,
            replayed,
            rate,
            waiting,
            delivery,
        } = self;
        let held = match waiting {
            Ok(waiting) => wait::wait_for_end(waiting, &state.metrics).await,
            Err(held) => held,
        };
        let waited = wait::Waited {
            namespace: &key.namespace,
            session: &name,
            agent: &key.name,
            delivery,
        };
        let (response, outcome) = wait::answer(waited, held);
        decorate(response, outcome, replayed, rate)
    }
}
