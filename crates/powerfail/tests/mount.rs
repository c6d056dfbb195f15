//! The filesystem through real system calls: what survives a power cut, and EIO on demand.
//! Needs root and /dev/fuse; without them these tests fail (with the reason), never skip.

use powerfail::{Fault, PowerFail};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

fn mounted() -> (tempfile::TempDir, PowerFail) {
    if let Some(why) = powerfail::unavailable() {
        panic!("{why}");
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let pf = PowerFail::mount(&mnt).expect("mounting powerfail");
    (dir, pf)
}

fn read(path: &std::path::Path) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path).ok()?.read_to_end(&mut v).unwrap();
    Some(v)
}

#[test]
fn only_what_was_synced_survives_a_power_cut() {
    let (_dir, mut pf) = mounted();
    let root = pf.path().to_path_buf();
    let d = root.join("data");
    fs::create_dir(&d).unwrap();
    // Synced file (its entry, and the path to it, durable with it).
    let mut f = File::create(d.join("kept")).unwrap();
    f.write_all(b"first").unwrap();
    f.sync_all().unwrap();
    f.write_all(b" and more, never synced").unwrap();
    drop(f);
    // Never synced.
    fs::write(d.join("lost"), b"gone").unwrap();
    // Data synced, rename not (no fsync of the directory).
    let mut t = File::create(d.join("r.tmp")).unwrap();
    t.write_all(b"renamed").unwrap();
    t.sync_all().unwrap();
    drop(t);
    fs::rename(d.join("r.tmp"), d.join("r")).unwrap();
    // fdatasync of a file written in place.
    let w = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(d.join("wal"))
        .unwrap();
    w.write_all_at(&[1u8; 10_000], 0).unwrap();
    w.sync_data().unwrap();
    w.write_all_at(&[2u8; 100], 4096).unwrap();
    drop(w);
    assert_eq!(read(&d.join("lost")).unwrap(), b"gone");

    pf.cut_power().unwrap();
    assert_eq!(read(&d.join("kept")).unwrap(), b"first");
    assert_eq!(read(&d.join("lost")), None);
    assert_eq!(read(&d.join("r")), None);
    assert_eq!(read(&d.join("r.tmp")).unwrap(), b"renamed");
    assert_eq!(read(&d.join("wal")).unwrap(), vec![1u8; 10_000]);

    // A synced directory keeps its entries (the files' data only as far as it was synced).
    fs::rename(d.join("r.tmp"), d.join("r")).unwrap();
    fs::write(d.join("empty"), b"unsynced data").unwrap();
    File::open(&d).unwrap().sync_all().unwrap();
    pf.cut_power().unwrap();
    assert_eq!(read(&d.join("r")).unwrap(), b"renamed");
    assert_eq!(read(&d.join("r.tmp")), None);
    assert_eq!(read(&d.join("empty")).unwrap(), b"");
    assert_eq!(pf.stats().cuts, 2);
}

#[test]
fn write_and_fsync_fail_with_eio_on_demand() {
    let (_dir, pf) = mounted();
    let p = pf.path().join("state.db-wal");
    let mut f = File::create(&p).unwrap();
    f.write_all(b"ok").unwrap();
    pf.fail(Fault {
        fsync: true,
        prefix: "state.db".into(),
        ..Fault::default()
    });
    let other = File::create(pf.path().join("other")).unwrap();
    other.sync_all().expect("only the named files fail");
    assert_eq!(f.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
    f.write_all(b"writes still work").unwrap();
    pf.fail(Fault {
        write: true,
        prefix: "state.db".into(),
        once: true,
        ..Fault::default()
    });
    assert_eq!(
        f.write_all(b"x").unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    f.write_all(b"once").unwrap();
    f.sync_all().unwrap();
    assert!(pf.first_failure().is_some());
    pf.heal();
    f.sync_all().unwrap();
    assert_eq!(pf.stats().failures, 2);
}
