//! Untrusted text on its way to a human: what counts as visible, and how to show the rest.
//!
//! Tool names, MCP client names and reasons come from callers, and the agent is one
//! of them. Printed raw, a carriage return or an escape sequence redraws the
//! operator's terminal, a bidi override reorders a line, and a zero-width character
//! makes two different names look alike or an empty reason look given. Everything
//! here is pure and allocation-free unless it has to escape something.

use std::borrow::Cow;
use std::fmt::Write as _;

use unicode_general_category::{GeneralCategory, get_general_category};

/// Whether `c` must never reach a terminal as is.
///
/// Controls (C0, DEL, C1), format characters (zero-width spaces and joiners, bidi
/// embeddings, overrides and isolates, the BOM, tag characters), line and paragraph
/// separators, private-use, surrogate and unassigned code points.
pub fn needs_escape(c: char) -> bool {
    matches!(
        get_general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
            | GeneralCategory::Unassigned
    )
}

/// Whether `c` leaves a visible mark on its own.
///
/// Not visible: whitespace of any kind, everything [`needs_escape`] escapes,
/// combining marks (which only decorate a neighbour; U+034F and the variation
/// selectors render as nothing) and the letters that Unicode lists as default
/// ignorable although they are not format characters (the Hangul fillers) and the
/// blank Braille pattern.
pub fn is_visible(c: char) -> bool {
    !c.is_whitespace()
        && !needs_escape(c)
        && !matches!(
            get_general_category(c),
            GeneralCategory::NonspacingMark
                | GeneralCategory::EnclosingMark
                | GeneralCategory::SpaceSeparator
        )
        && !matches!(
            c,
            '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
        )
}

/// Whether `text` has at least one visible character (see [`is_visible`]).
pub fn has_visible_text(text: &str) -> bool {
    text.chars().any(is_visible)
}

/// Whether `text` contains anything [`escape`] would change.
pub fn needs_escaping(text: &str) -> bool {
    text.chars().any(|c| c == '\\' || needs_escape(c))
}

/// `text` with every character that [`needs_escape`] as `\n`, `\r`, `\t` or
/// `\u{XXXX}`, and backslashes doubled so that an escape cannot be forged.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !needs_escaping(text) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if needs_escape(c) => {
                // Writing to a String cannot fail.
                let _ = write!(escaped, "\\u{{{:04x}}}", u32::from(c));
            }
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

/// Serialized JSON with every character [`needs_escape`] written as a `\uXXXX`
/// escape (a surrogate pair above U+FFFF). serde_json already escapes C0 controls;
/// this also covers DEL, C1 controls, bidi and zero-width characters and line
/// separators, so a JSON line is as safe on a terminal as [`escape`]d text. The
/// document's meaning does not change: outside strings JSON has only ASCII.
///
/// A line feed is kept as it is: serde_json writes one inside a string as `\n`,
/// so a raw line feed can only be the layout of pretty-printed JSON, and
/// escaping it would turn the document into invalid JSON.
pub fn json_for_terminal(json: &str) -> Cow<'_, str> {
    let must_escape = |c: char| c != '\n' && needs_escape(c);
    if !json.chars().any(must_escape) {
        return Cow::Borrowed(json);
    }
    let mut safe = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if must_escape(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                // Writing to a String cannot fail.
                let _ = write!(safe, "\\u{:04x}", unit);
            }
        } else {
            safe.push(c);
        }
    }
    Cow::Owned(safe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn terminal_controls_are_escaped() {
        assert_eq!(escape("ok\r\u{1b}[2Kgone\n"), "ok\\r\\u{001b}[2Kgone\\n");
        assert_eq!(escape("a\u{7f}b\u{85}c"), "a\\u{007f}b\\u{0085}c");
        assert_eq!(escape("plain name"), "plain name");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn bidi_zero_width_and_separators_are_escaped() {
        assert_eq!(escape("op\u{202e}rotare"), "op\\u{202e}rotare");
        assert_eq!(escape("oper\u{200b}ator"), "oper\\u{200b}ator");
        assert_eq!(escape("a\u{2028}b\u{2029}c"), "a\\u{2028}b\\u{2029}c");
        assert_eq!(
            escape("\u{2066}x\u{2069}\u{feff}"),
            "\\u{2066}x\\u{2069}\\u{feff}"
        );
        assert_eq!(escape("tag\u{e0041}"), "tag\\u{e0041}");
    }

    #[test]
    fn backslashes_are_doubled_so_escapes_cannot_be_forged() {
        assert_eq!(escape("\\u{1b}"), "\\\\u{1b}");
    }

    #[test]
    fn visible_text_needs_a_visible_character() {
        for invisible in [
            "",
            "   ",
            "\u{200b}\u{200c}\u{200d}\u{2060}\u{feff}",
            "\u{202e}\u{2066}",
            "\u{3164}\u{115f}\u{2800}",
            "\u{034f}\u{fe0f}",
            "\u{00a0}\u{3000}\t\n",
        ] {
            assert!(!has_visible_text(invisible), "{invisible:?}");
        }
        for visible in ["x", " disk full ", "\u{200b}a", "é", "火事"] {
            assert!(has_visible_text(visible), "{visible:?}");
        }
    }

    #[test]
    fn json_for_terminal_keeps_the_document() {
        let value = serde_json::json!({"tool": "a\u{202e}b\u{7f}\u{1b}c\u{e0041}"});
        let text = serde_json::to_string(&value).unwrap();
        let safe = json_for_terminal(&text);
        assert!(!safe.chars().any(needs_escape), "{safe}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&safe).unwrap(),
            value
        );
    }

    #[test]
    fn json_for_terminal_keeps_pretty_printed_json_valid() {
        let value = serde_json::json!({"records": 3, "name": "line\nbreak\u{202e}"});
        let text = serde_json::to_string_pretty(&value).unwrap();
        let safe = json_for_terminal(&text);
        assert!(safe.contains('\n'), "the layout stays: {safe}");
        assert!(!safe.contains('\u{202e}'), "{safe}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&safe).unwrap(),
            value
        );
    }

    proptest! {
        #[test]
        fn pretty_json_for_terminal_round_trips(key in any::<String>(), text in any::<String>()) {
            let value = serde_json::json!({ key: [text, 1, {"nested": null}] });
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let safe = json_for_terminal(&pretty);
            prop_assert!(!safe.chars().any(|c| c != '\n' && needs_escape(c)));
            prop_assert_eq!(serde_json::from_str::<serde_json::Value>(&safe).unwrap(), value);
        }

        #[test]
        fn escaped_text_has_nothing_left_to_escape_but_backslashes(text in any::<String>()) {
            let escaped = escape(&text);
            prop_assert!(!escaped.chars().any(needs_escape));
        }
    }
}
