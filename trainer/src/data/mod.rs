//! Datasets for training and evaluation: the benchmark layouts (CUB-200-2011, Cars196,
//! Stanford Online Products) and two generic ones (a folder per class, a list file), the
//! class-disjoint splits of the metric-learning protocol, P×K batch sampling, augmentation,
//! and a parallel, prefetching batch loader.
//!
//! Every dataset kind is first read into a catalogue (all classes in their canonical
//! order, every image with the class it belongs to and the annotation line that listed it);
//! [`load_dataset`] then applies the [`SplitSpec`] and relabels the chosen classes densely
//! (`0..num_classes`), which is what losses and retrieval metrics expect.

mod augment;
mod cars196;
pub mod class_mining;
mod cub;
mod decode;
pub mod duplicates;
mod folder;
pub mod glyphs;
mod list;
mod loader;
pub mod mat5;
mod sampler;
mod sop;
mod split;
mod text;
mod turns;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub use augment::{Augment, RandomResizedCrop};
pub use class_mining::ClassCentroids;
pub use decode::{
    decode_image, decode_image_bytes, IMAGE_EXTENSIONS, LIMITS as DECODE_LIMITS, MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
};
pub use loader::{BadImage, BadImages, Batch, BatchLoader, LoaderOptions, LoaderProgress};
pub use sampler::PkSampler;
pub use split::{ParseSplitError, Split, SplitSpec};
pub use turns::with_turned_classes;

/// The on-disk layout of a dataset.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// CUB-200-2011: `images.txt`, `image_class_labels.txt`, `classes.txt`, `images/`.
    Cub,
    /// Stanford Cars: `cars_annos.mat` (MATLAB v5) next to the `car_ims/` folder.
    Cars196,
    /// Stanford Online Products: `Ebay_train.txt` / `Ebay_test.txt`.
    Sop,
    /// One subfolder per class, named after it.
    Folder,
    /// A text file of `relative/path label` lines.
    List,
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatasetKind::Cub => "cub",
            DatasetKind::Cars196 => "cars196",
            DatasetKind::Sop => "sop",
            DatasetKind::Folder => "folder",
            DatasetKind::List => "list",
        })
    }
}

/// Where a sample came from, so an unreadable image can be traced back to the annotation
/// that listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The annotation file (`images.txt`, `Ebay_test.txt`, the list file, `cars_annos.mat`),
    /// or the class folder for [`DatasetKind::Folder`].
    pub file: PathBuf,
    /// 1-based line in `file`; for `cars_annos.mat`, the 1-based index in `annotations`;
    /// `None` when the image was found by listing a folder.
    pub line: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file.display()),
            None => write!(f, "{}", self.file.display()),
        }
    }
}

/// One image of a loaded split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    /// Dense label, `0..num_classes` within the loaded split; index into
    /// [`Dataset::class_names`].
    pub label: u32,
    pub origin: Origin,
    /// Quarter turns (clockwise) applied to the decoded image: a class made by
    /// [`with_turned_classes`]; 0 for a file as it is.
    pub turns: u8,
}

impl Sample {
    /// The sample's image: the file decoded (with the intake limits and EXIF orientation),
    /// then turned by [`Sample::turns`].
    pub fn decode(&self) -> Result<image::DynamicImage> {
        Ok(turns::turn(decode_image(&self.path)?, self.turns))
    }
}

/// A loaded split of a dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub kind: DatasetKind,
    /// The root the dataset was loaded from (for `list`, the list file).
    pub root: PathBuf,
    /// The split that was applied.
    pub split: SplitSpec,
    pub samples: Vec<Sample>,
    /// Class name of each dense label (index = label).
    pub class_names: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.samples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
    /// Labels in sample order (the input of [`PkSampler::new`] and of retrieval metrics).
    pub fn labels(&self) -> Vec<u32> {
        self.samples.iter().map(|s| s.label).collect()
    }
}

/// Loads the part of a dataset chosen by `split`.
///
/// Annotation files are read and checked here (missing files, malformed lines, unknown
/// ids are errors naming the file and line); images are only opened by the loader, so a
/// missing image is reported there, with the line that listed it.
pub fn load_dataset(kind: DatasetKind, root: &Path, split: &SplitSpec) -> Result<Dataset> {
    let catalogue = match kind {
        DatasetKind::Cub => cub::read(root)?,
        DatasetKind::Cars196 => cars196::read(root)?,
        DatasetKind::Sop => sop::read(root, split)?,
        DatasetKind::Folder => folder::read(root)?,
        DatasetKind::List => list::read(root)?,
    };
    let (samples, class_names) = catalogue
        .select(split)
        .map_err(|msg| Error::file(root, format!("{kind} dataset: {msg}")))?;
    if samples.is_empty() {
        return Err(Error::file(
            root,
            format!("{kind} dataset: the {split} split contains no images"),
        ));
    }
    Ok(Dataset {
        kind,
        root: root.to_path_buf(),
        split: split.clone(),
        samples,
        class_names,
    })
}

/// How a dataset's official train/test split is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OfficialSplit {
    /// The metric-learning protocol: the first half of the classes (in canonical order)
    /// trains, the second half tests (an odd class count gives the extra class to test).
    ClassHalves,
    /// Each image says which part it belongs to (SOP's two list files).
    PerImage,
}

/// One image listed by a dataset, before splitting.
#[derive(Debug, Clone)]
struct Item {
    path: PathBuf,
    /// Position of the class in [`Catalogue::classes`].
    class: usize,
    origin: Origin,
    /// For [`OfficialSplit::PerImage`]: whether the image belongs to the training part.
    train: bool,
}

/// Everything a dataset lists, classes in canonical order (the order split ranges and
/// dense labels follow).
#[derive(Debug, Clone)]
struct Catalogue {
    classes: Vec<String>,
    items: Vec<Item>,
    official: OfficialSplit,
}

impl Catalogue {
    /// Applies `spec` and relabels the selected classes densely in canonical order. Classes
    /// without any selected image get no label. Errors are messages for the caller to
    /// attach to the dataset root.
    fn select(self, spec: &SplitSpec) -> std::result::Result<(Vec<Sample>, Vec<String>), String> {
        let n = self.classes.len();
        if let SplitSpec::Classes { last, .. } = spec {
            if *last > n {
                return Err(format!(
                    "split {spec} asks for class {last}, but the dataset has only {n} classes"
                ));
            }
        }
        let official = self.official;
        let keep = |item: &Item| -> bool {
            match (spec, official) {
                (SplitSpec::Split(Split::All), _) => true,
                (SplitSpec::Split(Split::Train), OfficialSplit::ClassHalves) => item.class < n / 2,
                (SplitSpec::Split(Split::Test), OfficialSplit::ClassHalves) => item.class >= n / 2,
                (SplitSpec::Split(Split::Train), OfficialSplit::PerImage) => item.train,
                (SplitSpec::Split(Split::Test), OfficialSplit::PerImage) => !item.train,
                (SplitSpec::Classes { first, last }, _) => (first - 1..*last).contains(&item.class),
            }
        };
        let items: Vec<Item> = self.items.into_iter().filter(|i| keep(i)).collect();
        let mut used = vec![false; n];
        for item in &items {
            used[item.class] = true;
        }
        let mut dense = vec![u32::MAX; n];
        let mut class_names = Vec::new();
        for (c, name) in self
            .classes
            .into_iter()
            .enumerate()
            .filter(|(c, _)| used[*c])
        {
            dense[c] = class_names.len() as u32;
            class_names.push(name);
        }
        let samples = items
            .into_iter()
            .map(|i| Sample {
                label: dense[i.class],
                path: i.path,
                origin: i.origin,
                turns: 0,
            })
            .collect();
        Ok((samples, class_names))
    }
}

#[cfg(test)]
pub(crate) mod test_util;

#[cfg(test)]
mod tests;
