//! The compactor's scratch directory, owned by one live process at a time.
//!
//! Scratch files have fixed names (`hour-<h>/…`), so two processes using one directory overwrite each other's
//! inputs and outputs and publish corrupt or mixed files. The worker id alone does not keep them apart: two
//! deployments on one host (or two tests on one machine) may be configured with the same id. Ownership is an
//! exclusive lock on `<dir>.lock` beside the directory, which the kernel releases when the process ends, however
//! it ends: a directory left by a killed process is taken (and emptied) by the next one, and a live owner's is
//! never shared. The names are reused, so leftovers never pile up.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Directories `<name>`, `<name>-2`, … tried before giving up.
const MAX_TRIES: usize = 64;

/// A claimed scratch directory (held until dropped).
#[derive(Debug)]
pub(super) struct ScratchDir {
    dir: PathBuf,
    _lock: File,
}

impl ScratchDir {
    /// Claims `<base>/<name>`, else the first of `<base>/<name>-2` … that no live process holds. The directory
    /// itself is not created or emptied here (the caller resets it before use).
    pub(super) fn claim(base: &Path, name: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(base)?;
        for i in 1..=MAX_TRIES {
            let n = if i == 1 {
                name.to_owned()
            } else {
                format!("{name}-{i}")
            };
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(base.join(format!("{n}.lock")))?;
            match lock.try_lock() {
                Ok(()) => {
                    return Ok(Self {
                        dir: base.join(n),
                        _lock: lock,
                    })
                }
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!(
            "{MAX_TRIES} scratch directories {name}… under {} are held by other processes",
            base.display()
        )))
    }

    /// The directory.
    pub(super) fn path(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_directory_is_never_handed_out_again_and_a_released_one_is() {
        let base = tempfile::tempdir().unwrap();
        let a = ScratchDir::claim(base.path(), "w").unwrap();
        let b = ScratchDir::claim(base.path(), "w").unwrap();
        assert_eq!(a.path(), base.path().join("w"));
        assert_eq!(b.path(), base.path().join("w-2"));
        drop(a);
        let c = ScratchDir::claim(base.path(), "w").unwrap();
        assert_eq!(c.path(), base.path().join("w"), "released: reused");
    }
}
