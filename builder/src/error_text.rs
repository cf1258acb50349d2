//! One line of text for an error and its causes (`outer: cause: root cause`), each cause shown
//! once: many errors here already include their source's text in their own message.
//!
//! What it deliberately is not: an error type, or formatting for any particular error.

use std::error::Error;

/// `error`, then each cause in its `source()` chain whose text the line does not hold yet.
pub(crate) fn describe_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
