//! The tree model: regular files (with their permission bits), symlinks and directories.
//!
//! A symlink's content is its link text, stored as a blob like a file's bytes; it is never
//! followed. Every directory is an entry of its own, so empty directories survive and every
//! entry's parent is a directory entry of the same tree (the "closed tree" rule the gateway
//! enforces on commit).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ContentHash, WsPath};

/// Permission bits kept for files and directories.
pub const MODE_MASK: u32 = 0o777;
/// Mode recorded for every symlink.
pub const SYMLINK_MODE: u32 = 0o777;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Symlink,
    Dir,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Symlink => "symlink",
            EntryKind::Dir => "dir",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "file" => Some(EntryKind::File),
            "symlink" => Some(EntryKind::Symlink),
            "dir" => Some(EntryKind::Dir),
            _ => None,
        }
    }
}

/// One path of a version's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Entry {
    pub path: WsPath,
    pub kind: EntryKind,
    /// Content hash; absent for directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<ContentHash>,
    /// Content length in bytes (link text length for symlinks, 0 for directories).
    pub size: u64,
    /// Permission bits (`mode & 0o777`); 0o777 for symlinks.
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("{path}: a {kind} needs a content hash")]
    MissingHash { path: String, kind: &'static str },
    #[error("{path}: a directory has no content hash and size 0")]
    DirWithContent { path: String },
    #[error("{path}: mode {mode:o} is not a permission mode (at most 0o7777)")]
    BadMode { path: String, mode: u32 },
    #[error("{path}: a {kind} change needs `{field}`")]
    MissingField { path: String, kind: &'static str, field: &'static str },
}

impl Entry {
    /// Checks the fields that belong together and normalizes the mode.
    pub fn validated(mut self) -> Result<Self, EntryError> {
        let path = || self.path.to_string();
        if self.mode > 0o7777 {
            return Err(EntryError::BadMode { path: path(), mode: self.mode });
        }
        match self.kind {
            EntryKind::File | EntryKind::Symlink if self.hash.is_none() => {
                return Err(EntryError::MissingHash { path: path(), kind: self.kind.as_str() });
            }
            EntryKind::Dir if self.hash.is_some() || self.size != 0 => {
                return Err(EntryError::DirWithContent { path: path() });
            }
            _ => {}
        }
        self.mode = match self.kind {
            EntryKind::Symlink => SYMLINK_MODE,
            _ => self.mode & MODE_MASK,
        };
        Ok(self)
    }

    /// Same kind, content and mode (the path is not compared).
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind && self.hash == other.hash && self.size == other.size && self.mode == other.mode
    }
}

/// One change of a commit: put an entry (add or replace) or delete a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ChangeWire", into = "ChangeWire")]
pub enum Change {
    Put(Entry),
    Delete(WsPath),
}

impl Change {
    pub fn path(&self) -> &WsPath {
        match self {
            Change::Put(e) => &e.path,
            Change::Delete(p) => p,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    File,
    Symlink,
    Dir,
    Delete,
}

/// The JSON form of a [`Change`]: `{"path","kind":"file|symlink|dir","hash","size","mode"}` or
/// `{"path","kind":"delete"}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = Change)]
pub struct ChangeWire {
    pub path: WsPath,
    pub kind: ChangeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<ContentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl TryFrom<ChangeWire> for Change {
    type Error = EntryError;
    fn try_from(w: ChangeWire) -> Result<Self, Self::Error> {
        let kind = match w.kind {
            ChangeKind::Delete => return Ok(Change::Delete(w.path)),
            ChangeKind::File => EntryKind::File,
            ChangeKind::Symlink => EntryKind::Symlink,
            ChangeKind::Dir => EntryKind::Dir,
        };
        let missing = |field| EntryError::MissingField { path: w.path.to_string(), kind: kind.as_str(), field };
        let (size, mode) = match kind {
            EntryKind::Dir => (w.size.unwrap_or(0), w.mode.unwrap_or(0o755)),
            EntryKind::Symlink => (w.size.ok_or_else(|| missing("size"))?, SYMLINK_MODE),
            EntryKind::File => (w.size.ok_or_else(|| missing("size"))?, w.mode.ok_or_else(|| missing("mode"))?),
        };
        Entry { path: w.path, kind, hash: w.hash, size, mode }.validated().map(Change::Put)
    }
}

impl From<Change> for ChangeWire {
    fn from(c: Change) -> Self {
        match c {
            Change::Delete(path) => ChangeWire { path, kind: ChangeKind::Delete, hash: None, size: None, mode: None },
            Change::Put(e) => ChangeWire {
                path: e.path,
                kind: match e.kind {
                    EntryKind::File => ChangeKind::File,
                    EntryKind::Symlink => ChangeKind::Symlink,
                    EntryKind::Dir => ChangeKind::Dir,
                },
                hash: e.hash,
                size: Some(e.size),
                mode: Some(e.mode),
            },
        }
    }
}

/// A version selector: a number or `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VersionRef {
    #[default]
    Head,
    Number(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version {0:?}: expected a version number or `head`")]
pub struct VersionRefError(pub String);

impl FromStr for VersionRef {
    type Err = VersionRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "head" {
            return Ok(VersionRef::Head);
        }
        match s.parse::<u64>() {
            Ok(n) if n <= i64::MAX as u64 && (s.len() == 1 || !s.starts_with('0')) => Ok(VersionRef::Number(n)),
            _ => Err(VersionRefError(s.to_string())),
        }
    }
}

impl fmt::Display for VersionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionRef::Head => f.write_str("head"),
            VersionRef::Number(n) => write!(f, "{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_json_forms() {
        let h = ContentHash::of(b"x");
        let c: Change =
            serde_json::from_str(&format!(r#"{{"path":"a/b","hash":"{h}","size":1,"mode":493,"kind":"file"}}"#))
                .unwrap();
        assert_eq!(
            c,
            Change::Put(Entry {
                path: WsPath::new("a/b").unwrap(),
                kind: EntryKind::File,
                hash: Some(h),
                size: 1,
                mode: 0o755
            })
        );
        let d: Change = serde_json::from_str(r#"{"path":"a","kind":"delete"}"#).unwrap();
        assert_eq!(d, Change::Delete(WsPath::new("a").unwrap()));
        let back: Change = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_changes_are_refused() {
        let h = ContentHash::of(b"x");
        for bad in [
            format!(r#"{{"path":"../escape","hash":"{h}","size":0,"mode":420,"kind":"file"}}"#),
            format!(r#"{{"path":"/abs","hash":"{h}","size":0,"mode":420,"kind":"file"}}"#),
            r#"{"path":"a","size":0,"mode":420,"kind":"file"}"#.to_string(),
            format!(r#"{{"path":"a","hash":"{h}","kind":"dir"}}"#),
            format!(r#"{{"path":"a","hash":"{h}","size":1,"mode":99999,"kind":"file"}}"#),
        ] {
            assert!(serde_json::from_str::<Change>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn version_refs() {
        assert_eq!("head".parse::<VersionRef>().unwrap(), VersionRef::Head);
        assert_eq!("12".parse::<VersionRef>().unwrap(), VersionRef::Number(12));
        for bad in ["", "-1", "01", "HEAD", "1.5", "99999999999999999999"] {
            assert!(bad.parse::<VersionRef>().is_err(), "{bad}");
        }
    }
}
