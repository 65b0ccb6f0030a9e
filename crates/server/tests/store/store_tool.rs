//! `csnapctl format`'s logic on real files: sizes, refusal to overwrite, clear errors.

use csnap_server::store::tool::{format_paths, parse_size, FormatRequest};
use csnap_server::store::{FileDevice, OpenOptions, Store, StoreError};
use std::path::Path;
use std::sync::Arc;

fn file(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn request<'a>(origin: &'a Path, store: &'a Path, chunk: u64, force: bool) -> FormatRequest<'a> {
    FormatRequest {
        origin,
        store,
        chunk_size: chunk,
        force,
        now: 7,
    }
}

#[test]
fn sizes_parse_in_binary_units() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("4K"), Ok(4096));
    assert_eq!(parse_size("64k"), Ok(65536));
    assert_eq!(parse_size("64KiB"), Ok(65536));
    assert_eq!(parse_size("1M"), Ok(1 << 20));
    assert!(parse_size("12Q").unwrap_err().contains("unknown size unit"));
    assert!(parse_size("K").unwrap_err().contains("not a size"));
    assert!(parse_size("99999999999999G")
        .unwrap_err()
        .contains("too large"));
}

#[test]
fn format_then_refuse_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let origin = file(dir.path(), "origin", 1 << 30);
    let store = file(dir.path(), "store", 64 << 20);
    let sb = format_paths(&request(&origin, &store, 65536, false)).unwrap();
    assert_eq!(sb.geometry.origin_size, 1 << 30);
    assert_eq!(sb.geometry.chunk_size, 65536);
    let uuid = csnap_server::store::format::uuid_string(&sb.uuid);
    match format_paths(&request(&origin, &store, 65536, false)) {
        Err(e @ StoreError::AlreadyFormatted { .. }) => {
            assert!(e.to_string().contains(&uuid), "{e}");
            assert!(e.to_string().contains("--force"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let again = format_paths(&request(&origin, &store, 4096, true)).unwrap();
    assert_ne!(again.uuid, sb.uuid);
    let dev = FileDevice::open(&store, false).unwrap();
    let store = Store::open(Arc::new(dev), OpenOptions::default()).unwrap();
    assert_eq!(store.geometry().chunk_size, 4096);
    assert_eq!(store.geometry().origin_chunks(), (1 << 30) / 4096);
}

#[test]
fn format_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let origin = file(dir.path(), "origin", 1 << 30);
    let small = file(dir.path(), "small", 1 << 20);
    let store = file(dir.path(), "store", 64 << 20);
    let empty = file(dir.path(), "empty", 0);
    let text = format_paths(&request(&origin, &small, 16384, false))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("too small") && text.contains("at least"),
        "{text}"
    );
    let text = format_paths(&request(&origin, &store, 3000, false))
        .unwrap_err()
        .to_string();
    assert!(text.contains("4 KiB") && text.contains("1 MiB"), "{text}");
    let missing = dir.path().join("missing");
    let text = format_paths(&request(&missing, &store, 4096, false))
        .unwrap_err()
        .to_string();
    assert!(text.contains(&missing.display().to_string()), "{text}");
    let text = format_paths(&request(&origin, &missing, 4096, false))
        .unwrap_err()
        .to_string();
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(matches!(
        format_paths(&request(&empty, &store, 4096, false)),
        Err(StoreError::BadOriginSize { .. })
    ));
    assert!(matches!(
        format_paths(&request(&origin, &origin, 4096, true)),
        Err(StoreError::SameDevice(_))
    ));
}
