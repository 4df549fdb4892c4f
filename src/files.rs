//! Files and directories dealsync creates, owner-only whatever the process umask: the
//! database and its inbox (SQLite gives their `-wal` and `-shm` files the database
//! file's mode), the lock files beside them, the `.eml` outbox directory and its
//! messages. The systemd unit sets `UMask=0077`; a daemon or CLI started by hand under
//! the usual 0022 would otherwise leave OAuth tokens, contacts and emails readable by
//! every local user.
//!
//! Invariants:
//! - A file is created with mode 0600 and a directory with 0700 (`open(2)`/`mkdir(2)`
//!   with that mode; a umask can only take bits away).
//! - An existing file or directory is never changed: a mode an operator chose stays,
//!   whether tighter or looser. [`warn_if_shared`] names one that others can read.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode of files dealsync creates.
pub const FILE_MODE: u32 = 0o600;
/// The mode of directories dealsync creates.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and any missing parents with mode 0700; existing ones are left as
/// they are.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Creates `path` as a new, empty file with mode 0600 and opens it for writing; fails
/// with `AlreadyExists` when it exists.
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Makes sure `path` exists: creates it empty with mode 0600 unless it is there
/// already (then it is not opened for writing, so a read-only user can go on). Used
/// before SQLite opens a database, so the database gets owner-only permissions and
/// SQLite copies them to its `-wal` and `-shm` files.
pub fn ensure_private_file(path: &Path) -> io::Result<()> {
    match create_new(path) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

/// Opens `path` for reading and writing, creating it with mode 0600 if missing; an
/// existing file keeps its mode and content.
pub fn open_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
}

/// Logs a warning when users other than the owner may read or write `path` (a file
/// created by an older dealsync, or under a umask of 0022 by another tool).
pub fn warn_if_shared(path: &Path, what: &str) {
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "{what} {} is open to other users (mode {mode:04o}); run `chmod 600 {}` (and the same for its -wal and -shm files) unless that is intended",
                path.display(),
                path.display(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_files_and_directories_are_owner_only_and_existing_ones_keep_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_dir_all(&nested).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);

        let file = nested.join("db");
        ensure_private_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);

        let shared = nested.join("shared");
        std::fs::write(&shared, "keep").unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
        ensure_private_file(&shared).unwrap();
        drop(open_private(&shared).unwrap());
        assert_eq!(mode(&shared), 0o640);
        assert_eq!(std::fs::read_to_string(&shared).unwrap(), "keep");

        let read_only = nested.join("read-only");
        std::fs::write(&read_only, "x").unwrap();
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o400)).unwrap();
        ensure_private_file(&read_only).unwrap();
        assert_eq!(mode(&read_only), 0o400);
        assert_eq!(
            create_new(&read_only).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
