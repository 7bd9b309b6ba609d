//! The transfer (and storage) form of a manifest: the SQLite file as one zstd frame
//! ([`podfs_protocol::frame`]), whose decompressed hash and length the gateway states. A reader
//! checks both before SQLite ever opens the file.

use std::path::Path;

use podfs_protocol::frame::{self, FrameError};
pub use podfs_protocol::frame::{Compressed, LEVEL, decompress_verified};

use crate::{Error, Result};

/// Compresses the SQLite file at `src` into `dst` as one frame, hashing both sides.
pub fn compress(src: &Path, dst: impl std::io::Write) -> Result<Compressed> {
    let file = std::fs::File::open(src)?;
    let size = file.metadata()?.len();
    frame::compress(std::io::BufReader::with_capacity(1 << 20, file), size, dst).map_err(Error::from)
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => Error::Io(e),
            FrameError::SizeMismatch { expected, actual } => Error::SizeMismatch { expected, actual },
            FrameError::HashMismatch { expected, actual } => Error::FileMismatch { expected, actual },
            other => Error::Frame(other),
        }
    }
}
