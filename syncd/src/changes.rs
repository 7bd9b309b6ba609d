//! The change list that turns one tree into another. Pure: works on sorted entry lists.

use std::cmp::Ordering;

use podfs_protocol::api::DiffEntry;
use podfs_protocol::{Change, Entry};

/// The changes that turn `remote` into `local`. Both lists must be sorted by path with no
/// duplicates (as scans and manifests are).
///
/// A path present only locally, or present in both with a different kind, content or mode, is
/// a `Put`; a path present only remotely is a `Delete` (every vanished path gets its own
/// delete, children included). Deletes come first, deepest first, then puts in path order, so
/// parents are put before their children.
pub fn compute_changes(local: &[Entry], remote: &[Entry]) -> Vec<Change> {
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    let (mut l, mut r) = (local.iter().peekable(), remote.iter().peekable());
    loop {
        match (l.peek(), r.peek()) {
            (None, None) => break,
            (Some(_), None) => puts.extend(l.by_ref().cloned()),
            (None, Some(_)) => deletes.extend(r.by_ref().map(|e| e.path.clone())),
            (Some(a), Some(b)) => match a.path.as_str().cmp(b.path.as_str()) {
                Ordering::Less => puts.extend(l.next().cloned()),
                Ordering::Greater => deletes.extend(r.next().map(|e| e.path.clone())),
                Ordering::Equal => {
                    if !a.same_content(b) {
                        puts.push((*a).clone());
                    }
                    l.next();
                    r.next();
                }
            },
        }
    }
    deletes.reverse();
    deletes.into_iter().map(Change::Delete).chain(puts.into_iter().map(Change::Put)).collect()
}

/// The changes a diff (`from` -> `to`) stands for: forward they turn `from` into `to`, backward
/// `to` into `from`. Ordered as [`compute_changes`] orders them.
pub fn changes_of_diff(diff: &[DiffEntry], forward: bool) -> Vec<Change> {
    let sorted = |pick: fn(&DiffEntry) -> Option<&Entry>| {
        let mut v: Vec<Entry> = diff.iter().filter_map(pick).cloned().collect();
        v.sort_by(|a, b| a.path.as_str().cmp(b.path.as_str()));
        v
    };
    let (old, new) = (sorted(|d| d.old.as_ref()), sorted(|d| d.new.as_ref()));
    if forward { compute_changes(&new, &old) } else { compute_changes(&old, &new) }
}

/// Applies `changes` to a sorted tree (test oracle and sanity check): the resulting sorted tree.
pub fn apply_changes(tree: &[Entry], changes: &[Change]) -> Vec<Entry> {
    let mut map: std::collections::BTreeMap<String, Entry> =
        tree.iter().map(|e| (e.path.as_str().to_string(), e.clone())).collect();
    for c in changes {
        match c {
            Change::Put(e) => {
                map.insert(e.path.as_str().to_string(), e.clone());
            }
            Change::Delete(p) => {
                map.remove(p.as_str());
            }
        }
    }
    map.into_values().collect()
}

#[cfg(test)]
mod tests {
    use podfs_protocol::{ContentHash, EntryKind, WsPath};
    use proptest::prelude::*;

    use super::*;

    fn file(p: &str, content: &[u8], mode: u32) -> Entry {
        Entry {
            path: WsPath::new(p).unwrap(),
            kind: EntryKind::File,
            hash: Some(ContentHash::of(content)),
            size: content.len() as u64,
            mode,
        }
    }
    fn dir(p: &str, mode: u32) -> Entry {
        Entry { path: WsPath::new(p).unwrap(), kind: EntryKind::Dir, hash: None, size: 0, mode }
    }
    fn link(p: &str, target: &str) -> Entry {
        Entry {
            path: WsPath::new(p).unwrap(),
            kind: EntryKind::Symlink,
            hash: Some(ContentHash::of(target.as_bytes())),
            size: target.len() as u64,
            mode: 0o777,
        }
    }
    fn sorted(mut v: Vec<Entry>) -> Vec<Entry> {
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }
    fn del(p: &str) -> Change {
        Change::Delete(WsPath::new(p).unwrap())
    }

    #[test]
    fn a_diff_runs_both_ways() {
        use podfs_protocol::api::{DiffEntry, DiffKind};
        let d = |path: &str, change, old: Option<Entry>, new: Option<Entry>| DiffEntry {
            path: path.to_string(),
            change,
            old,
            new,
        };
        let diff = vec![
            d("a", DiffKind::Added, None, Some(dir("a", 0o755))),
            d("a/f", DiffKind::Added, None, Some(file("a/f", b"new", 0o644))),
            d("m", DiffKind::Modified, Some(file("m", b"1", 0o644)), Some(file("m", b"2", 0o644))),
            d("z", DiffKind::Deleted, Some(link("z", "t")), None),
        ];
        let old = vec![file("m", b"1", 0o644), link("z", "t")];
        let new = vec![dir("a", 0o755), file("a/f", b"new", 0o644), file("m", b"2", 0o644)];
        assert_eq!(changes_of_diff(&diff, true), compute_changes(&new, &old));
        assert_eq!(apply_changes(&old, &changes_of_diff(&diff, true)), new);
        assert_eq!(apply_changes(&new, &changes_of_diff(&diff, false)), old);
        let back = changes_of_diff(&diff, false);
        assert!(matches!(&back[0], Change::Delete(p) if p.as_str() == "a/f"), "children first: {back:?}");
    }

    #[test]
    fn identical_trees_have_no_changes() {
        let t = sorted(vec![dir("a", 0o755), file("a/x", b"1", 0o644), link("l", "a/x")]);
        assert!(compute_changes(&t, &t).is_empty());
    }

    #[test]
    fn empty_remote_puts_everything_in_order() {
        let t = sorted(vec![dir("a", 0o755), file("a/x", b"1", 0o644), dir("a/b", 0o700)]);
        let c = compute_changes(&t, &[]);
        assert_eq!(c, t.iter().cloned().map(Change::Put).collect::<Vec<_>>());
    }

    #[test]
    fn content_and_mode_changes_and_deletes() {
        let remote = sorted(vec![
            dir("d", 0o755),
            file("d/a", b"old", 0o644),
            file("d/exec", b"x", 0o644),
            file("gone", b"g", 0o644),
            dir("gonedir", 0o755),
            file("gonedir/f", b"f", 0o644),
        ]);
        let local = sorted(vec![
            dir("d", 0o700),
            file("d/a", b"new", 0o644),
            file("d/exec", b"x", 0o755),
            file("new", b"n", 0o600),
        ]);
        let c = compute_changes(&local, &remote);
        assert_eq!(
            c,
            vec![
                del("gonedir/f"),
                del("gonedir"),
                del("gone"),
                Change::Put(dir("d", 0o700)),
                Change::Put(file("d/a", b"new", 0o644)),
                Change::Put(file("d/exec", b"x", 0o755)),
                Change::Put(file("new", b"n", 0o600)),
            ]
        );
        assert_eq!(apply_changes(&remote, &c), local);
    }

    #[test]
    fn file_dir_replacement_both_ways() {
        let remote = sorted(vec![file("a", b"file", 0o644), dir("b", 0o755), file("b/x", b"x", 0o644)]);
        let local = sorted(vec![dir("a", 0o755), file("a/y", b"y", 0o644), file("b", b"now a file", 0o644)]);
        let c = compute_changes(&local, &remote);
        assert_eq!(
            c,
            vec![
                del("b/x"),
                Change::Put(dir("a", 0o755)),
                Change::Put(file("a/y", b"y", 0o644)),
                Change::Put(file("b", b"now a file", 0o644)),
            ]
        );
        assert_eq!(apply_changes(&remote, &c), local);
    }

    #[test]
    fn symlink_changes() {
        let remote = sorted(vec![link("l", "a"), link("m", "x"), file("n", b"a", 0o644)]);
        let local = sorted(vec![link("l", "b"), file("m", b"x", 0o644), link("n", "a")]);
        let c = compute_changes(&local, &remote);
        assert_eq!(c.len(), 3, "target change, symlink->file with the same bytes, file->symlink");
        assert!(c.iter().all(|c| matches!(c, Change::Put(_))));
    }

    fn arb_tree() -> impl Strategy<Value = Vec<Entry>> {
        let names = prop::sample::select(vec!["a", "b", "a.b", "c", "a-"]);
        let entry = (prop::collection::vec(names, 1..4), 0u8..4, 0u8..3).prop_map(|(parts, kind, content)| {
            let p = parts.join("/");
            match kind {
                0 => dir(&p, 0o755),
                1 => file(&p, &[content], 0o644),
                2 => file(&p, &[content], 0o755),
                _ => link(&p, &content.to_string()),
            }
        });
        prop::collection::vec(entry, 0..20).prop_map(|v| {
            let mut m = std::collections::BTreeMap::new();
            for e in v {
                m.insert(e.path.as_str().to_string(), e);
            }
            m.into_values().collect()
        })
    }

    proptest! {
        #[test]
        fn changes_turn_remote_into_local(local in arb_tree(), remote in arb_tree()) {
            let c = compute_changes(&local, &remote);
            prop_assert_eq!(apply_changes(&remote, &c), local.clone());
            let mut paths: Vec<_> = c.iter().map(|c| c.path().as_str().to_string()).collect();
            let n = paths.len();
            paths.sort();
            paths.dedup();
            prop_assert_eq!(paths.len(), n, "each path at most once");
            prop_assert!(compute_changes(&local, &local).is_empty());
        }
    }
}
