//! Reading uploaded images from a request: a multipart form or a raw body with an `image/*`
//! content type.
//!
//! Search takes one `image` and an optional `filter`. Add takes one or more `image` parts
//! (a batch), each with its own `label` and `metadata`, paired **by order**: the n-th
//! `label` field belongs to the n-th `image`, and likewise `metadata`. So a form either
//! sends no `label` field at all or one per image (an empty one = no label); the same for
//! `metadata`. Anything else is a 400 naming the counts.
//!
//! Size limits are enforced while streaming, never by buffering first. When a body is over
//! the limit the rest of it is read and discarded (up to a bound) before answering 413, so
//! a client that writes its whole request before reading gets the JSON error instead of a
//! connection reset.

use actix_multipart::Multipart;
use actix_web::http::header;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::HttpRequest;
use futures_util::{Stream, StreamExt};

use crate::error::ApiError;
use indexer::filter::{parse_metadata, Metadata, MAX_FILTER_BYTES, MAX_METADATA_BYTES};

/// Longest accepted label, in characters.
pub const MAX_LABEL_CHARS: usize = 200;
/// Most images one add request may carry.
pub const MAX_BATCH_IMAGES: usize = 64;
/// Bodies this many times over the limit are not drained: the connection is dropped.
const DRAIN_FACTOR: usize = 4;

/// One uploaded image with what came with it.
#[derive(Debug, Default)]
pub struct Part {
    pub image: Bytes,
    pub label: Option<String>,
    pub metadata: Option<Metadata>,
}

/// What the client sent.
#[derive(Debug, Default)]
pub struct Upload {
    /// One for a search; one or more (in form order) for an add.
    pub parts: Vec<Part>,
    /// The search's `filter` field, as sent (parsed by the route).
    pub filter: Option<String>,
}

impl Upload {
    /// The single image of a search.
    pub fn image(&self) -> Bytes {
        self.parts
            .first()
            .map(|p| p.image.clone())
            .unwrap_or_default()
    }
}

/// Which form fields an endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    /// One `image`, optional `filter`.
    Search,
    /// `image` parts with `label` / `metadata` paired by order.
    Add,
}

fn too_large(max: usize) -> ApiError {
    ApiError::TooLarge(format!(
        "the upload is larger than this server's limit of {} (--max-upload-bytes)",
        human_bytes(max as u64)
    ))
}

/// `20 MB`, `512 KB`, `300 B`.
pub fn human_bytes(n: u64) -> String {
    if n >= 1_000_000 {
        format!("{:.1} MB", n as f64 / 1e6).replace(".0 ", " ")
    } else if n >= 1000 {
        format!("{:.1} KB", n as f64 / 1e3).replace(".0 ", " ")
    } else {
        format!("{n} B")
    }
}

/// Reads the image (and label) from `req`/`payload`, enforcing `max_bytes` on the image.
pub async fn read_upload(
    req: &HttpRequest,
    mut payload: web::Payload,
    max_bytes: usize,
    fields: Fields,
) -> Result<Upload, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let declared_len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Multipart framing adds boundaries and headers: allow some slack over the image limit.
    let slack = if content_type.starts_with("multipart/") {
        64 * 1024
    } else {
        0
    };
    if let Some(len) = declared_len {
        if len > (max_bytes + slack) as u64 {
            drain(&mut payload, (max_bytes * DRAIN_FACTOR) as u64).await;
            return Err(too_large(max_bytes));
        }
    }

    if content_type.starts_with("multipart/form-data") {
        read_multipart(req, payload, max_bytes, fields).await
    } else if content_type.is_empty()
        || content_type.starts_with("image/")
        || content_type.starts_with("application/octet-stream")
    {
        let image = read_limited(&mut payload, max_bytes).await?;
        if image.is_empty() {
            return Err(ApiError::BadRequest(
                "the request body is empty; send the image bytes as the body or as the multipart field 'image'".into(),
            ));
        }
        Ok(Upload {
            parts: vec![Part {
                image,
                ..Part::default()
            }],
            filter: None,
        })
    } else {
        drain(&mut payload, (max_bytes * DRAIN_FACTOR) as u64).await;
        let ct = content_type.split(';').next().unwrap_or_default();
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type '{ct}' is not an image; send multipart/form-data with the file in a field named \
             'image', or the raw image bytes with an image/* Content-Type"
        )))
    }
}

async fn read_multipart(
    req: &HttpRequest,
    payload: web::Payload,
    max_bytes: usize,
    fields: Fields,
) -> Result<Upload, ApiError> {
    let mut form = Multipart::new(req.headers(), payload);
    let mut images: Vec<Bytes> = Vec::new();
    let mut labels: Vec<Option<String>> = Vec::new();
    let mut metadata: Vec<Option<Metadata>> = Vec::new();
    let mut filter: Option<String> = None;
    // The images of a batch share the request's byte limit.
    let mut image_bytes = 0usize;
    while let Some(field) = form.next().await {
        let mut field =
            field.map_err(|e| ApiError::BadRequest(format!("malformed multipart form: {e}")))?;
        let name = field.name().unwrap_or_default().to_string();
        match (name.as_str(), fields) {
            ("image", Fields::Search) if !images.is_empty() => {
                return Err(ApiError::BadRequest(
                    "the form has more than one 'image' field; a search takes one image".into(),
                ))
            }
            ("image", _) if images.len() == MAX_BATCH_IMAGES => {
                return Err(ApiError::BadRequest(format!(
                    "the form has more than {MAX_BATCH_IMAGES} images; send them in several requests"
                )))
            }
            ("image", _) => {
                let bytes = read_limited(&mut field, max_bytes - image_bytes).await?;
                image_bytes += bytes.len();
                images.push(bytes);
            }
            ("label", Fields::Add) => {
                let raw = read_limited(&mut field, MAX_LABEL_CHARS * 4)
                    .await
                    .map_err(|_| {
                        ApiError::BadRequest(format!(
                            "label {}: longer than {MAX_LABEL_CHARS} characters",
                            labels.len() + 1
                        ))
                    })?;
                labels.push(
                    parse_label(&raw)
                        .map_err(|e| ApiError::BadRequest(format!("label {}: {e}", labels.len() + 1)))?,
                );
            }
            ("metadata", Fields::Add) => {
                let n = metadata.len() + 1;
                let raw = read_limited(&mut field, MAX_METADATA_BYTES * 2)
                    .await
                    .map_err(|_| metadata_too_large(n))?;
                metadata.push(parse_metadata_field(&raw, n)?);
            }
            ("filter", Fields::Search) if filter.is_none() => {
                let raw = read_limited(&mut field, MAX_FILTER_BYTES).await.map_err(|_| {
                    ApiError::BadRequest(format!(
                        "the filter is larger than {MAX_FILTER_BYTES} bytes"
                    ))
                })?;
                let text = std::str::from_utf8(&raw).map_err(|_| {
                    ApiError::BadRequest("the filter is not valid UTF-8 text".into())
                })?;
                filter = Some(text.to_string());
            }
            (other, _) => {
                let accepted = match fields {
                    Fields::Search => "'image' and 'filter' (one each)",
                    Fields::Add => "'image', 'label' and 'metadata'",
                };
                return Err(ApiError::BadRequest(format!(
                    "unexpected form field '{other}'; this endpoint takes {accepted} (the image goes in 'image')"
                )));
            }
        }
    }
    if images.is_empty() {
        return Err(ApiError::BadRequest(
            "the form has no field named 'image'; send the image file in it".into(),
        ));
    }
    if let Some(i) = images.iter().position(|b| b.is_empty()) {
        return Err(ApiError::BadRequest(format!(
            "'image' field {} is empty; choose an image file",
            i + 1
        )));
    }
    let labels = paired("label", labels, images.len())?;
    let metadata = paired("metadata", metadata, images.len())?;
    let parts = images
        .into_iter()
        .zip(labels)
        .zip(metadata)
        .map(|((image, label), metadata)| Part {
            image,
            label,
            metadata,
        })
        .collect();
    Ok(Upload { parts, filter })
}

/// `values` of a per-image field, one per image: none sent = none for every image.
fn paired<T>(
    what: &str,
    values: Vec<Option<T>>,
    images: usize,
) -> Result<Vec<Option<T>>, ApiError> {
    match values.len() {
        0 => Ok((0..images).map(|_| None).collect()),
        n if n == images => Ok(values),
        n => Err(ApiError::BadRequest(format!(
            "the form has {images} 'image' field(s) but {n} '{what}' field(s): '{what}' fields pair with images \
             by order, so send none or one per image (an empty one for an image without)"
        ))),
    }
}

fn metadata_too_large(n: usize) -> ApiError {
    ApiError::TooLarge(format!(
        "metadata {n}: larger than the limit of {MAX_METADATA_BYTES} bytes of JSON"
    ))
}

/// A `metadata` field: a JSON object (see [`indexer::filter::validate_metadata`]); empty = none.
fn parse_metadata_field(raw: &[u8], n: usize) -> Result<Option<Metadata>, ApiError> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| ApiError::BadRequest(format!("metadata {n}: not valid UTF-8 text")))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    match parse_metadata(text) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.too_large => Err(ApiError::TooLarge(format!("metadata {n}: {e}"))),
        Err(e) => Err(ApiError::BadRequest(format!("metadata {n}: {e}"))),
    }
}

/// A label: UTF-8, trimmed, no control characters, at most [`MAX_LABEL_CHARS`]; empty = none.
pub fn parse_label(raw: &[u8]) -> Result<Option<String>, ApiError> {
    let s = std::str::from_utf8(raw)
        .map_err(|_| ApiError::BadRequest("the label is not valid UTF-8 text".into()))?;
    let s = s.trim();
    if s.chars().count() > MAX_LABEL_CHARS {
        return Err(ApiError::BadRequest(format!(
            "the label is longer than {MAX_LABEL_CHARS} characters"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "the label contains control characters (newlines, tabs…)".into(),
        ));
    }
    Ok((!s.is_empty()).then(|| s.to_string()))
}

/// Collects a byte stream up to `max` bytes; over that, drains a bounded remainder and
/// answers 413.
async fn read_limited<S, E>(stream: &mut S, max: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
        if buf.len() + chunk.len() > max {
            drain(stream, (max * DRAIN_FACTOR) as u64).await;
            return Err(too_large(max));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Reads and discards up to `cap` bytes so the client finishes sending before the answer.
async fn drain<S, E>(stream: &mut S, cap: u64)
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let mut seen = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        seen += chunk.len() as u64;
        if seen > cap {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_validated() {
        assert_eq!(
            parse_label(b"  cardinal ").unwrap().as_deref(),
            Some("cardinal")
        );
        assert_eq!(parse_label(b"   ").unwrap(), None);
        assert!(parse_label(b"a\nb").is_err());
        assert!(parse_label(&[0xff, 0xfe]).is_err());
        assert!(parse_label("x".repeat(201).as_bytes()).is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(20_000_000), "20 MB");
        assert_eq!(human_bytes(1500), "1.5 KB");
        assert_eq!(human_bytes(12), "12 B");
    }
}
