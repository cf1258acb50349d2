//! A base layer's tar stream, as `index_layer` reads it on import: any bytes are either indexed
//! or refused with an error; an index is applied to a tree without panicking.
#![no_main]

use std::sync::OnceLock;

use layerwright::cache::{Digest, LayerRecord, Store};
use layerwright::internals::{FsTree, index_layer};
use libfuzzer_sys::fuzz_target;

fn store() -> &'static (tempfile::TempDir, Store) {
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        (dir, store)
    })
}

fuzz_target!(|data: &[u8]| {
    let (_, store) = store();
    let Ok(blob) = store.put_blob(data) else { return };
    let record = LayerRecord {
        diff_id: Digest::of_bytes(data),
        digest: blob.digest,
        size: blob.size,
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
    };
    if let Ok(index) = index_layer(store, &record) {
        let mut tree = FsTree::default();
        if tree.apply(0, &record.digest, &index).is_ok() {
            let _ = tree.listing();
        }
    }
});
