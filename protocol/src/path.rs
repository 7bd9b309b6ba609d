//! Workspace paths: UTF-8, relative, `/`-separated and normalized.
//!
//! A [`WsPath`] can only be built by validation, so code that holds one never needs to check for
//! `..`, absolute paths, empty components or NUL again. Validation rejects; it never rewrites a
//! path into a different one.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest accepted path, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest accepted path component, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is absolute; workspace paths are relative")]
    Absolute(String),
    #[error("path {0:?} has an empty component, a trailing slash or a double slash")]
    EmptyComponent(String),
    #[error("path {0:?} has a `.` or `..` component")]
    DotComponent(String),
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is {0} bytes long; the limit is {MAX_PATH_LEN}")]
    TooLong(usize),
    #[error("path component {0:?} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong(String),
    #[error("path is not valid UTF-8: {0}")]
    NotUtf8(String),
}

/// A validated workspace path such as `src/main.rs`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WsPath(String);

impl WsPath {
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        validate(&s)?;
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// The directory holding this path, `None` at the top level.
    pub fn parent(&self) -> Option<WsPath> {
        self.0.rfind('/').map(|i| WsPath(self.0[..i].to_string()))
    }

    /// The parent as a string, `""` at the top level (the form stored in the database).
    pub fn parent_str(&self) -> &str {
        self.0.rfind('/').map_or("", |i| &self.0[..i])
    }

    pub fn file_name(&self) -> &str {
        self.0.rfind('/').map_or(&self.0, |i| &self.0[i + 1..])
    }

    /// Every proper ancestor, nearest last: `a/b/c` gives `a`, `a/b`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(i, _)| &self.0[..i])
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Joins a validated name below this path.
    pub fn join(&self, name: &str) -> Result<WsPath, PathError> {
        WsPath::new(format!("{}/{}", self.0, name))
    }
}

fn validate(s: &str) -> Result<(), PathError> {
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(s.len()));
    }
    if s.contains('\0') {
        return Err(PathError::Nul);
    }
    if s.starts_with('/') {
        return Err(PathError::Absolute(s.to_string()));
    }
    for c in s.split('/') {
        match c {
            "" => return Err(PathError::EmptyComponent(s.to_string())),
            "." | ".." => return Err(PathError::DotComponent(s.to_string())),
            c if c.len() > MAX_NAME_LEN => return Err(PathError::NameTooLong(c.to_string())),
            _ => {}
        }
    }
    Ok(())
}

impl fmt::Display for WsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl AsRef<str> for WsPath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WsPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        WsPath::new(s)
    }
}

impl Serialize for WsPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for WsPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WsPath::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for WsPath {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "Workspace path: UTF-8, relative, `/`-separated, no empty, `.` or `..` components, no NUL, \
                 at most 4096 bytes with components of at most 255 bytes",
            ))
            .examples(["src/main.rs"])
            .into()
    }
}

impl utoipa::ToSchema for WsPath {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_paths() {
        for p in ["a", "a/b/c.txt", "ünïcødé/fïlé with spaces.txt", ".hidden", "a/..b", "a/b.."] {
            assert!(WsPath::new(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn rejects_escapes_and_junk() {
        for p in ["", "/etc/passwd", "../x", "a/../b", "a/./b", ".", "a//b", "a/", "a\0b"] {
            assert!(WsPath::new(p).is_err(), "{p:?}");
        }
        assert!(matches!(WsPath::new("x".repeat(256)), Err(PathError::NameTooLong(_))));
        assert!(matches!(WsPath::new("a/".repeat(2100) + "b"), Err(PathError::TooLong(_))));
    }

    #[test]
    fn parents_and_ancestors() {
        let p = WsPath::new("a/b/c").unwrap();
        assert_eq!(p.parent_str(), "a/b");
        assert_eq!(p.file_name(), "c");
        assert_eq!(p.ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(WsPath::new("top").unwrap().parent(), None);
        assert!(serde_json::from_str::<WsPath>("\"../x\"").is_err());
    }
}
