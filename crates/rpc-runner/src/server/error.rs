//! Errors of the device server itself (not of its sessions).

use std::path::PathBuf;

/// Why a device server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The work dir (where session dirs are made) is missing or unwritable.
    #[error("work dir {} cannot hold session directories", path.display())]
    WorkDir {
        /// The work dir.
        path: PathBuf,
        /// Why a probe dir could not be made there.
        #[source]
        source: std::io::Error,
    },
    /// The program session workers run does not exist or is not a file.
    #[error("worker program {} is not usable", path.display())]
    WorkerProgram {
        /// The program's path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Accepting connections failed persistently.
    #[error("accepting connections failed")]
    Accept(#[source] std::io::Error),
}
