//! The driver's one error type and its one mapping to gRPC status codes.
//!
//! Variants name a *condition* (what went wrong from the caller's point of view), not the
//! place it came from, because the CSI spec assigns codes per condition: the same "volume
//! does not exist" is NOT_FOUND in every RPC, while "capability not supported by the volume"
//! is INVALID_ARGUMENT in ControllerExpandVolume but FAILED_PRECONDITION in NodeStageVolume,
//! so those are two variants. The `From<Error> for Status` match has no catch-all arm: a new
//! variant must decide its code.

use std::{io, path::PathBuf, time::Duration};

use tonic::{Code, Status};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required request field is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A request field has a value the driver cannot accept.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(String),
    #[error("volume group snapshot {0} does not exist")]
    GroupSnapshotNotFound(String),
    #[error("node {0} is not a node of this driver")]
    NodeNotFound(String),
    /// Same name (or same target path), different parameters.
    #[error("{kind} {name} already exists and is incompatible: {detail}")]
    AlreadyExists {
        kind: &'static str,
        name: String,
        detail: String,
    },
    /// Another operation on the same volume/snapshot is in flight.
    #[error("an operation on {0} is already in progress")]
    Aborted(String),
    /// A conditional write lost: what it was conditioned on changed meanwhile (another
    /// controller wrote the record). Read again and decide again.
    #[error("{what} changed concurrently: {reason}")]
    Conflict { what: String, reason: String },
    #[error("starting_token {0:?} is not a token this driver issued")]
    BadToken(String),
    #[error("not enough space in the pool: {requested} bytes requested, {available} available")]
    NoSpace { requested: u64, available: u64 },
    /// CreateVolume's requisite topology names no node this driver serves.
    #[error("accessibility_requirements exclude node {0}, the only node this driver provisions on")]
    TopologyUnsatisfiable(String),
    #[error("node already has the maximum of {0} volumes published")]
    MaxVolumes(u32),
    #[error("capacity range not satisfiable: {0}")]
    OutOfRange(String),
    /// The request is valid but the volume's state forbids it right now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Node-side: the capability asked for is not one this volume can serve.
    #[error("volume {volume} cannot be used with this capability: {reason}")]
    CapabilityMismatch { volume: String, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("metadata file {path} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A peer node answered with an error: its code is passed on unchanged, so the CSI
    /// semantics decided on the node holding the data reach the CO.
    #[error("node {node}: {}", status.message())]
    Peer { node: String, status: Status },
    /// An error of an operation another task ran (a move joined by a CO's retry), passed
    /// on with its code and its whole message, which already names the node it concerns.
    #[error("{message}")]
    Relayed { code: Code, message: String },
    /// A peer node could not be reached (down, or refused our certificate).
    #[error("node {node} is unreachable: {reason}")]
    Unreachable { node: String, reason: String },
    /// A step of moving a volume failed on a node; the next attempt resumes the move.
    #[error("moving volume {volume} stopped at node {node}: {reason}; the next publish resumes it")]
    MoveInterrupted {
        volume: String,
        node: String,
        reason: String,
    },
    /// Received data did not verify; nothing of it was kept as a snapshot.
    #[error("transfer of {snapshot} failed verification: {reason}")]
    Verification { snapshot: String, reason: String },
    /// A copy this node fenced when its lease lapsed: the volume may have failed over
    /// meanwhile, so only the controller, from the placement record, may give it back.
    /// Retryable: the controller resumes it within a lease period if it is still ours.
    #[error(
        "volume {0} was fenced on this node when its lease lapsed; the cluster controller resumes it once the placement record shows this node is still its primary"
    )]
    Suspended(String),
    /// The pool is not mounted/writable; the driver cannot serve until it is.
    #[error("storage pool unavailable: {0}")]
    PoolUnavailable(String),
    /// An agent caller whose certificate does not allow the call (crate::agent::auth).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl Error {
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::Missing(_) | Error::Invalid { .. } => Code::InvalidArgument,
            Error::VolumeNotFound(_)
            | Error::SnapshotNotFound(_)
            | Error::GroupSnapshotNotFound(_)
            | Error::NodeNotFound(_) => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::Aborted(_) | Error::BadToken(_) | Error::Conflict { .. } => Code::Aborted,
            Error::NoSpace { .. } | Error::MaxVolumes(_) | Error::TopologyUnsatisfiable(_) => {
                Code::ResourceExhausted
            }
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::FailedPrecondition(_) | Error::CapabilityMismatch { .. } => {
                Code::FailedPrecondition
            }
            Error::Io { .. }
            | Error::Command { .. }
            | Error::Timeout { .. }
            | Error::Corrupt { .. } => Code::Internal,
            Error::Peer { status, .. } => status.code(),
            Error::Relayed { code, .. } => *code,
            Error::Unreachable { .. } | Error::MoveInterrupted { .. } | Error::Suspended(_) => {
                Code::Unavailable
            }
            Error::Verification { .. } => Code::DataLoss,
            // Probe's table: "Plugin not healthy" is FAILED_PRECONDITION.
            Error::PoolUnavailable(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        // The message carries the whole source chain so an operator reading the CO's event
        // sees the root cause (e.g. the mkfs stderr), not just the outermost context.
        let mut msg = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            let s_msg = s.to_string();
            if !msg.contains(&s_msg) {
                msg.push_str(": ");
                msg.push_str(&s_msg);
            }
            source = s.source();
        }
        Status::new(err.code(), msg)
    }
}
