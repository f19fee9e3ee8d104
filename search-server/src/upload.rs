//! Reading an uploaded image from a request: a multipart form (field `image`, plus `label`
//! where the endpoint takes one) or a raw body with an `image/*` content type.
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

/// Longest accepted label, in characters.
pub const MAX_LABEL_CHARS: usize = 200;
/// Bodies this many times over the limit are not drained: the connection is dropped.
const DRAIN_FACTOR: usize = 4;

/// What the client sent.
#[derive(Debug, Default)]
pub struct Upload {
    pub image: Bytes,
    pub label: Option<String>,
}

/// Which form fields an endpoint takes besides `image`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    ImageOnly,
    ImageAndLabel,
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
        Ok(Upload { image, label: None })
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
    let mut upload = Upload::default();
    let mut saw_image = false;
    while let Some(field) = form.next().await {
        let mut field =
            field.map_err(|e| ApiError::BadRequest(format!("malformed multipart form: {e}")))?;
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" if saw_image => {
                return Err(ApiError::BadRequest(
                    "the form has more than one 'image' field; send one image".into(),
                ))
            }
            "image" => {
                upload.image = read_limited(&mut field, max_bytes).await?;
                saw_image = true;
            }
            "label" if fields == Fields::ImageAndLabel => {
                let raw = read_limited(&mut field, MAX_LABEL_CHARS * 4)
                    .await
                    .map_err(|_| {
                        ApiError::BadRequest(format!(
                            "the label is longer than {MAX_LABEL_CHARS} characters"
                        ))
                    })?;
                upload.label = parse_label(&raw)?;
            }
            other => {
                let accepted = match fields {
                    Fields::ImageOnly => "'image'",
                    Fields::ImageAndLabel => "'image' and 'label'",
                };
                return Err(ApiError::BadRequest(format!(
                    "unexpected form field '{other}'; this endpoint takes {accepted} (the image goes in 'image')"
                )));
            }
        }
    }
    if !saw_image {
        return Err(ApiError::BadRequest(
            "the form has no field named 'image'; send the image file in it".into(),
        ));
    }
    if upload.image.is_empty() {
        return Err(ApiError::BadRequest(
            "the 'image' field is empty; choose an image file".into(),
        ));
    }
    Ok(upload)
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
