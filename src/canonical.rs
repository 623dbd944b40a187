//! Canonical JSON and its SHA-256 digest: one text per JSON value, whatever the
//! key order or whitespace of the document it came from, so a digest names the
//! value and not its formatting.
//!
//! The form: object keys sorted by their UTF-8 bytes, no whitespace, strings and
//! numbers as `serde_json` writes them. A policy's version
//! ([`crate::policy::PolicyEngine::policy_hash`]) is the digest of its document.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The canonical text of `value`: keys sorted, no whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

/// Lowercase hex SHA-256 of [`canonical_json`]`(value)`: 64 characters.
pub fn canonical_digest(value: &Value) -> String {
    hex::encode(Sha256::digest(canonical_json(value).as_bytes()))
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Sorted here rather than trusting the map's order: serde_json keeps
            // insertion order when any crate in the build enables `preserve_order`.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|left, right| left.0.as_bytes().cmp(right.0.as_bytes()));
            out.push('{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        // Scalars: serde_json's compact form is already whitespace-free and unique.
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_and_whitespace_dropped() {
        let value: Value =
            serde_json::from_str("{ \"b\" : [1, {\"z\":null, \"a\":true}],\n \"a\": \"x y\" }")
                .expect("valid JSON");
        assert_eq!(
            canonical_json(&value),
            r#"{"a":"x y","b":[1,{"a":true,"z":null}]}"#
        );
    }

    #[test]
    fn digest_is_sha256_hex_of_the_canonical_text() {
        // sha256("{}"), as `printf '{}' | sha256sum` prints it.
        assert_eq!(
            canonical_digest(&json!({})),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(
            canonical_json(&json!({"k\"ey": "line\nbreak"})),
            r#"{"k\"ey":"line\nbreak"}"#
        );
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z \"\\\\]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-e]{1,3}", inner, 0..5)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// Writes `value` with its object keys in reverse order and with spaces and
    /// newlines between tokens, the way a person might format it.
    fn reformatted(value: &Value) -> String {
        match value {
            Value::Array(items) => {
                let parts: Vec<String> = items.iter().map(reformatted).collect();
                format!("[ {} ]\n", parts.join(" ,\n  "))
            }
            Value::Object(map) => {
                let parts: Vec<String> = map
                    .iter()
                    .rev()
                    .map(|(key, item)| {
                        format!("{} :\t{}", Value::String(key.clone()), reformatted(item))
                    })
                    .collect();
                format!("{{\n  {}\n}}", parts.join(" , "))
            }
            scalar => scalar.to_string(),
        }
    }

    /// A copy of `value` with one leaf changed, chosen by `pick`.
    fn with_one_leaf_changed(value: &Value, pick: &mut usize) -> Value {
        match value {
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| with_one_leaf_changed(item, pick))
                    .collect(),
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, item)| (key.clone(), with_one_leaf_changed(item, pick)))
                    .collect(),
            ),
            scalar => {
                let changed = if *pick == 0 {
                    match scalar {
                        Value::Null => json!(0),
                        Value::Bool(flag) => Value::Bool(!flag),
                        Value::Number(number) => {
                            json!(number.as_i64().unwrap_or(0).wrapping_add(1))
                        }
                        Value::String(text) => Value::String(format!("{text}!")),
                        _ => scalar.clone(),
                    }
                } else {
                    scalar.clone()
                };
                *pick = pick.wrapping_sub(1);
                changed
            }
        }
    }

    fn leaf_count(value: &Value) -> usize {
        match value {
            Value::Array(items) => items.iter().map(leaf_count).sum(),
            Value::Object(map) => map.values().map(leaf_count).sum(),
            _ => 1,
        }
    }

    proptest! {
        #[test]
        fn key_order_and_whitespace_do_not_change_the_digest(value in arbitrary_json()) {
            let reparsed: Value = serde_json::from_str(&reformatted(&value)).expect("reformatted JSON parses");
            prop_assert_eq!(canonical_digest(&reparsed), canonical_digest(&value));
        }

        #[test]
        fn any_value_change_changes_the_digest(value in arbitrary_json(), choice in any::<usize>()) {
            let leaves = leaf_count(&value);
            prop_assume!(leaves > 0);
            let mut pick = choice % leaves;
            let changed = with_one_leaf_changed(&value, &mut pick);
            prop_assert_ne!(&changed, &value);
            prop_assert_ne!(canonical_digest(&changed), canonical_digest(&value));
        }

        #[test]
        fn canonical_text_is_a_fixed_point(value in arbitrary_json()) {
            let text = canonical_json(&value);
            let reparsed: Value = serde_json::from_str(&text).expect("canonical JSON parses");
            prop_assert_eq!(canonical_json(&reparsed), text);
        }
    }
}
