//! The cache of layerwright: step keys, and the persistent content-addressed store under the
//! cache directory.
//!
//! What lives here: [`Digest`] (OCI sha256 digests) and [`Sha256Writer`] (hash while writing),
//! [`StepKey`] (blake3 over everything a step depends on), and [`Store`]: `blobs/sha256/<hex>`
//! written atomically while hashed, and the action records that map a step key to the layer it
//! produced. A crash leaves either nothing or a whole entry: blobs are renamed into place after
//! an fsync, and a record is written only after its blobs.
//!
//! What does not: running steps, writing tar streams, or talking to registries. The builder
//! produces the bytes; this crate names, stores and finds them.
//!
//! ```
//! use std::io::Write;
//! use layerwright_cache::{Store, StepKey, ActionRecord, LayerRecord};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path()).unwrap();
//! let mut writer = store.blob_writer().unwrap();
//! writer.write_all(b"layer bytes").unwrap();
//! let blob = writer.commit().unwrap();
//! assert!(store.has_blob(&blob.digest));
//!
//! let key = StepKey::builder().bytes(b"step").finish();
//! let record = ActionRecord { layers: vec![LayerRecord {
//!     diff_id: blob.digest.clone(), digest: blob.digest, size: blob.size,
//!     media_type: "application/vnd.oci.image.layer.v1.tar".into(),
//! }], config: None };
//! store.write_action(&key, &record).unwrap();
//! assert_eq!(store.read_action(&key).unwrap(), Some(record));
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cache_mounts;
mod db;
mod digest;
mod explain;
mod gc;
mod key;
mod lease;
mod stat_cache;
mod store;

pub use cache_mounts::{CacheMountLease, CacheMountOptions, CacheMountSharing, CacheMountUsage};
pub use db::{
    ExecutionLog, FileMaterial, FileSetDigest, FileSetInput, KeyDatabase, KeyQueries, MountInputs, StepIdentity,
    StepInput, step_key,
};
pub use digest::{Digest, DigestError, Sha256Writer};
pub use explain::{MissReason, Provenance};
pub use gc::{Attachment, CacheDirectory, DiskUsage, PrunePolicy, PruneReport, free_bytes};
pub use key::{KEY_FORMAT_VERSION, StepKey, StepKeyBuilder};
pub use lease::LeaseError;
pub use stat_cache::{FileStat, StatCache};
pub use store::{
    ActionRecord, BlobInfo, BlobWriter, LayerRecord, Store, StoreError, WRITEBACK_CHUNK, create_private_dir_all,
    start_writeback,
};
