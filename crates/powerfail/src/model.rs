//! The filesystem's state: per inode what it holds now and what would survive a power cut.
//!
//! * A file's durable content is what the last `fsync`/`fdatasync` of that file saw.
//! * A directory's durable entries are what the last `fsync` of that directory saw; an `fsync`
//!   of a file (or directory) also makes durable the entries that lead to it from the root (as
//!   ext4 and XFS do for a new file), nothing else of those directories.
//! * Modes, owners and times are kept as they are set (not modelled as volatile).
//! * A power cut: every file gets its durable content back, every directory its durable entries;
//!   whatever is no longer reachable from the root is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::time::{Instant, SystemTime};

pub const ROOT: u64 = 1;
const BLOCK: usize = 4096;

#[derive(Debug)]
pub enum Kind {
    File(FileData),
    Dir(DirData),
}

#[derive(Debug, Default)]
pub struct FileData {
    pub data: Vec<u8>,
    durable: Vec<u8>,
    /// Blocks written since the last sync.
    dirty: BTreeSet<usize>,
    /// The smallest length the file had since the last sync (a truncate then a write must not
    /// let old bytes beyond the truncation survive).
    min_len: usize,
}

#[derive(Debug, Default)]
pub struct DirData {
    pub entries: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    pub parent: u64,
}

#[derive(Debug)]
pub struct Inode {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// The name it was last given (for faults that pick files by name).
    pub name: OsString,
}

/// Which operations fail with EIO, on files whose name starts with `prefix` (or, with `exact`,
/// is `prefix`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fault {
    pub write: bool,
    pub fsync: bool,
    pub prefix: String,
    pub exact: bool,
    /// Only the first matching operation fails; later ones succeed again.
    pub once: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub writes: u64,
    pub fsyncs: u64,
    pub failures: u64,
    pub cuts: u64,
}

#[derive(Debug)]
pub struct Model {
    pub inodes: BTreeMap<u64, Inode>,
    next: u64,
    pub fault: Option<Fault>,
    pub first_failure: Option<Instant>,
    pub stats: Stats,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Inode {
    fn new(kind: Kind, perm: u16, uid: u32, gid: u32, name: &OsStr) -> Self {
        let now = SystemTime::now();
        Inode {
            kind,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            name: name.to_owned(),
        }
    }

    pub fn size(&self) -> u64 {
        match &self.kind {
            Kind::File(f) => f.data.len() as u64,
            Kind::Dir(_) => 0,
        }
    }
}

impl FileData {
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        let end = offset + bytes.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[offset..end].copy_from_slice(bytes);
        if !bytes.is_empty() {
            self.dirty.extend(offset / BLOCK..=(end - 1) / BLOCK);
        }
    }

    pub fn truncate(&mut self, len: usize) {
        self.data.resize(len, 0);
        self.min_len = self.min_len.min(len);
    }

    fn sync(&mut self) {
        let len = self.data.len();
        self.durable.truncate(self.min_len);
        self.durable.resize(len, 0);
        for b in std::mem::take(&mut self.dirty) {
            let start = b * BLOCK;
            if start < len {
                let end = (start + BLOCK).min(len);
                self.durable[start..end].copy_from_slice(&self.data[start..end]);
            }
        }
        self.min_len = len;
    }

    fn cut(&mut self) {
        self.data = self.durable.clone();
        self.dirty.clear();
        self.min_len = self.data.len();
    }
}

impl Model {
    pub fn new() -> Self {
        let mut inodes = BTreeMap::new();
        let root = Inode::new(
            Kind::Dir(DirData {
                parent: ROOT,
                ..DirData::default()
            }),
            0o755,
            0,
            0,
            OsStr::new(""),
        );
        inodes.insert(ROOT, root);
        Model {
            inodes,
            next: ROOT + 1,
            fault: None,
            first_failure: None,
            stats: Stats::default(),
        }
    }

    pub fn dir(&self, ino: u64) -> Option<&DirData> {
        match &self.inodes.get(&ino)?.kind {
            Kind::Dir(d) => Some(d),
            Kind::File(_) => None,
        }
    }

    pub fn dir_mut(&mut self, ino: u64) -> Option<&mut DirData> {
        match &mut self.inodes.get_mut(&ino)?.kind {
            Kind::Dir(d) => Some(d),
            Kind::File(_) => None,
        }
    }

    pub fn file_mut(&mut self, ino: u64) -> Option<&mut FileData> {
        match &mut self.inodes.get_mut(&ino)?.kind {
            Kind::File(f) => Some(f),
            Kind::Dir(_) => None,
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.dir(parent)?.entries.get(name).copied()
    }

    /// Adds a new inode under `parent` (which must be a directory without `name`).
    pub fn add(
        &mut self,
        parent: u64,
        name: &OsStr,
        dir: bool,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> u64 {
        let ino = self.next;
        self.next += 1;
        let kind = if dir {
            Kind::Dir(DirData {
                parent,
                ..DirData::default()
            })
        } else {
            Kind::File(FileData::default())
        };
        self.inodes
            .insert(ino, Inode::new(kind, perm, uid, gid, name));
        if let Some(d) = self.dir_mut(parent) {
            d.entries.insert(name.to_owned(), ino);
        }
        self.touch(parent);
        ino
    }

    pub fn touch(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            let now = SystemTime::now();
            i.mtime = now;
            i.ctime = now;
        }
    }

    /// Whether `op` ("write" or "fsync") on `ino` fails now; records the failure.
    pub fn fails(&mut self, ino: u64, fsync: bool) -> bool {
        let Some(fault) = &self.fault else {
            return false;
        };
        let applies = if fsync { fault.fsync } else { fault.write };
        let named = self.inodes.get(&ino).is_some_and(|i| {
            let name = i.name.to_string_lossy();
            if fault.exact {
                name == fault.prefix.as_str()
            } else {
                name.starts_with(&fault.prefix)
            }
        });
        if !(applies && named) {
            return false;
        }
        if fault.once {
            self.fault = None;
        }
        self.stats.failures += 1;
        self.first_failure.get_or_insert_with(Instant::now);
        true
    }

    /// `fsync` of `ino`: its content (a file's bytes, a directory's entries) and the entries that
    /// lead to it from the root become durable.
    pub fn sync(&mut self, ino: u64) {
        self.stats.fsyncs += 1;
        match self.inodes.get_mut(&ino).map(|i| &mut i.kind) {
            Some(Kind::File(f)) => f.sync(),
            Some(Kind::Dir(d)) => d.durable = d.entries.clone(),
            None => return,
        }
        // The entries naming it (a file may be linked from one directory only here).
        let parents: Vec<(u64, OsString)> = self
            .inodes
            .iter()
            .filter_map(|(&p, i)| match &i.kind {
                Kind::Dir(d) => d
                    .entries
                    .iter()
                    .find(|&(_, &c)| c == ino)
                    .map(|(n, _)| (p, n.clone())),
                Kind::File(_) => None,
            })
            .collect();
        for (parent, name) in parents {
            self.persist_entry(parent, &name, ino);
        }
    }

    /// Makes `parent/name -> child` durable, and the path from the root to `parent`.
    fn persist_entry(&mut self, mut parent: u64, name: &OsStr, child: u64) {
        let mut name = name.to_owned();
        let mut child = child;
        loop {
            let Some(d) = self.dir_mut(parent) else {
                return;
            };
            d.durable.insert(name.clone(), child);
            if parent == ROOT {
                return;
            }
            let grand = d.parent;
            let Some(n) = self.dir(grand).and_then(|g| {
                g.entries
                    .iter()
                    .find(|&(_, &c)| c == parent)
                    .map(|(n, _)| n.clone())
            }) else {
                return;
            };
            name = n;
            child = parent;
            parent = grand;
        }
    }

    /// The power cut: only what was synced is left.
    pub fn cut(&mut self) {
        self.stats.cuts += 1;
        for i in self.inodes.values_mut() {
            match &mut i.kind {
                Kind::File(f) => f.cut(),
                Kind::Dir(d) => d.entries = d.durable.clone(),
            }
        }
        // Keep what the root reaches; fix each directory's parent.
        let mut keep = BTreeSet::new();
        let mut todo = vec![(ROOT, ROOT)];
        while let Some((ino, parent)) = todo.pop() {
            if !keep.insert(ino) {
                continue;
            }
            if let Some(d) = self.dir_mut(ino) {
                d.parent = parent;
                todo.extend(d.entries.values().map(|&c| (c, ino)));
            }
        }
        self.inodes.retain(|ino, _| keep.contains(ino));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(m: &mut Model, parent: u64, name: &str) -> u64 {
        m.add(parent, OsStr::new(name), false, 0o644, 0, 0)
    }

    fn content(m: &Model, parent: u64, name: &str) -> Option<Vec<u8>> {
        let ino = m.lookup(parent, OsStr::new(name))?;
        match &m.inodes[&ino].kind {
            Kind::File(f) => Some(f.data.clone()),
            Kind::Dir(_) => None,
        }
    }

    #[test]
    fn unsynced_files_and_entries_are_lost() {
        let mut m = Model::new();
        let d = m.add(ROOT, OsStr::new("d"), true, 0o755, 0, 0);
        let a = file(&mut m, d, "a");
        m.file_mut(a).unwrap().write(0, b"synced");
        m.sync(a);
        m.file_mut(a).unwrap().write(0, b"LOST!!");
        let b = file(&mut m, d, "b");
        m.file_mut(b).unwrap().write(0, b"never synced");
        m.cut();
        assert_eq!(content(&m, d, "a").unwrap(), b"synced");
        assert_eq!(content(&m, d, "b"), None, "b's entry was never synced");
    }

    #[test]
    fn a_synced_directory_keeps_entries_of_unsynced_files_empty() {
        let mut m = Model::new();
        let a = file(&mut m, ROOT, "a");
        m.file_mut(a).unwrap().write(0, b"data");
        m.sync(ROOT);
        m.cut();
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"");
    }

    #[test]
    fn truncate_then_write_keeps_no_old_bytes() {
        let mut m = Model::new();
        let a = file(&mut m, ROOT, "a");
        m.file_mut(a).unwrap().write(0, &[7u8; 10_000]);
        m.sync(a);
        m.file_mut(a).unwrap().truncate(0);
        m.file_mut(a).unwrap().write(8192, b"x");
        m.sync(a);
        m.cut();
        let c = content(&m, ROOT, "a").unwrap();
        assert_eq!(c.len(), 8193);
        assert!(c[..8192].iter().all(|&b| b == 0));
    }

    #[test]
    fn rename_is_durable_only_with_its_directory() {
        let mut m = Model::new();
        let t = file(&mut m, ROOT, "t.tmp");
        m.file_mut(t).unwrap().write(0, b"new");
        m.sync(t);
        let d = m.dir_mut(ROOT).unwrap();
        d.entries.remove(OsStr::new("t.tmp"));
        d.entries.insert("t".into(), t);
        m.cut();
        assert_eq!(content(&m, ROOT, "t"), None);
        assert_eq!(content(&m, ROOT, "t.tmp").unwrap(), b"new");
    }

    #[test]
    fn faults_pick_files_by_name_and_once_fails_one_operation() {
        let mut m = Model::new();
        let a = file(&mut m, ROOT, "state.db-wal");
        let b = file(&mut m, ROOT, "other");
        m.fault = Some(Fault {
            fsync: true,
            prefix: "state.db".into(),
            once: true,
            ..Fault::default()
        });
        assert!(!m.fails(b, true));
        assert!(!m.fails(a, false));
        let exact = Fault {
            exact: true,
            ..m.fault.clone().unwrap()
        };
        let db = file(&mut m, ROOT, "state.db");
        m.fault = Some(exact);
        assert!(!m.fails(a, true), "state.db-wal is not exactly state.db");
        assert!(m.fails(db, true));
        m.fault = Some(Fault {
            fsync: true,
            prefix: "state.db".into(),
            once: true,
            ..Fault::default()
        });
        assert!(m.fails(a, true));
        assert!(!m.fails(a, true));
        assert_eq!(m.stats.failures, 2);
        assert!(m.first_failure.is_some());
    }
}
