//! A crate that exists to switch on serde_json's `preserve_order` feature for the build it is
//! part of; its test (`tests/digests.rs`) builds the example images with that feature on and
//! compares their digests with those of the same images built by `cargo xtask build-image`,
//! which is compiled without it.
//!
//! What it deliberately is not: part of `cargo test --workspace` (the feature would then reach
//! every crate of that build); `cargo xtask test` runs it on its own.

#![forbid(unsafe_code)]

/// Whether serde_json's `Map` keeps insertion order in this build (the feature is on).
pub fn preserve_order_is_on() -> bool {
    let mut map = serde_json::Map::new();
    map.insert("b".into(), serde_json::Value::Null);
    map.insert("a".into(), serde_json::Value::Null);
    map.keys().next().map(String::as_str) == Some("b")
}
