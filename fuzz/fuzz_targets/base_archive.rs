//! A whole base archive (docker-archive or OCI archive tar) as `Image::from_archive` imports it:
//! any bytes are imported or refused with an error naming the archive, never a panic.
#![no_main]

use std::sync::OnceLock;

use layerwright::cache::Store;
use layerwright::internals::import_archive;
use libfuzzer_sys::fuzz_target;

fn store() -> &'static (tempfile::TempDir, Store) {
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path().join("cache")).expect("a store");
        (dir, store)
    })
}

fuzz_target!(|data: &[u8]| {
    let (dir, store) = store();
    let archive = dir.path().join("input.tar");
    if std::fs::write(&archive, data).is_err() {
        return;
    }
    let _ = import_archive(store, &archive);
});
