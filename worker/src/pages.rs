//! An app's own pages: files under its [`App::static_dir`](crate::App::static_dir), served on
//! the worker's port for paths nothing else answers (`/` is `index.html`). Through the
//! balancer they need `balancer.forward_paths`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::http::Body;

/// The largest file served.
const MAX_FILE: u64 = 16 * 1024 * 1024;

/// The file for URL `path` under `root`, or 404. No `..`, hidden files or symlinks out of it.
pub async fn serve(root: &Path, path: &str) -> Response<Body> {
    let Some(file) = resolve(root, path) else {
        return not_found();
    };
    let Ok(meta) = tokio::fs::metadata(&file).await else {
        return not_found();
    };
    if !meta.is_file() || meta.len() > MAX_FILE {
        return not_found();
    }
    match tokio::fs::read(&file).await {
        Ok(bytes) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type(&file))
            .header(header::CACHE_CONTROL, "no-cache")
            .body(
                Full::new(Bytes::from(bytes))
                    .map_err(|e| match e {})
                    .boxed(),
            )
            .expect("static headers are valid"),
        Err(_) => not_found(),
    }
}

/// The file a URL path names under `root`, if it is a plain relative path.
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let mut file = root.to_path_buf();
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        let plain = !segment.starts_with('.')
            && !segment.contains(['\\', '\0', '%'])
            && segment.len() <= 255;
        if !plain {
            return None;
        }
        file.push(segment);
    }
    if path.ends_with('/') || file == root {
        file.push("index.html");
    }
    // A symlink pointing out of the directory is not followed out of it.
    let real = std::fs::canonicalize(&file).ok()?;
    real.starts_with(std::fs::canonicalize(root).ok()?)
        .then_some(real)
}

fn content_type(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn not_found() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(
            Full::new(Bytes::from_static(b"not found\n"))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_under_the_root_resolve() {
        let dir = std::env::temp_dir().join(format!("fleet-pages-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("js")).unwrap();
        std::fs::write(dir.join("index.html"), "hi").unwrap();
        std::fs::write(dir.join("js/app.js"), "x").unwrap();
        std::fs::write(dir.join(".env"), "secret").unwrap();
        let real = |p: &str| std::fs::canonicalize(dir.join(p)).unwrap();
        assert_eq!(resolve(&dir, "/"), Some(real("index.html")));
        assert_eq!(resolve(&dir, "/js/app.js"), Some(real("js/app.js")));
        for bad in [
            "/../etc/passwd",
            "/js/../index.html",
            "/.env",
            "/%2e%2e/x",
            "/missing",
        ] {
            assert_eq!(resolve(&dir, bad), None, "{bad}");
        }
        assert_eq!(
            content_type(Path::new("a.js")),
            "text/javascript; charset=utf-8"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
