//! Writes a tree below one directory, and nowhere else.
//!
//! Every operation goes through a `cap_std::fs::Dir` handle on the root, which resolves paths
//! with `openat2(RESOLVE_BENEATH)`: `..`, absolute paths and symlinks pointing out are refused
//! by the kernel, whatever the manifest said. Files and symlinks are written to a temporary
//! name in their final directory and renamed into place, so a final path only ever holds
//! verified content. Directories are created `0o700` and get their real modes last (deepest
//! first), so a read-only directory does not block writes below it. All of it is blocking:
//! call from a blocking thread.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, DirBuilder, DirBuilderExt, File, OpenOptions, Permissions, PermissionsExt};
use podfs_protocol::WsPath;

pub use super::state::TEMP_PREFIX;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary path next to `path` (same directory, so the rename is atomic).
pub fn temp_path_for(path: &WsPath) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{TEMP_PREFIX}{}-{n}", std::process::id());
    match path.parent() {
        Some(p) => Path::new(p.as_str()).join(name),
        None => PathBuf::from(name),
    }
}

/// Opens `dir` as the root of a pull: creates it when missing, refuses it when it is not an
/// empty directory.
pub fn open_empty_root(dir: &Path) -> anyhow::Result<Dir> {
    // DIR itself is the user's choice: a symlink to an empty directory is fine
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let mut entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
            if entries.next().is_some() {
                bail!("{} is not empty; pull into a new or empty directory", dir.display());
            }
        }
        Ok(_) => bail!("{} exists and is not a directory; pull into a new or empty directory", dir.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
    Dir::open_ambient_dir(dir, ambient_authority()).with_context(|| format!("cannot open {}", dir.display()))
}

/// Creates the directory `path` (its parent must exist), writable by us until
/// [`set_mode`] gives it its real mode.
pub fn create_dir(root: &Dir, path: &WsPath) -> anyhow::Result<()> {
    let mut b = DirBuilder::new();
    b.mode(0o700);
    root.create_dir_with(path.as_str(), &b).with_context(|| format!("cannot create directory {path}"))
}

/// Sets the permission bits of `path`.
pub fn set_mode(root: &Dir, path: &WsPath, mode: u32) -> anyhow::Result<()> {
    root.set_permissions(path.as_str(), Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {path}"))
}

/// A temporary file being filled for `path`; removed on drop unless [`TempFile::persist`]ed.
pub struct TempFile {
    root: Arc<Dir>,
    temp: PathBuf,
    target: WsPath,
    done: bool,
}

impl TempFile {
    /// Creates a new temporary file next to `target`.
    pub fn create(root: &Arc<Dir>, target: &WsPath) -> anyhow::Result<(Self, File)> {
        let temp = temp_path_for(target);
        let mut opts = OpenOptions::new();
        // readable too: a cache copy is verified by reading it back
        opts.read(true).write(true).create_new(true);
        let file =
            root.open_with(&temp, &opts).with_context(|| format!("cannot create a temporary file for {target}"))?;
        Ok((Self { root: Arc::clone(root), temp, target: target.clone(), done: false }, file))
    }

    /// The temporary path, relative to the root.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Gives `file` (this temp file's handle) `mode` and renames it to its target.
    pub fn persist(mut self, file: &File, mode: u32) -> anyhow::Result<()> {
        file.set_permissions(Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", self.target))?;
        self.root
            .rename(&self.temp, &self.root, self.target.as_str())
            .with_context(|| format!("cannot move {} into place", self.target))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.root.remove_file(&self.temp);
        }
    }
}

/// Writes `content` as the file `path` with `mode`, atomically.
pub fn write_file(root: &Arc<Dir>, path: &WsPath, content: &[u8], mode: u32) -> anyhow::Result<()> {
    let (temp, mut file) = TempFile::create(root, path)?;
    file.write_all(content).with_context(|| format!("cannot write {path}"))?;
    temp.persist(&file, mode)
}

/// Copies the file `from` (relative to the root) to `path` with `mode`, atomically.
pub fn copy_file(root: &Arc<Dir>, from: &Path, path: &WsPath, mode: u32) -> anyhow::Result<()> {
    let (temp, mut file) = TempFile::create(root, path)?;
    let mut src = root.open(from).with_context(|| format!("cannot open {}", from.display()))?;
    io::copy(&mut src, &mut file).with_context(|| format!("cannot copy {} to {path}", from.display()))?;
    temp.persist(&file, mode)
}

/// Creates the symlink `path` holding exactly `target` as its link text, atomically. The
/// link is never followed.
pub fn write_symlink(root: &Dir, path: &WsPath, target: &[u8]) -> anyhow::Result<()> {
    let temp = temp_path_for(path);
    root.symlink_contents(OsStr::from_bytes(target), &temp).with_context(|| format!("cannot create symlink {path}"))?;
    if let Err(e) = root.rename(&temp, root, path.as_str()) {
        let _ = root.remove_file(&temp);
        return Err(e).with_context(|| format!("cannot move symlink {path} into place"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt as _, symlink};

    use super::*;

    fn p(s: &str) -> WsPath {
        WsPath::new(s).unwrap()
    }

    #[test]
    fn writes_files_links_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Arc::new(open_empty_root(&tmp.path().join("new/deeper")).unwrap());
        create_dir(&root, &p("d")).unwrap();
        write_file(&root, &p("d/f"), b"hello", 0o640).unwrap();
        copy_file(&root, Path::new("d/f"), &p("g"), 0o755).unwrap();
        write_symlink(&root, &p("d/l"), b"../../../etc/passwd").unwrap();
        set_mode(&root, &p("d"), 0o555).unwrap();
        let base = tmp.path().join("new/deeper");
        assert_eq!(std::fs::read(base.join("d/f")).unwrap(), b"hello");
        assert_eq!(std::fs::read(base.join("g")).unwrap(), b"hello");
        assert_eq!(std::fs::metadata(base.join("d/f")).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::metadata(base.join("g")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::metadata(base.join("d")).unwrap().permissions().mode() & 0o777, 0o555);
        assert_eq!(std::fs::read_link(base.join("d/l")).unwrap(), Path::new("../../../etc/passwd"));
        let names: Vec<_> = std::fs::read_dir(base.join("d")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
        std::fs::set_permissions(base.join("d"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn refuses_non_empty_or_non_dir_roots() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        let err = open_empty_root(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("not empty"), "{err}");
        assert!(open_empty_root(&tmp.path().join("f")).is_err());
        assert!(open_empty_root(&tmp.path().join("ok")).is_ok());
    }

    /// Second line of defence: even if a symlink sat where a directory was expected, writes
    /// through it are refused by the kernel instead of landing outside the root.
    #[test]
    fn writes_through_symlinks_out_of_the_root_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let root_path = tmp.path().join("root");
        let root = Arc::new(open_empty_root(&root_path).unwrap());
        symlink(&outside, root_path.join("a")).unwrap();
        symlink("../outside", root_path.join("b")).unwrap();
        assert!(write_file(&root, &p("a/f"), b"x", 0o644).is_err());
        assert!(write_file(&root, &p("b/f"), b"x", 0o644).is_err());
        assert!(write_symlink(&root, &p("a/l"), b"x").is_err());
        assert!(create_dir(&root, &p("b/d")).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written outside");
    }
}
