//! A list file: one `relative/path label` per line, paths relative to the list file's
//! folder; `#` comments and blank lines are ignored. The label is the last
//! whitespace-separated field, so paths may contain spaces.
//!
//! Class order: numeric when every label is an integer (so `2` comes before `10`),
//! otherwise by string.

use std::collections::BTreeMap;
use std::path::Path;

use super::text::{lines, read_annotation};
use super::{Catalogue, Item, OfficialSplit, Origin};
use crate::error::{Error, Result};

pub(super) fn read(list: &Path) -> Result<Catalogue> {
    if list.is_dir() {
        return Err(Error::file(list, "is a folder; the list dataset takes a text file of 'relative/path label' lines"));
    }
    let text = read_annotation(list, "a text file of 'relative/path label' lines, paths relative to its folder")?;
    let base = list.parent().unwrap_or(Path::new("."));
    let mut rows = Vec::new();
    for line in lines(&text) {
        let Some((path, label)) = line.text.rsplit_once(char::is_whitespace) else {
            return Err(Error::file(
                list,
                format!("line {}: expected 'relative/path label', found '{}'", line.number, line.text),
            ));
        };
        rows.push((base.join(path.trim_end()), label.to_string(), line.number));
    }
    let numeric = rows.iter().all(|r| r.1.parse::<i64>().is_ok());
    let mut order: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    if numeric {
        order.sort_by_key(|l| l.parse::<i64>().unwrap_or_default());
    } else {
        order.sort();
    }
    order.dedup();
    let pos: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
    let items = rows
        .iter()
        .map(|(path, label, number)| Item {
            path: path.clone(),
            class: pos[label.as_str()],
            origin: Origin { file: list.to_path_buf(), line: Some(*number) },
            train: true,
        })
        .collect();
    Ok(Catalogue { classes: order, items, official: OfficialSplit::ClassHalves })
}
