//! Reads a local directory into a sorted list of tree entries, hashing content in parallel.
//!
//! What is included: every directory, regular file and symlink below the root, hidden ones too,
//! minus what [`Rules`] exclude (`.podfsignore` files in gitignore syntax, built-in defaults for
//! editor litter, the top-level `.podfs` state directory). Symlinks are never followed: their
//! link text is their content. Sockets, FIFOs and devices are skipped with a warning. Names must
//! be UTF-8 workspace paths; anything else is an error naming the path (silently skipping it
//! would delete it from the workspace).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use podfs_protocol::tree::{MODE_MASK, SYMLINK_MODE};
use podfs_protocol::{ContentHash, Entry, EntryKind, WsPath};
use rayon::prelude::*;

use super::hash;
use super::rules::Rules;
use super::state::gone;

pub use super::rules::IGNORE_FILE;
pub use super::state::STATE_DIR;

/// Where the content of a hash can be read again for upload.
#[derive(Debug, Clone)]
pub enum Source {
    /// A regular file of `size` bytes (re-read at upload time).
    File { path: PathBuf, size: u64 },
    /// Content held in memory: symlink text, or a small file's bytes as they were read to hash
    /// them (so a push sends exactly what it hashed without reading the file again).
    Inline(Bytes),
}

impl Source {
    pub fn size(&self) -> u64 {
        match self {
            Source::File { size, .. } => *size,
            Source::Inline(b) => b.len() as u64,
        }
    }
}

/// Where to read each content hash again for upload.
pub type Sources = HashMap<ContentHash, Source>;

/// A scanned local tree.
#[derive(Debug, Default)]
pub struct ScannedTree {
    /// Sorted by path.
    pub entries: Vec<Entry>,
    /// Paths skipped because they are neither file, directory nor symlink.
    pub skipped: Vec<PathBuf>,
}

/// One path a walk found, with what `lstat` said about it.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: WsPath,
    pub local: PathBuf,
    pub kind: EntryKind,
    /// Permission bits (`SYMLINK_MODE` for symlinks).
    pub mode: u32,
    pub stat: Stat,
}

/// The parts of `lstat` that tell whether a path changed since it was last read (git's index
/// keeps the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
}

impl Stat {
    pub fn of(m: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            mode: m.mode(),
        }
    }
}

/// What a path is, from its metadata: `None` for sockets, FIFOs and devices.
pub fn kind_of(ft: fs::FileType) -> Option<EntryKind> {
    if ft.is_dir() {
        Some(EntryKind::Dir)
    } else if ft.is_file() {
        Some(EntryKind::File)
    } else if ft.is_symlink() {
        Some(EntryKind::Symlink)
    } else {
        None
    }
}

/// What a full `st_mode` (type bits included) describes.
pub fn kind_of_mode(mode: u32) -> Option<EntryKind> {
    match mode & 0o170000 {
        0o040000 => Some(EntryKind::Dir),
        0o100000 => Some(EntryKind::File),
        0o120000 => Some(EntryKind::Symlink),
        _ => None,
    }
}

/// Walks the tree below the workspace path `below` ("" for the whole tree; it must exist and not
/// be ignored itself), appending every path `rules` keep to `found`, `below` itself excluded.
/// Paths that vanish during the walk are left out; unsupported kinds go to `skipped`. `on_dir`
/// sees each directory before its entries are read (syncd watches it there, so nothing created
/// in it later is missed).
pub fn walk(
    rules: &mut Rules,
    below: &str,
    found: &mut Vec<Found>,
    skipped: &mut Vec<PathBuf>,
    on_dir: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let root = rules.root().to_path_buf();
    let mut stack = vec![below.to_string()];
    while let Some(dir) = stack.pop() {
        let dir_local = if dir.is_empty() { root.clone() } else { root.join(&dir) };
        on_dir(&dir);
        let entries = match fs::read_dir(&dir_local) {
            Ok(e) => e,
            Err(e) if gone(&e) && !dir.is_empty() => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir_local.display())),
        };
        for item in entries {
            let item = item.with_context(|| format!("cannot read {}", dir_local.display()))?;
            let local = item.path();
            let Some(name) = item.file_name().to_str().map(str::to_string) else {
                // not representable as a workspace path: the caller decides (push refuses)
                tracing::warn!(path = %local.display(), "skipping: the name is not valid UTF-8");
                skipped.push(local);
                continue;
            };
            let rel = if dir.is_empty() { name } else { format!("{dir}/{name}") };
            let meta = match fs::symlink_metadata(&local) {
                Ok(m) => m,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot stat {}", local.display())),
            };
            match classify(rules, rel, local, &meta)? {
                Looked::Keep(f) => {
                    if f.kind == EntryKind::Dir {
                        stack.push(f.path.as_str().to_string());
                    }
                    found.push(f);
                }
                Looked::Unsupported(local) => {
                    tracing::warn!(path = %local.display(), "skipping: not a file, directory or symlink");
                    skipped.push(local);
                }
                Looked::Ignored => {}
            }
        }
    }
    Ok(())
}

/// What a walk makes of one path.
pub enum Looked {
    Keep(Found),
    /// Excluded by the rules.
    Ignored,
    /// A socket, FIFO or device (not ignored).
    Unsupported(PathBuf),
}

/// Classifies the workspace path `rel` (at `local`) from its `lstat` metadata, by the rules.
pub fn classify(rules: &mut Rules, rel: String, local: PathBuf, meta: &fs::Metadata) -> anyhow::Result<Looked> {
    let Some(kind) = kind_of(meta.file_type()) else {
        return Ok(if rules.is_ignored(&rel, false) { Looked::Ignored } else { Looked::Unsupported(local) });
    };
    if rules.is_ignored(&rel, kind == EntryKind::Dir) {
        return Ok(Looked::Ignored);
    }
    let path = WsPath::new(rel).with_context(|| format!("{}: not a valid workspace path", local.display()))?;
    let stat = Stat::of(meta);
    Ok(Looked::Keep(Found { path, local, kind, mode: mode_of(kind, stat.mode), stat }))
}

/// The permission bits an entry of `kind` records for a full `st_mode`.
pub fn mode_of(kind: EntryKind, st_mode: u32) -> u32 {
    match kind {
        EntryKind::Symlink => SYMLINK_MODE,
        _ => st_mode & MODE_MASK,
    }
}

/// Files hashed per chunk by [`scan_with`].
pub const SCAN_CHUNK: usize = 2048;
/// Files up to this size keep the bytes read to hash them ([`Source::Inline`])...
pub const KEEP_CONTENT: u64 = 128 << 10;
/// ...up to this many bytes per scan in all; later ones are read again at upload.
pub const KEEP_BUDGET: u64 = 256 << 20;

/// Scans `root` (blocking: call from a blocking thread). Content is hashed on rayon's pool.
pub fn scan(root: &Path) -> anyhow::Result<ScannedTree> {
    scan_with(root, |_| {})
}

/// [`scan`], handing the content of each chunk of [`SCAN_CHUNK`] paths to `on_chunk` as soon
/// as it is hashed (so a push can upload while the rest is still being read).
pub fn scan_with(root: &Path, mut on_chunk: impl FnMut(Vec<(ContentHash, Source)>)) -> anyhow::Result<ScannedTree> {
    let meta = fs::metadata(root).with_context(|| format!("cannot read {}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let mut rules = Rules::new(root);
    walk(&mut rules, "", &mut found, &mut skipped, &mut |_| {})?;
    // skipping a name would delete it from the workspace: refuse instead
    if let Some(bad) = skipped.iter().find(|p| p.file_name().is_some_and(|n| n.to_str().is_none())) {
        bail!(
            "{}: the name is not valid UTF-8; podfs stores only UTF-8 names (rename it or add it to {IGNORE_FILE})",
            bad.display()
        );
    }
    for w in &rules.warnings {
        tracing::warn!("{w}");
    }

    // the sources go to `on_chunk` only: kept bytes are freed once the caller is done with them
    let mut tree = ScannedTree { entries: Vec::with_capacity(found.len()), skipped };
    let mut rest = found.into_iter().peekable();
    let budget = std::sync::atomic::AtomicU64::new(KEEP_BUDGET);
    while rest.peek().is_some() {
        let chunk: Vec<_> = rest.by_ref().take(SCAN_CHUNK).collect();
        let mut sources = Vec::new();
        for (entry, source) in hash_all(chunk, &budget)? {
            if let (Some(h), Some(s)) = (entry.hash, source) {
                sources.push((h, s));
            }
            tree.entries.push(entry);
        }
        on_chunk(sources);
    }
    tree.entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(tree)
}

/// Hashes `found` on rayon's pool: each entry with where to read its content again (the bytes
/// themselves for small files, while `budget` lasts).
fn hash_all(found: Vec<Found>, budget: &std::sync::atomic::AtomicU64) -> anyhow::Result<Vec<(Entry, Option<Source>)>> {
    use std::sync::atomic::Ordering;
    let keep = |n: u64| budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(n)).is_ok();
    found
        .into_par_iter()
        .map(|f| -> anyhow::Result<(Entry, Option<Source>)> {
            let (hash, size, source) = match f.kind {
                EntryKind::Dir => (None, 0, None),
                EntryKind::File => {
                    let read = || format!("cannot read {}", f.local.display());
                    match hash::read_small(&f.local, KEEP_CONTENT).with_context(read)? {
                        Some((h, data)) if keep(data.len() as u64) => {
                            (Some(h), data.len() as u64, Some(Source::Inline(data)))
                        }
                        Some((h, data)) => {
                            let size = data.len() as u64;
                            (Some(h), size, Some(Source::File { path: f.local, size }))
                        }
                        None => {
                            let (h, n) = hash::hash_file(&f.local).with_context(read)?;
                            (Some(h), n, Some(Source::File { path: f.local, size: n }))
                        }
                    }
                }
                EntryKind::Symlink => {
                    let (h, text) =
                        hash::read_link(&f.local).with_context(|| format!("cannot read link {}", f.local.display()))?;
                    (Some(h), text.len() as u64, Some(Source::Inline(text)))
                }
            };
            Ok((Entry { path: f.path, kind: f.kind, hash, size, mode: f.mode }, source))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn paths(t: &ScannedTree) -> Vec<&str> {
        t.entries.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn small_files_keep_the_bytes_they_were_hashed_from() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        let big = vec![7u8; KEEP_CONTENT as usize + 1];
        fs::write(r.join("small"), b"small content").unwrap();
        fs::write(r.join("big"), &big).unwrap();
        let mut chunks = Vec::new();
        scan_with(r, |c| chunks.extend(c)).unwrap();
        let sources: Sources = chunks.iter().cloned().collect();
        let small = ContentHash::of(b"small content");
        assert!(matches!(&sources[&small], Source::Inline(b) if b.as_ref() == b"small content"));
        let big = ContentHash::of(&big);
        assert!(matches!(&sources[&big], Source::File { size, .. } if *size == KEEP_CONTENT + 1));
        // every content went to the chunk callback once
        let mut seen: Vec<ContentHash> = chunks.iter().map(|(h, _)| *h).collect();
        seen.sort();
        let mut want = vec![small, big];
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn scans_files_dirs_symlinks_hidden_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        fs::create_dir_all(r.join("src/empty")).unwrap();
        fs::write(r.join("src/main.rs"), b"fn main() {}").unwrap();
        fs::write(r.join(".env"), b"X=1").unwrap();
        fs::write(r.join("run.sh"), b"#!/bin/sh").unwrap();
        fs::set_permissions(r.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(r.join("src/empty"), fs::Permissions::from_mode(0o700)).unwrap();
        symlink("src/main.rs", r.join("link")).unwrap();
        symlink("/nonexistent/abs", r.join("dangling")).unwrap();
        fs::create_dir_all(r.join(".podfs/state")).unwrap();
        fs::write(r.join(".podfs/state/db"), b"x").unwrap();
        fs::create_dir_all(r.join("sub/.podfs")).unwrap();

        let mut sources = Sources::new();
        let t = scan_with(r, |c| sources.extend(c)).unwrap();
        assert_eq!(
            paths(&t),
            [".env", "dangling", "link", "run.sh", "src", "src/empty", "src/main.rs", "sub", "sub/.podfs"]
        );
        let get = |p: &str| t.entries.iter().find(|e| e.path.as_str() == p).unwrap();
        assert_eq!(get("run.sh").mode, 0o755);
        assert_eq!(get("src/empty").mode, 0o700);
        assert_eq!(get("src/empty").kind, EntryKind::Dir);
        let l = get("link");
        assert_eq!((l.kind, l.mode, l.size), (EntryKind::Symlink, 0o777, 11));
        assert_eq!(l.hash, Some(ContentHash::of(b"src/main.rs")));
        assert_eq!(get("dangling").hash, Some(ContentHash::of(b"/nonexistent/abs")));
        let f = get("src/main.rs");
        assert_eq!(f.hash, Some(ContentHash::of(b"fn main() {}")));
        assert!(matches!(sources.get(&ContentHash::of(b"src/main.rs")), Some(Source::Inline(_))));
    }

    #[test]
    fn honours_podfsignore() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        fs::write(r.join(IGNORE_FILE), "target/\n*.log\n!keep.log\n").unwrap();
        fs::create_dir_all(r.join("target/debug")).unwrap();
        fs::write(r.join("target/debug/x"), b"x").unwrap();
        fs::write(r.join("a.log"), b"x").unwrap();
        fs::write(r.join("keep.log"), b"x").unwrap();
        fs::create_dir_all(r.join("sub")).unwrap();
        fs::write(r.join("sub").join(IGNORE_FILE), "secret\n").unwrap();
        fs::write(r.join("sub/secret"), b"x").unwrap();
        fs::write(r.join("secret"), b"x").unwrap();
        let t = scan(r).unwrap();
        assert_eq!(paths(&t), [IGNORE_FILE, "keep.log", "secret", "sub", "sub/.podfsignore"]);
    }

    #[test]
    fn non_utf8_names_are_an_error_naming_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"bad\xffname");
        fs::write(tmp.path().join(name), b"x").unwrap();
        let err = format!("{:#}", scan(tmp.path()).unwrap_err());
        assert!(err.contains("not valid UTF-8") && err.contains("bad"), "{err}");
    }

    #[test]
    fn fifos_and_sockets_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("pipe");
        // mkfifo is in coreutils, on every machine these tests run on: its absence is a failure
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
        assert!(made.success(), "mkfifo failed");
        let socket = tmp.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        fs::write(tmp.path().join("f"), b"x").unwrap();
        let t = scan(tmp.path()).unwrap();
        assert_eq!(paths(&t), ["f"]);
        let mut skipped = t.skipped.clone();
        skipped.sort();
        assert_eq!(skipped, [fifo, socket]);
    }

    #[test]
    fn root_must_be_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), b"x").unwrap();
        assert!(scan(&tmp.path().join("f")).is_err());
        assert!(scan(&tmp.path().join("missing")).is_err());
    }
}
