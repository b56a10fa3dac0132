//! The wipe environment's work: before a released machine registers in `wipe` mode, the
//! start and the end of every disk are overwritten with zeros. That is where partition
//! tables (MBR, GPT and GPT's backup header), filesystem superblocks and RAID or LVM
//! signatures live, so the next cluster's installer finds blank disks and nothing of the
//! last one boots by accident. It is not a secure erase: data blocks in between stay.
//!
//! A disk that cannot be wiped fails the whole wipe: the agent must never report a
//! machine clean that is not.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use crate::registration::Disk;

/// Bytes zeroed at each end of a disk.
pub const WIPE_BYTES: u64 = 1 << 20;

/// One disk that could not be wiped.
#[derive(Debug, thiserror::Error)]
#[error("cannot wipe {device}: {source}")]
pub struct WipeError {
    pub device: String,
    #[source]
    pub source: std::io::Error,
}

/// Zeroes the first and last [`WIPE_BYTES`] of each disk's device node under `root`
/// (`/dev/<name>`). Returns the devices wiped.
pub fn wipe_disks(root: &Path, disks: &[Disk]) -> Result<Vec<String>, WipeError> {
    let mut done = Vec::new();
    for d in disks {
        let device = root.join("dev").join(&d.name);
        let shown = device.display().to_string();
        wipe_one(&device).map_err(|source| WipeError {
            device: shown.clone(),
            source,
        })?;
        done.push(shown);
    }
    Ok(done)
}

fn wipe_one(device: &Path) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(device)?;
    let len = f.seek(SeekFrom::End(0))?;
    let head = WIPE_BYTES.min(len);
    let zeros = vec![0u8; head as usize];
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&zeros)?;
    let tail = len.saturating_sub(WIPE_BYTES).max(head);
    f.seek(SeekFrom::Start(tail))?;
    f.write_all(&zeros[..(len - tail) as usize])?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_are_zeroed_and_the_middle_kept() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("dev")).unwrap();
        let len = 3 * WIPE_BYTES as usize + 17;
        std::fs::write(root.path().join("dev/vda"), vec![0xa5u8; len]).unwrap();
        let small = 1000;
        std::fs::write(root.path().join("dev/vdb"), vec![0x5au8; small]).unwrap();
        let disks = [
            Disk {
                name: "vda".into(),
                ..Default::default()
            },
            Disk {
                name: "vdb".into(),
                ..Default::default()
            },
        ];
        let done = wipe_disks(root.path(), &disks).unwrap();
        assert_eq!(done.len(), 2);
        let a = std::fs::read(root.path().join("dev/vda")).unwrap();
        let w = WIPE_BYTES as usize;
        assert_eq!(a.len(), len, "the disk keeps its size");
        assert!(a[..w].iter().all(|b| *b == 0), "the start is zero");
        assert!(a[len - w..].iter().all(|b| *b == 0), "the end is zero");
        assert!(
            a[w..len - w].iter().all(|b| *b == 0xa5),
            "the middle is kept"
        );
        let b = std::fs::read(root.path().join("dev/vdb")).unwrap();
        assert!(
            b.len() == small && b.iter().all(|x| *x == 0),
            "a small disk is zeroed whole"
        );
        let missing = [Disk {
            name: "vdz".into(),
            ..Default::default()
        }];
        let err = wipe_disks(root.path(), &missing).unwrap_err();
        assert!(err.to_string().contains("vdz"), "{err}");
    }
}
