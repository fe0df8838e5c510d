//! The hub's one error type for what a caller asked of it. It says what
//! went wrong in the hub's terms; `api.rs` alone turns it into HTTP.

use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The object named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// What was asked is not valid; `details` names each problem with its field.
    #[error("{message}")]
    Invalid { message: String, details: Vec<String> },
    /// It cannot be done with things as they are; `code` says why in one word
    /// (`Conflict`, `TooMany`, `NotScheduled`).
    #[error("{message}")]
    Conflict { code: &'static str, message: String, details: Vec<String> },
    /// Refused by policy (an enrolment the hub will not accept).
    #[error("{0}")]
    Refused(String),
    /// The node that would have to answer is not connected.
    #[error("{0}")]
    NodeOffline(String),
    /// The hub's store failed; nothing was changed.
    #[error("{0}")]
    StoreUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl HubError {
    pub fn not_found(what: &str, name: &str) -> Self {
        HubError::NotFound(format!("{what} {name:?} not found"))
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        HubError::Invalid { message: message.into(), details: Vec::new() }
    }
    pub fn invalid_with(message: impl Into<String>, details: Vec<String>) -> Self {
        HubError::Invalid { message: message.into(), details }
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        HubError::Conflict { code, message: message.into(), details: Vec::new() }
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        HubError::Internal(e.to_string())
    }
    /// One line per problem, where the error has them.
    pub fn details(&self) -> &[String] {
        match self {
            HubError::Invalid { details, .. } | HubError::Conflict { details, .. } => details,
            _ => &[],
        }
    }
}

impl From<StoreError> for HubError {
    fn from(e: StoreError) -> Self {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        HubError::StoreUnavailable(msg)
    }
}
