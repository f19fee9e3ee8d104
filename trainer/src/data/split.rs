//! Which part of a dataset to load: the protocol's train/test halves, everything, or an
//! explicit range of classes (`--split classes=1-50`).

use std::fmt;
use std::str::FromStr;

/// The protocol's parts of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    /// The training classes (first half; SOP: `Ebay_train.txt`).
    Train,
    /// The held-out classes (second half; SOP: `Ebay_test.txt`).
    Test,
    /// Every class.
    All,
}

/// A `--split` value: a protocol part, or `classes=A-B`, the classes at 1-based positions
/// A..=B of the dataset's canonical class order (CUB/Cars: by class id; folder: by folder
/// name; list: by label; SOP: by class id over both files).
///
/// Parsed from and printed as a string, so it round-trips through `config.json` and the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SplitSpec {
    Split(Split),
    /// 1-based, inclusive; `1 <= first <= last`.
    Classes { first: usize, last: usize },
}

impl SplitSpec {
    pub const TRAIN: SplitSpec = SplitSpec::Split(Split::Train);
    pub const TEST: SplitSpec = SplitSpec::Split(Split::Test);
    pub const ALL: SplitSpec = SplitSpec::Split(Split::All);
}

impl From<Split> for SplitSpec {
    fn from(s: Split) -> Self {
        SplitSpec::Split(s)
    }
}

/// A `--split` string that is not one of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid split '{input}': {reason}; expected train, test, all, or classes=A-B (1-based, inclusive, e.g. classes=1-50)")]
pub struct ParseSplitError {
    pub input: String,
    pub reason: String,
}

impl FromStr for SplitSpec {
    type Err = ParseSplitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ParseSplitError { input: s.to_string(), reason: reason.to_string() };
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "train" => return Ok(SplitSpec::TRAIN),
            "test" => return Ok(SplitSpec::TEST),
            "all" => return Ok(SplitSpec::ALL),
            _ => {}
        }
        let Some(range) = t.strip_prefix("classes=") else {
            return Err(err("unknown split name"));
        };
        let parse = |v: &str| -> Result<usize, ParseSplitError> {
            v.trim().parse::<usize>().map_err(|_| err(&format!("'{}' is not a class position", v.trim())))
        };
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let v = parse(range)?;
                (v, v)
            }
        };
        if first == 0 {
            return Err(err("class positions start at 1"));
        }
        if last < first {
            return Err(err("the range ends before it starts"));
        }
        Ok(SplitSpec::Classes { first, last })
    }
}

impl fmt::Display for SplitSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitSpec::Split(Split::Train) => f.write_str("train"),
            SplitSpec::Split(Split::Test) => f.write_str("test"),
            SplitSpec::Split(Split::All) => f.write_str("all"),
            SplitSpec::Classes { first, last } => write!(f, "classes={first}-{last}"),
        }
    }
}

impl TryFrom<String> for SplitSpec {
    type Error = ParseSplitError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SplitSpec> for String {
    fn from(s: SplitSpec) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_ranges() {
        assert_eq!("train".parse::<SplitSpec>().unwrap(), SplitSpec::TRAIN);
        assert_eq!(" Test ".parse::<SplitSpec>().unwrap(), SplitSpec::TEST);
        assert_eq!("all".parse::<SplitSpec>().unwrap(), SplitSpec::ALL);
        assert_eq!("classes=1-50".parse::<SplitSpec>().unwrap(), SplitSpec::Classes { first: 1, last: 50 });
        assert_eq!("classes=7".parse::<SplitSpec>().unwrap(), SplitSpec::Classes { first: 7, last: 7 });
        assert_eq!("classes= 3 - 4".parse::<SplitSpec>().unwrap(), SplitSpec::Classes { first: 3, last: 4 });
    }

    #[test]
    fn rejects_bad_input_with_a_helpful_message() {
        for (input, reason) in [
            ("validation", "unknown split name"),
            ("classes=0-5", "start at 1"),
            ("classes=9-3", "ends before it starts"),
            ("classes=a-3", "'a' is not a class position"),
            ("classes=", "'' is not a class position"),
            ("classes=1-2-3", "'2-3' is not a class position"),
        ] {
            let e = input.parse::<SplitSpec>().unwrap_err().to_string();
            assert!(e.contains(reason), "{input}: {e}");
            assert!(e.contains("classes=A-B"), "{input}: the message should show the accepted forms: {e}");
        }
    }

    #[test]
    fn round_trips_through_display_and_json() {
        for s in ["train", "test", "all", "classes=2-9"] {
            let spec: SplitSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<SplitSpec>(&json).unwrap(), spec);
        }
        assert!(serde_json::from_str::<SplitSpec>("\"classes=0\"").is_err());
    }
}
