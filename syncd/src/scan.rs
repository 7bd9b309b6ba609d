//! Reads a local directory into a sorted list of tree entries, hashing content in parallel.
//!
//! What is included: every directory, regular file and symlink below the root, hidden ones too,
//! minus what `.podfsignore` files (gitignore syntax, honoured in every directory) exclude and
//! minus a top-level `.podfs` directory (the daemon's state). Symlinks are never followed: their
//! link text is their content. Sockets, FIFOs and devices are skipped with a warning. Names must
//! be UTF-8 workspace paths; anything else is an error naming the path (silently skipping it
//! would delete it from the workspace).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use podfs_protocol::tree::{MODE_MASK, SYMLINK_MODE};
use podfs_protocol::{ContentHash, Entry, EntryKind, WsPath};
use rayon::prelude::*;

/// Name of the ignore files (gitignore syntax).
pub const IGNORE_FILE: &str = ".podfsignore";
/// Top-level directory that is never pushed (syncd's state).
pub const STATE_DIR: &str = ".podfs";
/// Files at least this large are hashed by reading fixed-size chunks, each hashed on several
/// threads; smaller ones are read whole. Never through mmap: a file truncated while mapped
/// kills the process with SIGBUS, and a devpod's files change under us.
pub const LARGE_HASH_THRESHOLD: u64 = 1 << 20;
/// Chunk read at a time when hashing a large file.
const HASH_CHUNK: usize = 4 << 20;

/// Where the content of a hash can be read again for upload.
#[derive(Debug, Clone)]
pub enum Source {
    /// A regular file of `size` bytes (re-read at upload time).
    File { path: PathBuf, size: u64 },
    /// Content held in memory (symlink text).
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

/// A scanned local tree.
#[derive(Debug, Default)]
pub struct LocalTree {
    /// Sorted by path.
    pub entries: Vec<Entry>,
    /// One place to read each content hash from.
    pub sources: HashMap<ContentHash, Source>,
    /// Paths skipped because they are neither file, directory nor symlink.
    pub skipped: Vec<PathBuf>,
}

struct Found {
    path: WsPath,
    local: PathBuf,
    kind: EntryKind,
    mode: u32,
}

/// Scans `root` (blocking: call from a blocking thread). Content is hashed on rayon's pool.
pub fn scan(root: &Path) -> anyhow::Result<LocalTree> {
    let meta = fs::metadata(root).with_context(|| format!("cannot read {}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let walker = ignore::WalkBuilder::new(root)
        .standard_filters(false)
        .follow_links(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .filter_entry(|e| !(e.depth() == 1 && e.file_name() == STATE_DIR))
        .build();
    for item in walker {
        let entry = item.with_context(|| format!("cannot scan {}", root.display()))?;
        if entry.depth() == 0 {
            continue;
        }
        let local = entry.path().to_path_buf();
        let ft = entry.file_type().with_context(|| format!("cannot read the type of {}", local.display()))?;
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_file() {
            EntryKind::File
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else {
            tracing::warn!(path = %local.display(), "skipping: not a file, directory or symlink");
            skipped.push(local);
            continue;
        };
        let path = ws_path(root, &local)?;
        let mode = match kind {
            EntryKind::Symlink => SYMLINK_MODE,
            _ => {
                let m = entry.metadata().with_context(|| format!("cannot stat {}", local.display()))?;
                m.permissions().mode() & MODE_MASK
            }
        };
        found.push(Found { path, local, kind, mode });
    }

    let hashed: Vec<(Entry, Option<Source>)> = found
        .into_par_iter()
        .map(|f| -> anyhow::Result<(Entry, Option<Source>)> {
            let (hash, size, source) = match f.kind {
                EntryKind::Dir => (None, 0, None),
                EntryKind::File => {
                    let (h, n) = hash_file(&f.local).with_context(|| format!("cannot read {}", f.local.display()))?;
                    (Some(h), n, Some(Source::File { path: f.local, size: n }))
                }
                EntryKind::Symlink => {
                    let target =
                        fs::read_link(&f.local).with_context(|| format!("cannot read link {}", f.local.display()))?;
                    let text = Bytes::copy_from_slice(target.as_os_str().as_bytes());
                    (Some(ContentHash::of(&text)), text.len() as u64, Some(Source::Inline(text)))
                }
            };
            Ok((Entry { path: f.path, kind: f.kind, hash, size, mode: f.mode }, source))
        })
        .collect::<anyhow::Result<_>>()?;

    let mut tree = LocalTree { skipped, ..LocalTree::default() };
    for (entry, source) in hashed {
        if let (Some(h), Some(s)) = (entry.hash, source) {
            tree.sources.entry(h).or_insert(s);
        }
        tree.entries.push(entry);
    }
    tree.entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(tree)
}

/// The workspace path of `local` below `root`: UTF-8 components joined by `/`.
fn ws_path(root: &Path, local: &Path) -> anyhow::Result<WsPath> {
    let rel =
        local.strip_prefix(root).with_context(|| format!("{} is not below {}", local.display(), root.display()))?;
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(name) => match name.to_str() {
                Some(s) => parts.push(s),
                None => bail!(
                    "{}: the name is not valid UTF-8; podfs stores only UTF-8 names (rename it or add it to {IGNORE_FILE})",
                    local.display()
                ),
            },
            _ => bail!("{}: unexpected path component", local.display()),
        }
    }
    WsPath::new(parts.join("/")).with_context(|| format!("{}: not a valid workspace path", local.display()))
}

/// BLAKE3 of a file and the number of bytes hashed.
pub fn hash_file(path: &Path) -> io::Result<(ContentHash, u64)> {
    let len = fs::symlink_metadata(path)?.len();
    if len >= LARGE_HASH_THRESHOLD {
        use std::io::Read;
        let mut file = fs::File::open(path)?;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; HASH_CHUNK];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update_rayon(&buf[..n]);
        }
        Ok((h.finalize().into(), h.count()))
    } else {
        let data = fs::read(path)?;
        Ok((ContentHash::of(&data), data.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn paths(t: &LocalTree) -> Vec<&str> {
        t.entries.iter().map(|e| e.path.as_str()).collect()
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

        let t = scan(r).unwrap();
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
        assert!(matches!(t.sources.get(&ContentHash::of(b"src/main.rs")), Some(Source::Inline(_))));
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
    fn big_files_hash_like_small_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * LARGE_HASH_THRESHOLD as usize + 7).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(tmp.path().join("big"), &data).unwrap();
        let (h, n) = hash_file(&tmp.path().join("big")).unwrap();
        assert_eq!((h, n), (ContentHash::of(&data), data.len() as u64));
    }

    #[test]
    fn non_utf8_names_are_an_error_naming_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"bad\xffname");
        fs::write(tmp.path().join(name), b"x").unwrap();
        let err = format!("{:#}", scan(tmp.path()).unwrap_err());
        assert!(err.contains("not valid UTF-8") && err.contains("bad"), "{err}");
    }

    #[test]
    fn fifos_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("pipe");
        let ok = std::process::Command::new("mkfifo").arg(&fifo).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            return; // no mkfifo here
        }
        fs::write(tmp.path().join("f"), b"x").unwrap();
        let t = scan(tmp.path()).unwrap();
        assert_eq!(paths(&t), ["f"]);
        assert_eq!(t.skipped, [fifo]);
    }

    #[test]
    fn root_must_be_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), b"x").unwrap();
        assert!(scan(&tmp.path().join("f")).is_err());
        assert!(scan(&tmp.path().join("missing")).is_err());
    }
}
