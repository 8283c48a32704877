//! Power cuts under a process's files: `tests/powercut/powercut.c`, an `LD_PRELOAD` library, journals the bytes
//! each write or truncation of the watched files replaces until the next `fsync` of that file; after the process
//! is killed with SIGKILL (the page cache, hence the files, stay as they were), [`PowerCut::cut`] plays the
//! journals backwards and leaves what a power cut would have: every write since the file's last sync lost
//! ([`Keep::Nothing`]), or only a random later part of them ([`Keep::RandomPrefix`]: the disk wrote the first
//! writes in order, then lost power); a watched file created since its directory was last synced is removed.
//!
//! The library is built from source with the machine's C compiler (`cc`). It works on dynamically linked
//! binaries (the workspace's native build): a static binary ignores `LD_PRELOAD`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What survives of the writes since a file's last sync.
#[derive(Clone, Copy, Debug)]
pub enum Keep {
    /// None of them.
    Nothing,
    /// The first k of them, k drawn per file from 0..=n.
    RandomPrefix,
}

/// What a cut undid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Undone {
    /// Writes and truncations undone.
    pub writes: usize,
    /// Of those, to the database and its WAL (not the lock file, which takes the holder's pid at each start).
    pub database_writes: usize,
    /// Writes and truncations kept (written before the cut though not synced).
    pub kept: usize,
    /// Files removed: created, but their directory not synced since.
    pub files_removed: usize,
}

impl std::ops::AddAssign for Undone {
    fn add_assign(&mut self, u: Undone) {
        self.writes += u.writes;
        self.database_writes += u.database_writes;
        self.kept += u.kept;
        self.files_removed += u.files_removed;
    }
}

/// Waits until `deadline` for a watched process to kill itself at its planned write (`POWERCUT_KILL_AT`,
/// `POWERCUT_KILL_FILE`): true if it did, false if it still runs. Any other end (an abort of the library, an
/// error exit, an exit 0) panics with `what` and the end of its log.
pub fn killed_at_a_write(proc: &mut crate::Proc, deadline: Instant, what: &str) -> bool {
    ended_at_a_write(proc, deadline, what, false) == Some(true)
}

/// [`killed_at_a_write`] for a process that may finish first (`finishes`: an exit 0 is `Some(false)`); `None`
/// while it runs.
pub fn ended_at_a_write(
    proc: &mut crate::Proc,
    deadline: Instant,
    what: &str,
    finishes: bool,
) -> Option<bool> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        if let Some(status) = proc.exited() {
            if finishes && status.success() {
                return Some(false);
            }
            let log = proc.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            assert_eq!(
                status.signal(),
                Some(9),
                "{what}: exited with {status}, not by its SIGKILL at a write; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            return Some(true);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The watched files of one process (those whose path starts with `prefix`) and their journals.
pub struct PowerCut {
    prefix: PathBuf,
    journal: PathBuf,
    library: PathBuf,
}

impl PowerCut {
    /// Builds the library into `dir` and watches the files whose path starts with `prefix` (a buffer's path:
    /// the database, its `-wal` and its lock file; never the `-shm` index).
    pub fn new(dir: &Path, prefix: &Path) -> Self {
        let library = dir.join("powercut.so");
        let source = crate::root().join("tests/powercut/powercut.c");
        crate::run_ok(
            Command::new("cc")
                .args([
                    "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
                ])
                .arg(&library)
                .arg(&source)
                .arg("-ldl"),
        );
        let journal = dir.join("powercut-journal");
        std::fs::create_dir_all(&journal).unwrap();
        Self {
            prefix: prefix.to_owned(),
            journal,
            library,
        }
    }

    /// The environment a process needs to be watched. The journals start empty.
    pub fn env(&self) -> Vec<(String, String)> {
        self.forget();
        self.env_keeping()
    }

    /// The environment of a process that touches the watched files while the watched process is down (a
    /// reader, a lock holder, a second agent): its writes and syncs must be journalled too, or a later cut would
    /// play back writes it made durable. Unlike [`PowerCut::env`] it keeps the journals.
    pub fn env_keeping(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.library.display().to_string()),
            ("POWERCUT_PREFIX".into(), self.prefix.display().to_string()),
            (
                "POWERCUT_JOURNAL".into(),
                self.journal.display().to_string(),
            ),
        ]
    }

    /// Forgets the journals: for files the test removed itself (their unsynced writes went with them).
    pub fn forget(&self) {
        for e in std::fs::read_dir(&self.journal).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
    }

    /// Cuts the power under the files of a process that was killed with SIGKILL (and has exited): plays each
    /// file's journal backwards, keeping what `keep` says, and empties the journals.
    pub fn cut(&self, keep: Keep, rng: &mut fastrand::Rng) -> Undone {
        let mut undone = Undone::default();
        let dir = self.prefix.parent().unwrap();
        let mut journals: Vec<PathBuf> = std::fs::read_dir(&self.journal)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        journals.sort();
        for journal in journals {
            let name = journal.file_name().unwrap().to_str().unwrap();
            if let Some(created) = name.strip_suffix(".created") {
                if std::fs::remove_file(dir.join(created)).is_ok() {
                    undone.files_removed += 1;
                }
                continue;
            }
            let file = dir.join(name.strip_suffix(".undo").unwrap());
            if !file.exists() {
                continue; // removed above, or by the process
            }
            let records = parse(&std::fs::read(&journal).unwrap());
            let kept = match keep {
                Keep::Nothing => 0,
                Keep::RandomPrefix => rng.usize(0..=records.len()),
            };
            if records.len() > kept {
                undo(&file, &records[kept..]);
            }
            undone.writes += records.len() - kept;
            if !name.ends_with(".lock.undo") {
                undone.database_writes += records.len() - kept;
            }
            undone.kept += kept;
        }
        self.forget();
        undone
    }
}

/// One journal record: the file's bytes at `offset` before a write or truncation, and its size then.
struct Record {
    offset: u64,
    size: u64,
    bytes: Vec<u8>,
}

/// The journal's whole records (one cut short by the kill is left out: its write never happened).
fn parse(mut data: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let word = |b: &[u8], i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    while data.len() >= 24 {
        let (offset, len, size) = (word(data, 0), word(data, 1) as usize, word(data, 2));
        if data.len() < 24 + len {
            break;
        }
        out.push(Record {
            offset,
            size,
            bytes: data[24..24 + len].to_vec(),
        });
        data = &data[24 + len..];
    }
    out
}

/// Restores `file` to what it was before the first of `records`, last record first.
fn undo(file: &Path, records: &[Record]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    for r in records.iter().rev() {
        f.write_all_at(&r.bytes, r.offset).unwrap();
        f.set_len(r.size).unwrap();
    }
    f.sync_all().unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64, size: u64, bytes: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [offset, bytes.len() as u64, size] {
            v.extend_from_slice(&w.to_ne_bytes());
        }
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn undoing_writes_backwards_restores_the_file_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        // "abcd"; "XY" written at 2: "abXY"; "123456" at 3: "abX123456"; cut to 5: "abX12".
        let mut journal = Vec::new();
        journal.extend(record(2, 4, b"cd"));
        journal.extend(record(3, 4, b"Y"));
        journal.extend(record(5, 9, b"3456"));
        journal.extend(&record(0, 0, b"zzzz")[..20]); // cut short by the kill: ignored
        let records = parse(&journal);
        assert_eq!(records.len(), 3);
        std::fs::write(&file, b"abX12").unwrap();
        undo(&file, &records);
        assert_eq!(std::fs::read(&file).unwrap(), b"abcd");
    }

    #[test]
    fn a_file_created_since_its_directory_was_synced_is_gone_after_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let cut = PowerCut {
            prefix: dir.path().join("b.db"),
            journal: dir.path().join("journal"),
            library: PathBuf::new(),
        };
        std::fs::create_dir(&cut.journal).unwrap();
        for name in ["b.db", "b.db-wal"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::write(cut.journal.join("b.db-wal.created"), b"").unwrap();
        std::fs::write(cut.journal.join("b.db-wal.undo"), record(0, 0, b"")).unwrap();
        let undone = cut.cut(Keep::Nothing, &mut fastrand::Rng::with_seed(1));
        assert_eq!(undone.files_removed, 1);
        assert!(!dir.path().join("b.db-wal").exists());
        assert_eq!(std::fs::read(dir.path().join("b.db")).unwrap(), b"x");
        assert_eq!(std::fs::read_dir(&cut.journal).unwrap().count(), 0);
    }
}
