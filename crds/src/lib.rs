//! hookrun's custom resources and the small formats that the operator and the apiserver
//! share: resource names, label keys, the webhook URL and the token format.
//!
//! Nothing here talks to a cluster; everything is plain data and pure functions.

// kube's `printcolumn(...)` attributes repeat `type_ = "string"`, which this lint
// mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod agent;
pub mod budget;
pub mod callback;
pub mod crd;
pub mod duration;
pub mod expression;
pub mod grant;
pub mod names;
pub mod retry;
pub mod session;
pub mod token;
pub mod validation;

pub use agent::{Agent, AgentSpec, AgentStatus};
pub use grant::{Grant, GrantSpec, GrantStatus};
pub use session::{Session, SessionPhase, SessionSpec, SessionStatus};

/// The API group of every hookrun resource.
pub const GROUP: &str = "hookrun.dev";
/// The version of the resources this build serves and reads.
pub const VERSION: &str = "v1alpha1";
