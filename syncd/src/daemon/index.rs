//! syncd's memory of the tree, kept in the state directory ([`crate::local::state`]):
//!
//! - the **base**: the committed tree of `base_version`, exactly what the gateway holds for that
//!   version (every commit's change list is computed against it);
//! - the **local** index: for each path on disk, its entry and the `lstat` figures it had when
//!   it was hashed (like git's index), so unchanged files are never read twice;
//! - `pending`: the paths whose local entry differs from the base (what the next commit sends).
//!
//! Pending changes need no journal of their own: they are the difference between the disk and
//! the base, which survives any crash (the base and its version are written in one transaction,
//! after the gateway acknowledged the commit). A crash between the gateway's commit and that
//! transaction leaves a base one version behind; the next commit's rebase finds its own changes
//! already at head (see `commit.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context;
use podfs_protocol::{Change, ContentHash, Entry, EntryKind, WsPath};
use rusqlite::{Connection, OptionalExtension, params};

use crate::local::scan::Stat;

/// A path on disk as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub entry: Entry,
    pub stat: Stat,
    /// Wall-clock nanoseconds when the content was read: a file modified within
    /// [`RACY_NS`] before that is hashed again even when its `lstat` figures match (its
    /// timestamps may not have moved with a write that came just after the read).
    pub read_at_ns: i64,
}

/// See [`Rec::read_at_ns`].
pub const RACY_NS: i64 = 2_000_000_000;

impl Rec {
    /// Whether `stat` proves the recorded entry still describes the path.
    pub fn still_valid(&self, stat: &Stat) -> bool {
        self.stat == *stat && (self.entry.kind == EntryKind::Dir || stat.mtime_ns + RACY_NS < self.read_at_ns)
    }
}

/// The in-memory tree state, persisted on [`Index::save`].
pub struct Index {
    db: Connection,
    pub workspace: String,
    pub base_version: u64,
    pub base: BTreeMap<String, Entry>,
    pub local: BTreeMap<String, Rec>,
    pub pending: BTreeSet<String>,
    /// Local paths changed since the last save (removed ones included).
    dirty: BTreeSet<String>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS base (
    path TEXT PRIMARY KEY, kind TEXT NOT NULL, mode INTEGER NOT NULL, size INTEGER NOT NULL, hash BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS local (
    path TEXT PRIMARY KEY, kind TEXT NOT NULL, mode INTEGER NOT NULL, size INTEGER NOT NULL, hash BLOB,
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, st_size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, st_mode INTEGER NOT NULL, read_at_ns INTEGER NOT NULL
) WITHOUT ROWID;
";

impl Index {
    /// Opens (creating) the index at `path`. `None` when it holds no workspace yet (fresh).
    pub fn open(path: &Path) -> anyhow::Result<(Self, bool)> {
        let db = Connection::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(SCHEMA).context("cannot create the index tables")?;
        let get = |k: &str| -> anyhow::Result<Option<String>> {
            Ok(db.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0)).optional()?)
        };
        let workspace = get("workspace")?;
        let base_version = get("base_version")?.map(|v| v.parse()).transpose().context("bad base_version")?;
        let mut idx = Self {
            workspace: workspace.clone().unwrap_or_default(),
            base_version: base_version.unwrap_or(0),
            base: BTreeMap::new(),
            local: BTreeMap::new(),
            pending: BTreeSet::new(),
            dirty: BTreeSet::new(),
            db,
        };
        let known = workspace.is_some() && base_version.is_some();
        if known {
            idx.load().with_context(|| format!("cannot read {}", path.display()))?;
        }
        Ok((idx, known))
    }

    fn load(&mut self) -> anyhow::Result<()> {
        let mut q = self.db.prepare("SELECT path, kind, mode, size, hash FROM base")?;
        let rows = q.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get::<_, Option<Vec<u8>>>(4)?))
        })?;
        for row in rows {
            let (path, kind, mode, size, hash) = row?;
            let e = entry(&path, &kind, mode, size, hash)?;
            self.base.insert(path, e);
        }
        drop(q);
        let mut q = self.db.prepare(
            "SELECT path, kind, mode, size, hash, dev, ino, st_size, mtime_ns, ctime_ns, st_mode, read_at_ns FROM local",
        )?;
        let rows = q.query_map([], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get::<_, Option<Vec<u8>>>(4)?),
                Stat {
                    dev: r.get::<_, i64>(5)? as u64,
                    ino: r.get::<_, i64>(6)? as u64,
                    size: r.get::<_, i64>(7)? as u64,
                    mtime_ns: r.get(8)?,
                    ctime_ns: r.get(9)?,
                    mode: r.get(10)?,
                },
                r.get::<_, i64>(11)?,
            ))
        })?;
        for row in rows {
            let ((path, kind, mode, size, hash), stat, read_at_ns) = row?;
            let e = entry(&path, &kind, mode, size, hash)?;
            self.local.insert(path, Rec { entry: e, stat, read_at_ns });
        }
        drop(q);
        self.refresh_all_pending();
        Ok(())
    }

    /// Starts over from `tree` as the base at `version` (the local index is kept: its stat
    /// figures still save hashing).
    pub fn reset_base(&mut self, workspace: &str, version: u64, tree: Vec<Entry>) -> anyhow::Result<()> {
        self.workspace = workspace.to_string();
        self.base_version = version;
        self.base = tree.into_iter().map(|e| (e.path.as_str().to_string(), e)).collect();
        self.refresh_all_pending();
        let tx = self.db.transaction()?;
        tx.execute("DELETE FROM base", [])?;
        {
            let mut ins = tx.prepare("INSERT INTO base (path, kind, mode, size, hash) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for e in self.base.values() {
                ins.execute(params![e.path.as_str(), e.kind.as_str(), e.mode, e.size as i64, hash_blob(e)])?;
            }
        }
        put_meta(&tx, "workspace", workspace)?;
        put_meta(&tx, "base_version", &version.to_string())?;
        tx.commit()?;
        Ok(())
    }

    /// Records that the gateway committed `changes` on top of the base as `version`.
    pub fn advance_base(&mut self, version: u64, changes: &[Change]) -> anyhow::Result<()> {
        let tx = self.db.transaction()?;
        {
            let mut del = tx.prepare("DELETE FROM base WHERE path = ?1")?;
            let mut ins =
                tx.prepare("INSERT OR REPLACE INTO base (path, kind, mode, size, hash) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for c in changes {
                match c {
                    Change::Put(e) => {
                        ins.execute(params![e.path.as_str(), e.kind.as_str(), e.mode, e.size as i64, hash_blob(e)])?;
                    }
                    Change::Delete(p) => {
                        del.execute([p.as_str()])?;
                    }
                }
            }
        }
        put_meta(&tx, "base_version", &version.to_string())?;
        tx.commit()?;
        self.base_version = version;
        for c in changes {
            let p = match c {
                Change::Put(e) => {
                    self.base.insert(e.path.as_str().to_string(), e.clone());
                    e.path.as_str().to_string()
                }
                Change::Delete(p) => {
                    self.base.remove(p.as_str());
                    p.as_str().to_string()
                }
            };
            self.refresh_pending(&p);
        }
        Ok(())
    }

    /// Sets what is on disk at `path`.
    pub fn set_local(&mut self, path: &str, rec: Rec) {
        if self.local.get(path) != Some(&rec) {
            self.local.insert(path.to_string(), rec);
            self.dirty.insert(path.to_string());
            self.refresh_pending(path);
        }
    }

    /// Forgets `path` and everything below it (gone from disk, or ignored now). Returns the
    /// directories among them.
    pub fn remove_local_tree(&mut self, path: &str) -> Vec<String> {
        let below: Vec<String> = self.below(path).map(str::to_string).collect();
        let mut dirs = Vec::new();
        for p in std::iter::once(path.to_string()).chain(below) {
            if let Some(r) = self.local.remove(&p) {
                if r.entry.kind == EntryKind::Dir {
                    dirs.push(p.clone());
                }
                self.dirty.insert(p.clone());
                self.refresh_pending(&p);
            }
        }
        dirs
    }

    /// Local paths strictly below `dir` ("" for all).
    pub fn below<'a>(&'a self, dir: &str) -> impl Iterator<Item = &'a str> + 'a {
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        self.local.range(prefix.clone()..).map(|(k, _)| k.as_str()).take_while(move |k| k.starts_with(&prefix))
    }

    /// Recomputes `pending` from scratch.
    fn refresh_all_pending(&mut self) {
        self.pending.clear();
        let paths: Vec<String> = self.base.keys().chain(self.local.keys()).cloned().collect();
        for p in paths {
            self.refresh_pending(&p);
        }
    }

    fn refresh_pending(&mut self, path: &str) {
        let same = match (self.local.get(path), self.base.get(path)) {
            (None, None) => true,
            (Some(l), Some(b)) => l.entry.same_content(b),
            _ => false,
        };
        if same {
            self.pending.remove(path);
        } else {
            self.pending.insert(path.to_string());
        }
    }

    /// The pending paths as (local, base) entry lists sorted by path, for `compute_changes`.
    pub fn pending_trees(&self) -> (Vec<Entry>, Vec<Entry>) {
        let local = self.pending.iter().filter_map(|p| self.local.get(p).map(|r| r.entry.clone())).collect();
        let base = self.pending.iter().filter_map(|p| self.base.get(p).cloned()).collect();
        (local, base)
    }

    /// Writes the local paths changed since the last save.
    pub fn save(&mut self) -> anyhow::Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let tx = self.db.transaction()?;
        {
            let mut del = tx.prepare("DELETE FROM local WHERE path = ?1")?;
            let mut ins = tx.prepare(
                "INSERT OR REPLACE INTO local (path, kind, mode, size, hash, dev, ino, st_size, mtime_ns, ctime_ns, \
                 st_mode, read_at_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for p in &self.dirty {
                match self.local.get(p) {
                    Some(r) => {
                        let (e, s) = (&r.entry, &r.stat);
                        ins.execute(params![
                            p,
                            e.kind.as_str(),
                            e.mode,
                            e.size as i64,
                            hash_blob(e),
                            s.dev as i64,
                            s.ino as i64,
                            s.size as i64,
                            s.mtime_ns,
                            s.ctime_ns,
                            s.mode,
                            r.read_at_ns
                        ])?;
                    }
                    None => {
                        del.execute([p])?;
                    }
                }
            }
        }
        tx.commit()?;
        self.dirty.clear();
        Ok(())
    }
}

fn put_meta(tx: &rusqlite::Transaction<'_>, key: &str, value: &str) -> rusqlite::Result<usize> {
    tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)", params![key, value])
}

fn hash_blob(e: &Entry) -> Option<Vec<u8>> {
    e.hash.map(|h| h.as_bytes().to_vec())
}

fn entry(path: &str, kind: &str, mode: u32, size: i64, hash: Option<Vec<u8>>) -> anyhow::Result<Entry> {
    let kind = EntryKind::parse(kind).ok_or_else(|| anyhow::anyhow!("{path}: bad kind {kind:?} in the index"))?;
    let hash = match hash {
        Some(b) => Some(ContentHash::from_slice(&b).map_err(|_| anyhow::anyhow!("{path}: bad hash in the index"))?),
        None => None,
    };
    Ok(Entry { path: WsPath::new(path.to_string())?, kind, hash, size: size as u64, mode })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, body: &[u8]) -> Entry {
        Entry {
            path: WsPath::new(p.to_string()).unwrap(),
            kind: EntryKind::File,
            hash: Some(ContentHash::of(body)),
            size: body.len() as u64,
            mode: 0o644,
        }
    }

    fn rec(e: Entry) -> Rec {
        Rec { entry: e, stat: Stat { ino: 7, size: 1, mtime_ns: 1, ..Stat::default() }, read_at_ns: 10_000_000_000 }
    }

    #[test]
    fn pending_follows_local_against_base_and_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("index.sqlite");
        let (mut idx, known) = Index::open(&path).unwrap();
        assert!(!known);
        idx.reset_base("ws", 3, vec![file("a", b"1"), file("b", b"2")]).unwrap();
        assert_eq!(idx.pending.len(), 2, "base paths missing locally are pending deletes");
        idx.set_local("a", rec(file("a", b"1")));
        idx.set_local("b", rec(file("b", b"changed")));
        idx.set_local("c", rec(file("c", b"new")));
        assert_eq!(idx.pending.iter().collect::<Vec<_>>(), ["b", "c"]);
        idx.save().unwrap();
        let (local, base) = idx.pending_trees();
        let changes = crate::changes::compute_changes(&local, &base);
        idx.advance_base(4, &changes).unwrap();
        assert!(idx.pending.is_empty());
        idx.remove_local_tree("a");
        idx.save().unwrap();
        drop(idx);

        let (idx, known) = Index::open(&path).unwrap();
        assert!(known);
        assert_eq!((idx.workspace.as_str(), idx.base_version), ("ws", 4));
        assert_eq!(idx.base.get("b"), Some(&file("b", b"changed")));
        assert_eq!(idx.local.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(idx.pending.iter().collect::<Vec<_>>(), ["a"], "a was deleted locally");
    }

    #[test]
    fn racy_entries_are_not_trusted() {
        let r = rec(file("a", b"1"));
        assert!(r.still_valid(&r.stat));
        let mut fresh = r.clone();
        fresh.read_at_ns = r.stat.mtime_ns + RACY_NS / 2;
        assert!(!fresh.still_valid(&r.stat), "read too soon after its last write");
        assert!(!r.still_valid(&Stat { size: 2, ..r.stat }));
    }

    #[test]
    fn below_lists_only_descendants() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut idx, _) = Index::open(&tmp.path().join("index.sqlite")).unwrap();
        for p in ["a", "a/x", "a/y/z", "a-b", "ab"] {
            idx.set_local(p, rec(file(p, b"x")));
        }
        assert_eq!(idx.below("a").collect::<Vec<_>>(), ["a/x", "a/y/z"]);
        idx.remove_local_tree("a");
        assert_eq!(idx.local.keys().collect::<Vec<_>>(), ["a-b", "ab"]);
    }
}
