//! Stanford Cars (Cars196): `ROOT/cars_annos.mat`, a MATLAB v5 file holding a struct array
//! `annotations` (fields `relative_im_path`, `bbox_x1`…`bbox_y2`, `class`, `test`) and a
//! cell `class_names`; image paths are relative to ROOT (`car_ims/000001.jpg`).
//!
//! Classes are ordered by id (1–196), so the protocol's halves are 1–98 / 99–196. The
//! `test` flag is the classification split and is not used; boxes are not used either
//! (the protocol trains on whole images).

use std::path::Path;

use super::mat5::{MatFile, MatValue};
use super::{Catalogue, Item, OfficialSplit, Origin};
use crate::error::{Error, Result};

const ANNOS: &str = "cars_annos.mat";
const LAYOUT: &str = "the Stanford Cars layout: cars_annos.mat (MATLAB v5) with a struct array 'annotations' \
                      (fields relative_im_path, class) and a cell 'class_names', next to the car_ims/ folder";

/// `root` is the dataset folder, or the `.mat` file itself (images relative to its folder).
pub(super) fn read(root: &Path) -> Result<Catalogue> {
    let (mat_path, base) = if root.is_file() {
        (root.to_path_buf(), root.parent().unwrap_or(Path::new(".")).to_path_buf())
    } else {
        (root.join(ANNOS), root.to_path_buf())
    };
    if !mat_path.exists() {
        return Err(Error::file(&mat_path, format!("annotation file not found; expected {LAYOUT}")));
    }
    let mat = MatFile::read(&mat_path)?;
    let bad = |msg: String| Error::file(&mat_path, format!("{msg}; expected {LAYOUT}"));

    let annos = mat.get("annotations").ok_or_else(|| bad("no variable 'annotations'".to_string()))?;
    let MatValue::Struct { fields, elements, .. } = annos else {
        return Err(bad(format!("'annotations' is a {}", annos.describe())));
    };
    for f in ["relative_im_path", "class"] {
        if !fields.iter().any(|n| n == f) {
            return Err(bad(format!("'annotations' has no field '{f}' (fields: {})", fields.join(", "))));
        }
    }

    // Class names give the class count; without them, the largest class id does.
    let names: Option<Vec<String>> = match mat.get("class_names") {
        Some(MatValue::Cell { items, .. }) => Some(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.text().ok_or_else(|| bad(format!("class_names{{{}}} is a {}, not text", i + 1, v.describe())))
                })
                .collect::<Result<_>>()?,
        ),
        Some(other) => return Err(bad(format!("'class_names' is a {}", other.describe()))),
        None => None,
    };

    let mut rows = Vec::with_capacity(elements.len());
    for i in 0..elements.len() {
        let at = |what: &str, v: Option<&MatValue>| {
            bad(format!(
                "annotations({}).{what} is {}",
                i + 1,
                v.map_or("missing".to_string(), |v| format!("a {}", v.describe()))
            ))
        };
        let p = annos.field(i, "relative_im_path");
        let path = p.and_then(MatValue::text).ok_or_else(|| at("relative_im_path", p))?;
        let c = annos.field(i, "class");
        let class = c
            .and_then(MatValue::scalar)
            .filter(|v| v.fract() == 0.0 && *v >= 1.0 && *v <= u32::MAX as f64)
            .ok_or_else(|| at("class (expected a positive integer)", c))? as usize;
        rows.push((path, class, i + 1));
    }
    let num_classes = match &names {
        Some(n) => n.len(),
        None => {
            tracing::warn!("{}: no 'class_names'; classes are named by id", mat_path.display());
            rows.iter().map(|r| r.1).max().unwrap_or(0)
        }
    };
    let classes = names.unwrap_or_else(|| (1..=num_classes).map(|c| format!("class {c}")).collect());
    let mut items = Vec::with_capacity(rows.len());
    for (path, class, index) in rows {
        if class > num_classes {
            return Err(bad(format!("annotations({index}).class is {class}, but there are {num_classes} class names")));
        }
        items.push(Item {
            path: base.join(path),
            class: class - 1,
            origin: Origin { file: mat_path.clone(), line: Some(index) },
            train: true,
        });
    }
    Ok(Catalogue { classes, items, official: OfficialSplit::ClassHalves })
}
