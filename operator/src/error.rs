//! The operator's one error type.

use hookrun_crds::token::RandomnessError;

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),

    #[error("the operating system could not supply randomness for a token: {0}")]
    Randomness(#[source] RandomnessError),

    #[error("the object has no {0}")]
    MissingObjectKey(&'static str),

    #[error("could not serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("Secret {0:?} exists and is controlled by another object; waiting for it to go")]
    SecretOwnedElsewhere(String),

    #[error("cannot build the session pod: {0}")]
    PodBuild(#[source] crate::session_controller::pod::PodBuildError),

    #[error("leader election: {0}")]
    LeaderElection(String),

    #[error("admin server: {0}")]
    Admin(#[source] std::io::Error),

    #[error("watching the cluster failed: {0}")]
    Watch(String),

    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// A short, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(status)) if status.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "kube_client",
            Error::Randomness(_) => "randomness",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::Serialize { .. } => "serialize",
            Error::SecretOwnedElsewhere(_) => "secret_owned_elsewhere",
            Error::PodBuild(_) => "pod_build",
            Error::LeaderElection(_) => "leader_election",
            Error::Admin(_) => "admin",
            Error::Watch(_) => "watch",
            Error::Config(_) => "config",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Error::Kube(error)
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
