//! Checks a manifest before anything is written from it. Pure.
//!
//! Paths are already valid `WsPath`s (relative, no `..`, no NUL) once deserialized; this module
//! checks what holds between entries: sorted with no duplicates, and a closed tree in which
//! every entry's parent is a directory entry (so a symlink can never be used as a parent, and
//! `a -> /tmp/x` followed by `a/f` is refused).

use std::collections::{HashMap, HashSet};

use podfs_protocol::api::Manifest;
use podfs_protocol::tree::EntryError;
use podfs_protocol::{ContentHash, Entry, EntryKind};

/// Longest symlink text that can be created (Linux `PATH_MAX` - 1).
pub const MAX_LINK_TEXT: u64 = 4095;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest entry {0}")]
    Entry(#[from] EntryError),
    #[error("manifest lists {0:?} twice")]
    Duplicate(String),
    #[error("manifest is not sorted by path: {after:?} comes after {before:?}")]
    Unsorted { before: String, after: String },
    #[error("manifest entry {path:?} has no directory entry for its parent {parent:?}")]
    MissingParent { path: String, parent: String },
    #[error("manifest entry {path:?} lies below {parent:?}, which is a {kind}, not a directory")]
    ParentNotDir { path: String, parent: String, kind: &'static str },
    #[error("manifest symlink {path:?} has {size} bytes of link text; at most {MAX_LINK_TEXT} are possible")]
    LinkTooLong { path: String, size: u64 },
    #[error("manifest gives content {hash} two sizes ({first} and {second})")]
    TwoSizes { hash: ContentHash, first: u64, second: u64 },
    #[error("manifest is for {got}, asked for {want}")]
    WrongVersion { want: String, got: String },
}

/// Checks `manifest`'s entries and returns them with normalized modes.
pub fn validate(manifest: &Manifest) -> Result<Vec<Entry>, ManifestError> {
    validate_entries(manifest.entries.iter().cloned())
}

/// Checks a sorted entry list: valid fields, strictly ascending paths, closed tree, one size
/// per content.
pub fn validate_entries(entries: impl IntoIterator<Item = Entry>) -> Result<Vec<Entry>, ManifestError> {
    let mut out: Vec<Entry> = Vec::new();
    let mut dirs: HashSet<String> = HashSet::new();
    let mut sizes: HashMap<ContentHash, u64> = HashMap::new();
    for e in entries {
        let e = e.validated()?;
        if let Some(hash) = e.hash {
            let first = *sizes.entry(hash).or_insert(e.size);
            if first != e.size {
                return Err(ManifestError::TwoSizes { hash, first, second: e.size });
            }
        }
        if let Some(prev) = out.last() {
            match prev.path.as_str().cmp(e.path.as_str()) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => {
                    return Err(ManifestError::Duplicate(e.path.to_string()));
                }
                std::cmp::Ordering::Greater => {
                    return Err(ManifestError::Unsorted { before: prev.path.to_string(), after: e.path.to_string() });
                }
            }
        }
        let parent = e.path.parent_str();
        if !parent.is_empty() && !dirs.contains(parent) {
            let path = e.path.to_string();
            let parent = parent.to_string();
            // the parent sorts before its children, so it has been seen if it exists
            let kind = out.iter().rev().find(|p| p.path.as_str() == parent).map(|p| p.kind.as_str());
            return Err(match kind {
                Some(kind) => ManifestError::ParentNotDir { path, parent, kind },
                None => ManifestError::MissingParent { path, parent },
            });
        }
        if e.kind == EntryKind::Symlink && e.size > MAX_LINK_TEXT {
            return Err(ManifestError::LinkTooLong { path: e.path.to_string(), size: e.size });
        }
        if e.kind == EntryKind::Dir {
            dirs.insert(e.path.to_string());
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use podfs_protocol::WsPath;
    use proptest::prelude::*;

    use super::*;

    fn e(p: &str, kind: EntryKind) -> Entry {
        let (hash, size) = match kind {
            EntryKind::Dir => (None, 0),
            _ => (Some(ContentHash::of(p.as_bytes())), p.len() as u64),
        };
        Entry { path: WsPath::new(p).unwrap(), kind, hash, size, mode: 0o755 }
    }
    use EntryKind::{Dir, File, Symlink};

    #[test]
    fn accepts_a_closed_sorted_tree() {
        let v = vec![e("a", Dir), e("a.txt", File), e("a/b", Dir), e("a/b/c", File), e("a/l", Symlink), e("z", File)];
        assert_eq!(validate_entries(v.clone()).unwrap().len(), 6);
        assert!(validate_entries(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn refuses_duplicates() {
        let r = validate_entries(vec![e("a", File), e("a", File)]);
        assert_eq!(r, Err(ManifestError::Duplicate("a".into())));
        assert!(matches!(validate_entries(vec![e("a", Dir), e("a", File)]), Err(ManifestError::Duplicate(_))));
    }

    #[test]
    fn refuses_unsorted() {
        assert!(matches!(validate_entries(vec![e("b", File), e("a", File)]), Err(ManifestError::Unsorted { .. })));
        // byte order: "a.b" < "a/b"
        assert!(matches!(
            validate_entries(vec![e("a", Dir), e("a/b", File), e("a.b", File)]),
            Err(ManifestError::Unsorted { .. })
        ));
    }

    #[test]
    fn refuses_missing_parents() {
        assert!(matches!(validate_entries(vec![e("a/b", File)]), Err(ManifestError::MissingParent { .. })));
        assert!(matches!(
            validate_entries(vec![e("a", Dir), e("a/b/c", File)]),
            Err(ManifestError::MissingParent { .. })
        ));
    }

    #[test]
    fn refuses_a_symlink_or_file_as_parent() {
        // the classic escape: `a -> /tmp/x`, then `a/f`
        let mut link = e("a", Symlink);
        link.hash = Some(ContentHash::of(b"/tmp/x"));
        link.size = 6;
        let r = validate_entries(vec![link, e("a/f", File)]);
        assert!(matches!(r, Err(ManifestError::ParentNotDir { kind: "symlink", .. })), "{r:?}");
        let r = validate_entries(vec![e("a", File), e("a/f", File)]);
        assert!(matches!(r, Err(ManifestError::ParentNotDir { kind: "file", .. })), "{r:?}");
    }

    #[test]
    fn refuses_bad_entries() {
        let mut no_hash = e("a", File);
        no_hash.hash = None;
        assert!(matches!(validate_entries(vec![no_hash]), Err(ManifestError::Entry(_))));
        let mut dir_with_hash = e("a", Dir);
        dir_with_hash.hash = Some(ContentHash::of(b""));
        assert!(matches!(validate_entries(vec![dir_with_hash]), Err(ManifestError::Entry(_))));
        let mut long = e("a", Symlink);
        long.size = 10_000;
        assert!(matches!(validate_entries(vec![long]), Err(ManifestError::LinkTooLong { .. })));
    }

    #[test]
    fn modes_are_normalized() {
        let mut f = e("a", File);
        f.mode = 0o4755;
        let mut l = e("b", Symlink);
        l.mode = 0o644;
        let v = validate_entries(vec![f, l]).unwrap();
        assert_eq!(v[0].mode, 0o755);
        assert_eq!(v[1].mode, 0o777);
    }

    proptest! {
        #[test]
        fn shuffled_trees_are_refused(n in 2usize..8, seed in any::<u64>()) {
            let mut v: Vec<Entry> = (0..n).map(|i| e(&format!("f{i}"), File)).collect();
            let i = (seed as usize) % n;
            let j = (i + 1 + (seed as usize / 7) % (n - 1)) % n;
            v.swap(i, j);
            prop_assert!(validate_entries(v).is_err());
        }
    }

    #[test]
    fn one_content_with_two_sizes_is_refused() {
        let mut b = e("b", EntryKind::File);
        b.hash = Some(ContentHash::of(b"a"));
        b.size = 7;
        let err = validate_entries([e("a", EntryKind::File), b]).unwrap_err();
        assert!(matches!(err, ManifestError::TwoSizes { first: 1, second: 7, .. }), "{err}");
    }
}
