//! Canonical JSON: compact, with every object's keys sorted, whatever order the map kept them in.
//!
//! Every document that gets a digest (configs, manifests, indexes, remote cache documents) is
//! written through [`to_bytes`], so that no crate of a user's build can change a digest by
//! switching on serde_json's `preserve_order` feature (which makes `Map` keep insertion order).
//!
//! What it deliberately is not: RFC 8785 (JCS) number canonicalisation: numbers are written as
//! serde_json writes them, which for the integers and strings these documents hold is exact.

use serde::Serialize;
use serde_json::Value;

/// The canonical bytes of `document`.
pub fn to_bytes(document: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(document, &mut out);
    out
}

/// The canonical bytes of a serialisable document (through a `Value`, so keys are sorted).
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub fn to_bytes_of(document: &impl Serialize) -> Vec<u8> {
    to_bytes(&serde_json::to_value(document).expect("documents serialise to JSON"))
}

fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(object) => {
            let mut keys: Vec<&String> = object.keys().collect();
            keys.sort();
            out.push(b'{');
            for (position, key) in keys.into_iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("strings serialise");
                out.push(b':');
                write(&object[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("JSON scalars serialise"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_are_sorted_at_every_depth_and_nothing_is_spaced() {
        let mut inner = serde_json::Map::new();
        inner.insert("z".into(), json!(1));
        inner.insert("a".into(), json!("x\"y"));
        let document = json!({ "b": [Value::Object(inner)], "a": null });
        assert_eq!(to_bytes(&document), br#"{"a":null,"b":[{"a":"x\"y","z":1}]}"#);
    }
}
