//! Layers: the entry model, the deterministic tar writer and its compressors, the reader and
//! indexer of layer blobs, and the snapshots RUN steps stack under their overlay.
//!
//! Arrows inside this folder point one way: `format` and `index` are leaves; `compress` knows
//! only `format`; `read` knows `format` and `index`; `write` and `recompress` build on those;
//! `snapshot` (unpacking a layer into a directory) knows `read`.
//!
//! What this folder deliberately does not know: steps, keys, the solver, or the merged view of
//! a stack of layers (`crate::tree`): a layer here is one blob and its index.

mod compress;
mod format;
mod index;
mod read;
pub(crate) mod recompress;
pub(crate) mod snapshot;
mod write;

pub use format::{Compression, Content, EntryKind, LayerEntry, LayerOptions, compare_paths};
pub use index::{IndexEntry, IndexKind, LayerIndex, TreeError};
pub(crate) use read::{
    MemberPath, index_blob_observed, index_layer_observed, is_regular_file, member_name, normalise_member_path,
    open_layer_stream, verify_diff_id,
};
pub use read::{index_layer, saved_or_indexed};
pub use write::{LayerError, write_layer, write_layer_observed};
