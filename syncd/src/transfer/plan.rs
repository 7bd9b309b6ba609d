//! The one planner: what writing a tree takes. Directories are created first (and get their
//! modes last); each file or symlink is written from the manifest (its BLOB), from the content
//! cache, or from the blob store, where every distinct content is fetched once however many
//! paths hold it. Pure: no I/O.

use std::collections::{HashMap, HashSet};

use podfs_protocol::{ContentHash, Entry, EntryKind};

/// Why a tree cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("entry {0} has no hash")]
    NoHash(String),
    #[error("the tree gives content {hash} two sizes ({first} and {second})")]
    TwoSizes { hash: ContentHash, first: u64, second: u64 },
}

/// One distinct content and every path that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub hash: ContentHash,
    pub size: u64,
    /// Never empty.
    pub targets: Vec<Entry>,
}

/// Entries grouped by content, in the order contents are first seen.
#[derive(Debug, Default)]
pub struct ByContent {
    blobs: Vec<Blob>,
    at: HashMap<ContentHash, usize>,
}

impl ByContent {
    /// Adds a file or symlink entry to the group of its content.
    pub fn add(&mut self, e: Entry) -> Result<(), PlanError> {
        let Some(hash) = e.hash else { return Err(PlanError::NoHash(e.path.to_string())) };
        match self.at.get(&hash) {
            Some(&i) if self.blobs[i].size != e.size => {
                Err(PlanError::TwoSizes { hash, first: self.blobs[i].size, second: e.size })
            }
            Some(&i) => {
                self.blobs[i].targets.push(e);
                Ok(())
            }
            None => {
                self.at.insert(hash, self.blobs.len());
                self.blobs.push(Blob { hash, size: e.size, targets: vec![e] });
                Ok(())
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    pub fn into_blobs(self) -> Vec<Blob> {
        self.blobs
    }
}

/// Where one path's bytes come from without the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalSource {
    /// This BLOB of the downloaded manifest.
    Manifest(i64),
    /// The content cache.
    Cache,
}

/// A path written without the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalWrite {
    pub entry: Entry,
    pub from: LocalSource,
}

/// Everything writing a tree takes.
#[derive(Debug, Default)]
pub struct Plan {
    /// In path order (parents first).
    pub dirs: Vec<Entry>,
    pub local: Vec<LocalWrite>,
    /// Contents to fetch from the blob store.
    pub remote: Vec<Blob>,
    pub files: u64,
    pub symlinks: u64,
    /// Content bytes of the files.
    pub bytes: u64,
}

impl Plan {
    /// Plans `rows` (each entry with its manifest BLOB id, if the manifest holds its bytes),
    /// taking from the cache the contents listed in `cached`.
    pub fn new(
        rows: impl IntoIterator<Item = (Entry, Option<i64>)>,
        cached: &HashSet<ContentHash>,
    ) -> Result<Self, PlanError> {
        let mut p = Plan::default();
        let mut remote = ByContent::default();
        for (entry, blob_id) in rows {
            match entry.kind {
                EntryKind::Dir => {
                    p.dirs.push(entry);
                    continue;
                }
                EntryKind::File => {
                    p.files += 1;
                    p.bytes += entry.size;
                }
                EntryKind::Symlink => p.symlinks += 1,
            }
            let Some(hash) = entry.hash else { return Err(PlanError::NoHash(entry.path.to_string())) };
            match blob_id {
                Some(id) => p.local.push(LocalWrite { entry, from: LocalSource::Manifest(id) }),
                None if cached.contains(&hash) => p.local.push(LocalWrite { entry, from: LocalSource::Cache }),
                None => remote.add(entry)?,
            }
        }
        p.remote = remote.into_blobs();
        Ok(p)
    }

    /// Every content the plan writes.
    pub fn hashes(&self) -> Vec<ContentHash> {
        self.local.iter().filter_map(|l| l.entry.hash).chain(self.remote.iter().map(|b| b.hash)).collect()
    }
}

#[cfg(test)]
mod tests {
    use podfs_protocol::WsPath;

    use super::*;

    fn e(p: &str, kind: EntryKind, content: &[u8]) -> Entry {
        let hash = (kind != EntryKind::Dir).then(|| ContentHash::of(content));
        let size = if kind == EntryKind::Dir { 0 } else { content.len() as u64 };
        Entry { path: WsPath::new(p).unwrap(), kind, hash, size, mode: 0o644 }
    }

    #[test]
    fn identical_content_is_fetched_once_and_sources_are_chosen() {
        let rows = vec![
            (e("a", EntryKind::File, b"same"), None),
            (e("b", EntryKind::Symlink, b"same"), None),
            (e("c", EntryKind::File, b"other"), None),
            (e("d", EntryKind::Dir, b""), None),
            (e("d/e", EntryKind::File, b"same"), None),
            (e("m", EntryKind::File, b"in the manifest"), Some(7)),
            (e("k", EntryKind::File, b"cached"), None),
        ];
        let cached = HashSet::from([ContentHash::of(b"cached")]);
        let p = Plan::new(rows, &cached).unwrap();
        assert_eq!((p.files, p.symlinks, p.dirs.len(), p.bytes), (5, 1, 1, 13 + 15 + 6));
        assert_eq!(p.remote.len(), 2);
        let paths: Vec<_> = p.remote[0].targets.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, ["a", "b", "d/e"]);
        let froms: Vec<_> = p.local.iter().map(|l| (l.entry.path.as_str(), l.from)).collect();
        assert_eq!(froms, [("m", LocalSource::Manifest(7)), ("k", LocalSource::Cache)]);
        assert_eq!(p.hashes().len(), 4);
    }

    #[test]
    fn one_hash_with_two_sizes_or_no_hash_is_refused() {
        let mut lying = e("b", EntryKind::File, b"same");
        lying.size = 99;
        let err = Plan::new(vec![(e("a", EntryKind::File, b"same"), None), (lying, None)], &HashSet::new());
        assert!(matches!(err, Err(PlanError::TwoSizes { first: 4, second: 99, .. })), "{err:?}");
        let mut bare = e("c", EntryKind::File, b"x");
        bare.hash = None;
        assert!(matches!(Plan::new(vec![(bare, Some(1))], &HashSet::new()), Err(PlanError::NoHash(_))));
    }
}
