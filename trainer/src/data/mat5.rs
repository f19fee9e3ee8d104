//! A small MATLAB v5 MAT-file reader, limited to what dataset annotations need (Stanford
//! Cars' `cars_annos.mat`): numeric, char, cell and struct arrays, plain or inside zlib
//! `miCOMPRESSED` elements, either byte order.
//!
//! Format: a 128-byte header (text, subsystem offset, version, endian indicator `IM`/`MI`),
//! then data elements, each an 8-byte tag (type, byte count; or the 4-byte "small element"
//! form with the data packed into the tag) padded to 8 bytes. Variables are `miMATRIX`
//! elements: array flags (class), dimensions, name, then the class-specific payload.
//! Arrays are column-major.
//!
//! Anything outside that subset (sparse, objects, function handles) is read past and kept as
//! [`MatValue::Unsupported`], an error only if used. MATLAB 7.3 files are HDF5 and are
//! refused with a hint to re-save them as v7. Every length is checked against the bytes
//! available before allocating, so a damaged file is an error, never a panic or a huge
//! allocation.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest decompressed `miCOMPRESSED` element accepted (guards against zip bombs).
const MAX_INFLATED: u64 = 512 << 20;
/// Deepest nesting of cells/structs accepted.
const MAX_DEPTH: usize = 64;

// Data types (miXXX).
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;
const MI_UTF32: u32 = 18;

// Array classes (mxXXX_CLASS).
const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_OBJECT: u8 = 3;
const MX_CHAR: u8 = 4;
const MX_SPARSE: u8 = 5;

/// A MATLAB array. Numbers of every numeric class are widened to `f64` (integers above
/// 2^53 lose precision; the imaginary part of complex arrays is dropped).
#[derive(Debug, Clone, PartialEq)]
pub enum MatValue {
    Numeric { dims: Vec<usize>, data: Vec<f64> },
    /// Characters in column-major order.
    Char { dims: Vec<usize>, chars: Vec<char> },
    /// Elements in column-major order.
    Cell { dims: Vec<usize>, items: Vec<MatValue> },
    /// `elements[i][f]` is field `fields[f]` of element `i` (column-major).
    Struct { dims: Vec<usize>, fields: Vec<String>, elements: Vec<Vec<MatValue>> },
    /// An array class this reader does not decode (named, for error messages).
    Unsupported(&'static str),
}

impl MatValue {
    /// Number of elements (0 for unsupported values).
    pub fn len(&self) -> usize {
        match self {
            MatValue::Numeric { data, .. } => data.len(),
            MatValue::Char { chars, .. } => chars.len(),
            MatValue::Cell { items, .. } => items.len(),
            MatValue::Struct { elements, .. } => elements.len(),
            MatValue::Unsupported(_) => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A short description for error messages, such as `1×16185 struct array`.
    pub fn describe(&self) -> String {
        let (dims, what) = match self {
            MatValue::Numeric { dims, .. } => (dims, "numeric array"),
            MatValue::Char { dims, .. } => (dims, "char array"),
            MatValue::Cell { dims, .. } => (dims, "cell array"),
            MatValue::Struct { dims, .. } => (dims, "struct array"),
            MatValue::Unsupported(class) => return format!("{class} (not supported by this reader)"),
        };
        let d: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        format!("{} {what}", d.join("×"))
    }

    /// The single number of a 1-element numeric array.
    pub fn scalar(&self) -> Option<f64> {
        match self {
            MatValue::Numeric { data, .. } if data.len() == 1 => Some(data[0]),
            _ => None,
        }
    }

    /// The text of a char array with at most one row (or one column).
    pub fn text(&self) -> Option<String> {
        match self {
            MatValue::Char { dims, chars } if dims.iter().filter(|&&d| d > 1).count() <= 1 => {
                Some(chars.iter().collect())
            }
            _ => None,
        }
    }

    /// Field `name` of struct element `index`.
    pub fn field(&self, index: usize, name: &str) -> Option<&MatValue> {
        match self {
            MatValue::Struct { fields, elements, .. } => {
                let f = fields.iter().position(|n| n == name)?;
                elements.get(index)?.get(f)
            }
            _ => None,
        }
    }
}

/// The variables of a MAT-file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct MatFile {
    pub variables: Vec<(String, MatValue)>,
}

impl MatFile {
    /// Reads and parses `path`; errors name the file and what is wrong with it.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read MAT-file: {e}")))?;
        Self::parse(&bytes).map_err(|msg| Error::file(path, msg))
    }

    /// Parses a MAT-file held in memory. The error is a message without the file name.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() < 128 {
            return Err(format!("not a MATLAB v5 MAT-file: {} bytes, shorter than the 128-byte header", bytes.len()));
        }
        if bytes.starts_with(b"MATLAB 7.3") || bytes.get(512..520) == Some(b"\x89HDF\r\n\x1a\n") {
            return Err("a MATLAB 7.3 (HDF5) file, which this reader does not support; re-save it in MATLAB \
                        with save(..., '-v7')"
                .to_string());
        }
        if bytes[..4].contains(&0) {
            return Err("not a MATLAB v5 MAT-file (no text header; MATLAB v4 files are not supported)".to_string());
        }
        let big_endian = match &bytes[126..128] {
            b"IM" => false,
            b"MI" => true,
            other => return Err(format!("not a MATLAB v5 MAT-file (endian indicator {other:?}, expected \"IM\" or \"MI\")")),
        };
        let mut variables = Vec::new();
        read_top_level(&bytes[128..], big_endian, &mut variables, true)?;
        Ok(MatFile { variables })
    }

    pub fn get(&self, name: &str) -> Option<&MatValue> {
        self.variables.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

fn read_top_level(
    bytes: &[u8],
    be: bool,
    out: &mut Vec<(String, MatValue)>,
    allow_compressed: bool,
) -> std::result::Result<(), String> {
    let mut r = Reader { data: bytes, pos: 0, be };
    while r.remaining() >= 8 {
        let at = 128 + r.pos;
        let (ty, data) = r.element().map_err(|e| format!("data element at byte {at}: {e}"))?;
        match ty {
            MI_COMPRESSED if allow_compressed => {
                let inflated = inflate(data).map_err(|e| format!("compressed element at byte {at}: {e}"))?;
                read_top_level(&inflated, be, out, false)?;
            }
            MI_MATRIX => {
                let (name, value) = parse_matrix(data, be, 0).map_err(|e| format!("variable at byte {at}: {e}"))?;
                out.push((name, value));
            }
            _ => {} // Other top-level elements carry no variables.
        }
    }
    Ok(())
}

fn inflate(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("zlib data is damaged ({e})"))?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(format!("inflates to more than {} MiB", MAX_INFLATED >> 20));
    }
    Ok(out)
}

/// A cursor over data elements.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    be: bool,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn u32_at(&self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.be {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!("needs {n} bytes but only {} remain (the file is truncated)", self.remaining()));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next data element: its type and data, with padding skipped.
    fn element(&mut self) -> std::result::Result<(u32, &'a [u8]), String> {
        let tag = self.take(4)?;
        let first = self.u32_at(tag);
        if first >> 16 != 0 {
            // Small data element: byte count in the upper half, up to 4 bytes of data packed in.
            let (ty, n) = (first & 0xffff, (first >> 16) as usize);
            if n > 4 {
                return Err(format!("small element claims {n} bytes (at most 4)"));
            }
            let data = self.take(4)?;
            return Ok((ty, &data[..n]));
        }
        let len_bytes = self.take(4)?;
        let n = self.u32_at(len_bytes) as usize;
        let data = self.take(n)?;
        if first != MI_COMPRESSED {
            // Compressed elements are not padded; everything else is padded to 8 bytes.
            let pad = (8 - n % 8) % 8;
            self.pos += pad.min(self.remaining());
        }
        Ok((first, data))
    }

    /// The next element, which must be of type `want` (`what` names it for errors).
    fn expect(&mut self, want: &[u32], what: &str) -> std::result::Result<&'a [u8], String> {
        let (ty, data) = self.element().map_err(|e| format!("{what}: {e}"))?;
        if !want.contains(&ty) {
            return Err(format!("{what}: element of type {ty}, expected type {want:?}"));
        }
        Ok(data)
    }

    fn i32s(&self, data: &[u8]) -> Vec<i32> {
        data.chunks_exact(4).map(|c| self.u32_at(c) as i32).collect()
    }
}

/// Parses the contents of a `miMATRIX` element into its name and value.
fn parse_matrix(data: &[u8], be: bool, depth: usize) -> std::result::Result<(String, MatValue), String> {
    if depth > MAX_DEPTH {
        return Err(format!("arrays nested more than {MAX_DEPTH} deep"));
    }
    if data.is_empty() {
        // An empty miMATRIX is how MATLAB writes an empty cell element or struct field.
        return Ok((String::new(), MatValue::Numeric { dims: vec![0, 0], data: Vec::new() }));
    }
    let mut r = Reader { data, pos: 0, be };
    let flags = r.expect(&[MI_UINT32], "array flags")?;
    if flags.len() < 4 {
        return Err("array flags element is too short".to_string());
    }
    let class = (r.u32_at(flags) & 0xff) as u8;
    let dims_data = r.expect(&[MI_INT32], "dimensions")?;
    let dims_raw = r.i32s(dims_data);
    if dims_raw.len() < 2 || dims_raw.iter().any(|&d| d < 0) {
        return Err(format!("invalid dimensions {dims_raw:?}"));
    }
    let dims: Vec<usize> = dims_raw.iter().map(|&d| d as usize).collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("dimensions overflow")?;
    let name_bytes = r.expect(&[MI_INT8, MI_UINT8], "array name")?;
    let name = String::from_utf8_lossy(name_bytes).into_owned();
    let ctx = |e: String| if name.is_empty() { e } else { format!("'{name}': {e}") };

    let value = match class {
        MX_CELL => {
            // Each element is a miMATRIX of at least an 8-byte tag: check before allocating.
            if count > r.remaining() / 8 {
                return Err(ctx(format!("cell of {count} elements does not fit in its {} bytes", r.remaining())));
            }
            let mut items = Vec::with_capacity(count);
            for i in 0..count {
                let d = r.expect(&[MI_MATRIX], &format!("cell element {}", i + 1)).map_err(&ctx)?;
                items.push(parse_matrix(d, be, depth + 1).map_err(|e| ctx(format!("cell element {}: {e}", i + 1)))?.1);
            }
            MatValue::Cell { dims, items }
        }
        MX_STRUCT => {
            let len_data = r.expect(&[MI_INT32], "field name length").map_err(&ctx)?;
            let field_len = r.i32s(len_data).first().copied().unwrap_or(0);
            if field_len <= 0 {
                return Err(ctx(format!("invalid field name length {field_len}")));
            }
            let names = r.expect(&[MI_INT8, MI_UINT8], "field names").map_err(&ctx)?;
            let fields: Vec<String> = names
                .chunks(field_len as usize)
                .map(|c| String::from_utf8_lossy(c).trim_end_matches('\0').to_string())
                .collect();
            let cells = count.checked_mul(fields.len()).ok_or_else(|| ctx("struct size overflows".to_string()))?;
            if cells > r.remaining() / 8 {
                return Err(ctx(format!(
                    "struct of {count} elements × {} fields does not fit in its {} bytes",
                    fields.len(),
                    r.remaining()
                )));
            }
            let mut elements = Vec::with_capacity(count);
            for i in 0..count {
                let mut values = Vec::with_capacity(fields.len());
                for f in &fields {
                    let what = format!("element {} field '{f}'", i + 1);
                    let d = r.expect(&[MI_MATRIX], &what).map_err(&ctx)?;
                    values.push(parse_matrix(d, be, depth + 1).map_err(|e| ctx(format!("{what}: {e}")))?.1);
                }
                elements.push(values);
            }
            MatValue::Struct { dims, fields, elements }
        }
        MX_CHAR => {
            let (ty, d) = r.element().map_err(|e| ctx(format!("char data: {e}")))?;
            let chars: Vec<char> = match ty {
                MI_UTF8 => String::from_utf8_lossy(d).chars().collect(),
                MI_UINT16 | MI_UTF16 => {
                    let units: Vec<u16> = d
                        .chunks_exact(2)
                        .map(|c| if be { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_le_bytes([c[0], c[1]]) })
                        .collect();
                    char::decode_utf16(units).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER)).collect()
                }
                MI_UINT8 | MI_INT8 => d.iter().map(|&b| b as char).collect(),
                MI_UTF32 | MI_UINT32 | MI_INT32 => {
                    r.i32s(d).into_iter().map(|u| char::from_u32(u as u32).unwrap_or(char::REPLACEMENT_CHARACTER)).collect()
                }
                other => return Err(ctx(format!("char data of unsupported type {other}"))),
            };
            MatValue::Char { dims, chars }
        }
        6..=15 => {
            let (ty, d) = r.element().map_err(|e| ctx(format!("numeric data: {e}")))?;
            let data = numbers(ty, d, be).map_err(&ctx)?;
            if data.len() != count {
                return Err(ctx(format!("{} numbers for dimensions {dims:?}", data.len())));
            }
            MatValue::Numeric { dims, data }
        }
        MX_SPARSE => MatValue::Unsupported("sparse array"),
        MX_OBJECT => MatValue::Unsupported("MATLAB object"),
        16 => MatValue::Unsupported("function handle"),
        17 => MatValue::Unsupported("opaque object"),
        other => return Err(ctx(format!("unknown array class {other}"))),
    };
    Ok((name, value))
}

/// Widens stored numbers to `f64`. MATLAB stores a double array with a smaller integer
/// type when the values fit, so the data type need not match the array class.
fn numbers(ty: u32, d: &[u8], be: bool) -> std::result::Result<Vec<f64>, String> {
    fn conv<const N: usize>(d: &[u8], be: bool, f: impl Fn([u8; N], bool) -> f64) -> Vec<f64> {
        d.chunks_exact(N).map(|c| f(c.try_into().expect("chunk of N bytes"), be)).collect()
    }
    macro_rules! num {
        ($t:ty) => {
            conv(d, be, |b, be| if be { <$t>::from_be_bytes(b) as f64 } else { <$t>::from_le_bytes(b) as f64 })
        };
    }
    Ok(match ty {
        MI_INT8 => d.iter().map(|&b| b as i8 as f64).collect(),
        MI_UINT8 => d.iter().map(|&b| b as f64).collect(),
        MI_INT16 => num!(i16),
        MI_UINT16 => num!(u16),
        MI_INT32 => num!(i32),
        MI_UINT32 => num!(u32),
        MI_SINGLE => num!(f32),
        MI_DOUBLE => num!(f64),
        MI_INT64 => num!(i64),
        MI_UINT64 => num!(u64),
        other => return Err(format!("numeric data of unsupported type {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds MAT v5 bytes by hand (little or big endian), to test what the scipy fixture
    /// does not cover: small elements, big-endian files, truncation.
    struct W {
        be: bool,
        out: Vec<u8>,
    }

    impl W {
        fn u32(&self, v: u32) -> [u8; 4] {
            if self.be {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        }
        fn element(&self, ty: u32, data: &[u8]) -> Vec<u8> {
            let mut e = Vec::new();
            if data.len() <= 4 && ty != MI_MATRIX {
                e.extend(self.u32(((data.len() as u32) << 16) | ty));
                let mut d = data.to_vec();
                d.resize(4, 0);
                e.extend(d);
            } else {
                e.extend(self.u32(ty));
                e.extend(self.u32(data.len() as u32));
                e.extend(data);
                while e.len() % 8 != 0 {
                    e.push(0);
                }
            }
            e
        }
        fn matrix(&self, class: u8, dims: &[i32], name: &str, payload: &[u8]) -> Vec<u8> {
            let mut m = self.element(MI_UINT32, &[self.u32(class as u32), self.u32(0)].concat());
            let d: Vec<u8> = dims.iter().flat_map(|&x| self.u32(x as u32)).collect();
            m.extend(self.element(MI_INT32, &d));
            m.extend(self.element(MI_INT8, name.as_bytes()));
            m.extend(payload);
            self.element(MI_MATRIX, &m)
        }
        fn header(&mut self) {
            let mut h = b"MATLAB 5.0 MAT-file, written by a test".to_vec();
            h.resize(124, b' ');
            h.extend(if self.be { [0x01, 0x00] } else { [0x00, 0x01] });
            h.extend(if self.be { b"MI" } else { b"IM" });
            self.out.extend(h);
        }
    }

    fn sample_file(be: bool) -> Vec<u8> {
        let mut w = W { be, out: Vec::new() };
        w.header();
        // x = uint8 [3 4] (a small data element), s.name = 'ab' (UTF-16).
        let x = w.matrix(9, &[1, 2], "x", &w.element(MI_UINT8, &[3, 4]));
        let chars: Vec<u8> = "ab".encode_utf16().flat_map(|u| if be { u.to_be_bytes() } else { u.to_le_bytes() }).collect();
        let name_val = w.matrix(MX_CHAR, &[1, 2], "", &w.element(MI_UINT16, &chars));
        let mut payload = w.element(MI_INT32, &w.u32(8));
        payload.extend(w.element(MI_INT8, b"name\0\0\0\0"));
        payload.extend(name_val);
        let s = w.matrix(MX_STRUCT, &[1, 1], "s", &payload);
        w.out.extend(x);
        w.out.extend(s);
        w.out
    }

    #[test]
    fn reads_small_elements_and_both_byte_orders() {
        for be in [false, true] {
            let f = MatFile::parse(&sample_file(be)).unwrap();
            let x = f.get("x").unwrap();
            assert_eq!(x, &MatValue::Numeric { dims: vec![1, 2], data: vec![3.0, 4.0] }, "be={be}");
            let s = f.get("s").unwrap();
            assert_eq!(s.describe(), "1×1 struct array");
            assert_eq!(s.field(0, "name").unwrap().text().as_deref(), Some("ab"), "be={be}");
            assert!(s.field(0, "other").is_none());
        }
    }

    #[test]
    fn damaged_files_are_errors_not_panics() {
        let good = sample_file(false);
        for cut in [0, 10, 127, 140, 160, good.len() - 3] {
            let r = MatFile::parse(&good[..cut]);
            // A cut exactly between elements is a valid, shorter file; anything else must fail.
            if let Err(e) = r {
                assert!(!e.is_empty());
            }
        }
        assert!(MatFile::parse(&good[..100]).unwrap_err().contains("shorter than the 128-byte header"));
        assert!(MatFile::parse(&good[..good.len() - 3]).unwrap_err().contains("truncated"));
        let mut v73 = good.clone();
        v73[..10].copy_from_slice(b"MATLAB 7.3");
        assert!(MatFile::parse(&v73).unwrap_err().contains("-v7"));
        let mut bad_endian = good.clone();
        bad_endian[126..128].copy_from_slice(b"XX");
        assert!(MatFile::parse(&bad_endian).unwrap_err().contains("endian"));
        // A cell claiming 2^31 elements must not allocate them.
        let mut w = W { be: false, out: Vec::new() };
        w.header();
        let huge = w.matrix(MX_CELL, &[1, i32::MAX], "c", &[]);
        w.out.extend(huge);
        assert!(MatFile::parse(&w.out).unwrap_err().contains("does not fit"));
        // Garbage zlib data.
        let mut w = W { be: false, out: Vec::new() };
        w.header();
        let z = w.element(MI_COMPRESSED, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        w.out.extend(z);
        assert!(MatFile::parse(&w.out).unwrap_err().contains("zlib"));
    }

    #[test]
    fn reads_the_scipy_fixture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/fixtures/cars196");
        for name in ["cars_annos.mat", "cars_annos_uncompressed.mat"] {
            let f = MatFile::read(&dir.join(name)).unwrap();
            let a = f.get("annotations").unwrap();
            assert_eq!(a.describe(), "1×12 struct array", "{name}");
            assert_eq!(a.field(0, "relative_im_path").unwrap().text().as_deref(), Some("car_ims/000001.jpg"));
            assert_eq!(a.field(11, "class").unwrap().scalar(), Some(4.0));
            assert_eq!(a.field(0, "bbox_x2").unwrap().scalar(), Some(123.0));
            let names = f.get("class_names").unwrap();
            let MatValue::Cell { items, .. } = names else { panic!("class_names: {}", names.describe()) };
            assert_eq!(items.len(), 4);
            assert_eq!(items[3].text().as_deref(), Some("Škoda Octavia Combi 2011"));
        }
    }
}
