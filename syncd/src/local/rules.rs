//! Which paths belong to the workspace: `.podfsignore` files (gitignore syntax, one may sit in
//! any directory) over a short list of built-in defaults, and never the top-level `.podfs`.
//!
//! Precedence follows git: for each path component from the top, the deepest `.podfsignore` with
//! a matching pattern decides (`!pattern` re-includes); when none matches, the defaults decide;
//! an ignored directory hides everything below it. `push` and `syncd` both walk trees through
//! [`Rules`], so they agree on what is uploaded.
//!
//! Written on `ignore::gitignore` rather than `ignore::WalkBuilder` because syncd must ask about
//! one path at a time (a watcher event) with the same answer a walk gives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// Name of the ignore files (gitignore syntax).
pub const IGNORE_FILE: &str = ".podfsignore";
pub use super::state::STATE_DIR;

/// Built-in patterns, lowest precedence (a `.podfsignore` can re-include with `!`): only files
/// an editor or podfs creates for the length of an edit and removes again. Persistent files
/// are never dropped by default, whatever they look like: published packages ship backups such
/// as `.Readme.md.un~` or `.DS_Store`, and a restore must give back the tree that was on disk.
/// Ignoring those is the user's call (`.podfsignore`).
pub const DEFAULT_IGNORES: &[&str] = &[
    // vim swap files (hidden, next to the file being edited)
    ".*.sw[a-p]",
    ".*.swx",
    // emacs: lock symlinks and auto-save files (removed when the buffer is saved)
    ".#*",
    "\\#*#",
    // JetBrains safe-write temporaries, Kate swap files
    "*___jb_tmp___",
    "*___jb_old___",
    ".*.kate-swp",
    // podfs's own temporary files (a pull or syncd writing in place)
    ".podfs-tmp-*",
];

/// The ignore rules of one tree, with each directory's `.podfsignore` read once and kept until
/// [`Rules::forget`].
pub struct Rules {
    root: PathBuf,
    defaults: Gitignore,
    /// Directory (workspace path, "" for the root) -> its parsed `.podfsignore`, if any.
    dirs: HashMap<String, Option<Arc<Gitignore>>>,
    /// Problems met reading ignore files (bad patterns, unreadable files), for the log.
    pub warnings: Vec<String>,
}

impl Rules {
    pub fn new(root: &Path) -> Self {
        let mut b = GitignoreBuilder::new(root);
        for line in DEFAULT_IGNORES {
            // the defaults are constants: a bad one is a bug caught by the tests
            b.add_line(None, line).expect("valid default ignore pattern");
        }
        let defaults = b.build().expect("valid default ignore patterns");
        Self { root: root.to_path_buf(), defaults, dirs: HashMap::new(), warnings: Vec::new() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Drops every cached ignore file (one was created, changed or removed).
    pub fn forget(&mut self) {
        self.dirs.clear();
    }

    /// Whether the workspace path `rel` ("a/b/c", never empty) is excluded from the tree.
    /// `is_dir` tells whether `rel` itself is a directory.
    pub fn is_ignored(&mut self, rel: &str, is_dir: bool) -> bool {
        let parts: Vec<&str> = rel.split('/').collect();
        if parts.first() == Some(&STATE_DIR) {
            return true;
        }
        let mut end = 0;
        for (i, part) in parts.iter().enumerate() {
            let parent_end = end;
            end = if i == 0 { part.len() } else { end + 1 + part.len() };
            let last = i + 1 == parts.len();
            if self.decides_ignored(&rel[..end], &rel[..parent_end], !last || is_dir) {
                return true;
            }
        }
        false
    }

    /// Whether `path` is ignored by the rules that apply at its level: the ignore files of
    /// `parent` and its ancestors (deepest first), then the defaults. Its ancestors are known
    /// not to be ignored.
    fn decides_ignored(&mut self, path: &str, parent: &str, is_dir: bool) -> bool {
        let abs = self.root.join(path);
        let mut dir = Some(parent);
        while let Some(d) = dir {
            if let Some(g) = self.dir_rules(d) {
                match g.matched(&abs, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
            dir = if d.is_empty() { None } else { Some(d.rfind('/').map_or("", |i| &d[..i])) };
        }
        self.defaults.matched(&abs, is_dir).is_ignore()
    }

    /// The parsed `.podfsignore` of directory `dir` ("" for the root), read on first use.
    fn dir_rules(&mut self, dir: &str) -> Option<Arc<Gitignore>> {
        if let Some(g) = self.dirs.get(dir) {
            return g.clone();
        }
        let dir_abs = if dir.is_empty() { self.root.clone() } else { self.root.join(dir) };
        let file = dir_abs.join(IGNORE_FILE);
        let parsed = if file.is_file() {
            let mut b = GitignoreBuilder::new(&dir_abs);
            if let Some(e) = b.add(&file) {
                self.warnings.push(format!("{}: {e}", file.display()));
            }
            match b.build() {
                Ok(g) => Some(Arc::new(g)),
                Err(e) => {
                    self.warnings.push(format!("{}: {e}", file.display()));
                    None
                }
            }
        } else {
            None
        };
        self.dirs.insert(dir.to_string(), parsed.clone());
        parsed
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn defaults_hide_editor_litter_and_can_be_overridden() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = Rules::new(tmp.path());
        for p in [".main.rs.swp", "src/.x.swo", ".#main.rs", "src/#main.rs#", "a___jb_tmp___", ".podfs-tmp-1-2"] {
            assert!(r.is_ignored(p, false), "{p}");
        }
        // persistent files are the user's, whatever their names look like
        let kept =
            ["main.rs", ".gitignore", "swp", "a#b", "notes.txt~", ".Readme.md.un~", "4913", ".DS_Store", "x.swp"];
        for p in kept {
            assert!(!r.is_ignored(p, false), "{p}");
        }
        fs::write(tmp.path().join(IGNORE_FILE), "!.keep.swp\n*~\n").unwrap();
        r.forget();
        assert!(!r.is_ignored(".keep.swp", false));
        assert!(r.is_ignored(".other.swp", false));
        assert!(r.is_ignored("notes.txt~", false), "backups are ignored when the user says so");
    }

    #[test]
    fn state_dir_is_always_out_at_the_top_only() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(IGNORE_FILE), "!.podfs\n").unwrap();
        let mut r = Rules::new(tmp.path());
        assert!(r.is_ignored(".podfs", true));
        assert!(r.is_ignored(".podfs/index.sqlite", false));
        assert!(!r.is_ignored("sub/.podfs", true));
    }

    #[test]
    fn deeper_files_win_and_ignored_dirs_hide_their_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join(IGNORE_FILE), "*.log\nbuild/\n/top-only\n").unwrap();
        fs::write(root.join("a").join(IGNORE_FILE), "!keep.log\n").unwrap();
        fs::write(root.join("a/b").join(IGNORE_FILE), "keep.log\n").unwrap();
        let mut r = Rules::new(root);
        assert!(r.is_ignored("x.log", false));
        assert!(!r.is_ignored("a/keep.log", false), "re-included one level down");
        assert!(r.is_ignored("a/b/keep.log", false), "ignored again two levels down");
        assert!(r.is_ignored("a/other.log", false));
        assert!(r.is_ignored("build", true));
        assert!(!r.is_ignored("build", false), "`build/` matches directories only");
        assert!(r.is_ignored("a/build/deep/file.rs", false), "everything below an ignored directory");
        assert!(r.is_ignored("top-only", false));
        assert!(!r.is_ignored("a/top-only", false), "anchored to the directory of its file");
    }
}
