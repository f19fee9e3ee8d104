//! Reading annotation text files with errors that name the file, the line, and the layout
//! that was expected.

use std::path::Path;

use crate::error::{Error, Result};

/// A non-blank, non-comment line of an annotation file.
pub(super) struct Line<'a> {
    /// 1-based line number.
    pub number: usize,
    pub text: &'a str,
}

/// Reads a whole annotation file. A missing file is reported with `layout`, a description
/// of what the file should contain, so the user can tell a wrong `--data` path from a
/// damaged dataset.
pub(super) fn read_annotation(path: &Path, layout: &str) -> Result<String> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| {
            Error::file(path, format!("is not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::file(path, format!("annotation file not found; expected {layout}")))
        }
        Err(e) => Err(Error::file(path, format!("cannot read annotation file: {e}"))),
    }
}

/// The meaningful lines of `text`: blank lines and `#` comments are skipped, a UTF-8 BOM
/// and `\r` line endings are tolerated.
pub(super) fn lines(text: &str) -> impl Iterator<Item = Line<'_>> {
    text.trim_start_matches('\u{feff}').lines().enumerate().filter_map(|(i, l)| {
        let t = l.trim();
        (!t.is_empty() && !t.starts_with('#')).then_some(Line { number: i + 1, text: t })
    })
}

/// Splits a line into exactly `n` whitespace-separated fields, the last one taking the rest
/// of the line (so it may contain spaces, as file paths can).
pub(super) fn fields<'a>(path: &Path, line: &Line<'a>, n: usize, layout: &str) -> Result<Vec<&'a str>> {
    let mut out = Vec::with_capacity(n);
    let mut rest = line.text;
    for _ in 0..n - 1 {
        match rest.split_once(char::is_whitespace) {
            Some((a, b)) => {
                out.push(a);
                rest = b.trim_start();
            }
            None => break,
        }
    }
    if out.len() != n - 1 || rest.is_empty() {
        return Err(Error::file(path, format!("line {}: expected {layout}, found '{}'", line.number, line.text)));
    }
    out.push(rest);
    Ok(out)
}

/// Parses a numeric id field of `line`.
pub(super) fn id_field<T: std::str::FromStr>(path: &Path, line: &Line<'_>, what: &str, v: &str) -> Result<T> {
    v.parse::<T>()
        .map_err(|_| Error::file(path, format!("line {}: {what} '{v}' is not a non-negative integer", line.number)))
}
