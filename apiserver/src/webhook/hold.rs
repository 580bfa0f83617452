//! A wait-mode request whose Session is stored: held until the Session finishes, the
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
}

impl Hold {
    pub(super) async fn answer(self, state: &AppState, key: &AgentKey) -> Answered {
        let Hold {
            name,
            replayed,
            rate,
            waiting,
        } = self;
        let held = match waiting {
            Ok(waiting) => wait::wait_for_end(waiting, &state.metrics).await,
            Err(held) => held,
        };
        let waited = wait::Waited {
            namespace: &key.namespace,
            session: &name,
            agent: &key.name,
        };
        let (response, outcome) = wait::answer(waited, held);
        decorate(response, outcome, replayed, rate)
    }
}
