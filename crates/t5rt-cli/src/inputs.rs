//! Reading requests: command-line texts, plain text lines, or JSONL lines with
//! `{"text": ...}` or `{"input_ids": [...]}`. Everything is parsed and checked before any
//! generation starts, so a bad line costs nothing.

use std::io::Read;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde::Deserialize;

/// How `--input` is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormat {
    /// JSONL when the first non-blank line starts with `{`, plain text otherwise.
    Auto,
    /// One input text per line.
    Text,
    /// One JSON object per line: `{"text": "..."}` or `{"input_ids": [..]}`.
    Jsonl,
}

/// One request, as given.
pub use t5rt::Input as Request;

#[derive(Deserialize)]
struct JsonLine {
    text: Option<String>,
    input_ids: Option<Vec<i64>>,
}

/// The text of `path` (`-` for stdin) and the name to give it in messages.
pub fn read_text(path: &str) -> Result<(String, &str)> {
    if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        return Ok((text, "<stdin>"));
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    Ok((text, path))
}

/// Reads `path` (`-` for stdin). Returns the requests and whether the input was JSONL.
pub fn read_file(path: &str, format: InputFormat) -> Result<(Vec<Request>, bool)> {
    let (text, name) = read_text(path)?;
    let jsonl = match format {
        InputFormat::Jsonl => true,
        InputFormat::Text => false,
        InputFormat::Auto => text
            .lines()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.trim_start().starts_with('{')),
    };
    let requests = if jsonl {
        parse_jsonl(&text, name)?
    } else {
        parse_text(&text, name)?
    };
    if requests.is_empty() {
        bail!("{name} holds no inputs");
    }
    Ok((requests, jsonl))
}

/// One request per line; a blank line is an empty input and an error.
pub fn parse_text(text: &str, name: &str) -> Result<Vec<Request>> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            if line.trim().is_empty() {
                bail!("{name} line {}: empty input", i + 1);
            }
            Ok(Request::Text(line.to_string()))
        })
        .collect()
}

/// One JSON object per line; blank lines are skipped.
pub fn parse_jsonl(text: &str, name: &str) -> Result<Vec<Request>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{name} line {}", i + 1);
        let parsed: JsonLine = serde_json::from_str(line).with_context(|| {
            format!("{}: not a JSON object with \"text\" or \"input_ids\"", at())
        })?;
        let request = match (parsed.text, parsed.input_ids) {
            (Some(_), Some(_)) => bail!("{}: give \"text\" or \"input_ids\", not both", at()),
            (None, None) => bail!("{}: needs \"text\" or \"input_ids\"", at()),
            (Some(t), None) if t.trim().is_empty() => bail!("{}: empty text", at()),
            (Some(t), None) => Request::Text(t),
            (None, Some(ids)) if ids.is_empty() => bail!("{}: empty input_ids", at()),
            (None, Some(ids)) => Request::Ids(
                ids.into_iter()
                    .map(|id| {
                        u32::try_from(id)
                            .map_err(|_| anyhow::anyhow!("{}: bad token id {id}", at()))
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        out.push(request);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_takes_text_or_ids() {
        let r = parse_jsonl("{\"text\": \"a\"}\n\n{\"input_ids\": [5, 1]}\n", "f").unwrap();
        assert_eq!(r, vec![Request::Text("a".into()), Request::Ids(vec![5, 1])]);
    }

    #[test]
    fn bad_jsonl_lines_name_the_line() {
        for (text, needle) in [
            ("{\"text\": \"a\"}\n{oops}\n", "f line 2"),
            ("{\"text\": \"a\", \"input_ids\": [1]}", "not both"),
            ("{\"foo\": 1}", "needs"),
            ("{\"input_ids\": [-3]}", "bad token id -3"),
            ("{\"input_ids\": []}", "empty input_ids"),
            ("{\"text\": \"  \"}", "empty text"),
        ] {
            let err = format!("{:#}", parse_jsonl(text, "f").unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn blank_text_lines_are_errors() {
        let err = parse_text("a\n\nb\n", "f").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
