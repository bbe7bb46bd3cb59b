//! istiod-rs's bearer-token authentication: the `authorization` header
//! value of a request (first line of the input), taken apart by
//! `auth::http_bearer_token`, then through the TokenReview cache (which
//! reads a JWT's `exp`) with a review whose status is the rest of the input
//! (the Kubernetes API's TokenReviewStatus JSON), read by
//! `auth::token_review::caller_from_review`.
#![no_main]

use std::time::Duration;

use futures::FutureExt as _;
use istiod_rs::auth::review_cache::ReviewCache;
use istiod_rs::auth::{AuthError, http_bearer_token, token_review};
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (header, status) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(value) = http::HeaderValue::from_bytes(header) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value);
    let Ok(token) = http_bearer_token(&headers) else {
        return;
    };
    let status: Option<TokenReviewStatus> = serde_json::from_slice(status).ok();
    let cache = ReviewCache::new(Duration::from_secs(60), 16);
    let reviewed = mesh_fuzz::runtime().block_on(cache.get_or_review(token, move || {
        async move {
            match status {
                Some(status) => token_review::caller_from_review(&status, "cluster.local"),
                None => Err(AuthError::Backend("no review".into())),
            }
        }
        .boxed()
    }));
    if let Err(error) = reviewed {
        let _ = tonic::Status::from(error);
    }
});
