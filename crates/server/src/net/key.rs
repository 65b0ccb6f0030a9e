//! The cluster key file: raw random bytes that every server and client of a volume shares,
//! readable by its owner only. `csnapctl keygen` writes one; the server and clients load it.

use rand::RngCore as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Length of the keys `write_new_key` generates.
pub const KEY_LEN: usize = 32;
/// Shortest key accepted (128 bits).
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted (a bigger file is surely not a key file).
pub const MAX_KEY_LEN: usize = 4096;

/// Why a key file cannot be used (or written).
#[derive(Debug, thiserror::Error)]
// Each variant's `#[error]` message says what it is and what its fields hold.
#[allow(missing_docs)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("key file {path} is not a regular file ({kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "key file {path} has mode {mode:04o}; it must be readable by its owner only \
         (chmod 600 {path})"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is owned by uid {owner}, not by this process's uid {euid}")]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("key file {path} holds {len} bytes; a key has {MIN_KEY_LEN} to {MAX_KEY_LEN}")]
    Length { path: PathBuf, len: usize },
    #[error("key file {path} already exists (use --force to replace it)")]
    Exists { path: PathBuf },
    #[error("cannot write key file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

fn file_kind(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Loads a key file after checking it is a regular file owned by this process's effective
/// uid, with no group or other permission bits (mode 0600 or 0400), of a sane length.
/// The checks run on the opened file, so a swap between check and read is harmless.
pub fn load_key_file(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        // Never block on a FIFO someone put in place of the key.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyFileError::NotRegular {
            path: path.to_owned(),
            kind: file_kind(&meta),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(KeyFileError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    let mut key = Vec::with_capacity(KEY_LEN);
    std::io::Read::by_ref(&mut file)
        .take(MAX_KEY_LEN as u64 + 1)
        .read_to_end(&mut key)
        .map_err(read_err)?;
    if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
        return Err(KeyFileError::Length {
            path: path.to_owned(),
            len: key.len(),
        });
    }
    Ok(key)
}

/// Writes a new random key of [`KEY_LEN`] bytes (from the OS RNG) to `path` with mode 0600.
/// Refuses to replace an existing file unless `force`. The key is written to a temporary
/// file in the same directory and renamed into place, so a crash never leaves a short key.
pub fn write_new_key(path: &Path, force: bool) -> Result<(), KeyFileError> {
    let write_err = |source| KeyFileError::Write {
        path: path.to_owned(),
        source,
    };
    if !force && fs::symlink_metadata(path).is_ok() {
        return Err(KeyFileError::Exists {
            path: path.to_owned(),
        });
    }
    let mut key = [0u8; KEY_LEN];
    rand::rngs::OsRng
        .try_fill_bytes(&mut key)
        .map_err(|e| write_err(io::Error::other(e.to_string())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| write_err(io::Error::other("the path names no file")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The umask cannot widen 0600, but make the mode exact regardless.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(&key)?;
        f.sync_all()?;
        if !force && fs::symlink_metadata(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "appeared while writing",
            ));
        }
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        if e.kind() == io::ErrorKind::AlreadyExists && !force {
            return Err(KeyFileError::Exists {
                path: path.to_owned(),
            });
        }
        return Err(write_err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_then_load_round_trips_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        write_new_key(&path, false).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let key = load_key_file(&path).unwrap();
        assert_eq!(key.len(), KEY_LEN);
        assert!(matches!(
            write_new_key(&path, false),
            Err(KeyFileError::Exists { .. })
        ));
        write_new_key(&path, true).unwrap();
        assert_ne!(load_key_file(&path).unwrap(), key, "a fresh random key");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn bad_key_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, [7u8; 32]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_key_file(&path).unwrap_err();
        assert!(matches!(e, KeyFileError::Permissions { mode: 0o644, .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("0644") && msg.contains(&path.display().to_string()),
            "{msg}"
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_key_file(&path).unwrap(), vec![7u8; 32]);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, [1u8; 3]).unwrap();
        assert!(matches!(
            load_key_file(&path),
            Err(KeyFileError::Length { len: 3, .. })
        ));
        assert!(matches!(
            load_key_file(dir.path()),
            Err(KeyFileError::NotRegular { .. })
        ));
        assert!(matches!(
            load_key_file(&dir.path().join("missing")),
            Err(KeyFileError::Read { .. })
        ));
    }
}
