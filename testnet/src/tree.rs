//! Test trees: the edge-case tree of the acceptance checks, node_modules-like trees, and a
//! comparison of two trees (content, permission bits, symlink targets, empty directories).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rand::{Rng, SeedableRng};

/// Sizes of the generated edge-case tree.
#[derive(Debug, Clone, Copy)]
pub struct EdgeTree {
    pub big_file_bytes: usize,
    pub small_files: usize,
}

/// Writes the edge-case tree: unicode and spaced names, nested and empty directories, an empty
/// file, executable files, relative / absolute / dangling symlinks, one big random file and
/// many small files, and the same content under two paths.
pub fn make_edge_tree(root: &Path, spec: EdgeTree) -> std::io::Result<()> {
    use std::fs;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    fs::create_dir_all(root.join("src/deep/er/still"))?;
    fs::create_dir_all(root.join("empty dir/nested empty"))?;
    fs::create_dir_all(root.join("ünïcødé"))?;
    fs::write(root.join("README.md"), "hello world\n")?;
    fs::write(root.join("empty.txt"), "")?;
    fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n")?;
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755))?;
    fs::write(root.join("ünïcødé/fïlé with spaces.txt"), "naïve\n")?;
    fs::write(root.join("src/dup-of-readme.md"), "hello world\n")?;
    fs::write(root.join("private.key"), "secret\n")?;
    fs::set_permissions(root.join("private.key"), fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::symlink("README.md", root.join("link-rel"))?;
    std::os::unix::fs::symlink("/etc/hostname", root.join("link-abs"))?;
    std::os::unix::fs::symlink("does/not/exist", root.join("link-dangling"))?;
    std::os::unix::fs::symlink("src/deep", root.join("link-to-dir"))?;
    let mut big = vec![0u8; spec.big_file_bytes];
    rng.fill(&mut big[..]);
    fs::write(root.join("big.bin"), &big)?;
    for i in 0..spec.small_files {
        let dir = root.join(format!("src/deep/er/still/pkg{}", i % 50));
        fs::create_dir_all(&dir)?;
        let n = rng.random_range(10..3000);
        let body: String = (0..n).map(|_| (b'a' + rng.random_range(0..26u8)) as char).collect();
        fs::write(dir.join(format!("m{i}.js")), format!("module {i}\n{body}\n"))?;
    }
    Ok(())
}

/// One path of a tree as compared: kind, permission bits, and content or link text.
#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    Dir(u32),
    File(u32, blake3::Hash, u64),
    Symlink(Vec<u8>),
}

/// Reads a whole tree (not following symlinks), skipping a top-level `.podfs` state folder.
pub fn read_tree(root: &Path) -> std::io::Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let path = e.path();
            let rel = path.strip_prefix(root).map_err(std::io::Error::other)?.to_string_lossy().into_owned();
            if rel == ".podfs" {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path)?;
            let mode = meta.permissions().mode() & 0o777;
            let node = if meta.file_type().is_symlink() {
                use std::os::unix::ffi::OsStrExt;
                Node::Symlink(std::fs::read_link(&path)?.as_os_str().as_bytes().to_vec())
            } else if meta.is_dir() {
                stack.push(path.clone());
                Node::Dir(mode)
            } else {
                let data = std::fs::read(&path)?;
                Node::File(mode, blake3::hash(&data), data.len() as u64)
            };
            out.insert(rel, node);
        }
    }
    Ok(out)
}

/// Panics with the first differences when two trees are not identical.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let a = read_tree(expected).expect("read expected tree");
    let b = read_tree(actual).expect("read actual tree");
    let mut diffs = Vec::new();
    for (p, n) in &a {
        match b.get(p) {
            None => diffs.push(format!("missing {p}")),
            Some(m) if m != n => diffs.push(format!("differs {p}: {n:?} vs {m:?}")),
            _ => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        diffs.push(format!("extra {p}"));
    }
    assert!(diffs.is_empty(), "{} differences, first: {:#?}", diffs.len(), &diffs[..diffs.len().min(10)]);
}
