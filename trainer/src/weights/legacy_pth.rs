//! Reader for PyTorch's *legacy* (pre-1.6, non-zip) `torch.save` container, which
//! `candle_core::pickle` does not read. Many published checkpoints (the EfficientNet-Lite0
//! ImageNet weights among them) still use it.
//!
//! Layout, as written by `torch.serialization._legacy_save`:
//! 1. a pickle of the magic number `0x1950a86a20f9469cfc6c`,
//! 2. a pickle of the protocol version (1001),
//! 3. a pickle of system info (`little_endian`, type sizes),
//! 4. the pickled object (usually a state dict) whose tensors reference storages through
//!    persistent ids `('storage', StorageClass, key, location, numel, view_metadata)`,
//! 5. a pickle of the list of storage keys, in the order the storages follow,
//! 6. each storage raw: an 8-byte little-endian element count, then the elements.
//!
//! The pickles are decoded with candle's public pickle `Stack`; the container is read here.
//! Tensors may be arbitrarily strided views of their storage (converted TF checkpoints keep
//! TF's HWIO order as strides), so elements are gathered by stride into contiguous tensors.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// The first pickle of every legacy file: PROTO 2, LONG1 of 10 bytes (the magic number,
/// little-endian), STOP. Matched byte for byte (candle's LONG1 decoder only handles ≤ 8 bytes).
pub const LEGACY_MAGIC_PICKLE: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
];

const PROTOCOL_VERSION: i64 = 1001;

/// True if `head` (the first bytes of a file) starts a legacy PyTorch container.
pub fn is_legacy_pth(head: &[u8]) -> bool {
    head.starts_with(&LEGACY_MAGIC_PICKLE)
}

/// A tensor's description in the pickled object, before its storage is read.
#[derive(Debug, Clone)]
struct TensorRef {
    storage_key: String,
    /// `None` for storage types candle has no dtype for (the tensor is skipped).
    storage_dtype: Option<StorageType>,
    /// Bytes per element of the storage, needed to skip over it even when unconverted.
    elem_size: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Storage element types this reader converts (the others are skipped, see `read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    U8,
}

impl StorageType {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ByteStorage" | "BoolStorage" => Self::U8,
            _ => return None,
        })
    }
    /// Element size of every storage class `torch.save` writes, converted or not.
    fn class_elem_size(name: &str) -> Option<usize> {
        if let Some(t) = Self::from_class(name) {
            return Some(t.size());
        }
        Some(match name {
            "ShortStorage" => 2,
            "CharStorage" => 1,
            "ComplexFloatStorage" => 8,
            "ComplexDoubleStorage" => 16,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::U8 => 1,
        }
    }
}

/// Reads every tensor of a legacy `.pth`/`.pt` file. Names are the state-dict keys, with a
/// `state_dict` / `model` / `state` wrapper dict looked through. Non-tensor entries (metadata,
/// optimiser scalars) are skipped, and so are tensors of storage types candle has no dtype for.
pub fn read(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    read_bytes(&bytes, device)
        .map_err(|msg| Error::file(path, format!("legacy PyTorch checkpoint: {msg}")))
}

/// [`read`] on an in-memory file; errors are messages the caller prefixes with the path.
pub fn read_bytes(
    bytes: &[u8],
    device: &Device,
) -> std::result::Result<Vec<(String, Tensor)>, String> {
    if !is_legacy_pth(bytes) {
        return Err("missing the legacy magic number".into());
    }
    let mut cur = Cursor::new(bytes);
    cur.set_position(LEGACY_MAGIC_PICKLE.len() as u64);

    let protocol = unpickle(&mut cur, "protocol version")?;
    match protocol.clone().int_or_long() {
        Ok(PROTOCOL_VERSION) => {}
        _ => {
            return Err(format!(
                "unsupported protocol version {protocol:?} (expected {PROTOCOL_VERSION})"
            ))
        }
    }
    let sys_info = unpickle(&mut cur, "system info")?;
    if dict_get(&sys_info, "little_endian") == Some(&Object::Bool(false)) {
        return Err("written on a big-endian machine; re-save it on a little-endian one".into());
    }
    let root = unpickle(&mut cur, "state dict")?;
    let keys = unpickle(&mut cur, "storage key list")?;
    let keys = match keys {
        Object::List(k) | Object::Tuple(k) => k
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|o| format!("storage key is not a string: {o:?}"))
            })
            .collect::<std::result::Result<Vec<String>, String>>()?,
        other => return Err(format!("expected the storage key list, found {other:?}")),
    };

    let mut tensors = Vec::new();
    collect_tensors(state_dict_of(root), &mut tensors)?;
    let elem_sizes: HashMap<&str, usize> = tensors
        .iter()
        .map(|(_, t)| (t.storage_key.as_str(), t.elem_size))
        .collect();

    // Storages follow in key order, each as `u64 numel` + raw data.
    let mut storages: HashMap<&str, &[u8]> = HashMap::with_capacity(keys.len());
    let mut pos = cur.position() as usize;
    for key in &keys {
        let numel = bytes
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| format!("file ends before storage '{key}'"))?
            as usize;
        pos += 8;
        // A storage no tensor refers to still has to be skipped over; its element size is
        // unknown then, but such storages do not occur in state dicts (every key comes from one).
        let elem = elem_sizes.get(key.as_str()).copied().ok_or_else(|| {
            format!("storage '{key}' is listed but no tensor uses it, so its size is unknown")
        })?;
        let len = numel
            .checked_mul(elem)
            .ok_or_else(|| format!("storage '{key}' size overflows"))?;
        let data = bytes.get(pos..pos + len).ok_or_else(|| {
            format!("file is truncated inside storage '{key}' ({numel} elements)")
        })?;
        storages.insert(key.as_str(), data);
        pos += len;
    }

    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in &tensors {
        let Some(dtype) = t.storage_dtype else {
            tracing::debug!("skipping tensor '{name}': its storage type has no candle dtype");
            continue;
        };
        let data = storages.get(t.storage_key.as_str()).ok_or_else(|| {
            format!(
                "tensor '{name}' uses storage '{}', which the file does not contain",
                t.storage_key
            )
        })?;
        let tensor =
            materialize(t, dtype, data, device).map_err(|e| format!("tensor '{name}': {e}"))?;
        out.push((name.clone(), tensor));
    }
    Ok(out)
}

fn unpickle(cur: &mut Cursor<&[u8]>, what: &str) -> std::result::Result<Object, String> {
    let mut stack = Stack::empty();
    stack
        .read_loop(cur)
        .map_err(|e| format!("cannot decode the {what} pickle: {e}"))?;
    stack
        .finalize()
        .map_err(|e| format!("empty {what} pickle: {e}"))
}

fn dict_get<'a>(obj: &'a Object, key: &str) -> Option<&'a Object> {
    match obj {
        Object::Dict(items) => items
            .iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// Training checkpoints often wrap the weights: `{"state_dict": {...}, "epoch": …}`.
fn state_dict_of(root: Object) -> Object {
    for key in ["state_dict", "model", "state"] {
        if let Some(inner @ Object::Dict(_)) = dict_get(&root, key) {
            return inner.clone();
        }
    }
    root
}

fn collect_tensors(
    obj: Object,
    out: &mut Vec<(String, TensorRef)>,
) -> std::result::Result<(), String> {
    let Object::Dict(items) = obj else {
        return Err(format!("expected a dict of tensors, found {}", short(&obj)));
    };
    for (k, v) in items {
        let Object::Unicode(name) = k else { continue };
        if let Some(t) = tensor_ref(v).map_err(|e| format!("entry '{name}': {e}"))? {
            out.push((name, t));
        }
    }
    Ok(())
}

/// A short description of an object for error messages (the full debug print can be huge).
fn short(obj: &Object) -> String {
    let s = format!("{obj:?}");
    if s.len() > 120 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(120).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// Decodes `_rebuild_tensor_v2(storage, offset, size, stride, …)` (possibly wrapped in
/// `_rebuild_parameter`). `Ok(None)` for anything that is not a tensor.
fn tensor_ref(obj: Object) -> std::result::Result<Option<TensorRef>, String> {
    let Ok((callable, args)) = obj.reduce() else {
        return Ok(None);
    };
    let Object::Class {
        module_name,
        class_name,
    } = callable
    else {
        return Ok(None);
    };
    let args = match (module_name.as_str(), class_name.as_str()) {
        ("torch._utils", "_rebuild_parameter") => {
            let mut a = args
                .tuple()
                .map_err(|o| format!("bad parameter args {}", short(&o)))?;
            if a.is_empty() {
                return Err("empty parameter args".into());
            }
            return tensor_ref(a.remove(0));
        }
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => args,
        _ => return Ok(None),
    };
    let a = args
        .tuple()
        .map_err(|o| format!("bad tensor args {}", short(&o)))?;
    if a.len() < 4 {
        return Err(format!("tensor args have {} fields, expected ≥ 4", a.len()));
    }
    let mut a = a.into_iter();
    let (storage, offset, size, stride) = (
        a.next().unwrap(),
        a.next().unwrap(),
        a.next().unwrap(),
        a.next().unwrap(),
    );
    let pid = storage
        .persistent_load()
        .map_err(|o| format!("storage is not a persistent id: {}", short(&o)))?;
    let pid = pid
        .tuple()
        .map_err(|o| format!("bad storage id {}", short(&o)))?;
    // ('storage', StorageClass, key, location, numel[, view_metadata])
    if pid.len() < 5 {
        return Err(format!("storage id has {} fields, expected ≥ 5", pid.len()));
    }
    let mut pid = pid.into_iter();
    let _tag = pid.next();
    let (_, class) = pid
        .next()
        .unwrap()
        .class()
        .map_err(|o| format!("bad storage class {}", short(&o)))?;
    let key = pid
        .next()
        .unwrap()
        .unicode()
        .map_err(|o| format!("bad storage key {}", short(&o)))?;
    let _location = pid.next();
    let _numel = pid.next();
    let mut offset = to_usize(offset, "offset")?;
    let mut storage_key = key;
    // Old files may address a view of a root storage: (view_key, view_offset, view_size).
    if let Some(Object::Tuple(view)) = pid.next() {
        if view.len() >= 2 {
            let mut view = view.into_iter();
            storage_key = view
                .next()
                .unwrap()
                .unicode()
                .map_err(|o| format!("bad view key {}", short(&o)))?;
            offset += to_usize(view.next().unwrap(), "view offset")?;
        }
    }
    let storage_dtype = StorageType::from_class(&class);
    let elem_size = StorageType::class_elem_size(&class)
        .ok_or_else(|| format!("unknown storage type '{class}'"))?;
    let shape = to_usizes(size, "size")?;
    let stride = to_usizes(stride, "stride")?;
    if shape.len() != stride.len() {
        return Err(format!(
            "size {shape:?} and stride {stride:?} differ in rank"
        ));
    }
    Ok(Some(TensorRef {
        storage_key,
        storage_dtype,
        elem_size,
        offset,
        shape,
        stride,
    }))
}

fn to_usize(o: Object, what: &str) -> std::result::Result<usize, String> {
    o.int_or_long()
        .ok()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("{what} is not a non-negative integer"))
}

fn to_usizes(o: Object, what: &str) -> std::result::Result<Vec<usize>, String> {
    match o {
        Object::Tuple(v) | Object::List(v) => v.into_iter().map(|x| to_usize(x, what)).collect(),
        other => Err(format!("{what} is not a tuple: {}", short(&other))),
    }
}

/// Copies a strided view of `storage` into a contiguous candle tensor.
fn materialize(
    t: &TensorRef,
    dtype: StorageType,
    storage: &[u8],
    device: &Device,
) -> std::result::Result<Tensor, String> {
    let elem = dtype.size();
    let numel_storage = storage.len() / elem;
    let count: usize = t.shape.iter().product();
    // Largest element index the view touches, checked before any read.
    if count > 0 {
        let last = t.offset
            + t.shape
                .iter()
                .zip(&t.stride)
                .map(|(&n, &s)| (n - 1) * s)
                .sum::<usize>();
        if last >= numel_storage {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last} of a {numel_storage}-element storage",
                t.offset, t.shape, t.stride
            ));
        }
    }
    let mut raw = Vec::with_capacity(count * elem);
    for_each_index(&t.shape, &t.stride, t.offset, |i| {
        raw.extend_from_slice(&storage[i * elem..(i + 1) * elem])
    });
    let shape = t.shape.as_slice();
    let tensor = match dtype {
        StorageType::F32 => Tensor::from_vec(decode(&raw, f32::from_le_bytes), shape, device),
        StorageType::F64 => Tensor::from_vec(decode(&raw, f64::from_le_bytes), shape, device),
        StorageType::F16 => Tensor::from_vec(
            decode(&raw, |b| half::f16::from_bits(u16::from_le_bytes(b))),
            shape,
            device,
        ),
        StorageType::BF16 => Tensor::from_vec(
            decode(&raw, |b| half::bf16::from_bits(u16::from_le_bytes(b))),
            shape,
            device,
        ),
        StorageType::I64 => Tensor::from_vec(decode(&raw, i64::from_le_bytes), shape, device),
        StorageType::I32 => Tensor::from_vec(
            decode(&raw, |b| i32::from_le_bytes(b) as i64),
            shape,
            device,
        ),
        StorageType::U8 => Tensor::from_vec(raw, shape, device),
    };
    tensor.map_err(|e| e.to_string())
}

fn decode<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunk of N bytes")))
        .collect()
}

/// Calls `f` with the storage index of every element of the view, in row-major order.
fn for_each_index(shape: &[usize], stride: &[usize], offset: usize, mut f: impl FnMut(usize)) {
    if shape.contains(&0) {
        return;
    }
    let rank = shape.len();
    let mut idx = vec![0usize; rank];
    let mut pos = offset;
    loop {
        f(pos);
        // Increment the multi-index like an odometer, keeping `pos` in step.
        let mut d = rank;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            pos += stride[d];
            if idx[d] < shape[d] {
                break;
            }
            pos -= stride[d] * shape[d];
            idx[d] = 0;
        }
    }
}

/// Writes a legacy container (used by the tests to check the reader on known data).
#[cfg(test)]
pub(crate) mod writer {
    /// A tensor to write: name, f32 data in storage order, shape, stride.
    pub type Entry<'a> = (&'a str, Vec<f32>, Vec<usize>, Vec<usize>);

    /// Serialises `tensors` (name, f32 data in storage order, shape, stride) the way
    /// `torch.save(..., _use_new_zipfile_serialization=False)` does, pickle protocol 2.
    pub fn legacy_pth(tensors: &[Entry], wrap_in_state_dict: bool) -> Vec<u8> {
        let mut out = super::LEGACY_MAGIC_PICKLE.to_vec();
        // protocol version 1001
        out.extend([0x80, 0x02, b'M', 0xe9, 0x03, b'.']);
        // {'little_endian': True}
        out.extend([0x80, 0x02, b'}', b'(']);
        unicode(&mut out, "little_endian");
        out.extend([0x88, b'u', b'.']);
        // The state dict.
        out.extend([0x80, 0x02]);
        if wrap_in_state_dict {
            out.extend([b'}', b'(']);
            unicode(&mut out, "state_dict");
        }
        out.extend(b"ccollections\nOrderedDict\n");
        out.extend([b')', b'R', b'(']);
        for (i, (name, _, shape, stride)) in tensors.iter().enumerate() {
            unicode(&mut out, name);
            out.extend(b"ctorch._utils\n_rebuild_tensor_v2\n");
            out.push(b'(');
            // persistent id ('storage', torch.FloatStorage, key, 'cpu', numel, None)
            out.push(b'(');
            unicode(&mut out, "storage");
            out.extend(b"ctorch\nFloatStorage\n");
            unicode(&mut out, &format!("k{i}"));
            unicode(&mut out, "cpu");
            int(&mut out, tensors[i].1.len());
            out.extend([b'N', b't', b'Q']);
            int(&mut out, 0);
            tuple(&mut out, shape);
            tuple(&mut out, stride);
            out.extend([0x89, b')', b't', b'R']);
        }
        out.push(b'u');
        if wrap_in_state_dict {
            unicode(&mut out, "epoch");
            int(&mut out, 3);
            out.push(b'u');
        }
        out.push(b'.');
        // Storage keys.
        out.extend([0x80, 0x02, b']', b'(']);
        for i in 0..tensors.len() {
            unicode(&mut out, &format!("k{i}"));
        }
        out.extend([b'e', b'.']);
        for (_, data, _, _) in tensors {
            out.extend((data.len() as u64).to_le_bytes());
            for v in data {
                out.extend(v.to_le_bytes());
            }
        }
        out
    }

    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend((v as i32).to_le_bytes());
    }
    fn tuple(out: &mut Vec<u8>, v: &[usize]) {
        out.push(b'(');
        for &x in v {
            int(out, x);
        }
        out.push(b't');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_strided_tensors_and_state_dict_wrapper() {
        // A 2×3 tensor stored transposed (as converted TF checkpoints are) and a plain vector.
        let data: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let file = writer::legacy_pth(
            &[
                ("w", data.clone(), vec![2, 3], vec![1, 2]),
                ("b", vec![7.0, 8.0], vec![2], vec![1]),
            ],
            true,
        );
        let tensors: HashMap<String, Tensor> = read_bytes(&file, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(tensors.len(), 2, "the non-tensor 'epoch' entry is skipped");
        // Element (i, j) lives at storage index i + 2j.
        assert_eq!(
            tensors["w"].to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 2.0, 4.0], vec![1.0, 3.0, 5.0]]
        );
        assert_eq!(tensors["b"].to_vec1::<f32>().unwrap(), vec![7.0, 8.0]);
    }

    #[test]
    fn truncated_and_out_of_bounds_files_are_errors() {
        let file = writer::legacy_pth(&[("w", vec![1.0; 4], vec![4], vec![1])], false);
        let err = read_bytes(&file[..file.len() - 3], &Device::Cpu).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let bad = writer::legacy_pth(&[("w", vec![1.0; 4], vec![4], vec![2])], false);
        let err = read_bytes(&bad, &Device::Cpu).unwrap_err();
        assert!(
            err.contains("'w'") && err.contains("reaches element 6"),
            "{err}"
        );
        assert!(read_bytes(b"not a checkpoint", &Device::Cpu).is_err());
    }
}
