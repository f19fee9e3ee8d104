//! Stanford Online Products: `ROOT/Ebay_train.txt` and `ROOT/Ebay_test.txt`, each a header
//! line `image_id class_id super_class_id path` then one image per line, paths relative to
//! ROOT. The official split is by file (11,318 training / 11,316 test classes, disjoint).
//! Class order, for `classes=A-B`, is by class id over both files.

use std::collections::BTreeMap;
use std::path::Path;

use super::split::{Split, SplitSpec};
use super::text::{fields, id_field, lines, read_annotation};
use super::{Catalogue, Item, OfficialSplit, Origin};
use crate::error::{Error, Result};

const TRAIN: &str = "Ebay_train.txt";
const TEST: &str = "Ebay_test.txt";
const COLUMNS: &str = "'<image_id> <class_id> <super_class_id> <path>'";

/// Reads only the list files `split` needs, so a copy holding just the test part can be
/// evaluated.
pub(super) fn read(root: &Path, split: &SplitSpec) -> Result<Catalogue> {
    let files: &[(&str, bool)] = match split {
        SplitSpec::Split(Split::Train) => &[(TRAIN, true)],
        SplitSpec::Split(Split::Test) => &[(TEST, false)],
        _ => &[(TRAIN, true), (TEST, false)],
    };
    let mut rows = Vec::new();
    for &(name, train) in files {
        let path = root.join(name);
        let text = read_annotation(
            &path,
            &format!(
                "the Stanford Online Products layout: a header line then {COLUMNS} lines, paths relative to {}",
                root.display()
            ),
        )?;
        for line in lines(&text) {
            if line.text.starts_with("image_id") {
                continue;
            }
            let f = fields(&path, &line, 4, COLUMNS)?;
            let _: u64 = id_field(&path, &line, "image_id", f[0])?;
            let class: u64 = id_field(&path, &line, "class_id", f[1])?;
            let _: u64 = id_field(&path, &line, "super_class_id", f[2])?;
            rows.push((class, root.join(f[3]), Origin { file: path.clone(), line: Some(line.number) }, train));
        }
    }
    // Class ids are sorted numerically; a class in both files would make the split leak.
    let mut classes: BTreeMap<u64, (usize, bool, Origin)> = BTreeMap::new();
    for (class, _, origin, train) in &rows {
        match classes.get(class) {
            Some((_, t, first)) if t != train => {
                return Err(Error::file(
                    &origin.file,
                    format!(
                        "line {}: class {class} also appears in {first}; the train and test classes must be disjoint",
                        origin.line.unwrap_or(0)
                    ),
                ))
            }
            Some(_) => {}
            None => {
                classes.insert(*class, (0, *train, origin.clone()));
            }
        }
    }
    for (pos, v) in classes.values_mut().enumerate() {
        v.0 = pos;
    }
    let items = rows
        .into_iter()
        .map(|(class, path, origin, train)| Item { path, class: classes[&class].0, origin, train })
        .collect();
    Ok(Catalogue {
        classes: classes.keys().map(|c| c.to_string()).collect(),
        items,
        official: OfficialSplit::PerImage,
    })
}
