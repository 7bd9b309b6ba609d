//! Brings the local index in line with the disk: the whole tree (start-up, watcher overflow,
//! periodic) or only the paths watcher events named. Events are hints; this is the truth.
//!
//! A path whose `lstat` figures match its index record (and was not read in the same instant it
//! was last written) is not read again. Everything else is hashed on rayon's pool; a file that
//! changes while it is read (its `lstat` differs before and after) is read again, and after a
//! few tries left for the next round: never recorded torn.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use podfs_protocol::{ContentHash, Entry, EntryKind};
use rayon::prelude::*;

use super::index::{Index, Rec};
use crate::local::hash;
use crate::local::rules::Rules;
use crate::local::scan::{self, Found, Looked, Stat};
use crate::local::state::gone;

/// Reads of one file before it counts as unstable for this round.
const STABLE_TRIES: usize = 4;
/// A file whose last change is older than this when a read starts cannot change during the
/// read without its timestamps moving (they tick every few milliseconds).
const SETTLED_NS: i64 = 50_000_000;

/// What to look at.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Look at these paths themselves (a file written, a path removed, a mode changed).
    pub paths: BTreeSet<String>,
    /// Walk these (directories created or moved in): everything below them too.
    pub trees: BTreeSet<String>,
    /// Walk the whole tree.
    pub full: bool,
    /// An ignore file changed: read the rules again (a whole-tree walk comes with it).
    pub rules_changed: bool,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.full && self.paths.is_empty() && self.trees.is_empty()
    }
    pub fn len(&self) -> usize {
        self.paths.len() + self.trees.len()
    }
}

/// What a round did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Paths looked at.
    pub checked: usize,
    /// Files and symlinks read.
    pub hashed: usize,
    /// Directories that appeared in / left the index (to watch / unwatch).
    pub dirs_added: Vec<String>,
    pub dirs_removed: Vec<String>,
    /// Paths that kept changing while read, or could not be read: look again later.
    pub deferred: Vec<String>,
    /// Paths that could not be read (permissions...), with the reason.
    pub unreadable: Vec<(String, String)>,
}

/// Updates `idx` from the disk for `dirty`. `on_dir` sees every directory walked, before it is
/// read.
pub fn reconcile(
    rules: &mut Rules,
    idx: &mut Index,
    dirty: Dirty,
    on_dir: &mut dyn FnMut(&str),
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let mut found: Vec<Found> = Vec::new();
    let mut skipped: Vec<PathBuf> = Vec::new();
    let had_dirs: HashSet<String> = if dirty.full { dirs_of(idx, "") } else { HashSet::new() };
    if dirty.full {
        scan::walk(rules, "", &mut found, &mut skipped, on_dir)?;
        let seen: HashSet<&str> = found.iter().map(|f| f.path.as_str()).collect();
        let gone: Vec<String> = idx.local.keys().filter(|p| !seen.contains(p.as_str())).cloned().collect();
        for p in gone {
            out.dirs_removed.extend(idx.remove_local_tree(&p));
        }
    } else {
        let mut trees: Vec<&String> = Vec::new();
        for t in &dirty.trees {
            if !trees.iter().any(|a| is_below(t, a)) {
                trees.push(t);
            }
        }
        let mut walk_below: Vec<String> = Vec::new();
        // ancestors found to be real directories, and paths queued in `found`, this round
        let (mut dirs_ok, mut queued) = (HashSet::new(), HashSet::new());
        for p in trees
            .iter()
            .map(|t| t.as_str())
            .chain(dirty.paths.iter().filter(|p| !trees.iter().any(|t| *p == *t || is_below(p, t))).map(String::as_str))
        {
            match look(rules, p, &mut dirs_ok)? {
                None => out.dirs_removed.extend(idx.remove_local_tree(p)),
                Some(f) => {
                    let is_tree = dirty.trees.contains(p);
                    let new_dir =
                        f.kind == EntryKind::Dir && !idx.local.get(p).is_some_and(|r| r.entry.kind == EntryKind::Dir);
                    if f.kind == EntryKind::Dir && (is_tree || new_dir) {
                        walk_below.push(p.to_string());
                    } else if f.kind != EntryKind::Dir {
                        // was it a directory? its contents went with it
                        let below: Vec<String> = idx.below(p).map(str::to_string).collect();
                        for b in below {
                            out.dirs_removed.extend(idx.remove_local_tree(&b));
                        }
                    }
                    add_missing_parents(rules, idx, p, &mut found, (&mut dirs_ok, &mut queued))?;
                    if queued.insert(p.to_string()) {
                        found.push(f);
                    }
                }
            }
        }
        for d in walk_below {
            let start = found.len();
            scan::walk(rules, &d, &mut found, &mut skipped, on_dir)?;
            let seen: HashSet<&str> = found[start..].iter().map(|f| f.path.as_str()).collect();
            let gone: Vec<String> = idx.below(&d).filter(|p| !seen.contains(p)).map(str::to_string).collect();
            for p in gone {
                out.dirs_removed.extend(idx.remove_local_tree(&p));
            }
        }
    }
    out.checked = found.len();

    let mut to_read: Vec<Found> = Vec::new();
    for f in found {
        let key = f.path.as_str();
        if f.kind == EntryKind::Dir {
            if !idx.local.get(key).is_some_and(|r| r.entry.kind == EntryKind::Dir) {
                out.dirs_added.push(key.to_string());
            }
            let entry = Entry { path: f.path.clone(), kind: EntryKind::Dir, hash: None, size: 0, mode: f.mode };
            let key = key.to_string();
            idx.set_local(&key, Rec { entry, stat: f.stat, read_at_ns: now_ns() });
            continue;
        }
        match idx.local.get(key) {
            Some(r) if r.entry.kind == f.kind && r.still_valid(&f.stat) => {}
            _ => to_read.push(f),
        }
    }
    out.hashed = to_read.len();
    let read: Vec<(Found, Read)> = to_read
        .into_par_iter()
        .map(|f| {
            let r = read_stable(&f);
            (f, r)
        })
        .collect();
    for (f, r) in read {
        let key = f.path.as_str().to_string();
        match r {
            Read::Done(rec) => {
                if idx.local.get(&key).is_some_and(|old| old.entry.kind == EntryKind::Dir) {
                    out.dirs_removed.extend(idx.remove_local_tree(&key));
                }
                idx.set_local(&key, rec);
            }
            Read::Gone => out.dirs_removed.extend(idx.remove_local_tree(&key)),
            Read::Unstable => out.deferred.push(key),
            Read::Failed(e) => {
                out.unreadable.push((key.clone(), e));
                out.deferred.push(key);
            }
        }
    }
    if dirty.full {
        let now = dirs_of(idx, "");
        out.dirs_added = now.difference(&had_dirs).cloned().collect();
        out.dirs_removed = had_dirs.difference(&now).cloned().collect();
    }
    // a directory removed and found again in the same round is still there
    out.dirs_removed.retain(|d| !idx.local.get(d).is_some_and(|r| r.entry.kind == EntryKind::Dir));
    for w in rules.warnings.drain(..) {
        tracing::warn!("{w}");
    }
    Ok(out)
}

/// `rel` and its metadata as a walk would give it; `None` when it is gone, ignored, below an
/// ignored directory or a symlink, or of an unsupported kind. `dirs_ok` holds ancestors already
/// found to be real directories this round (each is checked once).
fn look(rules: &mut Rules, rel: &str, dirs_ok: &mut HashSet<String>) -> anyhow::Result<Option<Found>> {
    let local = rules.root().join(rel);
    let meta = match fs::symlink_metadata(&local) {
        Ok(m) => m,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", local.display())),
    };
    // an ancestor replaced by a symlink (or a file): the path is not in the tree any more
    let mut end = 0;
    while let Some(i) = rel[end..].find('/') {
        end += i;
        let ancestor = &rel[..end];
        if !dirs_ok.contains(ancestor) {
            if !fs::symlink_metadata(rules.root().join(ancestor)).is_ok_and(|m| m.is_dir()) {
                return Ok(None);
            }
            dirs_ok.insert(ancestor.to_string());
        }
        end += 1;
    }
    match scan::classify(rules, rel.to_string(), local, &meta)? {
        Looked::Keep(f) => Ok(Some(f)),
        Looked::Ignored | Looked::Unsupported(_) => Ok(None),
    }
}

/// Adds the parent directories of `rel` that the index lacks (their events may come later).
fn add_missing_parents(
    rules: &mut Rules,
    idx: &Index,
    rel: &str,
    found: &mut Vec<Found>,
    (dirs_ok, queued): (&mut HashSet<String>, &mut HashSet<String>),
) -> anyhow::Result<()> {
    let mut p = rel;
    while let Some((parent, _)) = p.rsplit_once('/') {
        if idx.local.contains_key(parent) || queued.contains(parent) {
            break;
        }
        if let Some(f) = look(rules, parent, dirs_ok)? {
            queued.insert(parent.to_string());
            found.push(f);
        }
        p = parent;
    }
    Ok(())
}

fn is_below(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

fn dirs_of(idx: &Index, under: &str) -> HashSet<String> {
    let all: Box<dyn Iterator<Item = &str>> =
        if under.is_empty() { Box::new(idx.local.keys().map(String::as_str)) } else { Box::new(idx.below(under)) };
    all.filter(|p| idx.local.get(*p).is_some_and(|r| r.entry.kind == EntryKind::Dir)).map(str::to_string).collect()
}

pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

enum Read {
    Done(Rec),
    Gone,
    Unstable,
    Failed(String),
}

/// Reads `f`'s content until two `lstat`s around the read agree. Timestamps are coarse (a few
/// ms): a file last written less than [`SETTLED_NS`] before the read could be rewritten in place
/// during it without its `lstat` changing, so its content counts only when a second read gives
/// the same hash.
fn read_stable(f: &Found) -> Read {
    read_stable_with(f, &|f| hash::hash_path(&f.local, f.kind))
}

/// [`read_stable`] with the content read by `read` (hash and length).
fn read_stable_with(f: &Found, read: &dyn Fn(&Found) -> io::Result<(ContentHash, u64)>) -> Read {
    let mut before = f.stat;
    let mut confirmed: Option<ContentHash> = None;
    for _ in 0..STABLE_TRIES {
        let read_at_ns = now_ns();
        let content = read(f);
        let (hash, size) = match content {
            Ok(c) => c,
            Err(e) if gone(&e) => return Read::Gone,
            // a file replaced by a directory (EISDIR) or a symlink target read as a file...
            Err(e) if e.kind() == io::ErrorKind::InvalidInput || e.raw_os_error() == Some(21) => return Read::Unstable,
            Err(e) => return Read::Failed(e.to_string()),
        };
        let after = match fs::symlink_metadata(&f.local) {
            Ok(m) => Stat::of(&m),
            Err(e) if gone(&e) => return Read::Gone,
            Err(e) => return Read::Failed(e.to_string()),
        };
        if scan::kind_of_mode(after.mode) != Some(f.kind) {
            return Read::Unstable;
        }
        if after != before || size != after.size {
            before = after;
            confirmed = None;
            continue;
        }
        let settled = read_at_ns - after.mtime_ns.max(after.ctime_ns) > SETTLED_NS;
        if !settled && confirmed != Some(hash) {
            confirmed = Some(hash);
            continue;
        }
        let mode = scan::mode_of(f.kind, after.mode);
        let entry = Entry { path: f.path.clone(), kind: f.kind, hash: Some(hash), size, mode };
        return Read::Done(Rec { entry, stat: after, read_at_ns });
    }
    Read::Unstable
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use podfs_protocol::WsPath;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn local_entries(idx: &Index) -> Vec<Entry> {
        idx.local.values().map(|r| r.entry.clone()).collect()
    }

    fn write(root: &std::path::Path, rel: &str, body: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, body).unwrap();
    }

    fn dirty(paths: &[&str], trees: &[&str]) -> Dirty {
        Dirty {
            paths: paths.iter().map(|s| s.to_string()).collect(),
            trees: trees.iter().map(|s| s.to_string()).collect(),
            ..Dirty::default()
        }
    }

    /// Hints for exactly the paths an edit touched bring the index to what a full scan sees.
    #[test]
    fn hinted_rounds_end_equal_to_a_full_scan() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        write(&root, "a/one.txt", "1");
        write(&root, "a/b/two.txt", "2");
        write(&root, "keep.txt", "k");
        let (mut idx, _) = Index::open(&tmp.path().join("index.sqlite")).unwrap();
        let mut rules = Rules::new(&root);
        let mut watched = Vec::new();
        let full = Dirty { full: true, ..Dirty::default() };
        let out = reconcile(&mut rules, &mut idx, full, &mut |d| watched.push(d.to_string())).unwrap();
        assert_eq!(out.hashed, 3);
        assert_eq!(watched, ["", "a", "a/b"]);
        assert_eq!(local_entries(&idx), crate::scan::scan(&root).unwrap().entries);

        // edit, create in a new directory, move a directory, add a symlink, an ignored file
        write(&root, "keep.txt", "changed");
        write(&root, "new/deep/x.txt", "x");
        fs::rename(root.join("a"), root.join("moved")).unwrap();
        symlink("keep.txt", root.join("link")).unwrap();
        write(&root, "notes.txt~", "backup");
        let d = dirty(&["keep.txt", "link", "notes.txt~"], &["new", "a", "moved"]);
        let out = reconcile(&mut rules, &mut idx, d, &mut |_| {}).unwrap();
        assert_eq!(local_entries(&idx), crate::scan::scan(&root).unwrap().entries);
        assert!(out.dirs_removed.contains(&"a/b".to_string()), "{out:?}");
        assert!(out.dirs_added.contains(&"moved/b".to_string()), "{out:?}");

        // a file replaced by a directory, a directory replaced by a symlink
        fs::remove_file(root.join("keep.txt")).unwrap();
        write(&root, "keep.txt/inside", "i");
        fs::remove_dir_all(root.join("new")).unwrap();
        symlink("moved", root.join("new")).unwrap();
        let d = dirty(&["keep.txt", "new", "new/deep/x.txt"], &[]);
        reconcile(&mut rules, &mut idx, d, &mut |_| {}).unwrap();
        assert_eq!(local_entries(&idx), crate::scan::scan(&root).unwrap().entries);

        // unchanged files are not read again by a full round once their records are older than
        // the racy window (as if the files had been read a while after their last write)
        let paths: Vec<String> = idx.local.keys().cloned().collect();
        for p in paths {
            let mut r = idx.local[&p].clone();
            r.read_at_ns += 2 * crate::daemon::index::RACY_NS;
            idx.set_local(&p, r);
        }
        let out = reconcile(&mut rules, &mut idx, Dirty { full: true, ..Dirty::default() }, &mut |_| {}).unwrap();
        assert_eq!(out.hashed, 0, "{out:?}");
        // ...but a rewrite that keeps size and mtime is caught while its record is racy
        write(&root, "moved/one.txt", "9");
        let out = reconcile(&mut rules, &mut idx, dirty(&["moved/one.txt"], &[]), &mut |_| {}).unwrap();
        assert_eq!(out.hashed, 1);
        assert_eq!(local_entries(&idx), crate::scan::scan(&root).unwrap().entries);
    }

    /// A file rewritten in place without pause is never recorded with content it did not hold
    /// at one instant. Pass k writes byte k over the whole file (one byte longer each pass), so
    /// every state the file holds is a run of k followed by a run of k - 1 (a write in
    /// progress); a read spanning two passes would see the newer byte before the older one.
    #[test]
    fn a_file_changing_while_read_is_never_recorded_torn() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("busy");
        let len = |k: u8| (256 << 10) + k as usize;
        fs::write(&path, vec![0u8; len(0)]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (path, stop) = (path.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                use std::io::{Seek, Write};
                let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
                let mut k = 1u8;
                while !stop.load(Ordering::Relaxed) {
                    f.rewind().unwrap();
                    f.write_all(&vec![k; len(k)]).unwrap();
                    f.set_len(len(k) as u64).unwrap();
                    k = k.wrapping_add(1);
                }
            })
        };
        let last = std::sync::Mutex::new(Vec::new());
        let read = |f: &Found| -> io::Result<(ContentHash, u64)> {
            let data = fs::read(&f.local)?;
            let out = (ContentHash::of(&data), data.len() as u64);
            *last.lock().unwrap() = data;
            Ok(out)
        };
        let (mut done, mut unstable) = (0, 0);
        for _ in 0..300 {
            let f = Found {
                path: WsPath::new("busy".to_string()).unwrap(),
                local: path.clone(),
                kind: EntryKind::File,
                mode: 0o644,
                stat: Stat::of(&fs::symlink_metadata(&path).unwrap()),
            };
            match read_stable_with(&f, &read) {
                Read::Done(_) => {
                    let data = last.lock().unwrap();
                    let a = data[0];
                    let split = data.iter().position(|&b| b != a).unwrap_or(data.len());
                    let held = data[split..].iter().all(|&b| b == a.wrapping_sub(1));
                    assert!(held, "recorded a mix no write produced: byte {a} then {}", data[split]);
                    done += 1;
                }
                Read::Unstable => unstable += 1,
                Read::Gone => {}
                Read::Failed(e) => panic!("{e}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(unstable > 0, "the reads never raced the writer ({done} clean reads)");
    }
}
