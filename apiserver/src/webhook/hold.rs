//! A wait-mode request whose Session is stored: held until the Session finishes (or, for
//! an Agent whose Sessions take input, until the reply of the caller's own turn), the
//! wait runs out or the Session is gone, then answered (see [`crate::wait`]).

use crate::index::{AgentKey, WebhookTarget};
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

/// Begins holding a request for the Session it started: until the Session finishes, or,
/// when the Agent's Sessions take input (`idleTimeoutSeconds` above 0), until the reply
/// of its first turn.
pub(super) fn begin(
    target: &WebhookTarget,
    request: wait::HeldRequest,
) -> Result<wait::Waiting, wait::Held> {
    let turn = (target.agent.idle_timeout_seconds > 0).then_some(0);
    wait::begin_turn(request, turn)
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
