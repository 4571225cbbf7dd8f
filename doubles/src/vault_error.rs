//! Key Vault's error answer, shared by the secrets, keys and certificates APIs of the double:
//! `{"error":{"code","message","innererror":{"code"}}}`, as the Azure SDK parses it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub(crate) fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    inner: Option<&str>,
) -> Response {
    let mut body = json!({ "error": { "code": code, "message": message } });
    if let Some(inner) = inner {
        body["error"]["innererror"] = json!({ "code": inner });
    }
    (status, Json(body)).into_response()
}
