//! The cache's one error type. A miss is not an error: reads answer `None` (absent, vanished
//! or corrupt, the bad unit dropped); these are the failures a caller must see.

use std::io;
use std::path::PathBuf;

use podfs_protocol::ContentHash;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the caller handed in (a pack to add) does not exist.
    #[error("{} does not exist", path.display())]
    NotFound { path: PathBuf },
    /// Content that does not match its name was offered, or the index holds damaged rows.
    #[error("refusing to cache {hash} ({size} bytes): the content is {actual} ({actual_size} bytes)")]
    Corrupt { hash: ContentHash, size: u64, actual: ContentHash, actual_size: u64 },
    /// The index holds a value that cannot be what this podfs wrote.
    #[error("the cache index is damaged: {0}")]
    BadIndex(String),
    /// The index was written by a newer podfs.
    #[error("cache index {} has version {found}; this podfs knows {known}", path.display())]
    Version { path: PathBuf, found: i64, known: i64 },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{context}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
}

/// Adds what was being done to an I/O or SQLite error.
pub(crate) trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for Result<T, io::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io { context: what(), source })
    }
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sqlite { context: what(), source })
    }
}

impl From<rusqlite::Error> for Error {
    fn from(source: rusqlite::Error) -> Self {
        Error::Sqlite { context: "cache index".into(), source }
    }
}
